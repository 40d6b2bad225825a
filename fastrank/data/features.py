"""The `state_action_overlap` feature mode (paper eq. 2).

    phi(o, a) = "state: " o  ⊕  "\\naction: " a  ⊕  "\\nfeatures: " psi(o, a)

psi gives word-level lexical alignment between the state text and the action: Jaccard coefficient,
token coverage both ways, and bigram overlap. The state is goal + observation (the paper's Figure 1
combines both). The ``history`` mode (not in the paper) adds a compact summary of the episode so far
(`fastrank.data.history`) after the observation, and replaces the psi features by a short note per action:
what the episode says about it (``new`` / ``taken 2x``, what was seen at a place already searched) and
which of its content words the goal names (``goal names: book sidetable``) -- the grounding signal a
compact model otherwise learns slowly (measured: a BC policy without it walked past "a book 3" on the
table for "put some book on sidetable").

The featurizer returns the text as two parts, (state, action+features), so that a
tokenizer can truncate only the state (`truncation="only_first"`) and never cut the action or the
features off a long observation.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastrank.data.goal_roles import goal_roles
from fastrank.data.page_context import item_note, listing_text, off_page, page_listing, verbatim_in
from fastrank.data.words import stem as _stem
from fastrank.data.words import words
from fastrank.envs.scienceworld_view import check_view

FEATURE_MODES = ("state_action_overlap", "state_action", "history", "state_action_overlap_compact")
# The ``history`` mode's candidate notes, versioned so a saved model reads the text it was trained on:
# 1 = new/taken, places, goal names, listing, verbatim in goal; 2 = + "puts it back where it was taken" /
# "takes back what it put there" (`EpisodeMemory.undo_note`) and WebShop's "not on this page"; 3 = the role each
# goal word plays in the action (`fastrank.data.goal_roles`: goal object / goal target / the change asked) in place
# of "goal names" where the goal and the action parse, and no empty parts; 4 = + "not heated yet" on a put of the goal
# object into the goal target before the change the goal asks; 5 = + "not on this page" for a `search[...]` on a WebShop
# page without the search box; 6 = the state's ``holding:`` says what each held object is to the goal: "tomato 4
# (goal object, not heated yet)" (`GoalRoles.held_note`); 7 = on a WebShop item page, `< prev` and `buy now` say which
# goal options the page does not offer (or that it offers them all), an over-budget price, and (`< prev`) how many
# products the episode has opened (`page_context.item_note`).
NOTES_VERSION = 7


# words that say nothing about what an action is about (for the goal match of the ``history`` mode)
_FUNCTION_WORDS = {"a", "an", "the", "to", "from", "in", "on", "with", "at", "of", "into", "onto", "and", "or",
                   "go", "take", "put", "open", "close", "look", "examine", "use", "for", "me", "find", "by"}


def goal_stems(goal: str) -> set[str]:
    return {_stem(w) for w in words(goal)}


def named_words(stems: set[str], text: str) -> list[str]:
    """The content words of `text` that the goal (its `goal_stems`) names, in order, once each."""
    return [w for w in dict.fromkeys(words(text)) if w not in _FUNCTION_WORDS and not w.isdigit() and _stem(w) in stems]


def relevance(goal: str, recent: str = ""):
    """action -> 2 x (its content words the goal names) + (those the recent text names): an order for a prefilter
    that must cut a huge action list (ScienceWorld offers ~1,700 actions a step). `recent`: the last action and what
    it returned. On 24 replayed ScienceWorld train gold paths it keeps the gold action in a 64-action cut for 76.5 %
    of states against 64.9 % for a verb-stratified random cut (fastrank/envs/scienceworld_actions.py)."""
    g, r = goal_stems(goal), goal_stems(recent)
    return lambda action: 2 * len(named_words(g, action)) + len(named_words(r, action))


def overlap_features(state: str, action: str) -> dict[str, float]:
    """Jaccard, coverage of the action's words by the state (and the reverse), bigram overlap."""
    sw, aw = words(state), words(action)
    s, a = set(sw), set(aw)
    inter = len(s & a)
    union = len(s | a)
    sb, ab = set(zip(sw, sw[1:])), set(zip(aw, aw[1:]))
    return {
        "jaccard": inter / union if union else 0.0,
        "action_coverage": inter / len(a) if a else 0.0,  # share of action words found in the state
        "state_coverage": inter / len(s) if s else 0.0,  # share of state words named by the action
        "bigram_overlap": len(sb & ab) / len(ab) if ab else 0.0,
    }


@dataclass(frozen=True)
class Featurizer:
    """Turns (goal, observation, action) into the encoder's text pair. Saved beside the weights."""

    mode: str = "state_action_overlap"
    notes: int = NOTES_VERSION  # checkpoints saved before the field load as 1 (`Reranker._init_kwargs`)
    # ScienceWorld: the observation text the model was trained on, which the env composes (the featurizer reads it
    # as given): "feedback" (the simulator's reply) or "room" (+ the room and inventory, fastrank.envs.scienceworld_view)
    observation_view: str = "feedback"

    def __post_init__(self) -> None:
        if self.mode not in FEATURE_MODES:
            raise ValueError(f"unknown feature mode {self.mode!r}; expected one of {FEATURE_MODES}")
        if not 1 <= self.notes <= NOTES_VERSION:
            raise ValueError(f"notes version {self.notes} unknown to this fastrank (1..{NOTES_VERSION})")
        check_view(self.observation_view)

    @property
    def uses_history(self) -> bool:
        return self.mode == "history"

    def texts(self, goal: str, observation: str, candidates: list[str], history=None) -> tuple[str, list[str]]:
        """(state text, one action text per candidate). `history`: the episode so far as (action,
        observation) pairs, read by the ``history`` mode only (other modes ignore it, so old checkpoints
        score exactly as before). In ``history`` mode the summary comes after the observation and newest
        first, so right-truncation drops the oldest history first; each action carries its annotation."""
        state = f"state: goal: {goal.strip()} observation: {observation.strip()}"
        if not self.uses_history:
            return state, [self.action_text(goal, observation, a) for a in candidates]
        from fastrank.data.history import EpisodeMemory

        mem = EpisodeMemory.from_turns(history or [])
        roles = goal_roles(goal) if self.notes >= 3 else None
        held = (lambda o: roles.held_note(o, mem.changed)) if roles is not None and self.notes >= 6 else None
        state += f" history: {mem.summary(held) or 'none'}"
        goal_words = goal_stems(goal)
        listing = page_listing(observation)
        out = []
        for a in candidates:
            head, title = listing_text(goal, listing, a) if listing else ("", "")  # a product id: its listing
            named = named_words(goal_words, f"{a} {title}")
            verbatim = "verbatim in goal" if verbatim_in(goal, a) else ""
            if self.notes == 1:
                # the objects the goal asks for that were seen at this place (and are still there)
                there = [o for o in mem.seen_items(a) if named_words(goal_words, o)]
                note = (mem.annotate(a, there) + (f"; {head}" if head else "")
                        + (f"; goal names: {' '.join(named)}" if named else "") + (f"; {verbatim}" if verbatim else ""))
            else:  # what decides first: a candidate's token budget cuts the note from the end
                count, _, seen = mem.annotation_parts(a)
                count += mem.undo_note(a, changed_ok=self.notes >= 4) + (
                    "; not on this page" if off_page(observation, a, searches=self.notes >= 5) else "") + (
                    item_note(goal, observation, a, history) if self.notes >= 7 else "")
                note = "; ".join(p for p in (count, head, *self._goal_parts(mem, roles, goal_words, a, named, verbatim),
                                             seen) if p)
            out.append(f"action: {a.strip()} ({note})" + (f" {title}" if title else ""))
        return state, out

    def _goal_parts(self, mem, roles, goal_words, action, named, verbatim) -> tuple[str, ...]:
        """What the goal says about the action, then what lies at its place that the goal asks for (notes >= 2)."""
        role_note = roles.action_roles(action, mem.changed if self.notes >= 4 else None) if roles is not None else None
        if role_note is None:  # no roles (notes 2, or a goal / action that does not parse): the goal's words
            goal_note = f"goal names: {' '.join(named)}" if named else ""
            there = [o for o in mem.seen_items(action) if named_words(goal_words, o)]
            items = f"goal items there: {', '.join(there)}" if there else ""
            if self.notes == 2:  # v2 models were trained on the mark inside this part: "new; ; verbatim in goal"
                return goal_note + (f"; {verbatim}" if verbatim else ""), items
            return goal_note, verbatim, items
        items = mem.seen_items(action)
        found = [f"{r} there: {', '.join(o for o in items if roles.role(o) == r)}"
                 for r in ("goal object", "goal target") if any(roles.role(o) == r for o in items)]
        return (role_note, verbatim, *found)

    def state_text(self, goal: str, observation: str, history=None) -> str:
        return self.texts(goal, observation, [], history)[0]

    def action_text(self, goal: str, observation: str, action: str) -> str:
        text = f"action: {action.strip()}"
        if self.mode.startswith("state_action_overlap"):
            f = overlap_features(f"{goal} {observation}", action)
            if self.mode == "state_action_overlap":
                text += "\nfeatures: " + " ".join(f"{k}={v:.2f}" for k, v in f.items())
            else:  # compact: the same four numbers as percentages, named once: ~6 tokens where the paper's text
                # takes ~30, which in a 128-token pair is a quarter of the budget and most of a shared-prefix candidate
                text += "\noverlap: " + " ".join(str(round(100 * v)) for v in f.values())
        return text

    def pairs(self, goal: str, observation: str, candidates: list[str], history=None) -> list[tuple[str, str]]:
        """One (state, action+features) text pair per candidate."""
        state, actions = self.texts(goal, observation, list(candidates), history)
        return [(state, a) for a in actions]

    def to_dict(self) -> dict:
        return {"mode": self.mode, "notes": self.notes, "observation_view": self.observation_view}
