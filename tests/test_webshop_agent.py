"""The WebShop agent: page listings beside product ids, the reward teacher, its sets, and the recipe end to end."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fastrank.data.features import Featurizer
from fastrank.data.page_context import budget, listing_text, page_listing, within_budget

pytest.importorskip("rapidfuzz")  # the `webshop` extra (the reward)

ROOT = Path(__file__).resolve().parents[1]
PAGE = ("Back to Search [SEP] Page 1 (Total results: 50) [SEP] Next > [SEP] B07Q87P8DQ [SEP] Permo Vintage "
        "Chandelier [SEP] $94.99 [SEP] B01I5B1Q1M [SEP] Walker Edison Bar Stool, Black [SEP] $44.99 to $33.98")


@pytest.fixture(scope="module")
def env():
    from fastrank.envs.webshop import WebShopEnv

    return WebShopEnv()


def test_page_listing_pairs_each_id_with_its_position_title_and_price():
    got = page_listing(PAGE)
    assert got == {"b07q87p8dq": (1, "Permo Vintage Chandelier", "$94.99"),
                   "b01i5b1q1m": (2, "Walker Edison Bar Stool, Black", "$44.99 to $33.98")}
    assert page_listing("You are in the middle of a room. You see a drawer 1.") == {}  # ALFWorld: untouched
    assert page_listing("color [SEP] black [SEP] white [SEP] Price: $59.99") == {}  # option values are no ids


def test_budget_and_listing_text():
    goal = "Find me bar stools with color: black, and price lower than 90.00 dollars"
    assert budget(goal) == 90.0 and budget("Find me a lamp") is None
    assert within_budget("$44.99 to $33.98", 40.0) is True and within_budget("$94.99", 90.0) is False
    lst = page_listing(PAGE)
    assert listing_text(goal, lst, "click[b01i5b1q1m]") == ("result 2, $44.99 to $33.98, under budget",
                                                            "Walker Edison Bar Stool, Black")
    assert listing_text(goal, lst, "click[B07Q87P8DQ]")[0] == "result 1, $94.99, over budget"
    assert listing_text("Find me a lamp", lst, "click[b07q87p8dq]")[0] == "result 1, $94.99"  # no budget named
    assert listing_text(goal, lst, "click[next >]") == ("", "")


def test_history_featurizer_puts_the_listing_beside_the_id_and_leaves_alfworld_text_alone():
    goal = "Find me bar stools with color: black, and price lower than 90.00 dollars"
    _, acts = Featurizer("history").texts(goal, PAGE, ["click[b01i5b1q1m]", "click[next >]"], [])
    assert acts[0] == ("action: click[b01i5b1q1m] (new; result 2, $44.99 to $33.98, under budget; goal names: "
                       "bar stool black) Walker Edison Bar Stool, Black")
    assert acts[1] == "action: click[next >] (new)"
    sized = "Find me shorts with size: x-large, and price lower than 60.00 dollars"
    _, opts = Featurizer("history").texts(sized, "size [SEP] large [SEP] x-large", ["click[large]", "click[x-large]"], [])
    assert opts == ["action: click[large] (new; goal names: large)",  # shares a word, is not the option asked for
                    "action: click[x-large] (new; goal names: x large; verbatim in goal)"]
    # a button the page does not show (the `sampled` mode's distractors) says so; the page's own do not
    _, off = Featurizer("history").texts(sized, "size [SEP] large [SEP] x-large", ["click[xx-large]", "click[buy now]"], [])
    assert off == ["action: click[xx-large] (new; not on this page; goal names: large)",
                   "action: click[buy now] (new; not on this page)"]
    # v5: a search on a page without the search box is not there either (v2-v4 did not say so)
    results = "Back to Search [SEP] Page 1 (Total results: 50) [SEP] Next > [SEP] B0743JKHBV [SEP] Pillow [SEP] $9.99"
    search_page = "WebShop [SEP] Search"
    for n, obs, marked in ((4, results, False), (5, results, True), (5, search_page, False)):
        _, acts = Featurizer("history", notes=n).texts(sized, obs, ["search[black bar stool]"], [])
        assert ("not on this page" in acts[0]) is marked, (n, obs)
    _, alf = Featurizer("history").texts("put a book on sidetable", "You see a book 3.", ["take book 3 from desk 1"], [])
    assert alf == ["action: take book 3 from desk 1 (new; goal object)"]  # ALFWorld's goals parse into roles


def test_max_action_tokens_is_saved_with_the_model_and_cuts_the_title_not_the_note(tmp_path):
    from transformers import AutoTokenizer, BertConfig

    from fastrank.data.record import CandidateSet
    from fastrank.model import PRESETS, Reranker

    tok = AutoTokenizer.from_pretrained(PRESETS["minilm"])
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256)
    m = Reranker.from_config(cfg, tok, featurizer=Featurizer("history"), max_length=64, layout="shared_prefix",
                             max_action_tokens=48)
    m.save_pretrained(tmp_path / "m")
    back = Reranker.from_pretrained(tmp_path / "m")
    assert back.max_action_tokens == 48
    goal = "Find me bar stools with color: black, and price lower than 90.00 dollars"
    cs = CandidateSet(env="webshop", episode_id="e", step=0, task_type="t", goal=goal, observation=PAGE,
                      candidates=["click[b01i5b1q1m]"], expert_index=0, sources=["expert"], history=[])
    [enc] = back.encode_sets([cs])
    text = tok.decode(enc.cand_ids[0])
    assert len(enc.cand_ids[0]) <= 48 and "goal names : bar stool black ) walker edison bar stool, black" in text
    [short] = back.encode_sets([cs], max_action_tokens=32)  # the old fixed budget cut the note itself
    assert len(short.cand_ids[0]) == 32 and "goal names" not in tok.decode(short.cand_ids[0])
    meta = json.loads((tmp_path / "m" / "fastrank.json").read_text())
    del meta["max_action_tokens"]  # a checkpoint from before the field: the old budget
    (tmp_path / "m" / "fastrank.json").write_text(json.dumps(meta))
    assert Reranker.from_pretrained(tmp_path / "m").max_action_tokens == 32


def test_teacher_picks_the_best_reward_product_of_the_page_and_buys_with_the_goal_options(env):
    from fastrank.data.webshop_agent import achievable_reward, page_products, teacher_action

    state = env.reset(3)
    state = env.step(teacher_action(env, state))  # the instruction search
    assert state.info["page"] == "search_results"
    shown = page_products(env, state)
    pick = teacher_action(env, state)
    best = max(achievable_reward(env, env.session.goal, a) for a in shown)
    assert achievable_reward(env, env.session.goal, pick[len("click["):-1].upper()) == best
    worse = [a for a in shown if achievable_reward(env, env.session.goal, a) < best]
    if worse:  # a worse product's page: the teacher goes back
        assert teacher_action(env, env.step(f"click[{worse[0].lower()}]")) == "click[< prev]"
        state = env.step("click[< prev]")
    state = env.step(pick)
    for _ in range(8):
        a = teacher_action(env, state)
        state = env.step(a)
        if state.done:
            break
    assert state.done and a == "click[buy now]"
    assert state.reward == pytest.approx(best)  # what it bought scores what the page promised


def test_teacher_sets_label_first_with_history_and_no_test_goal(env):
    from fastrank.data.webshop_agent import check_leak_free, leak_free_goals, teacher_sets, test_products

    goals = leak_free_goals(env)
    assert len(goals) == 745 and min(goals) >= 500
    assert not {env.catalog.goals[g].asin for g in goals} & test_products(env)
    sets, stats = teacher_sets(goals[:30], detour_prob=0.5, seed=1, env=env)
    assert stats.sets == len(sets) > 60 and stats.detours > 0
    for cs in sets:
        assert cs.expert_index == 0 and len(set(cs.candidates)) == len(cs.candidates) > 1
        assert cs.history and cs.history[0][0].startswith("search[")  # every page after the search
    recoveries = [cs for cs in sets if cs.candidates[0] == "click[< prev]" and cs.task_type == "item_page"]
    assert recoveries and all(cs.history[-1][0] not in ("click[< prev]",) for cs in recoveries)
    keys = [(cs.episode_id.split("/")[2], cs.observation, cs.candidates[0], tuple(a for a, _ in cs.history))
            for cs in sets]
    assert len(keys) == len(set(keys))  # run 1 repeats run 0 where it took no detour: kept once
    state = env.reset(0)
    with pytest.raises(AssertionError, match="test goal"):
        check_leak_free(0, state, test_products(env))


ITEM = ("Back to Search [SEP] < Prev [SEP] size [SEP] 6 [SEP] 7 [SEP] 9 [SEP] color [SEP] navy [SEP] black multi [SEP] "
        "Clarks Womens Suede Slipper [SEP] Price: $74.95 [SEP] Rating: N.A. [SEP] Description [SEP] Features [SEP] "
        "Reviews [SEP] Buy Now")
SLIPPERS = "Find me women's slippers with faux fur with color: black multi, and size: 8, and price lower than 70.00 dollars"


def test_goal_options_parse_every_goal_as_the_catalog_states_them(env):
    from fastrank.data.page_context import goal_options

    assert goal_options(SLIPPERS) == [("color", "black multi"), ("size", "8")]  # "faux fur with color": the name
    assert goal_options("Find me a lamp, and price lower than 30.00 dollars") == []
    wrong = [g.index for g in env.catalog.goals if goal_options(g.instruction_text)
             != [(n.lower(), v.lower()) for n, v in g.goal_options]]
    assert len(env.catalog.goals) == 6910 and wrong == []


def test_notes_v7_say_on_prev_and_buy_which_goal_options_the_item_page_lacks():
    from fastrank.data.page_context import item_note, missing_options

    assert missing_options(SLIPPERS, ITEM) == ["8"] and missing_options(SLIPPERS, PAGE) is None
    history = [("search[x]", PAGE), ("click[b01i5b1q1m]", ITEM)]
    assert item_note(SLIPPERS, ITEM, "click[< prev]", history) == (
        "; goal options not offered: 8; over budget; products opened: 1")
    assert item_note(SLIPPERS, ITEM, "click[buy now]", history) == "; goal options not offered: 8; over budget"
    assert item_note(SLIPPERS, ITEM, "click[navy]", history) == ""
    cheap9 = SLIPPERS.replace("size: 8", "size: 9").replace("70.00", "80.00")
    assert item_note(cheap9, ITEM, "click[buy now]", history) == "; every goal option offered"
    v7 = Featurizer("history").texts(SLIPPERS, ITEM, ["click[< prev]"], history)[1]
    v6 = Featurizer("history", notes=6).texts(SLIPPERS, ITEM, ["click[< prev]"], history)[1]
    assert "goal options not offered: 8" in v7[0] and "goal options" not in v6[0]  # v6 checkpoints read v6 text


def test_readable_teacher_decides_on_what_the_pages_show(env):
    """Rank order, the listed budget, then the item page's goal options: it goes back from a product lacking one,
    and it beats the first-result rule (which buys the top hit) on the same goals."""
    from fastrank.data.page_context import budget, missing_options, page_listing, within_budget
    from fastrank.data.webshop_agent import readable_teacher_action
    from fastrank.envs.webshop_expert import baselines

    goals, rewards, backs = list(range(40)), [], 0
    for g in goals:
        state, turns = env.reset(g), []
        while not state.done and len(turns) < 15:
            a = readable_teacher_action(env, state, turns)
            if state.info["page"] == "search_results":
                listing, opened = page_listing(state.observation), {t[6:-1] for t, _ in turns}
                fresh = [p for p in listing if p not in opened]
                first_ok = next((p for p in fresh if within_budget(listing[p][2], budget(state.goal)) is not False), fresh[0])
                assert a == f"click[{first_ok}]"  # every result before it is opened already or over budget
            if state.info["page"] == "item_page" and a == "click[< prev]":
                backs += 1
                assert missing_options(state.goal, state.observation) or "over budget" in Featurizer(
                    "history").texts(state.goal, state.observation, [a], turns)[1][0]
            state = env.step(a)
            turns.append((a, state.observation))
        rewards.append(state.reward if state.done else 0.0)
    first = baselines(goals, env=env)["first_result"]
    assert backs > 0 and sum(r == 1.0 for r in rewards) / len(goals) > first["success_rate"] + 0.1


def test_readable_teacher_sets_stop_before_a_test_product(env):
    from fastrank.data.webshop_agent import leak_free_goals, teacher_sets

    sets, stats = teacher_sets(leak_free_goals(env)[:40], seed=0, env=env, teacher="readable")
    assert stats.sets == len(sets) > 60 and stats.no_action > 0  # episodes cut where a test product came next
    assert len(stats.rewards) == stats.episodes - stats.no_action
    assert any(cs.candidates[0] == "click[< prev]" and cs.task_type == "item_page" for cs in sets)
    with pytest.raises(ValueError, match="teacher"):
        teacher_sets([], env=env, teacher="oracle")


def test_sampled_distractors_come_from_other_episodes_and_are_not_on_the_page(env):
    from fastrank.data.webshop_agent import leak_free_goals, teacher_sets, with_sampled_distractors

    sets, _ = teacher_sets(leak_free_goals(env)[:12], seed=3, env=env)
    mixed = with_sampled_distractors(sets, 4, seed=0)
    assert with_sampled_distractors(sets, 4, seed=0) == mixed  # seeded
    assert with_sampled_distractors(sets, 0) == sets
    teacher = {cs.candidates[0]: cs.episode_id for cs in sets}
    added = 0
    for before, after in zip(sets, mixed):
        n = len(before.candidates)
        assert after.candidates[:n] == before.candidates and after.expert_index == before.expert_index
        extra = after.candidates[n:]
        added += len(extra)
        assert len(extra) <= 4 and after.sources[n:] == ["sampled"] * len(extra)
        assert len(set(after.candidates)) == len(after.candidates)  # never an action the page offers
        assert all(a in teacher for a in extra)  # other states' teacher actions
    assert added > 3 * len(sets)


def test_recipe_end_to_end(tmp_path):
    """Teacher data, a few BC steps of a tiny encoder, the agent on 4 test goals, references, click net gain."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fastrank.entry import call
    from fastrank.model import PRESETS

    tok = AutoTokenizer.from_pretrained(PRESETS["minilm"])
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    spec = importlib.util.spec_from_file_location("agent_webshop", ROOT / "recipes" / "agent_webshop.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    args = [f"model={tmp_path / 'tiny'}", "max_length=96", "max_train_sets=16", "final_eval_games=4", "max_steps=6",
            "batch_size=2", "lr=1e-3", "max_tokens=4096", f"output_dir={tmp_path / 'run'}"]
    assert call(recipe.cli, args) == 0  # as `accelerate launch recipes/agent_webshop.py k=v ...` runs it
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["trained_sets"] == 16 and res["train"]["steps"] >= 1
    assert res["eval"]["episodes"] == 4 and set(res["reference"]) >= {"oracle", "reward_teacher", "readable_teacher", "first_result"}
    assert res["click_states"]["hard"]["states"] == recipe.CLICK_EVAL_SETS
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| **this model** |" in report and "| reward teacher |" in report and "model − floor" in report
    meta = json.loads((tmp_path / "run" / "model" / "fastrank.json").read_text())
    assert meta["layout"] == "shared_prefix" and meta["featurizer"]["mode"] == "history"
    assert len((tmp_path / "run" / "agent_eval_webshop.jsonl").read_text().splitlines()) == 4
