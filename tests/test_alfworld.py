"""ALFWorld: the env wrapper, the game helpers and the three Step sources.

Tests on the released files need the shared data dir (`../shared/data` next to the repo, or
$FASTRANK_SHARED_DATA) and skip without it; tests that run games also need alfworld==0.3.5.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import sys

import pytest

from fastrank.data import alfworld as alf
from fastrank.data.alfworld import replay as alf_replay
from fastrank.data.record import Step, read_records, write_records
from fastrank.envs import alfworld as alfenv
from fastrank.envs.alfworld import GameInfo

SHARED = Path(os.environ.get("FASTRANK_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
ALF = SHARED / "alfworld"
TARBALL = ALF / "json_2.1.1_games.tar.xz"
GT_TRAJ = ALF / "gt_traj_train.jsonl.gz"
EXPERT_ADM = ALF / "expert_admissible_valid_seen.jsonl.gz"
TRAJ_META = ALF / "traj_meta.jsonl.gz"
# A short train game (the expert wins it in 7 steps); it also has a released gt trajectory.
SMALL_GAME = "train/pick_and_place_simple-KeyChain-None-SideTable-322/trial_T20190909_091659_910683"
EPISODE_RE = re.compile(r"^alfworld/(train|valid_seen|valid_train)/[^/]+/trial_T\d+_\d+_\d+$")


def need(*paths: Path) -> None:
    for p in paths:
        if not p.exists():
            pytest.skip(f"shared data not here: {p}")


def need_alfworld() -> None:
    pytest.importorskip("textworld")
    pytest.importorskip("alfworld")


@pytest.fixture(scope="module")
def games_root() -> Path:
    need(TARBALL)
    need_alfworld()
    return alfenv.ensure_games(TARBALL)  # unpacked once into ~/.cache/fastrank/alfworld (~6 s the first time)


@pytest.fixture(scope="module")
def gt_steps() -> tuple[list[Step], alf.SourceReport]:
    need(GT_TRAJ, TRAJ_META)
    rep = alf.SourceReport(str(GT_TRAJ))
    return alf.steps_from_gt_traj(GT_TRAJ, TRAJ_META, report=rep), rep


# ------------------------------------------------------------------------------------------------
# Pure units
# ------------------------------------------------------------------------------------------------

def test_split_intro_and_feedback():
    obs, goal = alfenv.split_intro("-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room. Looking "
                                   "quickly around you, you see a bed 1.\n\nYour task is to: put a pen in bed.")
    assert obs == "You are in the middle of a room. Looking quickly around you, you see a bed 1."
    assert goal == "put a pen in bed."
    assert alfenv.split_intro("no goal here") == ("no goal here", "")
    assert alfenv.clean_feedback("You arrive at loc 12. On the desk 1, you see a pen 1.\n") == \
        "On the desk 1, you see a pen 1."
    assert alfenv.clean_feedback("On the desk 1, you see nothing.") == "On the desk 1, you see nothing."


def test_episode_ids():
    want = "alfworld/train/pick_two_obj_and_place-KeyChain-None-Sofa-202/trial_T20190908_102743_595985"
    for p in ("json_2.1.1/train/pick_two_obj_and_place-KeyChain-None-Sofa-202/trial_T20190908_102743_595985",
              "/x/train/y/json_2.1.1/train/pick_two_obj_and_place-KeyChain-None-Sofa-202/"
              "trial_T20190908_102743_595985/game.tw-pddl", want):
        assert alfenv.episode_id_for(p) == want
    with pytest.raises(ValueError):
        alfenv.episode_id_for("/tmp/some/game.tw-pddl")


def _fake_games(n_per_type: dict[str, int]) -> list[GameInfo]:
    out = []
    for t, n in n_per_type.items():
        for i in range(n):
            eid = f"alfworld/train/{t}-X-None-Y-{i}/trial_T2019_{i:03d}"
            out.append(GameInfo(f"/g/{eid}/game.tw-pddl", "train", t, eid))
    return out


def test_select_games_stratified_deterministic_nested():
    games = _fake_games({t: (3 if t == "look_at_obj_in_light" else 20) for t in alfenv.TASK_TYPES})
    a = alf.select_games(games, 30, seed=0)
    assert a == alf.select_games(list(reversed(games)), 30, seed=0)  # input order does not matter
    assert a != alf.select_games(games, 30, seed=1)
    counts = Counter(g.task_type for g in a)
    assert counts["look_at_obj_in_light"] == 3
    assert all(counts[t] in (5, 6) for t in counts if t != "look_at_obj_in_light")
    assert set(alf.select_games(games, 12, seed=0)) <= set(a)  # growing a selection keeps what it had
    assert len(alf.select_games(games, None)) == len(games)
    assert [g.episode_id for g in a] == sorted(g.episode_id for g in a)


def test_cache_torn_tail_is_cut(tmp_path):
    cache = tmp_path / "episodes.jsonl"
    good = json.dumps({"episode_id": "alfworld/train/a/trial_T1_1_1", "status": "won", "steps": []}) + "\n"
    cache.write_text(good + '{"episode_id": "alfworld/train/b/tr')
    done = alf_replay._read_cache(cache)
    assert list(done) == ["alfworld/train/a/trial_T1_1_1"]
    assert cache.read_text() == good  # appending after the cut gives valid JSONL again


# ------------------------------------------------------------------------------------------------
# The released files
# ------------------------------------------------------------------------------------------------

def _check_common(steps: list[Step]) -> None:
    by_ep: dict[str, list[Step]] = {}
    for st in steps:
        st.validate()
        assert EPISODE_RE.match(st.episode_id), st.episode_id
        assert st.task_type in alfenv.TASK_TYPES
        assert "Your task is to" not in st.observation and "Welcome to TextWorld" not in st.observation
        assert not st.observation.startswith("You arrive at loc")
        assert st.goal and not st.goal.startswith("Your task")
        by_ep.setdefault(st.episode_id, []).append(st)
    for ep, ss in by_ep.items():
        assert [s.step for s in ss] == list(range(len(ss))), ep
        assert len({s.goal for s in ss}) == 1
        assert ss[0].meta["prev_action"] is None
        assert all(b.meta["prev_action"] == a.expert_action for a, b in zip(ss, ss[1:]))


def test_gt_traj_steps(gt_steps):
    steps, rep = gt_steps
    # The release notes: 3554 trajectories, 60,628 actions.
    assert rep.episodes == rep.episodes_kept == 3554
    assert len(steps) == rep.steps == 60628
    _check_common(steps)
    assert all(st.admissible is None and st.meta["source"] == "gt_traj" and st.meta["split"] == "train" for st in steps)
    assert Counter(st.task_type for st in steps).keys() == set(alfenv.TASK_TYPES)
    meta = alf.load_traj_meta(TRAJ_META)
    assert all(meta[st.episode_id]["task_type"] == st.task_type for st in steps[::50])
    first = steps[0]
    assert first.goal == "look at alarmclock under the desklamp." and first.expert_action == "go to shelf 1"
    assert steps[1].observation == "On the shelf 1, you see nothing."


def test_expert_admissible_steps(tmp_path, capsys):
    need(EXPERT_ADM, TRAJ_META)
    rep = alf.SourceReport(str(EXPERT_ADM))
    steps = alf.steps_from_expert_admissible(EXPERT_ADM, TRAJ_META, report=rep)
    assert rep.episodes == 140 and rep.episodes_kept == 139 and len(rep.episodes_not_won) == 1  # 139/140 won
    _check_common(steps)
    assert all(st.meta["split"] == "valid_seen" and st.meta["won"] for st in steps)
    stats = alf.admissible_stats(steps)
    with capsys.disabled():
        print(f"\n[alfworld] expert_admissible: {stats}")
    assert stats["with_admissible"] == len(steps)
    # Measured on the release: 100 % (2453/2453 steps, 2261/2261 without `look`).
    assert stats["in_admissible"] / stats["with_admissible"] >= 0.99
    assert stats["non_look_in_admissible"] / stats["non_look"] >= 0.99
    assert 5 <= stats["admissible_size"]["min"] and stats["admissible_size"]["max"] <= 200
    src = Counter(st.meta["expert_source"] for st in steps)
    assert src["initial_look"] == 139 and all(st.expert_action == "look" for st in steps if st.step == 0)
    everything = alf.steps_from_expert_admissible(EXPERT_ADM, TRAJ_META, only_won=False)
    assert len({s.episode_id for s in everything}) == 140
    # Round trip through the project's record I/O.
    n = write_records(tmp_path / "s.jsonl.gz", steps[:200])
    back = read_records(tmp_path / "s.jsonl.gz", Step)
    assert n == 200 and back == steps[:200]


def test_episode_ids_match_the_games(games_root, gt_steps):
    need(EXPERT_ADM)
    train = {g.episode_id for g in alfenv.list_games(games_root, "train")}
    valid_seen = {g.episode_id for g in alfenv.list_games(games_root, "valid_seen")}
    assert len(train) == 3554 and len(valid_seen) == 140  # the release's solvable games
    assert {s.episode_id for s in gt_steps[0]} == train
    assert {s.episode_id for s in alf.steps_from_expert_admissible(EXPERT_ADM, only_won=False)} == valid_seen


# ------------------------------------------------------------------------------------------------
# Real games
# ------------------------------------------------------------------------------------------------

def test_replay_a_real_game(games_root, gt_steps):
    game = games_root / SMALL_GAME / "game.tw-pddl"
    steps, won = alf.replay_expert(game, max_steps=50, seed=0)
    assert won
    assert 3 <= len(steps) <= 50
    for st in steps:
        st.validate()
        assert st.admissible and st.expert_action in st.admissible, (st.step, st.expert_action)
        assert st.meta["source"] == "replay" and st.meta["won"] is True and st.meta["split"] == "train"
    assert steps[0].expert_action == "look" and steps[0].meta["expert_source"] == "initial_look"
    assert steps[0].episode_id == "alfworld/" + SMALL_GAME
    assert steps[0].task_type == "pick_and_place_simple"
    assert not any(st.observation.startswith("You arrive at loc") for st in steps)

    # Same format as the released trajectory of the same game.
    gt = [s for s in gt_steps[0] if s.episode_id == steps[0].episode_id]
    assert gt and gt[0].goal == steps[0].goal and gt[0].observation == steps[0].observation

    # The env wrapper accepts the recorded actions and the game is won at the end.
    env = alfenv.AlfworldEnv(game)
    try:
        s = env.reset()
        assert s.observation == steps[0].observation and s.goal == steps[0].goal and s.reward == 0.0
        for st in steps:
            assert not s.done
            assert sorted(s.admissible) == sorted(st.admissible)
            s = env.step(st.expert_action)
            assert s.observation != "Nothing happens."
        assert s.done and s.won and s.reward > 0
    finally:
        env.close()

    # The expert is stochastic but seeded per episode.
    again, _ = alf.replay_expert(game, max_steps=50, seed=0)
    assert [s.expert_action for s in again] == [s.expert_action for s in steps]


def _fake_release(root: Path, n: int) -> Path:
    """A release tree with `n` 'solvable' train games whose game files are not real games."""
    for i in range(n):
        d = root / "json_2.1.1" / "train" / f"pick_and_place_simple-Pen-None-Desk-{i}" / f"trial_T2019_000_{i:03d}"
        d.mkdir(parents=True)
        (d / "traj_data.json").write_text(json.dumps({"task_type": "pick_and_place_simple", "pddl_params": {}}))
        (d / "game.tw-pddl").write_text(json.dumps({"solvable": True}))
    return root


def test_system_exit_is_counted_not_fatal(tmp_path, monkeypatch):
    need_alfworld()
    import textworld

    def start(*args, **kwargs):
        raise SystemExit("Undeclared predicate: receptacleobjecttype")

    monkeypatch.setattr(textworld, "start", start)
    release = _fake_release(tmp_path / "rel", 3)
    games = alfenv.list_games(alfenv.ensure_games(release), "train")
    assert len(games) == 3

    with pytest.raises(alfenv.GameLoadError):
        alfenv.AlfworldEnv(games[0].game_file).reset()
    with pytest.raises(alfenv.GameLoadError):
        alf.replay_expert(games[0].game_file)

    cache = tmp_path / "episodes.jsonl"
    res = alf.build_steps(release, "train", workers=1, cache_path=cache, progress=False)
    assert res.steps == [] and res.report.status == Counter(system_exit=3)
    assert len(res.report.failures) == 3 and all("system_exit" in f for f in res.report.failures)
    assert len(cache.read_text().splitlines()) == 3
    again = alf.build_steps(release, "train", workers=1, cache_path=cache, progress=False)
    assert again.report.from_cache == 3 and again.report.replayed == 0 and again.report.status["system_exit"] == 3


@pytest.mark.slow
def test_build_steps_two_workers_resumes(games_root, tmp_path):
    """Two spawned workers on 4 valid_train games, then a resumed, grown run (~30 s on 2 cores)."""
    cache = tmp_path / "episodes.jsonl"
    a = alf.build_steps(games_root, "valid_train", max_episodes=3, workers=2, seed=0, cache_path=cache, progress=False)
    assert a.report.status["won"] == 3 and a.report.replayed == 3 and len(a.steps) >= 9
    b = alf.build_steps(games_root, "valid_train", max_episodes=4, workers=2, seed=0, cache_path=cache, progress=False)
    assert b.report.from_cache == 3 and b.report.replayed == 1
    assert [s for s in b.steps if s.episode_id in {x.episode_id for x in a.steps}] == a.steps
    assert all(s.expert_action in s.admissible for s in b.steps)


def _die_on_b(job):
    """Pool job for the crash test: kills its worker process on game 'b'."""
    if "-b/" in job[0]:
        os._exit(3)
    return {"episode_id": alfenv.episode_id_for(job[0]), "status": "won"}


@pytest.mark.slow
def test_pool_survives_a_dying_worker():
    """A game that kills its worker is recorded as crashed; the other games still finish (~15 s)."""
    jobs = [(f"/nowhere/train/pick_and_place_simple-{x}/trial_T1_1_{i}/game.tw-pddl", 50, 0)
            for i, x in enumerate("abcd")]
    got = []
    alf_replay._run_pool(jobs, 2, "spawn", got.append, fn=_die_on_b)
    assert len(got) == 4  # each game recorded exactly once
    status = {r["episode_id"].split("/")[2]: r["status"] for r in got}
    assert status == {"pick_and_place_simple-a": "won", "pick_and_place_simple-b": "crashed",
                      "pick_and_place_simple-c": "won", "pick_and_place_simple-d": "won"}


def test_reset_restores_sys_argv(games_root):
    """The PDDL loader rewrites sys.argv on its first use in a process: check in a fresh one."""
    import subprocess

    game = alfenv.list_games(games_root, "valid_seen")[0].game_file
    code = ("import sys; from fastrank.envs.alfworld import AlfworldEnv; sys.argv = ['prog', 'x']; "
            f"AlfworldEnv({game!r}).reset(); print(sys.argv)")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['prog', 'x']"


def test_concurrent_unpacks_do_not_collide(tmp_path):
    """Several processes asking for the same tarball at once (parallel tests, agent-eval beside a build):
    one unpacks, the others wait for it; every caller gets the same complete tree."""
    import subprocess
    import tarfile

    tree = tmp_path / "src" / "json_2.1.1"
    for i in range(200):
        d = tree / "train" / f"task-{i}" / "trial_T1"
        d.mkdir(parents=True)
        (d / "game.tw-pddl").write_text("{}" * 500)
    tarball = tmp_path / "games.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tree, arcname="json_2.1.1")
    cache = tmp_path / "cache"
    code = (f"from fastrank.envs.alfworld import ensure_games; "
            f"print(ensure_games({str(tarball)!r}, {str(cache)!r}))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    assert {out.strip() for out, _ in outs} == {str(cache / "json_2.1.1")}
    assert len(list((cache / "json_2.1.1" / "train").iterdir())) == 200
    assert not list(cache.glob(".unpack.*/"))  # no half-unpacked leftovers


def test_the_expert_is_reproducible_whatever_the_global_random(games_root):
    """The handcoded expert falls back to a random admissible command in this game (step 3); it draws from the
    env's own generator, so two runs agree even when the process's `random` is in another state (two runs of one
    DAgger recipe once collected 3,879 vs 3,853 states from the same games), and the global state is not used."""
    import random

    game = games_root / "train/look_at_obj_in_light-AlarmClock-None-DeskLamp-301/trial_T20190907_174127_043461"

    def play(global_seed):
        random.seed(global_seed)
        before = random.getstate()
        env = alfenv.AlfworldEnv(game / "game.tw-pddl")
        try:
            s, plan, sources = env.reset(), [], []
            while not s.done and len(plan) < 50:
                plan.append(s.info["expert_plan"])
                sources.append(s.info["expert_source"])
                s = env.step(plan[-1])
        finally:
            env.close()
        assert random.getstate() == before
        return plan, sources, s.won

    a, b = play(1), play(2)
    assert "random" in a[1] and a[2]
    assert a == b
