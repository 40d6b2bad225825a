"""WebShop expert, click-state builder and its leak-free splits; the bundled click states."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

pytest.importorskip("rapidfuzz", reason="the WebShop environment needs the `webshop` extra")
pytest.importorskip("nltk", reason="the WebShop environment needs the `webshop` extra")

from fastrank.data.bundle import load_bundled  # noqa: E402
from fastrank.data.negatives import make_candidate_sets  # noqa: E402
from fastrank.data.webshop_clicks import build_click_steps, check_split, short_query  # noqa: E402
from fastrank.envs.webshop import WebShopEnv  # noqa: E402
from fastrank.envs.webshop_catalog import TEST_GOALS  # noqa: E402
from fastrank.envs.webshop_expert import run_expert, run_random  # noqa: E402


@pytest.fixture(scope="module")
def env() -> WebShopEnv:
    return WebShopEnv()


@pytest.fixture(scope="module")
def test_targets(env) -> frozenset[str]:
    return frozenset(env.catalog.goals[i].asin for i in TEST_GOALS)


def test_leak_free_goal_pool_is_745_goals_over_269_products(env, test_targets):
    pool = [g for g in env.catalog.goals if g.index not in TEST_GOALS and g.asin not in test_targets]
    assert (len(pool), len({g.asin for g in pool})) == (745, 269)


def test_expert_buys_the_target_with_the_goal_options(env):
    for gi in (0, 1, 2, 3):
        ep = run_expert(env, gi)
        assert ep["found"] and env.session.reward_info["purchased_asin"] == env.catalog.goals[gi].asin
        assert env.session.reward_info["purchased_options"] == dict(env.catalog.goals[gi].goal_options)
        assert ep["actions"][0] == f"search[{env.catalog.goals[gi].instruction_text}]"
        assert ep["actions"][-1] == "click[buy now]"


def test_oracle_and_random_on_the_first_test_goals(env):
    oracle = [run_expert(env, gi) for gi in range(40)]
    rng = random.Random(0)
    rand = [run_random(env, gi, rng) for gi in range(40)]
    mean = lambda eps: sum(e["score"] for e in eps) / len(eps)  # noqa: E731
    assert mean(oracle) > 90 and mean(rand) < 60 and mean(oracle) > mean(rand) + 30
    assert all(e["steps"] >= 1 for e in rand)


def test_click_states_are_real_pages_with_the_expert_action_admissible(env, test_targets):
    goals = [0, 1] + [g.index for g in env.catalog.goals if g.index >= 500 and g.asin not in test_targets][:6]
    steps, rep = build_click_steps(goals, env=env)
    assert rep["states"] == len(steps) > 0
    assert {s.meta["split"] for s in steps if s.meta["goal_index"] < 500} == {"eval"}
    assert {s.meta["split"] for s in steps if s.meta["goal_index"] >= 500} <= {"train", "test"}
    for s in steps:
        assert s.expert_action in s.admissible, (s.episode_id, s.expert_action)
        assert s.task_type in ("results", "item", "item_detail")
        assert "Instruction:" not in s.observation  # the goal travels in `goal`, not twice
    runs = {s.meta["run"] for s in steps}
    assert {"instruction", "detour"} <= runs
    assert any(s.expert_action == "click[< prev]" and s.meta["run"] == "detour" for s in steps)
    sets, rep = make_candidate_sets(steps, mode="hard", seed=0)
    for st, cs in zip(steps, sets):  # hard negatives are the page's own clickables (topped up only when short)
        assert all(c in st.admissible for c, src in zip(cs.candidates, cs.sources) if src == "admissible")
    assert rep["sources"]["admissible"] > 3 * sum(v for k, v in rep["sources"].items() if k not in ("admissible", "expert"))


def test_check_split_rejects_a_test_product_in_training(env, test_targets):
    goals = [g.index for g in env.catalog.goals if g.index >= 500 and g.asin not in test_targets][:2]
    steps, _ = build_click_steps(goals, env=env)
    leaked = replace(steps[0], meta={**steps[0].meta, "page_asin": sorted(test_targets)[0]})
    with pytest.raises(AssertionError, match="test product"):
        check_split([leaked] + steps[1:], test_targets)
    wrong_split = replace(steps[0], meta={**steps[0].meta, "split": "eval"})
    with pytest.raises(AssertionError, match="eval must be exactly the test goals"):
        check_split([wrong_split], test_targets)


def test_short_query():
    assert short_query("Find me x with a b, and price lower than 30.00 dollars") == "Find me x"
    assert short_query("Find me x, and price lower than 30.00 dollars") == "Find me x"


def test_bundled_click_states_respect_the_splits(env, test_targets):
    """The shipped dataset: >= 3,000 training click states, none from a test goal or test product."""
    by_split = {split: [cs for cs in load_bundled("webshop", split, "hard") if "/synthetic/" in cs.episode_id]
                for split in ("train", "test", "eval")}
    assert len(by_split["train"]) >= 3000
    for split, sets in by_split.items():
        for cs in sets:
            gi = int(cs.episode_id.rsplit("/", 1)[1])
            goal = env.catalog.goals[gi]
            assert cs.goal == goal.instruction_text
            if split == "eval":
                assert gi in TEST_GOALS
            else:
                assert gi not in TEST_GOALS and goal.asin not in test_targets, (split, gi)
    train_products = {env.catalog.goals[int(cs.episode_id.rsplit("/", 1)[1])].asin for cs in by_split["train"]}
    dev_products = {env.catalog.goals[int(cs.episode_id.rsplit("/", 1)[1])].asin for cs in by_split["test"]}
    assert not train_products & dev_products


def test_agent_tasks_play_in_the_rollout():
    """The policy-facing API: test goals + env factory, played by a scripted ranker through fastrank.rollout."""
    import numpy as np

    from fastrank.envs.webshop import agent_tasks
    from fastrank.rollout import run_episodes

    class FirstProductThenBuy:
        def score(self, goal, observation, candidates):
            def s(a: str) -> float:
                arg = a[a.index("[") + 1:-1]
                return 3.0 if arg == "buy now" else 2.0 if a.startswith("search[") else \
                    1.0 if len(arg) == 10 and arg.startswith("b0") else 0.0
            return np.array([s(a) - 1e-3 * i for i, a in enumerate(candidates)])

    make_env, tasks = agent_tasks(4)
    assert tasks == [0, 1, 2, 3]
    eps = run_episodes(make_env, tasks, FirstProductThenBuy(), max_steps=10, batch_size=2).episodes
    for ep in eps:
        assert [t["action"].split("[")[0] for t in ep["trajectory"]] == ["search", "click", "click"]
        assert ep["steps"] == 3 and 0.0 <= ep["score"] <= 100.0 and ep["task_type"]
    assert any(ep["score"] > 0 for ep in eps)


def test_agent_eval_webshop_branch():
    """`fastrank agent-eval --env webshop --goals N`: the CLI's task list and its evaluation loop."""
    import argparse

    import numpy as np

    from fastrank.agent_eval import TASKS, add_agent_eval_args, evaluate_agent

    p = argparse.ArgumentParser()
    add_agent_eval_args(p)
    args = p.parse_args(["--env", "webshop", "--checkpoint", "unused", "--goals", "3"])
    make_env, tasks, candidates = TASKS["webshop"](args)
    assert tasks == [0, 1, 2] and candidates is None

    class BuyFirst:  # search, then the first product, then buy now
        def score(self, goal, observation, candidates, **_):
            return np.array([2.0 if a == "click[buy now]" else 1.0 if a[6:8] == "b0" or a.startswith("search[")
                             else 0.0 for a in candidates])

    res = evaluate_agent(BuyFirst(), "webshop", make_env, tasks, max_steps=10, batch_size=2)
    assert res["summary"]["episodes"] == 3 and all(e["steps"] == 3 for e in res["episodes"])
    assert res["summary"]["mean_score"] == sum(e["score"] for e in res["episodes"]) / 3
