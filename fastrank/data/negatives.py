"""Turn expert Steps into CandidateSets: the expert action among sampled distractors.

Two modes:
- "sampled" (the paper, §4.1): distractors are other states' expert actions, stratified over the same
  task type (other episodes), other task types, and the environment's global pool. Set sizes vary
  2..20 with mean ≈ 8.8: K = 2 + Binomial(18, 0.3794).
- "hard" (not in the paper): distractors come from the state's own admissible/valid actions — what
  an agent really chooses among. A state whose admissible list is missing or too short is topped up
  from the sampled strata; every candidate records its source, so this is visible, not hidden.

Sampling is seeded per state (seed, episode, step), so a set does not change when other states are
added or the order of the input changes.
"""
from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from fastrank.data.record import MAX_CANDIDATES, CandidateSet, Step

MODES = ("sampled", "hard")
MIN_SIZE, MAX_SIZE = 2, MAX_CANDIDATES
# Binomial(18, p) + 2 has mean 2 + 18p; p chosen for the paper's mean of 8.83 candidates per set.
SIZE_P = (8.83 - MIN_SIZE) / (MAX_SIZE - MIN_SIZE)
STRATA = (("same_task", 0.5), ("other_task", 0.25), ("global", 0.25))


def state_rng(seed: int, *key: object) -> random.Random:
    digest = hashlib.sha256(repr((seed,) + key).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def sample_set_size(rng: random.Random) -> int:
    return MIN_SIZE + sum(rng.random() < SIZE_P for _ in range(MAX_SIZE - MIN_SIZE))


def normalize_action(action: str) -> str:
    """Key under which two action strings count as the same action (case and spacing)."""
    return " ".join(action.lower().split())


@dataclass
class ActionPool:
    """Expert actions of one split, indexed for stratified sampling (per environment)."""

    by_task: dict[tuple[str, str], list[tuple[str, str]]] = field(default_factory=dict)  # (env, task) -> [(episode, action)]
    by_env: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    task_types: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_steps(cls, steps: Iterable[Step]) -> "ActionPool":
        by_task: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
        by_env: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for s in steps:
            by_task[(s.env, s.task_type)].append((s.episode_id, s.expert_action))
            by_env[s.env].append((s.episode_id, s.expert_action))
        # Sorted so that sampling does not depend on the order the steps came in.
        by_task = {k: sorted(v) for k, v in by_task.items()}
        by_env = {k: sorted(v) for k, v in by_env.items()}
        task_types: dict[str, list[str]] = defaultdict(list)
        for env, task in sorted(by_task):
            task_types[env].append(task)
        return cls(by_task, by_env, dict(task_types))

    def draw(self, stratum: str, step: Step, rng: random.Random) -> str | None:
        if stratum == "same_task":
            # Other episodes only: another step of the same episode is often also a sensible action.
            pool = self.by_task.get((step.env, step.task_type), ())
            for _ in range(8):  # rejection sampling: O(1) per draw instead of filtering the pool
                if not pool:
                    return None
                episode, action = rng.choice(pool)
                if episode != step.episode_id:
                    return action
            return None
        if stratum == "other_task":
            others = [t for t in self.task_types.get(step.env, ()) if t != step.task_type]
            if not others:
                return None
            return rng.choice(self.by_task[(step.env, rng.choice(others))])[1]
        pool = self.by_env.get(step.env, ())
        return rng.choice(pool)[1] if pool else None


def fill_sampled(step: Step, pool: ActionPool, rng: random.Random, want: int,
                  chosen: list[str], sources: list[str], seen: set[str]) -> None:
    names, weights = zip(*STRATA)
    # Bounded retries: tiny pools (a unit test, a one-task environment) may not have `want` distinct actions.
    for _ in range(want * 20):
        if len(chosen) >= want:
            return
        stratum = rng.choices(names, weights)[0]
        action = pool.draw(stratum, step, rng)
        if action is None or normalize_action(action) in seen:
            continue
        seen.add(normalize_action(action))
        chosen.append(action)
        sources.append(stratum)


def make_candidate_set(step: Step, pool: ActionPool, *, mode: str = "sampled", seed: int = 0,
                       size: int | None = None) -> CandidateSet:
    if mode not in MODES:
        raise ValueError(f"unknown negative mode {mode!r}; expected one of {MODES}")
    rng = state_rng(seed, step.env, step.episode_id, step.step, mode)
    k = size if size is not None else sample_set_size(rng)
    seen = {normalize_action(step.expert_action)}
    chosen, sources = [], []
    if mode == "hard" and step.admissible:
        others = [a for a in dict.fromkeys(step.admissible) if normalize_action(a) not in seen]
        for a in rng.sample(others, min(k - 1, len(others))):
            seen.add(normalize_action(a))
            chosen.append(a)
            sources.append("admissible")
    fill_sampled(step, pool, rng, k - 1, chosen, sources, seen)
    candidates = [step.expert_action] + chosen
    all_sources = ["expert"] + sources
    order = list(range(len(candidates)))
    rng.shuffle(order)  # the stored order is the "original ordering" of the net-gain metric
    return CandidateSet(
        env=step.env, episode_id=step.episode_id, step=step.step, task_type=step.task_type,
        goal=step.goal, observation=step.observation,
        candidates=[candidates[i] for i in order], expert_index=order.index(0),
        sources=[all_sources[i] for i in order],
    )


def make_candidate_sets(steps: Sequence[Step], *, mode: str = "sampled", seed: int = 0,
                        pool: ActionPool | None = None) -> tuple[list[CandidateSet], dict]:
    """CandidateSets for `steps` (distractors from `pool`, default: the steps themselves) and a report."""
    pool = pool if pool is not None else ActionPool.from_steps(steps)
    sets = [make_candidate_set(s, pool, mode=mode, seed=seed) for s in steps]
    src = defaultdict(int)
    for cs in sets:
        for s in cs.sources:
            src[s] += 1
    too_small = sum(len(cs.candidates) < MIN_SIZE for cs in sets)
    report = {"mode": mode, "sets": len(sets), "candidates": sum(len(c.candidates) for c in sets),
              "sources": dict(src), "sets_below_min_size": too_small}
    return sets, report


def upsample(sets: Sequence[CandidateSet], factors: dict[str, int], seed: int = 0) -> list[CandidateSet]:
    """Repeat each set `factors[env]` times (default 1). Copies keep their base episode_id, so they stay
    in the base episode's split; each copy gets its own candidate order."""
    out: list[CandidateSet] = []
    for cs in sets:
        out.append(cs)
        for c in range(1, int(factors.get(cs.env, 1))):
            rng = state_rng(seed, cs.env, cs.episode_id, cs.step, "copy", c)
            order = list(range(len(cs.candidates)))
            rng.shuffle(order)
            out.append(CandidateSet(
                env=cs.env, episode_id=cs.episode_id, step=cs.step, task_type=cs.task_type,
                goal=cs.goal, observation=cs.observation,
                candidates=[cs.candidates[i] for i in order], expert_index=order.index(cs.expert_index),
                sources=[cs.sources[i] for i in order], copy=c,
            ))
    return out
