"""ScienceWorld training sets for the history-aware agent: gold-path states with the episode so far.

    pairs = train_pairs(per_task=3)                                   # ETO *train* (task, variation)s only
    steps = replay_steps(pairs, cache_path="runs/sw_agent_data/replay.cache.jsonl")   # simulator, full valid lists
    steps += gold_file_steps()                                        # the shared 30-episode valid-sample file
    sets, stats = agent_sets(steps, max_negatives=11)

One `CandidateSet(env="scienceworld")` per decision of a gold path:
- observation: what `ScienceWorldEnv` returns at evaluation time, i.e. the simulator's feedback to the
  previous action (the first state: the initial `look around`). Both sources already hold exactly that
  (`fastrank.data.scienceworld`: each Step's observation is the feedback of the last effective action), so
  train and eval states agree; the free `look` / `inventory` texts are *not* added (the agent never sees
  them either) unless `view="room"` composes them in, as `ScienceWorldEnv(observation_view="room")` does at evaluation.
- history: the previous (action, observation) pairs of the episode in order, the action being the
  canonical valid-list string the agent would have typed and the observation its feedback (= the next
  Step's observation). `rollout.run_episodes` keeps the same pairs in the agent's `EpisodeMemory`.
- candidates: the gold action (label) and up to `max_negatives` other valid actions of that state:
  first up to `max_wrong_focus` **wrong `focus on` actions** (focus on anything the gold path never
  focuses on -- a wrong focus ends a real episode at score -100), those the goal names first (they pass
  the focus guard's name rule, `scienceworld_focus.named_by_goal`, so the model must reject them), then a
  verb-stratified sample of the other (non-focus) actions (`bounded_admissible`, the policy the evaluation env uses to bound
  its list).
  The gold path's own focus targets are never negatives: they are right, only at another time.
- States whose gold action is not a valid-list string (the simulator accepts a few unlisted aliases, e.g.
  `open door to hallway` on an open door; or the shared file's string-only alias folding found no valid
  spelling) are not labels -- the agent can never be offered that string -- but stay in the history.

Only ETO train variations are used (`assert_train_only`): the agent is evaluated on ETO test variations.
Sources: `replay_steps` (simulator, `fastrank.data.scienceworld.build_steps`, valid lists kept whole up
to `n_sample` per state, ~0.1-0.5 s a step) and `gold_file_steps` (no simulator: 30 episodes, 40 sampled
valid actions per step, sampled uniformly, so few `focus on` among them). An episode present in both is
taken from the replay.
"""
from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from fastrank.data.features import relevance
from fastrank.data.record import CandidateSet, Step
from fastrank.envs.scienceworld_actions import action_verb, bounded_admissible, stable_seed
from fastrank.envs.scienceworld_focus import named_by_goal
from fastrank.envs.scienceworld_tasks import canonical_task_name, eto_split_pairs
from fastrank.envs.scienceworld_view import observation_view

FOCUS = "focus on "
VALIDSAMPLE_FILE = "gold_train_var_30ep_validsample.jsonl.gz"


class HeldOutVariationError(ValueError):
    """A (task, variation) outside ETO's train split was about to become training data."""


def assert_train_only(pairs: Iterable[tuple[str, int]], data_dir: str | os.PathLike | None = None) -> None:
    """Raise unless every pair is an ETO train pair that is in neither the test nor the dev split."""
    train = set(eto_split_pairs("train", data_dir))
    held_out = set(eto_split_pairs("test", data_dir)) | set(eto_split_pairs("dev", data_dir))
    bad = [(t, v) for t, v in ((canonical_task_name(t), int(v)) for t, v in pairs)
           if (t, v) in held_out or (t, v) not in train]
    if bad:
        raise HeldOutVariationError(f"{len(bad)} (task, variation) pair(s) are not ETO train-only, e.g. {bad[:3]}")


def train_pairs(per_task: int | None = 3, seed: int = 0, tasks: Iterable[str] | None = None,
                data_dir: str | os.PathLike | None = None) -> list[tuple[str, int]]:
    """`per_task` ETO train pairs of each of its 24 tasks, round-robin over tasks (a build cut short by a
    time budget is still stratified); pairs shared with dev are left out (`select_pairs`)."""
    from fastrank.data.scienceworld import select_pairs

    pairs = select_pairs("train", per_task=per_task, seed=seed, tasks=tasks, data_dir=data_dir)
    assert_train_only(pairs, data_dir)
    return pairs


def replay_steps(pairs: Sequence[tuple[str, int]], cache_path: str | os.PathLike | None = None, *,
                 workers: int = 1, n_sample: int = 300, time_budget_s: float | None = None, seed: int = 0,
                 progress: bool = True):
    """Gold paths of `pairs` replayed through the simulator (`build_steps`, resumable through `cache_path`):
    a `BuildResult` whose Steps carry canonical experts and alias-free valid lists (`n_sample` per state,
    verb-stratified, so every `focus on` of a room is kept unless the list is huge)."""
    from fastrank.data.scienceworld import build_steps

    assert_train_only(pairs)
    return build_steps(pairs, workers=workers, cache_path=cache_path, progress=progress, seed=seed, split="train",
                       with_valid=True, n_sample=n_sample, time_budget_s=time_budget_s)


def gold_file_steps(data_dir: str | os.PathLike | None = None) -> list[Step]:
    """Steps of the shared valid-sample gold file, ETO train episodes only (9 of its 30 episodes are in no
    ETO split and are skipped rather than trusted)."""
    from fastrank.data.scienceworld import steps_from_gold_file
    from fastrank.paths import shared_data_dir

    root = os.fspath(data_dir) if data_dir is not None else os.fspath(shared_data_dir())
    steps = steps_from_gold_file(os.path.join(root, "scienceworld", VALIDSAMPLE_FILE), split="train")
    train = set(eto_split_pairs("train", data_dir)) - set(eto_split_pairs("test", data_dir)) - set(
        eto_split_pairs("dev", data_dir))
    keep = [s for s in steps if (s.task_type, int(s.meta["variation"])) in train]
    assert_train_only({(s.task_type, int(s.meta["variation"])) for s in keep}, data_dir)
    return keep


def _labelable(s: Step) -> bool:
    """The gold action is a string the agent can be offered in this state."""
    if not s.admissible or s.expert_action not in s.admissible:
        return False
    method = s.meta.get("canonical_method")
    if "source" in s.meta:  # the shared file: verbatim valid, or a sampled valid string with the same normal form
        return s.meta.get("gold_in_valid") is True or method == "string"
    return method not in (None, "none")  # replay: the simulator's parser found its valid-list spelling


def focus_named(goal: str, action: str) -> bool:
    """Whether the goal names this `focus on` action's object (`scienceworld_focus.named_by_goal`: the focus guard's
    first rule; its order and re-focus rules depend on the episode, not on the set)."""
    return named_by_goal(goal, action)


@dataclass
class SetStats:
    episodes: int = 0
    sets: int = 0
    not_labelled: int = 0  # gold action not a valid-list string (kept in the history only)
    capped: int = 0  # labelled states dropped by max_sets_per_episode
    with_wrong_focus: int = 0  # sets with at least one wrong `focus on` negative
    wrong_focus_named: int = 0  # wrong-focus negatives the goal names (they pass the focus guard)
    wrong_focus: int = 0
    candidates: list[int] = field(default_factory=list)
    by_task: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        n = max(1, self.sets)
        return {"episodes": self.episodes, "sets": self.sets, "not_labelled": self.not_labelled,
                "capped": self.capped, "sets_with_wrong_focus": self.with_wrong_focus,
                "wrong_focus_negatives": self.wrong_focus, "wrong_focus_named_by_goal": self.wrong_focus_named,
                "mean_candidates": round(sum(self.candidates) / n, 2), "sets_by_task": dict(sorted(self.by_task.items()))}


def episodes_of(steps: Iterable[Step]) -> dict[str, list[Step]]:
    """Steps grouped by episode, each episode in step order; for an episode id seen in several sources the
    first source wins (pass the simulator replay first)."""
    out: dict[str, list[Step]] = {}
    source: dict[str, object] = {}
    for s in steps:
        src = s.meta.get("source", "replay")
        if s.episode_id in out and source[s.episode_id] != src:
            continue
        source.setdefault(s.episode_id, src)
        out.setdefault(s.episode_id, []).append(s)
    for eid, ep in out.items():
        ep.sort(key=lambda s: s.step)
        if [s.step for s in ep] != list(range(len(ep))):
            raise ValueError(f"{eid}: steps {[s.step for s in ep][:10]}... are not 0..{len(ep) - 1}")
    return out


def _recent(ep: list[Step], i: int) -> str:
    """What the evaluation env's candidate cut reads besides the goal at step i: the last action and its feedback
    (`ScienceWorldEnv(admissible_priority=...)`)."""
    return f"{ep[i - 1].expert_action} {ep[i].observation}" if i else ep[i].observation


STAPLES = ("wait1", "wait", "look around", "inventory")  # in every ScienceWorld valid-action list


def agent_sets(steps: Iterable[Step], *, max_negatives: int = 11, max_wrong_focus: int = 4,
               max_sets_per_episode: int | None = None, seed: int = 0, staples: bool = False,
               view: str = "feedback", max_siblings: int = 0,
               guarded_focus: bool = False) -> tuple[list[CandidateSet], SetStats]:
    """One history-carrying CandidateSet per labelable gold step (see the module doc), and counts.
    `staples`: every set also holds the always-valid actions (`STAPLES`) that are not its label: the relevance cut
    of the negatives never picks them (they name no goal word), yet the evaluation offers them at every step, and
    a model that had seen `wait1` only as a label waited through whole episodes (runs/agent_sw2, agent_sw4).
    `view`: the observation text of every state and history turn (`fastrank.envs.scienceworld_view`; "room" adds the
    room and inventory from the Step's free look / inventory texts, exactly as `ScienceWorldEnv` composes them).
    `max_siblings`: up to that many of the negatives share the gold action's verb (`open door to kitchen` beside
    `open door to workshop`), drawn at random: the goal-word cut and the verb strata gave about one such action a
    set, and a policy trained so scored every `open door to X` of the hallway alike (runs/agent_sw4r: 5.04 / 5.03 /
    5.01), while the evaluation offers them all.
    `guarded_focus`: wrong `focus on` negatives only on objects the goal names (`focus_named`, the focus guard's
    name rule): the evaluation never offers the others, and with them in every set (18,330 negatives against ~200
    focus labels, runs/agent_sw8x) the policy learned that a focus is bad and ranked the goal's `focus on buzzer`
    18th."""
    if max_wrong_focus + max_siblings > max_negatives:
        raise ValueError(f"max_wrong_focus + max_siblings ({max_wrong_focus} + {max_siblings}) > max_negatives "
                         f"({max_negatives})")
    out: list[CandidateSet] = []
    st = SetStats()
    for eid, ep in episodes_of(steps).items():
        st.episodes += 1
        gold_focus = {s.expert_action for s in ep if s.expert_action.startswith(FOCUS)}
        gold_focus |= {FOCUS + s.meta["gold_action"][len(FOCUS):] for s in ep
                       if str(s.meta.get("gold_action", "")).startswith(FOCUS)}
        ep_sets: list[CandidateSet] = []
        seen = [observation_view(s.observation, s.meta.get("look"), s.meta.get("inventory"), view) for s in ep]
        for i, s in enumerate(ep):
            history = [[p.expert_action, seen[j + 1]] for j, p in enumerate(ep[:i])]
            if not _labelable(s):
                st.not_labelled += 1
                continue
            rng = random.Random(stable_seed("scienceworld_agent", seed, eid, s.step))
            others = [a for a in dict.fromkeys(s.admissible) if a != s.expert_action and a not in gold_focus]
            focus = [a for a in others if a.startswith(FOCUS)]
            named = [a for a in focus if focus_named(s.goal, a)]
            named_set = set(named)
            unnamed = [] if guarded_focus else [a for a in focus if a not in named_set]
            rng.shuffle(named)
            rng.shuffle(unnamed)
            wrong = (named + unnamed)[:max_wrong_focus]
            rest = [a for a in others if not a.startswith(FOCUS)]  # the wrong-focus cap holds (and the guard)
            siblings = []
            if max_siblings:  # skipped, not sampled at 0: ~1,700 verb lookups a state (a 0-sample draws nothing)
                verb = action_verb(s.expert_action)
                siblings = [a for a in rest if action_verb(a) == verb]
                siblings = rng.sample(siblings, min(len(siblings), max_siblings))
                sibling_set = set(siblings)
                rest = [a for a in rest if a not in sibling_set]
            # the evaluation env's cut (`--candidate-order relevance`): negatives that name the goal's words, as
            # the policy will meet them
            negs = wrong + siblings + bounded_admissible(
                rest, min(len(rest), max_negatives - len(wrong) - len(siblings)), rng,
                priority=relevance(s.goal, _recent(ep, i)))
            if staples:  # always offered, and the gold action in 15 % of states (wait1): the policy must learn when not
                negs += [a for a in STAPLES if a in rest and a not in negs]
            cands = [s.expert_action] + negs
            order = list(range(len(cands)))
            rng.shuffle(order)  # the label's position carries nothing
            cands = [cands[k] for k in order]
            cs = CandidateSet(env="scienceworld", episode_id=eid, step=s.step, task_type=s.task_type, goal=s.goal,
                              observation=seen[i], candidates=cands, expert_index=order.index(0),
                              sources=["expert" if k == 0 else "admissible" for k in order], history=history)
            cs.validate()
            ep_sets.append(cs)
            st.wrong_focus += len(wrong)
            st.wrong_focus_named += sum(a in set(named) for a in wrong)
            st.with_wrong_focus += bool(wrong)
        if max_sets_per_episode is not None and len(ep_sets) > max_sets_per_episode:
            # long gold paths (grow-fruit: ~140 steps of water/wait) would outweigh the short tasks
            keep = sorted(random.Random(stable_seed("cap", seed, eid)).sample(range(len(ep_sets)),
                                                                               max_sets_per_episode))
            st.capped += len(ep_sets) - len(keep)
            ep_sets = [ep_sets[k] for k in keep]
        for cs in ep_sets:
            st.candidates.append(len(cs.candidates))
            st.by_task[cs.task_type] += 1
        out.extend(ep_sets)
    st.sets = len(out)
    return out, st


def candidate_coverage(steps: Iterable[Step], k: int, seed: int = 0) -> dict[str, float]:
    """Share of labelable gold states whose gold action survives a `k`-action cut of the state's list, for the
    evaluation env's two orders (`fastrank agent-eval --candidate-order`): the ceiling of any policy shown that
    cut. Meaningful on full valid lists (`main --coverage K`: replays with every valid action kept)."""
    hits, n = {"random": 0, "relevance": 0}, 0
    for eid, ep in episodes_of(steps).items():
        for i, s in enumerate(ep):
            if not _labelable(s):
                continue
            n += 1
            for order, pr in (("random", None), ("relevance", relevance(s.goal, _recent(ep, i)))):
                cut = bounded_admissible(s.admissible, k, random.Random(stable_seed(seed, eid, s.step)), priority=pr)
                hits[order] += s.expert_action in cut
    return {"states": n, **{order: h / max(1, n) for order, h in hits.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    """Build (or extend) the replay cache: `python -m fastrank.data.scienceworld_agent --per-task 3`."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default="runs/sw_agent_data/replay.cache.jsonl")
    p.add_argument("--per-task", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--n-sample", type=int, default=300)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; stop submitting episodes after it")
    p.add_argument("--coverage", type=int, nargs="*", default=None, metavar="K",
                   help="instead: replay with every valid action kept and print how often the gold action survives a "
                        "K-action cut, random vs relevance order (e.g. --per-task 1 --coverage 64 128)")
    args = p.parse_args(argv)
    if args.coverage is not None:
        cache = args.cache.replace(".cache.jsonl", ".full.cache.jsonl")  # other lists: not the training cache
        res = replay_steps(train_pairs(args.per_task), cache, workers=args.workers, n_sample=100_000,  # all (~1,700)
                           time_budget_s=args.time_budget)
        for k in args.coverage or [64]:
            print(json.dumps({"k": k, **candidate_coverage(res.steps, k)}))
        return 0
    pairs = train_pairs(args.per_task)
    res = replay_steps(pairs, args.cache, workers=args.workers, n_sample=args.n_sample,
                       time_budget_s=args.time_budget)
    print(res)
    sets, stats = agent_sets(res.steps + gold_file_steps())
    print(json.dumps(stats.as_dict(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
