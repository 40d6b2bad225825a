"""An expert for WebShop's synthetic goals, and the random policy it is compared with.

The expert knows the goal's target product and options (privileged, like ALFWorld's handcoded
expert): it searches, pages through the results to the target (`next >` / `< prev`, at most
`max_pages`), opens it, clicks each goal option value (option names in sorted order) and buys. From a
wrong product's page or a sub page it goes `< prev`; the data builder uses that to record recovery
states. When the target is not among the 50 hits it gives up (`expert_action` returns None), and
`run_expert` buys what the reference oracle buys instead (SPEC §1: the first hit whose catalog
query equals the goal's, else the top hit), so oracle scores stay comparable with the recordings.
"""
from __future__ import annotations

import random

from fastrank.envs.base import EnvState
from fastrank.envs.webshop import RESULTS_PER_PAGE, WebShopEnv


def expert_action(env: WebShopEnv, state: EnvState, *, query: str | None = None, target: str | None = None,
                  max_pages: int = 5) -> str | None:
    """The expert's next action on the current page, or None when the target cannot be reached.

    `target` overrides the goal's ASIN (the fallback product); `query` the search text.
    """
    s = env.session
    goal = s.goal
    target = target or goal.asin
    page = state.info["page"]
    if page == "index":
        return f"search[{query if query is not None else goal.instruction_text}]"
    if page == "search_results":
        ranked = [a for a, _ in s.hits]
        if target not in ranked:
            return None
        target_page = ranked.index(target) // RESULTS_PER_PAGE + 1
        if target_page > max_pages:
            return None
        if target_page == s.results_page:
            return f"click[{target.lower()}]"
        return "click[next >]" if target_page > s.results_page else "click[< prev]"
    if page == "item_sub_page":
        return "click[< prev]"
    if page == "item_page":
        if s.asin != target:
            return "click[< prev]"
        return option_or_buy(env, state)
    return None  # done


def option_or_buy(env: WebShopEnv, state: EnvState) -> str:
    """On an item page: the next goal option value the page offers and the session has not chosen (option names
    in sorted order), else `buy now`. Shared by the expert and the agent recipe's teachers."""
    s = env.session
    for name, value in s.goal.goal_options:
        if s.options.get(name) != value and value in state.info["clickables"]:
            return f"click[{value}]"
    return "click[buy now]"


def fallback_target(env: WebShopEnv) -> str | None:
    """The reference oracle's pick when the target is not retrieved: first hit with the goal's query."""
    s = env.session
    if not s.hits:
        return None
    want = env.target(s.goal).query
    return next((a for a, _ in s.hits if env.catalog.by_asin[a].query == want), s.hits[0][0])


def run_expert(env: WebShopEnv, goal_index: int, *, max_steps: int = 30) -> dict:
    """One oracle episode: {goal, reward, score, won, steps, actions, found}."""
    state = env.reset(goal_index)
    actions: list[str] = []
    target = None
    while not state.done and len(actions) < max_steps:
        action = expert_action(env, state, target=target)
        if action is None and target is None and state.info["page"] == "search_results":
            target = fallback_target(env)
            action = expert_action(env, state, target=target, max_pages=10) if target else None
        if action is None:
            break
        actions.append(action)
        state = env.step(action)
    r = state.reward if state.done else 0.0
    return {"goal": goal_index, "reward": r, "score": 100 * r, "won": state.done and r == 1.0,
            "steps": len(actions), "actions": actions, "found": target is None}


def run_random(env: WebShopEnv, goal_index: int, rng: random.Random, *, max_steps: int = 15) -> dict:
    """A uniform random policy over the page's admissible actions (the search is the instruction).

    After `max_steps` without a purchase it is made to finish the way the recordings' random policy
    does: open the first product on the results page if needed and buy.
    """
    state = env.reset(goal_index)
    actions: list[str] = []
    while not state.done and len(actions) < max_steps and state.admissible:
        action = rng.choice(state.admissible)
        actions.append(action)
        state = env.step(action)
    for _ in range(6):  # forced finish
        if state.done:
            break
        page = state.info["page"]
        if page == "index":
            action = state.admissible[0]
        elif page == "search_results":
            asins = [c for c in state.info["clickables"] if c not in ("back to search", "< prev", "next >")]
            action = f"click[{asins[0]}]" if asins else "click[back to search]"
        elif page == "item_sub_page":
            action = "click[< prev]"
        else:
            action = "click[buy now]"
        actions.append(action)
        state = env.step(action)
    r = state.reward if state.done else 0.0
    return {"goal": goal_index, "reward": r, "score": 100 * r, "won": state.done and r == 1.0,
            "steps": len(actions), "actions": actions}


def run_first_result(env: WebShopEnv, goal_index: int) -> dict:
    """Search the instruction, open the top hit, pick the goal's option values it offers, buy: what the
    results-page choice is worth (the goal options are read from the goal, as the instruction states them)."""
    state = env.reset(goal_index)
    actions = [state.admissible[0]]
    state = env.step(actions[0])
    asins = [c for c in state.info["clickables"] if c not in ("back to search", "< prev", "next >")]
    if asins:
        actions.append(f"click[{asins[0]}]")
        state = env.step(actions[-1])
        for _, value in env.session.goal.goal_options:
            if value in state.info["clickables"]:
                actions.append(f"click[{value}]")
                state = env.step(actions[-1])
        actions.append("click[buy now]")
        state = env.step(actions[-1])
    r = state.reward if state.done else 0.0
    return {"goal": goal_index, "reward": r, "score": 100 * r, "won": state.done and r == 1.0,
            "steps": len(actions), "actions": actions}


def baselines(goal_indices: list[int], *, seed: int = 0, env: WebShopEnv | None = None) -> dict:
    """Mean score (reward × 100), success and steps on these goals of the oracle (this expert), a random
    policy, the first-result rule and the lexical floor as a policy (15 steps)."""
    env = env or WebShopEnv()
    rng = random.Random(seed)
    out = {}
    for name, run in (("oracle", lambda g: run_expert(env, g)), ("random", lambda g: run_random(env, g, rng)),
                      ("first_result", lambda g: run_first_result(env, g))):
        eps = [run(g) for g in goal_indices]
        n = max(1, len(eps))
        out[name] = {"episodes": len(eps), "mean_score": sum(e["score"] for e in eps) / n,
                     "success_rate": sum(e["won"] for e in eps) / n, "mean_steps": sum(e["steps"] for e in eps) / n}
    from fastrank.lexical_floor import FloorRanker
    from fastrank.rollout import run_episodes

    eps = run_episodes(lambda: env, list(goal_indices), FloorRanker(), max_steps=15, batch_size=1,
                       close_envs=False).episodes
    n = max(1, len(eps))
    out["lexical_floor_policy"] = {"episodes": len(eps), "mean_score": sum(e["score"] for e in eps) / n,
                                   "success_rate": sum(e["won"] for e in eps) / n,
                                   "mean_steps": sum(e["steps"] for e in eps) / n}
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from fastrank.envs.webshop import list_test_goals

    ap = argparse.ArgumentParser(description="Oracle and random-policy scores on WebShop's test goals.")
    ap.add_argument("--goals", type=int, default=500, help="the first N test goals (SPEC §10: 0..499)")
    ap.add_argument("--seed", type=int, default=0, help="the random policy's seed")
    args = ap.parse_args(argv)
    print(json.dumps(baselines(list_test_goals(args.goals), seed=args.seed), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
