"""A WebShop-compatible text environment over the real 1000-product catalog (text observation mode).

Written from `shared/data/webshop/conformance/SPEC.md` and tested against the recordings of the
official environment (`tests/test_webshop_env.py` replays all 930 transcripts): same page texts,
same clickables, same rewards. Pages: start (search box), results (10 a page, `next >` / `< prev`),
item (options, description / features / reviews sub pages, `buy now`), done.

    env = WebShopEnv()
    s = env.reset(0)                          # goal index (0..6909; test goals are 0..499)
    s = env.step("search[" + s.goal + "]")    # s.info["clickables"]: the page's buttons, ASINs, options
    s = env.step("click[b0743jkhbv]")

`EnvState.observation` is the page without the instruction segments (the goal, in `EnvState.goal`);
`info["page_text"]` is the page text exactly as the reference shows it. `EnvState.admissible` is what
a policy can choose from: `click[x]` for every clickable of the page,
and on the start page the one search the policy is given (`search[<instruction>]` by default;
`search_query=` changes it). `search[...]` with any text is still accepted on every page, as in the
reference (the reference's hidden query prefixes `<r>` / `<c>` / `<q>` / `<a>`, SPEC §6, are plain text
here). `info` carries `page`, `has_search_bar`, `clickables`, the session (`asin`, `options`,
`results_page`, `query`), the last search's hits, and after a purchase the reward breakdown and
`score` = reward × 100.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

from fastrank.envs.base import EnvState
from fastrank.envs.webshop_catalog import TEST_GOALS, Catalog, Goal, Product, load_catalog
from fastrank.envs.webshop_reward import reward as purchase_reward
from fastrank.envs.webshop_search import TOP_K, LuceneBM25, analyze

RESULTS_PER_PAGE = 10
SUB_PAGES = ("description", "features", "reviews")
_ACTION = re.compile(r"(.+)\[(.+)\]")  # greedy name, first line only: SPEC §5
_HTML_SAFE = {"&": "\\u0026", "'": "\\u0027", "<": "\\u003c", ">": "\\u003e"}


def parse_action(action: str) -> tuple[str, str] | None:
    """(name, lower-cased argument), or None when the string is not `name[arg]` (SPEC §5)."""
    m = _ACTION.match(action)
    if not m:
        return None
    return m.group(1), m.group(2).lower()


def _segments(pieces: list[str]) -> str:
    # The reference joins the page's text nodes: each trimmed; whitespace-only nodes with a line break
    # are layout, not text, and vanish; other empty nodes (an empty bullet) stay as empty segments.
    kept = [p.strip() for p in pieces if p.strip() or "\n" not in p]
    return " [SEP] ".join(kept)


def policy_observation(page_text: str, instruction: str) -> str:
    """The page without its `Instruction: [SEP] <instruction>` segments: `EnvState.goal` carries the
    instruction, and a ranker that reads goal + observation would otherwise spend a second copy of it
    out of its token budget (a results page's products come after it)."""
    return page_text.replace(f"Instruction: [SEP] {instruction} [SEP] ", "", 1)


def _nonempty(text: str) -> list[str]:
    # An empty title or description is an element with no text node at all (no segment), unlike an
    # empty bullet point, which is an empty node (an empty segment).
    return [text] if text else []


def options_json(options: dict[str, str]) -> str:
    text = json.dumps(dict(sorted(options.items())), ensure_ascii=True)
    return "".join(_HTML_SAFE.get(c, c) for c in text)


@dataclass
class Session:
    goal: Goal
    page: str = "index"  # index / search_results / item_page / item_sub_page / done
    sub_page: str | None = None
    query: str | None = None  # the last search's text, re-run by paging and `< prev`
    results_page: int = 1
    hits: list[tuple[str, float]] = field(default_factory=list)
    asin: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    observation: str = ""
    clickables: list[str] = field(default_factory=list)
    reward_info: dict | None = None


class WebShopEnv:
    """`TextEnv` over the bundled catalog. One instance serves many episodes (the index is built once)."""

    def __init__(self, catalog: Catalog | None = None, *,
                 search_query: Callable[[Goal], str] | None = None):
        self.catalog = catalog or load_catalog()
        self.engine = search_engine(self.catalog)
        self.search_query = search_query or (lambda g: g.instruction_text)
        self.session: Session | None = None

    # ------------------------------------------------------------------ TextEnv
    def reset(self, task: object) -> EnvState:
        """`task`: a goal index, or a `Goal`."""
        goal = task if isinstance(task, Goal) else self._goal(task)
        self.session = Session(goal=goal)
        self._render()
        return self._state(0.0, False)

    def step(self, action: str) -> EnvState:
        s = self._require_session()
        parsed = parse_action(action) if isinstance(action, str) else None
        if parsed is None:
            return self._state(0.0, False, processed=None)
        name, arg = parsed
        if name == "search":
            self._search(arg, page=1)
            s.page, s.sub_page = "search_results", None
            self._render()
            return self._state(0.0, False, processed="search")
        if name != "click" or arg == "search" or arg not in s.clickables:
            return self._state(0.0, False, processed=None)
        r, done = self._click(arg)
        self._render()
        return self._state(r, done, processed="click")

    def close(self) -> None:
        self.session = None

    # ---------------------------------------------------------------- policy API
    def goal(self, index: int) -> Goal:
        return self._goal(index)

    def target(self, goal: Goal) -> Product:
        return self.catalog.target(goal)

    # ------------------------------------------------------------------ internals
    def _goal(self, index: object) -> Goal:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"WebShop task must be a goal index (int) or a Goal, got {type(index).__name__}")
        if not 0 <= index < len(self.catalog.goals):
            raise ValueError(f"goal index {index} out of range 0..{len(self.catalog.goals) - 1}")
        return self.catalog.goals[index]

    def _require_session(self) -> Session:
        if self.session is None:
            raise RuntimeError("call reset() before step()")
        return self.session

    def _search(self, query: str, page: int) -> None:
        s = self._require_session()
        s.query, s.results_page = query, page
        s.hits = self.engine.search(analyze(query), TOP_K)
        s.asin, s.options = None, {}  # every (re-)run of a search clears the product and its options

    def _click(self, arg: str) -> tuple[float, bool]:
        s = self._require_session()
        if arg == "back to search":
            s.page, s.sub_page = "index", None
        elif s.page == "search_results":
            if arg in ("next >", "< prev"):
                self._search(s.query or "", s.results_page + (1 if arg == "next >" else -1))
            else:  # an ASIN of this page
                s.asin, s.page = arg.upper(), "item_page"
        elif s.page == "item_page":
            if arg == "< prev":
                self._search(s.query or "", s.results_page)
                s.page = "search_results"
            elif arg in SUB_PAGES:
                s.page, s.sub_page = "item_sub_page", arg
            elif arg == "buy now":
                return self._buy()
            else:  # an option value: it replaces the earlier choice in its group
                product = self.catalog.by_asin[s.asin]
                group = next(n for n, values in product.options if arg in values)
                s.options[group] = arg
        elif s.page == "item_sub_page" and arg == "< prev":
            s.page, s.sub_page = "item_page", None
        return 0.0, False

    def _buy(self) -> tuple[float, bool]:
        s = self._require_session()
        product = self.catalog.by_asin[s.asin]
        r, info = purchase_reward(s.goal, self.catalog.target(s.goal), product, s.options)
        s.reward_info = {"reward": r, "verbose_info": info, "purchased_asin": product.asin,
                         "purchased_options": dict(s.options)}
        s.page, s.sub_page = "done", None
        return r, True

    def _render(self) -> None:
        s = self._require_session()
        instr = s.goal.instruction_text
        header = ["Instruction:", instr, "Back to Search"]
        if s.page == "index":
            pieces, buttons = ["WebShop", "Instruction:", instr, "Search"], ["search"]
        elif s.page == "search_results":
            total = len(s.hits)
            lo = (s.results_page - 1) * RESULTS_PER_PAGE
            shown = [self.catalog.by_asin[a] for a, _ in s.hits[lo:lo + RESULTS_PER_PAGE]]
            prev = ["< Prev"] if s.results_page > 1 else []
            pieces = header + [f"Page {s.results_page} (Total results: {total})"] + prev + ["Next >"]
            for p in shown:
                pieces += [p.asin, *_nonempty(p.title), p.price_tag]
            buttons = ["back to search"] + [b.lower() for b in prev] + ["next >"] + [p.asin.lower() for p in shown]
        elif s.page == "item_page":
            p = self.catalog.by_asin[s.asin]
            pieces = header + ["< Prev"]
            for name, values in p.options:
                pieces += [name, *values]
            pieces += [*_nonempty(p.title), f"Price: {p.price_tag}", "Rating: N.A.", "Description", "Features", "Reviews",
                       "Buy Now"]
            values = [v for _, vs in p.options for v in vs]
            buttons = ["back to search", "< prev", *SUB_PAGES, "buy now", *dict.fromkeys(values)]
        elif s.page == "item_sub_page":
            p = self.catalog.by_asin[s.asin]
            pieces = header + ["< Prev"]
            if s.sub_page == "description":
                pieces += _nonempty(p.description)
            elif s.sub_page == "features":
                pieces += list(p.bullets)
            buttons = ["back to search", "< prev"]
        else:  # done
            info = s.reward_info or {}
            pieces = ["Thank you for shopping with us!", "Your code:", "None", "(Paste it in your MTurk interface.)",
                      "Purchased", "asin", info.get("purchased_asin", ""), "options",
                      options_json(info.get("purchased_options", {})), "attrs", "None", "category", "None", "query",
                      "None", "product category", "None", "Target", "asin", "options", "attrs", "price upper",
                      "instuction text", "category", "product category", "query", "Goal", "None", "Reward",
                      "Your score (min 0.0, max 1.0)", repr(info.get("reward", 0.0)), "Reward Details", "None"]
            buttons = []
        s.observation, s.clickables = _segments(pieces), buttons

    def _state(self, r: float, done: bool, processed: str | None = "reset") -> EnvState:
        s = self._require_session()
        has_search_bar = s.page == "index"
        admissible = [f"click[{c}]" for c in s.clickables if c != "search"]
        if has_search_bar:
            admissible = [f"search[{self.search_query(s.goal)}]"]
        info = {"page": s.page, "sub_page": s.sub_page, "has_search_bar": has_search_bar,
                "clickables": list(s.clickables), "processed_as": processed, "asin": s.asin,
                "options": dict(s.options), "results_page": s.results_page, "query": s.query,
                "hits": list(s.hits), "goal_index": s.goal.index}
        if done:
            info.update(s.reward_info or {})
            info["score"] = 100.0 * r
        info["page_text"] = s.observation
        return EnvState(observation=policy_observation(s.observation, s.goal.instruction_text),
                        goal=s.goal.instruction_text, admissible=admissible,
                        task_type=s.goal.category, reward=r, done=done, won=done and r == 1.0, info=info)


def _documents(catalog: Catalog) -> list[tuple[str, dict[str, int], int]]:
    docs = []
    for p in catalog.products:
        terms = analyze(p.index_text())
        docs.append((p.asin, _counts(terms), len(terms)))
    return docs


def _counts(terms: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in terms:
        out[t] = out.get(t, 0) + 1
    return out


@lru_cache(maxsize=4)
def search_engine(catalog: Catalog) -> LuceneBM25:
    """The catalog's index, built once per catalog (~1 s)."""
    return LuceneBM25(_documents(catalog))


def list_test_goals(n: int | None = None) -> list[int]:
    """The evaluation goals (SPEC §10: [0, 500)), the first `n` of them."""
    goals = list(TEST_GOALS)
    return goals if n is None else goals[:n]


def agent_tasks(n_goals: int | None = None) -> tuple[Callable[[], "WebShopEnv"], list[int]]:
    """What an agent evaluation needs: an environment factory (instances share the catalog and the
    index) and the test goals to play, the first `n_goals` of [0, 500)."""
    return WebShopEnv, list_test_goals(n_goals)

