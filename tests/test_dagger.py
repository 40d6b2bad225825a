"""DAgger for the ALFWorld agent (fastrank/dagger.py): expert labels at off-policy states, and a short run."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastrank.agent_config import AgentConfig
from fastrank.dagger import agreement, collect, expert_label, inferable, labelled_set
from fastrank.data.history import EpisodeMemory
from fastrank.envs.base import EnvState

SHARED = Path(os.environ.get("FASTRANK_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
TARBALL = SHARED / "alfworld" / "json_2.1.1_games.tar.xz"


def _state(plan, source, admissible=("go to a", "look", "take x from a")):
    return EnvState("obs", "goal", list(admissible), "t", info={"expert_plan": plan, "expert_source": source})


def test_expert_label_keeps_only_the_experts_own_admissible_choice():
    assert expert_label(_state("go to a", "policy")) == "go to a"
    assert expert_label(_state("look", "initial_look")) is None  # the scripted opening look
    assert expert_label(_state("look", "look_fallback")) is None  # its suggestion was not admissible
    assert expert_label(_state("go to a", "random")) is None  # its random pick when its plan repeats
    assert expert_label(_state("open b", "policy")) is None  # not admissible here
    assert expert_label(_state(None, "policy")) is None


def test_labelled_set_puts_the_label_among_admissible_negatives_with_history():
    mem = EpisodeMemory.from_turns([("look", "You see nothing."), ("go to a", "On the a, you see a x.")])
    slot = SimpleNamespace(state=_state("take x from a", "policy"), memory=mem, log=[{}, {}], task="g")
    cs = labelled_set(slot, "take x from a", max_negatives=1, rng=random.Random(0))
    cs.validate()
    assert cs.expert_action == "take x from a" and len(cs.candidates) == 2
    assert cs.candidates[1] in ("go to a", "look") and cs.step == 2
    assert cs.history == [["look", "You see nothing."], ["go to a", "On the a, you see a x."]]
    # hard negatives: what the policy scores highest comes first, then its own earlier actions
    adm = ["take x from a", "go to a", "look", "go to b", "go to c", "go to d", "inventory"]
    slot = SimpleNamespace(state=_state("take x from a", "policy", adm), memory=mem, log=[{}, {}], task="g")
    scores = {"go to d": 5.0, "inventory": 4.0, "take x from a": 9.0, "go to b": -1.0}
    cs = labelled_set(slot, "take x from a", max_negatives=4, rng=random.Random(0), scores=scores)
    # max_negatives 4: one hard (the policy's top wrong action), one of its own earlier actions, two uniform
    assert cs.candidates[:3] == ["take x from a", "go to d", "go to a"] and len(cs.candidates) == 5
    assert "inventory" not in cs.candidates[:3]  # only the top third are mined
    assert agreement([{"trajectory": [{"by": "policy", "action": "a", "label": "a"},
                                      {"by": "policy", "action": "b", "label": "a"},
                                      {"by": "expert", "action": "c", "label": "d"},
                                      {"by": "policy", "action": "e", "label": None}]}]) == 0.5


def test_search_labels_inferable_skips_the_experts_go_to_while_nothing_asked_for_is_held():
    goal = "put a hot apple in fridge."
    searching = EpisodeMemory.from_turns([("go to countertop 1", "On the countertop 1, you see a bread 1.")])
    holding = EpisodeMemory.from_turns([("go to countertop 1", "On the countertop 1, you see a apple 1."),
                                        ("take apple 1 from countertop 1", "You pick up the apple 1 from the countertop 1.")])
    wrong = EpisodeMemory.from_turns([("go to countertop 1", "On the countertop 1, you see a bread 1."),
                                      ("take bread 1 from countertop 1", "You pick up the bread 1 from the countertop 1.")])

    def slot(mem, g=goal):
        return SimpleNamespace(state=EnvState("obs", g, ["go to microwave 1"], "t"), memory=mem)

    assert not inferable(slot(searching), "go to cabinet 3")  # where the apple lies: only the expert knows
    assert not inferable(slot(wrong), "go to cabinet 3")  # a bread is not what the goal asks for
    assert inferable(slot(searching), "open drawer 1") and inferable(slot(searching), "take bread 1 from countertop 1")
    assert inferable(slot(holding), "go to microwave 1")  # with the apple in hand: the appliance, the target
    assert inferable(slot(searching, "Your task is to boil water."), "go to kitchen")  # no roles: every label


def test_expert_states_get_the_actions_naming_goal_words_as_hard_negatives():
    """No policy scored a BC state: its mined third are the actions that name the most goal words (putting
    the alarmclock back where it lay), which a uniform draw from ~30 admissible actions seldom offers."""
    adm = ["go to desk 1", "put alarmclock 3 in/on sidetable 1", "examine sidetable 1", "go to shelf 1",
           "go to shelf 2", "go to bed 1", "inventory", "look", "take alarmclock 2 from sidetable 1"]
    mem = EpisodeMemory.from_turns([("take alarmclock 3 from sidetable 1", "You pick up the alarmclock 3 from the sidetable 1.")])
    for seed in range(5):
        state = EnvState("obs", "put a alarmclock in desk.", adm, "t", info={"expert_plan": "go to desk 1"})
        slot = SimpleNamespace(state=state, memory=mem, log=[{}], task="g")
        cs = labelled_set(slot, "go to desk 1", max_negatives=6, rng=random.Random(seed))
        assert set(cs.candidates[1:3]) == {"put alarmclock 3 in/on sidetable 1", "take alarmclock 2 from sidetable 1"}
        assert len(cs.candidates) == 7 and len(set(cs.candidates)) == 7


def _games(split="train"):
    if not TARBALL.exists():
        pytest.skip(f"shared data not here: {TARBALL}")
    pytest.importorskip("alfworld")
    from fastrank.envs.alfworld import ensure_games, list_games

    return list_games(ensure_games(TARBALL), split)


class _Wrong:
    """A policy that never does what the expert would: it takes the last admissible action."""

    def score(self, goal, observation, candidates):
        return torch.arange(len(candidates), dtype=torch.float32)


def test_off_policy_state_is_labelled_with_the_experts_action_and_the_expert_recovers():
    from fastrank.envs.alfworld import AlfworldEnv

    from fastrank.agent_eval import spread_over_types

    game = spread_over_types(_games(), 2)[1].game_file  # pick_and_place_simple
    cfg = AgentConfig(max_steps=4, batch_size=1, max_negatives=5)
    sets, ro = collect(_Wrong(), AlfworldEnv, [game], beta=0.0, cfg=cfg, seed=0, desc="test")
    [ep] = ro.episodes
    assert ep["error"] is None and all(t["by"] == "policy" for t in ep["trajectory"])
    labelled = [t for t in ep["trajectory"] if t["label"]]
    assert labelled and len(sets) == len(labelled)
    for cs, t in zip(sets, labelled):
        assert cs.expert_action == t["label"] and cs.expert_action != t["action"]  # off-policy: it disagreed
        assert len(cs.history) == cs.step  # the episode so far, every step
    # from the state the wrong policy reached, the labels are the expert's plan, and following it wins
    with AlfworldEnv() as env:
        s = env.reset(game)
        for t in ep["trajectory"]:
            s = env.step(t["action"])
        for _ in range(40):
            if s.done:
                break
            s = env.step(s.info["expert_plan"])
        assert s.won


@pytest.mark.slow
def test_recipe_end_to_end_on_real_games(tmp_path):
    """BC + one DAgger round + resume, with a tiny encoder, on real train games (~1 min)."""
    _games()
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fastrank.dagger import run_dagger
    from fastrank.model import PRESETS

    tok = AutoTokenizer.from_pretrained(PRESETS["minilm"])
    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64, max_position_embeddings=256))
    enc.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    cfg = dict(model=str(tmp_path / "tiny"), games_dir=str(TARBALL), episodes=[2, 1], betas=[1.0, 0.0],
               max_steps=6, eval_games=1, batch_size=2, max_length=96, output_dir=str(tmp_path / "run"))
    res = run_dagger(AgentConfig(**cfg))
    out = tmp_path / "run"
    assert [r["round"] for r in res["rounds"]] == [0, 1]
    assert res["rounds"][0]["states_added"] > 0 and res["rounds"][0]["agreement"] is None  # BC: expert only
    assert res["rounds"][1]["episodes"] == 1 and res["rounds"][1]["eval"]["episodes"] == 1
    assert (out / "model" / "fastrank.json").exists() and "| round | beta |" in (out / "report.md").read_text()
    plan = json.loads((out / "games.json").read_text())  # what `agent-eval --unplayed-by` leaves out
    assert len(plan["eval"]) == 1 and [len(r) for r in plan["rounds"]] == [2, 1]
    played = [*plan["eval"], *plan["rounds"][0], *plan["rounds"][1]]
    assert len(set(played)) == 4 and not set(played) & set(plan["unplayed"])
    [ev_ep] = [json.loads(x) for x in (out / "dagger" / "round_1" / "eval_episodes.jsonl").read_text().splitlines()]
    assert ev_ep["steps"] == len(ev_ep["trajectory"]) > 0  # the fixed-game evaluation, every step, to read
    assert "episodes_log" not in json.loads((out / "dagger" / "round_1" / "metrics.json").read_text())["eval"]
    meta = json.loads((out / "model" / "fastrank.json").read_text())
    assert meta["layout"] == "shared_prefix" and meta["featurizer"]["mode"] == "history"
    best = res["output_round"]  # the model of the round that won most fixed train games is the output
    from safetensors.torch import load_file

    chosen, written = (load_file(d / "model.safetensors") for d in (out / "dagger" / f"round_{best}" / "model", out / "model"))
    assert all(torch.equal(chosen[k], written[k]) for k in chosen)
    again = run_dagger(AgentConfig(**cfg, resume=True))  # both rounds done: nothing is replayed
    assert [r["states_added"] for r in again["rounds"]] == [r["states_added"] for r in res["rounds"]]


def test_an_expert_that_raises_leaves_the_state_unlabelled_and_the_game_going():
    """alfworld's handcoded task policies raise IndexError in some off-policy states (measured in a DAgger
    round): the step still returns, the state is marked `expert_error` and gets no label."""
    from fastrank.agent_eval import spread_over_types
    from fastrank.envs.alfworld import AlfworldEnv

    game = spread_over_types(_games(), 2)[1].game_file
    with AlfworldEnv() as env:
        s = env.reset(game)
        policy = env._env._handcoded_expert.policy

        def broken(*a, **k):
            raise IndexError("Cannot choose from an empty sequence")

        policy.act = broken
        action = next(a for a in s.admissible if a.startswith("go to"))
        s = env.step(action)
        assert s.info["expert_source"] == "expert_error" and "IndexError" in s.info["expert_suggested"]
        assert expert_label(s) is None and not s.done and s.observation
        s = env.step(s.admissible[0])  # the game goes on
        assert s.info["expert_source"] == "expert_error"


def test_the_output_is_the_round_that_won_most_train_games():
    from fastrank.dagger import pick_round

    def r(k, success, repeats):
        return {"round": k, "eval": {"success_rate": success, "repeated_action_rate": repeats}}

    assert pick_round([r(0, 0.5625, 0.18), r(1, 0.5, 0.10)]) == 0  # more games won beats fewer repeats
    assert pick_round([r(0, 0.5, 0.30), r(1, 0.5, 0.10), r(2, 0.25, 0.0)]) == 1  # a tie: fewer repeats
    assert pick_round([r(0, 0.5, 0.1), r(1, 0.5, 0.1)]) == 1  # a full tie: the later round


def test_notes_key_pins_the_featurizer_version_of_a_fresh_model():
    """A recipe's figures come from one notes version; `notes:` keeps a YAML on it when the default moves on."""
    from fastrank.dagger import agent_model
    from fastrank.data.features import NOTES_VERSION

    assert agent_model(AgentConfig(notes=4), torch.device("cpu")).featurizer.notes == 4
    assert agent_model(AgentConfig(), torch.device("cpu")).featurizer.notes == NOTES_VERSION
    with pytest.raises(ValueError, match="notes version"):
        agent_model(AgentConfig(notes=NOTES_VERSION + 1), torch.device("cpu"))


def test_cpu_has_bf16_reads_the_cpu_flags(tmp_path):
    from fastrank.train import cpu_has_bf16

    avx2 = tmp_path / "avx2"
    avx2.write_text("flags\t\t: fpu sse sse2 avx avx2 fma\n")
    zen4 = tmp_path / "zen4"
    zen4.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    sapphire = tmp_path / "spr"
    sapphire.write_text("flags\t\t: avx512f amx_bf16 amx_tile\n")
    assert not cpu_has_bf16(str(avx2))
    assert cpu_has_bf16(str(zen4)) and cpu_has_bf16(str(sapphire))
    assert cpu_has_bf16(str(tmp_path / "absent"))  # no cpuinfo (macOS, Windows): not second-guessed


def test_game_plan_splits_the_train_games_into_eval_rounds_and_unplayed():
    from fastrank.dagger import game_plan

    games = [SimpleNamespace(task_type=t, game_file=f"/c/train/{t}/trial_{i}/game.tw-pddl") for t in "abc"
             for i in range(5)]
    cfg = AgentConfig(episodes=[4, 3], betas=[1.0, 0.5], eval_games=3, seed=1)
    plan = game_plan(cfg, games)
    assert len({Path(g).parts[-3] for g in plan["eval"]}) == 3  # one game per task type
    assert [len(r) for r in plan["rounds"]] == [4, 3] and len(plan["unplayed"]) == 15 - 3 - 7
    assert sorted(plan["eval"] + sum(plan["rounds"], []) + plan["unplayed"]) == sorted(g.game_file for g in games)
    assert game_plan(cfg, games) == plan  # seeded: the recipe and agent-eval agree on it
    with pytest.raises(ValueError, match="rollout episodes asked for"):
        game_plan(AgentConfig(episodes=[20], betas=[1.0], eval_games=3), games)


def test_agent_eval_unplayed_by_keeps_only_the_games_no_round_saw(tmp_path):
    from fastrank.agent_eval import unplayed_games

    games = [SimpleNamespace(task_type="a", game_file=f"/here/train/a/trial_{i}/game.tw-pddl") for i in range(4)]
    plan = {"split": "train", "eval": [], "rounds": [], "unplayed": [f"/elsewhere/train/a/trial_{i}/game.tw-pddl"
                                                                    for i in (1, 3)]}
    (tmp_path / "games.json").write_text(json.dumps(plan))
    kept = unplayed_games(games, tmp_path, "train")  # matched by task/trial/file: the cache folder may differ
    assert [g.game_file for g in kept] == [games[1].game_file, games[3].game_file]
    with pytest.raises(ValueError, match="needs --split train"):
        unplayed_games(games, tmp_path, "valid_seen")
    with pytest.raises(FileNotFoundError, match="no games.json"):
        unplayed_games(games, tmp_path / "nowhere", "train")


@pytest.mark.parametrize("has_bf16", [False, True])
def test_recipes_train_in_fp32_where_the_cpu_would_emulate_bf16(monkeypatch, has_bf16):
    """`accelerate launch --mixed_precision bf16` on a CPU without AVX512-BF16 / AMX: fp32 and a warning (emulated
    bf16 was ~20x slower a step); on a CPU that has it, bf16 as asked."""
    if torch.cuda.is_available():
        pytest.skip("the fallback is for CPUs")
    from accelerate.state import AcceleratorState

    import fastrank.dagger as dg

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setattr(dg, "cpu_has_bf16", lambda: has_bf16)
    threads = torch.get_num_threads()
    AcceleratorState._reset_state(True)
    try:
        if has_bf16:
            assert dg.agent_accelerator(AgentConfig(cpu_threads=1)).mixed_precision == "bf16"
        else:
            with pytest.warns(UserWarning, match="training in fp32 instead"):
                assert dg.agent_accelerator(AgentConfig(cpu_threads=1)).mixed_precision == "no"
    finally:
        AcceleratorState._reset_state(True)
        torch.set_num_threads(threads)


def test_epochs_per_round_takes_one_number_or_one_per_round():
    from fastrank.config import recipe_config
    from fastrank.dagger import fit, round_epochs

    assert round_epochs(AgentConfig(episodes=[4, 2, 2], epochs_per_round=[1, 2, 2])) == [1.0, 2.0, 2.0]
    assert round_epochs(AgentConfig(episodes=[4, 2], epochs_per_round=2)) == [2.0, 2.0]
    with pytest.raises(ValueError, match="2 entries for 3 rounds"):
        round_epochs(AgentConfig(episodes=[4, 2, 2], epochs_per_round=[1, 2]))
    with pytest.raises(ValueError, match="> 0"):
        round_epochs(AgentConfig(episodes=[4, 2], epochs_per_round=[1, 0]))
    # the recipe's override syntax reaches the config as a list
    cfg = recipe_config("recipes/agent_alfworld.py", ["epochs_per_round=[1,2,2]", "episodes=[2,1,1]",
                                                      "betas=[1,0.5,0.25]"], cls=AgentConfig)
    assert round_epochs(cfg) == [1.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="one number"):  # the single-fit recipes (ScienceWorld, WebShop)
        fit(None, [], AgentConfig(epochs_per_round=[1, 2]), SimpleNamespace(num_processes=1, process_index=0), seed=0)


def test_report_of_held_out_games_gives_both_repetition_rates(tmp_path):
    from fastrank.agent_eval import summarize
    from fastrank.dagger import write_agent_report

    def ep(task_type, won, actions):
        return {"task_type": task_type, "won": won, "score": float(won), "steps": len(actions),
                "trajectory": [{"action": a} for a in actions]}

    fe = summarize([ep("pick", True, ["go to a", "take x from a", "go to b", "go to a"]),
                    ep("heat", False, ["open f", "close f", "open f", "close f"])])
    write_agent_report({"rounds": [], "final_eval": {"split": "valid_seen", **fe, "decisions_per_s": 2.0}}, tmp_path)
    text = (tmp_path / "report.md").read_text()
    # 3 of 8 steps re-take an earlier action; 1 closes a repeated sequence (open / close / open / close)
    assert "repeated actions 37.5% (looped, the GCD count: 12.5%)" in text
    assert "| heat | 1 | 0.0% | 4.0 | 50.0% | 25.0% |" in text and "| pick | 1 | 100.0% | 4.0 | 25.0% | 0.0% |" in text
