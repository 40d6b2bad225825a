"""WebShop Step builder: real shared data (skipped when absent) and the demonstrations-file format."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

from fastrank.data import webshop as ws
from fastrank.data.record import DataError, Step, read_records, write_records


def _shared_data() -> Path:
    env = os.environ.get("FASTRANK_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


WEBSHOP = _shared_data() / "webshop"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    if not (WEBSHOP / "goal_query_map.json").is_file():
        pytest.skip(f"shared WebShop data not found at {WEBSHOP}")
    return WEBSHOP


@pytest.fixture(scope="module")
def built(data_dir):
    return ws.build_steps(data_dir)


# ----------------------------------------------------------------------------- real shared data

def test_every_step_validates_and_round_trips(built, tmp_path):
    steps, report = built
    for s in steps:
        s.validate()
    path = tmp_path / "webshop.jsonl.gz"
    assert write_records(path, steps) == len(steps)
    back = read_records(path, Step)
    assert back == steps
    assert report["total"] == len(steps) == sum(report["states_per_source"].values())


def test_query_selection_states(built, data_dir):
    steps, report = built
    query = [s for s in steps if s.meta["source"] == "goal_query_map"]
    assert len(query) >= 1000
    gmap = json.loads((data_dir / "goal_query_map.json").read_text())
    r = report["goal_query_map"]
    assert r["goals"] == len(gmap) and r["pairs"] == sum(len(v) for v in gmap.values())
    # Nothing vanishes: every pair is a state, a collapsed duplicate, a counted skip, or a state that
    # a more faithful source already holds.
    dropped = report["overlap_dropped"].get("goal_query_map search states already in a more faithful source", 0)
    assert r["states"] == len(query) + dropped
    assert r["pairs"] == r["states"] + r["case_space_duplicate_queries_collapsed"] + sum(r["skipped"]["counts"].values())
    by_goal = defaultdict(list)
    for k, v in gmap.items():
        by_goal[k.strip()] += v
    for s in query:
        assert s.task_type == "search" and s.admissible is None and s.meta["turn"] == 0
        assert s.observation == f"WebShop [SEP] Instruction: [SEP] {s.goal} [SEP] Search"
        assert s.expert_action.startswith("search[") and s.expert_action.endswith("]")
        q = s.expert_action[len("search["):-1]
        assert q and q in {" ".join(x.split()) for x in by_goal[s.goal]}
    # A goal with several queries: one state per distinct query, all in one episode.
    multi = next(k for k, v in gmap.items() if len({" ".join(x.lower().split()) for x in v}) >= 3)
    got = [s for s in steps if s.goal == multi.strip() and s.meta["source"] == "goal_query_map"]
    assert len(got) == len({" ".join(x.lower().split()) for x in gmap[multi]})
    assert len({s.episode_id for s in got}) == 1


def test_episode_ids_stable_and_unique_per_goal(built, data_dir):
    steps, _ = built
    again, _ = ws.build_steps(data_dir)
    assert [(s.episode_id, s.step) for s in steps] == [(s.episode_id, s.step) for s in again]
    human_goals = json.loads((data_dir / "human_goals.json").read_text())
    ep_of_goal: dict[int, set[str]] = defaultdict(set)
    for s in steps:
        gidx = s.meta["goal_idx"]
        assert gidx is not None, s
        assert s.episode_id == f"webshop/goal/{gidx}"
        assert human_goals.index(human_goals[gidx]) == gidx  # the first index, as WebShop's code does
        assert ws.process_goal(s.goal) == human_goals[gidx].strip()
        ep_of_goal[gidx].add(s.episode_id)
    assert all(len(v) == 1 for v in ep_of_goal.values())
    keys = [(s.episode_id, s.step) for s in steps]
    assert len(keys) == len(set(keys))


def test_goal_split(built, data_dir):
    steps, report = built
    split = ws.goal_split(data_dir)
    train = set(json.loads((data_dir / "eto_webshop_train_indices.json").read_text()))
    test = set(json.loads((data_dir / "eto_webshop_test_indices.json").read_text()))
    assert split["train"] == sorted(train) and split["test"] == sorted(test)
    assert split["both"] == sorted(train & test)
    placed = {ws.eto_split_of(s, split) for s in steps}
    assert placed <= {"train", "test", None} and "train" in placed and "test" in placed
    s_test = next(s for s in steps if set(s.meta["goal_indices"]) & test)
    assert ws.eto_split_of(s_test, split) == "test"
    assert sum(report["eto_split_of_states"].values()) == len(steps)
    assert ws.official_split(0) == "test" and ws.official_split(500) == "eval" and ws.official_split(1500) == "train"


def test_session_log_click_parsing(data_dir):
    goals = ws.load_goal_index(data_dir)
    steps, r = ws.parse_session_log(data_dir / "human_session_logs" / "20220427_1_15.jsonl", goals)
    assert r["actions_decoded"] == ["search[teen girl pink loafers size eight]", "click[b0868kf3zb]",
                                    "click[8]", "click[z2-pink]", "click[buy now]"]
    # Only the search page is renderable: the log has no page text for the click states.
    assert r["skipped"]["counts"] == {"click state: the log has no page text or clickables": 4}
    assert len(steps) == 1 and r["states"] == 1
    s = steps[0]
    assert s.expert_action == "search[teen girl pink loafers size eight]" and s.admissible is None
    assert s.observation == ("WebShop [SEP] Instruction: [SEP] i need a pair of pink loafers for teen girls. "
                             "they should be size eight, and price lower than 50.00 dollars [SEP] Search")
    assert s.meta["category"] == "fashion" and s.episode_id.startswith("webshop/goal/")

    _, r13 = ws.parse_session_log(data_dir / "human_session_logs" / "20220427_1_13.jsonl", goals)
    assert r13["skipped"]["counts"]["same page logged twice (reload, no action)"] == 1
    assert r13["actions_decoded"][2] == "click[< prev]"  # item page back to the results
    _, r23 = ws.parse_session_log(data_dir / "human_session_logs" / "20220427_1_23.jsonl", goals)
    assert r23["actions_decoded"][:3] == ["search[red earbud headphones]", "click[next >]", "click[b08cz8ws38]"]
    _, r7 = ws.parse_session_log(data_dir / "human_session_logs" / "20220427_1_7.jsonl", goals)
    assert r7["actions_decoded"][2:4] == ["click[description]", "click[< prev]"]

    _, report = ws.steps_from_session_logs(data_dir, goals)
    assert report["files"] == len(list((data_dir / "human_session_logs").glob("*.jsonl"))) > 0
    assert report["actions_decoded"] == report["states"] + sum(
        v for k, v in report["skipped"].items() if k.startswith("click state"))


# --------------------------------------------------------------------- il_trajs format (crafted)

INSTR = "i need a long clip-in hair extension which is natural looking"
FULL = INSTR + ", and price lower than 40.00 dollars"
SEARCH = f"WebShop\nInstruction:  \n{FULL}\n[button] Search [button_]\n"
RESULTS = (f"WebShop\nInstruction:  \n{FULL}\n[button] Back to Search [button_]\nPage 1 (Total results: 50)\n"
           "[button] Next > [button_]\n\n[button] B09QQLDJ93 [button_]\nFoo Hair Extension 20 inch\n$12.99\n"
           "\n[button] B07XYZ1234 [button_]\nBar clip in\n$30.0\n")
ITEM = (f"WebShop\nInstruction:  \n{FULL}\n[button] Back to Search [button_]\n[button] < Prev [button_]\n"
        "color\n  [button] natural black [button_]\n  [button] brown [button_]\nFoo Hair Extension 20 inch\n"
        "Price: $12.99\nRating: N.A.\n[button] Description [button_]\n[button] Features [button_]\n"
        "[button] Reviews [button_]\n[button] Buy Now [button_]\n")
ITEM_CLICKED = "You have clicked natural black.\n" + ITEM.replace(
    "  [button] natural black [button_]", "  [clicked button] natural black [clicked button_]")
ITEM_ACTS = ["click[back to search]", "click[< prev]", "click[natural black]", "click[brown]",
             "click[description]", "click[features]", "click[reviews]", "click[buy now]"]


def _traj(**over):
    t = {
        "states": [SEARCH, RESULTS, ITEM, ITEM_CLICKED],
        # bare clickables (as WebShop's get_available_actions lists them) and click[...] forms
        "available_actions": [[], ["back to search", "next >", "b09qqldj93", "b07xyz1234"], ITEM_ACTS, ITEM_ACTS],
        "actions": ["search[clip in hair extension  natural]", "click[b09qqldj93]", "click[natural black]",
                    "click[buy now]"],
        "action_idxs": [-1, 2, 2, 7],
        "actions_translate": ["search[clip in hair extension  natural]", "click[item - foo hair extension 20 inch]",
                              "click[natural black]", "click[buy now]"],
        "images": [0, 0, 0, 0],
    }
    t.update(over)
    return t


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOALS = ws.GoalIndex(["some other goal", INSTR])


def test_rich_to_text():
    assert ws.rich_to_text(SEARCH) == f"WebShop [SEP] Instruction: [SEP] {FULL} [SEP] Search"
    assert ws.rich_to_text(ITEM_CLICKED) == ws.rich_to_text(ITEM)
    assert ws.rich_to_text(RESULTS).startswith(
        f"WebShop [SEP] Instruction: [SEP] {FULL} [SEP] Back to Search [SEP] Page 1 (Total results: 50) "
        "[SEP] Next > [SEP] B09QQLDJ93 [SEP] Foo Hair Extension 20 inch [SEP] $12.99")
    text = ws.search_page(FULL)
    assert ws.rich_to_text(text) == text and ws.instruction_from_state(text) == FULL


def test_il_trajs_format(tmp_path):
    bad_idx = _traj(action_idxs=[-1, 9, 2, 7])  # out of range -> skipped, counted
    mismatch = _traj(action_idxs=[-1, 3, 2, 7])  # points at another product -> skipped, counted
    unknown = _traj(states=[s.replace(INSTR, "a goal nobody wrote") for s in _traj()["states"]])
    path = _write(tmp_path / "il.jsonl", [_traj(), "", bad_idx, mismatch, unknown])
    steps, r = ws.steps_from_il_trajs(path, GOALS)
    assert r["trajectories"] == 4 and r["raw_steps"] == 16
    assert r["skipped"]["counts"] == {"action_idx out of range of available_actions": 1,
                                      "action disagrees with available_actions[action_idx]": 1}
    assert r["states"] == len(steps) == 14
    assert r["trajectories_goal_not_in_human_goals"] == 1
    first = steps[:4]
    assert [s.expert_action for s in first] == ["search[clip in hair extension natural]", "click[b09qqldj93]",
                                                "click[natural black]", "click[buy now]"]
    assert [s.task_type for s in first] == ["search", "results", "item", "item"]
    assert first[0].admissible is None
    assert first[1].admissible == ["click[back to search]", "click[next >]", "click[b09qqldj93]", "click[b07xyz1234]"]
    assert first[2].admissible == ITEM_ACTS
    assert all(s.episode_id == "webshop/goal/1" and s.goal == FULL for s in first)
    assert first[0].observation == f"WebShop [SEP] Instruction: [SEP] {FULL} [SEP] Search"
    assert "[button]" not in first[2].observation and "You have clicked" not in first[3].observation
    assert first[1].meta["action_translate"] == "click[item - foo hair extension 20 inch]"
    assert [s.meta["turn"] for s in first] == [0, 1, 2, 3]
    assert steps[-1].episode_id.startswith("webshop/goaltext/") and steps[-1].meta["goal_idx"] is None
    for s in steps:
        s.validate()

    raw, _ = ws.steps_from_il_trajs(path, GOALS, observation_format="raw")
    assert raw[2].observation == ITEM


@pytest.mark.parametrize("bad, what", [
    ("{not json", "invalid JSON"),
    (json.dumps({"states": [SEARCH], "actions": ["search[x]"], "action_idxs": [-1]}), "missing field"),
    (json.dumps(_traj(action_idxs=[-1, 2])), "misaligned"),
    ("[1, 2]", "expected a JSON object"),
])
def test_il_trajs_malformed_line_names_file_and_line(tmp_path, bad, what):
    path = _write(tmp_path / "il.jsonl", [_traj(), bad])
    with pytest.raises(DataError, match=rf"^{path}:2: .*{what}"):
        ws.steps_from_il_trajs(path, GOALS)


def test_build_with_il_trajs_prefers_demonstrations(data_dir, tmp_path):
    gmap = json.loads((data_dir / "goal_query_map.json").read_text())
    goal, queries = next((k, v) for k, v in gmap.items() if len(v) == 1 and k == k.strip())
    search = f"WebShop\nInstruction:  \n{goal}, and price lower than 30.00 dollars\n[button] Search [button_]\n"
    traj = {"states": [search], "available_actions": [[]], "actions": [f"search[{queries[0]}]"],
            "action_idxs": [-1]}
    path = _write(tmp_path / "il.jsonl", [traj])
    steps, report = ws.build_steps(data_dir, il_trajs=path)
    mine = [s for s in steps if s.goal.startswith(goal)]
    assert [s.meta["source"] for s in mine] == ["il_trajs"]  # the query-map copy is dropped, counted
    key = "goal_query_map search states already in a more faithful source"
    base, base_report = ws.build_steps(data_dir)
    assert report["overlap_dropped"][key] == base_report["overlap_dropped"].get(key, 0) + 1
    assert report["states_per_source"]["il_trajs"] == 1
    assert len(steps) == len(base)
