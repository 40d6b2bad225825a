"""Packed DeBERTa-v2/v3 encoding without row padding or block masks, through `disentangled-flash`.

The optional extra ``fastrank[deberta]`` installs `disentangled-flash` (exact DeBERTa disentangled attention:
log-bucket relative positions, c2p + p2c). `Reranker` uses this module for DeBERTa-v2/v3 encoders when
``packed_attention="varlen"`` (the default) and the package is importable; otherwise it keeps the row +
block-diagonal mask path (`fastrank.model`), which stays the reference.

`install()` swaps the HF encoder in place with ``optimize_deberta_training`` (parameter names unchanged, so
checkpoints load either way). `encode()` then runs every candidate of a batch as its own sequence
(cu_seqlens), whatever the batch layout (one unpadded row, rows, or padded); only candidates' first tokens are
read by the head, so padding positions come back as zeros. Two backends:

- ``"triton"`` (CUDA): the package's fused varlen kernels, ``encoder.forward_packed(tokens, cu_seqlens, ...)``.
- ``"torch"`` (any device): the package's PyTorch attention math and position plans, driven here. Its own
  ``forward_packed`` loops over sequences and projects the relative-position table again for every one (on
  CPU at hidden 768: 1.17x the block-mask rows, against 1.54x for this driver; bench/RESULTS.md); this driver
  projects Q/K/V once for the whole token stream and the table once per layer, and batches candidates of
  equal length. It calls the projection modules (not their raw weights), so LoRA adapters (`fastrank.routing`)
  apply.
- ``"auto"``: Triton on CUDA when the head size has kernels (32/64/128), else torch. Triton cannot run on CPU;
  on CUDA it is the package's documented faster path (its README, MNLI inference on an H200: packed Triton
  4.8x HF eager padded); not measured here (no GPU was lent).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

BACKENDS = ("auto", "torch", "triton")
TRITON_HEAD_DIMS = (32, 64, 128)


def available() -> bool:
    """Whether the optional extra is installed."""
    try:
        import disentangled_flash  # noqa: F401
    except ImportError:
        return False
    return True


def supported(config) -> bool:
    """DeBERTa-v2/v3 configs this path is exact for (the same ones the block-mask path handles: no conv layer,
    no z_steps; absolute positions are fine as the embeddings get per-candidate position_ids)."""
    return (getattr(config, "model_type", None) == "deberta-v2" and getattr(config, "conv_kernel_size", 0) <= 0
            and getattr(config, "z_steps", 0) <= 1)


def _head_dim(config) -> int:
    return config.hidden_size // config.num_attention_heads


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def install(backbone: nn.Module, backend: str = "auto") -> str:
    """Swap ``backbone.encoder`` (a `DebertaV2Model`'s) for the package's training encoder; returns `backend`.

    Idempotent (a `RoutedReranker` re-wraps an already swapped encoder). The Triton attention classes subclass
    the torch ones, so they are installed whenever their kernels could serve this config: the same modules then
    run on CPU through the torch driver and on CUDA through the kernels.
    """
    if backend not in BACKENDS:
        raise ValueError(f"varlen_backend must be one of {BACKENDS}, not {backend!r}")
    from disentangled_flash import DebertaV2OptimizedEncoder, optimize_deberta_training

    if not supported(backbone.config):
        raise ValueError(f"{backbone.config.model_type} config is not supported by the DeBERTa varlen path")
    if isinstance(backbone.encoder, DebertaV2OptimizedEncoder):
        _check_backend(backend, backbone.encoder)
        return backend
    kernels_ok = _triton_importable() and _head_dim(backbone.config) in TRITON_HEAD_DIMS
    if backend == "triton" and not kernels_ok:
        raise ValueError(f"varlen_backend='triton' needs triton and a head size in {TRITON_HEAD_DIMS} "
                         f"(this config: {_head_dim(backbone.config)}); use 'torch' or 'auto'")
    classes = "triton" if kernels_ok and backend != "torch" else "torch"
    optimize_deberta_training(backbone, backend=classes)
    # the package silently keeps the HF encoder when it judges a backend unusable: make that an error here
    if not isinstance(backbone.encoder, DebertaV2OptimizedEncoder) or backbone.encoder.backend != classes:
        raise RuntimeError(f"disentangled-flash did not install its {classes!r} encoder")
    return backend


def _check_backend(backend: str, enc) -> None:
    if backend == "triton" and enc.backend != "triton":
        raise ValueError("varlen_backend='triton': the encoder was installed with the torch attention classes")


def resolve_backend(backend: str, backbone: nn.Module, device: torch.device) -> str:
    """The backend `encode()` uses on `device`; a forced backend that cannot run there is an error."""
    enc = backbone.encoder
    if backend == "torch":
        return "torch"
    triton_ready = enc.backend == "triton" and device.type == "cuda"
    if backend == "triton":
        _check_backend(backend, enc)
        if not triton_ready:
            raise RuntimeError(f"varlen_backend='triton' needs CUDA tensors (got {device.type}); use 'auto' or "
                               f"'torch' on this device")
        return "triton"
    return "triton" if triton_ready else "torch"


# ---------------------------------------------------------------------------------------------- encode
def encode(backbone: nn.Module, batch, token_type_ids: torch.Tensor | None, backend: str = "auto") -> torch.Tensor:
    """Last hidden states (R, L, H) of a `PackedBatch` (any layout), each candidate attended on its own."""
    ids, real = batch.input_ids, batch.segment_ids > 0
    hidden = backbone.embeddings(input_ids=ids, token_type_ids=token_type_ids, position_ids=batch.position_ids,
                                 mask=real.long())
    if resolve_backend(backend, backbone, ids.device) == "triton":
        return _encode_triton(backbone.encoder, hidden, batch)
    return _encode_torch(backbone.encoder, hidden, batch)


def _token_index(batch) -> torch.Tensor | None:
    """Flat token positions of candidates 0..N-1 in order (their cu_seqlens stream); None when that is every
    position in order (one unpadded row, the collator's ``row_len=None`` layout)."""
    lens, starts = batch.seq_lens, batch.cls_index
    total = int(batch.input_ids.numel())
    if batch.input_ids.shape[0] == 1 and int(batch.n_tokens) == total:
        offsets = torch.cumsum(lens, 0) - lens
        if torch.equal(offsets, starts):
            return None
    cand = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
    within = torch.arange(cand.numel(), device=lens.device) - (torch.cumsum(lens, 0) - lens)[cand]
    return starts[cand] + within


def _encode_triton(enc, hidden: torch.Tensor, batch) -> torch.Tensor:
    from disentangled_flash import validate_cu_seqlens

    for layer in enc.layer:  # the fused QKV GEMM reads the raw weights: it would skip LoRA adapters silently
        a = layer.attention.self
        if any(type(getattr(a, n)) is not nn.Linear for n in ("query_proj", "key_proj", "value_proj")):
            raise NotImplementedError("varlen_backend='triton' fuses Q/K/V from the raw weights and would bypass "
                                      "adapters on them (routing / LoRA); use varlen_backend='torch'")
    r, length, h = hidden.shape
    flat = hidden.reshape(r * length, h)
    index = _token_index(batch)
    tokens = flat if index is None else flat.index_select(0, index)
    cu = torch.zeros(batch.seq_lens.numel() + 1, dtype=torch.int32, device=hidden.device)
    cu[1:] = torch.cumsum(batch.seq_lens, 0)
    info = validate_cu_seqlens(cu, tokens.shape[0])  # one host copy, reused by every layer
    out = enc.forward_packed(tokens, cu, info.max_seqlen, packed_info=info, output_hidden_states=False,
                             return_dict=True).last_hidden_state
    if index is None:
        return out.view(r, length, h)
    return out.new_zeros(r * length, h).index_copy(0, index, out).view(r, length, h)


class _Groups:
    """Candidates grouped by length (host side, once per batch): equal-length candidates attend as one batch."""

    def __init__(self, batch, device: torch.device):
        starts, lens = batch.cls_index.tolist(), batch.seq_lens.tolist()
        by_len: dict[int, list[int]] = defaultdict(list)
        for s, n in zip(starts, lens):
            by_len[n].append(s)
        total = int(batch.input_ids.numel())
        self.groups: list[tuple[int, int, object]] = []  # (length, count, slice start or index tensor)
        order = []
        for n, ss in sorted(by_len.items()):
            idx = torch.tensor(ss)[:, None] + torch.arange(n)
            order.append(idx.flatten())
            self.groups.append((n, len(ss), ss[0] if len(ss) == 1 else idx.flatten().to(device)))
        order = torch.cat(order)
        # concatenated group outputs -> flat layout; positions no candidate owns read an appended zero row
        inv = torch.full((total,), order.numel(), dtype=torch.long)
        inv[order] = torch.arange(order.numel())
        self.identity = order.numel() == total and torch.equal(order, torch.arange(total))
        self.inverse = inv.to(device)


def _attention(attn, x: torch.Tensor, rel: torch.Tensor | None, groups: _Groups, plans) -> torch.Tensor:
    """One layer's disentangled self-attention, per candidate, on the flat (R, L, H) layout."""
    from disentangled_flash._torch import TorchPositionPlan, _torch_disentangled_attention

    r, length, hid = x.shape
    heads, d = attn.num_attention_heads, attn.attention_head_size
    # (R, L, H) inputs: routed LoRA layers recognise the batch's tokens by that shape
    q, k, v = (p(x).reshape(r * length, heads, d) for p in (attn.query_proj, attn.key_proj, attn.value_proj))
    c2p = attn.relative_attention and "c2p" in attn.pos_att_type
    p2c = attn.relative_attention and "p2c" in attn.pos_att_type
    pos_key = pos_query = None
    if c2p or p2c:  # the whole (1, 2 * span) table once per layer, as HF does (and as routing expects)
        relative = attn.pos_dropout(rel[: 2 * attn.pos_ebd_size]).unsqueeze(0)
        if c2p:
            pos_key = attn.transpose_for_scores((attn.key_proj if attn.share_att_key else attn.pos_key_proj)(
                relative), heads)
        if p2c:
            pos_query = attn.transpose_for_scores((attn.query_proj if attn.share_att_key else attn.pos_query_proj)(
                relative), heads)
    # as HF: the scale counts the configured terms even when relative_attention is off
    scale = math.sqrt(d * (1 + sum(t in attn.pos_att_type for t in ("c2p", "p2c"))))
    pieces = []
    for (n, count, where), plan in zip(groups.groups, plans):
        if isinstance(where, int):
            qg, kg, vg = (t[where:where + n].unsqueeze(0) for t in (q, k, v))
        else:
            qg, kg, vg = (t.index_select(0, where).view(count, n, heads, d) for t in (q, k, v))
        slots = plan.active_slots
        tp = TorchPositionPlan(n, slots, plan.pair_to_local, plan.pair_to_local,
                               None if pos_key is None else pos_key.index_select(1, slots),
                               None if pos_query is None else pos_query.index_select(1, slots))
        out = _torch_disentangled_attention(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2), tp, None,
                                            scale=scale, num_heads=heads, all_head_size=hid, assume_unpadded=True,
                                            dropout=attn.dropout)
        pieces.append(out.reshape(count * n, hid))
    if groups.identity:
        return torch.cat(pieces).view(r, length, hid) if len(pieces) > 1 else pieces[0].view(r, length, hid)
    pieces.append(x.new_zeros(1, hid))
    return torch.cat(pieces).index_select(0, groups.inverse).view(r, length, hid)


def _layer(layer, x, rel, groups, plans):
    ctx = _attention(layer.attention.self, x, rel, groups, plans)
    attention_output = layer.attention.output(ctx, x)
    return layer.output(layer.intermediate(attention_output), attention_output)


def _encode_torch(enc, hidden: torch.Tensor, batch) -> torch.Tensor:
    groups = _Groups(batch, hidden.device)
    plans = [enc.position_plan_cache.dense(n, hidden.device) for n, _, _ in groups.groups]  # cached per length
    rel = enc.get_rel_embedding()
    x = hidden
    for layer in enc.layer:
        if enc.gradient_checkpointing and enc.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint
            x = checkpoint(_layer, layer, x, rel, groups, plans, use_reentrant=False)
        else:
            x = _layer(layer, x, rel, groups, plans)
    return x
