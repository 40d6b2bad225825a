"""WebShop's purchase reward (conformance SPEC §9), written from the spec and the recorded breakdowns.

reward = (attributes matched + goal options matched + price ok) / (|attributes| + |options| + 1) × r_type

Two quirks of the reference are kept on purpose, because the recorded rewards depend on them: a
purchased option value is replaced by the first colour word it *contains* ("rectangular" -> "tan"),
while a goal option is compared as the text of its (name, value) tuple unless its value is exactly
a colour word; and the title-noun denominator counts duplicates. Fuzzy matching is thefuzz's
`token_set_ratio`, reproduced with RapidFuzz (the `webshop` extra).
"""
from __future__ import annotations

from typing import Mapping

from rapidfuzz import fuzz, utils

from fastrank.envs.webshop_catalog import Goal, Product

# Data the reward depends on (SPEC §9): the colour vocabulary, in order; the first hit wins.
COLOURS = tuple("""alabaster apricot aqua ash asphalt azure banana beige black blue blush bordeaux bronze brown
burgundy camel camo caramel champagne charcoal cheetah chestnut chocolate christmas coffee cognac copper coral
cranberry cream crystal dark denim eggplant elephant espresso fuchsia gold granite grape graphite grass gray
green grey heather indigo ivory ivy khaki lavender lemon leopard light lilac lime magenta maroon mauve merlot
midnight mint mocha multicolor mushroom mustard natural navy nude olive orange peach pewter pink plum purple
rainbow red rose royal rust sand sapphire seashell silver skull slate steel stone stonewash sunflower tan taupe
teal tiger turquoise violet walnut wheat white wine yellow""".split())
assert len(COLOURS) == 102, len(COLOURS)
MATCH_THRESHOLD = 85
_LATIN1 = {c: None for c in range(128, 256)}  # thefuzz's force_ascii drops exactly these code points


def fuzzy(s1: object, s2: object) -> int:
    """thefuzz 0.22 `token_set_ratio(s1, s2)`: text, Latin-1 range dropped, default processing, rounded."""
    a = utils.default_process(str(s1).translate(_LATIN1))
    b = utils.default_process(str(s2).translate(_LATIN1))
    if not a or not b:
        return 0
    return round(fuzz.token_set_ratio(a, b, processor=None))


def _normalise_value(value: str) -> str:
    return next((c for c in COLOURS if c in value), value)


def _normalise_pair(pair: tuple[str, str]) -> object:
    # `c in pair` on a tuple is equality with one of its two items, not a substring test.
    return next((c for c in COLOURS if c in pair), pair)


def category_match(a: str, b: str) -> bool:
    pa = {x.strip() for x in a.split("›")}
    pb = {x.strip() for x in b.split("›")}
    return len(pa & pb) >= 2


def type_reward(goal_target: Product, purchased: Product) -> dict:
    query_match = purchased.query == goal_target.query
    cat_match = category_match(purchased.product_category, goal_target.product_category)
    goal_nouns = list(goal_target.title_nouns)
    if goal_nouns:
        title_score = len(set(purchased.title_nouns) & set(goal_nouns)) / len(goal_nouns)
    else:
        title_score = 0.2
    r_type = 1.0
    if not (query_match or cat_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0:
        r_type = 0.0
    return {"r_type": r_type, "query_match": query_match, "category_match": cat_match, "title_score": title_score}


def attribute_matches(goal: Goal, purchased: Product) -> int:
    title = purchased.title.lower()
    bullets = " ".join(purchased.bullets).lower()
    description = purchased.description.lower()
    n = 0
    for a in goal.attributes:
        if (any(fuzzy(x, a) > MATCH_THRESHOLD for x in purchased.attributes)
                or a in title or a in bullets or a in description):
            n += 1
    return n


def option_matches(goal: Goal, options: Mapping[str, str]) -> int:
    bought = [_normalise_value(v) for v in options.values()]
    n = 0
    for pair in goal.goal_options:
        wanted = _normalise_pair(pair)
        if any(fuzzy(p, wanted) > MATCH_THRESHOLD for p in bought):
            n += 1
    return n


def reward(goal: Goal, goal_target: Product, purchased: Product, options: Mapping[str, str]) -> tuple[float, dict]:
    """(reward, verbose_info) for buying `purchased` with `options` under `goal`."""
    t = type_reward(goal_target, purchased)
    n_att = attribute_matches(goal, purchased)
    n_opt = option_matches(goal, options)
    r_price = purchased.price <= goal.price_upper
    n_attr, n_goal_opt = len(goal.attributes), len(goal.goal_options)
    denom = n_attr + n_goal_opt + 1
    total = (n_att + n_opt + r_price) / denom * t["r_type"]
    info = {"r_type": t["r_type"], "r_att": n_att / n_attr if n_attr else 0.0, "w_att": n_attr / denom,
            "query_match": t["query_match"], "category_match": t["category_match"],
            "title_score": t["title_score"]}
    if n_goal_opt:
        info.update(r_option=n_opt / n_goal_opt, w_option=n_goal_opt / denom)
    info.update(r_price=r_price, w_price=1 / denom, num_attr_matches=n_att, num_option_matches=n_opt)
    return total, info
