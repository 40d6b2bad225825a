"""Shared-prefix layout: one candidate set = one state encoded once + every candidate after it.

A cross-encoder repeats the state text for each candidate: an ALFWorld decision over ~30 admissible
actions with a 200-token state costs ~30 x 210 tokens. Here a set is one row

    [CLS] state [SEP] | [CLS] action_1 [SEP] | [CLS] action_2 [SEP] | ...

with an attention mask under which state tokens attend to the state only and the tokens of candidate
k attend to the state and to candidate k (never to another candidate). Every candidate therefore sees
exactly what it would see in its own (state, action) pair -- the state's encoding just no longer depends
on the action -- and the set costs ~200 + 30 x 10 tokens. Candidate k's positions continue after the
state (as in a pair), its token type is 1, and the score head reads its first token.

Not the paper's layout (its cross-encoder lets state tokens see the action too), so it is a model option
(`Reranker(layout="shared_prefix")`, saved with the checkpoint); BERT-family encoders only (absolute
positions: DeBERTa's relative positions would measure a candidate's distance to the state through the
candidates before it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from fastrank.data.record import CandidateSet
from fastrank.packing import ENV_IDS, PackedBatch


@dataclass
class PrefixEncodedSet:
    """Token ids of one set in the shared-prefix layout (state once, then each candidate)."""

    index: int
    state_ids: list[int]
    cand_ids: list[list[int]]
    expert_index: int
    env_id: int

    @property
    def n_tokens(self) -> int:
        return len(self.state_ids) + sum(len(c) for c in self.cand_ids)

    @property
    def n_candidates(self) -> int:
        return len(self.cand_ids)


def _ids(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """[CLS] text [SEP] for each text, truncated on the right to `max_tokens` in all."""
    enc = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_tokens)
    return [list(x) for x in enc["input_ids"]]


def encode_prefix_sets(sets: Sequence[CandidateSet], tokenizer, featurizer, max_state_tokens: int = 256,
                       max_action_tokens: int = 32) -> list[PrefixEncodedSet]:
    """Tokenize each set's state once and each candidate once (batched fast-tokenizer calls).

    The state is truncated on the right to `max_state_tokens`: with the ``history`` feature mode that
    drops the oldest history first (see `fastrank.data.history`).
    """
    states, actions = [], []
    for cs in sets:
        state, acts = featurizer.texts(cs.goal, cs.observation, list(cs.candidates), getattr(cs, "history", None))
        states.append(state)
        actions.extend(acts)
    state_ids = _ids(tokenizer, states, max_state_tokens) if states else []
    action_ids = _ids(tokenizer, actions, max_action_tokens) if actions else []
    out, pos = [], 0
    for k, cs in enumerate(sets):
        n = len(cs.candidates)
        out.append(PrefixEncodedSet(index=k, state_ids=state_ids[k], cand_ids=action_ids[pos:pos + n],
                                    expert_index=cs.expert_index, env_id=ENV_IDS[cs.env]))
        pos += n
    return out


class PrefixCollator:
    """`PrefixEncodedSet`s -> a `PackedBatch` with ``prefix=True``: one set per row, padded to the longest.

    segment_ids: 0 = padding, 1 = the state, k + 2 = candidate k of the row's set. The encoder builds the
    attention mask from them (`prefix_attention_mask`).
    """

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[PrefixEncodedSet]) -> PackedBatch:
        width = max((it.n_tokens for it in items), default=1)
        if self.pad_to_multiple_of:
            width = int(math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        r = len(items)
        ids = torch.full((r, width), self.pad_token_id, dtype=torch.long)
        pos = torch.zeros((r, width), dtype=torch.long)
        seg = torch.zeros((r, width), dtype=torch.long)
        tt = torch.zeros((r, width), dtype=torch.long)
        cls, lens, labels, envs, offsets = [], [], [], [], [0]
        for row, it in enumerate(items):
            n_state = len(it.state_ids)
            ids[row, :n_state] = torch.tensor(it.state_ids)
            pos[row, :n_state] = torch.arange(n_state)
            seg[row, :n_state] = 1
            col = n_state
            for k, c in enumerate(it.cand_ids):
                ids[row, col:col + len(c)] = torch.tensor(c)
                pos[row, col:col + len(c)] = torch.arange(n_state, n_state + len(c))
                seg[row, col:col + len(c)] = k + 2
                tt[row, col:col + len(c)] = 1
                cls.append(row * width + col)
                lens.append(len(c))
                col += len(c)
            labels += [1.0 if k == it.expert_index else 0.0 for k in range(it.n_candidates)]
            envs += [it.env_id] * it.n_candidates
            offsets.append(offsets[-1] + it.n_candidates)
        return PackedBatch(
            input_ids=ids, position_ids=pos, segment_ids=seg, token_type_ids=tt,
            cls_index=torch.tensor(cls, dtype=torch.long), seq_lens=torch.tensor(lens, dtype=torch.long),
            group_offsets=torch.tensor(offsets, dtype=torch.int32), labels=torch.tensor(labels),
            env_ids=torch.tensor(envs, dtype=torch.long),
            set_index=torch.tensor([it.index for it in items], dtype=torch.long),
            n_tokens=sum(it.n_tokens for it in items), n_candidates=len(cls), max_seq_len=max(lens, default=0),
            packed=True, prefix=True)


def prefix_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(R, L, L) bool: query q may read key k when k is a state token, or q and k are one candidate.

    Padding queries read the state (any non-empty row of keys avoids NaN softmax rows; their outputs are
    never read).
    """
    q, k = segment_ids[:, :, None], segment_ids[:, None, :]
    return (k == 1) | ((q == k) & (k > 1))
