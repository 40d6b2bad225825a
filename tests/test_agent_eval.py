"""`fastrank agent-eval`: a saved reranker acting in the real ALFWorld games (fastrank/agent_eval.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastrank.agent_eval import looped_steps, run_episode, spread_over_types, summarize
from fastrank.envs.base import EnvState
from fastrank.model import PRESETS, Reranker

SHARED = Path(os.environ.get("FASTRANK_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
TARBALL = SHARED / "alfworld" / "json_2.1.1_games.tar.xz"


def test_games_are_spread_over_task_types():
    games = [SimpleNamespace(task_type=t, game_file=f"{t}{i}") for t, k in (("a", 3), ("b", 2), ("c", 1))
             for i in range(k)]
    assert [g.game_file for g in spread_over_types(games, 4)] == ["a0", "b0", "c0", "a1"]
    assert len(spread_over_types(games, 100)) == 6  # asking for more than there are gives all, once each
    assert [g.game_file for g in spread_over_types(games, 0)] == ["a0", "b0", "c0", "a1", "b1", "a2"]  # 0: all


def test_summary_counts_success_types_and_repeats():
    def ep(task_type, won, actions):
        return {"task_type": task_type, "won": won, "score": float(won), "steps": len(actions),
                "trajectory": [{"action": a} for a in actions]}

    s = summarize([ep("pick", True, ["go to a", "take x"]), ep("pick", False, ["look", "look", "look"]),
                   ep("heat", False, ["go to b", "go to c", "go to b"])])
    assert s["episodes"] == 3 and s["success_rate"] == pytest.approx(1 / 3)
    assert s["mean_steps"] == pytest.approx(8 / 3)
    assert s["repeated_action_rate"] == pytest.approx(3 / 8)  # 2 repeated "look" + 1 repeated "go to b"
    assert s["per_task_type"]["pick"]["success_rate"] == 0.5
    assert s["looped_action_rate"] == pytest.approx(2 / 8)  # look, look, look: two copies of the step before
    assert s["per_task_type"]["heat"] == {"episodes": 1, "success_rate": 0.0, "mean_score": 0.0,
                                          "mean_steps": 3.0, "repeated_action_rate": pytest.approx(1 / 3),
                                          "looped_action_rate": 0.0}


@pytest.mark.parametrize("actions, looped", [
    ([], 0), (["a"], 0), (["a", "a"], 1),
    (["go to d", "open d", "close d", "open d", "close d"], 1),  # the second open/close pair closes a 2-cycle
    (["a", "b", "c", "a", "b", "c", "a"], 2),  # the second c closes abc, the third a closes bca
    (["go to x", "take p from x", "go to y", "put p in y", "go to x", "take q from x", "go to y", "put q in y"], 0),
    (["a", "b", "a", "c", "a"], 0),  # returns, no cycle: counted by repeated_action_rate only
])
def test_looped_steps_counts_copies_and_repeated_sequences(actions, looped):
    assert looped_steps(actions) == looped


def test_games_that_fail_to_load_are_counted_and_listed_not_dropped():
    ok = {"task_type": "pick", "won": True, "score": 1.0, "steps": 1, "trajectory": [{"action": "a"}]}
    bad = {"task": "g/broken", "task_type": "", "won": False, "score": 0.0, "steps": 0, "trajectory": [],
           "error": "GameLoadError: game loader called sys.exit(1)"}
    s = summarize([ok, bad])
    assert s["episodes"] == 1 and s["success_rate"] == 1.0  # rates over the games actually played
    assert s["failed_to_load"] == {"count": 1, "games": [["g/broken", "GameLoadError: game loader called sys.exit(1)"]]}
    from fastrank.agent_eval import failed_to_load_lines

    assert failed_to_load_lines(s, noun="task") == ["", "1 task(s) failed to load:",
                                                     "- g/broken: GameLoadError: game loader called sys.exit(1)"]
    assert failed_to_load_lines(summarize([ok])) == []


def test_run_episodes_reports_a_game_that_fails_to_load():
    from fastrank.rollout import run_episodes

    class _Broken(_Drawer):
        def reset(self, task):
            if task == "broken":
                raise RuntimeError("no such game")
            return super().reset(task)

    ro = run_episodes(_Broken, ["ok", "broken", "ok"], _Prefers(), max_steps=3, batch_size=2, avoid_repeats=True)
    assert [e["error"] for e in ro.episodes] == [None, "RuntimeError: no such game", None]
    assert [e["won"] for e in ro.episodes] == [True, False, True] and ro.decisions == 6


class _Drawer:
    """'examine drawer' leaves the observation unchanged; 'open drawer' wins. The ranker prefers examine."""

    def reset(self, task):
        return EnvState("You see a drawer.", "open the drawer", ["examine drawer", "open drawer", "look"], "t")

    def step(self, action):
        if action == "open drawer":
            return EnvState("The drawer is open.", "open the drawer", [], "t", reward=1.0, done=True, won=True)
        return self.reset(None)

    def close(self):
        pass


class _Prefers:
    def score(self, goal, observation, candidates):
        return torch.tensor([{"examine drawer": 2.0, "look": 1.0, "open drawer": 0.0}[c] for c in candidates])


def test_avoid_repeats_breaks_the_same_observation_loop():
    ep = run_episode(_Drawer(), _Prefers(), None, max_steps=10)
    assert not ep["won"] and [s["action"] for s in ep["trajectory"]] == ["examine drawer"] * 10
    ep = run_episode(_Drawer(), _Prefers(), None, max_steps=10, avoid_repeats=True)
    assert ep["won"] and [s["action"] for s in ep["trajectory"]] == ["examine drawer", "look", "open drawer"]
    assert ep["trajectory"][1]["top"][0] == ["examine drawer", 2.0]  # the ranking is logged unchanged


class _Locked:
    """The drawer opens only once the key is held; taking the key leaves the observation as it was."""

    def reset(self, task):
        self.holding = False
        return EnvState("The drawer 1 is closed.", "open the drawer", ["open drawer 1", "take key 1 from table 1",
                                                                        "look"], "t")

    def step(self, action):
        if action == "open drawer 1" and self.holding:
            return EnvState("You open the drawer 1.", "open the drawer", [], "t", reward=1.0, done=True, won=True)
        self.holding |= action.startswith("take key")
        return EnvState("The drawer 1 is closed.", "open the drawer", ["open drawer 1", "take key 1 from table 1",
                                                                         "look"], "t")

    def close(self):
        pass


class _PrefersOpen:
    def score(self, goal, observation, candidates):
        return torch.tensor([{"open drawer 1": 2.0, "take key 1 from table 1": 1.0, "look": 0.5}[c] for c in candidates])


def test_avoid_repeats_retries_an_action_once_an_effectful_action_changed_the_world():
    """Same observation, but the key is now held: opening again is a new try (keyed by the observation alone,
    the rule blocked it and the agent looked around instead)."""
    ep = run_episode(_Locked(), _PrefersOpen(), None, max_steps=10, avoid_repeats=True)
    assert ep["won"] and [s["action"] for s in ep["trajectory"]] == ["open drawer 1", "take key 1 from table 1",
                                                                     "open drawer 1"]


class _Sink:
    """ScienceWorld-like: the env shows its world (`info["world"]`); toggling the sink returns to the same world with a
    different reply, and the task is won by going to the workshop."""

    def _state(self, obs):
        world = f"room: kitchen; sink ({'on' if self.on else 'off'})"
        return EnvState(obs, "go to the workshop", ["deactivate sink" if self.on else "activate sink", "go to workshop"],
                        "t", info={"world": world})

    def reset(self, task):
        self.on = False
        return self._state("You look around.")

    def step(self, action):
        if action == "go to workshop":
            return EnvState("You move to the workshop.", "go", [], "t", reward=1.0, done=True, won=True)
        self.on = action == "activate sink"
        return self._state(f"The sink is now {'activated' if self.on else 'deactivated'}.")

    def close(self):
        pass


class _PrefersSink:
    def score(self, goal, observation, candidates):
        on = "now activated" in observation  # it always prefers to flip the sink
        return torch.tensor([{"activate sink": 1.9 if on else 2.0, "deactivate sink": 2.0 if on else 1.9,
                              "go to workshop": 0.0}[c] for c in candidates])


def test_avoid_repeats_breaks_a_toggle_loop_through_the_world_state():
    """activate / deactivate produce new replies (and count as effectful), so only the world key sees that the agent
    is back where it was: the third step is the untried action, not `activate sink` again."""
    ep = run_episode(_Sink(), _PrefersSink(), None, max_steps=6)
    assert not ep["won"] and [s["action"] for s in ep["trajectory"]][:4] == ["activate sink", "deactivate sink"] * 2
    ep = run_episode(_Sink(), _PrefersSink(), None, max_steps=6, avoid_repeats=True)
    assert ep["won"] and [s["action"] for s in ep["trajectory"]] == ["activate sink", "deactivate sink",
                                                                     "go to workshop"]


class _Rooms:
    """Four places; the key is at D and must be put in A. The scorer (below) likes A, then B, C, D."""

    def reset(self, task):
        self.at, self.holding = None, False
        return self._state("You are in the middle of a room.")

    def _state(self, obs, won=False):
        acts = [f"go to {p}" for p in "ABCD" if p != self.at]
        acts += ["take key"] if self.at == "D" and not self.holding else []
        acts += ["put key in A"] if self.at == "A" and self.holding else []
        return EnvState(obs, "put the key in A", [] if won else acts, "t", reward=float(won), done=won, won=won)

    def step(self, action):
        if action == "put key in A":
            return self._state("You put the key in A.", won=True)
        if action == "take key":
            self.holding = True
            return self._state("You pick up the key.")
        self.at = action[-1]
        return self._state(f"You arrive at {self.at}.")

    def close(self):
        pass


class _LikesA:
    def __init__(self, env):
        self.env = env

    def score(self, goal, observation, candidates):
        pref = {"go to A": 10.0 if self.env.holding else 3.0, "go to B": 2.9, "go to C": 1.5, "go to D": 0.5,
                "take key": 20.0, "put key in A": 20.0}
        return torch.tensor([pref[c] for c in candidates])


def test_repeat_penalty_searches_new_places_first_and_still_returns_when_sure():
    """Without it the loop breaker still walks back to A between every new place (3 repeats); with a penalty of 3
    the search goes A B C D, and the confident return to A with the key (10 - 3 > the rest) still happens."""
    env = _Rooms()
    ep = run_episode(env, _LikesA(env), None, max_steps=20, avoid_repeats=True)
    acts = [s["action"] for s in ep["trajectory"]]
    assert ep["won"] and acts == ["go to A", "go to B", "go to A", "go to C", "go to A", "go to D", "take key",
                                  "go to A", "put key in A"]
    ep = run_episode(env, _LikesA(env), None, max_steps=20, avoid_repeats=True, repeat_penalty=3.0)
    acts = [s["action"] for s in ep["trajectory"]]
    assert ep["won"] and acts == ["go to A", "go to B", "go to C", "go to D", "take key", "go to A", "put key in A"]
    assert ep["repeats"] == 1
    assert ep["trajectory"][2]["top"][0] == ["go to A", 3.0]  # the model's own ranking is what the log shows


def _tiny_checkpoint_and_games(tmp_path):
    """A 1-layer reranker saved under tmp_path (skips without the shared games or the alfworld extra)."""
    if not TARBALL.exists():
        pytest.skip(f"shared data not here: {TARBALL}")
    pytest.importorskip("alfworld")
    from transformers import AutoTokenizer, BertConfig

    tok = AutoTokenizer.from_pretrained(PRESETS["minilm"])
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=160)
    return Reranker.from_config(cfg, tok, max_length=96).save_pretrained(tmp_path / "ranker")


@pytest.mark.parametrize("bf16", [False, True])
def test_agent_eval_cli_plays_real_games(tmp_path, capsys, monkeypatch, bf16):
    import fastrank.train as tr

    monkeypatch.setattr(tr, "cpu_has_bf16", lambda: True)  # the autocast path runs here even on an AVX2-only CPU
    ckpt = _tiny_checkpoint_and_games(tmp_path)
    from fastrank.cli import main

    out = tmp_path / "episodes.jsonl"
    rc = main(["agent-eval", "--env", "alfworld", "--games", "2", "--max-steps", "3", "--checkpoint", str(ckpt),
               "--games-dir", str(TARBALL), "--out", str(out)] + (["--bf16"] if bf16 else []))
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bf16"] is bf16 and summary["episodes"] == 2 and 0.0 <= summary["success_rate"] <= 1.0 and summary["workers"] == 1
    assert summary["log"] == str(out) and len(summary["per_task_type"]) == 2
    episodes = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(episodes) == 2
    assert len({e["task_type"] for e in episodes}) == 2  # round-robin: two games, two task types
    for e in episodes:
        assert 1 <= e["steps"] == len(e["trajectory"]) <= 3
        for s in e["trajectory"]:
            assert s["n_candidates"] >= 2
            # the action taken is the best-scored admissible action, runners-up logged in order
            assert s["top"][0] == [s["action"], s["score"]]
            assert [x[1] for x in s["top"]] == sorted((x[1] for x in s["top"]), reverse=True)


@pytest.mark.slow  # two spawned processes each import torch and load ALFWorld (~1 min)
def test_agent_eval_workers_play_the_same_episodes_as_one_process(tmp_path, capsys):
    """--workers 2 splits the games between two processes; the merged log is the one-process log, in task
    order, and no partial log is left behind."""
    ckpt = _tiny_checkpoint_and_games(tmp_path)
    from fastrank.cli import main

    logs = {}
    for w in (1, 2):
        out = tmp_path / f"w{w}.jsonl"
        assert main(["agent-eval", "--env", "alfworld", "--games", "3", "--max-steps", "4", "--checkpoint",
                     str(ckpt), "--games-dir", str(TARBALL), "--out", str(out), "--workers", str(w)]) == 0
        capsys.readouterr()
        logs[w] = [json.loads(x) for x in out.read_text().splitlines()]
        assert not list(tmp_path.glob(f"w{w}.partial*"))
    assert [e["task"] for e in logs[2]] == [e["task"] for e in logs[1]] and len(logs[1]) == 3
    assert [[s["action"] for s in e["trajectory"]] for e in logs[2]] == \
        [[s["action"] for s in e["trajectory"]] for e in logs[1]]
    assert json.loads((tmp_path / "w2.summary.json").read_text())["workers"] == 2


def test_agent_eval_logs_each_episode_as_it_ends_so_a_stopped_run_keeps_them(tmp_path, monkeypatch):
    """An hour-long evaluation stopped near its end used to leave no log: now `<out>.partial.jsonl` holds every
    episode played, and a finished run replaces it by the log in task order."""
    import fastrank.agent_eval as ae
    from fastrank.rollout import run_episodes

    seen = []
    ro = run_episodes(_Drawer, ["a", "b", "c"], _Prefers(), max_steps=4, batch_size=2, on_episode=seen.append)
    assert sorted(e["task"] for e in seen) == ["a", "b", "c"] and len(seen) == len(ro.episodes)

    class _Stop(Exception):
        pass

    class _StopsAfterTwo(_Prefers):
        calls = 0

        def score(self, goal, observation, candidates):
            type(self).calls += 1
            if self.calls > 2:  # games 1 and 2 (one winning decision each, one at a time) are over: game 3 is next
                raise _Stop
            return torch.tensor([{"examine drawer": 0.0, "look": 1.0, "open drawer": 2.0}[c] for c in candidates])

    monkeypatch.setitem(ae.TASKS, "alfworld", lambda args: (_Drawer, ["g1", "g2", "g3"], None))
    monkeypatch.setattr(Reranker, "from_pretrained", classmethod(lambda cls, path: _StopsAfterTwo()))
    out = tmp_path / "log.jsonl"
    args = SimpleNamespace(env="alfworld", games_dir="x", checkpoint="ckpt", batch_size=1, max_steps=4,
                           avoid_repeats=False, seed=0, out=str(out), split="valid_seen")
    with pytest.raises(_Stop):
        ae.agent_eval_from_args(args)
    kept = [json.loads(x) for x in out.with_suffix(".partial.jsonl").read_text().splitlines()]
    assert [e["task"] for e in kept] == ["g1", "g2"] and all(e["won"] for e in kept) and not out.exists()


@pytest.mark.parametrize("argv, env, expected", [
    ([], "alfworld", True), ([], "webshop", False), ([], "scienceworld", False),
    (["--allow-repeats"], "alfworld", False), (["--avoid-repeats"], "webshop", True)])
def test_repeats_are_avoided_by_default_in_alfworld_only(monkeypatch, tmp_path, argv, env, expected):
    """ALFWorld's default decoding breaks same-observation loops (measured on train games); the other
    environments keep the top-scored action unless asked, so their documented figures reproduce."""
    import argparse

    import fastrank.agent_eval as ae

    seen = {}

    def fake_run_episodes(make_env, tasks, ranker, **kw):
        seen["avoid"], seen["penalty"] = kw["avoid_repeats"], kw["repeat_penalty"]
        return SimpleNamespace(episodes=[], model_seconds=0.0, decisions=0, decisions_per_s=0.0)

    p = argparse.ArgumentParser()
    ae.add_agent_eval_args(p)
    args = p.parse_args(["--env", env, "--checkpoint", "c", "--games-dir", "g", "--out", str(tmp_path / "l.jsonl"), *argv])
    monkeypatch.setitem(ae.TASKS, env, lambda a: (object, [], None))
    monkeypatch.setattr(Reranker, "from_pretrained", classmethod(lambda cls, path: object()))
    monkeypatch.setattr(ae, "run_episodes", fake_run_episodes)
    monkeypatch.setattr(ae, "summarize", lambda episodes: {})
    assert ae.agent_eval_from_args(args) == 0
    assert seen["avoid"] is expected
    assert seen["penalty"] == 0.0  # off unless asked
    args.repeat_penalty = 2.5
    assert ae.agent_eval_from_args(args) == 0 and seen["penalty"] == 2.5


def test_a_split_with_no_games_is_an_error_naming_the_splits_there(tmp_path, capsys):
    pytest.importorskip("alfworld")
    from fastrank.cli import main

    (tmp_path / "json_2.1.1" / "valid_seen").mkdir(parents=True)
    rc = main(["agent-eval", "--env", "alfworld", "--split", "valid_unseen", "--checkpoint", str(tmp_path),
               "--games-dir", str(tmp_path / "json_2.1.1")])
    err = capsys.readouterr().err
    assert rc == 2 and "no ALFWorld games of split 'valid_unseen'" in err and "['valid_seen']" in err


def test_scienceworld_env_takes_the_view_the_checkpoint_was_trained_on(tmp_path):
    """agent-eval shows a ScienceWorld policy the observation it was trained on (`Featurizer.observation_view`,
    saved in fastrank.json); `--observation-view` overrides it; checkpoints saved before the field read feedback."""
    import json

    from transformers import AutoTokenizer, BertConfig

    from fastrank.agent_eval import checkpoint_view
    from fastrank.data.features import Featurizer
    from fastrank.model import META_NAME

    tok = AutoTokenizer.from_pretrained(PRESETS["minilm"])
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=160)
    ckpt = Reranker.from_config(cfg, tok, featurizer=Featurizer("history", observation_view="room")).save_pretrained(
        tmp_path / "r")
    assert checkpoint_view(ckpt) == "room"
    assert Reranker.from_pretrained(ckpt).featurizer.observation_view == "room"
    meta = json.loads((ckpt / META_NAME).read_text())
    del meta["featurizer"]["observation_view"]  # as written before the field existed
    (ckpt / META_NAME).write_text(json.dumps(meta))
    assert checkpoint_view(ckpt) == "feedback" and Reranker.from_pretrained(ckpt).featurizer.observation_view == "feedback"


@pytest.mark.parametrize("has_bf16", [False, True])
def test_bf16_on_a_cpu_without_hardware_bf16_warns_and_scores_in_fp32(monkeypatch, tmp_path, has_bf16):
    """The recipes' accelerator warns there and trains in fp32 (emulated bf16 is ~50x slower); agent-eval --bf16
    does the same, and its summary says fp32 ran."""
    import warnings

    import fastrank.agent_eval as ae
    import fastrank.train as tr

    class _OnCpu(_Prefers):
        device = torch.device("cpu")

    monkeypatch.setattr(tr, "cpu_has_bf16", lambda: has_bf16)
    monkeypatch.setitem(ae.TASKS, "alfworld", lambda args: (_Drawer, ["g1"], None))
    monkeypatch.setattr(Reranker, "from_pretrained", classmethod(lambda cls, path: _OnCpu()))
    args = SimpleNamespace(env="alfworld", games_dir="x", checkpoint="ckpt", batch_size=1, max_steps=4, bf16=True,
                           avoid_repeats=True, seed=0, out=str(tmp_path / "log.jsonl"), split="valid_seen")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ae.agent_eval_from_args(args) == 0
    assert any("AVX512-BF16" in str(w.message) for w in caught) is (not has_bf16)
    summary = json.loads((tmp_path / "log.summary.json").read_text())
    assert summary["bf16"] is has_bf16 and args.bf16 is has_bf16
