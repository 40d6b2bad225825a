import gzip
import json
import statistics

import pytest

from fastrank.data import (
    ActionPool, CandidateSet, DataError, Featurizer, ReadReport, Step, assert_disjoint, make_candidate_set,
    make_candidate_sets, overlap_features, read_records, split_episodes, stats, upsample, write_dataset,
    write_records,
)
from fastrank.data.bundle import load_dataset
from fastrank.data.negatives import sample_set_size, state_rng


def _steps(n_episodes=40, n_steps=8, env="alfworld", n_tasks=3):
    return [
        Step(env, f"{env}/ep{e}", i, f"task{e % n_tasks}", f"goal of episode {e}", f"you see thing {i} of {e}",
             f"take thing {i} from place {e}", admissible=[f"take thing {i} from place {e}", "look", "inventory",
                                                          f"go to place {i}", f"open drawer {e}"])
        for e in range(n_episodes) for i in range(n_steps)
    ]


def _good_set(**kw):
    d = dict(env="alfworld", episode_id="e1", step=0, task_type="t", goal="g", observation="o",
             candidates=["a", "b", "c"], expert_index=1, sources=["global", "expert", "same_task"])
    d.update(kw)
    return d


def _write_lines(path, objs):
    with gzip.open(path, "wt") as f:
        for o in objs:
            f.write((o if isinstance(o, str) else json.dumps(o)) + "\n")


# --- records and validation -------------------------------------------------------------------------

def test_roundtrip_gz(tmp_path):
    sets = [CandidateSet(**_good_set(step=i)) for i in range(5)]
    p = tmp_path / "x.jsonl.gz"
    assert write_records(p, sets) == 5
    assert read_records(p) == sets
    # deterministic bytes: a rebuild of the same content gives the same file
    b1 = p.read_bytes()
    write_records(p, sets)
    assert p.read_bytes() == b1


@pytest.mark.parametrize("bad, msg", [
    (_good_set(sources=["expert", "expert", "global"]), "exactly one expert"),
    (_good_set(sources=["global", "global", "global"]), "exactly one expert"),
    (_good_set(candidates=["a", "a", "c"]), "duplicate candidate"),
    (_good_set(candidates=["a"] * 0, sources=[], expert_index=0), "0 candidates"),
    (_good_set(candidates=[f"a{i}" for i in range(21)], sources=["expert"] + ["global"] * 20, expert_index=0),
     "21 candidates"),
    (_good_set(goal="  "), "empty goal"),
    (_good_set(observation=""), "empty observation"),
    (_good_set(expert_index=7), "out of range"),
    (_good_set(env="minecraft"), "unknown env"),
    (_good_set(sources=["global", "expert", "made_up"]), "unknown candidate source"),
    ({k: v for k, v in _good_set().items() if k != "goal"}, "missing field"),
    ({**_good_set(), "extra": 1}, "unknown field"),
    ("{not json", "invalid JSON"),
])
def test_validation_names_file_and_line(tmp_path, bad, msg):
    p = tmp_path / "bad.jsonl.gz"
    _write_lines(p, [_good_set(), "", _good_set(step=1), bad])
    with pytest.raises(DataError) as exc:
        read_records(p)
    assert f"{p}:4:" in str(exc.value)
    assert msg in str(exc.value)


def test_skip_invalid_counts_and_reports(tmp_path):
    p = tmp_path / "mixed.jsonl.gz"
    _write_lines(p, [_good_set(), _good_set(candidates=["a", "a", "c"]), _good_set(step=2), _good_set(goal="")])
    rep = ReadReport(str(p))
    sets = read_records(p, skip_invalid=True, report=rep)
    assert [s.step for s in sets] == [0, 2]
    assert rep.read == 2 and len(rep.skipped) == 2
    assert rep.skipped[0].startswith(f"{p}:2:") and rep.skipped[1].startswith(f"{p}:4:")
    assert "2 skipped" in str(rep)


def test_max_candidates_configurable(tmp_path):
    p = tmp_path / "x.jsonl"
    big = _good_set(candidates=[f"a{i}" for i in range(25)], sources=["expert"] + ["global"] * 24, expert_index=0)
    _write_lines(p.with_suffix(".jsonl.gz"), [big])
    with pytest.raises(DataError):
        read_records(p.with_suffix(".jsonl.gz"))
    assert len(read_records(p.with_suffix(".jsonl.gz"), max_candidates=30)) == 1


# --- negatives ----------------------------------------------------------------------------------------

def test_set_size_distribution_matches_paper():
    rng = state_rng(0, "sizes")
    sizes = [sample_set_size(rng) for _ in range(20000)]
    assert min(sizes) >= 2 and max(sizes) <= 20
    assert abs(statistics.mean(sizes) - 8.83) < 0.1


@pytest.mark.parametrize("mode", ["sampled", "hard"])
def test_candidate_sets_valid_and_seeded(mode):
    steps = _steps()
    sets, rep = make_candidate_sets(steps, mode=mode, seed=7)
    assert rep["sets"] == len(steps) and rep["sets_below_min_size"] == 0
    for cs, st in zip(sets, steps):
        cs.validate()
        assert cs.expert_action == st.expert_action
        assert 2 <= len(cs.candidates) <= 20
    again, _ = make_candidate_sets(list(reversed(steps)), mode=mode, seed=7)
    assert list(reversed(again)) == sets  # per-state seeding: input order does not matter
    other, _ = make_candidate_sets(steps, mode=mode, seed=8)
    assert other != sets
    # the expert's position is shuffled, not always first
    assert len({cs.expert_index for cs in sets}) > 5


def test_sampled_mode_strata():
    steps = _steps()
    sets, rep = make_candidate_sets(steps, mode="sampled", seed=1)
    assert {"same_task", "other_task", "global"} <= set(rep["sources"])
    by_action = {s.expert_action: s for s in steps}
    for cs in sets:
        for cand, src in zip(cs.candidates, cs.sources):
            origin = by_action[cand]
            if src == "same_task":
                assert origin.task_type == cs.task_type and origin.episode_id != cs.episode_id
            elif src == "other_task":
                assert origin.task_type != cs.task_type


def test_hard_mode_uses_admissible_first():
    steps = _steps()
    sets, rep = make_candidate_sets(steps, mode="hard", seed=1)
    adm = {(s.episode_id, s.step): set(s.admissible) for s in steps}
    for cs in sets:
        n_adm = sum(src == "admissible" for src in cs.sources)
        # 4 non-expert admissible actions: either all are used or the set is smaller than 5
        assert n_adm == min(4, len(cs.candidates) - 1)
        for cand, src in zip(cs.candidates, cs.sources):
            if src == "admissible":
                assert cand in adm[(cs.episode_id, cs.step)]


def test_hard_mode_without_admissible_is_topped_up_visibly():
    steps = [Step(**{**s.__dict__, "admissible": None}) for s in _steps()]
    sets, rep = make_candidate_sets(steps, mode="hard")
    assert "admissible" not in rep["sources"]
    assert all(len(cs.candidates) >= 2 for cs in sets)


def test_tiny_pool_does_not_loop_forever():
    steps = _steps(n_episodes=1, n_steps=2, n_tasks=1)
    cs = make_candidate_set(steps[0], ActionPool.from_steps(steps), size=20)
    assert len(cs.candidates) == 2  # only one other action exists


def test_upsample_keeps_episode_and_shuffles():
    sets, _ = make_candidate_sets(_steps(n_episodes=4) + _steps(n_episodes=4, env="webshop"), seed=3)
    up = upsample(sets, {"alfworld": 6})
    n_alf = sum(cs.env == "alfworld" for cs in sets)
    assert len(up) == len(sets) + 5 * n_alf
    for cs in up:
        cs.validate()
    copies = [cs for cs in up if cs.copy > 0]
    assert all(cs.env == "alfworld" for cs in copies)
    base = {(cs.episode_id, cs.step): cs for cs in sets}
    for cs in copies:
        b = base[(cs.episode_id, cs.step)]
        assert sorted(cs.candidates) == sorted(b.candidates) and cs.expert_action == b.expert_action


# --- splits -------------------------------------------------------------------------------------------

def test_split_episode_level_and_fractions():
    steps = _steps(n_episodes=100) + _steps(n_episodes=50, env="scienceworld")
    splits, rep = split_episodes(steps, seed=42)
    assert_disjoint(splits)
    assert rep["episodes"]["eval"] == 20 + 10
    assert rep["episodes"]["test"] == 24 + 12
    again, _ = split_episodes(list(reversed(steps)), seed=42)
    assert {k: {r.episode_id for r in v} for k, v in again.items()} == \
        {k: {r.episode_id for r in v} for k, v in splits.items()}


def test_eval_is_deduplicated_against_train():
    steps = _steps(n_episodes=50)
    # every episode repeats the same first state: eval copies of it must go, and be counted
    dup = [Step(s.env, s.episode_id, 99, s.task_type, "same goal", "same obs", "same act") for s in steps if s.step == 0]
    splits, rep = split_episodes(steps + dup, seed=0)
    assert rep["eval_removed_as_duplicates_of_train"] == 10
    assert not any(r.step == 99 for r in splits["eval"])


def test_assert_disjoint_catches_leak():
    a, b = _steps(n_episodes=2)[:1], _steps(n_episodes=2)[:1]
    with pytest.raises(AssertionError, match="both"):
        assert_disjoint({"train": a, "eval": b})


def test_write_dataset_and_stats(tmp_path):
    steps = {"alfworld": _steps(n_episodes=30), "webshop": _steps(n_episodes=20, env="webshop")}
    man = write_dataset(steps, tmp_path, seed=1)
    assert set(man["envs"]) == {"alfworld", "webshop"}
    train = load_dataset(tmp_path, "alfworld", "train", "hard")
    ev = load_dataset(tmp_path, "alfworld", "eval")
    assert not {c.episode_id for c in train} & {c.episode_id for c in ev}
    st = stats(train + load_dataset(tmp_path, "webshop", "train"))
    assert st["alfworld"]["sets"] == len(train)
    assert sum(st["webshop"]["size_histogram"].values()) == st["webshop"]["sets"]


# --- featurizer ---------------------------------------------------------------------------------------

def test_overlap_features():
    f = overlap_features("You see a mug 1 on the desk 2", "take mug 1 from desk 2")
    # action words {take, mug, 1, from, desk, 2}; state words {you, see, a, mug, 1, on, the, desk, 2}
    assert f["jaccard"] == pytest.approx(4 / 11)
    assert f["action_coverage"] == pytest.approx(4 / 6)
    assert f["state_coverage"] == pytest.approx(4 / 9)
    # bigrams of the action: (take mug) (mug 1) (1 from) (from desk) (desk 2) -> shared: (mug 1), (desk 2)
    assert f["bigram_overlap"] == pytest.approx(2 / 5)
    assert overlap_features("", "look") == {"jaccard": 0.0, "action_coverage": 0.0, "state_coverage": 0.0,
                                            "bigram_overlap": 0.0}


def test_featurizer_text_layout():
    pairs = Featurizer().pairs("put a mug in the desk", "You see a mug 1.", ["take mug 1 from desk 2", "look"])
    state, action = pairs[0]
    assert state.startswith("state: ") and "put a mug in the desk" in state and "You see a mug 1." in state
    assert action.startswith("action: take mug 1 from desk 2\nfeatures: jaccard=")
    assert pairs[1][0] == state
    plain = Featurizer("state_action").pairs("g", "o", ["look"])
    assert plain[0][1] == "action: look"
    # compact: the same four numbers as percentages (jaccard 4/11, coverages 4/6 and 4/9, bigrams 2/5)
    compact = Featurizer("state_action_overlap_compact").pairs("", "You see a mug 1 on the desk 2",
                                                               ["take mug 1 from desk 2"])
    assert compact[0][1] == "action: take mug 1 from desk 2\noverlap: 36 67 44 40"
    with pytest.raises(ValueError, match="feature mode"):
        Featurizer("nope")
