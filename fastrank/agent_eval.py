"""Agent in the loop: a saved reranker picks every action among the environment's admissible actions.

    fastrank agent-eval --env alfworld --games 20 --checkpoint runs/joint3/model
    fastrank agent-eval --env scienceworld --tasks 10 --checkpoint runs/joint3/model

Reports success rate, mean score and steps, and writes one JSON line per episode (every observation,
candidate count, chosen action and its score) so failures can be read, not just counted. The paper's
reranker solved 0/100 episodes; this reports whatever ours does.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from fastrank.envs.base import TextEnv


def run_episode(env: TextEnv, ranker, task: object, max_steps: int, *, avoid_repeats: bool = False) -> dict:
    """One episode: reset to `task`, then rank the admissible actions and take the best, until done.

    The reranker sees goal + observation only, so the same observation gives the same choice and an
    action that leaves the observation unchanged ("examine drawer 8") repeats until the step limit.
    ``avoid_repeats`` (not in the paper) takes the best action not already taken from this same
    observation, falling back to the best one when all were.
    """
    state = env.reset(task)
    log, t0, tried = [], time.perf_counter(), {}
    for _ in range(max_steps):
        if state.done or not state.admissible:
            break
        scores = ranker.score(state.goal, state.observation, state.admissible).tolist()
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        seen = tried.setdefault(state.observation, set())
        pick = next((i for i in order if state.admissible[i] not in seen), order[0]) if avoid_repeats else order[0]
        action = state.admissible[pick]
        seen.add(action)
        # the runners-up show how close a wrong choice was: failures can be read, not just counted
        log.append({"observation": state.observation, "n_candidates": len(state.admissible), "action": action,
                    "score": scores[pick], "top": [[state.admissible[i], scores[i]] for i in order[:3]]})
        state = env.step(action)
    return {"task": str(task), "goal": state.goal, "task_type": state.task_type, "won": bool(state.won),
            "score": float(state.info.get("score", float(state.won))), "steps": len(log),
            "seconds": round(time.perf_counter() - t0, 2), "trajectory": log}


def _alfworld_tasks(args: argparse.Namespace) -> tuple[TextEnv, list]:
    from fastrank.envs.alfworld import AlfworldEnv, ensure_games, list_games

    games = list_games(ensure_games(args.games_dir), args.split)
    return AlfworldEnv(), [g.game_file for g in spread_over_types(games, args.games)]


def spread_over_types(games: list, n: int) -> list:
    """The first n games taken round-robin over task types: the sorted list runs type by type, so its
    first 20 would all be one task type."""
    by_type: dict[str, list] = {}
    for g in games:
        by_type.setdefault(g.task_type, []).append(g)
    queues, out = [list(v) for _, v in sorted(by_type.items())], []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def _scienceworld_tasks(args: argparse.Namespace) -> tuple[TextEnv, list]:
    from fastrank.data.scienceworld import select_pairs
    from fastrank.envs.scienceworld import ScienceWorldEnv

    pairs = select_pairs(split=args.split if args.split != "valid_seen" else "test", per_task=1, seed=args.seed)
    return ScienceWorldEnv(max_admissible=args.max_candidates), pairs[: args.tasks]


def add_agent_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", choices=["alfworld", "scienceworld"], required=True)
    p.add_argument("--checkpoint", required=True, help="a directory written by Reranker.save_pretrained")
    p.add_argument("--games", type=int, default=20, help="ALFWorld: number of games (round-robin over task types)")
    p.add_argument("--tasks", type=int, default=10, help="ScienceWorld: number of (task, variation) pairs")
    p.add_argument("--split", default="valid_seen", help="ALFWorld split (valid_seen) / ScienceWorld ETO split")
    p.add_argument("--games-dir", default=None, help="ALFWorld games: unpacked dir or the json_2.1.1 tarball")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--max-candidates", type=int, default=64, help="ScienceWorld: bound on the valid-action list")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--avoid-repeats", action="store_true",
                   help="take the best action not yet taken from the same observation (breaks loops; not in the paper)")
    p.add_argument("--out", default=None, help="episode log JSONL (default: <checkpoint>/agent_eval_<env>.jsonl)")


def agent_eval_from_args(args: argparse.Namespace) -> int:
    from fastrank.model import Reranker

    if args.env == "alfworld" and args.games_dir is None:
        from fastrank.data.build import shared_data_dir

        args.games_dir = shared_data_dir() / "alfworld" / "json_2.1.1_games.tar.xz"
    ranker = Reranker.from_pretrained(args.checkpoint)
    env, tasks = (_alfworld_tasks if args.env == "alfworld" else _scienceworld_tasks)(args)
    out = Path(args.out or Path(args.checkpoint) / f"agent_eval_{args.env}.jsonl")
    episodes = []
    with open(out, "w", encoding="utf-8") as f:
        for task in tqdm(tasks, desc=f"agent-eval {args.env}"):
            ep = run_episode(env, ranker, task, args.max_steps, avoid_repeats=args.avoid_repeats)
            episodes.append(ep)
            f.write(json.dumps(ep) + "\n")
    env.close()
    summary = {"env": args.env, "checkpoint": str(args.checkpoint), "avoid_repeats": args.avoid_repeats,
               **summarize(episodes), "log": str(out)}
    print(json.dumps(summary, indent=1))
    return 0


def summarize(episodes: list[dict]) -> dict:
    """Success, score and steps overall and per task type, and how often the agent repeated itself
    (an action already taken in the episode: the looping the GCD paper counts)."""
    def agg(eps: list[dict]) -> dict:
        n = max(1, len(eps))
        acts = [[s["action"] for s in e["trajectory"]] for e in eps]
        repeats = sum(len(a) - len(set(a)) for a in acts)
        return {"episodes": len(eps), "success_rate": sum(e["won"] for e in eps) / n,
                "mean_score": sum(e["score"] for e in eps) / n, "mean_steps": sum(e["steps"] for e in eps) / n,
                "repeated_action_rate": repeats / max(1, sum(len(a) for a in acts))}

    types = sorted({str(e["task_type"]) for e in episodes})
    return {**agg(episodes), "per_task_type": {t: agg([e for e in episodes if str(e["task_type"]) == t])
                                               for t in types}}
