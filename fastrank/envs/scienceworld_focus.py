"""ScienceWorld's `focus on`: the one action that ends an episode at -100 when it is wrong.

In ScienceWorld a task is scored on the object the agent focuses on, and a focus on the wrong object (or on the
right ones in the wrong order) fails the task at once. Every goal says what to focus on and when, in a fixed
phrasing ("First, focus on the thermometer. Next, focus on the wire. If ..., focus on the blue box."), so
`focus_guard` reads those rules from the goal text; nothing here is about a particular task or variation.
"""
from __future__ import annotations

import re
from typing import Sequence

_FOCUS = re.compile(r"^focus on (.+)$")
_FOCUSED = re.compile(r"^You focus on (?:the )?(.+?)\.?$")  # the simulator's reply to a focus it accepted
# a focus the goal orders ("First, focus on the thermometer.", "Next, ...", "Then, ..."); conditional ones
# ("If the melting point is above 50 degrees, focus on the blue box.") come after all of these
_ORDERED = re.compile(r"\b(?:first|next|then), focus on (?:the |a |an )?([^.]+)\.", re.IGNORECASE)
_ANY = re.compile(r"focus on (?:the |a |an )?([^.,]+)", re.IGNORECASE)
_STOP = {"the", "a", "an"}
_PLACEHOLDER = {"substance", "thing"}  # an ordered target that stands for an object the goal names elsewhere
_GENERIC = {"substance", "called", "nothing", "and", "of", "in", "on", "is", "it", "to", "with", "unknown"}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower())) - _STOP


def focus_head(action: str) -> str | None:
    """What `focus on X` focuses on, without the simulator's location qualifier (`focus on substance in metal
    pot` -> "substance"); None for any other action."""
    m = _FOCUS.match(action.strip().lower())
    return m.group(1).split(" in ", 1)[0].removeprefix("the ") if m else None


def focused_names(reply: str, action: str) -> list[str]:
    """The names of what `action` focused on, when the simulator's `reply` says it did ("You focus on the tin."):
    the simulator's name ("tin") and the action's ("substance in jug" -> "substance"), since the agent may spell
    the same focus either way; [] for any other reply."""
    m = _FOCUSED.match(reply.strip())
    return list(dict.fromkeys(n for n in (m.group(1).lower(), focus_head(action)) if n)) if m else []


def named_by_goal(goal: str, action: str) -> bool:
    """Every word of the focused object is in the goal (True for actions that are not a focus).

    The goal names what to focus on ("focus on the substance", "focus on the red box"), and the simulator
    qualifies a referent by where it is (`focus on thermometer in inventory`), so only the words before the first
    " in " must be named. Goals that name a category (find-*, lifespan-*, identify-life-stages-*: "find a(n)
    animal") never name the object: there this rejects the right focus too (pinned by a test)."""
    head = focus_head(action)
    return head is None or set(re.findall(r"[a-z0-9]+", head)) <= set(re.findall(r"[a-z0-9]+", goal.lower()))


def ordered_targets(goal: str) -> list[set[str]]:
    """The words of each focus the goal puts in order ("First, focus on the thermometer. Next, focus on the
    unknown substance B." -> [{thermometer}, {unknown, substance, b}])."""
    return [_words(m.group(1)) for m in _ORDERED.finditer(goal)]


def _is(target: set[str], name_words: set[str]) -> bool:
    return bool(target) and bool(name_words) and (target <= name_words or name_words <= target)


def holds_named_substance(goal: str, action: str, world: str) -> bool:
    """`focus on substance in C` focuses on whatever C holds; the world text says what that is ("a metal pot
    (containing a substance called water)"). True when the goal names it, False when it does not or C's contents are
    not in view (a focus cannot be taken back). runs/agent_sw8g3k_s1 focused the `substance in jug` in melt / freeze
    and the `substance in metal pot` in test-conductivity-of-unknown-substances: -100 each."""
    container = action.strip().lower().split(" in ")[1]  # "substance in metal pot in inventory": the pot
    m = re.search(re.escape(container) + r" \(containing ([^)]*)\)", world.lower())
    held = _words(m.group(1)) - _GENERIC if m else set()
    return bool(held & (_words(goal) - _GENERIC))


def focus_guard(goal: str, actions: list[str], focused: Sequence[str] = (), world: str = "") -> list[str]:
    """The actions without the `focus on X` that would fail the task or change nothing:

    - X not named by the goal (`named_by_goal`);
    - X focused on already (`focused`: `info["focused"]`, the names of the simulator's "You focus on the X."
      replies; a second focus changes nothing, yet runs/agent_sw8g3k's boil episode spent 10 of its 50 steps
      re-focusing the gallium);
    - X out of the goal's order: while an ordered target ("First, focus on the thermometer.") is not focused yet,
      only that target (runs/agent_sw8g3k focused the wire before the thermometer in use-thermometer, and
      runs/agent_sw8g3k_s1 the orange, named by "the orange box": -100 each); a placeholder target ("the
      substance") lets through what the goal names, but no later target; once the ordered targets are focused,
      only the goal's other focus phrases (the conditional boxes), if it has any;
    - X = `substance in C` when C does not hold a substance the goal names (`holds_named_substance`; only when
      `world`, the room and inventory text, is given).

    Keeps the list when it would empty it."""
    done = [_words(f) for f in focused]
    order = ordered_targets(goal)
    pending = next((k for k, t in enumerate(order) if not any(_is(t, d) for d in done)), None)
    # after the ordered focuses only the goal's other focus phrases are left (the conditional boxes), if any
    rest = [t for t in map(_words, _ANY.findall(goal)) if t not in order]

    def allowed(action: str) -> bool:
        head = focus_head(action)
        if head is None:
            return True
        words = _words(head)
        if not named_by_goal(goal, action) or any(words <= d for d in done):  # d may carry a state
            return False
        if world and head == "substance" and " in " in action and not holds_named_substance(goal, action, world):
            return False
        if pending is not None:
            target = order[pending]
            if target <= _PLACEHOLDER:  # "First, focus on the substance.": the goal names it elsewhere (gallium)
                return not any(words <= t for t in order[pending + 1:] + rest)
            return _is(target, words)
        return not order or any(_is(t, words) for t in rest)

    return [a for a in actions if allowed(a)] or actions
