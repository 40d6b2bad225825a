"""ScienceWorld (Wang et al., 2022) as a `TextEnv`, on the official simulator (`scienceworld==1.2.3`).

    env = ScienceWorldEnv(step_limit=100, max_admissible=50)
    state = env.reset(("boil", 3))          # or ("task-1-boil", 3): ETO names are accepted
    state = env.step(state.admissible[0])
    env.close()

What a state holds
- `observation`: the simulator's feedback to the last action (after `reset`: the initial `look around`).
- `goal`: the task description; `task_type`: the canonical task name (e.g. "boil").
- `admissible`: a *bounded* valid-action list, see `bounded_admissible`. The simulator's own list is
  huge (median ~1900 strings, mostly `connect X to Y` / `pour X into Y` combinations over every
  visible object) and contains duplicate strings (indistinguishable objects such as two apple seeds
  render the same). `env.valid_actions()` returns the full list.
- `reward`: score delta / 100 (the simulator scores 0..100); `info["score"]` is the raw score.
  `won` = score reached 100; `done` = the simulator says completed (won, or score < 0 = failed) or
  the step limit passed.
- `info`: score, raw_reward, moves, n_valid (distinct valid strings), task, variation, look and
  inventory (free actions, no game time), `ambiguous` (the parser is waiting for a number, see
  below), `focused` (the objects focused on so far: the names in the simulator's "You focus on the X." replies
  and the objects the focus actions named), and
  `gold_path` when the env was built with `generate_gold_path=True`.

Ambiguity prompts: when an input matches several objects the simulator answers "Ambiguous request:
Please enter the number ..." and waits for a digit (gold paths contain such "0" answers).
`info["ambiguous"]` is then True and `admissible` is the list of digits offered.

Alias resolution (`resolve_action`): the simulator accepts many surface forms for one action
(`examine X` = `look at X`; `open door to art studio` = `open art studio door`;
`use thermometer in inventory on X` = `use thermometer on X`; container-qualified referents ...),
so 17 % of gold actions are not verbatim in the valid list. We ask the simulator's own input parser
(`InputParser.parse`, side-effect free apart from the ambiguity buffer, which we restore) which
action template and which object ids a string denotes, and compare with the (template_id, obj_ids)
the simulator attaches to every valid action (`getValidActionObjectCombinationsJSON`). Valid
strings with the same template and objects are the aliases; the first one is the canonical form.
When the input is ambiguous, the option the agent will pick (default 0) is the one resolved.
`normalize_action` is a string-only fallback for data without a live simulator (documented there).

The task list, names and splits are in `fastrank.envs.scienceworld_tasks`, the admissible-list policy and
the string-only alias fallback in `fastrank.envs.scienceworld_actions`; both are re-exported here.

Task splits: `eto_split_pairs(split)` reads ETO's (task, variation) index files; `task_level(task)`
gives the GCD paper's out-of-domain split: "L2" = the final task type of each of the 10 topics
(task ids 1-4, 2-3, 3-4, 4-4, 5-2, 6-3, 7-3, 8-2, 9-3, 10-2), "L0/L1" for the other 20.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from fastrank.envs.base import EnvState
from fastrank.envs.scienceworld_actions import (  # re-exported (__all__): callers import them from here
    action_verb,
    bounded_admissible,
    dedupe,
    normalize_action,
    remove_aliases,
    stable_seed,
)
from fastrank.envs.scienceworld_tasks import (
    L2_TASKS,
    TASK_ID,
    TASK_NAMES,
    TASKS,
    canonical_task_name,
    eto_split_pairs,
    task_level,
    task_topic,
)
from fastrank.envs.scienceworld_focus import focused_names
from fastrank.envs.scienceworld_view import check_view, observation_view
from fastrank.paths import shared_data_dir


def simulator_split_variations(tasks: Iterable[str], split: str = "train", env: "ScienceWorldEnv | None" = None
                               ) -> dict[str, list[int]]:
    """The simulator's own train/dev/test variation lists (needs the JVM; `env` is reused if given).
    ETO's indices cover only 24 tasks: they leave out the six long ones (inclined-plane x3,
    mendelian-genetics x2, measure-melting-point-unknown-substance)."""
    if split not in ("train", "dev", "test"):
        raise ValueError(f"split must be train, dev or test, got {split!r}")
    own = env is None
    env = env if env is not None else ScienceWorldEnv(max_admissible=0)
    try:
        out = {}
        for task in tasks:
            name = canonical_task_name(task)
            env._env.load(name, 0, "")
            getter = {"train": env._env.get_variations_train, "dev": env._env.get_variations_dev,
                      "test": env._env.get_variations_test}[split]
            out[name] = sorted(int(v) for v in getter())
        env.task = None  # the loaded state is not a reset() episode
        return out
    finally:
        if own:
            env.close()


# ------------------------------------------------------------------------------------ the wrapper

@dataclass
class Resolution:
    """What the simulator makes of an input string in the current state."""

    action: str
    canonical: str | None  # the first valid-list string for the same (template, objects), if any
    aliases: list[str] = field(default_factory=list)  # all valid-list strings for that action
    template_id: int | None = None
    obj_ids: list[int] = field(default_factory=list)  # all parser assignments except the agent
    ambiguous: bool = False  # the input matches several actions; resolved for option `choice`
    n_matches: int = 1
    method: str = "none"  # "parser" | "verbatim" (no parse, but the string is valid) | "none"
    error: str = ""


class ScienceWorldEnv:
    """Interactive ScienceWorld behind the `TextEnv` interface. One JVM per instance (~1-3 s
    start, ~300 MB); not thread-safe; use one per worker process.

    step_limit: `done` once the game has taken more moves. max_admissible: the cap of
    `EnvState.admissible` (`bounded_admissible` with `admissible_strategy`, seeded by
    (seed, task, variation, step)); None = the full deduplicated valid list; 0 = no list at all
    (skips the ~0.1-0.5 s the simulator spends building it). admissible_priority: `(goal, recent) -> (action ->
    number)`, e.g. `fastrank.data.features.relevance`: each verb's slots go to its highest-priority actions
    (`bounded_admissible`; recent = the last action and what it returned). generate_gold_path: load tasks with
    their gold action sequence (`gold_actions`, `info["gold_path"]`; load takes ~1-3 s more). observation_view:
    "feedback" (the simulator's reply, as the original agents' `obs`) or "room" (+ the compacted room and inventory,
    `fastrank.envs.scienceworld_view`); `info["feedback"]` always holds the reply alone."""

    def __init__(
        self,
        step_limit: int = 100,
        max_admissible: int | None = 50,
        seed: int = 0,
        generate_gold_path: bool = False,
        simplifications: str = "",
        admissible_strategy: str = "stratified",
        admissible_priority=None,
        observation_view: str = "feedback",
    ) -> None:
        from scienceworld import ScienceWorldEnv as _SW  # lazy: the JVM starts here

        self.step_limit = step_limit
        self.max_admissible = max_admissible
        self.seed = seed
        self.generate_gold_path = generate_gold_path
        self.simplifications = simplifications
        self.admissible_strategy = admissible_strategy
        self.admissible_priority = admissible_priority
        self.observation_view = check_view(observation_view)  # at construction, not at the first step
        self._last_action = ""
        self._env = _SW("", envStepLimit=step_limit)
        self._server = self._env.server
        self.task: str | None = None
        self.variation: int | None = None
        self.goal = ""
        self._gold: list[str] = []
        self._score = 0
        self._valid_cache: list[dict] | None = None
        self._n_steps = 0
        self._focused: list[str] = []

    # ---- TextEnv
    def reset(self, task: object) -> EnvState:
        """task: (task_name, variation), {"task":..., "variation":...}, or "task_name/variation"."""
        name, variation = _parse_task_arg(task)
        n_var = int(self._env.get_max_variations(name))
        if not 0 <= variation < n_var:
            raise ValueError(f"{name} has variations 0..{n_var - 1}, got {variation}")
        self.task, self.variation = name, variation
        self._env.load(name, variation, self.simplifications, generateGoldPath=self.generate_gold_path)
        self._gold = list(self._env.get_gold_action_sequence()) if self.generate_gold_path else []
        # No server.reset() here: it is a second load() (gold path included) of what was just loaded.
        self._score = 0
        self._n_steps = 0
        self._last_action = ""
        self._focused = []
        obs = self._server.step("look around")  # what the simulator's own reset() does
        self.goal = str(self._server.getTaskDescription())
        self._score = self._read_score()
        return self._state(obs, reward=0.0, done=False)

    def step(self, action: str) -> EnvState:
        if self.task is None:
            raise RuntimeError("reset() first")
        obs = self._server.step(action)
        self._n_steps += 1
        self._last_action = action
        self._focused += focused_names(str(obs), action)
        score = self._read_score()
        raw_reward = score - self._score
        self._score = score
        done = bool(self._server.getCompleted()) or score < 0 or self.moves() > self.step_limit
        return self._state(obs, reward=raw_reward / 100.0, done=done, raw_reward=raw_reward)

    def close(self) -> None:
        env, self._env = getattr(self, "_env", None), None
        if env is not None:
            try:
                env.close()
            except Exception:  # the JVM may already be gone
                pass

    def __enter__(self) -> "ScienceWorldEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # ---- extras
    @property
    def gold_actions(self) -> list[str]:
        if not self.generate_gold_path:
            raise RuntimeError("construct with generate_gold_path=True to get gold paths")
        return list(self._gold)

    @property
    def score(self) -> int:
        return self._score

    def moves(self) -> int:
        return int(self._server.getNumMoves())

    def look(self) -> str:
        return str(self._server.freeActionLook())

    def inventory(self) -> str:
        return str(self._server.freeActionInventory())

    def valid_with_templates(self) -> list[dict]:
        """[{"action", "template_id", "obj_ids", "type_ids"}] for the current state (cached per step)."""
        if self._valid_cache is None:
            self._valid_cache = json.loads(self._server.getValidActionObjectCombinationsJSON())["validActions"]
        return self._valid_cache

    def valid_actions(self) -> list[str]:
        """The simulator's full valid-action list, deduplicated."""
        return dedupe(v["action"] for v in self.valid_with_templates())

    def in_ambiguous_state(self) -> bool:
        return bool(self._m(self._parser(), "isInAmbiguousState")())

    def ambiguous_options(self) -> list[str]:
        """The digits the parser is waiting for (empty when not in an ambiguity prompt)."""
        if not self.in_ambiguous_state():
            return []
        return [str(i) for i in range(int(self._m(self._parser(), "getNumAmbiguousMatches")()))]

    def resolve_action(self, action: str, choice: int = 0) -> Resolution:
        """Which valid-list strings denote the same action as `action` here (see module doc).
        Does not advance the game. Must not be called while an ambiguity prompt is pending."""
        if self.in_ambiguous_state():
            raise RuntimeError("the parser is waiting for an ambiguity answer")
        key = " ".join(action.split())
        valid = self.valid_with_templates()
        res = Resolution(action=key, canonical=None)
        keys, err = self._parse(key)
        res.n_matches, res.ambiguous, res.error = len(keys), len(keys) > 1, err
        if keys and not 0 <= choice < len(keys):
            res.error = f"choice {choice} out of range for {len(keys)} matches"
        elif keys and keys[choice] is not None:
            tid, assign = parsed = keys[choice]
            objs = Counter(assign.values())
            res.template_id, res.obj_ids = tid, sorted(objs.elements())
            cands = [v for v in valid if v["template_id"] == tid and not (Counter(v["obj_ids"]) - objs)]
            if len(cands) > 1:  # e.g. `move A to B` vs `move B to A`: re-parse to compare roles
                exact = [v for v in cands if parsed in self._parse(v["action"])[0]]
                cands = exact or cands
            res.aliases = dedupe(v["action"] for v in cands)
            res.canonical = res.aliases[0] if res.aliases else None
            res.method = "parser"
        if res.canonical is None and any(v["action"] == key for v in valid):
            res.canonical, res.aliases, res.method = key, [key], "verbatim"
        return res

    # ---- internals
    @staticmethod
    def _m(obj, name):  # a Java method regardless of py4j's auto_field setting
        from py4j.java_gateway import get_method

        return get_method(obj, name)

    def _agent_interface(self):
        return self._m(self._m(self._server, "agentInterface")(), "get")()

    def _parser(self):
        return self._m(self._agent_interface(), "inputParser")()

    def _parse(self, text: str) -> tuple[list[tuple[int, dict[str, int]] | None], str]:
        """What `text` denotes here: a list of (template_id, {var: uuid}) — one entry, several when
        the input is ambiguous (in the order of the simulator's numbered prompt), none when it does
        not parse — and the parser's message. The ambiguity buffer is cleared afterwards."""
        m = self._m
        ai = self._agent_interface()
        ip = m(ai, "inputParser")()
        agent = m(ai, "agent")()
        visible = m(m(ai, "getAgentVisibleObjects")(m(ai, "getAgentVisibleObjects$default$1")()), "_2")()
        container = m(m(agent, "getContainer")(), "get")()
        goal_seq = m(m(ai, "task")(), "goalSequence")()
        r = m(ip, "parse")(text, visible, m(ai, "universe")(), agent, m(ai, "objMonitor")(), goal_seq, container)
        opt = m(r, "_4")()
        if m(opt, "isDefined")():
            a = m(opt, "get")()
            return [self._action_key(m(a, "action")(), m(a, "assignments")())], ""
        if m(ip, "isInAmbiguousState")():
            try:
                keys = []
                for im in m(m(ip, "lastAmbiguousMatches")(), "get")():
                    ard = m(im, "actionRequestDef")()
                    defined = m(ard, "isDefined")()  # None keeps the prompt's numbering
                    keys.append(self._action_key(m(ard, "get")(), m(im, "varLUT")()) if defined else None)
                return keys, ""
            finally:
                m(ip, "clearAmbiguousState")()
        return [], str(m(r, "_3")())

    def _action_key(self, action_def, assignments) -> tuple[int, dict[str, int]]:
        m = self._m
        out: dict[str, int] = {}
        it = m(assignments, "iterator")()
        while m(it, "hasNext")():
            kv = m(it, "next")()
            var = str(m(kv, "_1")())
            if var != "agent":
                out[var] = int(m(m(kv, "_2")(), "uuid")())
        return int(m(action_def, "uniqueActionID")()), out

    def _read_score(self) -> int:
        return int(round(100 * float(self._server.getScore())))

    def _state(self, obs: str, reward: float, done: bool, raw_reward: int = 0) -> EnvState:
        self._valid_cache = None
        ambiguous = self.in_ambiguous_state()
        if ambiguous:
            admissible = self.ambiguous_options()
            n_valid = len(admissible)
        elif self.max_admissible == 0:  # no admissible list wanted: skip the costly valid list
            admissible, n_valid = [], None
        else:
            valid = self.valid_actions()
            n_valid = len(valid)
            if self.max_admissible is None:
                admissible = sorted(valid)
            else:
                rng = random.Random(stable_seed(self.seed, self.task, self.variation, self._n_steps))
                pr = (self.admissible_priority(self.goal, f"{self._last_action} {obs}")
                      if self.admissible_priority is not None else None)
                admissible = bounded_admissible(valid, self.max_admissible, rng, strategy=self.admissible_strategy,
                                                priority=pr)
        look, inventory = self.look(), self.inventory()
        info = {
            "score": self._score, "raw_reward": raw_reward, "moves": self.moves(), "n_valid": n_valid,
            "task": self.task, "variation": self.variation, "look": look,
            "inventory": inventory, "ambiguous": ambiguous, "feedback": str(obs),
            # the world as the agent can know it, for loop breaking (`fastrank.rollout.world_key`)
            "world": f"{look}\n{inventory}" if not ambiguous else "",
            "completed": bool(self._server.getCompleted()),
            "focused": tuple(self._focused),  # objects focused on so far, as the simulator and the actions named them
        }
        if self.generate_gold_path:
            info["gold_path"] = list(self._gold)
        return EnvState(
            observation=observation_view(str(obs), look, inventory, self.observation_view), goal=self.goal,
            admissible=admissible, task_type=str(self.task),
            reward=reward, done=done, won=self._score >= 100, info=info,
        )


def _parse_task_arg(task: object) -> tuple[str, int]:
    if isinstance(task, dict):
        return canonical_task_name(str(task["task"])), int(task.get("variation", 0))
    if isinstance(task, str):
        name, _, var = task.rpartition("/")
        if not name:
            return canonical_task_name(task), 0
        return canonical_task_name(name), int(var)
    if isinstance(task, Sequence) and len(task) == 2:
        return canonical_task_name(str(task[0])), int(task[1])
    raise TypeError(f"task must be (name, variation), a dict or 'name/variation', got {task!r}")


__all__ = [
    "L2_TASKS", "TASKS", "TASK_ID", "TASK_NAMES", "Resolution", "ScienceWorldEnv", "action_verb", "bounded_admissible",
    "canonical_task_name", "dedupe", "eto_split_pairs", "normalize_action", "remove_aliases", "shared_data_dir",
    "simulator_split_variations", "stable_seed", "task_level", "task_topic",
]
