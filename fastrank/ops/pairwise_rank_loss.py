r"""Fused pairwise ranking + pointwise BCE loss over a packed batch of candidate groups (paper §3.4, eq. 5-7).

The batch is packed like ``cu_seqlens``: group ``g`` is ``scores[offsets[g]:offsets[g+1]]`` and holds exactly
one positive ``p_g`` (label != 0) and ``n_g = |group| - 1`` negatives ``N_g``. With ``G' = #{g : n_g > 0}``::

    loss = 1/G' * sum_{g: n_g>0} 1/n_g * sum_{n in N_g} softplus(margin - s_{p_g} + s_n)      (eq. 5)
         + point_weight * 1/N * sum_i BCEWithLogits(s_i, y_i)                                 (eq. 6-7)

The pair term is 0 when no group has a negative; an empty batch gives 0. ``hits[g]`` is True when the positive
scores strictly higher than every negative of its group (top-1 hit; a singleton group is a hit).

Four implementations share that contract:
- ``_pairwise_rank_loss_kernel`` (Triton): one launch per call. Each program owns a tile of ``BLOCK_G`` groups and
  walks their candidates in ``BLOCK_C`` column chunks up to the longest group *of its tile* (no padding to the
  batch-wide maximum). Sweep 1 finds each positive (and the best negative, for hits); sweep 2 writes per-group loss
  terms and d loss/d scores, so backward is a single multiply by grad_output (Liger-style). Groups never share a
  program's output slots, so there are no atomics and the result is deterministic.
- ``_torch_forward``: vectorized PyTorch over the packed layout (segment sums via index_add), autograd backward.
  It is what ``backend="auto"`` runs on CPU.
- ``pairwise_rank_loss_reference``: a Python loop over groups, obviously correct, for tests and benchmarks.
- ``kernels/pairwise_rank_loss.cu`` (``backend="cuda"``, the optional extension ``fastrank._cuda``): the same single
  pass in native CUDA, one warp per group, through the same autograd.Function. Compiled, never run on a GPU yet, so
  ``auto`` does not pick it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastrank.ops._backend import cuda_ext, resolve_backend

__all__ = ["RankLossOutput", "pairwise_rank_loss", "pairwise_rank_loss_reference"]

BLOCK_G = 64  # groups per program: big tiles keep the launch count (and the interpreter's per-program cost) low
BLOCK_C = 32  # candidates per chunk: the typical 2-20 candidate group fits in one chunk


class RankLossOutput(NamedTuple):
    loss: torch.Tensor  # fp32 scalar
    hits: torch.Tensor  # (G,) bool, top-1 hit per group


@triton.jit
def _softplus(x):
    # no log1p in the interpreter (libdevice externs return None); this form never overflows
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _pairwise_rank_loss_kernel(
    scores_ptr, labels_ptr, offsets_ptr, n_pair_groups_ptr,  # inputs
    loss_ptr, hits_ptr, grad_ptr,  # outputs: (G,) fp32, (G,) int8, (N,) scores dtype
    G, N, margin, point_scale,  # point_scale = point_weight / N
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    row_ok = rows < G
    start = tl.load(offsets_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    length = (tl.load(offsets_ptr + rows + 1, mask=row_ok, other=0).to(tl.int64) - start).to(tl.int32)
    max_len = tl.max(length, axis=0)
    cols = tl.arange(0, BLOCK_C)

    # Pass 1: the positive's score and position, the positive count and the best negative.
    s_pos = tl.zeros([BLOCK_G], dtype=tl.float32)
    pos_idx = tl.zeros([BLOCK_G], dtype=tl.int64)
    n_pos = tl.zeros([BLOCK_G], dtype=tl.int32)
    neg_max = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    for c0 in range(0, max_len, BLOCK_C):
        c = c0 + cols
        idx = start[:, None] + c[None, :]
        # `idx < N` only matters with validate=False and malformed offsets: an unmasked access would crash
        m = (c[None, :] < length[:, None]) & (idx < N)
        s = tl.load(scores_ptr + idx, mask=m, other=0.0).to(tl.float32)  # fp32 first: interpreter bf16 is uint16
        is_pos = (tl.load(labels_ptr + idx, mask=m, other=0).to(tl.float32) != 0.0) & m
        s_pos += tl.sum(tl.where(is_pos, s, 0.0), axis=1)
        pos_idx += tl.sum(tl.where(is_pos, idx, 0), axis=1)
        n_pos += tl.sum(is_pos.to(tl.int32), axis=1)
        neg_max = tl.maximum(neg_max, tl.max(tl.where(m & ~is_pos, s, float("-inf")), axis=1))

    # G' lives on the device so that the host never waits for it.
    n_pair = tl.maximum(tl.load(n_pair_groups_ptr).to(tl.float32), 1.0)
    n_neg = (length - n_pos).to(tl.float32)
    pair_scale = tl.where(n_neg > 0, 1.0 / (tl.maximum(n_neg, 1.0) * n_pair), 0.0)

    # Pass 2: loss terms and gradients; the positive's pair gradient needs every negative, so it is stored last.
    loss_acc = tl.zeros([BLOCK_G], dtype=tl.float32)
    sig_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    pos_point_grad = tl.zeros([BLOCK_G], dtype=tl.float32)
    for c0 in range(0, max_len, BLOCK_C):
        c = c0 + cols
        idx = start[:, None] + c[None, :]
        m = (c[None, :] < length[:, None]) & (idx < N)
        s = tl.load(scores_ptr + idx, mask=m, other=0.0).to(tl.float32)
        is_pos = (tl.load(labels_ptr + idx, mask=m, other=0).to(tl.float32) != 0.0) & m
        is_neg = m & ~is_pos
        y = is_pos.to(tl.float32)
        x = margin - s_pos[:, None] + s
        pair = tl.where(is_neg, _softplus(x), 0.0)
        bce = tl.where(m, _softplus(s) - s * y, 0.0)
        loss_acc += pair_scale * tl.sum(pair, axis=1) + point_scale * tl.sum(bce, axis=1)
        d_pair = tl.where(is_neg, _sigmoid(x), 0.0)
        sig_sum += tl.sum(d_pair, axis=1)
        d_point = point_scale * (_sigmoid(s) - y)
        pos_point_grad += tl.sum(tl.where(is_pos, d_point, 0.0), axis=1)
        tl.store(grad_ptr + idx, pair_scale[:, None] * d_pair + d_point, mask=is_neg)

    tl.store(grad_ptr + pos_idx, pos_point_grad - pair_scale * sig_sum, mask=row_ok & (n_pos == 1))
    tl.store(loss_ptr + rows, loss_acc, mask=row_ok)
    tl.store(hits_ptr + rows, (s_pos > neg_max).to(tl.int8), mask=row_ok)


class _PairwiseRankLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, labels, offsets, margin, point_weight, impl="triton"):
        if impl == "cuda":  # loss, hits and gradient from the extension's single pass; labels of any dtype as they are
            loss, hits, grad = cuda_ext().pairwise_rank_loss_forward(
                scores, labels, offsets, float(margin), float(point_weight)
            )
            ctx.save_for_backward(grad)
            ctx.mark_non_differentiable(hits)
            return loss, hits
        n, g = scores.numel(), offsets.numel() - 1
        if labels.dtype == torch.bool:
            labels = labels.view(torch.uint8)  # zero-copy; Triton's int1 pointers are awkward
        n_pair_groups = (offsets[1:] - offsets[:-1] > 1).sum()  # stays on device
        group_loss = torch.zeros(g, dtype=torch.float32, device=scores.device)
        hits = torch.zeros(g, dtype=torch.int8, device=scores.device)
        # zeros, not empty: with validate=False a group with several positives leaves those slots unwritten
        grad = torch.zeros_like(scores)
        if g > 0:
            _pairwise_rank_loss_kernel[(triton.cdiv(g, BLOCK_G),)](
                scores, labels, offsets, n_pair_groups, group_loss, hits, grad,
                g, n, float(margin), float(point_weight) / max(n, 1),
                BLOCK_G=BLOCK_G, BLOCK_C=BLOCK_C,
            )
        ctx.save_for_backward(grad)
        hits = hits.view(torch.bool)
        ctx.mark_non_differentiable(hits)
        return group_loss.sum(), hits

    @staticmethod
    def backward(ctx, grad_loss, _grad_hits):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None


def _torch_forward(scores, labels, offsets, margin, point_weight) -> RankLossOutput:
    n, g = scores.numel(), offsets.numel() - 1
    dt = torch.promote_types(scores.dtype, torch.float32)  # fp64 stays fp64 so gradcheck is meaningful
    s = scores.to(dt)
    is_neg = labels == 0
    y = (~is_neg).to(dt)
    sizes = offsets[1:] - offsets[:-1]
    gid = torch.repeat_interleave(torch.arange(g, device=s.device), sizes, output_size=n)  # output_size: no sync
    s_pos = torch.zeros(g, dtype=dt, device=s.device).index_add(0, gid, s * y)[gid]
    # fold both means into one per-candidate weight 1/(n_g * G'): a single global sum, no second segment sum
    n_neg = (sizes - 1).to(dt)
    group_w = 1.0 / (n_neg.clamp_min(1) * (n_neg > 0).sum().clamp_min(1))
    pair = F.softplus(margin - s_pos + s) * torch.where(is_neg, group_w[gid], 0.0)
    point = F.binary_cross_entropy_with_logits(s, y, reduction="sum") / max(n, 1)
    loss = pair.sum() + point_weight * point
    with torch.no_grad():
        beaten = torch.zeros(g, dtype=dt, device=s.device).index_add(0, gid, (is_neg & (s >= s_pos)).to(dt))
    return RankLossOutput(loss, beaten == 0)


def _check_inputs(scores, labels, offsets) -> None:
    """Raise ValueError on a malformed batch. One device->host sync, so hot loops may skip it (validate=False)."""
    if scores.dim() != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"scores and labels must be 1-D of equal length, got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    if offsets.dim() != 1 or offsets.numel() < 1 or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"group_offsets must be a 1-D int32/int64 tensor of G+1 >= 1 entries, got {offsets}")
    if not (scores.device == labels.device == offsets.device):
        raise ValueError("scores, labels and group_offsets must be on the same device")
    n = scores.numel()
    off = offsets.long()
    csum = torch.cat([off.new_zeros(1), (labels != 0).long().cumsum(0)])
    # clamp so that malformed offsets still index safely; they are reported below
    n_pos = csum[off[1:].clamp(0, n)] - csum[off[:-1].clamp(0, n)]
    bad_offsets = (off[0] != 0) | (off[-1] != n) | (off[1:] < off[:-1]).any()
    bad_groups = n_pos != 1
    if not bool(bad_offsets | bad_groups.any()):  # the only sync
        return
    if bool(bad_offsets):
        raise ValueError(f"group_offsets must start at 0, end at N={n} and be non-decreasing, got {offsets.tolist()}")
    gi = int(bad_groups.nonzero()[0, 0])
    raise ValueError(
        f"group {gi} (scores[{int(off[gi])}:{int(off[gi + 1])}]) has {int(n_pos[gi])} positives; "
        "exactly one positive per group is required"
    )


def pairwise_rank_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    group_offsets: torch.Tensor,
    *,
    margin: float = 0.0,
    point_weight: float = 0.5,
    backend: str = "auto",
    validate: bool = True,
) -> RankLossOutput:
    """Pairwise softplus ranking loss + ``point_weight`` x BCE over packed groups, and top-1 hits per group.

    scores: (N,) fp32/bf16/fp16 logits. labels: (N,) any dtype, nonzero = positive. group_offsets: (G+1,)
    int32/int64 with offsets[0] = 0 and offsets[G] = N. Returns ``RankLossOutput(loss fp32 scalar, hits (G,) bool)``;
    the gradient w.r.t. scores comes back in the dtype of ``scores``. (fp64 scores, torch backend only, give an fp64
    loss so that gradcheck can run.)

    ``validate=True`` checks the offsets and that every group has exactly one positive (ValueError naming the
    group); it costs one device->host sync. Pass ``validate=False`` in hot loops whose batches are known to be
    well formed: on malformed input the result is then unspecified (but memory-safe).
    ``backend``: "triton" (kernel; CUDA, or CPU under TRITON_INTERPRET=1), "torch", "cuda" (the compiled extension,
    CUDA tensors only), or "auto" (see _backend).
    """
    if validate:
        _check_inputs(scores, labels, group_offsets)
    impl = resolve_backend(backend, scores.device)
    if impl == "torch":
        return _torch_forward(scores, labels, group_offsets, margin, point_weight)
    loss, hits = _PairwiseRankLossFunction.apply(
        scores.contiguous(), labels.contiguous(), group_offsets.contiguous(), margin, point_weight, impl
    )
    return RankLossOutput(loss, hits)


def pairwise_rank_loss_reference(
    scores: torch.Tensor, labels: torch.Tensor, group_offsets: torch.Tensor, *, margin: float = 0.0,
    point_weight: float = 0.5,
) -> RankLossOutput:
    """Plain per-group loop, the executable definition of the loss (computed in fp32, fp64 kept for gradcheck)."""
    dt = torch.promote_types(scores.dtype, torch.float32)
    s, y = scores.to(dt), (labels != 0).to(dt)
    bounds = group_offsets.tolist()
    pair_terms, hits = [], []
    for gi in range(len(bounds) - 1):
        lo, hi = bounds[gi], bounds[gi + 1]
        sg, yg = s[lo:hi], y[lo:hi]
        if int(yg.sum()) != 1:
            raise ValueError(f"group {gi} (scores[{lo}:{hi}]) has {int(yg.sum())} positives; exactly one is required")
        pos, neg = sg[yg == 1][0], sg[yg == 0]
        hits.append(bool((neg < pos).all()))
        if neg.numel() > 0:
            pair_terms.append(F.softplus(margin - pos + neg).mean())
    pair = torch.stack(pair_terms).mean() if pair_terms else s.sum() * 0
    point = F.binary_cross_entropy_with_logits(s, y, reduction="sum") / max(s.numel(), 1)
    loss = pair + point_weight * point
    return RankLossOutput(loss, torch.tensor(hits, dtype=torch.bool, device=scores.device))
