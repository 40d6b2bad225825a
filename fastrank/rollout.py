"""Episodes in lockstep: several games at once, the reranker scoring all their current states in one call.

Used by the agent evaluation (policy only) and by DAgger (a beta-mixture of the expert and the policy,
with every visited state handed to a callback for labelling). Each slot keeps its own `EpisodeMemory`,
so a history-aware checkpoint sees the episode so far; other checkpoints ignore it.

A game that fails to load is returned as an episode with ``error`` set (never dropped), so callers can
count and list it.
"""
from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from fastrank.data.history import EpisodeMemory
from fastrank.envs.base import EnvState, TextEnv


@dataclass
class Slot:
    task: object
    env: TextEnv
    state: EnvState
    memory: EpisodeMemory
    log: list[dict] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    decisions: int = 0  # steps decided by the model (not by the expert)
    tried: dict = field(default_factory=dict)  # a key of the world state (`world_key`) -> actions taken from it
    taken: Counter = field(default_factory=Counter)  # action -> times taken this episode (`repeat_penalty`)


@dataclass
class Rollout:
    episodes: list[dict]  # in task order; a game that failed to load has ``error`` set
    model_seconds: float  # time spent scoring (the ranker's share of the wall time)
    decisions: int  # states the ranker decided

    @property
    def decisions_per_s(self) -> float:
        return self.decisions / self.model_seconds if self.model_seconds else 0.0


def world_key(slot: Slot) -> tuple:
    """What `avoid_repeats` treats as "the same state": the env's full world text when it shows one
    (`info["world"]`: ScienceWorld's room + inventory, in which `activate sink` then `deactivate sink` returns to the
    same key, so the toggle loop that filled runs/agent_sw4r's episodes is broken), else the observation and the count
    of effectful actions so far (ALFWorld: "The drawer 1 is closed." before and after picking up the butterknife are
    different states; a rule keyed by the observation alone stopped the agent opening the drawer it had to put the
    knife in: it had opened that drawer while searching)."""
    world = slot.state.info.get("world")
    return ("world", world) if world else (slot.state.observation, len(slot.memory.done))


def _episode(slot: Slot) -> dict:
    s = slot.state
    acts = [t["action"] for t in slot.log]
    return {"task": str(slot.task), "goal": s.goal, "task_type": s.task_type, "won": bool(s.won),
            "score": float(s.info.get("score", float(s.won))), "steps": len(slot.log),
            "repeats": len(acts) - len(set(acts)), "seconds": round(time.perf_counter() - slot.t0, 2),
            "model_decisions": slot.decisions, "error": None, "trajectory": slot.log}


def _failed(task: object, exc: BaseException) -> dict:
    return {"task": str(task), "goal": "", "task_type": "", "won": False, "score": 0.0, "steps": 0, "repeats": 0,
            "seconds": 0.0, "model_decisions": 0, "error": f"{type(exc).__name__}: {exc}", "trajectory": []}


def run_episodes(make_env: Callable[[], TextEnv], tasks: Sequence[object], ranker, *, max_steps: int = 50,
                 batch_size: int = 8, beta: float = 0.0, expert: Callable[[EnvState], str | None] | None = None,
                 candidates: Callable[[EnvState], list[str]] | None = None,
                 on_state: Callable[[Slot], None] | None = None, avoid_repeats: bool = False,
                 repeat_penalty: float = 0.0, seed: int = 0,
                 progress=None, close_envs: bool = True, score_all: bool = False,
                 on_episode: Callable[[dict], None] | None = None) -> Rollout:
    """Play every task to the end (done or `max_steps`); episodes come back in task order.

    beta: probability that a step takes the expert's action (`expert(state)`) instead of the ranker's
    (DAgger's mixture; 0 = the policy alone; `ranker=None` needs beta=1). `candidates(state)`: the actions
    offered to the ranker (default: the admissible list). `on_state(slot)` sees every state before its
    action is chosen, as `on_state(slot, scores)` (scores: {action: score} when the ranker scored this state,
    else None; `score_all` scores the expert's steps too) -- DAgger labels it; a dict it returns is merged
    into that step's log entry. ``avoid_repeats``: take the best action not yet taken from this
    state (`world_key`; a loop breaker; off by default). ``repeat_penalty``: subtracted from an action's score once
    for each time the episode already took it, from any state (count-based exploration: an agent that has not found
    what it looks for tries a place it has not been before going back; a confident return, e.g. carrying the object
    to a receptacle passed while searching, outscores it). `on_episode(episode)` sees each episode as it ends (in
    the order they end), e.g. to log it before a long run is over.
    """
    rng = random.Random(seed)
    pending = list(enumerate(tasks))[::-1]
    free_envs: list[TextEnv] = []
    slots: dict[int, Slot] = {}
    done: dict[int, dict] = {}
    clock = {"model_s": 0.0, "decisions": 0}

    def fill() -> None:
        while pending and len(slots) < batch_size:
            i, task = pending.pop()
            env = free_envs.pop() if free_envs else make_env()
            try:
                slots[i] = Slot(task=task, env=env, state=env.reset(task), memory=EpisodeMemory())
            except Exception as exc:  # noqa: BLE001 - a broken game is counted, not fatal (GameLoadError & co)
                done[i] = _failed(task, exc)
                if on_episode is not None:
                    on_episode(done[i])
                free_envs.append(env)
                if progress is not None:
                    progress.update(1)

    fill()
    while slots:
        acting = {i: sl for i, sl in slots.items() if not sl.state.done and sl.state.admissible
                  and len(sl.log) < max_steps}
        for i in [i for i in slots if i not in acting]:  # finished episodes free their env for the next task
            sl = slots.pop(i)
            done[i] = _episode(sl)
            if on_episode is not None:
                on_episode(done[i])
            free_envs.append(sl.env)
            if progress is not None:
                progress.update(1)
        if not acting:
            fill()
            continue
        cands = {i: (candidates(sl.state) if candidates else list(sl.state.admissible)) for i, sl in acting.items()}
        use_expert = {i: expert is not None and (ranker is None or rng.random() < beta) for i in acting}
        to_score = [i for i in acting if ranker is not None and (score_all or not use_expert[i])]
        scores = {}
        if to_score:
            t = time.perf_counter()
            sets = [(acting[i].state.goal, acting[i].state.observation, cands[i], list(acting[i].memory.turns))
                    for i in to_score]
            if hasattr(ranker, "score_many"):
                out = ranker.score_many(sets)
            else:  # any object with score(goal, observation, candidates)
                out = [ranker.score(g, o, c) for g, o, c, _ in sets]
            clock["model_s"] += time.perf_counter() - t
            clock["decisions"] += sum(not use_expert[i] for i in to_score)
            scores = {i: s.tolist() for i, s in zip(to_score, out)}
        for i, sl in acting.items():
            # e.g. DAgger's expert label; it also sees the ranker's scores (hard negatives), when there are any
            extra = on_state(sl, dict(zip(cands[i], scores[i])) if i in scores else None) if on_state else None
            key = world_key(sl)  # the state this action is taken from (recorded for expert steps too)
            if use_expert[i]:
                action, score, top = expert(sl.state), None, []
                if action is None:
                    action = cands[i][0]
            else:
                s, c = scores[i], cands[i]
                order = sorted(range(len(s)), key=lambda k: -s[k])
                prefer = (sorted(range(len(s)), key=lambda k: -(s[k] - repeat_penalty * sl.taken[c[k]]))
                          if repeat_penalty else order)
                pick = prefer[0]
                if avoid_repeats:  # the same state gives the same outcome: skip what was already tried from it
                    tried = sl.tried.get(key, set())
                    pick = next((k for k in prefer if c[k] not in tried), prefer[0])
                action, score = c[pick], s[pick]
                top = [[c[k], s[k]] for k in order[:3]]
                sl.decisions += 1
            # the runners-up show how close a wrong choice was: failures can be read, not just counted
            sl.log.append({"observation": sl.state.observation, "n_candidates": len(cands[i]), "action": action,
                           "by": "expert" if use_expert[i] else "policy", "score": score, "top": top,
                           **(extra or {})})
            sl.tried.setdefault(key, set()).add(action)
            sl.taken[action] += 1
            sl.state = sl.env.step(action)
            sl.memory.add(action, sl.state.observation)
    if close_envs:
        for env in free_envs:
            env.close()
    return Rollout(episodes=[done[i] for i in range(len(tasks))], model_seconds=clock["model_s"],
                   decisions=clock["decisions"])
