"""ScienceWorld: the gold-file parsers, the admissible-list policy, alias de-duplication, the
simulator wrapper and one real gold episode (skipped without the simulator / Java)."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

from fastrank.data.record import Step, read_records, write_records
from fastrank.data.scienceworld import (
    build_steps,
    read_cache,
    select_pairs,
    steps_from_gold_file,
    steps_from_gold_files,
    summarize,
)
from fastrank.envs.scienceworld import (
    L2_TASKS,
    TASK_NAMES,
    action_verb,
    bounded_admissible,
    canonical_task_name,
    eto_split_pairs,
    normalize_action,
    remove_aliases,
    task_level,
)


def _shared_data() -> Path:
    env = os.environ.get("FASTRANK_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


SW_DATA = _shared_data() / "scienceworld"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


# ------------------------------------------------------------------------------------ task names

def test_task_names_and_levels():
    assert len(TASK_NAMES) == 30 and len(set(TASK_NAMES)) == 30
    assert canonical_task_name("task-2a-test-conductivity-of-unknown-substances") == \
        "test-conductivity-of-unknown-substances"
    assert canonical_task_name("task-10-measure-melting-point-(known-substance)") == \
        "measure-melting-point-known-substance"
    assert canonical_task_name("task-10-mendellian-genetics-(known-plant)") == "mendelian-genetics-known-plant"
    assert canonical_task_name("1-1") == "boil"
    with pytest.raises(ValueError):
        canonical_task_name("task-99-fly-to-the-moon")
    # L2 = the final task type of each of the 10 topics
    assert len(L2_TASKS) == 10
    assert task_level("change-the-state-of-matter-of") == "L2" and task_level("boil") == "L0/L1"
    assert task_level("task-4-grow-fruit") == "L2" and task_level("grow-plant") == "L0/L1"
    assert task_level("mendelian-genetics-unknown-plant") == "L2"


def test_eto_splits_and_select_pairs():
    _need(SW_DATA / "eto_sciworld_train_indices.json")
    train = eto_split_pairs("train", SW_DATA.parent)
    assert len(train) == 1483 and all(t in TASK_NAMES for t, _ in train)
    dev, test = eto_split_pairs("dev", SW_DATA.parent), eto_split_pairs("test", SW_DATA.parent)
    assert not set(train) & set(test) and not set(dev) & set(test)
    overlap = set(train) & set(dev)  # a fact of ETO's files: 54 find-* pairs are in train and dev
    assert len(overlap) == 54

    a = select_pairs("train", per_task=3, seed=0, data_dir=SW_DATA.parent)
    assert a == select_pairs("train", per_task=3, seed=0, data_dir=SW_DATA.parent)  # deterministic
    assert a != select_pairs("train", per_task=3, seed=1, data_dir=SW_DATA.parent)
    assert set(a) <= set(train) - overlap and len(set(a)) == len(a)
    per_task = Counter(t for t, _ in a)
    assert len(per_task) == len({t for t, _ in train}) and max(per_task.values()) == 3
    # round-robin: the first len(tasks) pairs cover every task once (a truncated build is stratified)
    assert len({t for t, _ in a[: len(per_task)]}) == len(per_task)
    # selection per task does not depend on which other tasks are asked for
    only = select_pairs("train", per_task=3, seed=0, tasks=["boil"], data_dir=SW_DATA.parent)
    assert only == [p for p in a if p[0] == "boil"]


# ------------------------------------------------------------------------------- admissible policy

VALID = (
    [f"connect {a} to {b}" for a in "abcdefgh" for b in "abcdefgh" if a != b]
    + [f"move {a} to {b}" for a in "abcd" for b in "wxyz"]
    + ["go to kitchen", "go to hallway", "look around", "look at table", "focus on water", "wait1",
       "open door to kitchen", "pick up thermometer", "look at table"]  # one duplicate
)


def test_bounded_admissible_deterministic_capped_must_include():
    k = 20
    a = bounded_admissible(VALID, k, 7, must_include=["teleport to mars"])
    assert a == bounded_admissible(VALID, k, random.Random(7), must_include=["teleport to mars"])
    assert a != bounded_admissible(VALID, k, 8, must_include=["teleport to mars"])
    assert len(a) == k and len(set(a)) == k
    assert "teleport to mars" in a  # kept even though the simulator does not list it
    assert a == sorted(a)  # position says nothing about which action was forced in
    assert set(a) - {"teleport to mars"} <= set(VALID)
    # stratified: every verb group is represented when k allows, although connect is 56/84 of the list
    verbs = {action_verb(x) for x in VALID}
    b = bounded_admissible(VALID, len(verbs), 0)
    assert {action_verb(x) for x in b} == verbs
    u = bounded_admissible(VALID, len(verbs), 0, strategy="uniform")
    assert len(u) == len(verbs) and len(set(u)) == len(u)
    # small lists: everything, deduplicated
    small = bounded_admissible(["wait", "wait ", "look around"], 50, 0, must_include=["look around"])
    assert small == ["look around", "wait"]
    with pytest.raises(ValueError):
        bounded_admissible(VALID, 1, 0, must_include=["a", "b"])


def test_bounded_admissible_depends_on_the_set_not_its_order():
    # the simulator's list order changes with what its JVM loaded before; the sample must not
    shuffled = list(VALID)
    for seed in range(4):
        random.Random(seed).shuffle(shuffled)
        assert bounded_admissible(shuffled, 20, 7) == bounded_admissible(VALID, 20, 7)
        assert bounded_admissible(shuffled, 20, 7, strategy="uniform") == bounded_admissible(
            VALID, 20, 7, strategy="uniform")


def test_bounded_admissible_priority_gives_each_verb_its_most_relevant_actions():
    from fastrank.data.features import relevance

    goal = "Your task is to measure the temperature of water with the thermometer. First, focus on the water."
    pr = relevance(goal, "You move the c to the inventory.")
    verbs = {action_verb(x) for x in VALID}
    for seed in range(5):
        cut = bounded_admissible(VALID, len(verbs) + 2, seed, priority=pr)
        assert {action_verb(x) for x in cut} == verbs  # the same breadth as the random cut
        assert {"focus on water", "pick up thermometer"} <= set(cut)
        # connect's two slots (it is the best-scored group, so it gets the extra ones) name c, the recent object
        assert all(" c " in f" {x} " for x in cut if x.startswith("connect"))
    # goal words count twice ("focus", "water"), words of the recent text once
    assert pr("focus on water") == 4 and pr("connect c to d") == 1 and pr("go to kitchen") == 0
    # without a priority the connect slots are a random draw, rarely both naming c
    random_cuts = [bounded_admissible(VALID, len(verbs) + 2, seed) for seed in range(20)]
    assert sum(all(" c " in f" {x} " for x in cut if x.startswith("connect")) for cut in random_cuts) < 10


# -------------------------------------------------------------------------------------- aliases

def test_normalize_action_folds_gold_aliases():
    pairs = [
        ("examine substance in metal pot", "look at substance in metal pot"),
        ("open door to art studio", "open art studio door"),
        ("use thermometer in inventory on substance in metal pot", "use thermometer on substance in metal pot"),
        ("pour jug in jug", "pour jug into jug"),
        ("activate stopwatch in inventory", "activate stopwatch"),
        ("drop shovel", "put down shovel"),
        ("Look  at Table", "look at table"),
    ]
    for gold, canon in pairs:
        assert normalize_action(gold) == normalize_action(canon), (gold, canon)
    # ... and keeps different actions apart
    assert normalize_action("open door to kitchen") != normalize_action("open door to hallway")
    assert normalize_action("look at table") != normalize_action("look in table")
    assert normalize_action("move a to b") != normalize_action("move b to a")


def test_remove_aliases_never_duplicates_the_expert():
    valid = ["look at substance in metal pot", "look at metal pot", "open art studio door",
             "open door to kitchen", "use thermometer on substance in metal pot", "look at metal pot",
             "focus on substance in metal pot"]
    expert = "examine substance in metal pot"  # the gold string; the valid list spells it `look at`
    out = remove_aliases(valid, expert)
    assert "look at substance in metal pot" not in out
    assert out.count("look at metal pot") == 1  # deduplicated
    adm = bounded_admissible(out, 50, 0, must_include=[expert])
    assert sum(normalize_action(a) == normalize_action(expert) for a in adm) == 1
    # aliases the string rules cannot see (referent synonyms) are removed when named
    out = remove_aliases(["focus on water", "focus on substance in metal pot", "wait"],
                         "focus on substance in metal pot", aliases=["focus on water"])
    assert out == ["wait"]


# ------------------------------------------------------------------------------------- gold files

def test_gold_file_50ep_parses_into_valid_steps():
    path = _need(SW_DATA / "gold_train_var_50ep.jsonl.gz")
    steps = steps_from_gold_file(path)
    eps = Counter(s.episode_id for s in steps)
    assert len(eps) == 50
    assert {s.task_type for s in steps} == set(TASK_NAMES)
    # 1757 gold actions: 33 digits (answers to ambiguity prompts, folded; or stray) and 5 actions
    # that did nothing (rejected by the parser, or cancelled by a non-digit answer to their prompt)
    assert len(steps) == 1757 - 33 - 5
    for s in steps:
        s.validate()
        assert s.env == "scienceworld" and s.admissible is None
        assert not s.expert_action.strip().isdigit()
        assert not s.observation.startswith("Ambiguous request")
        assert s.episode_id == f"scienceworld/{s.task_type}/{s.meta['variation']}"
        assert s.meta["split"] == "train" and s.meta["episode_score"] == 100
        assert s.goal.startswith("Your task is")
    for eid in eps:  # contiguous step numbers; the first observation is the initial look
        ep = [s for s in steps if s.episode_id == eid]
        assert [s.step for s in ep] == list(range(len(ep)))
        assert ep[0].observation.startswith("This ") and ep[0].meta["gold_index"] == 0
    # records survive the validated JSONL round trip
    assert len({json.dumps(dataclasses.asdict(s), sort_keys=True) for s in steps[:50]}) == 50


def test_gold_file_validsample_parses_with_admissible(tmp_path):
    path = _need(SW_DATA / "gold_train_var_30ep_validsample.jsonl.gz")
    steps = steps_from_gold_file(path)
    assert len({s.episode_id for s in steps}) == 30
    n_not_in_valid = 0
    for s in steps:
        s.validate()
        adm = s.admissible
        assert adm is not None and len(adm) == len(set(adm)) and 1 < len(adm) <= 41
        assert adm.count(s.expert_action) == 1
        others = [a for a in adm if a != s.expert_action]
        assert all(normalize_action(a) != normalize_action(s.expert_action) for a in others)
        assert s.meta["n_valid"] >= len(others)
        n_not_in_valid += not s.meta["gold_in_valid"]
    assert 0.05 < n_not_in_valid / len(steps) < 0.3  # the ~17 % of gold actions that are aliases
    capped = steps_from_gold_file(path, n_sample=10, seed=3)
    assert all(len(s.admissible) == 10 and s.expert_action in s.admissible for s in capped)
    assert capped == steps_from_gold_file(path, n_sample=10, seed=3)
    out = tmp_path / "sw.jsonl.gz"
    write_records(out, steps)
    assert read_records(out, Step) == steps
    both = steps_from_gold_files([SW_DATA / "gold_train_var_50ep.jsonl.gz", path])
    assert len({s.episode_id for s in both}) == 50  # the 30 overlap: taken once, with admissible
    assert sum(s.admissible is not None for s in both) == len(steps)


def test_steps_from_gold_file_folds_ambiguity_answers(tmp_path):
    ep = {"task": "grow-plant", "variation": 1, "goal": "Your task is to grow a plant.", "score": 100,
          "steps": [
              {"obs": "This room is called the greenhouse.", "look": "", "inv": "", "action": "move seed to pot"},
              {"obs": "Ambiguous request: Please enter the number ...\n0:\tmove seed ...", "look": "", "inv": "",
               "action": "0"},
              {"obs": "You move the seed to the pot.", "look": "", "inv": "", "action": "wait1"},
              {"obs": "You decide to wait for 1 iterations.", "look": "", "inv": "", "action": "0"},
              {"obs": "No known action matches that input.", "look": "", "inv": "", "action": "focus on seed"},
          ]}
    path = tmp_path / "gold.jsonl"
    path.write_text(json.dumps(ep) + "\n")
    steps = steps_from_gold_file(path)
    assert [s.expert_action for s in steps] == ["move seed to pot", "wait1", "focus on seed"]
    assert [s.observation for s in steps] == [
        "This room is called the greenhouse.", "You move the seed to the pot.",
        "You decide to wait for 1 iterations."]  # a stray digit's parser error is not an observation
    assert [s.meta["gold_index"] for s in steps] == [0, 2, 4]


# ----------------------------------------------------------------------------------- build cache

def test_build_steps_resumes_from_cache_and_reports_failures(tmp_path):
    """Cached episodes are not recomputed (no simulator needed here); failures are reported; a torn
    last line from a killed build is ignored."""
    step = Step(env="scienceworld", episode_id="scienceworld/boil/3", step=0, task_type="boil",
                goal="Your task is to boil water.", observation="This room is called the kitchen.",
                expert_action="look around", admissible=["look around", "wait"], meta={"n_valid": 2})
    params = {"with_valid": True, "n_sample": 50, "seed": 0, "split": None}
    cache = tmp_path / "cache.jsonl"
    with open(cache, "w") as f:
        f.write(json.dumps({"task": "boil", "variation": 3, "ok": True, "wall_s": 1.0, "params": params,
                            "steps": [dataclasses.asdict(step)]}) + "\n")
        f.write(json.dumps({"task": "melt", "variation": 4, "ok": False, "wall_s": 1.0, "params": params,
                            "error": "EpisodeFailure: gold path ended with score 50"}) + "\n")
        f.write(json.dumps({"task": "freeze", "variation": 5, "ok": True, "wall_s": 1.0,
                            "params": dict(params, n_sample=20), "steps": [dataclasses.asdict(step)]}) + "\n")
        f.write('{"task": "freeze", "variation"')  # torn
    assert set(read_cache(cache)) == {("boil", 3), ("melt", 4), ("freeze", 5)}
    # time_budget_s=0: nothing is run, so only what the cache may serve comes back
    r = build_steps([("task-1-boil", 3), ("melt", 4), ("freeze", 5)], workers=1, cache_path=cache,
                    progress=False, time_budget_s=0)
    assert r.from_cache == 2 and r.stale_cache == 1  # freeze/5 was built with n_sample=20: not reused
    assert r.episodes == 1 and r.steps == [step]
    assert r.failures == [{"task": "melt", "variation": 4, "error": "EpisodeFailure: gold path ended with score 50"}]
    stats = summarize(r.steps, r.failures)
    assert stats["episodes"] == 1 and stats["failures"] == 1 and stats["n_valid"]["median"] == 2


# -------------------------------------------------------------------------------------- simulator

def _simulator_available() -> bool:
    try:
        import scienceworld  # noqa: F401
    except ImportError:
        return False
    return shutil.which("java") is not None


needs_sim = pytest.mark.skipif(not _simulator_available(), reason="scienceworld / java not installed")


@pytest.fixture(scope="module")
def sw_env():
    if not _simulator_available():
        pytest.skip("scienceworld / java not installed")
    from fastrank.envs.scienceworld import ScienceWorldEnv

    env = ScienceWorldEnv(max_admissible=30, generate_gold_path=True)
    yield env
    env.close()


@needs_sim
def test_env_reset_step_and_alias_resolution(sw_env):
    state = sw_env.reset(("chemistry-mix-paint-secondary-color", 0))
    assert state.observation.startswith("This room is called")
    assert state.goal.startswith("Your task is") and state.task_type == "chemistry-mix-paint-secondary-color"
    assert len(state.admissible) == 30 and len(set(state.admissible)) == 30
    assert state.info["n_valid"] > 100 and state.reward == 0.0 and not state.done and not state.won
    assert set(state.admissible) <= set(sw_env.valid_actions())
    assert state.info["gold_path"] and state.info["score"] == 0

    # aliases: the gold-style strings resolve to the valid-list spelling of the same action
    valid = set(sw_env.valid_actions())
    door = sw_env.resolve_action("open door to art studio")
    assert door.method == "parser" and door.canonical in valid
    assert sw_env.resolve_action(door.canonical).aliases == door.aliases
    look = sw_env.resolve_action("examine art studio door")
    assert look.canonical in valid and look.canonical.startswith("look at")
    assert sw_env.resolve_action("open door to kitchen").canonical != door.canonical
    assert sw_env.resolve_action("fly to the moon").canonical is None

    moves = sw_env.moves()
    state = sw_env.step(door.canonical)  # resolving did not advance the game
    assert state.observation == "The door is now open." and state.info["moves"] == moves + 1
    assert state.reward == state.info["raw_reward"] / 100


@needs_sim
def test_real_gold_episode_wins_and_dedups_aliases(sw_env):
    from fastrank.data.scienceworld import gold_episode

    steps = gold_episode("chemistry-mix-paint-secondary-color", 0, env=sw_env, split="train", n_sample=40, seed=1)
    assert 4 <= len(steps) <= 40
    for s in steps:
        s.validate()
        assert s.meta["episode_score"] == 100  # gold_episode raises when the path does not win
        assert s.episode_id == "scienceworld/chemistry-mix-paint-secondary-color/0"
        adm = s.admissible
        assert len(adm) == 40 and len(set(adm)) == 40 and adm.count(s.expert_action) == 1
        if s.meta["gold_action"] != s.expert_action:  # an alias was mapped to the canonical spelling
            assert s.meta["gold_action"] not in adm
        assert not any(normalize_action(a) == normalize_action(s.expert_action)
                       for a in adm if a != s.expert_action)
        assert s.meta["n_valid"] > len(adm)
    assert steps[0].observation.startswith("This room is called")
    assert [s.step for s in steps] == list(range(len(steps)))
    assert any(s.meta["gold_action"] != s.expert_action for s in steps)  # `open door to art studio` etc.
    for s in steps:  # no canonical form only where the simulator lists nothing equivalent
        # (the gold path re-opens open doors: accepted, "The door is already open.", not listed)
        assert s.meta["canonical_method"] == "parser" or not s.meta["gold_in_valid"]
    assert sum(s.meta["canonical_method"] == "parser" for s in steps) >= len(steps) // 2


@needs_sim
def test_focused_objects_are_recorded_and_not_offered_again(sw_env):
    from fastrank.agent_eval import focus_guard

    state = sw_env.reset(("boil", 0))  # the gold focus says "substance", the simulator says "water": both are kept
    gold = state.info["gold_path"]
    k = next(i for i, a in enumerate(gold) if a.startswith("focus on "))
    for action in gold[:k]:
        state = sw_env.step(action)
    # the pot in the inventory holds water, which the goal names: the gold focus passes the world-aware guard
    assert focus_guard(state.goal, [gold[k], "wait"], state.info["focused"], state.info["world"]) == [gold[k], "wait"]
    state = sw_env.step(gold[k])
    assert state.info["feedback"] == "You focus on the water." and state.info["focused"] == ("water", "substance")
    assert focus_guard(state.goal, ["focus on substance in metal pot", "wait"], state.info["focused"]) == ["wait"]

    state = sw_env.reset(("use-thermometer", 0))
    assert state.info["focused"] == ()
    gold = state.info["gold_path"]
    for action in gold[: next(i for i, a in enumerate(gold) if a.startswith("focus on ")) + 1]:
        state = sw_env.step(action)
    name = state.info["focused"][-1]  # what the simulator's "You focus on the X." reply named
    assert state.info["focused"] == (name,) and state.observation.startswith(f"You focus on the {name}")
    again = [a for a in sw_env.valid_actions() if a == f"focus on {name}"]
    assert again  # still valid in the game, but it would change nothing
    kept = focus_guard(state.goal, again + ["look around"], state.info["focused"])
    assert kept == ["look around"]
    assert focus_guard(state.goal, again + ["look around"]) == again + ["look around"]


@needs_sim
def test_admissible_sample_does_not_depend_on_the_env_history(sw_env):
    # a reused env (another game loaded and played first) lists the valid actions in another order
    from fastrank.envs.scienceworld import ScienceWorldEnv

    fresh = ScienceWorldEnv(max_admissible=30)
    try:
        first = fresh.reset(("boil", 0)).admissible
    finally:
        fresh.close()
    state = sw_env.reset(("melt", 0))
    sw_env.step(state.admissible[0])
    again = sw_env.reset(("boil", 0))
    assert again.admissible == first
