"""fwd+bwd of the listwise (softmax CE) rank loss on packed batches of realistic candidate sets (2-20, mean ~9).

Run: `pytest bench/bench_listwise_rank_loss.py --benchmark-only` (the fastrank op runs the Triton kernel on CUDA,
the torch path on CPU). Compared: (a) the per-group Python loop (the reference), (b) padded vectorized PyTorch
(`log_softmax` over a (G, max size) tile with -inf padding: what one would write by hand), (c) fastrank's
`listwise_rank_loss` (validate=False, as in the training loop), (d) the same mixed with the paper's pair + BCE terms
(list 1, pair 0.5, point 0.25), (e) `pairwise_rank_loss` for scale: the objective it would replace.
"""
import os

import pytest
import torch

from bench.bench_pairwise_rank_loss import DEVICE, _sync, make_batch
from fastrank.ops import listwise_rank_loss, listwise_rank_loss_reference, pairwise_rank_loss

GROUPS = [64, 4096, 65536]
IMPLS = ["loop_reference", "padded_torch", "fastrank", "fastrank_mixed", "pairwise_op"]
MIXED = dict(pair_weight=0.5, point_weight=0.25)


def padded_listwise(scores, labels, offsets, temperature=1.0):
    sizes = offsets[1:] - offsets[:-1]
    g, n = sizes.numel(), scores.numel()
    width = int(sizes.max())  # the padded layout needs the longest group on the host: a sync
    gid = torch.repeat_interleave(torch.arange(g, device=scores.device), sizes, output_size=n)
    col = torch.arange(n, device=scores.device) - offsets[:-1][gid]
    s_pad = torch.full((g, width), float("-inf"), device=scores.device).index_put((gid, col), scores.float())
    logp = torch.log_softmax(s_pad / temperature, dim=1)[gid, col]
    pos = labels != 0
    has_neg = sizes > 1
    ce = torch.zeros(g, device=scores.device).index_put((gid[pos],), -logp[pos])
    loss = (ce * has_neg).sum() / has_neg.sum().clamp_min(1)
    return loss, None


def make_step(impl):
    backend = "triton" if DEVICE.type == "cuda" else "torch"
    fns = {
        "loop_reference": listwise_rank_loss_reference,
        "padded_torch": padded_listwise,
        "fastrank": lambda s, y, o: listwise_rank_loss(s, y, o, backend=backend, validate=False),
        "fastrank_mixed": lambda s, y, o: listwise_rank_loss(s, y, o, backend=backend, validate=False, **MIXED),
        "pairwise_op": lambda s, y, o: pairwise_rank_loss(s, y, o, backend=backend, validate=False),
    }
    fn = fns[impl]

    def step(scores, labels, offsets):
        scores.grad = None
        loss, _hits = fn(scores, labels, offsets)
        loss.backward()
        _sync()
        return loss.detach()

    return step


@pytest.mark.parametrize("num_groups", GROUPS, ids=lambda g: f"G{g}")
@pytest.mark.parametrize("impl", IMPLS)
def test_fwd_bwd(benchmark, impl, num_groups):
    if DEVICE.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1" and impl.startswith("fastrank"):
        pytest.skip("TRITON_INTERPRET=1 is set: the kernel would run in the interpreter, not on the GPU")
    if impl == "loop_reference" and DEVICE.type == "cpu" and num_groups > 4096:
        pytest.skip("per-group Python loop at G=65536 takes seconds per step on CPU: linear in G")
    scores, labels, offsets = make_batch(num_groups)
    step = make_step(impl)
    got = step(scores, labels, offsets)  # warm-up outside the timing
    if num_groups <= 4096 and impl != "pairwise_op":  # a fast wrong answer is not a result
        kw = MIXED if impl == "fastrank_mixed" else {}
        expected = listwise_rank_loss_reference(scores.detach(), labels, offsets, **kw).loss
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    benchmark.group = f"G={num_groups} (N={scores.numel()}) listwise fwd+bwd on {DEVICE.type}"
    benchmark.extra_info.update(num_groups=num_groups, num_candidates=scores.numel(), device=str(DEVICE),
                                torch_threads=torch.get_num_threads())
    rounds = {64: 20, 4096: 10, 65536: 5}[num_groups] if impl != "loop_reference" else {64: 5, 4096: 2}[num_groups]
    benchmark.pedantic(step, args=(scores, labels, offsets), rounds=rounds, iterations=1, warmup_rounds=1)
