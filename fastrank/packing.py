"""Token-budget batching of candidate sets, and the packed / padded collators that feed the `Reranker`.

Pipeline::

    enc = encode_sets(sets, tokenizer, featurizer)          # tokenize every candidate once
    sampler = TokenBudgetBatchSampler([e.n_tokens for e in enc], max_tokens=16384, seed=0)
    loader = DataLoader(enc, batch_sampler=sampler, collate_fn=PackedCollator(pad_token_id=0))
    for epoch in ...: sampler.set_epoch(epoch); for batch in loader: scores = model(batch.to(dev))

A batch is a flat list of N candidates from G whole candidate sets: candidate set g owns
``scores[group_offsets[g]:group_offsets[g+1]]`` in its original candidate order.

**Packed layout** (`PackedCollator`): the candidate sequences are bin-packed (first-fit decreasing, then
balanced over that many rows) into rows of at most `row_len` tokens; rows are padded only to the longest
row. `row_len=None` puts the whole batch in one row (no padding at all). Every token carries a
`segment_ids` value (1, 2, ... for the candidates of its row, 0 for row padding) and a `position_ids`
value that restarts at 0 for each candidate. The model turns `segment_ids` into a block-diagonal attention
mask, so a candidate attends only to its own tokens and the result is the same as encoding it alone
(up to float rounding): exact for absolute-position encoders that accept `position_ids` (BERT family) and
for relative-position DeBERTa-v2/v3 (shift-invariant). `cls_index` is the flat index (row * L + start) of
each candidate's first token, read by the head.

**Padded layout** (`PaddedCollator`): one row per candidate, padded to the longest candidate of the batch
or to a fixed `pad_to`; `segment_ids` is then the ordinary 0/1 attention mask.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from fastrank.data.record import ENVS, CandidateSet

ENV_IDS = {e: i for i, e in enumerate(ENVS)}


# --------------------------------------------------------------------------------------------- encoding
@dataclass
class EncodedSet:
    """One candidate set, tokenized: one token-id list per candidate (and token types when the tokenizer has them)."""

    index: int  # position in the list given to `encode_sets`; becomes `PackedBatch.set_index`
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    expert_index: int
    env_id: int

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)

    @property
    def n_candidates(self) -> int:
        return len(self.input_ids)


_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


def tokenize_pairs(pairs: Sequence[tuple[str, str]], tokenizer, max_length: int = 256
                   ) -> tuple[list[list[int]], list[list[int]] | None]:
    """Tokenize (state, action+features) pairs in one fast-tokenizer call; only the state is truncated.

    A pair whose second part alone does not fit `max_length` (an absurdly long action) cannot be cut
    with ``only_first``; it falls back to ``longest_first`` for that pair (warned once).
    """
    if not pairs:
        return [], None
    first = [p[0] for p in pairs]
    second = [p[1] for p in pairs]
    kw = dict(truncation="only_first", max_length=max_length, padding=False, return_attention_mask=False)
    try:
        out = tokenizer(first, second, **kw)
        ids, tts = out["input_ids"], out.get("token_type_ids")
    except Exception:  # tokenizers raises a bare Exception ("Truncation error: ...") for the whole batch
        ids, tts = [], []
        for a, b in pairs:
            try:
                o = tokenizer(a, b, **kw)
            except Exception:
                _warn_once("longest_first", "an action+features text is longer than max_length on its own; "
                                            "truncating it too (longest_first) for such pairs")
                o = tokenizer(a, b, **{**kw, "truncation": "longest_first"})
            ids.append(o["input_ids"])
            tts.append(o.get("token_type_ids"))
        if any(t is None for t in tts):
            tts = None
    return [list(x) for x in ids], (None if tts is None else [list(x) for x in tts])


def encode_sets(sets: Sequence[CandidateSet], tokenizer, featurizer, max_length: int = 256, *,
                chunk_size: int = 4096, progress: bool | None = None) -> list[EncodedSet]:
    """Tokenize every candidate of every set once (batched fast-tokenizer calls of `chunk_size` pairs).

    Returns one `EncodedSet` per input set, in order (``EncodedSet.input_ids`` is the per-set list of
    token-id lists). `progress=None` shows a tqdm bar when there are more than 20,000 candidates.
    """
    pairs: list[tuple[str, str]] = []
    for cs in sets:
        pairs.extend(featurizer.pairs(cs.goal, cs.observation, cs.candidates, getattr(cs, "history", None)))
    if progress is None:
        progress = len(pairs) > 20_000
    ids: list[list[int]] = []
    tts: list[list[int]] | None = []
    starts = range(0, len(pairs), chunk_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="tokenizing candidates", unit="chunk", total=math.ceil(len(pairs) / chunk_size))
    for s in starts:
        i, t = tokenize_pairs(pairs[s:s + chunk_size], tokenizer, max_length)
        ids.extend(i)
        if t is None:
            tts = None
        elif tts is not None:
            tts.extend(t)
    out, pos = [], 0
    for k, cs in enumerate(sets):
        n = len(cs.candidates)
        out.append(EncodedSet(index=k, input_ids=ids[pos:pos + n],
                              token_type_ids=None if tts is None else tts[pos:pos + n],
                              expert_index=cs.expert_index, env_id=ENV_IDS[cs.env]))
        pos += n
    return out


# ---------------------------------------------------------------------------------------------- sampler
class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches of whole candidate sets whose total token count fits `max_tokens`.

    Each epoch: the set order is a permutation seeded by ``seed + epoch`` (or the identity when
    `shuffle=False`), then sets are added greedily to the current batch until the next one would exceed
    the budget. A set that is longer than the budget on its own gets a batch of its own (warned once).

    Distributed use (`num_replicas` > 1, default: the torch.distributed world when initialized): every
    rank builds the same global batch list (same seed and epoch) and takes every `num_replicas`-th batch
    starting at `rank`, so the shards are disjoint and cover every set. To give every rank the same number
    of batches, the list is first made divisible by `num_replicas`:
      - `drop_last=False` (default): split the batches holding the most sets in two (each half still fits
        the budget) until the count divides; only if no batch has two sets left to split, repeat batches
        from the start of the list (as DistributedSampler pads), so a few sets are seen twice.
      - `drop_last=True`: drop the epoch's final, partially filled greedy batch, then the trailing batches
        that do not divide evenly.
    The number of batches can differ slightly between epochs (`len()` reports the current epoch's).
    """

    def __init__(self, set_lengths: Sequence[int], max_tokens: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, *, num_replicas: int | None = None, rank: int | None = None):
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if num_replicas is None or rank is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (
                torch.distributed.get_world_size() if dist else 1)
            rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        self.set_lengths = [int(x) for x in set_lengths]
        self.max_tokens = int(max_tokens)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None
        n_over = sum(x > self.max_tokens for x in self.set_lengths)
        if n_over:
            warnings.warn(f"{n_over} candidate set(s) exceed max_tokens={self.max_tokens} (longest "
                          f"{max(self.set_lengths)}); each gets a batch of its own", stacklevel=2)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """The batch list shared by all ranks for `epoch` (default: the current one), before sharding."""
        epoch = self.epoch if epoch is None else int(epoch)
        n = len(self.set_lengths)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        batches: list[list[int]] = []
        cur: list[int] = []
        cur_tok = 0
        for i in order:
            length = self.set_lengths[i]
            if cur and cur_tok + length > self.max_tokens:  # (an oversize set also closes the open batch)
                batches.append(cur)
                cur, cur_tok = [], 0
            cur.append(i)
            cur_tok += length
            if length > self.max_tokens:  # alone in its batch
                batches.append(cur)
                cur, cur_tok = [], 0
        if cur and not self.drop_last:
            batches.append(cur)
        r = self.num_replicas
        if r > 1 and len(batches) % r:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % r]
            else:
                batches = self._split_to_multiple(batches, r)
        return batches

    def _split_to_multiple(self, batches: list[list[int]], r: int) -> list[list[int]]:
        while len(batches) % r:
            k = max(range(len(batches)), key=lambda j: (len(batches[j]), -j))
            if len(batches[k]) < 2:
                break
            b = batches[k]
            batches[k:k + 1] = [b[: len(b) // 2], b[len(b) // 2:]]
        if len(batches) % r:  # nothing left to split: pad by repeating, as DistributedSampler does
            pad = r - len(batches) % r
            batches = batches + [list(batches[j % len(batches)]) for j in range(pad)]
        return batches

    def _shard(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self.global_batches()[self.rank::self.num_replicas])
        return self._cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(b) for b in self._shard()])

    def __len__(self) -> int:
        return len(self._shard())


# ---------------------------------------------------------------------------------------------- batches
@dataclass
class PackedBatch:
    """A batch of N candidates from G sets, laid out in R rows of L tokens (packed or padded).

    input_ids, position_ids, segment_ids, token_type_ids: (R, L). segment_ids: 0 = padding, k > 0 = the
    k-th candidate of the row (a padded batch has exactly one segment per row, so it is the attention mask).
    cls_index (N,): flat index into the (R*L) tokens of each candidate's first token, in candidate order;
    seq_lens (N,): each candidate's token count (its tokens are flat indices cls_index .. cls_index+len-1).
    group_offsets (G+1,) int32; labels (N,) float 0/1 (1 = expert); env_ids (N,) int64 (index into ENVS);
    set_index (G,) int64: `EncodedSet.index` of each set. With ``prefix=True`` (`fastrank.prefix`) a row
    is one set: segment 1 is its state, k + 2 its k-th candidate.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    token_type_ids: torch.Tensor | None
    cls_index: torch.Tensor
    seq_lens: torch.Tensor
    group_offsets: torch.Tensor
    labels: torch.Tensor
    env_ids: torch.Tensor
    set_index: torch.Tensor
    n_tokens: int
    n_candidates: int
    max_seq_len: int
    packed: bool
    prefix: bool = False  # shared-prefix layout (fastrank.prefix): one set per row, state then candidates

    @property
    def attention_mask(self) -> torch.Tensor:
        """(R, L) 0/1 mask of real tokens (the full attention mask for a padded batch)."""
        return (self.segment_ids > 0).long()

    @property
    def n_sets(self) -> int:
        return int(self.group_offsets.numel()) - 1

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.n_tokens / max(1, self.input_ids.numel())

    def _map(self, fn) -> "PackedBatch":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = fn(v) if isinstance(v, torch.Tensor) else v
        return PackedBatch(**kw)

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        return self._map(lambda t: t.pin_memory())


def _flatten(items: Sequence[EncodedSet]):
    seqs, tts, labels, envs, offsets = [], [], [], [], [0]
    has_tt = all(it.token_type_ids is not None for it in items)
    for it in items:
        seqs.extend(it.input_ids)
        if has_tt:
            tts.extend(it.token_type_ids)
        k = it.n_candidates
        labels.extend(1.0 if j == it.expert_index else 0.0 for j in range(k))
        envs.extend([it.env_id] * k)
        offsets.append(offsets[-1] + k)
    return seqs, (tts if has_tt else None), labels, envs, offsets


def _meta(items, labels, envs, offsets) -> dict:
    return dict(group_offsets=torch.tensor(offsets, dtype=torch.int32),
                labels=torch.tensor(labels, dtype=torch.float32),
                env_ids=torch.tensor(envs, dtype=torch.int64),
                set_index=torch.tensor([it.index for it in items], dtype=torch.int64))


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin-pack item indices into bins of `capacity` (longest first; an item over capacity gets its own bin)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for b, f in enumerate(free):
            if n <= f:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(capacity - n)
    return bins


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows for the packed layout: first-fit decreasing gives the number of rows R; the same items are then
    spread over R rows longest-first onto the least-loaded row (LPT), which is used instead when its longest
    row is shorter (rows are padded to the longest one) and still fits `capacity`."""
    ffd = first_fit_decreasing(lengths, capacity)
    width = max(sum(lengths[i] for i in r) for r in ffd)
    n_rows = len(ffd)
    if n_rows < 2:
        return ffd
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    load = [0] * n_rows
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(n_rows), key=lambda k: (load[k], k))
        rows[r].append(i)
        load[r] += lengths[i]
    if max(load) < width and max(load) <= max(capacity, max(lengths)) and all(rows):
        return rows
    return ffd


class PackedCollator:
    """EncodedSets → packed `PackedBatch`: candidates bin-packed into rows of ≤ `row_len` tokens
    (first-fit decreasing, then balanced over the same number of rows: `pack_rows`).

    Rows are padded to the longest row only (rounded up to `pad_to_multiple_of` if given). A candidate
    longer than `row_len` gets a row of its own. `row_len=None`: all candidates in one row (no padding at
    all; for attention that works per candidate, like the BERT-family varlen path).
    """

    def __init__(self, pad_token_id: int = 0, row_len: int | None = 512, pad_to_multiple_of: int | None = None):
        self.pad_token_id, self.pad_to_multiple_of = int(pad_token_id), pad_to_multiple_of
        self.row_len = None if row_len is None else int(row_len)

    def __call__(self, items: Sequence[EncodedSet]) -> PackedBatch:
        seqs, tts, labels, envs, offsets = _flatten(items)
        lengths = [len(s) for s in seqs]
        if self.row_len is None:
            rows = [list(range(len(seqs)))]
        else:
            rows = pack_rows(lengths, self.row_len)
        width = max(sum(lengths[i] for i in row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n_rows = len(rows)
        ids = torch.full((n_rows, width), self.pad_token_id, dtype=torch.long)
        pos = torch.zeros((n_rows, width), dtype=torch.long)
        seg = torch.zeros((n_rows, width), dtype=torch.long)
        tt = torch.zeros((n_rows, width), dtype=torch.long) if tts is not None else None
        cls = torch.empty(len(seqs), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for k, i in enumerate(row, 1):
                n = lengths[i]
                ids[r, start:start + n] = torch.tensor(seqs[i], dtype=torch.long)
                pos[r, start:start + n] = torch.arange(n)
                seg[r, start:start + n] = k
                if tt is not None:
                    tt[r, start:start + n] = torch.tensor(tts[i], dtype=torch.long)
                cls[i] = r * width + start
                start += n
        return PackedBatch(input_ids=ids, position_ids=pos, segment_ids=seg, token_type_ids=tt, cls_index=cls,
                           seq_lens=torch.tensor(lengths, dtype=torch.long), n_tokens=sum(lengths),
                           n_candidates=len(seqs), max_seq_len=max(lengths), packed=True,
                           **_meta(items, labels, envs, offsets))


class PaddedCollator:
    """EncodedSets → padded `PackedBatch`: one row per candidate, padded to the batch's longest candidate
    (or to the fixed width `pad_to`, the classic "pad everything to 256" baseline)."""

    def __init__(self, pad_token_id: int = 0, pad_to: int | None = None):
        self.pad_token_id, self.pad_to = int(pad_token_id), pad_to

    def __call__(self, items: Sequence[EncodedSet]) -> PackedBatch:
        seqs, tts, labels, envs, offsets = _flatten(items)
        lengths = [len(s) for s in seqs]
        width = max(lengths)
        if self.pad_to is not None:
            if width > self.pad_to:
                raise ValueError(f"a candidate has {width} tokens > pad_to={self.pad_to}")
            width = self.pad_to
        n = len(seqs)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        seg = torch.zeros((n, width), dtype=torch.long)
        tt = torch.zeros((n, width), dtype=torch.long) if tts is not None else None
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            seg[i, :len(s)] = 1
            if tt is not None:
                tt[i, :len(s)] = torch.tensor(tts[i], dtype=torch.long)
        pos = torch.arange(width).expand(n, width).clone()
        return PackedBatch(input_ids=ids, position_ids=pos, segment_ids=seg, token_type_ids=tt,
                           cls_index=torch.arange(n, dtype=torch.long) * width,
                           seq_lens=torch.tensor(lengths, dtype=torch.long), n_tokens=sum(lengths),
                           n_candidates=n, max_seq_len=max(lengths), packed=False,
                           **_meta(items, labels, envs, offsets))
