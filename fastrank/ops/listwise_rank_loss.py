r"""Fused listwise (softmax cross-entropy) ranking loss over packed candidate groups, optionally mixed with the
paper's pairwise softplus and pointwise BCE terms (the sibling of ``pairwise_rank_loss``).

The batch is packed like ``cu_seqlens``: group ``g`` is ``scores[offsets[g]:offsets[g+1]]`` with exactly one
positive ``p_g`` and ``n_g = |group| - 1`` negatives. With ``z = s / temperature`` and ``G' = #{g : n_g > 0}``::

    list  = 1/G' * sum_{g: n_g>0} [ logsumexp_{i in g}(z_i) - z_{p_g} ]        (ListNet with a one-hot target
                                                                                 = InfoNCE with one positive)
    pair  = 1/G' * sum_{g: n_g>0} 1/n_g * sum_{n in N_g} softplus(margin - s_{p_g} + s_n)   (paper eq. 5)
    point = 1/N * sum_i BCEWithLogits(s_i, y_i)                                             (paper eq. 6-7)
    loss  = list_weight * list + pair_weight * pair + point_weight * point

A singleton group contributes nothing to ``list`` or ``pair`` (its softmax is 1) and is not counted in ``G'``,
exactly as in ``pairwise_rank_loss``; an empty batch gives 0. With ``list_weight=0, pair_weight=1`` the op *is*
``pairwise_rank_loss`` (a test checks it). ``hits[g]``: the positive scores strictly above every negative.

Why a listwise term: the pairwise term pushes each negative below the positive independently (a far-below
negative still gets gradient sigmoid(.) > 0), while the softmax spends its gradient on the negatives that
currently compete with the positive (d/dz_n = softmax_n) — the quantity top-1 selection depends on.

Implementations (same contract):
- ``_listwise_rank_loss_kernel`` (Triton): one launch; a program owns ``BLOCK_G`` groups and walks them in
  ``BLOCK_C`` chunks up to the longest group of its tile. Sweep 1: positive, best negative and an online
  logsumexp (running max + rescaled sum, so +-1e4 scores and small temperatures never overflow); sweep 2: loss
  terms and d loss/d scores, saved for backward (a single multiply by grad_output). No atomics: deterministic.
- ``_torch_forward``: vectorized PyTorch over the packed layout (segment max / sums), autograd backward; what
  ``backend="auto"`` runs on CPU.
- ``listwise_rank_loss_reference``: a per-group Python loop, the executable definition.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastrank.ops._backend import resolve_backend
from fastrank.ops.pairwise_rank_loss import RankLossOutput, _check_inputs, _sigmoid, _softplus

__all__ = ["listwise_rank_loss", "listwise_rank_loss_reference"]

BLOCK_G = 64  # groups per program (as in pairwise_rank_loss: few programs, cheap in the interpreter)
BLOCK_C = 32  # candidates per chunk: a 2-20 candidate set fits in one
_NEG = -3.0e38  # finite "minus infinity": keeps max/rescale arithmetic free of inf - inf = nan


@triton.jit
def _listwise_rank_loss_kernel(
    scores_ptr, labels_ptr, offsets_ptr, n_pair_groups_ptr,  # inputs
    loss_ptr, hits_ptr, grad_ptr,  # outputs: (G,) fp32, (G,) int8, (N,) scores dtype
    G, N, inv_t, margin, list_weight, pair_weight, point_scale,  # point_scale = point_weight / N
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    row_ok = rows < G
    start = tl.load(offsets_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    length = (tl.load(offsets_ptr + rows + 1, mask=row_ok, other=0).to(tl.int64) - start).to(tl.int32)
    max_len = tl.max(length, axis=0)
    cols = tl.arange(0, BLOCK_C)

    # Sweep 1: positive score/position/count, best negative, and the online logsumexp of z = s / T.
    s_pos = tl.zeros([BLOCK_G], dtype=tl.float32)
    pos_idx = tl.zeros([BLOCK_G], dtype=tl.int64)
    n_pos = tl.zeros([BLOCK_G], dtype=tl.int32)
    neg_max = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    s_max = tl.full([BLOCK_G], _NEG, dtype=tl.float32)
    z_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    for c0 in range(0, max_len, BLOCK_C):
        c = c0 + cols
        idx = start[:, None] + c[None, :]
        m = (c[None, :] < length[:, None]) & (idx < N)  # `idx < N`: memory safety with validate=False
        s = tl.load(scores_ptr + idx, mask=m, other=0.0).to(tl.float32)  # fp32 first: interpreter bf16 is uint16
        is_pos = (tl.load(labels_ptr + idx, mask=m, other=0).to(tl.float32) != 0.0) & m
        s_pos += tl.sum(tl.where(is_pos, s, 0.0), axis=1)
        pos_idx += tl.sum(tl.where(is_pos, idx, 0), axis=1)
        n_pos += tl.sum(is_pos.to(tl.int32), axis=1)
        neg_max = tl.maximum(neg_max, tl.max(tl.where(m & ~is_pos, s, float("-inf")), axis=1))
        # exponents are (s - max s) / T, not s/T - max(s/T): the difference of two fp32 scores is exact (or
        # rounded relative to itself), while s/T at |s| = 1e4, T = 0.05 carries an ulp of 0.016 into the softmax
        # (masked lanes and a row's first chunk are steered to exp(0): no inf even in unused lanes)
        new_max = tl.maximum(s_max, tl.max(tl.where(m, s, _NEG), axis=1))
        e = tl.where(m, tl.exp((tl.where(m, s, new_max[:, None]) - new_max[:, None]) * inv_t), 0.0)
        rescale = tl.exp(tl.where(s_max > _NEG, s_max - new_max, 0.0) * inv_t)
        z_sum = z_sum * rescale + tl.sum(e, axis=1)
        s_max = new_max

    n_pair = tl.maximum(tl.load(n_pair_groups_ptr).to(tl.float32), 1.0)
    n_neg = (length - n_pos).to(tl.float32)
    has_neg = n_neg > 0
    group_scale = tl.where(has_neg, 1.0 / n_pair, 0.0)  # 1/G' for groups with a negative, else 0
    pair_scale = pair_weight * group_scale / tl.maximum(n_neg, 1.0)
    list_scale = list_weight * group_scale
    # lse = logsumexp((s - s_max) / T) >= 0 for a non-empty group. Tile rows past G (and empty groups) get
    # s_max = lse = 0: their values are never stored, but an inf/nan there still poisons the interpreter's
    # whole-block bf16 store conversion.
    nonempty = z_sum > 0
    s_max = tl.where(nonempty, s_max, 0.0)
    lse = tl.where(nonempty, tl.log(tl.maximum(z_sum, 1e-30)), 0.0)
    z_pos = (s_pos - s_max) * inv_t
    p_pos = tl.exp(z_pos - lse)

    # Sweep 2: loss terms and gradients. The positive's pair gradient needs every negative: stored last.
    loss_acc = list_scale * (lse - z_pos)
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
        p = tl.exp((tl.where(m, s, s_max[:, None]) - s_max[:, None]) * inv_t - lse[:, None])  # softmax in group
        d_list = (list_scale * inv_t)[:, None] * p
        tl.store(grad_ptr + idx, pair_scale[:, None] * d_pair + d_point + d_list, mask=is_neg)

    d_pos = pos_point_grad - pair_scale * sig_sum + list_scale * inv_t * (p_pos - 1.0)
    tl.store(grad_ptr + pos_idx, d_pos, mask=row_ok & (n_pos == 1))
    tl.store(loss_ptr + rows, loss_acc, mask=row_ok)
    tl.store(hits_ptr + rows, (s_pos > neg_max).to(tl.int8), mask=row_ok)


class _ListwiseRankLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, labels, offsets, temperature, margin, list_weight, pair_weight, point_weight):
        n, g = scores.numel(), offsets.numel() - 1
        if labels.dtype == torch.bool:
            labels = labels.view(torch.uint8)  # zero-copy; Triton's int1 pointers are awkward
        n_pair_groups = (offsets[1:] - offsets[:-1] > 1).sum()  # stays on device: no host sync
        group_loss = torch.zeros(g, dtype=torch.float32, device=scores.device)
        hits = torch.zeros(g, dtype=torch.int8, device=scores.device)
        grad = torch.zeros_like(scores)  # zeros: with validate=False a multi-positive group leaves slots unwritten
        if g > 0:
            _listwise_rank_loss_kernel[(triton.cdiv(g, BLOCK_G),)](
                scores, labels, offsets, n_pair_groups, group_loss, hits, grad,
                g, n, 1.0 / float(temperature), float(margin), float(list_weight), float(pair_weight),
                float(point_weight) / max(n, 1),
                BLOCK_G=BLOCK_G, BLOCK_C=BLOCK_C,
            )
        ctx.save_for_backward(grad)
        hits = hits.view(torch.bool)
        ctx.mark_non_differentiable(hits)
        return group_loss.sum(), hits

    @staticmethod
    def backward(ctx, grad_loss, _grad_hits):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None, None


def _torch_forward(scores, labels, offsets, temperature, margin, list_weight, pair_weight, point_weight):
    n, g = scores.numel(), offsets.numel() - 1
    dt = torch.promote_types(scores.dtype, torch.float32)  # fp64 stays fp64 so gradcheck is meaningful
    s = scores.to(dt)
    is_neg = labels == 0
    y = (~is_neg).to(dt)
    sizes = offsets[1:] - offsets[:-1]
    gid = torch.repeat_interleave(torch.arange(g, device=s.device), sizes, output_size=n)  # output_size: no sync
    s_pos_g = torch.zeros(g, dtype=dt, device=s.device).index_add(0, gid, s * y)
    s_pos = s_pos_g[gid]
    n_neg = (sizes - 1).to(dt)
    inv_groups = 1.0 / (n_neg > 0).sum().clamp_min(1)
    loss = s.sum() * 0  # keeps the graph (and the dtype) when every term is switched off
    if list_weight:
        # shift by the segment max of s (a constant: no gradient needed) *before* dividing by T, as the kernel
        # does: finite for +-1e4 scores and small T, and exact differences instead of rounded s/T values
        s_max = torch.full((g,), float("-inf"), dtype=dt, device=s.device).scatter_reduce(
            0, gid, s.detach(), "amax", include_self=True)
        s_max = torch.where(torch.isfinite(s_max), s_max, 0.0)
        lse = torch.zeros(g, dtype=dt, device=s.device).index_add(
            0, gid, torch.exp((s - s_max[gid]) / temperature)).log()
        ce = torch.where(n_neg > 0, lse - (s_pos_g - s_max) / temperature, 0.0)
        loss = loss + list_weight * inv_groups * ce.sum()
    if pair_weight:
        group_w = inv_groups / n_neg.clamp_min(1)
        pair = F.softplus(margin - s_pos + s) * torch.where(is_neg, group_w[gid], 0.0)
        loss = loss + pair_weight * pair.sum()
    if point_weight:
        loss = loss + point_weight * F.binary_cross_entropy_with_logits(s, y, reduction="sum") / max(n, 1)
    with torch.no_grad():
        beaten = torch.zeros(g, dtype=dt, device=s.device).index_add(0, gid, (is_neg & (s >= s_pos)).to(dt))
    return RankLossOutput(loss, beaten == 0)


def _check_weights(temperature, list_weight, pair_weight, point_weight) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for name, w in (("list_weight", list_weight), ("pair_weight", pair_weight), ("point_weight", point_weight)):
        if w < 0:
            raise ValueError(f"{name} must be >= 0, got {w}")


def listwise_rank_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    group_offsets: torch.Tensor,
    *,
    temperature: float = 1.0,
    list_weight: float = 1.0,
    pair_weight: float = 0.0,
    point_weight: float = 0.0,
    margin: float = 0.0,
    backend: str = "auto",
    validate: bool = True,
) -> RankLossOutput:
    """Softmax cross-entropy per packed group (temperature ``temperature``), times ``list_weight``, plus
    ``pair_weight`` x the paper's pairwise softplus term (with ``margin``) and ``point_weight`` x BCE.

    Same inputs, outputs, ``validate`` and ``backend`` semantics as ``pairwise_rank_loss`` (scores (N,)
    fp32/bf16/fp16, labels nonzero = positive, offsets (G+1,) int32/int64; fp32 loss, (G,) bool hits, gradient
    in the dtype of ``scores``). There is no ``backend="cuda"`` implementation of this op: it raises.
    """
    _check_weights(temperature, list_weight, pair_weight, point_weight)
    if validate:
        _check_inputs(scores, labels, group_offsets)
    if backend == "cuda":
        raise RuntimeError("listwise_rank_loss has no compiled CUDA kernel; use backend='triton' or 'auto'")
    impl = resolve_backend(backend, scores.device)
    args = (float(temperature), float(margin), float(list_weight), float(pair_weight), float(point_weight))
    if impl == "torch":
        return _torch_forward(scores, labels, group_offsets, *args)
    loss, hits = _ListwiseRankLossFunction.apply(scores.contiguous(), labels.contiguous(),
                                                 group_offsets.contiguous(), *args)
    return RankLossOutput(loss, hits)


def listwise_rank_loss_reference(
    scores: torch.Tensor, labels: torch.Tensor, group_offsets: torch.Tensor, *, temperature: float = 1.0,
    list_weight: float = 1.0, pair_weight: float = 0.0, point_weight: float = 0.0, margin: float = 0.0,
) -> RankLossOutput:
    """Plain per-group loop, the executable definition of the loss (computed in fp32, fp64 kept for gradcheck)."""
    _check_weights(temperature, list_weight, pair_weight, point_weight)
    dt = torch.promote_types(scores.dtype, torch.float32)
    s, y = scores.to(dt), (labels != 0).to(dt)
    bounds = group_offsets.tolist()
    list_terms, pair_terms, hits = [], [], []
    for gi in range(len(bounds) - 1):
        lo, hi = bounds[gi], bounds[gi + 1]
        sg, yg = s[lo:hi], y[lo:hi]
        if int(yg.sum()) != 1:
            raise ValueError(f"group {gi} (scores[{lo}:{hi}]) has {int(yg.sum())} positives; exactly one is required")
        pos, neg = sg[yg == 1][0], sg[yg == 0]
        hits.append(bool((neg < pos).all()))
        if neg.numel() > 0:
            list_terms.append(-torch.log_softmax(sg / temperature, dim=0)[yg == 1][0])
            pair_terms.append(F.softplus(margin - pos + neg).mean())
    zero = s.sum() * 0
    listwise = torch.stack(list_terms).mean() if list_terms else zero
    pair = torch.stack(pair_terms).mean() if pair_terms else zero
    point = F.binary_cross_entropy_with_logits(s, y, reduction="sum") / max(s.numel(), 1)
    loss = list_weight * listwise + pair_weight * pair + point_weight * point
    return RankLossOutput(loss, torch.tensor(hits, dtype=torch.bool, device=scores.device))
