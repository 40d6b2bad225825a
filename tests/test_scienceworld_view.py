"""The ScienceWorld observation views (fastrank.envs.scienceworld_view) on real simulator texts."""
import pytest

from fastrank.data.features import Featurizer
from fastrank.envs.scienceworld_view import compact_inventory, compact_look, observation_view

KITCHEN = ("This room is called the kitchen. In it, you see: \n\tthe agent\n\ta substance called air\n"
           "\ta chair. On the chair is: nothing.\n"
           "\ta counter. On the counter is: a bowl (containing a red apple, a banana, an orange, a potato), a drawer.\n"
           "\ta cupboard. The cupboard door is closed. \n\ta glass jar (containing a substance called sodium chloride)\n"
           "\ta sink, which is turned off. In the sink is: nothing.\n\ta stopwatch, which is deactivated.\n"
           "\ta thermometer, currently reading a temperature of 10 degrees celsius\n"
           "You also see:\n\tA door to the bathroom (that is closed)\n\tA door to the hallway (that is open)\n")
INVENTORY = "In your inventory, you see:\n\tan orange\n\ta metal pot (containing nothing)\n"


def test_compact_look_keeps_every_object_and_door():
    assert compact_look(KITCHEN) == (
        "room: kitchen; here: chair (on it: nothing); counter (on it: bowl (containing red apple, banana, orange, "
        "potato), drawer); cupboard (closed); glass jar (containing sodium chloride); sink (off) (in it: nothing); "
        "stopwatch (deactivated); thermometer, currently reading a temperature of 10 degrees celsius; "
        "doors: bathroom (closed), hallway (open)")
    assert compact_look("") == ""


def test_compact_inventory():
    assert compact_inventory(INVENTORY) == "inventory: orange; metal pot (empty)"
    assert compact_inventory("In your inventory, you see:\n") == "inventory: nothing"


def test_observation_views():
    assert observation_view("You move to the kitchen.", KITCHEN, INVENTORY) == "You move to the kitchen."
    room = observation_view("You move to the kitchen.", KITCHEN, INVENTORY, "room")
    assert room == f"feedback: You move to the kitchen. | {compact_look(KITCHEN)} | inventory: orange; metal pot (empty)"
    # after `look around` (and at reset) the reply is the room itself: said once
    looked = observation_view(KITCHEN, KITCHEN, INVENTORY, "room")
    assert looked.startswith("feedback: you look around | room: kitchen") and looked.count("room: kitchen") == 1
    with pytest.raises(ValueError, match="observation view"):
        observation_view("x", KITCHEN, INVENTORY, "look")


def test_the_view_is_saved_with_the_featurizer():
    f = Featurizer("history", observation_view="room")
    assert Featurizer(**f.to_dict()) == f
    assert Featurizer(**{"mode": "history", "notes": 7}).observation_view == "feedback"  # older checkpoints
    with pytest.raises(ValueError, match="observation view"):
        Featurizer("history", observation_view="look")
