"""`fastrank data build`: real environment data → Steps → split → candidate sets → dataset directory.

    fastrank data build                                  # rebuild the bundled dataset from ../shared/data
    fastrank data build --out data/big --alfworld-games 1000 --scienceworld-per-task 20 --alfworld-gt-traj

Slow sources (ALFWorld expert replays, ScienceWorld gold paths) run in worker processes with progress
bars and append finished episodes to caches under --cache, so an interrupted build resumes.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from fastrank.data.bundle import BUNDLED_DIR, write_dataset
from fastrank.data.record import Step
from fastrank.paths import shared_data_dir


def add_build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--envs", nargs="+", default=["alfworld", "scienceworld", "webshop"],
                   choices=["alfworld", "scienceworld", "webshop"], help="environments to build")
    p.add_argument("--shared", type=Path, default=None, help="the shared data dir (default: $FASTRANK_SHARED_DATA "
                   "or ../shared/data beside the checkout)")
    p.add_argument("--out", type=Path, default=BUNDLED_DIR, help="dataset directory to write")
    p.add_argument("--cache", type=Path, default=Path("build_cache"), help="resumable per-episode caches")
    p.add_argument("--workers", type=int, default=2, help="worker processes for the simulator replays")
    p.add_argument("--seed", type=int, default=42, help="split and negative-sampling seed")
    p.add_argument("--replay-seed", type=int, default=0,
                   help="which games/variations are replayed and the experts' RNG (part of the cache key)")
    p.add_argument("--eval-frac", type=float, default=0.2, help="share of the episodes held out for evaluation")
    p.add_argument("--test-frac", type=float, default=0.3, help="share of the rest (after eval) held out as the test split")
    p.add_argument("--alfworld-games", type=int, default=250, help="train games to replay the expert on")
    p.add_argument("--alfworld-gt-traj", action="store_true",
                   help="also add the released gt_traj trajectories (60k steps, no admissible lists)")
    p.add_argument("--alfworld-keep-non-policy", action="store_true",
                   help="keep the expert's opening/fallback `look` and random-pick steps (left out by default)")
    p.add_argument("--alfworld-games-dir", default=None, help="unpacked json_2.1.1 dir (default: the tarball)")
    p.add_argument("--scienceworld-per-task", type=int, default=5, help="ETO-train variations per task (24 tasks)")
    p.add_argument("--scienceworld-per-missing-task", type=int, default=2,
                   help="simulator-train variations for the 6 tasks ETO leaves out (0: leave them out)")
    p.add_argument("--scienceworld-valid-sample", type=int, default=50,
                   help="valid actions kept per step (the simulator lists ~1900)")
    p.add_argument("--webshop-il-trajs", default=None, help="official il_trajs_finalized_images.jsonl, if you have it")
    p.add_argument("--no-webshop-clicks", dest="webshop_clicks", action="store_false",
                   help="leave out the click states of the expert in fastrank's WebShop environment "
                        "(they need the `webshop` extra)")


def alfworld_steps(args: argparse.Namespace, shared: Path) -> tuple[list[Step], dict]:
    from fastrank.data import alfworld

    games = args.alfworld_games_dir or shared / "alfworld" / "json_2.1.1_games.tar.xz"
    res = alfworld.build_steps(games, "train", max_episodes=args.alfworld_games, workers=args.workers,
                               seed=args.replay_seed, cache_path=args.cache / "alfworld_train_episodes.jsonl")
    steps = list(res.steps)
    report = {"replay_train": res.report.summary()}
    rep = alfworld.SourceReport(str(shared / "alfworld" / "expert_admissible_valid_seen.jsonl.gz"))
    steps += alfworld.steps_from_expert_admissible(rep.path, shared / "alfworld" / "traj_meta.jsonl.gz", report=rep)
    report["expert_admissible_valid_seen"] = str(rep)
    # The handcoded expert's non-decisions: the opening `look`, `look` substituted for an inadmissible
    # suggestion, and its random pick when its policy loops. They teach the ranker "look" and noise, so
    # they are left out of the candidate sets by default, and counted.
    if not args.alfworld_keep_non_policy:
        dropped = Counter(s.meta.get("expert_source") for s in steps
                          if s.meta.get("expert_source") not in (None, "policy"))
        steps = [s for s in steps if s.meta.get("expert_source") in (None, "policy")]
        report["non_policy_expert_steps_left_out"] = dict(dropped)
    if args.alfworld_gt_traj:
        replayed = {s.episode_id for s in steps}
        rep = alfworld.SourceReport(str(shared / "alfworld" / "gt_traj_train.jsonl.gz"))
        gt = alfworld.steps_from_gt_traj(rep.path, shared / "alfworld" / "traj_meta.jsonl.gz", report=rep)
        # A replayed episode already has admissible lists: keep it, skip its gt_traj twin (counted).
        kept = [s for s in gt if s.episode_id not in replayed]
        report["gt_traj"] = f"{rep}; {len(gt) - len(kept)} steps of replayed episodes not added again"
        steps += kept
    return steps, report


def scienceworld_steps(args: argparse.Namespace, shared: Path) -> tuple[list[Step], dict]:
    from fastrank.data import scienceworld

    pairs = scienceworld.select_pairs("train", per_task=args.scienceworld_per_task, seed=args.replay_seed,
                                      data_dir=shared, fill_missing=args.scienceworld_per_missing_task > 0,
                                      per_task_missing=args.scienceworld_per_missing_task)
    res = scienceworld.build_steps(pairs, workers=args.workers, seed=args.replay_seed, split="train",
                                   cache_path=args.cache / "scienceworld_train_episodes.cache.jsonl",
                                   n_sample=args.scienceworld_valid_sample)
    steps = list(res.steps)
    return steps, {"gold_paths": scienceworld.summarize(steps, res.failures)}


def webshop_steps(args: argparse.Namespace, shared: Path) -> tuple[list[Step], dict]:
    from fastrank.data import webshop

    steps, report = webshop.build_steps(shared / "webshop", il_trajs=args.webshop_il_trajs)
    if args.webshop_clicks:
        # Click states from our WebShop environment (test goals -> eval, leak-free goals -> train/test).
        from fastrank.data.webshop_clicks import build_click_steps

        clicks, click_report = build_click_steps(test_frac=args.test_frac, seed=args.seed)
        steps = steps + clicks
        report = {"search_queries": report, "clicks": click_report}
    return steps, report


BUILDERS = {"alfworld": alfworld_steps, "scienceworld": scienceworld_steps, "webshop": webshop_steps}


def build_from_args(args: argparse.Namespace) -> dict:
    shared = args.shared or shared_data_dir()
    if not shared.is_dir():
        raise FileNotFoundError(f"shared data dir {shared} not found: pass --shared or set FASTRANK_SHARED_DATA")
    args.cache.mkdir(parents=True, exist_ok=True)
    steps_by_env, sources = {}, {}
    for env in args.envs:
        print(f"[fastrank data build] {env}: collecting expert steps ...", flush=True)
        steps_by_env[env], sources[env] = BUILDERS[env](args, shared)
        print(f"[fastrank data build] {env}: {len(steps_by_env[env])} steps", flush=True)
    manifest = write_dataset(steps_by_env, args.out, seed=args.seed, eval_frac=args.eval_frac,
                             test_frac=args.test_frac, sources=sources)
    for env, rep in manifest["envs"].items():
        print(f"[fastrank data build] {env}: states {rep['split']['states']}, "
              f"eval duplicates removed {rep['split']['eval_removed_as_duplicates_of_train']}")
    print(f"[fastrank data build] wrote {args.out} (manifest.json has every count)")
    return manifest

