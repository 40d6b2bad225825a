"""What a ScienceWorld agent is shown as its observation: the simulator's feedback alone, or with the room.

ScienceWorld answers `go to kitchen` with "You move to the kitchen." and nothing about what is there: a policy
that reads only that feedback toured the house and never saw the substance it was asked to boil (runs/agent_sw4s:
no `focus on` in ten episodes). The ScienceWorld paper's agents (DRRN, KG-A2C, CALM) all read the free `look around`
and `inventory` texts beside the feedback; `view="room"` does the same, compacted so it fits a small encoder:

    feedback: You move to the kitchen. | room: kitchen; here: chair (on it: nothing); counter (on it: bowl
    (containing red apple, banana), drawer); fridge (closed); ...; doors: hallway (open), outside (closed) |
    inventory: thermometer, currently reading a temperature of 10 degrees celsius

The same function composes the training states (from a replayed Step's `meta["look"]` / `meta["inventory"]`) and the
evaluation states (`ScienceWorldEnv(observation_view="room")`), so both read identical text. A model records the
view it was trained on (`Featurizer.observation_view`); `fastrank agent-eval` builds its env with it.
"""
from __future__ import annotations

import re

VIEWS = ("feedback", "room")

_ROOM = re.compile(r"called the (.+?)\.", re.I)
_ARTICLE = re.compile(r"^(?:a|an|the)\s+", re.I)
_SKIP = {"the agent", "a substance called air"}
_DOOR = re.compile(r"^a door to the (.+?) \(that is (open|closed)\)$", re.I)
_ON_IN = re.compile(r"\. (On|In) the [^.:]+? is: (.+?)\.?$", re.I)


def check_view(view: str) -> str:
    """`view`, or a ValueError naming the views there are."""
    if view not in VIEWS:
        raise ValueError(f"unknown ScienceWorld observation view {view!r}; expected one of {VIEWS}")
    return view


def _item(line: str) -> str:
    """One object line of a `look around`, shorter: articles, 'a substance called' and 'The X door is' go."""
    t = _ARTICLE.sub("", line.strip().rstrip(".").strip())
    t = re.sub(r"\b(?:a )?substance called ", "", t, flags=re.I)
    # the articles inside a list: "(containing a red apple, a banana"
    t = re.sub(r"(^|[(:,] ?|containing )(?:a|an) ", r"\1", t, flags=re.I)
    t = re.sub(r"\. The (.+?) door is (open|closed)", r" (\2)", t, flags=re.I)
    t = re.sub(r", which is (?:turned )?(on|off|activated|deactivated)", r" (\1)", t, flags=re.I)
    t = _ON_IN.sub(lambda m: f" ({m.group(1).lower()} it: {m.group(2)})", t)
    t = re.sub(r"\(containing nothing\)", "(empty)", t)
    return t.rstrip(". ").strip()


def compact_look(look: str) -> str:
    """'room: kitchen; here: ...; doors: ...' from the simulator's `look around` text ('' for an empty text)."""
    if not look or not look.strip():
        return ""
    lines = look.replace("\r", "").split("\n")
    m = _ROOM.search(lines[0])
    name = m.group(1) if m else _ARTICLE.sub("", lines[0].strip())[:40]
    here, doors, in_doors = [], [], False
    for line in lines[1:]:
        s = line.strip()
        if not s:
            continue
        if s.lower().startswith("you also see"):
            in_doors = True
            continue
        d = _DOOR.match(s)
        if d:
            doors.append(f"{d.group(1)} ({d.group(2)})")
        elif in_doors or s.lower().rstrip(".") not in _SKIP:
            here.append(_item(s))
    out = f"room: {name}; here: {'; '.join(here) or 'nothing'}"
    return out + (f"; doors: {', '.join(doors)}" if doors else "")


def compact_inventory(inventory: str) -> str:
    """'inventory: orange; thermometer, ...' ('inventory: nothing' when it is empty)."""
    items = [_item(s) for s in (inventory or "").replace("\r", "").split("\n")[1:] if s.strip()]
    return "inventory: " + ("; ".join(items) or "nothing")


def observation_view(feedback: str, look: str | None, inventory: str | None, view: str = "feedback") -> str:
    """The observation text a policy reads. `feedback`: the simulator's reply to the last action (after a reset or
    a `look around`, the look text itself, which is then not repeated)."""
    if check_view(view) == "feedback":
        return feedback
    fb = feedback.strip()
    room = compact_look(look or "")
    if look and fb == look.strip():  # `look around` / reset: the feedback is the room itself
        fb = "you look around"
    parts = [f"feedback: {' '.join(fb.split())}"] + ([room] if room else []) + [compact_inventory(inventory or "")]
    return " | ".join(parts)
