"""WebShop click states: the expert's episodes in our WebShop environment, as `Step`s.

Each state is a real page of the 1000-product WebShop (the environment passes conformance against
the official one) with the page's clickables as `admissible`, so `hard` candidate sets are what an
agent really chooses among (the ten products of a results page, paging, the option values, buy
now) and `sampled` ones draw other states' expert actions, as the paper does. The search-query
states of `fastrank.data.webshop` stay a separate source.

Per goal, four expert runs (states deduplicated on observation + action within the goal):
- `instruction`: search the full instruction, page to the target, options, buy (the oracle path);
- `query`: search the catalog's short query for the product (more paging: `next >` states);
- `short`: search the instruction's head, before its first " with " (other result pages);
- `detour`: after the instruction search, open the best-ranked wrong product first, so the expert's
  `< prev` from a wrong product page is recorded (the state an agent recovers from).
Goals whose target is not in the top 50 of a search contribute nothing for that run (counted).

Splits (SPEC §10): eval = the test goals [0, 500); train and test (our dev split) only from the
goals whose target is the target of no test goal (745 goals, 269 products), divided by product so
dev products are unseen in training. No train/dev state shows a test product's item page (the
detour never opens one); `check_split` asserts both.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Iterable

from fastrank.data.record import Step
from fastrank.data.webshop import page_kind

ENV = "webshop"
RUNS = ("instruction", "query", "short", "detour")


def _product_split(asin: str, test_frac: float, seed: int) -> str:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{asin}".encode()).digest()[:8], "little") / 2 ** 64
    return "test" if h < test_frac else "train"


def short_query(instruction: str) -> str:
    """The instruction without its attribute/option/price clauses ("Find me X with ..." -> "Find me X")."""
    return instruction.split(" with ")[0].split(", and price lower than")[0].strip()


def _episode_states(env, goal_index: int, run: str, test_targets: frozenset[str], max_steps: int = 20):
    """(state, expert action) pairs of one expert run; None if the target was not reachable."""
    from fastrank.envs.webshop_expert import expert_action

    state = env.reset(goal_index)
    goal = env.session.goal
    query = {"query": env.target(goal).query, "short": short_query(goal.instruction_text)}.get(run)
    detoured = run != "detour"
    out = []
    for _ in range(max_steps):
        if state.done:
            return out
        action = expert_action(env, state, query=query)
        if action is None:
            return None
        if not detoured and state.info["page"] == "search_results":
            wrong = [c for c in state.info["clickables"]
                     if c.upper() in env.catalog.by_asin and c.upper() != goal.asin and c.upper() not in test_targets]
            detoured = True
            if wrong:  # not an expert move: taken, not recorded
                state = env.step(f"click[{wrong[0]}]")
                continue
        out.append((state, action))
        state = env.step(action)
    return None


def build_click_steps(goal_indices: Iterable[int] | None = None, *, test_frac: float = 0.3, seed: int = 42,
                      env=None) -> tuple[list[Step], dict]:
    """Click Steps for the test goals (split "eval") and the leak-free training goals (train/test)."""
    from fastrank.envs.webshop import WebShopEnv
    from fastrank.envs.webshop_catalog import TEST_GOALS

    env = env or WebShopEnv()
    goals = env.catalog.goals
    test_targets = frozenset(goals[i].asin for i in TEST_GOALS)
    if goal_indices is None:
        goal_indices = [g.index for g in goals if g.index in TEST_GOALS or g.asin not in test_targets]
    steps: list[Step] = []
    report = Counter()
    for gi in goal_indices:
        goal = goals[gi]
        if gi in TEST_GOALS:
            split = "eval"
        elif goal.asin in test_targets:
            report["goals_left_out_target_in_test"] += 1
            continue
        else:
            split = _product_split(goal.asin, test_frac, seed)
        seen: set[tuple[str, str]] = set()
        for run in RUNS:
            pairs = _episode_states(env, gi, run, test_targets)
            if pairs is None:
                report[f"{run}_runs_target_not_reached"] += 1
                continue
            report[f"{run}_runs"] += 1
            for state, action in pairs:
                if state.info["has_search_bar"]:
                    continue  # the search page: the query states are their own source
                key = (state.observation, action)
                if key in seen:
                    report["duplicate_states_within_goal"] += 1
                    continue
                seen.add(key)
                steps.append(Step(
                    env=ENV, episode_id=f"{ENV}/synthetic/{gi}", step=len(seen) - 1,
                    task_type=page_kind(state.admissible, action), goal=goal.instruction_text,
                    observation=state.observation, expert_action=action, admissible=list(state.admissible),
                    meta={"source": "webshop_env_expert", "run": run, "goal_index": gi, "split": split,
                          "target_asin": goal.asin, "page_asin": state.info["asin"]}))
    check_split(steps, test_targets)
    per_split = Counter(s.meta["split"] for s in steps)
    rep = {"goals": len({s.meta["goal_index"] for s in steps}), "states": len(steps),
           "states_per_split": dict(sorted(per_split.items())),
           "task_types": dict(sorted(Counter(s.task_type for s in steps).items())),
           "runs": dict(sorted(report.items())),
           "train_goals": len({s.meta["goal_index"] for s in steps if s.meta["split"] != "eval"}),
           "train_products": len({s.meta["target_asin"] for s in steps if s.meta["split"] != "eval"})}
    return steps, rep


def check_split(steps: list[Step], test_targets: frozenset[str]) -> None:
    """Raise unless eval = test goals only and no train/test state involves a test product."""
    from fastrank.envs.webshop_catalog import TEST_GOALS

    for s in steps:
        gi, split = s.meta["goal_index"], s.meta["split"]
        if (gi in TEST_GOALS) != (split == "eval"):
            raise AssertionError(f"goal {gi} is in split {split!r}: eval must be exactly the test goals")
        if split != "eval" and (s.meta["target_asin"] in test_targets or s.meta["page_asin"] in test_targets):
            raise AssertionError(f"train/dev state of goal {gi} involves test product "
                                 f"{s.meta['target_asin'] if s.meta['target_asin'] in test_targets else s.meta['page_asin']}")
    by_product: dict[str, set[str]] = {}
    for s in steps:
        if s.meta["split"] != "eval":
            by_product.setdefault(s.meta["target_asin"], set()).add(s.meta["split"])
    mixed = [a for a, sp in by_product.items() if len(sp) > 1]
    if mixed:
        raise AssertionError(f"products in both train and dev: {mixed[:3]}")
