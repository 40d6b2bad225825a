"""`build_steps`: many ScienceWorld gold episodes in spawned worker processes (one JVM each), with an
append-only per-episode cache so an interrupted build resumes, and a pool that survives dying workers."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from fastrank.data.record import Step
from fastrank.data.scienceworld.replay import EpisodeFailure, gold_episode
from fastrank.envs.scienceworld_tasks import canonical_task_name

# ----------------------------------------------------------------------------- parallel building

@dataclass
class BuildResult:
    steps: list[Step] = field(default_factory=list)
    episodes: int = 0  # episodes that produced steps
    failures: list[dict] = field(default_factory=list)  # {"task", "variation", "error"}
    from_cache: int = 0  # episodes (ok or failed) taken from the cache instead of the simulator
    stale_cache: int = 0  # cached episodes ignored: built with other (with_valid, n_sample, seed, split)
    wall_s: float = 0.0

    def __str__(self) -> str:
        s = (f"{self.episodes} episodes, {len(self.steps)} steps, {len(self.failures)} failures "
             f"({self.from_cache} from cache, {self.stale_cache} stale cache entries), {self.wall_s:.0f} s")
        for f in self.failures[:10]:
            s += f"\n  FAILED {f['task']}/{f['variation']}: {f['error'].splitlines()[-1][:200]}"
        return s


_WORKER_ENV = None


def _worker_episode(job: tuple) -> dict:
    """Run one episode in this process's own simulator (restarted after a crash)."""
    global _WORKER_ENV
    task, variation, kw = job
    t0 = time.time()
    try:
        if _WORKER_ENV is None:
            from fastrank.envs.scienceworld import ScienceWorldEnv

            _WORKER_ENV = ScienceWorldEnv(max_admissible=None, generate_gold_path=True)
        steps = gold_episode(task, variation, env=_WORKER_ENV, **kw)
        return {"task": task, "variation": variation, "ok": True, "wall_s": round(time.time() - t0, 2),
                "steps": [dataclasses.asdict(s) for s in steps]}
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, never dropped
        if not isinstance(exc, EpisodeFailure) and _WORKER_ENV is not None:
            _WORKER_ENV.close()  # the JVM may be in a bad state: start a fresh one next time
            _WORKER_ENV = None
        err = f"{type(exc).__name__}: {exc}" if isinstance(exc, EpisodeFailure) else traceback.format_exc(limit=3)
        return {"task": task, "variation": variation, "ok": False, "wall_s": round(time.time() - t0, 2),
                "error": err}


def _close_worker_env() -> None:
    global _WORKER_ENV
    if _WORKER_ENV is not None:
        _WORKER_ENV.close()
        _WORKER_ENV = None


def read_cache(path: str | os.PathLike) -> dict[tuple[str, int], dict]:
    """Completed episodes of an append-only cache; a torn last line (killed build) is ignored."""
    out: dict[tuple[str, int], dict] = {}
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                break
            raise ValueError(f"{path}:{i}: corrupt cache line") from None
        out[(rec["task"], int(rec["variation"]))] = rec
    return out


def build_steps(
    pairs: Sequence[tuple[str, int]],
    workers: int = 2,
    cache_path: str | os.PathLike | None = None,
    progress: bool = True,
    seed: int = 0,
    *,
    split: str | None = None,
    with_valid: bool = True,
    n_sample: int = 50,
    retry_failed: bool = False,
    max_episodes: int | None = None,
    time_budget_s: float | None = None,
) -> BuildResult:
    """Gold episodes for `pairs` in `workers` processes (each with its own JVM), with a tqdm bar.

    Resumable: each finished episode (its Steps, or its error, with the build parameters) is
    appended to `cache_path` (JSONL) as soon as it arrives; a rerun takes cached episodes built
    with the same (with_valid, n_sample, seed, split) from there (failed ones are retried only with
    retry_failed=True); entries built with other parameters are recomputed (`stale_cache`). `time_budget_s`: stop submitting new episodes after this long (those
    in flight finish); what is left can be picked up by a rerun. Failures are returned and printed.
    """
    t0 = time.time()
    pairs = [(canonical_task_name(t), int(v)) for t, v in pairs]
    pairs = list(dict.fromkeys(pairs))
    if max_episodes is not None:
        pairs = pairs[:max_episodes]
    kw = dict(with_valid=with_valid, n_sample=n_sample, seed=seed, split=split)
    cache = read_cache(cache_path) if cache_path else {}
    result = BuildResult()
    results: dict[tuple[str, int], dict] = {}
    todo = []
    for p in pairs:
        rec = cache.get(p)
        if rec is not None and rec.get("params") != kw:
            result.stale_cache += 1  # built with other settings: recompute, never mix
            rec = None
        if rec is not None and (rec["ok"] or not retry_failed):
            results[p] = rec
            result.from_cache += 1
        else:
            todo.append(p)
    jobs = [(t, v, kw) for t, v in todo]
    cache_f = None
    if cache_path:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        cache_f = open(cache_path, "a", encoding="utf-8")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), initial=result.from_cache, desc="scienceworld gold", unit="ep",
                   file=sys.stderr)
    n_ok_steps = sum(len(r.get("steps", [])) for r in results.values())

    def _take(rec: dict) -> None:
        nonlocal n_ok_steps
        rec["params"] = kw
        results[(rec["task"], rec["variation"])] = rec
        if cache_f is not None:
            cache_f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            cache_f.flush()
        n_ok_steps += len(rec.get("steps", []))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(steps=n_ok_steps, failed=sum(not r["ok"] for r in results.values()))
        if not rec["ok"] and progress:
            print(f"FAILED {rec['task']}/{rec['variation']}: {rec['error'].strip().splitlines()[-1][:200]}",
                  file=sys.stderr)

    def _within_budget() -> bool:
        return time_budget_s is None or time.time() - t0 < time_budget_s

    try:
        if workers <= 1:
            try:
                for job in jobs:
                    if not _within_budget():
                        break
                    _take(_worker_episode(job))
            finally:
                _close_worker_env()
        else:
            _run_pool(jobs, workers, _take, _within_budget)
    finally:
        if bar is not None:
            bar.close()
        if cache_f is not None:
            cache_f.close()

    for p in pairs:  # input order, deterministic output regardless of completion order
        rec = results.get(p)
        if rec is None:
            continue
        if rec["ok"]:
            result.steps.extend(Step(**s) for s in rec["steps"])
            result.episodes += 1
        else:
            result.failures.append({"task": p[0], "variation": p[1], "error": rec["error"]})
    result.wall_s = time.time() - t0
    return result


def _run_pool(jobs: list, workers: int, take, within_budget, max_breaks: int = 3) -> None:
    """Run jobs in `workers` spawned processes, at most `workers` in flight (so that the time
    budget can stop the queue). A worker that dies (killed, out of memory, a script without an
    `if __name__ == "__main__":` guard) breaks the pool: its in-flight episodes are recorded as
    failures and a fresh pool takes over; after `max_breaks` breaks without progress we give up."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    queue = list(jobs)
    breaks = 0
    while queue and within_budget():
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            in_flight = {}
            try:
                while (queue and within_budget()) or in_flight:
                    while queue and len(in_flight) < workers and within_budget():
                        job = queue.pop(0)
                        in_flight[pool.submit(_worker_episode, job)] = job
                    done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                    for fut in done:
                        job = in_flight.pop(fut)
                        take(fut.result())  # raises BrokenProcessPool if the worker died
                        breaks = 0
            except BrokenProcessPool as exc:
                breaks += 1
                for fut, (task, variation, _) in in_flight.items():
                    if fut.done() and fut.exception() is None:
                        take(fut.result())
                    else:
                        take({"task": task, "variation": variation, "ok": False, "wall_s": 0.0,
                              "error": f"worker process died: {exc}"})
                if breaks >= max_breaks:
                    raise RuntimeError(f"the worker pool broke {breaks} times in a row: {exc}") from exc


__all__ = ["BuildResult", "build_steps", "read_cache"]
