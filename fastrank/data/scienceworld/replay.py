"""ScienceWorld gold paths replayed through the simulator: which (task, variation) pairs, and one episode's
decisions as Steps (canonical expert string, bounded admissible list without the expert's aliases).
The package docstring (fastrank.data.scienceworld) says what a Step holds."""
from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from typing import Iterable

from fastrank.data.record import Step
from fastrank.data.scienceworld.common import ENV, PARSER_FAILURES, episode_id, is_digit_answer
from fastrank.envs.scienceworld_actions import bounded_admissible, remove_aliases, stable_seed
from fastrank.envs.scienceworld_tasks import TASK_NAMES, canonical_task_name, eto_split_pairs, task_level, task_topic

# --------------------------------------------------------------------------------- pair selection

def select_pairs(
    split: str = "train",
    per_task: int | None = 5,
    seed: int = 0,
    tasks: Iterable[str] | None = None,
    data_dir: str | os.PathLike | None = None,
    *,
    fill_missing: bool = False,
    per_task_missing: int | None = None,
    env=None,
    exclude_overlap: bool = True,
) -> list[tuple[str, int]]:
    """Up to `per_task` (task, variation) pairs of each task from ETO's `split` indices, chosen by a
    seeded shuffle per task (independent of the other tasks), returned round-robin over the tasks
    (so a build stopped early is still stratified). per_task=None takes every pair.

    ETO's indices cover 24 of the 30 tasks. fill_missing=True takes the other six from the
    simulator's own `split` variations (starts a JVM unless `env` is given), `per_task_missing`
    of each (default: per_task); without it those tasks get no pairs.

    ETO's train and dev indices share 54 pairs (find-* tasks); exclude_overlap=True (default)
    drops pairs of `split` that also appear in another ETO split, so that no episode is in two."""
    others: set[tuple[str, int]] = set()
    if exclude_overlap:
        for other in {"train", "dev", "test"} - {split}:
            others.update(eto_split_pairs(other, data_dir))
    by_task: dict[str, list[int]] = defaultdict(list)
    for task, var in eto_split_pairs(split, data_dir):
        if var not in by_task[task] and (task, var) not in others:
            by_task[task].append(var)
    wanted = [canonical_task_name(t) for t in tasks] if tasks is not None else list(TASK_NAMES)
    missing = [t for t in wanted if t not in by_task]
    if fill_missing and missing:
        from fastrank.envs.scienceworld import simulator_split_variations

        by_task.update(simulator_split_variations(missing, split, env=env))
    chosen: dict[str, list[int]] = {}
    for task in wanted:
        variations = sorted(by_task.get(task, []))
        random.Random(stable_seed("select_pairs", split, seed, task)).shuffle(variations)
        k = per_task_missing if (task in missing and per_task_missing is not None) else per_task
        chosen[task] = variations if k is None else variations[:k]
    out = []
    for i in range(max((len(v) for v in chosen.values()), default=0)):
        out.extend((task, vs[i]) for task, vs in chosen.items() if i < len(vs))
    return out


# ------------------------------------------------------------------------------ simulator episodes

class EpisodeFailure(RuntimeError):
    pass


def gold_episode(
    task: str,
    variation: int,
    with_valid: bool = True,
    *,
    n_sample: int = 50,
    seed: int = 0,
    split: str | None = None,
    env=None,
    step_limit: int = 1000,
    strategy: str = "stratified",
) -> list[Step]:
    """Replay the simulator's gold path for (task, variation) and return one Step per decision
    (see the module doc). `env`: a `ScienceWorldEnv(generate_gold_path=True)` to reuse (one JVM);
    else one is started and closed. with_valid=False skips the valid lists (admissible=None,
    expert = the gold string, no alias resolution) and is several times faster.
    Raises EpisodeFailure when the gold path does not reach score 100."""
    from fastrank.envs.scienceworld import ScienceWorldEnv

    own = env is None
    if own:
        env = ScienceWorldEnv(step_limit=step_limit, max_admissible=None, generate_gold_path=True)
    elif not env.generate_gold_path:
        raise ValueError("env must be built with generate_gold_path=True")
    saved = env.step_limit, env.max_admissible
    try:
        return _replay(env, canonical_task_name(task), int(variation), with_valid, n_sample, seed, split, strategy)
    finally:
        env.step_limit, env.max_admissible = saved
        if own:
            env.close()


def _replay(env, task, variation, with_valid, n_sample, seed, split, strategy) -> list[Step]:
    env.step_limit = max(env.step_limit, 10_000)  # the gold path decides when to stop, not a limit
    env.max_admissible = 0  # EnvState.admissible is not used: no sampling, and no valid list unless asked
    state = env.reset((task, variation))
    gold = env.gold_actions
    if not gold or gold[0].startswith("ERROR"):
        raise EpisodeFailure(f"no gold path: {gold[:1]}")
    goal = state.goal
    eid = episode_id(task, variation)
    base_meta = {"split": split, "variation": variation, "topic": task_topic(task), "level": task_level(task)}
    steps: list[Step] = []
    # The Step of the last action waits for the next gold action: a digit answering its ambiguity
    # prompt decides which option (and so which canonical string) was executed.
    pending: tuple[dict, dict | None, list] | None = None  # (Step kwargs, valid-list args, resolutions)
    observation = state.observation
    counts = Counter()

    def _emit(choice: int) -> None:
        kwargs, args, resolutions = pending
        if args is not None:
            _finish_step(kwargs, resolutions, choice if choice < len(resolutions) else 0, **args)
        steps.append(Step(**kwargs))

    for gi, action in enumerate(gold):
        if env.in_ambiguous_state():
            if pending is None:
                raise EpisodeFailure(f"gold step {gi}: ambiguity prompt with no action to attach it to")
            if is_digit_answer(action):
                _emit(int(action))
                pending = None
                state = env.step(action)
                observation = state.observation  # the result of the disambiguated action
                continue
            # The gold generator did not expect this prompt (its referent strings are drawn at
            # random and do not always parse the same on replay): answer 0 as it intended.
            _emit(0)
            pending = None
            state = env.step("0")
            observation = state.observation
            counts["auto_answered"] += 1
        if pending is not None:
            _emit(0)
            pending = None
        if is_digit_answer(action):  # a stray answer with no prompt: replay it, emit nothing
            state = env.step(action)  # its "No known action ..." is not shown as the next observation
            counts["stray_digits"] += 1
            continue
        meta = dict(base_meta, gold_index=gi, gold_action=action, score=env.score,
                    look=state.info["look"], inventory=state.info["inventory"])
        kwargs = dict(env=ENV, episode_id=eid, step=len(steps), task_type=task, goal=goal,
                      observation=observation, expert_action=action, admissible=None, meta=meta)
        args, resolutions = None, []
        if with_valid:  # this state's valid list and aliases, before stepping
            args = dict(valid=env.valid_actions(), n_sample=n_sample, strategy=strategy,
                        rng=random.Random(stable_seed(seed, eid, gi)))
            resolutions = _resolve_all_choices(env, action)
        state = env.step(action)
        if state.observation.startswith(PARSER_FAILURES):
            counts["unparsed"] += 1  # the simulator rejected it: nothing happened, not a decision
            continue
        pending = (kwargs, args, resolutions)
        observation = state.observation
    if pending is not None:
        _emit(0)
    final = env.score
    if final < 100:
        raise EpisodeFailure(f"gold path ended with score {final} after {len(gold)} actions")
    for s in steps:
        s.meta["episode_score"] = final
        s.meta["n_gold_actions"] = len(gold)
        s.meta["replay"] = {k: counts[k] for k in ("stray_digits", "auto_answered", "unparsed")}
        s.validate()
    return steps


def _resolve_all_choices(env, action: str) -> list:
    """Resolutions of `action` for every option of its ambiguity prompt (one when unambiguous)."""
    first = env.resolve_action(action, 0)
    out = [first]
    for choice in range(1, first.n_matches if first.ambiguous else 1):
        out.append(env.resolve_action(action, choice))
    return out


def _finish_step(kwargs: dict, resolutions: list, choice: int, valid: list[str], n_sample: int, strategy: str,
                 rng) -> None:
    """Set the canonical expert and the alias-free bounded admissible list of a pending Step.
    `resolutions[choice]` is what was executed. For an ambiguous gold string the valid strings of
    *all* its matches are kept out of the distractors: the expert did not distinguish them (e.g.
    identical apple seeds), so they are not wrong answers."""
    res = resolutions[choice]
    gold = kwargs["expert_action"]
    expert = res.canonical or " ".join(gold.split())
    aliases = {gold, expert}
    for r in resolutions:
        aliases.update(r.aliases)
    others = remove_aliases(valid, expert, aliases)
    kwargs["expert_action"] = expert
    kwargs["admissible"] = bounded_admissible(others, n_sample, rng, must_include=[expert], strategy=strategy)
    valid_set = set(valid)
    kwargs["meta"].update(
        n_valid=len(valid),
        gold_in_valid=" ".join(gold.split()) in valid_set,
        expert_in_valid=expert in valid_set,
        canonical_method=res.method if res.canonical else "none",
        ambiguous=res.ambiguous,
        n_matches=res.n_matches,
        n_alias_removed=len(valid) - len(others) - (1 if expert in valid_set else 0),
    )


__all__ = ["EpisodeFailure", "gold_episode", "select_pairs"]
