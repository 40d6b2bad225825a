"""ScienceWorld Steps from the shared gold files (no simulator): string-level alias folding only."""
from __future__ import annotations

import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from fastrank.data.record import Step, iter_jsonl
from fastrank.data.scienceworld.common import AMBIGUOUS_PREFIX, ENV, PARSER_FAILURES, episode_id, is_digit_answer
from fastrank.envs.scienceworld_actions import bounded_admissible, dedupe, normalize_action, remove_aliases, stable_seed
from fastrank.envs.scienceworld_tasks import canonical_task_name, task_level, task_topic
from fastrank.paths import shared_data_dir

GOLD_FILES = ("gold_train_var_50ep.jsonl.gz", "gold_train_var_30ep_validsample.jsonl.gz")


# --------------------------------------------------------------------------------- shared gold files

def gold_files(data_dir: str | os.PathLike | None = None) -> list[Path]:
    root = Path(data_dir) if data_dir is not None else shared_data_dir()
    return [root / "scienceworld" / name for name in GOLD_FILES]


def steps_from_gold_file(
    path: str | os.PathLike,
    split: str = "train",
    seed: int = 0,
    n_sample: int | None = None,
) -> list[Step]:
    """Steps from one shared gold file: {"task", "variation", "goal", "score", "steps": [{"obs",
    "look", "inv", "action"[, "n_valid", "gold_in_valid", "valid_sample"]}]}.

    `obs` is the feedback before `action`, so the feedback of action i is the `obs` of step i+1.
    Only effective decisions are emitted: digit answers are folded into the action they
    disambiguate; stray digits and actions the simulator rejected ("No known action ...", or an
    action cancelled by a non-digit answer to its prompt) are dropped; each Step's observation is
    the latest feedback of an action that did something.

    With a `valid_sample` (40 sampled valid actions other than the gold one), admissible = that
    sample minus string-level aliases of the gold (`normalize_action`), plus the expert; when a
    sampled action normalises to the gold string it is taken as the expert's canonical form.
    Without a simulator most aliases stay undetected *and* the expert keeps its gold spelling
    (`examine X` among `look at Y` distractors): prefer simulator-built Steps for training.
    n_sample caps the admissible list (None: keep all)."""
    out: list[Step] = []
    for lineno, ep in iter_jsonl(path):
        where = f"{path}:{lineno}"
        try:
            task = canonical_task_name(ep["task"])
            variation = int(ep["variation"])
            goal, raw_steps = ep["goal"], ep["steps"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: bad episode record ({exc})") from None
        eid = episode_id(task, variation)
        base_meta = {"split": split, "variation": variation, "topic": task_topic(task), "level": task_level(task),
                     "episode_score": ep.get("score"), "n_gold_actions": len(raw_steps), "source": Path(path).name}
        emitted: list[Step] = []
        current_obs = raw_steps[0]["obs"] if raw_steps else ""  # the latest effective feedback
        pending: Step | None = None  # a Step whose action raised an ambiguity prompt
        for gi, s in enumerate(raw_steps):
            action = s["action"]
            prompt_pending = s["obs"].startswith(AMBIGUOUS_PREFIX)  # raised by action gi-1
            feedback = raw_steps[gi + 1]["obs"] if gi + 1 < len(raw_steps) else None
            failed = feedback is not None and feedback.startswith(PARSER_FAILURES)
            if prompt_pending:
                # This action is read as the answer: a digit executes the pending action; anything
                # else cancels it ("Unknown action.") and is itself consumed.
                if pending is not None and is_digit_answer(action) and not failed:
                    emitted.append(pending)
                    current_obs = feedback
                pending = None
                continue
            if is_digit_answer(action):
                continue  # a stray digit: "No known action ...", nothing happens
            if failed:
                continue  # the simulator rejected the action: nothing happened, not a decision
            meta = dict(base_meta, gold_index=gi, gold_action=action, look=s.get("look"), inventory=s.get("inv"))
            expert = " ".join(action.split())
            admissible = None
            if "valid_sample" in s:
                sample = dedupe(s["valid_sample"])
                norm = normalize_action(expert)
                same = [a for a in sample if normalize_action(a) == norm]
                if same:
                    expert = same[0]
                others = remove_aliases(sample, expert, [action, *same])
                if n_sample is not None:
                    rng = random.Random(stable_seed(seed, eid, gi))
                    admissible = bounded_admissible(others, n_sample, rng, must_include=[expert])
                else:
                    admissible = sorted(others + [expert])
                meta.update(n_valid=s.get("n_valid"), gold_in_valid=s.get("gold_in_valid"),
                            canonical_method="string" if same else "none",
                            n_alias_removed=len(sample) - len(others) - len(same))
            step = Step(env=ENV, episode_id=eid, step=0, task_type=task, goal=goal,
                        observation=current_obs, expert_action=expert, admissible=admissible, meta=meta)
            try:
                step.validate()
            except ValueError as exc:
                raise ValueError(f"{where}: gold step {gi}: {exc}") from None
            if feedback is not None and feedback.startswith(AMBIGUOUS_PREFIX):
                pending = step
                continue
            emitted.append(step)
            if feedback is not None:
                current_obs = feedback
        for i, step in enumerate(emitted):
            step.step = i
        out.extend(emitted)
    return out


def steps_from_gold_files(
    paths: Sequence[str | os.PathLike] | None = None,
    split: str = "train",
    seed: int = 0,
    n_sample: int | None = None,
) -> list[Step]:
    """Steps from the shared gold files (default: both, from `shared_data_dir()`). An episode in
    several files is taken once, from the later file (the valid-sample file comes second)."""
    paths = list(paths) if paths is not None else gold_files()
    by_episode: dict[str, list[Step]] = {}
    for p in paths:
        steps = steps_from_gold_file(p, split=split, seed=seed, n_sample=n_sample)
        file_eps: dict[str, list[Step]] = defaultdict(list)
        for s in steps:
            file_eps[s.episode_id].append(s)
        by_episode.update(file_eps)  # later file wins
    return [s for eps in by_episode.values() for s in eps]


__all__ = ["GOLD_FILES", "gold_files", "steps_from_gold_file", "steps_from_gold_files"]
