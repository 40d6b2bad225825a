"""One training step (forward + backward) with and without attention dropout, MiniLM on CPU.

Run: `OMP_NUM_THREADS=1 pytest bench/bench_train_step.py --benchmark-only` (FASTRANK_BENCH_SETS: sets per
step, default 20).

Training in PyTorch's CPU SDPA with dropout on the attention probabilities takes the math path and draws a
Bernoulli mask over every (query, key) score; with p = 0 it keeps the fused kernel. `attention_dropout=0`
(TrainConfig / AgentConfig, `Reranker.set_attention_dropout`) is that switch; MiniLM ships with 0.1. Same
real ALFWorld decision states as bench/bench_decision.py (expert episodes of valid_seen, each with its
history), 11 candidates a set (the expert's action + 10 admissible ones, as the agent recipe trains), in:
  pairs          the paper's layout: one (goal + observation, action) sequence per candidate, 128 tokens
  shared_prefix  the agent recipes' layout: goal + observation + history (192 tokens) once per set
and in fp32 or under bf16 autocast (`--mixed_precision bf16`: on a CPU with AVX512-BF16 the matmuls run in bf16;
on an AVX2-only CPU bf16 is far slower, STACK_NOTES).
extra_info: seconds per step (median of the rounds), candidates per second, tokens per step.
"""
import os
import time

import pytest
import torch

from bench_decision import _states
from fastrank.data.features import Featurizer
from fastrank.data.record import CandidateSet
from fastrank.model import Reranker
from fastrank.train import cpu_has_bf16

N_SETS = int(os.environ.get("FASTRANK_BENCH_SETS", "20"))
LAYOUTS = {"pairs": ("state_action_overlap", 128), "shared_prefix": ("history", 192)}


@pytest.fixture(scope="module")
def sets():
    states = [s for s in _states() if len(s[2]) >= 11][:N_SETS]
    return [CandidateSet(env="alfworld", episode_id=str(i), step=0, task_type="t", goal=g, observation=o,
                         candidates=c[:11], expert_index=0, sources=["expert"] * 11, history=h)
            for i, (g, o, c, h) in enumerate(states)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.1, 0.0])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_train_step(benchmark, layout, dropout, precision, sets):
    if precision == "bf16" and not cpu_has_bf16():
        pytest.skip("no hardware bf16 on this CPU: emulated bf16 is ~50x slower than fp32 (STACK_NOTES)")
    mode, max_length = LAYOUTS[layout]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
    model = Reranker.from_encoder("minilm", featurizer=Featurizer(mode), max_length=max_length, layout=layout)
    model.set_attention_dropout(dropout)
    model.train()
    batch = model.collator()(model.encode_sets(sets))
    times: list[float] = []

    def step():
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(batch).sum()  # the scores come out in fp32 either way (`Reranker.forward`)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)

    step()  # warm-up
    times.clear()
    benchmark.pedantic(step, rounds=3, iterations=1)
    med = sorted(times)[len(times) // 2]
    benchmark.extra_info.update(seconds_per_step=round(med, 3), candidates_per_s=round(batch.n_candidates / med, 1),
                                tokens_per_step=int(batch.n_tokens), sets=len(sets))
    assert med > 0
