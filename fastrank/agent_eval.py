"""Agent in the loop: a saved reranker picks every action among the environment's admissible actions.

    fastrank agent-eval --env alfworld --checkpoint runs/agent_alfworld/model            # all 140 valid_seen
    fastrank agent-eval --env alfworld --split valid_unseen --games-dir DIR --checkpoint ...
    fastrank agent-eval --env scienceworld --tasks 10 --checkpoint runs/agent_alfworld/model
    fastrank agent-eval --env webshop --goals 100 --max-steps 15 --checkpoint runs/joint3/model
    OMP_NUM_THREADS=2 fastrank agent-eval --env alfworld --workers 2 --checkpoint ...     # 2 processes x 1 thread

Several games run in lockstep and their current states are scored in one call (`fastrank.rollout`; `Reranker.score_many`).
Reports success rate, mean score, steps, repeated-action rate and decisions/s, overall and per task
type, lists every game that failed to load, and writes one JSON line per episode (every observation,
candidate count, chosen action, its score and the runners-up) so failures can be read, not just counted.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from fastrank.envs.base import TextEnv
from fastrank.envs.scienceworld_focus import focus_guard  # noqa: F401 - `agent_eval.focus_guard`, as before
from fastrank.rollout import run_episodes


def run_episode(env: TextEnv, ranker, task: object, max_steps: int, *, avoid_repeats: bool = False,
                repeat_penalty: float = 0.0) -> dict:
    """One episode of `ranker` in `env` (the caller keeps `env` open)."""
    return run_episodes(lambda: env, [task], ranker, max_steps=max_steps, batch_size=1, avoid_repeats=avoid_repeats,
                        repeat_penalty=repeat_penalty, close_envs=False).episodes[0]


def spread_over_types(games: list, n: int | None) -> list:
    """The first n games (None/0: all) taken round-robin over task types: the sorted list runs type by
    type, so its first 20 would all be one task type."""
    by_type: dict[str, list] = {}
    for g in games:
        by_type.setdefault(g.task_type, []).append(g)
    queues, out = [list(v) for _, v in sorted(by_type.items())], []
    n = len(games) if not n or n < 0 else n
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def _alfworld_tasks(args: argparse.Namespace):
    from fastrank.envs.alfworld import AlfworldEnv, ensure_games, list_games

    root = ensure_games(args.games_dir)
    games = list_games(root, args.split)
    if not games:  # e.g. valid_unseen, which the shared tarball does not hold: say so, never report 0 episodes
        here = sorted(d.name for d in Path(root).iterdir() if d.is_dir())
        raise FileNotFoundError(f"{root}: no ALFWorld games of split {args.split!r} (splits here: {here}); "
                                f"--games-dir takes an unpacked json_2.1.1 folder or tarball that holds it")
    if getattr(args, "unplayed_by", None):
        games = unplayed_games(games, args.unplayed_by, args.split)
    return AlfworldEnv, [g.game_file for g in spread_over_types(games, args.games)], None


def unplayed_games(games: list, run_dir, split: str) -> list:
    """`games` less those the DAgger run in `run_dir` trained or picked its round on (its games.json): where a
    decoding setting can be chosen without looking at the evaluation split."""
    plan_path = Path(run_dir) / "games.json"
    if not plan_path.exists():
        raise FileNotFoundError(f"{plan_path}: no games.json (written by recipes/agent_alfworld.py at its start)")
    plan = json.loads(plan_path.read_text())
    if plan["split"] != split:
        raise ValueError(f"{plan_path}: the run played split {plan['split']!r}; --unplayed-by needs --split "
                         f"{plan['split']}, not {split!r}")
    unplayed = {Path(g).parts[-3:] for g in plan["unplayed"]}  # task/trial/file: the cache folder may have moved
    return [g for g in games if Path(g.game_file).parts[-3:] in unplayed]


def _scienceworld_tasks(args: argparse.Namespace):
    from fastrank.data.features import relevance
    from fastrank.data.scienceworld import select_pairs
    from fastrank.envs.scienceworld import ScienceWorldEnv

    split = args.split if args.split != "valid_seen" else "test"
    pairs = select_pairs(split=split, per_task=1, seed=args.seed)[: args.tasks]
    guard = None if args.no_focus_guard else (
        lambda s: focus_guard(s.goal, list(s.admissible), s.info.get("focused", ()), s.info.get("world", "")))
    order = relevance if args.candidate_order == "relevance" else None
    view = getattr(args, "observation_view", None) or checkpoint_view(args.checkpoint)
    return (lambda: ScienceWorldEnv(max_admissible=args.max_candidates, step_limit=args.max_steps,
                                    admissible_priority=order, observation_view=view)), pairs, guard


def checkpoint_view(checkpoint) -> str:
    """The ScienceWorld observation view a checkpoint was trained on (`Featurizer.observation_view`; "feedback" for
    checkpoints saved before it existed)."""
    from fastrank.data.features import Featurizer
    from fastrank.model import read_meta

    return Featurizer(**read_meta(checkpoint)["featurizer"]).observation_view


def _webshop_tasks(args: argparse.Namespace):
    from fastrank.envs.webshop import agent_tasks

    # the test goals [0, 500) of fastrank's WebShop environment (needs the `webshop` extra)
    make_env, goals = agent_tasks(args.goals or None)
    return make_env, goals, None


TASKS = {"alfworld": _alfworld_tasks, "scienceworld": _scienceworld_tasks, "webshop": _webshop_tasks}


def add_agent_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", choices=sorted(TASKS), required=True, help="the environment the agent plays")
    p.add_argument("--checkpoint", required=True, help="a directory written by Reranker.save_pretrained")
    p.add_argument("--games", type=int, default=0,
                   help="ALFWorld: number of games, round-robin over task types (default 0: every game of the split)")
    p.add_argument("--tasks", type=int, default=10, help="ScienceWorld: number of (task, variation) pairs")
    p.add_argument("--goals", type=int, default=0, help="WebShop: the first N test goals (default 0: all 500)")
    p.add_argument("--split", default="valid_seen",
                   help="ALFWorld split (valid_seen, valid_unseen, valid_train, train) / ScienceWorld ETO split")
    p.add_argument("--games-dir", default=None, help="ALFWorld games: unpacked dir or the json_2.1.1 tarball")
    p.add_argument("--unplayed-by", default=None, metavar="RUN_DIR",
                   help="ALFWorld: only the games of --split that the agent recipe's run in RUN_DIR never played "
                        "(its games.json; use with --split train to tune decoding away from the evaluation games)")
    p.add_argument("--max-steps", type=int, default=50, help="actions per episode before it counts as lost")
    p.add_argument("--batch-size", type=int, default=8,
                   help="games played in lockstep, their states scored in one call (ScienceWorld: one JVM each)")
    p.add_argument("--max-candidates", type=int, default=64, help="ScienceWorld: bound on the valid-action list")
    p.add_argument("--candidate-order", choices=("relevance", "random"), default="relevance",
                   help="ScienceWorld: which valid actions fill each verb's share of --max-candidates: those naming "
                        "the most goal words, then words of the last action and its result (default; the gold action "
                        "survives a 64-action cut in 76.5 %% of train gold states) or a random draw (64.9 %%)")
    p.add_argument("--observation-view", choices=("feedback", "room"), default=None,
                   help="ScienceWorld: what the policy is shown (default: the view the checkpoint was trained on; "
                        "room = the simulator's reply + the room it is in + its inventory)")
    p.add_argument("--no-focus-guard", action="store_true",
                   help="ScienceWorld: also offer `focus on X` for objects the goal does not name")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of games / tasks")
    rep = p.add_mutually_exclusive_group()
    rep.add_argument("--avoid-repeats", dest="avoid_repeats", action="store_true", default=None,
                     help="take the best action not yet taken from the same observation (breaks loops; not in the "
                          "paper). Default for ALFWorld: on ALFWorld train games it took a BC policy from 1 / 8 to "
                          "5 / 8 (README)")
    rep.add_argument("--allow-repeats", dest="avoid_repeats", action="store_false",
                     help="always take the top-scored action (the default for ScienceWorld and WebShop)")
    p.add_argument("--repeat-penalty", type=float, default=0.0,
                   help="subtracted from an action's score for each time the episode already took it, from any "
                        "state: the agent tries what it has not done before going back (default 0: off)")
    p.add_argument("--bf16", action="store_true",
                   help="score under bf16 autocast (matmuls in bf16, norms and softmax in fp32): faster on CPUs with "
                        "AVX512-BF16 / AMX and on GPUs; bench/bench_decision.py measures the latency and the argmax "
                        "agreement with fp32")
    p.add_argument("--out", default=None, help="episode log JSONL (default: <checkpoint>/agent_eval_<env>.jsonl)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes, each playing every N-th game with its own copy of the model and the torch "
                        "threads split between them (default 1). On a CPU the games' environments and the model "
                        "then run in parallel: 2 workers x 1 thread beat 1 x 2 threads on a 2-core machine")


def evaluate_agent(ranker, env: str, make_env, tasks: list, *, max_steps: int = 50, batch_size: int = 8,
                   candidates=None, avoid_repeats: bool = False, repeat_penalty: float = 0.0, seed: int = 0,
                   desc: str | None = None, on_episode=None, position: int | None = None) -> dict:
    """Play `tasks` with `ranker`; {"summary": ..., "episodes": [...]} (the DAgger recipe calls this too).
    `on_episode(episode)`: called as each episode ends (the CLI logs it at once)."""
    t0 = time.perf_counter()
    with tqdm(total=len(tasks), desc=desc or f"agent-eval {env}", position=position) as bar:
        ro = run_episodes(make_env, tasks, ranker, max_steps=max_steps, batch_size=batch_size,
                          candidates=candidates, avoid_repeats=avoid_repeats, repeat_penalty=repeat_penalty,
                          seed=seed, progress=bar, on_episode=on_episode)
    summary = {"env": env, **summarize(ro.episodes), "wall_seconds": round(time.perf_counter() - t0, 1),
               "decisions": ro.decisions, "model_seconds": round(ro.model_seconds, 1),
               "decisions_per_s": round(ro.decisions_per_s, 2)}
    return {"summary": summary, "episodes": ro.episodes}


def _play(args: argparse.Namespace, shard: int, workers: int, threads: int | None, log_path: Path,
          prepared: tuple | None = None) -> tuple:
    """Every `workers`-th task from `shard` on, played by a freshly loaded model; (task indices, result).
    Runs in the CLI process (one worker; `prepared`: its `TASKS[env](args)`) or in a spawned worker process
    (several), which lists the tasks again (their env factories do not pickle)."""
    import torch

    from fastrank.model import Reranker

    if threads:
        torch.set_num_threads(threads)
    make_env, tasks, candidates = prepared or TASKS[args.env](args)
    idx = list(range(shard, len(tasks), workers))
    ranker = Reranker.from_pretrained(args.checkpoint)
    batch = args.batch_size if args.env in ("alfworld", "webshop") else min(args.batch_size, 2)
    bf16 = (torch.autocast(ranker.device.type, dtype=torch.bfloat16) if args.bf16
            else contextlib.nullcontext())
    with bf16, open(log_path, "w", encoding="utf-8") as log:  # each episode as it ends: a stopped run keeps them
        def on_episode(ep: dict) -> None:
            log.write(json.dumps(ep) + "\n")
            log.flush()

        res = evaluate_agent(ranker, args.env, make_env, [tasks[i] for i in idx], max_steps=args.max_steps,
                             batch_size=batch, candidates=candidates, avoid_repeats=args.avoid_repeats,
                             repeat_penalty=args.repeat_penalty,
                             seed=args.seed + shard, on_episode=on_episode, position=shard if workers > 1 else None,
                             desc=f"agent-eval {args.env}" + (f" [worker {shard}]" if workers > 1 else ""))
    return idx, res


def _bf16_emulated() -> bool:
    """On a CPU without hardware bf16 (and no GPU), warn and score in fp32, as the agent recipes do: a bf16
    decision there costs ~20-50x an fp32 one."""
    import torch

    from fastrank.train import BF16_EMULATED, cpu_has_bf16

    if torch.cuda.is_available() or cpu_has_bf16():
        return False
    warnings.warn(f"--{BF16_EMULATED}; scoring in fp32 instead", stacklevel=3)
    return True


def agent_eval_from_args(args: argparse.Namespace) -> int:
    if args.env == "alfworld" and args.games_dir is None:
        from fastrank.paths import shared_data_dir

        args.games_dir = shared_data_dir() / "alfworld" / "json_2.1.1_games.tar.xz"
    if args.avoid_repeats is None:
        args.avoid_repeats = args.env == "alfworld"
    args.repeat_penalty = getattr(args, "repeat_penalty", 0.0)  # callers building the Namespace by hand may leave it out
    args.bf16 = getattr(args, "bf16", False) and not _bf16_emulated()  # the summary says the precision that ran
    n_workers = getattr(args, "workers", 1)  # callers building the Namespace by hand may leave it out
    if n_workers < 1:
        raise ValueError(f"--workers must be >= 1, got {n_workers}")
    prepared = TASKS[args.env](args)  # before any model loads: a wrong split or path fails fast
    tasks = prepared[1]
    workers = min(n_workers, len(tasks)) or 1
    out = Path(args.out or Path(args.checkpoint) / f"agent_eval_{args.env}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = [out.with_suffix(".partial.jsonl" if workers == 1 else f".partial.w{k}.jsonl") for k in range(workers)]
    t0 = time.perf_counter()
    if workers == 1:
        parts = [_play(args, 0, 1, None, logs[0], prepared)]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        import torch

        threads = max(1, torch.get_num_threads() // workers)
        # spawn: a forked copy of a process that already started torch's thread pools can deadlock
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            parts = list(pool.map(_play, *zip(*[(args, k, workers, threads, logs[k]) for k in range(workers)])))
    episodes: list = [None] * len(tasks)
    for idx, res in parts:
        for i, ep in zip(idx, res["episodes"]):
            episodes[i] = ep
    decisions = sum(r["summary"]["decisions"] for _, r in parts)
    model_s = sum(r["summary"]["model_seconds"] for _, r in parts)
    write_episodes(out, episodes)  # the finished log, in task order
    for log in logs:
        log.unlink()
    # decisions/s is per worker (the ranker's own speed at its share of the threads), as with one process
    summary = {"env": args.env, **summarize(episodes), "wall_seconds": round(time.perf_counter() - t0, 1),
               "decisions": decisions, "model_seconds": round(model_s, 1),
               "decisions_per_s": round(decisions / model_s, 2) if model_s else 0.0, "workers": workers,
               "checkpoint": str(args.checkpoint), "split": args.split, "avoid_repeats": args.avoid_repeats,
               "repeat_penalty": args.repeat_penalty,
               "bf16": args.bf16, "log": str(out)}
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


def write_episodes(path: str | Path, episodes) -> Path:
    """One JSON line per episode (every step, its candidates' runners-up): the agent logs."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for ep in episodes:
            f.write(json.dumps(ep) + "\n")
    return path


def failed_to_load_lines(summary: dict, noun: str = "game") -> list[str]:
    """Report lines listing what `summarize` counted under ``failed_to_load`` (none when nothing failed)."""
    failed = summary.get("failed_to_load")
    if not failed:
        return []
    return ["", f"{failed['count']} {noun}(s) failed to load:", *[f"- {g}: {why}" for g, why in failed["games"]]]


def looped_steps(actions: list[str]) -> int:
    """Steps that repeat or loop as the GCD paper counts them (its Figure 8): the action copies the previous
    step's, or closes a repeated sequence (the last k actions equal the k before them, k >= 2: open / close /
    open / close). A return to a place with something new in hand is neither: `repeated_action_rate` counts it."""
    n = 0
    for t in range(1, len(actions)):
        n += any(actions[t - k + 1:t + 1] == actions[t - 2 * k + 1:t - k + 1] for k in range(1, (t + 1) // 2 + 1))
    return n


def repetition(summary: dict) -> str:
    """The reports' wording of `summarize`'s two repetition rates."""
    return (f"repeated actions {summary['repeated_action_rate']:.1%} "
            f"(looped, the GCD count: {summary['looped_action_rate']:.1%})")


def summarize(episodes: list[dict]) -> dict:
    """Success, score and steps overall and per task type, and how often the agent repeated itself:
    ``repeated_action_rate``, steps whose action was already taken in the episode (any earlier step: returns
    included, so even the handcoded ALFWorld expert scores ~16 %), and ``looped_action_rate``, the GCD paper's
    repeated-or-looped count (`looped_steps`). Games that failed to load are counted and listed, and left out of
    the rates (they were never played)."""
    failed = [e for e in episodes if e.get("error")]
    played = [e for e in episodes if not e.get("error")]

    def agg(eps: list[dict]) -> dict:
        n = max(1, len(eps))
        acts = [[s["action"] for s in e["trajectory"]] for e in eps]
        repeats, steps = sum(len(a) - len(set(a)) for a in acts), max(1, sum(map(len, acts)))
        return {"episodes": len(eps), "success_rate": sum(e["won"] for e in eps) / n,
                "mean_score": sum(e["score"] for e in eps) / n, "mean_steps": sum(e["steps"] for e in eps) / n,
                "repeated_action_rate": repeats / steps, "looped_action_rate": sum(map(looped_steps, acts)) / steps}

    types = sorted({str(e["task_type"]) for e in played})
    out = {**agg(played), "per_task_type": {t: agg([e for e in played if str(e["task_type"]) == t]) for t in types}}
    if failed:
        out["failed_to_load"] = {"count": len(failed), "games": [[e["task"], e["error"]] for e in failed]}
    return out
