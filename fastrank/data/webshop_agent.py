"""Behaviour-cloning sets for a WebShop agent: a reward teacher's episodes, with the episode so far as history.

The click states of `fastrank.data.webshop_clicks` follow the goal's *target* product, paging until
it shows up: right for the paper's per-state metric, but a policy cannot learn "page on, the target
is on page 3" from text. An agent is scored by the reward of what it buys, so the teacher here
chooses by that reward (privileged, like ALFWorld's handcoded expert): on a results page the product
of this page whose purchase with the goal's options would score highest (the target when it is
there), on its item page each goal option the product offers and not chosen yet, then `buy now`;
from any other product or a sub page `< prev`. It never pages, so its choices are ones the page
itself can justify.

`readable_teacher_action` is the one a policy can copy: it reads only the pages (the search engine's order,
listed prices against the goal's budget, and on an item page whether the goal's options are offered), and it
comes within 8 points of the reward teacher's success on the test goals.

Recovery states come from detours that are taken but not recorded: with probability
`detour_prob` a results page first opens another product (the teacher's `< prev` from there is
recorded, and the product comes back marked ``taken 1x``), and an item page first opens a sub
page. Every recorded state carries the episode's (action, observation) turns, which the
``history`` feature mode reads.

Only leak-free goals are used (SPEC §10): goals whose target is the target of no test goal, and
no recorded state shows the item page of a test product (`check_leak_free` asserts it).
"""
from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass, field

from fastrank.data.negatives import ActionPool, fill_sampled, normalize_action
from fastrank.data.record import CandidateSet

ENV = "webshop"


def achievable_reward(env, goal, asin: str) -> float:
    """The reward of buying `asin` with every goal option value it offers."""
    from fastrank.envs.webshop_reward import reward

    product = env.catalog.by_asin[asin]
    offered = {v: name for name, values in product.options for v in values}
    options = {offered[v]: v for _, v in goal.goal_options if v in offered}
    return reward(goal, env.target(goal), product, options)[0]


def page_products(env, state) -> list[str]:
    """The ASINs the current results page shows, in rank order."""
    return [c.upper() for c in state.info["clickables"] if c.upper() in env.catalog.by_asin]


def teacher_action(env, state, *, exclude: frozenset[str] = frozenset()) -> str | None:
    """The reward teacher's next action on the current page (None: nothing worth doing, e.g. no results).

    `exclude`: products the teacher must not open (the test targets, when building training data)."""
    from fastrank.envs.webshop_expert import option_or_buy

    s = env.session
    page = state.info["page"]
    if page == "index":
        return state.admissible[0] if state.admissible else None
    if page == "item_sub_page":
        return "click[< prev]"
    if page == "search_results":
        shown = [a for a in page_products(env, state) if a not in exclude]
        if not shown:
            return None
        best = max(shown, key=lambda a: (achievable_reward(env, s.goal, a), -shown.index(a)))
        return f"click[{best.lower()}]"
    if page == "item_page":
        from fastrank.envs.webshop import RESULTS_PER_PAGE

        lo = (s.results_page - 1) * RESULTS_PER_PAGE
        shown = [a for a, _ in s.hits[lo:lo + RESULTS_PER_PAGE] if a not in exclude]
        mine = achievable_reward(env, s.goal, s.asin)
        if shown and mine < max(achievable_reward(env, s.goal, a) for a in shown) - 1e-9:
            return "click[< prev]"
        return option_or_buy(env, state)
    return None  # done


MAX_OPENED = 4  # the readable teacher opens at most this many products (3 returns): 12 of the 15 evaluation steps


def readable_teacher_action(env, state, history, *, exclude: frozenset[str] = frozenset()) -> str | None:
    """A teacher that decides only on what the pages show, so a policy can imitate every choice it makes: on a
    results page the first product in the search engine's order that the episode has not opened and whose listed
    price is under the goal's budget (else the first not opened); on its item page `< prev` when the page lacks
    one of the goal's options or is over budget and another product is left to try (at most `MAX_OPENED`
    opened), else each goal option not chosen yet, then `buy now`. On the 500 test goals it scores 91.6 / 81.8 %
    (the first result: 78.9 / 57.2 %; the reward teacher, which reads the hidden reward: 96.6 / 89.6 %).
    `history`: the episode's (action, observation) turns. None when nothing is worth doing, or when the product
    it would open is in `exclude` (a test product, when building training data: the episode stops there)."""
    from fastrank.data.page_context import (budget, item_price_ok, missing_options, opened_products, page_listing,
                                            within_budget)
    from fastrank.envs.webshop_expert import option_or_buy

    page, goal = state.info["page"], state.goal
    if page == "index":
        return state.admissible[0] if state.admissible else None
    if page == "item_sub_page":
        return "click[< prev]"
    opened, limit = opened_products(history), budget(goal)
    if page == "search_results":
        listing = page_listing(state.observation)
        fresh = [a for a in listing if a not in opened]
        ok = [a for a in fresh if limit is None or within_budget(listing[a][2], limit) is not False]
        pick = (ok or fresh or list(listing) or [None])[0]
        if pick is None or pick.upper() in exclude:
            return None
        return f"click[{pick}]"
    if page == "item_page":
        missing = missing_options(goal, state.observation) or []
        results = next((o for _, o in reversed(history) if page_listing(o)), "")  # the page it came from
        left = [a for a in page_listing(results) if a not in opened]
        if (missing or item_price_ok(goal, state.observation) is False) and left and len(opened) < MAX_OPENED:
            return "click[< prev]"
        return option_or_buy(env, state)
    return None  # done


@dataclass
class Stats:
    episodes: int = 0
    sets: int = 0
    rewards: list[float] = field(default_factory=list)
    by_page: Counter = field(default_factory=Counter)
    detours: int = 0
    no_action: int = 0

    def as_dict(self) -> dict:
        n = max(1, len(self.rewards))
        return {"episodes": self.episodes, "sets": self.sets, "detours": self.detours,
                "teacher_mean_score": round(100 * sum(self.rewards) / n, 2),
                "teacher_success": round(sum(r == 1.0 for r in self.rewards) / n, 4),
                "sets_by_page": dict(sorted(self.by_page.items())), "episodes_without_action": self.no_action}


def leak_free_goals(env) -> list[int]:
    """Goals usable for training: not a test goal, and their target is the target of no test goal."""
    from fastrank.envs.webshop_catalog import TEST_GOALS

    test_targets = test_products(env)
    return [g.index for g in env.catalog.goals if g.index not in TEST_GOALS and g.asin not in test_targets]


def test_products(env) -> frozenset[str]:
    from fastrank.envs.webshop_catalog import TEST_GOALS

    return frozenset(env.catalog.goals[i].asin for i in TEST_GOALS)


TEACHERS = ("reward", "readable")


def teacher_sets(goal_indices, *, runs_per_goal: int = 2, detour_prob: float = 0.3, max_steps: int = 15,
                 seed: int = 0, env=None, teacher: str = "reward") -> tuple[list[CandidateSet], Stats]:
    """Play the teacher (`teacher_action` or `readable_teacher_action`) `runs_per_goal` times per goal (run 0
    without detours); one set per recorded state with two or more actions: the teacher's action first, then every
    other action the page offers."""
    from fastrank.envs.webshop import WebShopEnv

    if teacher not in TEACHERS:
        raise ValueError(f"unknown WebShop teacher {teacher!r}; expected one of {TEACHERS}")

    env = env or WebShopEnv()
    exclude = test_products(env)
    rng = random.Random(seed)
    sets, stats, seen = [], Stats(), set()
    for gi in goal_indices:
        for run in range(runs_per_goal):
            p = 0.0 if run == 0 else detour_prob
            state, turns, steps = env.reset(gi), [], 0
            stats.episodes += 1
            while not state.done and steps < max_steps:
                action = (teacher_action(env, state, exclude=exclude) if teacher == "reward"
                          else readable_teacher_action(env, state, turns, exclude=exclude))
                if action is None:  # nothing to do here (the readable teacher: its next product is a test product)
                    stats.no_action += 1
                    break  # not played out: no reward recorded
                page = state.info["page"]
                detour = None
                if page == "search_results" and rng.random() < p:
                    others = [a for a in page_products(env, state) if a not in exclude
                              and f"click[{a.lower()}]" != action and f"click[{a.lower()}]" not in {t for t, _ in turns}]
                    detour = f"click[{rng.choice(others).lower()}]" if others else None
                elif page == "item_page" and action != "click[< prev]" and rng.random() < p / 2:
                    detour = f"click[{rng.choice(['description', 'features', 'reviews'])}]"
                if detour is not None:  # taken, not recorded: the state after it is the one to recover from
                    stats.detours += 1
                    state = env.step(detour)
                    turns.append((detour, state.observation))
                    steps += 1
                    continue
                key = (gi, state.observation, action, tuple(t for t, _ in turns))
                if len(state.admissible) > 1 and key not in seen:  # a run without detours repeats run 0
                    seen.add(key)
                    check_leak_free(gi, state, exclude)
                    others = [a for a in dict.fromkeys(state.admissible) if a != action]
                    sets.append(CandidateSet(
                        env=ENV, episode_id=f"{ENV}/teacher/{gi}/{run}", step=steps, task_type=page,
                        goal=state.goal, observation=state.observation, candidates=[action] + others,
                        expert_index=0, sources=["expert"] + ["admissible"] * len(others),
                        history=[list(t) for t in turns]))
                    stats.by_page[page] += 1
                state = env.step(action)
                turns.append((action, state.observation))
                steps += 1
            else:
                stats.rewards.append(state.reward if state.done else 0.0)
    stats.sets = len(sets)
    return sets, stats


def with_sampled_distractors(sets: list[CandidateSet], k: int, seed: int = 0) -> list[CandidateSet]:
    """Each set plus up to `k` other states' teacher actions that its page does not offer, drawn as the paper's
    `sampled` distractors are (`negatives.fill_sampled`: same page type from other episodes, other page types,
    any), source "sampled". A model cloned on page clickables alone never sees an action from another page,
    and on the `sampled` click eval it barely beat the lexical floor (+0.340 vs +0.328), which wins there by
    noticing that the distractor's words are not on the page."""
    if k <= 0:
        return list(sets)
    pool = ActionPool.from_steps(sets)  # a CandidateSet carries what a Step does: env, task type, episode, expert action
    out = []
    for i, cs in enumerate(sets):
        extra: list[str] = []
        fill_sampled(cs, pool, random.Random(f"{seed}/{i}"), k, extra, [], {normalize_action(a) for a in cs.candidates})
        out.append(dataclasses.replace(cs, candidates=list(cs.candidates) + extra,
                                       sources=list(cs.sources) + ["sampled"] * len(extra)))
    return out


def check_leak_free(goal_index: int, state, test_targets: frozenset[str]) -> None:
    """Raise if a training state is on a test goal or shows the item page of a test product
    (`test_targets`: `test_products(env)`)."""
    from fastrank.envs.webshop_catalog import TEST_GOALS

    if goal_index in TEST_GOALS:
        raise AssertionError(f"goal {goal_index}: a test goal in the training sets")
    if state.info["asin"] in test_targets and state.info["page"] in ("item_page", "item_sub_page"):
        raise AssertionError(f"goal {goal_index}: a training state on test product {state.info['asin']}")
