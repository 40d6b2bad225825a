"""fwd+bwd of the pairwise rank loss on packed batches of realistic candidate sets (2-20 per group, mean ~9).

Run: `pytest bench/ --benchmark-only` (the fastrank op runs the Triton kernel on CUDA, the torch path on CPU).
Compared: (a) per-group Python loop (the reference), (b) padded vectorized PyTorch, (c) torch.compile of (b)'s
loss on the padded tile, (d) fastrank's `pairwise_rank_loss` (validate=False, as in a hot training loop, and
validate=True, the default), (e) `fastrank_cuda`: the same op with backend="cuda", the native kernel of the optional
extension (validate=False; skipped unless on CUDA with `fastrank._cuda` built: FASTRANK_BUILD_CUDA=1, see setup.py).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from fastrank.ops import pairwise_rank_loss, pairwise_rank_loss_reference
from fastrank.ops._backend import cuda_ext_available

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GROUPS = [64, 4096, 65536]
IMPLS = ["loop_reference", "padded_torch", "padded_compiled", "fastrank", "fastrank_validate", "fastrank_cuda"]


def make_batch(num_groups, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # 2 + Poisson(7), capped at 20: mean ~9, range 2-20, like the paper's candidate sets (avg 8.83)
    sizes = (2 + torch.poisson(torch.full((num_groups,), 7.0), generator=gen)).clamp(max=20).long()
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    n = int(offsets[-1])
    labels = torch.zeros(n)
    labels[offsets[:-1] + (torch.rand(num_groups, generator=gen) * sizes).long()] = 1
    scores = torch.randn(n, generator=gen)
    return scores.to(DEVICE).requires_grad_(), labels.to(DEVICE), offsets.to(DEVICE)


def _padded_core(s_pad, y_pad, mask, margin: float, point_weight: float):
    s, y = s_pad.float(), y_pad.float()
    s_pos = (s * y).sum(1, keepdim=True)
    neg = mask & ~y_pad
    n_neg = neg.sum(1)
    pair = F.softplus(margin - s_pos + s).masked_fill(~neg, 0.0).sum(1) / n_neg.clamp_min(1)
    pair_loss = pair.sum() / (n_neg > 0).sum().clamp_min(1)
    bce = F.binary_cross_entropy_with_logits(s, y, reduction="none").masked_fill(~mask, 0.0)
    loss = pair_loss + point_weight * bce.sum() / mask.sum().clamp_min(1)
    hits = s.masked_fill(~neg, float("-inf")).amax(1) < s_pos.squeeze(1)
    return loss, hits


_compiled_core = None


def padded_loss(scores, labels, offsets, core=_padded_core, margin=0.0, point_weight=0.5):
    sizes = offsets[1:] - offsets[:-1]
    g, n = sizes.numel(), scores.numel()
    width = int(sizes.max())  # the padded layout needs the longest group on the host: a sync
    gid = torch.repeat_interleave(torch.arange(g, device=scores.device), sizes, output_size=n)
    col = torch.arange(n, device=scores.device) - offsets[:-1][gid]
    s_pad = scores.new_zeros(g, width).index_put((gid, col), scores)
    y_pad = torch.zeros(g, width, dtype=torch.bool, device=scores.device).index_put((gid, col), labels != 0)
    mask = torch.zeros(g, width, dtype=torch.bool, device=scores.device)
    mask[gid, col] = True
    return core(s_pad, y_pad, mask, margin, point_weight)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def make_step(impl):
    backend = "triton" if DEVICE.type == "cuda" else "torch"
    if impl == "loop_reference":
        fn = pairwise_rank_loss_reference
    elif impl == "padded_torch":
        fn = padded_loss
    elif impl == "padded_compiled":
        global _compiled_core
        if _compiled_core is None:
            _compiled_core = torch.compile(_padded_core, dynamic=False)
        fn = lambda s, y, o: padded_loss(s, y, o, core=_compiled_core)  # noqa: E731
    elif impl == "fastrank":
        fn = lambda s, y, o: pairwise_rank_loss(s, y, o, backend=backend, validate=False)  # noqa: E731
    elif impl == "fastrank_cuda":
        fn = lambda s, y, o: pairwise_rank_loss(s, y, o, backend="cuda", validate=False)  # noqa: E731
    else:
        fn = lambda s, y, o: pairwise_rank_loss(s, y, o, backend=backend)  # noqa: E731

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
    if impl == "fastrank_cuda":
        ok, why = cuda_ext_available(DEVICE)
        if not ok:
            pytest.skip(f"backend='cuda' cannot run here: {why}")
    elif DEVICE.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1" and impl.startswith("fastrank"):
        pytest.skip("TRITON_INTERPRET=1 is set: the kernel would run in the interpreter, not on the GPU")
    if impl == "loop_reference" and DEVICE.type == "cpu" and num_groups > 4096:
        pytest.skip("per-group Python loop at G=65536 takes ~8 s per step on CPU (~0.5 s at G=4096): linear in G")
    scores, labels, offsets = make_batch(num_groups)
    step = make_step(impl)
    try:
        expected = pairwise_rank_loss_reference(scores.detach(), labels, offsets).loss if num_groups <= 4096 else None
        got = step(scores, labels, offsets)  # warm-up outside the timing (compilation, allocator, autotune)
    except Exception as exc:
        if impl == "padded_compiled":
            pytest.skip(f"torch.compile failed on this machine: {type(exc).__name__}: {str(exc)[:200]}")
        raise
    if expected is not None:  # a fast wrong answer is not a result
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    benchmark.group = f"G={num_groups} (N={scores.numel()}) fwd+bwd on {DEVICE.type}"
    benchmark.extra_info.update(num_groups=num_groups, num_candidates=scores.numel(), device=str(DEVICE),
                                torch_threads=torch.get_num_threads())
    rounds = {64: 20, 4096: 10, 65536: 5}[num_groups] if impl != "loop_reference" else {64: 5, 4096: 2}[num_groups]
    benchmark.pedantic(step, args=(scores, labels, offsets), rounds=rounds, iterations=1, warmup_rounds=1)
