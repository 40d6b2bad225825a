"""What a ScienceWorld agent is shown as actions: a bounded sample of the simulator's huge valid list, and
string-only alias folding for data read without a live simulator.

Pure functions of strings (no simulator), shared by the env wrapper and the data builder so that both
bound and deduplicate the lists the same way.
"""
from __future__ import annotations

import hashlib
import random
import re
from collections import defaultdict
from typing import Callable, Iterable

# ------------------------------------------------------------------------ admissible-list policy

_TWO_WORD_VERBS = ("look at", "look in", "look around", "pick up", "put down", "focus on", "reset task")


def action_verb(action: str) -> str:
    """The verb key used to stratify: "look at", "pick up", "connect", "go", "wait1", ..."""
    a = " ".join(action.lower().split())
    for v in _TWO_WORD_VERBS:
        if a == v or a.startswith(v + " "):
            return v
    return a.split(" ", 1)[0] if a else ""


def dedupe(actions: Iterable[str]) -> list[str]:
    """Drop empty strings and repeated strings (whitespace-normalised), keeping first occurrences."""
    seen: set[str] = set()
    out = []
    for a in actions:
        key = " ".join(str(a).split())
        if key and key not in seen:
            seen.add(key)
            out.append(key)
    return out


def _as_rng(rng: random.Random | int | None) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def bounded_admissible(
    valid: Iterable[str],
    k: int,
    rng: random.Random | int | None = 0,
    must_include: Iterable[str] = (),
    strategy: str = "stratified",
    priority: Callable[[str], float] | None = None,
) -> list[str]:
    """A deduplicated, capped sample of a valid-action list.

    Policy: strings are deduplicated (whitespace-normalised); every `must_include` action is kept
    (even when absent from `valid`, e.g. an expert action the simulator accepts but does not list);
    the remaining `k - len(must_include)` slots are filled from the other valid actions by
    - "stratified" (default): group by verb (`action_verb`), shuffle each group and the group order
      with `rng`, then take one action per group in turn. The raw list is ~70 % `connect`/`pour`/
      `move` combinations; this keeps rare but meaningful verbs (go, open, focus on, look at, ...).
      With `priority` (action -> number, higher first; e.g. how many goal words it names) each group is
      ordered by it and the groups by their best action, `rng` breaking ties: the same breadth over verbs,
      but a verb's slots go to its most relevant actions instead of random ones.
    - "uniform": a plain `rng.sample`.
    The result is sorted alphabetically, so an action's position carries no information about
    whether it was forced in. Deterministic given the rng seed and the set of actions (not their order).
    Raises if must_include exceeds k.
    """
    if k < 0:
        raise ValueError("k must be >= 0")
    must = dedupe(must_include)
    if len(must) > k:
        raise ValueError(f"{len(must)} must_include actions exceed the cap k={k}")
    must_set = set(must)
    # sorted first: the simulator lists valid actions in an order that depends on what the JVM loaded before
    # (object ids), and the sample must depend on the set only, or one game plays differently per env reuse
    rest = sorted(a for a in dedupe(valid) if a not in must_set)
    budget = k - len(must)
    r = _as_rng(rng)
    if budget >= len(rest):
        chosen = rest
    elif strategy == "uniform":
        chosen = r.sample(rest, budget)
    elif strategy == "stratified":
        groups: dict[str, list[str]] = defaultdict(list)
        for a in rest:
            groups[action_verb(a)].append(a)
        keys = sorted(groups)
        r.shuffle(keys)
        for key in keys:
            r.shuffle(groups[key])
        if priority is not None:  # stable sorts: the shuffles above break the ties
            pr = {a: priority(a) for a in rest}
            for key in keys:
                groups[key].sort(key=lambda a: -pr[a])
            keys.sort(key=lambda key: -pr[groups[key][0]])
        chosen, depth = [], 0
        while len(chosen) < budget:
            for key in keys:
                if depth < len(groups[key]):
                    chosen.append(groups[key][depth])
                    if len(chosen) == budget:
                        break
            depth += 1
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    return sorted(must + list(chosen))


def stable_seed(*parts: object) -> int:
    """A process-independent 63-bit seed from arbitrary parts (Python's hash() is salted)."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") >> 1


# ----------------------------------------------------------------------- string-only alias fallback

_DOOR_TO = re.compile(r"\bdoor to (?P<place>[a-z ]+?)(?= (?:to|in|into|on)\b|$)")


def normalize_action(action: str) -> str:
    """A string-only normal form for spotting aliases where no simulator state is at hand
    (the shared gold files). It folds the alias patterns seen in gold paths:
    lower case / whitespace; `examine X` -> `look at X`; `drop X` -> `put down X`;
    ` into ` -> ` in ` (pour/dunk);
    `door to <place>` -> `<place> door`; and drops the ` in inventory` container qualifier.
    Used on top of the exact aliases, it may also drop a *different* object's action that only
    differs by that qualifier (a second thermometer in the room): one distractor fewer, never a
    duplicate of the expert.
    It cannot resolve location qualifiers (`cup containing paint in art studio`) or referent
    synonyms (`substance` vs `water`, `seed jar` vs `ceramic cup`): on 747 aliased gold actions
    of a simulator build it agrees with the parser on 2/3 only. The simulator-backed
    `ScienceWorldEnv.resolve_action` is exact and is what the builder uses."""
    a = " ".join(action.lower().split())
    if a.startswith("examine "):
        a = "look at " + a[len("examine "):]
    elif a.startswith("drop "):
        a = "put down " + a[len("drop "):]
    a = re.sub(r" in inventory\b", "", a)  # before `into` -> `in`: "pour x into inventory" stays
    a = a.replace(" into ", " in ")
    a = _DOOR_TO.sub(lambda m: f"{m.group('place')} door", a)
    return a


def remove_aliases(actions: Iterable[str], expert: str, aliases: Iterable[str] = ()) -> list[str]:
    """`actions` deduplicated, minus every string equivalent to `expert`: the expert itself, the
    known `aliases` (e.g. from `resolve_action`), and anything with the same `normalize_action`."""
    banned = {" ".join(expert.split())} | {" ".join(a.split()) for a in aliases}
    banned_norm = {normalize_action(a) for a in banned}
    return [a for a in dedupe(actions) if a not in banned and normalize_action(a) not in banned_norm]


__all__ = ["action_verb", "bounded_admissible", "dedupe", "normalize_action", "remove_aliases", "stable_seed"]
