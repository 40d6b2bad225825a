"""ALFWorld (TextWorld engine) behind the `TextEnv` interface, plus the game-file helpers.

Needs the optional extra `alfworld==0.3.5` (it pulls TextWorld). 0.3.5 matters: its handcoded expert
says `put X in/on Y`, the verb the json_2.1.1 games accept (0.4.2's expert says `move X to Y`, which
these games reject).

Games: the official json_2.1.1 release (one folder per game: `game.tw-pddl`, `traj_data.json`,
sometimes `gt_traj.json`). `ensure_games(tarball)` unpacks the release tarball once into a cache dir;
`list_games(root, split)` lists the *solvable* games of a split, exactly the set ALFWorld's own
`AlfredTWEnv.collect_game_files` would load (train 3554, valid_seen 140, valid_train 200).

Episode ids: `episode_id_for(path)` maps any path that contains `<split>/<task folder>/<trial>` (a
game file, a game folder, or the release's `json_2.1.1/...` dir strings) to
`alfworld/<split>/<task folder>/<trial>`, the one scheme every ALFWorld data source uses.

Some games make the PDDL loader call `sys.exit` ("Undeclared predicate: ..."). `AlfworldEnv.reset`
turns that into `GameLoadError` so that callers can count it and go on instead of dying.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import random
import re
import shutil
import sys
import tarfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastrank.envs.base import EnvState

# The 6 ALFWorld task types (ALFRED's 7th, pick_and_place_with_movable_recep, has no ALFWorld games).
TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
# GCD paper (appendix A.1, following Zhang et al. 2025b): out-of-domain ("L2") ALFWorld task types are
# Cool & Place and Pick Two & Place; the other 4 are in-domain.
L2_TASK_TYPES = ("pick_cool_then_place_in_recep", "pick_two_obj_and_place")
IN_DOMAIN_TASK_TYPES = tuple(t for t in TASK_TYPES if t not in L2_TASK_TYPES)
SPLITS = ("train", "valid_seen", "valid_train", "valid_unseen")

RELEASE_DIR = "json_2.1.1"
GAME_FILE = "game.tw-pddl"
INTRO_BANNER = "-= Welcome to TextWorld, ALFRED! =-"
GOAL_PREFIX = "Your task is to:"
_UNPACKED_MARKER = ".fastrank_unpacked"
_INDEX_FILE = ".fastrank_games_index.json"


class GameLoadError(RuntimeError):
    """A game that cannot be loaded (its PDDL loader called sys.exit, or similar)."""


# ---------------------------------------------------------------------------------------------------
# Text helpers (shared with the data builder: every source is parsed the same way)
# ---------------------------------------------------------------------------------------------------

def split_intro(text: str) -> tuple[str, str]:
    """Split a game's first observation into (room description, goal).

    The welcome banner and the "Your task is to: ..." line are removed from the description; the goal
    is the text after "Your task is to:" (e.g. "look at alarmclock under the desklamp."). A text
    without a goal line gives goal "".
    """
    text = text.replace(INTRO_BANNER, "")
    goal = ""
    idx = text.rfind(GOAL_PREFIX)
    if idx >= 0:
        goal = text[idx + len(GOAL_PREFIX):].strip()
        text = text[:idx]
    return text.strip(), goal


_ARRIVE_RE = re.compile(r"^\s*You arrive at loc \d+\.\s*")


def clean_feedback(text: str) -> str:
    """A step's feedback as the agent sees it, the same for every data source.

    alfworld 0.3.5's grammar prefixes `go to` feedback with "You arrive at loc <n>. " (the n is an
    internal location index that means nothing to the agent); the released gt trajectories, ReAct's
    and ETO's prompts were made with the later grammar without it. It is removed here so that the
    replayed, the released and the live observations look alike (and dedup on observation works).
    """
    return _ARRIVE_RE.sub("", text).strip()


_EPISODE_RE = re.compile(r"(?:^|/)(train|valid_seen|valid_unseen|valid_train)/([^/]+)/(trial_[^/]+)(?:/|$)")


def episode_id_for(path: str | os.PathLike) -> str:
    """`alfworld/<split>/<task folder>/<trial>` for a game file/folder path or a release dir string."""
    s = str(path).replace(os.sep, "/")
    m = None
    for m in _EPISODE_RE.finditer(s):
        pass  # the last match: cache dirs may themselves contain e.g. "train/"
    if m is None:
        raise ValueError(f"not an ALFWorld game path (no <split>/<task>/trial_*): {path}")
    return f"alfworld/{m.group(1)}/{m.group(2)}/{m.group(3)}"


def split_of(path: str | os.PathLike) -> str:
    return episode_id_for(path).split("/")[1]


def task_type_of(game_file: str | os.PathLike) -> str:
    """Task type from the game's traj_data.json (falls back to the task folder's name prefix)."""
    traj = Path(game_file).parent / "traj_data.json"
    if traj.is_file():
        with open(traj, encoding="utf-8") as f:
            return json.load(f)["task_type"]
    folder = episode_id_for(game_file).split("/")[2]
    return folder.split("-", 1)[0]


# ---------------------------------------------------------------------------------------------------
# Game files
# ---------------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """`$FASTRANK_ALFWORLD_CACHE`, else `~/.cache/fastrank/alfworld`."""
    env = os.environ.get("FASTRANK_ALFWORLD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastrank" / "alfworld"


def ensure_games(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory that holds `train/`, `valid_seen/`, ... for `source`.

    `source` is either an unpacked release (a dir containing `json_2.1.1/` or the split dirs) or the
    release tarball (`json_2.1.1_games.tar.xz`), which is unpacked once into `cache_dir` (default
    `default_cache_dir()`); a marker file records a completed unpack, so an interrupted one is redone.
    """
    src = Path(source).expanduser()
    if src.is_dir():
        for cand in (src / RELEASE_DIR, src):
            if any((cand / s).is_dir() for s in SPLITS):
                return cand
        raise FileNotFoundError(f"{src}: no ALFWorld split dirs ({', '.join(SPLITS)}) in it or in {RELEASE_DIR}/")
    if not src.is_file():
        raise FileNotFoundError(f"ALFWorld games not found: {src}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / RELEASE_DIR
    marker = cache / _UNPACKED_MARKER
    stamp = f"{src.resolve()}:{src.stat().st_size}"

    def done() -> bool:
        return marker.is_file() and marker.read_text().strip() == stamp and root.is_dir()

    if done():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    # Concurrent callers (parallel tests, an agent-eval beside a builder) must not unpack over each other:
    # the first one holds the lock and unpacks, the others wait and then find the marker.
    with open(cache / ".unpack.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done():
            _unpack(src, cache, root, marker, stamp)
    return root


def _unpack(src: Path, cache: Path, root: Path, marker: Path, stamp: str) -> None:
    tmp = cache / f".unpack.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with tarfile.open(src, "r:*") as tar:
            members = []
            for m in tar.getmembers():
                name = m.name
                if name.startswith("/") or ".." in Path(name).parts or not (m.isfile() or m.isdir()):
                    raise ValueError(f"{src}: refusing suspicious tar member {name!r}")
                members.append(m)
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kwargs)
        unpacked = tmp / RELEASE_DIR
        if not unpacked.is_dir():
            raise FileNotFoundError(f"{src}: no {RELEASE_DIR}/ inside the tarball")
        shutil.rmtree(root, ignore_errors=True)
        (cache / _INDEX_FILE).unlink(missing_ok=True)
        os.replace(unpacked, root)
        marker.write_text(stamp + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class GameInfo:
    game_file: str  # absolute path of game.tw-pddl
    split: str
    task_type: str
    episode_id: str

    @property
    def rel(self) -> str:
        """`<split>/<task folder>/<trial>/game.tw-pddl`, independent of where the games are unpacked."""
        return self.episode_id.split("/", 1)[1] + "/" + GAME_FILE


def _scan_split(root: Path, split: str) -> list[dict]:
    """All games of a split with their solvability; ALFWorld's own filter (collect_game_files)."""
    out = []
    split_dir = root / split
    if not split_dir.is_dir():
        return out
    for traj in sorted(split_dir.glob("*/trial_*/traj_data.json")):
        folder = traj.parent
        game = folder / GAME_FILE
        rel = str(folder.relative_to(root)).replace(os.sep, "/")
        row = {"rel": rel, "task_type": None, "has_game": game.is_file(), "solvable": False, "skip": None}
        if "movable" in rel or "Sliced" in rel:
            row["skip"] = "movable/sliced"
        with open(traj, encoding="utf-8") as f:
            row["task_type"] = json.load(f)["task_type"]
        if row["task_type"] not in TASK_TYPES and row["skip"] is None:
            row["skip"] = "task type"
        if row["has_game"] and row["skip"] is None:
            with open(game, encoding="utf-8") as f:
                row["solvable"] = bool(json.load(f).get("solvable", False))
        out.append(row)
    return out


def list_games(root: str | os.PathLike, split: str = "train", *, task_types: tuple[str, ...] | None = None,
               solvable_only: bool = True) -> list[GameInfo]:
    """The games of `split` under `root` (see `ensure_games`), sorted by episode id.

    Solvable = what ALFWorld loads: one of the 6 task types, not a movable/sliced task, a game file
    whose `solvable` flag is true. The scan reads every game file once (a few seconds for train) and
    is cached in an index file next to the games when the directory is writable.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    root = Path(root)
    index_path = root.parent / _INDEX_FILE
    index: dict = {}
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError):
            index = {}
    key = str(root.resolve())
    rows = index.get(key, {}).get(split)
    if rows is None:
        rows = _scan_split(root, split)
        index.setdefault(key, {})[split] = rows
        try:
            tmp = index_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(index))
            os.replace(tmp, index_path)
        except OSError:
            pass  # read-only location: just rescan next time
    out = []
    for r in rows:
        if solvable_only and not (r["solvable"] and r["skip"] is None):
            continue
        if task_types is not None and r["task_type"] not in task_types:
            continue
        out.append(GameInfo(str(root / r["rel"] / GAME_FILE), split, r["task_type"], f"alfworld/{r['rel']}"))
    return sorted(out, key=lambda g: g.episode_id)


# ---------------------------------------------------------------------------------------------------
# The environment
# ---------------------------------------------------------------------------------------------------

def _alfred_tw_env():
    """alfworld's `alfred_tw_env` module, loaded without `alfworld.agents.environment/__init__.py`.

    That package __init__ also imports the THOR env, hence torchvision + the Mask R-CNN detector: slow,
    and broken when torchvision does not match the installed torch ("operator torchvision::nms does
    not exist"). The TextWorld-only module needs none of it.
    """
    name = "alfworld.agents.environment.alfred_tw_env"
    if name in sys.modules:
        return sys.modules[name]
    private = "_fastrank_alfred_tw_env"
    if private in sys.modules:
        return sys.modules[private]
    spec = importlib.util.find_spec("alfworld.agents")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("alfworld is not installed: pip install 'fastrank[alfworld]' (alfworld==0.3.5)")
    path = Path(list(spec.submodule_search_locations)[0]) / "environment" / "alfred_tw_env.py"
    mspec = importlib.util.spec_from_file_location(private, path)
    mod = importlib.util.module_from_spec(mspec)
    sys.modules[private] = mod
    try:
        mspec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[private]
        raise
    return mod


def _start(game_file: str):
    """textworld.start with the wrappers ALFWorld's training env uses, plus the handcoded expert."""
    import textworld

    from fastrank.envs import textworld_memo

    textworld_memo.install()  # same games, ~2x faster: TextWorld re-parses identical inputs every step
    tw_env = _alfred_tw_env()
    AlfredDemangler, AlfredExpert, AlfredInfos = tw_env.AlfredDemangler, tw_env.AlfredExpert, tw_env.AlfredInfos
    infos = textworld.EnvInfos(admissible_commands=True, won=True, facts=True, extras=["gamefile", "expert_plan"])
    wrappers = [AlfredDemangler(), AlfredInfos, AlfredExpert(expert_type="handcoded")]
    return textworld.start(game_file, request_infos=infos, wrappers=wrappers)


class AlfworldEnv:
    """One ALFWorld game at a time through TextWorld; implements `fastrank.envs.base.TextEnv`.

    `reset(game_file)` -> EnvState(observation = room description without banner and goal line,
    goal = the task text, admissible = the game's admissible commands, task_type from traj_data.json,
    info = {"expert_plan": the handcoded expert's next action, "game_file", "episode_id", "feedback"
    (raw text)}). `step(action)` -> EnvState with observation = the action's feedback, the step's
    reward, done, won. The expert suggestion in `info["expert_plan"]` is already "look" when its own
    choice was not admissible (that is what the AlfredExpert wrapper does). The expert's random picks come
    from a generator of the env's own, seeded by `expert_seed` or else by the game (`_seeded_expert`).
    """

    def __init__(self, game_file: str | os.PathLike | None = None, expert_seed: int | None = None):
        self.game_file: str | None = str(game_file) if game_file is not None else None
        self.expert_seed = expert_seed  # None: seeded by the game's name, the same in every run
        self._env = None
        self._goal = ""
        self._task_type = ""
        self._expert_rec: dict | None = None
        self.steps = 0

    def reset(self, task: object = None) -> EnvState:
        if task is not None:
            self.game_file = str(task.game_file) if isinstance(task, GameInfo) else str(task)
        if self.game_file is None:
            raise ValueError("AlfworldEnv.reset: no game file given")
        self.close()
        argv = list(sys.argv)  # the PDDL loader overwrites sys.argv (['translate.py', 'domain', 'task'])
        seed = self.expert_seed
        if seed is None:  # "<task folder>/<trial>": the game, wherever the games were unpacked
            seed = zlib.crc32(episode_id_for(self.game_file).split("/", 2)[2].encode())
        self._expert_rng = random.Random(seed)
        try:
            self._env = _start(self.game_file)
            with self._seeded_expert():
                state = self._env.reset()
        except SystemExit as exc:  # the PDDL loader calls sys.exit on some games
            self.close()
            raise GameLoadError(f"{self.game_file}: game loader called sys.exit({exc.code!r})") from None
        finally:
            sys.argv[:] = argv
        self._instrument_expert()
        self._task_type = task_type_of(self.game_file)
        observation, self._goal = split_intro(state["feedback"])
        self.steps = 0
        return self._state(state, observation, 0.0, False)

    def step(self, action: str) -> EnvState:
        if self._env is None:
            raise RuntimeError("AlfworldEnv.step before reset")
        if getattr(self, "_expert_rec", None) is not None:
            self._expert_rec.clear()
        with self._seeded_expert():
            state, reward, done = self._env.step(action)
        self.steps += 1
        return self._state(state, clean_feedback(state["feedback"]), float(reward or 0.0), bool(done))

    @contextmanager
    def _seeded_expert(self):
        """The handcoded expert picks a random admissible command when its plan repeats itself, and some task
        policies pick among objects at random, all from the global `random`: two runs of one recipe collected
        different expert data (3,879 vs 3,853 round-0 states from the same 240 games). During our env's calls it
        draws from this game's own generator instead (seeded by the game), so an episode is reproducible whatever
        else ran before it in the process."""
        from alfworld.agents.expert import handcoded_expert as hx

        saved, hx.random = hx.random, self._expert_rng
        try:
            yield
        finally:
            hx.random = saved

    def _instrument_expert(self) -> None:
        """Record what the handcoded expert itself chose, to tell its policy's action from fallbacks.

        AlfredExpert asks `HandCodedTWAgent.act`, which returns the task policy's action, or a random
        admissible command when the policy repeats itself (or is stuck after `look`); the wrapper then
        replaces a non-admissible answer with "look". Best effort: when alfworld's internals differ,
        `info["expert_source"]` is None.
        """
        self._expert_rec: dict = {}
        agent = getattr(self._env, "_handcoded_expert", None)
        policy = getattr(agent, "policy", None)
        if agent is None or policy is None:
            return
        rec = self._expert_rec
        agent_act, policy_act = agent.act, policy.act

        def act(game_state, *args, **kwargs):
            rec.clear()
            try:
                out = agent_act(game_state, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - measured: its task policies raise IndexError (random.choice
                # on an empty list) in some states only a non-expert policy reaches; the game goes on, unlabelled
                rec["error"] = f"{type(exc).__name__}: {exc}"
                return "look"
            rec["agent"] = out
            return out

        def pact(game_state, *args, **kwargs):
            out = policy_act(game_state, *args, **kwargs)
            rec["policy"] = out
            return out

        agent.act, policy.act = act, pact
        rec["initial"] = True

    def _expert_source(self, plan: str | None) -> tuple[str | None, str | None]:
        """(source, the expert's own suggestion) for the current expert_plan entry."""
        rec = getattr(self, "_expert_rec", None)
        if rec is None or plan is None:
            return None, None
        if rec.pop("initial", False):
            return "initial_look", None
        if "error" in rec:
            return "expert_error", rec["error"]
        if "agent" not in rec:
            return None, None
        agent = rec["agent"]
        if agent != plan:
            return "look_fallback", agent  # not admissible: the wrapper said "look" instead
        return ("policy" if rec.get("policy") == agent else "random"), agent

    def _state(self, state, observation: str, reward: float, done: bool) -> EnvState:
        plan = state.get("extra.expert_plan") or []
        source, suggested = self._expert_source(plan[0] if plan else None)
        return EnvState(
            observation=observation,
            goal=self._goal,
            admissible=list(state["admissible_commands"] or []),
            task_type=self._task_type,
            reward=reward,
            done=done,
            won=bool(state["won"]),
            info={
                "expert_plan": plan[0] if plan else None,
                # "initial_look" | "policy" | "random" (the expert's own random pick when stuck) |
                # "look_fallback" (its suggestion `expert_suggested` was not admissible) | "expert_error" (it
                # raised; `expert_suggested` holds the error) | None
                "expert_source": source,
                "expert_suggested": suggested,
                "feedback": state["feedback"],
                "game_file": self.game_file,
                "episode_id": episode_id_for(self.game_file),
                "steps": self.steps,
            },
        )

    def close(self) -> None:
        if self._env is not None:
            try:
                self._env.close()
            finally:
                self._env = None

    def __enter__(self) -> "AlfworldEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = [
    "TASK_TYPES", "L2_TASK_TYPES", "IN_DOMAIN_TASK_TYPES", "SPLITS", "GameInfo", "GameLoadError", "AlfworldEnv",
    "ensure_games", "list_games", "default_cache_dir", "episode_id_for", "split_of", "split_intro",
    "clean_feedback", "task_type_of",
]
