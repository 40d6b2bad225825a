"""ScienceWorld agent data (fastrank.data.scienceworld_agent) and the focus guard, on the real shared data.

The fast tests read the shared gold files (no simulator); the slow one replays a real gold path through
the simulator and checks that the training states are what the evaluation env shows the agent."""
import gzip
import json

import pytest

from test_scienceworld import SW_DATA, _need, needs_sim

from fastrank.agent_eval import focus_guard
from fastrank.data.record import Step
from fastrank.data.scienceworld_agent import (
    HeldOutVariationError,
    agent_sets,
    assert_train_only,
    episodes_of,
    focus_named,
    gold_file_steps,
    train_pairs,
)
from fastrank.envs.scienceworld_tasks import eto_split_pairs


@pytest.fixture(scope="module")
def file_steps():
    _need(SW_DATA / "gold_train_var_30ep_validsample.jsonl.gz")
    return gold_file_steps()


@pytest.fixture(scope="module")
def file_sets(file_steps):
    return agent_sets(file_steps, max_negatives=11)


def _gold_episodes(name="gold_train_var_50ep.jsonl.gz"):
    with gzip.open(_need(SW_DATA / name), "rt") as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------ the set builder

def test_history_is_the_episode_so_far_in_order(file_steps, file_sets):
    sets, _ = file_sets
    eps = episodes_of(file_steps)
    by_key = {(cs.episode_id, cs.step): cs for cs in sets}
    boil = eps["scienceworld/boil/0"]
    assert [s.expert_action for s in boil[:3]] == ["open door to kitchen", "go to kitchen", "look around"]
    checked = 0
    for eid, ep in eps.items():
        for i, s in enumerate(ep):
            cs = by_key.get((eid, s.step))
            if cs is None:
                continue
            assert len(cs.history) == i
            # pair j = (action j, the feedback it produced = the observation of decision j + 1), oldest first
            assert cs.history == [[ep[j].expert_action, ep[j + 1].observation] for j in range(i)]
            if i:
                assert cs.history[-1][1] == cs.observation  # the newest pair led to the current state
            checked += 1
    assert checked == len(sets) > 200


def test_gold_action_is_the_label_and_negatives_are_valid_actions(file_steps, file_sets):
    sets, stats = file_sets
    steps = {(s.episode_id, s.step): s for s in file_steps}
    positions = set()
    for cs in sets:
        cs.validate()
        s = steps[(cs.episode_id, cs.step)]
        assert cs.env == "scienceworld" and cs.expert_action == s.expert_action
        assert cs.sources[cs.expert_index] == "expert" and cs.sources.count("expert") == 1
        assert set(cs.candidates) <= set(s.admissible)  # every negative is a valid action of that state
        assert 2 <= len(cs.candidates) <= 12
        positions.add(cs.expert_index)
    assert len(positions) > 5  # the label is not always in the same slot
    assert stats.sets == len(sets) and stats.not_labelled > 0


def test_wrong_focus_negatives(file_sets):
    sets, stats = file_sets
    assert stats.with_wrong_focus > 0.3 * stats.sets  # from 40 uniformly sampled valid actions per state
    # gold states that are themselves a focus: the wrong focus among their negatives is never the gold
    focus_sets = [cs for cs in sets if cs.expert_action.startswith("focus on ")]
    assert focus_sets
    for cs in sets:
        wrong = [a for i, a in enumerate(cs.candidates) if i != cs.expert_index and a.startswith("focus on ")]
        assert len(wrong) <= 4 and cs.expert_action not in wrong


def _step(goal, expert, admissible, step=0, gold_focus_later=None):
    return Step(env="scienceworld", episode_id="scienceworld/measure-melting-point-known-substance/40", step=step,
                task_type="measure-melting-point-known-substance", goal=goal, observation="obs",
                expert_action=expert, admissible=admissible, meta={"canonical_method": "parser"})


def test_wrong_focus_named_by_the_goal_come_first_and_right_targets_are_spared():
    goal = ("Your task is to measure the melting point of chocolate. First, focus on the thermometer. Next, focus on "
            "the chocolate. If the melting point is above 50 degrees, focus on the blue box. Otherwise, focus on the "
            "orange box.")
    unnamed = [f"focus on {x}" for x in ("air", "agent", "cupboard", "fridge", "sink", "table", "lighter")]
    others = [f"open {x}" for x in ("cupboard", "fridge", "freezer")] + [f"connect a{i} to b{i}" for i in range(30)]
    adm = sorted(["pick up thermometer", "focus on thermometer", "focus on orange box", "focus on blue box",
                  *unnamed, *others])
    steps = [_step(goal, "pick up thermometer", adm, 0), _step(goal, "focus on thermometer", adm, 1),
             _step(goal, "focus on blue box", adm, 2)]
    sets, stats = agent_sets(steps, max_negatives=11, max_wrong_focus=4)
    cs = sets[0]
    wrong = [a for a in cs.candidates if a.startswith("focus on ")]
    # the gold path focuses on the thermometer and the blue box later: right objects, never negatives;
    # the orange box is the goal-named wrong answer (it passes the focus guard): always kept
    assert "focus on thermometer" not in cs.candidates and "focus on blue box" not in cs.candidates
    assert "focus on orange box" in wrong and len(wrong) == 4
    assert len(cs.candidates) == 12 and cs.expert_action == "pick up thermometer"
    assert stats.wrong_focus_named == 3  # one per set
    assert sets[1].history == [["pick up thermometer", "obs"]]
    with pytest.raises(ValueError, match="max_wrong_focus"):
        agent_sets(steps, max_negatives=3, max_wrong_focus=4)
    guarded, _ = agent_sets(steps, max_negatives=11, max_wrong_focus=4, guarded_focus=True)
    for cs in guarded:  # only the wrong focus the evaluation's guard offers: the orange box
        wrong = [a for i, a in enumerate(cs.candidates) if i != cs.expert_index and a.startswith("focus on ")]
        assert wrong == ["focus on orange box"] and len(cs.candidates) == 12


def test_sibling_negatives_share_the_gold_verb():
    goal = "Your task is to turn on the electric buzzer. First, focus on the electric buzzer."
    doors = [f"open door to {r}" for r in ("kitchen", "workshop", "bedroom", "greenhouse", "art studio")]
    adm = sorted(doors + [f"connect a{i} to b{i}" for i in range(30)] + [f"pour c{i} into d{i}" for i in range(30)]
                 + ["look around", "wait1", "go to hallway"])
    steps = [_step(goal, "open door to workshop", adm, 0)]
    (plain,), _ = agent_sets(steps, max_negatives=6, max_wrong_focus=0)
    (sib,), _ = agent_sets(steps, max_negatives=6, max_wrong_focus=0, max_siblings=3)
    opens = lambda cs: [a for i, a in enumerate(cs.candidates) if i != cs.expert_index and a.startswith("open ")]
    assert len(opens(sib)) >= 3 and len(sib.candidates) == 7 and sib.expert_action == "open door to workshop"
    assert len(opens(plain)) <= 1  # one slot per verb: the contrast the policy needs was rare
    with pytest.raises(ValueError, match="max_siblings"):
        agent_sets(steps, max_negatives=6, max_wrong_focus=4, max_siblings=3)


def test_staples_are_negatives_unless_they_are_the_label():
    goal = "Your task is to boil water. First, focus on the substance."
    adm = sorted(["wait1", "wait", "look around", "inventory", "open oven", "activate stove"]
                 + [f"open drawer {i}" for i in range(20)])
    steps = [_step(goal, "activate stove", adm, 0), _step(goal, "wait1", adm, 1)]
    plain, _ = agent_sets(steps, max_negatives=3, max_wrong_focus=0)
    with_staples, _ = agent_sets(steps, max_negatives=3, max_wrong_focus=0, staples=True)
    assert len(plain[0].candidates) == 4  # the cut by goal words: none of the staples is certain to be there
    first, second = with_staples
    assert {"wait1", "wait", "look around", "inventory"} <= set(first.candidates)
    assert first.expert_action == "activate stove" and len(set(first.candidates)) == len(first.candidates)
    assert second.expert_action == "wait1" and second.candidates.count("wait1") == 1


def test_only_eto_train_variations(file_steps):
    train = set(eto_split_pairs("train"))
    held_out = set(eto_split_pairs("test")) | set(eto_split_pairs("dev"))
    pairs = train_pairs(3)
    assert len(pairs) == 72 and len({t for t, _ in pairs}) == 24
    assert all(p in train and p not in held_out for p in pairs)
    got = {(s.task_type, s.meta["variation"]) for s in file_steps}
    assert got and got <= train and not got & held_out
    # the file also holds 9 episodes that are in no ETO split (e.g. use-thermometer/0): left out
    assert ("use-thermometer", 0) not in got and len({s.episode_id for s in file_steps}) == 21
    test_pair = eto_split_pairs("test")[0]
    with pytest.raises(HeldOutVariationError):
        assert_train_only([pairs[0], test_pair])
    with pytest.raises(HeldOutVariationError):
        assert_train_only([("use-thermometer", 0)])  # not in ETO train either


def test_observation_is_the_feedback_the_eval_env_returns(file_steps):
    """`ScienceWorldEnv` states hold the simulator's feedback to the last action (reset: `look around`),
    never the free look / inventory texts: the training states must too."""
    boil = episodes_of(file_steps)["scienceworld/boil/0"]
    assert boil[0].observation.startswith("This room is called the hallway")
    assert boil[1].observation == "The door is now open."
    assert boil[2].observation == "You move to the kitchen."
    assert "In your inventory" not in boil[3].observation


def test_room_view_states_and_history_carry_the_room_and_inventory(file_steps):
    """view="room": every state and every history turn is the feedback + the compacted room + inventory of that
    state (the free look texts the shared file recorded), so the kitchen's contents are seen on arriving there."""
    sets, _ = agent_sets(file_steps, max_negatives=11, view="room")
    plain = {(cs.episode_id, cs.step): cs for cs in agent_sets(file_steps, max_negatives=11)[0]}
    boil = {cs.step: cs for cs in sets if cs.episode_id == "scienceworld/boil/0"}
    arrive = boil[3]  # after open door to kitchen, go to kitchen, look around: the state after `go to kitchen`
    moved = boil[2].observation
    assert moved.startswith("feedback: You move to the kitchen. | room: kitchen; here: ") and "stove" in moved
    assert "inventory: " in moved and "In your inventory" not in moved
    assert arrive.history[-1][1] == arrive.observation and arrive.history[1][1] == moved
    for cs in sets:  # same labels and candidates as the feedback view: only the texts differ
        twin = plain[(cs.episode_id, cs.step)]
        assert (cs.candidates, cs.expert_index) == (twin.candidates, twin.expert_index)
        assert cs.observation.startswith("feedback: ") and len(cs.history) == len(twin.history)


# ------------------------------------------------------------------------------------------ focus guard

@pytest.mark.parametrize("task", ["boil", "melt", "freeze", "change-the-state-of-matter-of", "use-thermometer",
                                  "measure-melting-point-known-substance", "power-component",
                                  "power-component-renewable-vs-nonrenewable-energy", "test-conductivity",
                                  "test-conductivity-of-unknown-substances", "chemistry-mix", "grow-fruit"])
def test_focus_guard_keeps_the_gold_focus_of_real_goals(task):
    eps = [e for e in _gold_episodes() if e["task"] == task]
    assert eps
    for e in eps:
        gold = [s["action"] for s in e["steps"] if s["action"].startswith("focus on ")]
        assert gold
        for a in gold:  # `focus on substance in metal pot`: the location qualifier is not what is focused
            assert focus_named(e["goal"], a), (e["goal"], a)


def test_focus_guard_drops_objects_the_goal_does_not_name():
    boil = next(e for e in _gold_episodes() if e["task"] == "boil")
    acts = ["focus on substance in metal pot", "focus on air", "focus on metal pot", "focus on thermometer",
            "focus on sink", "pick up metal pot", "focus on orange in inventory"]
    assert focus_guard(boil["goal"], acts) == ["focus on substance in metal pot", "pick up metal pot"]
    meas = next(e for e in _gold_episodes() if e["task"] == "measure-melting-point-known-substance")
    # both boxes are named: choosing between them is the model's job, not the guard's
    ordered = [a.split("focus on ", 1)[1].split(" in ", 1)[0] for s in meas["steps"]
               if (a := s["action"]).startswith("focus on ") and "box" not in a]  # the thermometer, the substance
    assert focus_guard(meas["goal"], ["focus on blue box", "focus on orange box", "focus on red box"], ordered) == [
        "focus on blue box", "focus on orange box"]
    assert focus_guard(boil["goal"], ["focus on air"]) == ["focus on air"]  # never empties the list


def test_focus_guard_known_limit_category_goals():
    """Goals that name a category ("find a(n) animal") never name the object: the guard drops the gold focus
    there (none of these tasks is in the 10-task test sample). Pinned so a change of the rule is seen."""
    for task in ("find-animal", "lifespan-longest-lived"):
        e = next(e for e in _gold_episodes() if e["task"] == task)
        gold = next(s["action"] for s in e["steps"] if s["action"].startswith("focus on "))
        assert not focus_named(e["goal"], gold)


# ---------------------------------------------------------------------------------------- simulator

@pytest.mark.slow
@needs_sim
@pytest.mark.parametrize("view", ["feedback", "room"])
def test_replayed_sets_match_what_the_eval_env_shows(tmp_path, view):
    """Replay a real ETO train gold path, build its sets, then play the labels in the evaluation env: at every
    labelled state the env's observation and the agent's memory equal the set's observation and history."""
    from fastrank.data.history import EpisodeMemory
    from fastrank.data.scienceworld_agent import replay_steps
    from fastrank.envs.scienceworld import ScienceWorldEnv

    pair = train_pairs(1, tasks=["power-component"])[0]
    res = replay_steps([pair], tmp_path / "cache.jsonl", progress=False)
    assert res.episodes == 1 and not res.failures
    sets, stats = agent_sets(res.steps, max_negatives=11, view=view)
    assert stats.sets >= 5 and stats.with_wrong_focus == stats.sets  # a room full of focusable objects
    by_step = {cs.step: cs for cs in sets}
    env = ScienceWorldEnv(max_admissible=64, step_limit=100, observation_view=view)
    try:
        state, mem = env.reset(pair), EpisodeMemory()
        for s in sorted(res.steps, key=lambda s: s.step):
            cs = by_step.get(s.step)
            if cs is not None:
                assert state.observation == cs.observation
                assert (" | room: " in cs.observation) == (view == "room")
                assert [list(t) for t in mem.turns] == cs.history
                assert set(cs.candidates) <= set(env.valid_actions())
            state = env.step(s.expert_action)
            mem.add(s.expert_action, state.observation)
        assert state.won
    finally:
        env.close()


def test_focus_guard_drops_an_object_already_focused():
    goal = ("Your task is to boil gallium. For compounds without a boiling point, combusting the substance is also "
            "acceptable. First, focus on the substance. Then, take actions that will cause it to change its state of "
            "matter.")  # the goal of the test sample's boil task
    acts = ["focus on gallium", "focus on gallium in metal pot", "focus on substance in metal pot", "move gallium to pot"]
    assert focus_guard(goal, acts) == acts[:3] + acts[3:]
    assert focus_guard(goal, acts, focused=("gallium",)) == ["focus on substance in metal pot", "move gallium to pot"]
    assert focus_guard(goal, ["focus on gallium"], focused=("gallium",)) == ["focus on gallium"]  # never empty


def _goal(task):
    return next(e for e in _gold_episodes() if e["task"] == task)["goal"]


def test_focus_guard_follows_the_order_the_goal_gives():
    goal = _goal("use-thermometer")  # "First, focus on the thermometer. Next, focus on the unknown substance B."
    sub, thermo = "focus on unknown substance B in inventory", "focus on thermometer in inventory"
    assert focus_guard(goal, [sub, thermo, "wait"]) == [thermo, "wait"]
    assert focus_guard(goal, [sub, thermo, "wait"], focused=("thermometer",)) == [sub, "wait"]
    assert focus_guard(goal, [sub, "wait"], focused=("thermometer", "unknown substance B")) == ["wait"]

    goal = _goal("measure-melting-point-known-substance")  # thermometer, chocolate, then one of two boxes
    acts = ["focus on blue box", "focus on orange box", "focus on chocolate", "focus on thermometer in inventory"]
    assert focus_guard(goal, acts) == acts[3:]
    assert focus_guard(goal, acts, focused=("thermometer",)) == ["focus on chocolate"]
    assert focus_guard(goal, acts, focused=("thermometer", "chocolate")) == acts[:2]
    # the simulator may name the focused object with its state: still the thermometer
    assert focus_guard(goal, acts, focused=("thermometer, currently reading 10 degrees celsius",)) == [
        "focus on chocolate"]

    boil = "Your task is to boil gallium. First, focus on the substance. Then, take actions that will cause it to change."
    # the ordered target is "the substance"; the object is called gallium: the name rule alone applies
    assert focus_guard(boil, ["focus on gallium", "focus on substance in metal pot"]) == [
        "focus on gallium", "focus on substance in metal pot"]


def test_every_gold_focus_passes_the_guard_in_the_gold_order():
    """Each gold path's focus actions, in order, each with the earlier ones as `focused` (the tasks whose goal names a
    category are the known limit of the name rule, pinned above)."""
    checked = 0
    for e in _gold_episodes():
        gold = [s["action"] for s in e["steps"] if s["action"].startswith("focus on ")]
        if not all(focus_named(e["goal"], a) for a in gold):
            continue
        for k, a in enumerate(gold):
            focused = [g.split("focus on ", 1)[1].split(" in ", 1)[0] for g in gold[:k]]
            assert focus_guard(e["goal"], [a, "wait"], focused) == [a, "wait"], (e["task"], a, focused)
            checked += 1
    assert checked >= 30  # 35 focus actions of the 50-episode file


def test_focus_on_a_substance_needs_the_goal_to_name_what_the_container_holds():
    world = ("This room is called the kitchen. In it, you see:\n\ta glass jar (containing a substance called sodium "
             "chloride)\n\ta jug (containing a substance called orange juice)\nIn your inventory, you see:\n\ta metal "
             "pot (containing a substance called water)\n\tan orange\n")
    boil_water = "Your task is to boil water. First, focus on the substance. Then, take actions that will cause it."
    melt_gallium = "Your task is to melt gallium. First, focus on the substance. Then, take actions that will cause it."
    acts = ["focus on substance in metal pot", "focus on substance in glass jar", "wait"]
    assert focus_guard(boil_water, acts, world=world) == ["focus on substance in metal pot", "wait"]
    assert focus_guard(melt_gallium, acts, world=world) == ["wait"]
    assert focus_guard(melt_gallium, ["focus on substance in cup", "wait"], world=world) == ["wait"]  # not in view
    assert focus_guard(melt_gallium, acts) == acts  # no world text: the name rule alone


def test_focus_guard_holds_to_the_pending_target():
    goal = ("Your task is to measure the temperature of wire, which is located around the living room. First, focus on "
            "the thermometer. Next, focus on the wire. If the wire temperature is above 0.0 degrees celsius, place it "
            "in the blue box. If the wire temperature is below 0.0 degrees celsius, place it in the orange box.")
    acts = ["focus on orange", "focus on wire", "focus on thermometer", "wait"]  # an orange is in the inventory
    assert focus_guard(goal, acts) == ["focus on thermometer", "wait"]
    assert focus_guard(goal, acts, focused=("thermometer",)) == ["focus on wire", "wait"]
    assert focus_guard(goal, acts, focused=("thermometer", "wire")) == ["wait"]  # no focus is left to take
