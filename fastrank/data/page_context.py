"""What the page says about a candidate that names only an id: the listing text beside it.

On a WebShop results page the clickables are ASINs (``click[b01i5b1q1m]``) while the product's title
and price sit elsewhere in a long observation (``... [SEP] B01I5B1Q1M [SEP] Walker Edison ... Bar
Stool, Black [SEP] $59.99 [SEP] ...``). A cross-encoder with a state budget of a few hundred tokens
sees one or two of the ten products, and a shared-prefix encoder has to link the id to its title
across the prefix. Putting the listing beside the action makes every candidate self-describing: its
position on the page (the search engine's rank: opening the first hit is worth 78.9 of the oracle's 99.2
on the test goals), its price against the goal's budget, and its title, whose words the featurizer's
"goal names" note also reads. A listing is any segment that is
a bare id followed, within a few segments, by a price (``$...``); observations without one (ALFWorld,
ScienceWorld) are untouched.
"""
from __future__ import annotations

import re

SEP = " [SEP] "
_CLICK = re.compile(r"\s*click\[(.+)\]\s*")
_ID = re.compile(r"[A-Za-z0-9]{6,16}")
_PRICE = re.compile(r"\$\s?(\d[\d,]*(?:\.\d+)?)")
_BUDGET = re.compile(r"price lower than \$?(\d[\d,]*(?:\.\d+)?)", re.I)
# "... with color: black multi, and size: large, and price lower than 70.00 dollars": parses all 6,910 WebShop goals
_GOAL_OPTION = re.compile(r"(?:\bwith|, and) ([a-z][a-z ]*?): (.+?)(?=, and |$)")
TITLE_WORDS = 12  # the title after the decisive head; a 48-token candidate budget keeps ~10 of its words


def _is_id(text: str) -> bool:
    """A product id (ASIN / ISBN): 6-16 letters and digits, at least one digit (option values like "black" are not)."""
    return bool(_ID.fullmatch(text)) and any(ch.isdigit() for ch in text)


def page_listing(observation: str, max_gap: int = 3) -> dict[str, tuple[int, str, str]]:
    """{id (lower case): (position on the page from 1, title, price text)} for every id a price follows."""
    if SEP not in observation:
        return {}
    seg = observation.split(SEP)
    out = {}
    for i, s in enumerate(seg):
        if not _is_id(s):
            continue
        for j in range(i + 1, min(len(seg), i + 2 + max_gap)):
            if seg[j].startswith("$"):
                if j > i + 1:
                    out[s.lower()] = (len(out) + 1, " ".join(seg[i + 1:j]), seg[j])
                break
    return out


def click_arg(action: str) -> str | None:
    """The argument of a `click[...]` action (stripped), else None."""
    m = _CLICK.fullmatch(action)
    return m.group(1).strip() if m else None


def _phrase_in(phrase: str, text: str) -> bool:
    """`phrase` in `text` as a whole phrase, case-insensitively: "large" is in "size: large", not in "x-large"."""
    return re.search(rf"(?<![\w-]){re.escape(phrase.lower())}(?![\w-])", text.lower()) is not None


def verbatim_in(goal: str, action: str) -> bool:
    """A click whose whole argument the goal states as a phrase: "size: large" names `click[large]` but not
    `click[x-large]`, which the word-level "goal names" note cannot tell apart (both share "large")."""
    arg = click_arg(action) or ""
    return bool(arg) and _phrase_in(arg, goal)


def off_page(observation: str, action: str, searches: bool = False) -> bool:
    """A click on a WebShop page (``[SEP]``-separated) whose argument the page does not show: a button that is
    not there. The environment rejects it; the paper's `sampled` candidate sets are full of them (other
    states' actions), and a reranker that was only ever shown a page's own clickables cannot tell them from
    real buttons, where the lexical floor wins by noticing their words are missing (README, *WebShop*).
    `searches` (notes v5): also a ``search[...]`` on a page without the search box (only the search page ends
    in a ``Search`` button; results and item pages have "Back to Search"): the v2 WebShop model's most common
    `sampled` error on results pages after "< prev" (53 of 600 sets: it re-ran the episode's own query where
    the expert paged on)."""
    if SEP not in observation:
        return False
    if searches and action.strip().startswith("search["):
        return "Search" not in (seg.strip() for seg in observation.split(SEP))
    arg = click_arg(action)
    return arg is not None and not _phrase_in(arg, observation)


def budget(goal: str) -> float | None:
    """The goal's price limit ("... and price lower than 90.00 dollars"), or None."""
    m = _BUDGET.search(goal)
    return float(m.group(1).replace(",", "")) if m else None


def within_budget(price_text: str, limit: float) -> bool | None:
    """Whether the lowest price shown ("$44.99 to $33.98" -> 33.98) is under the limit."""
    prices = [float(p.replace(",", "")) for p in _PRICE.findall(price_text)]
    return min(prices) < limit if prices else None


def listing_text(goal: str, listing: dict[str, tuple[int, str, str]], action: str) -> tuple[str, str]:
    """(head, title) for a click on a listed id, else ('', ''): head = 'result N, <price>[, under|over
    budget]' -- what decides, kept short so a candidate token budget cuts the title's end, never it."""
    arg = click_arg(action)
    hit = listing.get(arg.lower()) if arg else None
    if hit is None:
        return "", ""
    rank, title, price = hit
    limit = budget(goal)
    ok = within_budget(price, limit) if limit is not None else None
    head = f"result {rank}, {price}" + ("" if ok is None else ", under budget" if ok else ", over budget")
    words = title.split()
    return head, " ".join(words[:TITLE_WORDS]) + (" ..." if len(words) > TITLE_WORDS else "")


def goal_options(goal: str) -> list[tuple[str, str]]:
    """The (name, value) options a WebShop goal asks for, lower case: "... with color: black multi, and size: large,
    and price lower than 70.00 dollars" -> [("color", "black multi"), ("size", "large")]."""
    return [(name.split(" with ")[-1], value) for name, value in _GOAL_OPTION.findall(goal.lower())]


def item_page(observation: str) -> list[str] | None:
    """The segments of a WebShop item page (it has a ``Buy Now`` button), lower case; None for any other page."""
    if SEP not in observation:
        return None
    seg = [s.strip().lower() for s in observation.split(SEP)]
    return seg if "buy now" in seg else None


def missing_options(goal: str, observation: str) -> list[str] | None:
    """On an item page, the goal's option values the page does not offer (none: []); None on any other page.
    What a shopper checks before buying, and what the product listing cannot show."""
    seg = item_page(observation)
    if seg is None:
        return None
    offered = set(seg)
    return [v for _, v in goal_options(goal) if v not in offered]


def item_price_ok(goal: str, observation: str) -> bool | None:
    """On an item page, whether its price is under the goal's budget (None: not an item page, or no budget)."""
    seg, limit = item_page(observation), budget(goal)
    price = next((s for s in seg or () if s.startswith("price:")), None)
    return within_budget(price, limit) if price is not None and limit is not None else None


def opened_products(history) -> list[str]:
    """The product ids (lower case) the episode has opened, in order, once each: clicks on a listed id."""
    out = []
    for action, _ in history or ():
        arg = click_arg(action)
        if arg and _is_id(arg) and arg.lower() not in out:
            out.append(arg.lower())
    return out


def item_note(goal: str, observation: str, action: str, history) -> str:
    """Notes v7, for `< prev` and `buy now` on an item page: the goal options it lacks (or that it has them all), an
    over-budget price, and on `< prev` how many products the episode has opened. Empty for anything else."""
    arg = (click_arg(action) or "").lower()
    if arg not in ("< prev", "buy now"):
        return ""
    missing = missing_options(goal, observation)
    if missing is None:
        return ""
    parts = [f"goal options not offered: {', '.join(missing)}" if missing else "every goal option offered"]
    if item_price_ok(goal, observation) is False:
        parts.append("over budget")
    if arg == "< prev":
        parts.append(f"products opened: {len(opened_products(history))}")
    return "; " + "; ".join(parts)
