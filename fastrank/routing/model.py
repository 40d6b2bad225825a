r"""`RoutedReranker`: a `Reranker` with environment-aware, router-mixed LoRA adapters (paper §5.6).

The encoder keeps all its weights trainable (the paper found LoRA-only fine-tuning far worse); LoRA adapters add
capacity on top. Four adapter groups, ``ADAPTERS = ("alfworld", "scienceworld", "webshop", "shared")`` (r = 8,
alpha = 16), sit on the attention projections (peft's default targets for the family: BERT/MiniLM ``query``/``value``,
DeBERTa-v2/v3 ``query_proj``/``value_proj``). A router (2-layer MLP: Linear(H, 128) -> GELU -> Linear(128, 4) ->
softmax) predicts per-candidate mixing weights from the mean-pooled *embedding-layer output* of that candidate's
own tokens -- from the input, never from ``env_ids``. Every adapted linear layer computes

    y = W x + b + sum_k w_k(candidate of the token) * (alpha / r) * B_k A_k x

Built with peft, with a custom forward. peft's multi-adapter LoRA can only *sum* active adapters, or pick one
adapter per sample (``adapter_names``); neither mixes adapters with per-input weights, and a packed batch has no
"sample" axis (all candidates share one row). So the adapters are created by ``peft.inject_adapter_in_model``
(four calls, one per adapter name) with ``LoraConfig._register_custom_module({nn.Linear: RoutedLoraLinear})``:
peft owns creation, initialisation, naming (``...query.lora_A.<adapter>.weight``) and the state-dict layout;
`RoutedLoraLinear` (a subclass of peft's ``lora.Linear``) only replaces ``forward``: the four A matrices are
concatenated into one (4r, in) GEMM, the (tokens, 4r) activations are scaled by the token's routing weight x
scaling (repeated r times), and one (out, 4r) GEMM with the concatenated B matrices adds the mix (2 GEMMs
instead of 8; with lora_dropout > 0 the A side runs per adapter). Not mergeable into W (weights vary per input).

Per-candidate routing in packed batches: candidate n owns flat tokens ``cls_index[n] .. cls_index[n] +
seq_lens[n] - 1`` in both layouts (packed rows and padded rows), so a forward hook on ``encoder.embeddings``
mean-pools each candidate's own embedding outputs (no padding, no neighbours), runs the router, and broadcasts
the (N, 4) weights to a (R, L, 4) per-token tensor that the LoRA layers read (row padding gets weight 0). A
candidate's weights therefore do not depend on what else is in the batch: packed == padded == `rank()`.
A LoRA layer that sees an input that is not the batch's token layout -- DeBERTa's relative-position embeddings
go through ``query_proj``/``key_proj`` once per batch -- uses the *shared* adapter only (batch-independent).

B init: peft initialises B = 0. With B = 0 and LoRA frozen (router warm-up), every adapter outputs exactly 0,
so the router's gradient is exactly 0 and a "router warm-up" would train nothing in the router. B is therefore
drawn from N(0, ``lora_b_init_std``^2) (default 1e-3: a ~0.3 % perturbation of the projections, enough for the
router to get a gradient; Adam normalises its size). ``lora_b_init_std=0`` gives peft's B = 0.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastrank.data.features import Featurizer
from fastrank.data.record import ENVS
from fastrank.model import META_NAME, Reranker  # imports transformers safely first
from fastrank.packing import PackedBatch

ADAPTERS = (*ENVS, "shared")
SHARED = len(ENVS)  # index of the shared adapter


# ------------------------------------------------------------------------------------------- config
@dataclass
class RoutingConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: peft's default for the encoder family
    router_hidden: int = 128
    b_init_std: float = 1e-3  # 0: peft's B = 0 (then a LoRA-frozen warm-up gives the router no gradient)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_train_config(cls, cfg) -> "RoutingConfig":
        return cls(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                   target_modules=cfg.lora_target_modules, router_hidden=cfg.router_hidden,
                   b_init_std=cfg.lora_b_init_std)


class _RoutingContext:
    """Shared by the router hook and every RoutedLoraLinear of one model (not a Module: not in the state dict)."""

    def __init__(self):
        self.token_weights: torch.Tensor | None = None  # (R, L, K) while an encode() is running
        self.plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # tok_idx, cand_of_tok, seq_lens
        self.forced: torch.Tensor | None = None  # (K,) or (N, K) override of the router output
        self.last: torch.Tensor | None = None  # (N, K) weights of the last forward (with grad)
        self.stop_after_routing = False  # routing_weights(): abort the forward once the weights exist


class _RoutingDone(Exception):
    pass



# ------------------------------------------------------------------------------------------ LoRA layer
def _lora_linear_cls():
    # peft imports bitsandbytes, whose CPU backend warns on every run that an optional hub kernel for 4-bit
    # GEMMs is missing; routing uses no 4-bit layers, so that warning is noise here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    class RoutedLoraLinear(PeftLoraLinear):
        """peft ``lora.Linear`` whose adapters are mixed per token by the router's weights (see module doc)."""

        _fastrank_ctx: _RoutingContext | None = None

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            ctx = self._fastrank_ctx
            if ctx is None or self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
                raise RuntimeError("RoutedLoraLinear runs only inside RoutedReranker.encode (no merge, no "
                                   "disable_adapters, no adapter_names)")
            result = self.base_layer(x, *args, **kwargs)
            out_dtype = result.dtype
            names = ADAPTERS
            a0 = self.lora_A[names[0]].weight
            xd = self._cast_input_dtype(x, a0.dtype)
            tw = ctx.token_weights
            if tw is None or tuple(x.shape[:-1]) != tuple(tw.shape[:-1]):
                s = names[SHARED]  # not the batch's tokens (DeBERTa relative-position embeddings): shared adapter
                delta = self.lora_B[s](self.lora_A[s](self.lora_dropout[s](xd))) * self.scaling[s]
                return (result + delta).to(out_dtype)
            if all(isinstance(self.lora_dropout[n], nn.Identity) for n in names):
                h = F.linear(xd, torch.cat([self.lora_A[n].weight for n in names]))  # (..., sum r)
            else:
                h = torch.cat([self.lora_A[n](self.lora_dropout[n](xd)) for n in names], dim=-1)
            ranks, scales = [self.r[n] for n in names], [self.scaling[n] for n in names]
            if len(set(ranks)) == 1 and len(set(scales)) == 1:  # the usual case: no per-call host->device tensors
                coef = torch.repeat_interleave(tw.to(h.dtype) * scales[0], ranks[0], dim=-1)
            else:
                scale = torch.tensor(scales, dtype=h.dtype, device=x.device)
                coef = torch.repeat_interleave(tw.to(h.dtype) * scale, torch.tensor(ranks, device=x.device), dim=-1,
                                               output_size=h.shape[-1])
            delta = F.linear(h * coef, torch.cat([self.lora_B[n].weight for n in names], dim=1))
            return (result + delta).to(out_dtype)

        def __repr__(self) -> str:
            return "routed_" + super().__repr__()

    return RoutedLoraLinear


_ROUTED_CLS = None


def routed_lora_linear_class():
    """The `RoutedLoraLinear` class (built on first use: peft is imported only when routing is used)."""
    global _ROUTED_CLS
    if _ROUTED_CLS is None:
        _ROUTED_CLS = _lora_linear_cls()
    return _ROUTED_CLS


def inject_routed_lora(encoder: nn.Module, rc: RoutingConfig, ctx: _RoutingContext) -> list[nn.Module]:
    """Add the four adapters to ``encoder`` in place (peft), keep every encoder weight trainable; returns the layers."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    targets = rc.target_modules or DEFAULT_TARGETS.get(encoder.config.model_type)
    if not targets:
        raise ValueError(f"no default LoRA target modules for {encoder.config.model_type!r}; set lora_target_modules")
    cls = routed_lora_linear_class()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*peft_config.*")  # "multiple adapters": intended
        for name in ADAPTERS:
            lc = LoraConfig(r=rc.r, lora_alpha=rc.alpha, lora_dropout=rc.dropout, target_modules=list(targets),
                            bias="none")
            lc._register_custom_module({nn.Linear: cls})
            inject_adapter_in_model(lc, encoder, adapter_name=name)
    if hasattr(encoder, "peft_config"):
        del encoder.peft_config  # the encoder stays a plain transformers model; fastrank.json holds the settings
    layers = [m for m in encoder.modules() if isinstance(m, cls)]
    if not layers:
        raise ValueError(f"no linear layer of {encoder.config.model_type!r} matched LoRA targets {targets}")
    for m in layers:
        m._fastrank_ctx = ctx
        if rc.b_init_std > 0:
            for n in ADAPTERS:
                nn.init.normal_(m.lora_B[n].weight, std=rc.b_init_std)
    for p in encoder.parameters():  # peft froze the base weights: the encoder is trained fully
        p.requires_grad_(True)
    return layers


# ---------------------------------------------------------------------------------------------- router
class Router(nn.Module):
    """2-layer MLP: pooled embedding (N, H) -> Linear(H, hidden) -> GELU -> Linear(hidden, K) -> softmax."""

    def __init__(self, in_features: int, hidden: int = 128, num_adapters: int = len(ADAPTERS), std: float = 0.02):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(in_features, hidden), nn.Linear(hidden, num_adapters)
        for lin in (self.fc1, self.fc2):
            nn.init.normal_(lin.weight, std=std if lin is self.fc2 else 1.0 / math.sqrt(in_features))
            nn.init.zeros_(lin.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        with torch.autocast(pooled.device.type, enabled=False):  # fp32 softmax under bf16 autocast
            x = pooled.float()
            h = F.gelu(F.linear(x, self.fc1.weight.float(), self.fc1.bias.float()))
            return torch.softmax(F.linear(h, self.fc2.weight.float(), self.fc2.bias.float()), dim=-1)


def _token_plan(batch: PackedBatch):
    """Flat token indices of every candidate's tokens and the candidate each belongs to (both layouts)."""
    lens = batch.seq_lens
    n = lens.numel()
    total = batch.n_tokens
    cand = torch.repeat_interleave(torch.arange(n, device=lens.device), lens, output_size=total)
    starts = torch.cumsum(lens, 0) - lens
    within = torch.arange(total, device=lens.device) - starts[cand]
    return batch.cls_index[cand] + within, cand, lens


def _is_lora_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


class RoutedReranker(Reranker):
    """`Reranker` + four router-mixed LoRA adapter groups on the encoder (see the module docstring)."""

    def __init__(self, encoder: nn.Module, tokenizer, featurizer: Featurizer | None = None, *,
                 routing: RoutingConfig | dict | None = None, **kw):
        super().__init__(encoder, tokenizer, featurizer, **kw)
        self.routing = routing if isinstance(routing, RoutingConfig) else RoutingConfig(**(routing or {}))
        if getattr(self.encoder, "embeddings", None) is None:
            raise ValueError(f"{type(self.encoder).__name__} has no .embeddings module to route from")
        self._ctx = _RoutingContext()
        inject_routed_lora(self.encoder, self.routing, self._ctx)
        self.router = Router(self.encoder.config.hidden_size, self.routing.router_hidden)
        self.encoder.embeddings.register_forward_hook(self._route_hook)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_reranker(cls, base: Reranker, routing: RoutingConfig | dict | None = None) -> "RoutedReranker":
        """Wrap a plain reranker (e.g. a trained joint3 checkpoint): its encoder and heads are kept as they are."""
        if base.layout != "pairs":  # the router reads one first token per candidate row
            raise ValueError(f"routing needs layout='pairs'; this reranker uses layout={base.layout!r}")
        model = cls(base.encoder, base.tokenizer, base.featurizer, routing=routing, max_length=base.max_length,
                    row_len=base.row_len, aux_heads=base.aux_head_sizes,
                    packed_attention="varlen" if base.varlen else "mask",
                    head_pooler=base.pooler is not None)
        model.head.load_state_dict(base.head.state_dict())
        if base.pooler is not None:  # an imported cross-encoder's trained pooler is part of its head
            model.pooler.load_state_dict(base.pooler.state_dict())
        model.aux_heads.load_state_dict(base.aux_heads.state_dict())
        return model.to(base.device)

    @classmethod
    def from_encoder(cls, name_or_path: str, *, routing: RoutingConfig | dict | None = None, **kw
                     ) -> "RoutedReranker":
        return cls.from_reranker(Reranker.from_encoder(name_or_path, **kw), routing)

    def meta(self) -> dict:
        return {**super().meta(), "routing": {**self.routing.to_dict(), "adapters": list(ADAPTERS)}}

    @classmethod
    def _init_kwargs(cls, meta: dict, src: Path) -> dict:
        if "routing" not in meta:
            raise ValueError(f"{src} holds a plain Reranker (no 'routing' in {META_NAME}); "
                             f"load it with Reranker.from_pretrained")
        if tuple(meta["routing"].get("adapters", ADAPTERS)) != ADAPTERS:
            raise ValueError(f"{src}: adapters {meta['routing']['adapters']} != {list(ADAPTERS)}")
        routing = {k: v for k, v in meta["routing"].items() if k != "adapters"}
        return {**super()._init_kwargs(meta, src), "routing": routing}

    # ------------------------------------------------------------------------------------- parameters
    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if _is_lora_name(n)]

    def non_lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not _is_lora_name(n)]

    def set_lora_trainable(self, flag: bool) -> None:
        for p in self.lora_parameters():
            p.requires_grad_(flag)

    # ----------------------------------------------------------------------------------------- forward
    def _route_hook(self, module, args, output):
        ctx = self._ctx
        if ctx.plan is None:
            raise RuntimeError("encoder.embeddings ran outside RoutedReranker.encode: no routing plan")
        emb = output[0] if isinstance(output, (tuple, list)) else output  # (R, L, H)
        tok_idx, cand, lens = ctx.plan
        n, k = lens.numel(), len(ADAPTERS)
        flat = emb.reshape(-1, emb.shape[-1]).index_select(0, tok_idx).float()
        pooled = torch.zeros(n, flat.shape[-1], dtype=flat.dtype, device=flat.device).index_add(0, cand, flat)
        pooled = pooled / lens.to(flat.dtype)[:, None]
        w = self.router(pooled)  # (N, K) fp32
        if ctx.forced is not None:
            w = ctx.forced.to(w).expand(n, k)
        ctx.last = w
        tw = torch.zeros(emb.shape[0] * emb.shape[1], k, dtype=w.dtype, device=w.device)
        ctx.token_weights = tw.index_copy(0, tok_idx, w.index_select(0, cand)).view(emb.shape[0], emb.shape[1], k)
        if ctx.stop_after_routing:
            raise _RoutingDone
        return None

    def _rel_embedding_shape(self) -> tuple[int, int] | None:
        """DeBERTa: the (1, 2 * att_span) leading shape of the relative embeddings that query_proj/key_proj see."""
        cfg = self.encoder.config
        if self.packing != "deberta-v2" or not getattr(cfg, "relative_attention", False):
            return None
        span = getattr(cfg, "max_relative_positions", -1)
        span = cfg.max_position_embeddings if span < 1 else span
        buckets = getattr(cfg, "position_buckets", -1)
        return 1, 2 * (buckets if buckets > 0 else span)

    def encode(self, batch: PackedBatch) -> torch.Tensor:
        if tuple(batch.input_ids.shape) == self._rel_embedding_shape():
            # the LoRA layers tell tokens from DeBERTa's relative embeddings by shape: widen the single row by one
            # padding column (masked out; with one row, cls_index = start is unchanged)
            pad = lambda t: torch.nn.functional.pad(t, (0, 1))  # noqa: E731
            batch = dataclasses.replace(
                batch, input_ids=pad(batch.input_ids), position_ids=pad(batch.position_ids),
                segment_ids=pad(batch.segment_ids),
                token_type_ids=None if batch.token_type_ids is None else pad(batch.token_type_ids))
        ctx = self._ctx
        ctx.plan, ctx.token_weights = _token_plan(batch), None
        try:
            return super().encode(batch)
        finally:
            ctx.plan, ctx.token_weights = None, None

    @property
    def last_routing(self) -> torch.Tensor | None:
        """(N, K) routing weights of the last forward pass (attached to the graph)."""
        return self._ctx.last

    def routing_weights(self, batch: PackedBatch) -> torch.Tensor:
        """(N, K) routing weights for a batch: the exact encode() path, stopped right after the embedding layer."""
        self._ctx.stop_after_routing = True
        try:
            self.encode(batch)
        except _RoutingDone:
            return self._ctx.last
        finally:
            self._ctx.stop_after_routing = False
        raise RuntimeError("the embedding layer never ran")

    @contextlib.contextmanager
    def force_routing(self, weights: torch.Tensor | Sequence[float]):
        """Replace the router's output by fixed weights, (K,) for every candidate or (N, K) (tests, ablations)."""
        old = self._ctx.forced
        self._ctx.forced = torch.as_tensor(weights, dtype=torch.float32)
        try:
            yield self
        finally:
            self._ctx.forced = old




def routing_enabled(cfg) -> bool:
    return bool(getattr(cfg, "routing", False)) or getattr(cfg, "grad_projection", "none") != "none"


def build_model(cfg) -> Reranker:
    """The model for a TrainConfig with ``routing``: fresh from ``cfg.model``, or wrapping / reloading ``init_from``."""
    rc = RoutingConfig.from_train_config(cfg)
    if cfg.init_from:
        base = Reranker.from_pretrained(cfg.init_from)
        if isinstance(base, RoutedReranker):
            if base.routing != rc:
                warnings.warn(f"init_from {cfg.init_from} keeps its own routing settings {base.routing} "
                              f"(config asked for {rc})", stacklevel=2)
            return base
        return RoutedReranker.from_reranker(base, rc)
    return RoutedReranker.from_encoder(cfg.model, routing=rc, featurizer=Featurizer(cfg.feature_mode),
                                       max_length=cfg.max_length)

