"""The external labeler switched on from the config: key validation, self-consistent voting over sampled critic
verdicts, the per-update cap (nothing dropped without being counted), a frozen labeler model built by
modeling.load_base (the tiny random Qwen2; 8-bit), and trainer steps / a short run with `labeler: tiny`."""
from __future__ import annotations

import random

import pytest
import torch

from fastrank.gcd.config import GCDConfig, load_config
from fastrank.gcd.labels import BAD, GOOD, VotingCriticLabeler, apply_labels, build_labeler, rule_labels
from fastrank.gcd.policy import Generation, ScriptedPolicy
from fastrank.gcd.prompts import critic_prompt
from fastrank.gcd.tasks import Task
from test_gcd_helpers import CorridorEnv, make_episode, make_turn, say, verdict


# ------------------------------------------------------------------------------------------ config

def test_defaults_keep_rules_only():
    cfg = GCDConfig()
    assert cfg.labeler == "none" and build_labeler(cfg) is None
    assert GCDConfig(labeler=None).labeler == "none"  # YAML `labeler: null`
    cfg = load_config(None, ["labeler=policy", "labeler_samples=3", "labeler_min_agree=2",
                             "labeler_max_per_update=null"])
    assert (cfg.labeler, cfg.labeler_samples, cfg.labeler_min_agree, cfg.labeler_max_per_update) == \
        ("policy", 3, 2, None)
    GCDConfig(labeler="Qwen/Qwen2.5-7B-Instruct", labeler_load_in_4bit=True)  # a hub id is not checked offline
    GCDConfig(labeler="tiny", labeler_temperature=0.0, labeler_samples=1, labeler_min_agree=1)


@pytest.mark.parametrize("kwargs,match", [
    ({"labeler": "/no/such/folder"}, "no such folder"),
    ({"labeler": ""}, "labeler must be"),
    ({"labeler": "policy", "labeler_load_in_8bit": True}, "separate labeler model"),
    ({"labeler": "policy", "labeler_gguf_file": "x.gguf"}, "separate labeler model"),
    ({"labeler": "tiny", "labeler_load_in_4bit": True, "labeler_load_in_8bit": True}, "exclusive"),
    ({"labeler": "tiny", "labeler_min_agree": 6}, "strict majority"),
    ({"labeler": "tiny", "labeler_samples": 4, "labeler_min_agree": 2}, "strict majority"),
    ({"labeler": "tiny", "labeler_min_agree": 0}, "strict majority"),
    ({"labeler": "tiny", "labeler_temperature": -1.0}, ">= 0"),
    ({"labeler": "tiny", "labeler_temperature": 0.0}, "greedy"),
    ({"labeler": "tiny", "labeler_max_new_tokens": 0}, "labeler_max_new_tokens"),
    ({"labeler": "tiny", "labeler_max_per_update": 0}, "labeler_max_per_update"),
    ({"labeler": "tiny", "method": "grpo", "eval_judge_samples": 0}, "never uses the labeler"),
    ({"update_packing": "sparse"}, "update_packing"),
])
def test_bad_labeler_keys_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GCDConfig(**kwargs)


# ------------------------------------------------------------------------------------------ voting

class FakeSampler:
    """generate(prompts) -> the texts `answers[problem]` in turn, where problem is the turn prompt the critic
    prompt embeds; records every call."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers, self.calls = {k: list(v) for k, v in answers.items()}, []

    def generate(self, prompts, **kwargs):
        self.calls.append((list(prompts), kwargs))
        out = []
        for p in prompts:
            problem = next(k for k in self.answers if f"**Problem:** {k}\n" in p)
            out.append(Generation(self.answers[problem].pop(0), [], []))
        return out


def _open_episode():
    """Turns 0-2 have no rule label (new observations, episode lost); turn 3 repeats an observation (BAD)."""
    turns = [make_turn(k, f"o{k}", f"act {k}", f"o{k + 1}") for k in range(3)]
    turns.append(make_turn(3, "o3", "act 3", "o1"))
    return make_episode(turns, won=False)


def test_self_consistency_four_of_five_labels_three_abstains():
    ep = _open_episode()
    sampler = FakeSampler({"prompt 0": [verdict(1)] * 4 + [verdict(0)],  # 4/5 good -> GOOD
                           "prompt 1": [verdict(0)] * 3 + [verdict(1)] * 2,  # 3/5 -> abstain
                           "prompt 2": [verdict(0)] * 4 + ["no verdict at all"]})  # 4/5 bad -> BAD
    labeler = VotingCriticLabeler(sampler, n=5, min_agree=4, max_new_tokens=7)
    steps, stats = apply_labels([ep], labeler)
    assert [(s.step, s.label, s.source) for s in steps] == [(0, GOOD, "external"), (2, BAD, "external"),
                                                           (3, BAD, "repeat")]
    assert stats == {"candidates": 3, "sent": 3, "labeled": 2, "good": 1, "abstained": 1, "skipped_cap": 0}
    (prompts, kwargs), = sampler.calls  # one batched call: 5 samples of each open step
    assert prompts == [critic_prompt("alfworld", f"prompt {k}", say(f"act {k}")) for k in range(3) for _ in range(5)]
    assert kwargs == {"max_new_tokens": 7, "greedy": False, "with_logprobs": False}
    three_of_three = FakeSampler({"prompt 0": [verdict(1)] * 3})
    assert VotingCriticLabeler(three_of_three, n=3, min_agree=3)(ep, 0) == GOOD
    with pytest.raises(ValueError, match="strict majority"):
        VotingCriticLabeler(sampler, n=4, min_agree=2)


def test_cap_sends_a_seeded_sample_and_counts_the_rest():
    eps = [_open_episode() for _ in range(3)]  # 9 open steps
    seen = []

    def labeler(ep, i):
        seen.append((next(k for k, e in enumerate(eps) if e is ep), i))  # the episodes are equal, not identical
        return GOOD if i == 0 else None

    steps, stats = apply_labels(eps, labeler, max_external=4, rng=random.Random(0))
    assert len(seen) == 4 and len(set(seen)) == 4 and seen == sorted(seen)
    assert all(i in (0, 1, 2) for _, i in seen)  # only open steps
    assert stats["candidates"] == 9 and stats["sent"] == 4 and stats["skipped_cap"] == 5
    assert stats["labeled"] + stats["abstained"] == 4 == len(seen)
    assert stats["labeled"] == sum(i == 0 for _, i in seen) == sum(s.source == "external" for s in steps)
    assert sum(s.source == "repeat" for s in steps) == 3  # rule labels are never capped
    _, first = apply_labels(eps, labeler, max_external=2)  # no rng: the first open steps
    assert seen[-2:] == [(0, 0), (0, 1)] and first["skipped_cap"] == 7
    _, none = apply_labels(eps, None, max_external=2)
    assert none == {"candidates": 9, "sent": 0, "labeled": 0, "good": 0, "abstained": 0, "skipped_cap": 0}
    with pytest.raises(ValueError, match="answered 1 of 2"):
        apply_labels(eps, type("Short", (), {"label_many": lambda self, pairs: [GOOD]})(), max_external=2)


# ------------------------------------------------------------------------------------------ built from the config

def _tiny_labeler(**kw) -> VotingCriticLabeler:
    cfg = GCDConfig(labeler="tiny", labeler_samples=3, labeler_min_agree=2, labeler_max_new_tokens=4, **kw)
    return build_labeler(cfg)


def test_tiny_labeler_is_frozen_and_called_on_exactly_the_open_steps_up_to_the_cap():
    labeler = _tiny_labeler()
    model = labeler.policy.model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert (labeler.n, labeler.min_agree, labeler.max_new_tokens, labeler.greedy) == (3, 2, 4, False)
    sent_prompts = []
    real = labeler.policy.generate

    def spy(prompts, **kwargs):
        sent_prompts.extend(prompts)
        return real(prompts, **kwargs)

    labeler.policy.generate = spy
    won = make_episode([make_turn(0, "s", "go on", "a"), make_turn(1, "a", "go on", "b"),
                        make_turn(2, "b", None, "fb", "no_action_tag", None), make_turn(3, "b", "finish", "c")],
                       won=True)
    eps = [_open_episode(), won]
    open_steps = {(e, i) for e, ep in enumerate(eps) for i, (lab, _) in enumerate(rule_labels(ep))
                  if lab is None and ep.turns[i].action is not None}
    assert open_steps == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)}  # no format-error turn, no rule-labeled turn
    torch.manual_seed(0)
    steps, stats = apply_labels(eps, labeler, max_external=3, rng=random.Random(1))
    asked = [sent_prompts[k] for k in range(0, len(sent_prompts), 3)]
    assert len(sent_prompts) == 9 and all(sent_prompts[k] == sent_prompts[k - k % 3] for k in range(9))
    critic = {critic_prompt("alfworld", eps[e].turns[i].prompt, eps[e].turns[i].response): (e, i)
              for e, i in open_steps}
    assert len({critic[p] for p in asked}) == 3  # three distinct open steps, nothing else
    assert stats["candidates"] == 5 and stats["sent"] == 3 and stats["skipped_cap"] == 2
    assert stats["labeled"] + stats["abstained"] == 3
    assert {(s.step, s.source) for s in steps} >= {(3, "repeat"), (3, "success")}  # rule labels kept
    sent_prompts.clear()
    _, all_stats = apply_labels(eps, labeler)
    assert len(sent_prompts) == 15 and all_stats["sent"] == 5 and all_stats["skipped_cap"] == 0


def test_policy_labeler_shares_the_policy_model():
    from fastrank.gcd.modeling import ModelSpec, load_model
    from fastrank.gcd.policy import Policy

    model, tok = load_model(ModelSpec(model="tiny", lora_r=4, lora_alpha=8))
    pol = Policy(model, tok, temperature=0.7)
    lab = build_labeler(GCDConfig(labeler="policy", labeler_temperature=0.0, labeler_samples=1,
                                  labeler_min_agree=1), pol)
    assert lab.policy.model is model and lab.greedy and lab.name == "policy"
    assert any(p.requires_grad for p in model.parameters())  # the policy is not frozen by it
    assert lab(_open_episode(), 0) in (GOOD, BAD, None)


def test_8bit_labeler_without_lora(tmp_path):
    pytest.importorskip("bitsandbytes")
    from fastrank.gcd.tiny import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_causal_lm(tok, hidden=64).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    lab = build_labeler(GCDConfig(labeler=str(tmp_path / "m"), labeler_load_in_8bit=True, labeler_samples=1,
                                  labeler_min_agree=1, labeler_max_new_tokens=3))
    q = lab.policy.model.model.layers[0].self_attn.q_proj
    assert "Linear8bitLt" in type(q).__name__
    ep = _open_episode()
    labels = lab.label_many([(ep, 0), (ep, 1)])
    assert len(labels) == 2 and set(labels) <= {GOOD, BAD, None}


# ------------------------------------------------------------------------------------------ in the trainer

def _trainer(tmp_path, accelerator, **kw):
    from fastrank.gcd.trainer import GCDTrainer

    tasks = [Task(f"corridor/{k}", None, "L0", "corridor") for k in range(2)]

    def agent(prompt, i):
        if "**Role:** You are an expert evaluator" in prompt:
            return verdict(i % 2)
        return say("go forward") if i % 2 == 0 else say("look")

    cfg = GCDConfig(**{**dict(method="gcd", model="tiny", lora_r=4, lora_alpha=8, updates=1, tasks_per_update=1,
                              group_size=2, num_envs=2, max_steps=4, max_new_tokens=8, judge_samples=4,
                              judge_group=2, lr=1e-2, eval_before=False, eval_judge_samples=2,
                              output_dir=str(tmp_path / "run"), seed=0, labeler="tiny", labeler_samples=3,
                              labeler_min_agree=2, labeler_max_new_tokens=4, labeler_max_per_update=2), **kw})
    return GCDTrainer(cfg, splits={"train": tasks, "L0": tasks[:1]}, accelerator=accelerator,
                      policy_wrapper=lambda p: ScriptedPolicy(p, agent), env_factory_fn=lambda: CorridorEnv(6))


def test_trainer_step_and_run_with_tiny_labeler(tmp_path, capsys):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    tr = _trainer(tmp_path, acc)
    assert isinstance(tr.labeler, VotingCriticLabeler) and tr.labeler.policy.model is not tr.policy.model
    rec = tr.step()
    # sample 0 walks forward through 4 new rooms (open steps), sample 1 looks (repeats): 4 open, cap 2
    assert rec["labeler/candidates"] == 4 and rec["labeler/sent"] == 2 and rec["labeler/skipped_cap"] == 2
    assert rec["labeler/labeled"] + rec["labeler/abstained"] == 2
    assert "labeler " in tr._line(rec) and "2 over cap" in tr._line(rec)
    res = _trainer(tmp_path, acc, output_dir=str(tmp_path / "run2")).train()
    assert res["labeler"] == "tiny (2 of 3 votes, at most 2 steps per update)"
    assert res["evals"][-1]["labeler"]["sent"] <= 2
    report = (tmp_path / "run2" / "report.md").read_text()
    assert "External labeler: tiny (2 of 3 votes" in report and "left out by the per-update cap" in report
    assert "labeler tiny" in capsys.readouterr().out
    with pytest.raises(ValueError, match="give one of them"):
        from fastrank.gcd.trainer import GCDTrainer

        GCDTrainer(GCDConfig(labeler="tiny"), labeler=lambda ep, i: None, splits={"train": []}, accelerator=acc)
