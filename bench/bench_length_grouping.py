"""One epoch of shared-prefix training: token-budget batches as drawn vs grouped by length (MiniLM, CPU, fp32).

Run: `OMP_NUM_THREADS=1 pytest bench/bench_length_grouping.py --benchmark-only` (FASTRANK_BENCH_GROUP_SETS: sets,
default 160; the budget is 3,072 tokens a batch so that the epoch has ~18 steps).

The shared-prefix layout puts one candidate set in a row and pads the rows to the batch's longest; random batches
of real ALFWorld DAgger-like sets (the expert's valid_seen states with their history, the expert's action + 10
admissible ones, as the agent recipe trains) pad ~19 % of their tokens. `group_by_length` (AgentConfig, the
ALFWorld YAML) sorts windows of sets by length before the fill. Same sets, same model init, same step count
(give or take one batch); extra_info: padded and real tokens, steps, seconds per epoch.
"""
import os

import pytest
import torch

from bench_decision import _states
from fastrank.data.features import Featurizer
from fastrank.data.record import CandidateSet
from fastrank.model import Reranker
from fastrank.packing import TokenBudgetBatchSampler

N_SETS = int(os.environ.get("FASTRANK_BENCH_GROUP_SETS", "160"))
BUDGET = 3072


@pytest.fixture(scope="module")
def sets():
    states = _states(N_SETS, min_step=0, min_admissible=11)  # every step: short and long histories
    return [CandidateSet(env="alfworld", episode_id=str(i), step=0, task_type="t", goal=g, observation=o,
                         candidates=c[:11], expert_index=0, sources=["expert"] * 11, history=h)
            for i, (g, o, c, h) in enumerate(states)]


@pytest.mark.parametrize("group_by_length", [0, 512])
def test_prefix_epoch(benchmark, group_by_length, sets):
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
    model = Reranker.from_encoder("minilm", featurizer=Featurizer("history"), max_length=192,
                                  layout="shared_prefix", max_action_tokens=40)
    model.set_attention_dropout(0.0)
    model.train()
    encoded = model.encode_sets(sets)
    lengths = [e.n_tokens for e in encoded]
    batches = TokenBudgetBatchSampler(lengths, BUDGET, seed=0, group_by_length=group_by_length).global_batches()
    collate = model.collator()

    def epoch():
        for b in batches:
            model(collate([encoded[i] for i in b])).sum().backward()
            model.zero_grad(set_to_none=True)

    benchmark.pedantic(epoch, rounds=2, iterations=1, warmup_rounds=0)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    benchmark.extra_info.update(steps=len(batches), real_tokens=sum(lengths), padded_tokens=padded,
                                padding=round(1 - sum(lengths) / padded, 3), sets=len(sets))
    assert sorted(i for b in batches for i in b) == list(range(len(sets)))
