"""Which role a goal word plays in a candidate action: the goal's object, its target, or the change it asks for.

Notes v2 said only *which* of an action's words the goal names. A word-level match cannot tell
``take cellphone 1 from desk 1`` (goal: put a book on the desk; the desk is the *target*, the cellphone
is in the way) from ``take book 1 from shelf 1``, nor ``slice bread 1 with butterknife 1`` (goal: a
clean butterknife, here used as a tool) from ``take butterknife 1 from drawer 1``; nor does "hot" in
the goal match the action ``heat cup 3 with microwave 1``. Measured on the v10 agent's 140
valid_seen games: it took objects off the goal's target and cleaned, cooled and heated the same cup in
one episode (clean/cool/heat: 3 of 68 won).

A short goal with a place phrase (``put a hot cup in cabinet``, ``look at cd under the desklamp``,
``clean some mug and put it in coffeemachine``) splits at its last place preposition into an object part
and a target part; an action of the form ``VERB X [PREP Y]`` is read slot by slot, and each slot gets
the role its head noun has in the goal. Goals that do not split (WebShop's long requests, ScienceWorld's
task paragraphs) and actions that do not parse get no roles: the featurizer falls back to "goal names".
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from fastrank.data.history import PAST
from fastrank.data.words import stem as _stem
from fastrank.data.words import words

_MAX_GOAL_WORDS = 12  # longer goals are requests or task descriptions, not "<verb> <object> <prep> <target>"
# greedy object part: the split is at the *last* place preposition ("clean some mug and put it in X")
_GOAL = re.compile(r"^(?P<obj>.+)\s+(?:in|on|into|onto|under|with|in/on)\s+(?:the\s+|a\s+|some\s+)?(?P<target>[^.]+?)\.?$")
_ACTION = re.compile(r"^(?P<verb>take|put|heat|cool|clean|slice|move|pour|use|examine|go to|open|close|toggle"
                     r"|pick up|focus on)\s+(?P<x>.+?)(?:\s+(?P<prep>from|in/on|in|on|into|with|to|using)\s+(?P<y>.+))?$")
# the state changes a goal can ask for, by the words goals use for them ("a hot cup" asks for `heat`)
CHANGES = {"hot": "heat", "heat": "heat", "heated": "heat", "warm": "heat", "cool": "cool", "cold": "cool",
           "cooled": "cool", "chilled": "cool", "clean": "clean", "cleaned": "clean", "wash": "clean",
           "washed": "clean", "slice": "slice", "sliced": "slice"}
_FILLER = {"a", "an", "the", "some", "two", "it", "them", "and", "put", "find", "look", "at", "examine"}


def _nouns(text: str) -> set[str]:
    return {_stem(w) for w in words(text) if w not in _FILLER and w not in CHANGES and not w.isdigit()}


def _head(arg: str) -> str:
    """'cup 3' -> 'cup', 'red wire' -> 'wire': the last word that is not a number."""
    ws = [w for w in words(arg) if not w.isdigit()]
    return _stem(ws[-1]) if ws else ""


@dataclass(frozen=True)
class GoalRoles:
    objects: frozenset[str]  # stems of what the goal is about ("cup")
    targets: frozenset[str]  # stems of where it must end up, or what it must be looked at under ("cabinet")
    change: str | None       # "heat" / "cool" / "clean" / "slice", or None

    def role(self, arg: str) -> str:
        h = _head(arg)
        return "goal object" if h in self.objects else "goal target" if h in self.targets else ""

    def held_note(self, obj: str, changed: Mapping[str, Sequence[str]]) -> str:
        """What a held object is to the goal (notes v6, the state's ``holding:``): "goal object, not heated yet"
        while the change the goal asks is still to do, "goal object" after it, '' for other objects. The v4
        policy carried the goal object straight to the target in 51 of its 61 lost heat / cool / clean games:
        the pending change was only implied by the goal's adjective and the absence of `heat` among the done
        actions; said beside what is held, every expert state between `take` and the change reads it."""
        if self.role(obj) != "goal object":
            return ""
        return ", ".join(p for p in ("goal object", self.pending(obj, changed)) if p)

    def pending(self, obj: str, changed: Mapping[str, Sequence[str]]) -> str:
        """"not heated yet" while the change the goal asks has not been done to `obj` ('' if none is asked or done)."""
        return f"not {PAST[self.change]} yet" if self.change and PAST[self.change] not in changed.get(obj, ()) else ""

    def action_roles(self, action: str, changed: Mapping[str, Sequence[str]] | None = None) -> str | None:
        """The role note of one action ('' = nothing the goal names; None = the action does not parse).

        ``take cellphone 1 from desk 1`` -> "other object, from goal target"; ``heat cup 3 with microwave 1``
        under "put a hot cup in cabinet" -> "goal object, the change the goal asks"; ``go to cabinet 1`` ->
        "goal target". `changed` (object -> what was done to it, `EpisodeMemory.changed`; notes v4): a put of
        the goal object into the goal target before the change the goal asks adds "not heated yet" -- the v3
        policy took the apple off the dining table it had to heat and put it straight back (that put reads
        "goal object, in/on goal target", the expert's last move in every game)."""
        m = _ACTION.match(action.strip().lower())
        if not m:
            return None
        verb, x, prep, y = m.group("verb"), m.group("x"), m.group("prep"), m.group("y")
        parts = []
        rx = self.role(x)
        if y is None:  # one slot: a place, a tool, or the object looked at
            parts.append(rx)
        else:
            parts.append(rx or "other object")
            ry = self.role(y)
            if ry:
                parts.append(f"{prep} {ry}")
            if changed is not None and verb == "put" and rx == "goal object" and ry == "goal target":
                parts.append(self.pending(x, changed))
        if verb in ("heat", "cool", "clean", "slice"):
            parts.append("the change the goal asks" if verb == self.change else "a change the goal does not ask")
        return ", ".join(p for p in parts if p)


def goal_roles(goal: str) -> GoalRoles | None:
    """The roles of a short "<object part> <prep> <target>" goal, else None (see the module docstring)."""
    g = goal.strip().lower()
    if len(words(g)) > _MAX_GOAL_WORDS:
        return None
    m = _GOAL.match(g)
    if not m:
        return None
    objects, targets = _nouns(m.group("obj")), _nouns(m.group("target"))
    if not objects or not targets:
        return None
    changes = [CHANGES[w] for w in words(m.group("obj")) if w in CHANGES]
    return GoalRoles(frozenset(objects), frozenset(targets - objects), changes[0] if changes else None)
