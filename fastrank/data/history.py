"""Episode memory: a compact text summary of what an agent has done and seen so far.

A reranker that reads goal + current observation only cannot tell "I already searched drawer 1"
from "drawer 1 is unexplored", nor that the apple it holds is already clean, so it loops (94 % repeated
actions measured before this existed). The summary gives it the state a text agent needs, derived from
the (action, observation) pairs of the episode, nothing else:

- ``holding``: what the agent carries (``You pick up the X`` / ``You put the X``; ``You move the X to
  the inventory``), with what was done to it (``apple 1 (cleaned)``): a cleaned apple looks like any other;
- ``done``: effectful actions that worked (take, put, heat, clean, cool, use, move, ...), newest first:
  progress that a later observation no longer shows;
- ``recent``: the last few actions with the first words of what they revealed, newest first;
- ``searched``: every place visited or opened with what is there as far as the agent knows (``nothing`` /
  ``closed`` / the objects seen, minus those it took since, plus those it put there), newest first, one
  entry per place. Without the update a place keeps advertising the apple the agent already carries,
  and the policy walks back to it.

Each candidate action is annotated too (`EpisodeMemory.annotate`): ``new`` or ``taken 2x``, and for a
place what is known to be there, or ``unvisited``, so the ranker reads the history right beside the action
(the featurizer adds which of those objects the goal names).

Every list is newest first, and the featurizer writes the summary after the goal and the current
observation, so right-truncation of the state text (``truncation="only_first"``, or the prefix
encoder's state budget) drops the oldest history first and never the goal or the current observation.
The parser keys on the surface forms ALFWorld and ScienceWorld use; text it does not recognise still
appears under ``recent``.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Sequence

Turn = tuple[str, str]  # (action, the observation it produced)

_SEE = re.compile(r"\byou see (.+?)(?:\.|$)", re.I)
_PICK = re.compile(r"you pick up the (.+?) from the (.+?)\.?$", re.I)
_PUT = re.compile(r"you put the (.+?) (?:in|on)(?:/on)? the (.+?)\.?$", re.I)
_TO_INV = re.compile(r"you move the (.+?) to the inventory", re.I)
# ALFWorld's replies to a successful change of an object's state: "You heat the egg 1 using the microwave 1."
_CHANGE = re.compile(r"you (heat|cool|clean|slice) the (.+?) (?:using|with) the", re.I)
PAST = {"heat": "heated", "cool": "cooled", "clean": "cleaned", "slice": "sliced"}
_NAV = ("go to", "open", "close", "look", "examine", "inventory", "teleport to", "focus on", "wait")
_FAILED = ("nothing happens", "i'm not sure", "no known action", "you can't", "that's not", "it's not")
_ARTICLE = re.compile(r"^(?:a|an|the|some)\s+", re.I)
_PUT_ACTION = re.compile(r"^put (.+?) (?:in/on|in|on) (.+)$", re.I)
_TAKE_ACTION = re.compile(r"^take (.+?) from (.+)$", re.I)


def _first_words(text: str, n: int) -> str:
    w = text.replace("\n", " ").split()
    return " ".join(w[:n]) + (" ..." if len(w) > n else "")


def _place_of(action: str) -> str | None:
    a = action.strip().lower()
    for verb in ("go to ", "open ", "teleport to "):
        if a.startswith(verb):
            return a[len(verb):]
    return None


def _items(listing: str) -> list[str]:
    """'a bread 1, and a knife 2' -> ['bread 1', 'knife 2'] (ALFWorld's object lists)."""
    parts = re.split(r",\s*(?:and\s+)?|\s+and\s+", listing.strip())
    return [_ARTICLE.sub("", p).strip() for p in parts if p.strip() and p.strip().lower() != "nothing"]


def _seen_there(observation: str) -> str | list[str]:
    """What a place showed: its objects (a list, [] = nothing), 'closed', or the first words of a reply
    this parser does not know (ScienceWorld's rooms, say)."""
    o = observation.strip()
    m = _SEE.search(o)
    if m:
        return _items(m.group(1))
    if re.search(r"\bis closed\b", o, re.I):
        return "closed"
    return _first_words(o, 8)


def _shown(seen: str | list[str]) -> str:
    return seen if isinstance(seen, str) else (", ".join(seen) or "nothing")


class EpisodeMemory:
    """Incremental summary of one episode; `add(action, observation)` after every step."""

    def __init__(self, max_recent: int = 3, max_done: int = 6, obs_words: int = 12):
        self.max_recent, self.max_done, self.obs_words = max_recent, max_done, obs_words
        self.turns: list[Turn] = []
        self.holding: list[str] = []
        self.changed: dict[str, list[str]] = {}  # object -> what was done to it (heated, cleaned, ...)
        self.done: list[str] = []
        # place -> what is there now as far as the agent knows (insertion order = last visit order): the
        # objects seen, minus those taken since, plus those put there
        self.searched: dict[str, str | list[str]] = {}
        self.taken: Counter = Counter()  # action -> times taken
        self.source: dict[str, str] = {}  # held object -> the place it was picked up from
        self.placed: dict[str, str] = {}  # object -> the place the agent last put it

    @classmethod
    def from_turns(cls, turns: Sequence[Sequence[str]], **kw) -> "EpisodeMemory":
        mem = cls(**kw)
        for action, observation in turns:
            mem.add(action, observation)
        return mem

    def add(self, action: str, observation: str) -> None:
        action, observation = action.strip(), observation.strip()
        self.turns.append((action, observation))
        self.taken[action.lower()] += 1
        low_a, low_o = action.lower(), observation.lower()
        place = _place_of(action)
        if place is not None and not low_o.startswith(_FAILED):
            self.searched.pop(place, None)
            self.searched[place] = _seen_there(observation)
        m = _PICK.search(observation)
        if m:
            obj, src = m.group(1), m.group(2).lower()
            if obj not in self.holding:
                self.holding.append(obj)
            self.source[obj.lower()] = src
            if isinstance(self.searched.get(src), list):  # it is no longer where it was seen
                self.searched[src] = [x for x in self.searched[src] if x != obj]
        m = _TO_INV.search(observation)
        if m and m.group(1) not in self.holding:
            self.holding.append(m.group(1))
        m = _PUT.search(observation)
        if m and m.group(1) in self.holding:
            obj, dst = m.group(1), m.group(2).lower()
            self.holding.remove(obj)
            self.source.pop(obj.lower(), None)
            self.placed[obj.lower()] = dst
            if isinstance(self.searched.get(dst), list) and obj not in self.searched[dst]:
                self.searched[dst] = self.searched[dst] + [obj]
        m = _CHANGE.search(observation)
        if m:
            self.changed.setdefault(m.group(2), []).append(PAST[m.group(1).lower()])
        if not low_a.startswith(_NAV) and not low_o.startswith(_FAILED) and low_o:
            self.done.append(action)

    def seen_items(self, action: str) -> list[str]:
        """The objects last seen at the place a navigation action leads to ([] if none or not a place)."""
        place = _place_of(action)
        seen = self.searched.get(place) if place is not None else None
        return seen if isinstance(seen, list) else []

    def annotate(self, action: str, goal_items: Sequence[str] = ()) -> str:
        """What the episode says about one candidate action: how often it was taken, and for a place what
        is known to be there (``unvisited`` if nothing). Read beside the action, this is what lets a ranker
        stop re-visiting an empty drawer, which the state summary alone did not (measured: a BC policy
        trained without it ping-ponged between two empty sidetables). `goal_items`: the objects there that
        the goal names (the featurizer knows the goal)."""
        return "; ".join(p for p in self.annotation_parts(action, goal_items) if p)

    def annotation_parts(self, action: str, goal_items: Sequence[str] = ()) -> tuple[str, str, str]:
        """(``new`` / ``taken 2x``, ``goal items there: ...`` or '', ``seen there: ...`` / ``unvisited`` / '')."""
        a = action.strip().lower()
        n = self.taken.get(a, 0)
        count = f"taken {n}x" if n else "new"
        there = f"goal items there: {', '.join(goal_items)}" if goal_items else ""
        place, seen = _place_of(a), ""
        if place is not None and place in self.searched:
            seen = f"seen there: {_first_words(_shown(self.searched[place]), 8)}"
        elif place is not None:
            seen = "unvisited"
        return count, there, seen

    def undo_note(self, action: str, changed_ok: bool = False) -> str:
        """'; puts it back where it was taken' for a put of a held object onto the place it came from, and
        '; takes back what it put there' for a take of an object the agent put there itself ('' otherwise).
        A policy cloned from an expert that never undoes anything learned "put <goal object>" as a good action
        and, right after picking the goal object up, put it back where it lay (33 of 39 such train states
        wrong, measured): the undo is only visible by matching the place against the history, so it is said.
        `changed_ok` (notes v4): a put of an object heated / cleaned / ... since is no undo (an apple taken off the
        dining table it must end on, then heated, goes back there)."""
        a = action.strip().lower()
        m = _PUT_ACTION.match(a)
        if m and self.source.get(m.group(1)) == m.group(2) and not (changed_ok and m.group(1) in self.changed):
            return "; puts it back where it was taken"
        m = _TAKE_ACTION.match(a)
        if m and self.placed.get(m.group(1)) == m.group(2):
            return "; takes back what it put there"
        return ""

    def _held(self, obj: str, note: Callable[[str], str] | None) -> str:
        parts = list(self.changed.get(obj, ())) + ([n] if note is not None and (n := note(obj)) else [])
        return f"{obj} ({', '.join(parts)})" if parts else obj

    def summary(self, held_note: Callable[[str], str] | None = None) -> str:
        """The history text, newest first in every part ('' before the first step). `held_note`: object -> what
        it is to the goal, said after each held object (notes v6, `GoalRoles.held_note`)."""
        if not self.turns:
            return ""
        held = ', '.join(self._held(o, held_note) for o in self.holding) if self.holding else 'nothing'
        parts = [f"holding: {held}"]
        if self.done:
            parts.append("done: " + "; ".join(reversed(self.done[-self.max_done:])))
        recent = [f"{a} -> {_first_words(o, self.obs_words)}" for a, o in reversed(self.turns[-self.max_recent:])]
        parts.append("recent: " + "; ".join(recent))
        if self.searched:
            parts.append("searched: " + "; ".join(f"{p}: {_shown(s)}" for p, s in reversed(self.searched.items())))
        return " | ".join(parts)


def summarize_history(turns: Sequence[Sequence[str]] | None, **kw) -> str:
    """Summary text of a list of (action, observation) pairs (see `EpisodeMemory`)."""
    return EpisodeMemory.from_turns(turns or [], **kw).summary()
