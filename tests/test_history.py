"""The ``history`` feature mode: episode summary, truncation order, and checkpoints that carry it."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, BertConfig

from fastrank.data.features import NOTES_VERSION, Featurizer
from fastrank.data.history import EpisodeMemory, summarize_history
from fastrank.model import PRESETS, Reranker

TURNS = [
    ("go to countertop 1", "On the countertop 1, you see a bread 1, and a knife 2."),
    ("go to drawer 1", "The drawer 1 is closed."),
    ("open drawer 1", "You open the drawer 1. The drawer 1 is open. In it, you see nothing."),
    ("go to countertop 2", "On the countertop 2, you see a apple 1."),
    ("take apple 1 from countertop 2", "You pick up the apple 1 from the countertop 2."),
    ("go to sinkbasin 1", "On the sinkbasin 1, you see nothing."),
    ("clean apple 1 with sinkbasin 1", "You clean the apple 1 using the sinkbasin 1."),
    ("examine sinkbasin 1", "Nothing happens."),
]


def test_memory_tracks_holding_progress_and_searched_places():
    mem = EpisodeMemory.from_turns(TURNS)
    assert mem.holding == ["apple 1"]
    assert mem.done == ["take apple 1 from countertop 2", "clean apple 1 with sinkbasin 1"]  # not "examine"
    # one entry per place, the drawer's newest observation (opened: empty) replaces "closed"; the apple
    # taken from countertop 2 is no longer listed there
    assert mem.searched == {"countertop 1": ["bread 1", "knife 2"], "drawer 1": [],
                            "countertop 2": [], "sinkbasin 1": []}
    text = mem.summary()
    assert text.startswith("holding: apple 1 (cleaned) | done: clean apple 1 with sinkbasin 1; take apple 1")
    assert "countertop 2: nothing" in text and "countertop 1: bread 1, knife 2" in text
    assert "recent: examine sinkbasin 1 -> Nothing happens.; clean apple 1" in text  # newest first
    assert text.index("searched: sinkbasin 1") < text.index("countertop 1: bread 1")


def test_candidates_are_annotated_with_what_the_episode_says_about_them():
    mem = EpisodeMemory.from_turns(TURNS + [("go to countertop 1", "On the countertop 1, you see a bread 1.")])
    assert mem.annotate("go to countertop 1") == "taken 2x; seen there: bread 1"
    assert mem.annotate("open drawer 1") == "taken 1x; seen there: nothing"
    assert mem.annotate("go to fridge 1") == "new; unvisited"
    assert mem.annotate("inventory") == "new"  # not a place
    state, actions = Featurizer("history").texts("g", "o", ["go to fridge 1", "go to drawer 1"], TURNS)
    assert actions == ["action: go to fridge 1 (new; unvisited)",
                       "action: go to drawer 1 (taken 1x; seen there: nothing)"]
    assert Featurizer().texts("g", "o", ["go to drawer 1"], TURNS)[1][0].startswith("action: go to drawer 1\nfeatures:")


def test_actions_say_which_of_their_words_the_goal_names():
    _, actions = Featurizer("history", notes=2).texts("put two cellphones in drawer.", "o",
                                             ["take cellphone 2 from bed 1", "put cellphone 2 in/on drawer 1",
                                              "go to desk 1"], [])
    assert actions == ["action: take cellphone 2 from bed 1 (new; goal names: cellphone)",
                       "action: put cellphone 2 in/on drawer 1 (new; goal names: cellphone drawer)",
                       "action: go to desk 1 (new; unvisited)"]  # function words and numbers are never "named"
    # v3: the role each named word plays (fastrank.data.goal_roles)
    _, v3 = Featurizer("history").texts("put two cellphones in drawer.", "o",
                                        ["take cellphone 2 from bed 1", "put cellphone 2 in/on drawer 1"], [])
    assert v3 == ["action: take cellphone 2 from bed 1 (new; goal object)",
                  "action: put cellphone 2 in/on drawer 1 (new; goal object, in/on goal target)"]


def test_undoing_a_take_or_a_put_is_said_beside_the_action():
    """A BC policy put the goal object straight back where it lay (33 of 39 train states wrong): the note
    says so. Only the place it came from counts, and only while it is held."""
    mem = EpisodeMemory.from_turns(TURNS[:5])  # holding apple 1, taken from countertop 2
    assert mem.undo_note("put apple 1 in/on countertop 2") == "; puts it back where it was taken"
    assert mem.undo_note("put apple 1 in/on fridge 1") == ""
    assert mem.undo_note("take bread 1 from countertop 1") == ""
    mem.add("go to fridge 1", "The fridge 1 is open. In it, you see nothing.")
    mem.add("put apple 1 in/on fridge 1", "You put the apple 1 in/on the fridge 1.")
    assert mem.undo_note("take apple 1 from fridge 1") == "; takes back what it put there"
    assert mem.undo_note("put apple 1 in/on countertop 2") == ""  # no longer held
    _, acts = Featurizer("history").texts("put a apple in fridge.", "o", ["put apple 1 in/on countertop 2"], TURNS[:5])
    assert acts == ["action: put apple 1 in/on countertop 2 (new; puts it back where it was taken; goal object)"]


def test_notes_version_1_keeps_the_old_text_and_version_2_puts_what_decides_first(tmp_path):
    """Saved models read the notes they were trained on: v1 (no `notes` key in the checkpoint) keeps the
    old order, where a 32-token candidate budget cut "goal names: desk" after a long "seen there" list."""
    import json

    turns = [("go to desk 1", "On the desk 1, you see a book 2, a cd 3, a pencil 1, a pencil 2, and a bowl 1."),
             ("go to sidetable 1", "On the sidetable 1, you see a alarmclock 1, and a pen 2."),
             ("take alarmclock 1 from sidetable 1", "You pick up the alarmclock 1 from the sidetable 1.")]
    cands = ["go to desk 1", "put alarmclock 1 in/on sidetable 1"]
    v1 = Featurizer("history", notes=1).texts("put a alarmclock in desk.", turns[-1][1], cands, turns)[1]
    v2 = Featurizer("history", notes=2).texts("put a alarmclock in desk.", turns[-1][1], cands, turns)[1]
    assert v1 == ["action: go to desk 1 (taken 1x; seen there: book 2, cd 3, pencil 1, pencil 2, ...; goal names: desk)",
                  "action: put alarmclock 1 in/on sidetable 1 (new; goal names: alarmclock)"]
    assert v2 == ["action: go to desk 1 (taken 1x; goal names: desk; seen there: book 2, cd 3, pencil 1, pencil 2, ...)",
                  "action: put alarmclock 1 in/on sidetable 1 (new; puts it back where it was taken; goal names: alarmclock)"]
    with pytest.raises(ValueError, match="notes version"):
        Featurizer("history", notes=9)
    path = _tiny("shared_prefix").save_pretrained(tmp_path / "latest")
    assert Reranker.from_pretrained(path).featurizer.notes == NOTES_VERSION == 7
    meta = json.loads((path / "fastrank.json").read_text())
    del meta["featurizer"]["notes"]  # a checkpoint saved before the field
    (path / "fastrank.json").write_text(json.dumps(meta))
    assert Reranker.from_pretrained(path).featurizer == Featurizer("history", notes=1)


def test_put_releases_and_failed_actions_do_not_count():
    turns = TURNS[:5] + [("go to fridge 1", "The fridge 1 is closed."),
                         ("put apple 1 in/on fridge 1", "You put the apple 1 in/on the fridge 1."),
                         ("heat apple 1 with fridge 1", "Nothing happens.")]
    mem = EpisodeMemory.from_turns(turns)
    assert mem.holding == [] and mem.done[-1] == "put apple 1 in/on fridge 1"
    assert mem.searched["countertop 2"] == []  # taken from there ...
    assert "fridge 1: closed" in mem.summary()  # ... and put into a place never seen open: no object list
    assert summarize_history([]) == "" and summarize_history(None) == ""


def test_objects_move_with_the_agent_and_goal_items_are_flagged_where_seen():
    turns = [("go to countertop 1", "On the countertop 1, you see a apple 2, a bread 1, and a apple 1."),
             ("go to countertop 2", "On the countertop 2, you see a cellphone 3."),
             ("take cellphone 3 from countertop 2", "You pick up the cellphone 3 from the countertop 2."),
             ("go to bed 1", "On the bed 1, you see nothing."),
             ("put cellphone 3 in/on bed 1", "You put the cellphone 3 in/on the bed 1.")]
    mem = EpisodeMemory.from_turns(turns)
    assert mem.searched == {"countertop 1": ["apple 2", "bread 1", "apple 1"], "countertop 2": [],
                            "bed 1": ["cellphone 3"]}
    assert mem.seen_items("go to countertop 1") == ["apple 2", "bread 1", "apple 1"]
    assert mem.seen_items("take apple 1 from countertop 1") == []  # not a place
    _, actions = Featurizer("history").texts("put two apples in fridge.", "o",
                                             ["go to countertop 1", "go to countertop 2", "go to bed 1"], turns)
    assert actions[0] == ("action: go to countertop 1 (taken 1x; goal object there: apple 2, apple 1; "
                          "seen there: apple 2, bread 1, apple 1)")
    assert " there:" not in actions[1].replace("seen there", "") and "goal object" not in actions[2]
    _, v2 = Featurizer("history", notes=2).texts("put two apples in fridge.", "o", ["go to countertop 1"], turns)
    assert v2[0] == "action: go to countertop 1 (taken 1x; goal items there: apple 2, apple 1; seen there: apple 2, bread 1, apple 1)"


def test_state_text_truncation_drops_the_oldest_history_first():
    tok = AutoTokenizer.from_pretrained(PRESETS["minilm"])
    feat = Featurizer("history")
    goal, obs = "put a clean apple in fridge.", "On the sinkbasin 1, you see nothing."
    full = feat.state_text(goal, obs, TURNS)
    ids = tok(full, truncation=True, max_length=60)["input_ids"]
    cut = tok.decode(ids, skip_special_tokens=True)
    assert len(tok(full)["input_ids"]) > 60  # the cut is real
    assert cut.startswith("state : goal : put a clean apple in fridge. observation : on the sinkbasin 1")
    assert "holding : apple 1" in cut  # newest facts survive
    assert "countertop 1 : bread" not in cut and "countertop 1 : bread" in tok.decode(tok(full)["input_ids"], skip_special_tokens=True)  # the oldest searched place went first
    # modes without history ignore it, so old checkpoints score exactly as before
    assert Featurizer().state_text(goal, obs, TURNS) == Featurizer().state_text(goal, obs)


def _tiny(layout: str, mode: str = "history") -> Reranker:
    tok = AutoTokenizer.from_pretrained(PRESETS["minilm"])
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256)
    torch.manual_seed(0)
    return Reranker.from_config(cfg, tok, featurizer=Featurizer(mode), max_length=96, layout=layout).eval()


@pytest.mark.parametrize("layout", ["shared_prefix", "pairs"])
def test_history_checkpoint_round_trip(tmp_path, layout):
    model = _tiny(layout)
    cands = ["go to fridge 1", "take apple 1 from countertop 2", "look"]
    before = model.score("put a clean apple in fridge.", "You clean the apple 1.", cands, history=TURNS)
    no_hist = model.score("put a clean apple in fridge.", "You clean the apple 1.", cands)
    assert not torch.allclose(before, no_hist)  # the history reaches the scores
    back = Reranker.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert back.layout == layout and back.featurizer.mode == "history"
    after = back.score("put a clean apple in fridge.", "You clean the apple 1.", cands, history=TURNS)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_checkpoint_without_layout_key_loads_as_pairs(tmp_path):
    import json

    path = _tiny("pairs", mode="state_action_overlap").save_pretrained(tmp_path / "old")
    meta = json.loads((path / "fastrank.json").read_text())
    del meta["layout"]
    (path / "fastrank.json").write_text(json.dumps(meta))
    back = Reranker.from_pretrained(path)
    assert back.layout == "pairs"
    s = back.score("g", "o", ["a", "b"], history=TURNS)  # history is accepted and ignored
    torch.testing.assert_close(s, back.score("g", "o", ["a", "b"]))
