"""Latency of one ALFWorld decision: the paper's cross-encoder vs the shared-prefix history policy (MiniLM, CPU).

Run: `OMP_NUM_THREADS=2 pytest bench/bench_decision.py --benchmark-only` (FASTRANK_BENCH_DECISIONS: how
many real decision states, default 24; 2 torch threads as in the agent's setting).

The states are real: the handcoded expert's valid_seen episodes with their full admissible lists
(`expert_admissible_valid_seen.jsonl.gz`, 9-71 actions, those with >= 20 kept), each with the episode so far
as history. Variants, same states, same weights (speed does not depend on training):
  pairs_goal_obs       the default joint3 model: one (goal + observation, action + features) pair per
                       admissible action, 128 tokens (what `fastrank agent-eval` ran before this layout)
  prefix_history       the agent recipe's model: goal + observation + history (192 tokens) encoded once,
                       every admissible action attending to it (fastrank/prefix.py)
  prefix_history_x8    the same, 8 games' states scored together (lockstep agent-eval's `score_many`: on a CPU
                       one forward per set, since padded rows cost more than they save): per decision
  prefix_history_x8_padded  the 8 states as one padded batch (one forward; the path `score_many` takes on a GPU)
  prefix_history_bf16  prefix_history under CPU bf16 autocast (`agent-eval --bf16`: matmuls in bf16 on CPUs with
                       AVX512-BF16 / AMX, layer norms and softmax in fp32); extra_info gives its argmax agreement
                       with fp32 on the same states
FASTRANK_BENCH_CHECKPOINT: a trained history checkpoint for the prefix variants (the argmax agreement of a fresh
head says little). extra_info: p50 / p90 seconds per decision, decisions per second, mean tokens per decision.
"""
import gzip
import json
import os
import time
from pathlib import Path

import pytest
import torch

from fastrank.data.features import Featurizer
from fastrank.data.history import EpisodeMemory
from fastrank.envs.alfworld import split_intro
from fastrank.model import Reranker

N = int(os.environ.get("FASTRANK_BENCH_DECISIONS", "24"))
SHARED = Path(os.environ.get("FASTRANK_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
SRC = SHARED / "alfworld" / "expert_admissible_valid_seen.jsonl.gz"
VARIANTS = {"pairs_goal_obs": ("pairs", "state_action_overlap", 128, 1),
            "prefix_history": ("shared_prefix", "history", 192, 1),
            "prefix_history_x8": ("shared_prefix", "history", 192, 8),
            "prefix_history_x8_padded": ("shared_prefix", "history", 192, 8),
            "prefix_history_bf16": ("shared_prefix", "history", 192, 1)}


def _states() -> list[tuple]:
    if not SRC.exists():
        pytest.skip(f"shared data not here: {SRC}")
    out = []
    with gzip.open(SRC, "rt") as f:
        for line in f:
            ep = json.loads(line)
            obs0, goal = split_intro(ep["steps"][0]["obs"])
            mem = EpisodeMemory()
            for k, st in enumerate(ep["steps"]):
                obs = obs0 if k == 0 else st["obs"]
                if len(st["admissible"]) >= 20 and k >= 3:
                    out.append((goal, obs, list(st["admissible"]), list(mem.turns)))
                mem.add(st["expert"], ep["steps"][k + 1]["obs"] if k + 1 < len(ep["steps"]) else ep["final_obs"])
            if len(out) >= N:
                break
    return out[:N]


@pytest.fixture(scope="module")
def states():
    return _states()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decision_latency(benchmark, variant, states):
    layout, mode, max_length, batch = VARIANTS[variant]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.manual_seed(0)
    ckpt = os.environ.get("FASTRANK_BENCH_CHECKPOINT")
    if ckpt and layout == "shared_prefix":
        model = Reranker.from_pretrained(ckpt).eval()
    else:
        model = Reranker.from_encoder("minilm", featurizer=Featurizer(mode), max_length=max_length, layout=layout).eval()
    groups = [states[i:i + batch] for i in range(0, len(states), batch)]
    times: list[float] = []

    def padded(g):  # one forward over the padded rows of the group's sets
        with torch.no_grad():
            model(model.collator()([model._encode_one(*s) for s in g]))

    score = padded if variant.endswith("_padded") else model.score_many
    if variant.endswith("_bf16"):
        with torch.no_grad():
            ref = [model.rank(*s[:3], history=s[3]).best for s in states]

        def score(g):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model.score_many(g)

    def run():
        for g in groups:
            t = time.perf_counter()
            score(g)
            times.append((time.perf_counter() - t) / len(g))

    run()  # warm-up (first calls allocate)
    times.clear()
    benchmark.pedantic(run, rounds=1, iterations=1)
    times.sort()
    p50, p90 = times[len(times) // 2], times[int(len(times) * 0.9)]
    enc = [model._encode_one(*s) for s in states]
    tokens = sum(e.n_tokens if hasattr(e, "state_ids") else sum(map(len, e.input_ids)) for e in enc) / len(enc)
    if variant.endswith("_bf16"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = [model.rank(*s[:3], history=s[3]).best for s in states]
        benchmark.extra_info["argmax_agreement_with_fp32"] = sum(a == b for a, b in zip(ref, got)) / len(states)
    benchmark.extra_info.update(p50_s=round(p50, 4), p90_s=round(p90, 4), decisions_per_s=round(1 / p50, 2),
                                mean_tokens=round(tokens, 1),
                                mean_candidates=round(sum(len(s[2]) for s in states) / len(states), 1))
    assert p50 > 0
