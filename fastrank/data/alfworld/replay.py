"""ALFWorld source 1: the handcoded expert (alfworld 0.3.5) replayed through `AlfworldEnv`.

Parallel (worker processes, retired and retried when one dies), resumable (per-episode JSONL cache),
deterministic (seeded, task-type-stratified game selection and a per-episode expert seed).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from fastrank.data.alfworld.common import ENV, game_rel
from fastrank.data.record import Step
from fastrank.envs.alfworld import (
    TASK_TYPES,
    AlfworldEnv,
    GameInfo,
    GameLoadError,
    ensure_games,
    episode_id_for,
    list_games,
    task_type_of,
)

DEFAULT_MAX_STEPS = 50


@dataclass
class BuildReport:
    split: str
    selected: int = 0
    from_cache: int = 0
    replayed: int = 0
    status: Counter = field(default_factory=Counter)  # won / lost / system_exit / error / crashed
    steps_kept: int = 0
    steps_all: int = 0  # including the episodes that were not won
    expert_source: Counter = field(default_factory=Counter)
    expert_in_admissible: int = 0
    admissible_sizes: list[int] = field(default_factory=list)
    per_task_type: dict = field(default_factory=dict)  # task type -> {"episodes", "won", "steps"}
    failures: list[str] = field(default_factory=list)  # "episode_id: status: message"
    wall_s: float = 0.0

    def summary(self) -> dict:
        sizes = self.admissible_sizes
        won = self.status.get("won", 0)
        return {
            "split": self.split, "selected": self.selected, "from_cache": self.from_cache,
            "replayed": self.replayed, "status": dict(self.status), "steps_kept": self.steps_kept,
            "steps_all": self.steps_all, "mean_steps_per_won_episode": round(self.steps_kept / won, 2) if won else None,
            "expert_source": dict(self.expert_source),
            "expert_in_admissible": f"{self.expert_in_admissible}/{self.steps_kept}",
            "admissible_size": ({"min": min(sizes), "median": statistics.median(sizes),
                                 "mean": round(statistics.fmean(sizes), 2), "max": max(sizes)} if sizes else None),
            "per_task_type": self.per_task_type, "failures": self.failures, "wall_s": round(self.wall_s, 1),
        }

    def __str__(self) -> str:
        return json.dumps(self.summary(), indent=1)


@dataclass
class BuildResult:
    steps: list[Step]
    report: BuildReport

    def __iter__(self):
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)



def episode_seed(episode_id: str, seed: int) -> int:
    """The expert's RNG seed for one episode: stable across runs, workers and Python versions."""
    return zlib.crc32(f"{seed}:{episode_id}".encode())


def replay_episode(game_file: str | os.PathLike, *, max_steps: int = DEFAULT_MAX_STEPS, seed: int = 0) -> dict:
    """Replay the handcoded expert on one game; never raises for a bad game.

    Returns an episode record (JSON-able): episode_id, game, split, task_type, status ("won", "lost",
    "system_exit", "error"), won, n_steps, seconds, error, and steps (Step dicts, also for lost games).
    """
    t0 = time.perf_counter()
    game_file = str(game_file)
    episode_id = episode_id_for(game_file)
    split = episode_id.split("/")[1]
    rec = {"episode_id": episode_id, "game": game_rel(game_file), "split": split, "task_type": None,
           "status": "error", "won": False, "n_steps": 0, "max_steps": max_steps, "seed": seed,
           "seconds": 0.0, "error": None, "steps": []}
    env = AlfworldEnv(game_file, expert_seed=episode_seed(episode_id, seed))
    try:
        rec["task_type"] = task_type_of(game_file)
        s = env.reset()
        steps: list[Step] = []
        prev_action = None
        while not s.done and len(steps) < max_steps:
            action = s.info["expert_plan"]
            if not action:
                raise RuntimeError("the expert gave no action")
            meta = {"source": "replay", "split": split, "game": rec["game"], "prev_action": prev_action,
                    "expert_source": s.info.get("expert_source")}
            if s.info.get("expert_suggested") and s.info["expert_suggested"] != action:
                meta["expert_suggested"] = s.info["expert_suggested"]
            steps.append(Step(env=ENV, episode_id=episode_id, step=len(steps), task_type=s.task_type, goal=s.goal,
                              observation=s.observation, expert_action=action, admissible=list(s.admissible),
                              meta=meta))
            s = env.step(action)
            prev_action = action
        won = bool(s.won)
        for st in steps:
            st.meta["won"] = won
        rec.update(status="won" if won else "lost", won=won, n_steps=len(steps),
                   steps=[asdict(st) for st in steps])
    except GameLoadError as exc:
        rec.update(status="system_exit", error=str(exc))
    except SystemExit as exc:  # belt and braces: sys.exit from anywhere inside the game engine
        rec.update(status="system_exit", error=f"sys.exit({exc.code!r})")
    except Exception as exc:  # noqa: BLE001 - one broken game must not end a 3000-game build
        rec.update(status="error", error=f"{type(exc).__name__}: {exc}")
    finally:
        try:
            env.close()
        except Exception:  # noqa: BLE001
            pass
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def replay_expert(game_file: str | os.PathLike, max_steps: int = DEFAULT_MAX_STEPS,
                  seed: int = 0) -> tuple[list[Step], bool]:
    """(steps, won) of the handcoded expert on one game. Raises GameLoadError for a game whose loader
    calls sys.exit, RuntimeError for any other failure."""
    rec = replay_episode(game_file, max_steps=max_steps, seed=seed)
    if rec["status"] == "system_exit":
        raise GameLoadError(rec["error"])
    if rec["status"] == "error":
        raise RuntimeError(f"{game_file}: {rec['error']}")
    return [Step(**d) for d in rec["steps"]], rec["won"]


def select_games(games: Sequence[GameInfo], max_episodes: int | None, seed: int = 0,
                 stratify: bool = True) -> list[GameInfo]:
    """A deterministic choice of `max_episodes` games (all when None), sorted by episode id.

    Stratified: the games of each task type are shuffled with `seed`, then taken round-robin over the
    task types, so the types are as balanced as their counts allow, and the choice for n games is
    contained in the choice for n + 1 (growing a build reuses its cache).
    """
    games = sorted(games, key=lambda g: g.episode_id)
    if max_episodes is None or max_episodes >= len(games):
        return games
    rng = random.Random(seed)
    if not stratify:
        picked = list(games)
        rng.shuffle(picked)
        return sorted(picked[:max_episodes], key=lambda g: g.episode_id)
    by_type: dict[str, list[GameInfo]] = defaultdict(list)
    for g in games:
        by_type[g.task_type].append(g)
    order = [t for t in TASK_TYPES if t in by_type] + sorted(t for t in by_type if t not in TASK_TYPES)
    for t in order:
        rng.shuffle(by_type[t])
    picked, i = [], 0
    while len(picked) < max_episodes:
        took = False
        for t in order:
            if i < len(by_type[t]) and len(picked) < max_episodes:
                picked.append(by_type[t][i])
                took = True
        if not took:
            break
        i += 1
    return sorted(picked, key=lambda g: g.episode_id)


def _read_cache(path: Path) -> dict[str, dict]:
    """Episode records already in the cache; a torn last line (killed mid-write) is cut off."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    good_end = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
                done[rec["episode_id"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # everything from here on is the torn tail
            good_end += len(line)
    if good_end != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_end)
        print(f"[alfworld] {path}: cut a torn tail after {len(done)} episodes", file=sys.stderr)
    return done


def _worker_init() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _worker(args: tuple[str, int, int]) -> dict:
    game_file, max_steps, seed = args
    return replay_episode(game_file, max_steps=max_steps, seed=seed)


def _crashed_record(game_file: str, max_steps: int, seed: int, why: str) -> dict:
    episode_id = episode_id_for(game_file)
    return {"episode_id": episode_id, "game": game_rel(game_file), "split": episode_id.split("/")[1],
            "task_type": task_type_of(game_file), "status": "crashed", "won": False, "n_steps": 0,
            "max_steps": max_steps, "seed": seed, "seconds": 0.0, "error": why, "steps": []}


def _run_pool(jobs: list[tuple[str, int, int]], workers: int, mp_start: str, record, *, fn=None,
              tasks_per_worker: int = 40) -> None:
    """Run `fn(job)` (default: replay one episode) for every job in process pools of `workers`.

    A worker grows by a few MB per game (TextWorld caches), so a pool is retired after about
    `tasks_per_worker` games per worker and a fresh one takes the next batch (Python 3.11's own
    `max_tasks_per_child` can hang the executor). A worker that dies (segfault, OOM kill) breaks its
    pool and fails every job then in flight: those are retried at the end, each alone in a fresh
    one-worker pool, and the one that breaks that pool too is recorded as "crashed".
    """
    fn = fn or _worker
    ctx = mp.get_context(mp_start)

    def run(batch: list, n: int) -> list:
        unfinished = []
        with ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init) as pool:
            futures = {pool.submit(fn, job): job for job in batch}
            for fut in as_completed(futures):
                try:
                    rec = fut.result()
                except BrokenProcessPool:
                    unfinished.append(futures[fut])
                    continue
                record(rec)
        return unfinished

    suspects = []
    size = max(1, workers * tasks_per_worker)
    for i in range(0, len(jobs), size):
        batch = jobs[i:i + size]
        broken = run(batch, min(workers, len(batch)))
        if broken:
            print(f"[alfworld] a worker died; {len(broken)} episodes will be retried one by one", file=sys.stderr)
        suspects += broken
    for job in suspects:
        if run([job], 1):
            record(_crashed_record(*job, why="the worker process died on this game twice"))


def build_steps(games: str | os.PathLike, split: str = "train", max_episodes: int | None = None, workers: int = 2,
                seed: int = 0, cache_path: str | os.PathLike | None = None, progress: bool = True, *,
                max_steps: int = DEFAULT_MAX_STEPS, stratify: bool = True, only_won: bool = True,
                cache_dir: str | os.PathLike | None = None, mp_start: str = "spawn") -> BuildResult:
    """Replay the handcoded expert on (a seeded selection of) the games of `split`.

    `games`: the release tarball or an unpacked release (see `ensure_games`; `cache_dir` is where the
    tarball is unpacked). `workers` <= 1 runs in this process; more uses a `mp_start` process pool
    (spawn by default: TextWorld and torch are not fork-safe in general). `cache_path` (plain .jsonl):
    every finished episode (won or not) is appended as one line and skipped on a restart, so an
    interrupted build resumes; the cached episode is used as-is whatever `seed`/`max_steps` it was made
    with (its line records both). Steps come back sorted by (episode_id, step); with `only_won` the
    steps of episodes the expert did not win are left out of `steps` but counted in the report.
    """
    t0 = time.perf_counter()
    root = ensure_games(games, cache_dir)
    chosen = select_games(list_games(root, split), max_episodes, seed=seed, stratify=stratify)
    report = BuildReport(split=split, selected=len(chosen))

    cache = None
    done: dict[str, dict] = {}
    if cache_path is not None:
        cache = Path(cache_path)
        if cache.name.endswith(".gz"):
            raise ValueError(f"{cache}: the episode cache must be plain JSONL (it is appended to)")
        cache.parent.mkdir(parents=True, exist_ok=True)
        done = _read_cache(cache)
    results: dict[str, dict] = {g.episode_id: done[g.episode_id] for g in chosen if g.episode_id in done}
    report.from_cache = len(results)
    todo = [g for g in chosen if g.episode_id not in results]

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(chosen), initial=len(results), desc=f"alfworld {split}", unit="ep", dynamic_ncols=True)
    status = Counter(r["status"] for r in results.values())

    def record(rec: dict) -> None:
        results[rec["episode_id"]] = rec
        status[rec["status"]] += 1
        if cache is not None and rec["status"] != "crashed":  # a crash may be the machine's fault: retry on restart
            with open(cache, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if bar is not None:
            bar.set_postfix({k: status[k] for k in ("won", "lost", "system_exit", "error", "crashed") if status[k]})
            bar.update(1)

    jobs = [(g.game_file, max_steps, seed) for g in todo]
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                record(_worker(job))
        else:
            _run_pool(jobs, workers, mp_start, record)
    finally:
        if bar is not None:
            bar.close()
    report.replayed = len(todo)

    steps: list[Step] = []
    per_type: dict[str, Counter] = defaultdict(Counter)
    for ep in sorted(results):
        rec = results[ep]
        report.status[rec["status"]] += 1
        tt = rec.get("task_type") or "unknown"
        per_type[tt]["episodes"] += 1
        per_type[tt][rec["status"]] += 1
        report.steps_all += len(rec["steps"])
        if rec["status"] != "won":
            why = rec.get("error") or f"not won in {rec['n_steps']} steps"
            report.failures.append(f"{ep}: {rec['status']}: {why}")
            if only_won:
                continue
        for d in rec["steps"]:
            st = Step(**d)
            st.validate()
            steps.append(st)
            per_type[tt]["steps"] += 1
            report.expert_source[st.meta.get("expert_source")] += 1
            report.expert_in_admissible += st.expert_action in (st.admissible or ())
            report.admissible_sizes.append(len(st.admissible or ()))
    report.steps_kept = len(steps)
    report.per_task_type = {t: dict(c) for t, c in sorted(per_type.items())}
    report.wall_s = time.perf_counter() - t0
    return BuildResult(steps, report)



__all__ = [
    "DEFAULT_MAX_STEPS", "BuildReport", "BuildResult", "build_steps", "episode_seed", "replay_episode",
    "replay_expert", "select_games",
]
