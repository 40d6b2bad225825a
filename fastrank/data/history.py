"""Episode memory: a compact text summary of what an agent has done and seen so far.

A reranker that reads goal + current observation only cannot tell "I already searched drawer 1"
from "drawer 1 is unexplored", nor that the apple it holds is already clean, so it loops (94 % repeated
actions measured before this existed). The summary gives it the state a text agent needs, derived from
the (action, observation) pairs of the episode, nothing else:

- ``holding``: what the agent carries (``You pick up the X`` / ``You put the X``; ``You move the X to
  the inventory``);
- ``done``: effectful actions that worked (take, put, heat, clean, cool, use, move, ...), newest first:
  progress that a later observation no longer shows;
- ``recent``: the last few actions with the first words of what they revealed, newest first;
- ``searched``: every place visited or opened with what was seen there (``nothing`` / ``closed`` /
  the contents), newest first, one entry per place.

Each candidate action is annotated too (`EpisodeMemory.annotate`): ``new`` or ``taken 2x``, and for a
place already searched what was seen there, so the ranker reads the history right beside the action.

Every list is newest first, and the featurizer writes the summary after the goal and the current
observation, so right-truncation of the state text (``truncation="only_first"``, or the prefix
encoder's state budget) drops the oldest history first and never the goal or the current observation.
The parser keys on the surface forms ALFWorld and ScienceWorld use; text it does not recognise still
appears under ``recent``.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

Turn = tuple[str, str]  # (action, the observation it produced)

_SEE = re.compile(r"\byou see (.+?)(?:\.|$)", re.I)
_PICK = re.compile(r"you pick up the (.+?) from", re.I)
_PUT = re.compile(r"you put the (.+?) (?:in|on)(?:/on)? the", re.I)
_TO_INV = re.compile(r"you move the (.+?) to the inventory", re.I)
_NAV = ("go to", "open", "close", "look", "examine", "inventory", "teleport to", "focus on", "wait")
_FAILED = ("nothing happens", "i'm not sure", "no known action", "you can't", "that's not", "it's not")


def _first_words(text: str, n: int) -> str:
    w = text.replace("\n", " ").split()
    return " ".join(w[:n]) + (" ..." if len(w) > n else "")


def _place_of(action: str) -> str | None:
    a = action.strip().lower()
    for verb in ("go to ", "open ", "teleport to "):
        if a.startswith(verb):
            return a[len(verb):]
    return None


def _seen_there(observation: str) -> str:
    o = observation.strip()
    m = _SEE.search(o)
    if m:
        return m.group(1).strip()
    if re.search(r"\bis closed\b", o, re.I):
        return "closed"
    return _first_words(o, 8)


class EpisodeMemory:
    """Incremental summary of one episode; `add(action, observation)` after every step."""

    def __init__(self, max_recent: int = 3, max_done: int = 6, obs_words: int = 12):
        self.max_recent, self.max_done, self.obs_words = max_recent, max_done, obs_words
        self.turns: list[Turn] = []
        self.holding: list[str] = []
        self.done: list[str] = []
        self.searched: dict[str, str] = {}  # place -> what was seen (insertion order = last visit order)
        self.taken: Counter = Counter()  # action -> times taken

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
        m = _PICK.search(observation) or _TO_INV.search(observation)
        if m and m.group(1) not in self.holding:
            self.holding.append(m.group(1))
        m = _PUT.search(observation)
        if m and m.group(1) in self.holding:
            self.holding.remove(m.group(1))
        if not low_a.startswith(_NAV) and not low_o.startswith(_FAILED) and low_o:
            self.done.append(action)

    def annotate(self, action: str) -> str:
        """What the episode says about one candidate action: how often it was taken, and for a place
        already searched what was seen there. Read beside the action, this is what lets a ranker stop
        re-visiting an empty drawer, which the state summary alone did not (measured: a BC policy trained
        without it ping-ponged between two empty sidetables)."""
        a = action.strip().lower()
        n = self.taken.get(a, 0)
        note = f"taken {n}x" if n else "new"
        place = _place_of(a)
        if place is not None and place in self.searched:
            note += f"; seen there: {_first_words(self.searched[place], 8)}"
        return note

    def summary(self) -> str:
        """The history text, newest first in every part ('' before the first step)."""
        if not self.turns:
            return ""
        parts = [f"holding: {', '.join(self.holding) if self.holding else 'nothing'}"]
        if self.done:
            parts.append("done: " + "; ".join(reversed(self.done[-self.max_done:])))
        recent = [f"{a} -> {_first_words(o, self.obs_words)}" for a, o in reversed(self.turns[-self.max_recent:])]
        parts.append("recent: " + "; ".join(recent))
        if self.searched:
            parts.append("searched: " + "; ".join(f"{p}: {s}" for p, s in reversed(self.searched.items())))
        return " | ".join(parts)


def summarize_history(turns: Sequence[Sequence[str]] | None, **kw) -> str:
    """Summary text of a list of (action, observation) pairs (see `EpisodeMemory`)."""
    return EpisodeMemory.from_turns(turns or [], **kw).summary()
