"""The zero-training lexical floor: what word overlap alone gets, to read a net gain against.

Each candidate is scored by the share of its words found in goal + observation
(`overlap_features(...)["action_coverage"]`, the feature the model is also given); the argmax (ties
to the lower index, as for the model) is the floor's pick. A model's net gain means something only
as far as it exceeds the floor's on the same sets.

    python -m fastrank.lexical_floor                     # floor on the bundled clean-eval split
    python -m fastrank.lexical_floor --checkpoint runs/joint3/model --env webshop --by-task-type

`eval_sets_like_training` loads exactly the evaluation sets a training run scored (same files, same
seeded sample), so report.md can put the floor beside the model without storing the sets.
"""
from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from fastrank.data.bundle import BUNDLED_DIR, load_dataset
from fastrank.data.features import overlap_features
from fastrank.data.record import CandidateSet
from fastrank.metrics import net_gain_report

DEFAULT_EVAL_ENVS = ("alfworld", "webshop", "scienceworld")


def floor_scores(cs: CandidateSet) -> list[float]:
    state = f"{cs.goal} {cs.observation}"
    return [overlap_features(state, a)["action_coverage"] for a in cs.candidates]


class FloorRanker:
    """The floor as a policy: `score(goal, observation, candidates)` like a Reranker's (agent baselines)."""

    def score(self, goal: str, observation: str, candidates: Sequence[str], **_: object):
        import numpy as np

        state = f"{goal} {observation}"
        return np.array([overlap_features(state, a)["action_coverage"] for a in candidates])


def floor_report(sets: Sequence[CandidateSet]) -> dict:
    """net_gain_report of the floor: {env: {states, original_top1, reranked_top1, net_gain}, combined}."""
    return net_gain_report(sets, [floor_scores(cs) for cs in sets])


def eval_sets_like_training(config: dict) -> dict[str, list[CandidateSet]]:
    """{mode: eval sets} as `fastrank.train.load_training_data` draws them for this run config
    (a test checks that the two agree)."""
    root = config.get("data_dir") or BUNDLED_DIR
    cap, seed = config.get("max_eval_sets"), config.get("seed", 42)
    out: dict[str, list[CandidateSet]] = {}
    for mode in config.get("eval_modes") or ["sampled", "hard"]:
        sets: list[CandidateSet] = []
        for env in sorted(config.get("eval_envs") or DEFAULT_EVAL_ENVS):
            env_sets = load_dataset(root, env, "eval", mode)
            if cap is not None and len(env_sets) > cap:
                env_sets = random.Random(seed).sample(env_sets, cap)
            sets += env_sets
        out[mode] = sets
    return out


def floor_for_run(config: dict) -> dict:
    """{mode: floor net_gain_report} on a training run's evaluation sets."""
    return {mode: floor_report(sets) for mode, sets in eval_sets_like_training(config).items() if sets}


FLOOR_NOTE = ("Lexical floor: no training, each candidate scored by the share of its words found in goal + "
              "observation, on the same eval sets (`python -m fastrank.lexical_floor`).")


def mean_floor(configs: Sequence[dict]) -> dict:
    """{mode: {env: net gain}} of the floor averaged over several runs' eval sets (each seed draws its own
    sample, so the floor is averaged over the same samples as the model); {} when any run's eval sets
    cannot be reloaded (a data_dir since removed), so a table shows "—" rather than a partial mean."""
    try:
        floors = [floor_for_run(c) for c in configs]
    except (OSError, ValueError):
        return {}
    if not floors:
        return {}
    return {m: {env: sum(f[m][env]["net_gain"] for f in floors) / len(floors) for env in floors[0][m]
                if all(env in f[m] for f in floors)}
            for m in floors[0] if all(m in f for f in floors)}


def by_task_type(sets: Sequence[CandidateSet], scores: Sequence[Sequence[float]]) -> dict:
    """net gain per (env, task type) — WebShop's task types are page kinds (search / results / item)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, cs in enumerate(sets):
        groups[f"{cs.env}/{cs.task_type}"].append(i)
    out = {}
    for key in sorted(groups):
        idx = groups[key]
        out[key] = net_gain_report([sets[i] for i in idx], [scores[i] for i in idx])["combined"]
    return out


def comparison_table(model: dict | None, floor: dict) -> list[str]:
    """Markdown rows: per environment, states, floor net gain, model net gain and the difference."""
    lines = ["| environment | states | lexical floor | model | model − floor |", "|---|---|---|---|---|"]
    for env, f in floor.items():
        m = (model or {}).get(env)
        mg = f"**{m['net_gain']:+.3f}**" if m else "—"
        diff = f"{m['net_gain'] - f['net_gain']:+.3f}" if m else "—"
        lines.append(f"| {env} | {f['states']} | {f['net_gain']:+.3f} | {mg} | {diff} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="dataset directory (default: the bundled one)")
    ap.add_argument("--env", nargs="+", default=list(DEFAULT_EVAL_ENVS))
    ap.add_argument("--modes", nargs="+", default=["sampled", "hard"])
    ap.add_argument("--max-eval-sets", type=int, default=None, help="seeded sample per env (as training runs do)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--checkpoint", default=None, help="a saved Reranker to put beside the floor")
    ap.add_argument("--by-task-type", action="store_true", help="also per (env, task type)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    config = {"data_dir": args.data_dir, "eval_envs": args.env, "eval_modes": args.modes,
              "max_eval_sets": args.max_eval_sets, "seed": args.seed}
    ranker = None
    if args.checkpoint:
        from fastrank.model import Reranker

        ranker = Reranker.from_pretrained(args.checkpoint)
    result: dict = {}
    for mode, sets in eval_sets_like_training(config).items():
        fs = [floor_scores(cs) for cs in sets]
        entry = {"floor": net_gain_report(sets, fs)}
        if args.by_task_type:
            entry["floor_by_task_type"] = by_task_type(sets, fs)
        if ranker is not None:
            ms = [ranker.score(cs.goal, cs.observation, cs.candidates).tolist() for cs in sets]
            entry["model"] = net_gain_report(sets, ms)
            if args.by_task_type:
                entry["model_by_task_type"] = by_task_type(sets, ms)
        result[mode] = entry
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for mode, entry in result.items():
        print(f"\n`{mode}` negatives{' — ' + str(Path(args.checkpoint)) if args.checkpoint else ''}")
        print("\n".join(comparison_table(entry.get("model"), entry["floor"])))
        if args.by_task_type:
            print("\n".join(comparison_table(entry.get("model_by_task_type"), entry["floor_by_task_type"])[2:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
