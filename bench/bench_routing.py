"""Step time of routed + PCGrad training vs plain joint training, on the same packed batch (MiniLM, CPU).

Run: `pytest bench/bench_routing.py --benchmark-only` (FASTRANK_BENCH_ROUTING_TOKENS: batch token budget,
default 4096; FASTRANK_BENCH_ROUNDS: timed rounds per variant, default 3).

One optimizer step = forward + backward + clip + AdamW, through the trainer's own code paths and one
`Accelerator` (1 process): `plain` is `fastrank.train.plain_step`, the loop body of `train` (fused
pairwise_rank_loss, one backward); the other variants run `fastrank.routing.RoutedTrainStep`:
  plain          Reranker, fused loss                                     (joint3 baseline)
  plain_pcgrad   Reranker, per-env losses, 3 backwards, PCGrad            (cost of the projection alone)
  routed_fused   RoutedReranker (4 LoRA groups + router), fused loss     (cost of routing alone)
  routed_pcgrad  RoutedReranker, per-env losses, 3 backwards, PCGrad      (the paper's §5.6 method)
  routed_cagrad  RoutedReranker, per-env losses, 3 backwards, CAGrad 0.5
  routed_pcgrad_split  routed_pcgrad with per_env_forward: one forward+backward per env sub-batch (same per-env
                 gradients, since candidates never interact; ~1 forward + 1 backward of the batch in total)
The batch: bundled training sets of all three environments (seeded sample) packed to <= TOKENS tokens.
extra_info: seconds per step (min over rounds, wall and process CPU), slowdown vs `plain`, and for the projected
variants the split of one step into forward / per-env backwards / projection (all-reduce + Gram + weights +
combine + .grad views) / optimizer, measured in a separate instrumented step.
"""
import os
import random
import time

import pytest
import torch

from fastrank.config import TrainConfig
from fastrank.data.bundle import BUNDLED_DIR
from fastrank.data.record import read_records
from fastrank.model import Reranker
from fastrank.packing import encode_sets
from fastrank.routing import RoutedReranker, RoutedTrainStep, RoutingConfig, env_task_losses
from fastrank.train import build_optimizer, linear_warmup, plain_step

TOKENS = int(os.environ.get("FASTRANK_BENCH_ROUTING_TOKENS", "4096"))
ROUNDS = int(os.environ.get("FASTRANK_BENCH_ROUNDS", "3"))
VARIANTS = {  # routing, grad_projection, per_env_forward
    "plain": (False, "none", False), "plain_pcgrad": (False, "pcgrad", False), "routed_fused": (True, "none", False),
    "routed_pcgrad": (True, "pcgrad", False), "routed_cagrad": (True, "cagrad", False),
    "routed_pcgrad_split": (True, "pcgrad", True),
}
_results: dict = {}


@pytest.fixture(scope="module")
def setup():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, mixed_precision="no")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base = Reranker.from_encoder("minilm", max_length=256)
    rng = random.Random(0)
    sets = []
    for env in ("alfworld", "scienceworld", "webshop"):
        pool = read_records(BUNDLED_DIR / f"{env}.train.sampled.jsonl.gz")
        sets += rng.sample(pool, 40)
    rng.shuffle(sets)
    enc = encode_sets(sets, base.tokenizer, base.featurizer, max_length=256)
    chosen, n_tok = [], 0
    for e in enc:
        if n_tok + e.n_tokens > TOKENS:
            continue
        chosen.append(e)
        n_tok += e.n_tokens
    batch = base.collator()(chosen)
    assert set(batch.env_ids.tolist()) == {0, 1, 2}
    state = {k: v.clone() for k, v in base.state_dict().items()}
    info = dict(model="minilm", sets=batch.n_sets, candidates=batch.n_candidates, tokens=batch.n_tokens,
                envs={e: int((batch.env_ids == i).sum()) for i, e in enumerate(("alfworld", "scienceworld",
                                                                                  "webshop"))},
                torch_threads=torch.get_num_threads())
    return acc, state, batch, info


def _make(acc, state, routing: bool, projection: str, per_env_forward: bool):
    torch.manual_seed(0)
    model = Reranker.from_encoder("minilm", max_length=256)
    model.load_state_dict(state)
    if routing:
        model = RoutedReranker.from_reranker(model, RoutingConfig())
    model.train()
    cfg = TrainConfig(routing=routing, grad_projection=projection, router_warmup_steps=0, lr=1e-5,
                      per_env_forward=per_env_forward)
    opt = build_optimizer(cfg, model)
    sched = linear_warmup(opt, 0, 10_000)
    pmodel, opt, sched = acc.prepare(model, opt, sched)
    step = RoutedTrainStep(cfg, acc, pmodel, model, opt, sched) if (routing or projection != "none") else None
    return cfg, pmodel, opt, sched, step


def _split(acc, cfg, step, batch) -> dict:
    """One instrumented projected step: forward / per-env backwards / projection / optimizer (seconds)."""
    t = [time.perf_counter()]
    if step.per_env_forward:  # forwards and backwards interleave: one "forward+backward" figure, under "backward"
        step._per_env_forward_backward(batch)
        t.append(t[0])
    else:
        with acc.no_sync(step.model), acc.autocast():
            scores = step.model(batch)
            losses, fused, _ = env_task_losses(scores, batch, step.task_envs)
        t.append(time.perf_counter())
        step.projector.backward([fused] if step.fused_only else losses)
    t.append(time.perf_counter())
    step.projector.combine(0)
    acc.clip_grad_norm_(step.model.parameters(), cfg.grad_clip)
    t.append(time.perf_counter())
    step.optimizer.step()
    step.optimizer.zero_grad(set_to_none=True)
    step.projector.zero_()
    t.append(time.perf_counter())
    return {k: round(t[i + 1] - t[i], 4) for i, k in enumerate(("forward", "backward", "projection", "optimizer"))}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_step_time(benchmark, setup, variant):
    acc, state, batch, info = setup
    routing, projection, per_env_forward = VARIANTS[variant]
    cfg, model, opt, sched, step = _make(acc, state, routing, projection, per_env_forward)
    n = [0]

    def one():
        if step is None:
            return plain_step(acc, cfg, model, opt, sched, batch)[0]
        n[0] += 1
        with acc.accumulate(model):
            return step(batch, n[0])[0]

    assert torch.isfinite(one())  # warm-up step (allocator, first-call paths)
    rounds = []

    def timed():
        w, c = time.perf_counter(), time.process_time()
        one()
        rounds.append((time.perf_counter() - w, time.process_time() - c))

    benchmark.group = f"one optimizer step, MiniLM, {info['tokens']} tokens / {info['candidates']} candidates, CPU"
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1)
    wall, cpu = min(r[0] for r in rounds), min(r[1] for r in rounds)
    _results[variant] = (wall, cpu)
    extra = dict(info, variant=variant, step_s=wall, cpu_step_s=cpu, round_wall_cpu_s=rounds,
                 params=sum(p.numel() for p in model.parameters()))
    if step is not None and routing:
        extra["lora_params"] = sum(p.numel() for p in step.raw.lora_parameters())
        extra["router_params"] = sum(p.numel() for p in step.raw.router.parameters())
    if step is not None and not step.fused_only:
        extra["split_s"] = _split(acc, cfg, step, batch)
    if "plain" in _results:
        extra["slowdown_vs_plain"] = wall / _results["plain"][0]
        extra["cpu_slowdown_vs_plain"] = cpu / _results["plain"][1]
    benchmark.extra_info.update(extra)
