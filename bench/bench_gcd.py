"""GCD throughput with the tiny random LM (Qwen2 layout, hidden 32, 2 layers, LoRA r 8) on CPU: rollout turns/s
on a real ALFWorld game, and the time of one GRPO + GCD update.

Run: `pytest bench/bench_gcd.py --benchmark-only` (collected by `pytest bench/` through bench/conftest.py).

rollout  4 episodes of the short train game (the expert wins it in 4 steps), max 4 turns each, 2 env slots:
         `sampled`: the LM samples up to 32 tokens per turn (a random model writes no action: the env is never
         stepped, so this is generation + log-prob cost); `scripted`: expert / looping responses scored by the LM
         and stepped in the env (env cost included). Pools: `local` (in-process) or `process` (2 worker processes,
         started outside the timing). Resets (~1 s per ALFWorld game) are part of the timing; extra_info has
         turns/s and env resets.
update   one optimizer step of L_GRPO + L_GCD on 16 agent turns (real ALFWorld prompts, ~300-400 tokens) and
         16 judgments (critic prompts), micro-batches of 4: extra_info has response tokens per update.
packing  the same update (1 thread, fp32) with `update_packing` packed vs padded, micro-batches of 4 and 8 (the
         recipes' size), on a realistic length spread:
         agent turns at steps 0-15 of an episode (the history grows the prompt) with think texts of 3-150
         words, and judgments of 5-200 words; extra_info has the padding share of the padded layout and the
         LM-head positions of each layout. Both layouts run on the same samples in the same process.

Needs the shared ALFWorld games and alfworld==0.3.5 for the rollout benchmarks (skipped otherwise).
"""
from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import pytest
import torch

from fastrank.gcd.config import GCDConfig
from fastrank.gcd.envpool import EnvFactory, LocalEnvPool, ProcessEnvPool
from fastrank.gcd.grpo import PolicySample
from fastrank.gcd.modeling import ModelSpec, load_model
from fastrank.gcd.policy import Policy, ScriptedPolicy
from fastrank.gcd.prompts import critic_prompt
from fastrank.gcd.rollout import RolloutConfig, run_episodes
from fastrank.gcd.tasks import Task
from fastrank.gcd.trainer import policy_update

SHARED = Path(os.environ.get("FASTRANK_SHARED_DATA", "/work/shared/data"))
TARBALL = SHARED / "alfworld" / "json_2.1.1_games.tar.xz"
GAME = "train/pick_and_place_simple-KeyChain-None-SideTable-322/trial_T20190909_091659_910683"
PLAN = ["go to dresser 1", "take keychain 1 from dresser 1", "go to sidetable 1", "put keychain 1 in/on sidetable 1"]


def _say(action: str) -> str:
    return f"<think>I will {action} now.</think><action>{action}</action>"


def script(prompt: str, i: int) -> str:
    if "**Role:** You are an expert evaluator" in prompt:
        return f"<think>ok</think><answer>\\boxed{{{i % 2}}}</answer><advise>Avoid loops.</advise>"
    if i % 2:
        return _say("look")
    step = int(re.search(r"You are now at step (\d+)", prompt).group(1)) - 1
    return _say(PLAN[min(step, 3)])


@pytest.fixture(scope="module")
def policy() -> Policy:
    torch.manual_seed(0)
    model, tok = load_model(ModelSpec(model="tiny", lora_r=8, lora_alpha=16))
    return Policy(model, tok, gen_batch_size=8, score_batch_size=8)


@pytest.fixture(scope="module")
def game() -> Task:
    if not TARBALL.exists():
        pytest.skip(f"shared data not here: {TARBALL}")
    pytest.importorskip("alfworld")
    from fastrank.envs.alfworld import ensure_games

    root = ensure_games(TARBALL)
    return Task("alfworld/" + GAME, str(root / GAME / "game.tw-pddl"), "L0", "pick_and_place_simple")


@pytest.mark.parametrize("pool_kind", ["local", "process"])
@pytest.mark.parametrize("mode", ["sampled", "scripted"])
def test_rollout_turns_per_second(benchmark, policy, game, mode, pool_kind):
    pool = (LocalEnvPool if pool_kind == "local" else ProcessEnvPool)(EnvFactory("alfworld"), 2)
    actor = policy if mode == "sampled" else ScriptedPolicy(policy, script)
    cfg = RolloutConfig(max_steps=4, max_new_tokens=32)
    try:
        t0 = time.perf_counter()
        eps = benchmark.pedantic(lambda: run_episodes(actor, pool, [game], cfg, group_size=4), rounds=1,
                                 iterations=1)
        secs = time.perf_counter() - t0
    finally:
        pool.close()
    turns = sum(e.steps for e in eps)
    benchmark.extra_info.update({"turns": turns, "episodes": len(eps), "env_resets": len(eps),
                                 "env_steps": sum(t.env_action is not None for e in eps for t in e.turns),
                                 "turns_per_s": round(turns / secs, 2),
                                 "response_tokens": sum(len(t.response_ids) for e in eps for t in e.turns)})


def _words(rng: random.Random, spread: tuple[int, int] | None, default: str) -> str:
    if spread is None:
        return default
    return " ".join(rng.choice(("the", "keychain", "is", "on", "dresser", "1", "so", "I", "go", "there", "first"))
                    for _ in range(rng.randint(*spread)))


def _batch(policy: Policy, game_prompts: list[str], think: tuple[int, int] | None = None,
           judge_think: tuple[int, int] | None = None) -> list[PolicySample]:
    """16 agent turns and 16 judgments; think: (min, max) words of the agent's / judge's reasoning (None: fixed)."""
    rng = random.Random(0)
    texts = [_say(rng.choice(PLAN + ["look"])) for _ in game_prompts]
    if think is not None:
        texts = [t.replace("<think>", f"<think>{_words(rng, think, '')} ", 1) for t in texts]
    agent = policy.score(game_prompts, texts)
    judges = policy.score([critic_prompt("alfworld", p, _say("look")) for p in game_prompts],
                          [f"<think>{_words(rng, judge_think, 'The agent looks again.')}</think><answer>"
                           f"\\boxed{{{k % 2}}}</answer><advise>Avoid loops.</advise>"
                           for k in range(len(game_prompts))])
    out = [PolicySample(g.prompt_ids, g.response_ids, g.logprobs, (-1.0) ** k, "agent") for k, g in enumerate(agent)]
    out += [PolicySample(g.prompt_ids, g.response_ids, g.logprobs, (-1.0) ** k, "judge") for k, g in enumerate(judges)]
    return out


def _episode_prompts() -> list[str]:
    """The agent prompts of steps 0-15 of one episode (history_length 2 caps the history shown)."""
    from fastrank.gcd.prompts import agent_prompt

    obs = ("You are in the middle of a room. Looking quickly around you, you see a armchair 1, a bed 1, a cabinet 4, "
           "a cabinet 3, a cabinet 2, a cabinet 1, a drawer 6, a drawer 5, a drawer 4, a drawer 3, a drawer 2, "
           "a drawer 1, a dresser 1, a garbagecan 1, a sidetable 2, and a sidetable 1.")
    adm = [f"go to {x}" for x in ("armchair 1", "bed 1", "cabinet 1", "cabinet 2", "dresser 1", "sidetable 1")]
    return [agent_prompt("alfworld", goal="put a keychain in sidetable.", observation=obs, admissible=adm,
                         history=[(obs, "go to bed 1")] * k, step_count=k) for k in range(16)]


def test_update_time_per_batch(benchmark, policy):
    from accelerate import Accelerator

    samples = _batch(policy, _episode_prompts())
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    acc = Accelerator(cpu=True)
    cfg = GCDConfig(micro_batch_size=4)
    stats = benchmark.pedantic(lambda: policy_update(policy, opt, acc, params, samples, cfg, random.Random(0)),
                               rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({
        "agent_samples": 16, "judge_samples": 16, "response_tokens": int(stats["tokens"]),
        "prompt_tokens_mean": round(sum(len(s.prompt_ids) for s in samples) / len(samples), 1),
        "trainable_params": sum(p.numel() for p in params)})


@pytest.fixture(scope="module")
def spread_samples(policy) -> list[PolicySample]:
    return _batch(policy, _episode_prompts(), think=(3, 150), judge_think=(5, 200))


@pytest.mark.parametrize("micro_batch", [4, 8])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_update_time_packed_vs_padded(benchmark, policy, spread_samples, layout, micro_batch):
    from accelerate import Accelerator

    samples = spread_samples
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    cfg = GCDConfig(micro_batch_size=micro_batch, update_packing=layout)
    acc = Accelerator(cpu=True)
    benchmark.pedantic(lambda: policy_update(policy, opt, acc, params, samples, cfg, random.Random(0)),
                       rounds=5, iterations=1, warmup_rounds=1)
    from fastrank.gcd.update import _micro_batches
    from fastrank.packing import pack_rows

    tokens = head = 0  # tokens in the forward's tensors (padding included) and LM-head positions, this layout
    for kind in ("agent", "judge"):
        for mb in _micro_batches([s for s in samples if s.kind == kind], cfg.micro_batch_size):
            lens = [len(s.prompt_ids) + len(s.response_ids) for s in mb]
            if layout == "packed":
                rows = pack_rows(lens, max(lens))
                tokens += len(rows) * max(sum(lens[i] for i in r) for r in rows)
                head += sum(len(s.response_ids) for s in mb)
            else:
                tokens += len(mb) * max(lens)
                head += len(mb) * (max(len(s.response_ids) for s in mb) + 1)
    real = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    benchmark.extra_info.update({
        "layout": layout, "micro_batch": micro_batch, "samples": len(samples), "real_tokens": real,
        "layout_tokens": tokens, "padding_share": round(1 - real / tokens, 3), "lm_head_positions": head,
        "prompt_tokens_min_max": [min(len(s.prompt_ids) for s in samples), max(len(s.prompt_ids) for s in samples)],
        "response_tokens_min_max": [min(len(s.response_ids) for s in samples),
                                    max(len(s.response_ids) for s in samples)]})
