"""Token-budget sampler, packed/padded collators, and exactness of the packed encoder paths.

Exactness: the first-token hidden state (what the head reads) of every candidate from a packed batch must
match encoding that candidate alone (one row, no padding) to 1e-5 in fp32, for the real MiniLM (BERT,
both packed attention paths) and tiny random DeBERTa-v2/v3 and RoBERTa configs.
"""
import random
import warnings

import pytest
import torch

from fastrank.data.features import Featurizer
from fastrank.data.record import ENVS, CandidateSet
from fastrank.model import PRESETS, Reranker
from fastrank.packing import (
    EncodedSet, PackedCollator, PaddedCollator, TokenBudgetBatchSampler, encode_sets, first_fit_decreasing, pack_rows,
)

_KITCHEN = ("You arrive at loc 5. On the countertop 1, you see a apple 1, a bread 1, a butterknife 2, a cellphone 1, "
            "a dishsponge 3, a egg 2, a fork 1, a lettuce 2, a mug 3, a peppershaker 1, a potato 2, a saltshaker 3, "
            "a spatula 1, a spoon 2, and a tomato 1.")
_SCIENCE = ("This room is called the kitchen. In it, you see: the agent, a substance called air, a chair. On the chair "
            "is: nothing. a counter. On the counter is: a bowl (containing a red apple, a banana), a drawer. "
            "a cupboard. "
            "The cupboard door is closed. a freezer. The freezer door is closed. a fridge. The fridge door is closed. "
            "a glass jar (containing a substance called sodium chloride). a lighter. a oven, which is turned off.")


def hand_sets() -> list[CandidateSet]:
    """ALFWorld/ScienceWorld/WebShop-like sets with very different lengths; the last one's state is cut at 256."""
    sets = [
        CandidateSet("alfworld", "e1", 3, "pick_clean_then_place", "put a clean apple in fridge.", _KITCHEN,
                     ["take apple 1 from countertop 1", "go to fridge 1", "take egg 2 from countertop 1",
                      "examine countertop 1", "inventory", "go to sinkbasin 1", "look",
                      "take mug 3 from countertop 1", "go to cabinet 4"],
                     0, ["expert"] + ["admissible"] * 8),
        CandidateSet("alfworld", "e2", 1, "look_at_obj_in_light", "look at alarmclock under the desklamp.",
                     "Nothing happens.", ["go to desk 1", "use desklamp 2", "look"], 1,
                     ["same_task", "expert", "global"]),
        CandidateSet("scienceworld", "s1", 7, "boil", "Your task is to boil water. First, focus on the substance.",
                     _SCIENCE, ["open cupboard", "focus on water", "move pot to stove", "activate stove",
                                "pick up thermometer", "teleport to kitchen"],
                     3, ["other_task", "same_task", "global", "expert", "global", "same_task"]),
        CandidateSet("webshop", "w1", 0, "search", "i need a long lasting 6.76 fl oz bottle of l'eau d'issey, and "
                     "price lower than 100.00 dollars", "[Search]",
                     ["search[l'eau d'issey 6.76 fl oz bottle price < 100.00]", "click[Back to Search]"],
                     0, ["expert", "global"]),
        CandidateSet("scienceworld", "s2", 2, "boil", "Your task is to boil water.", _SCIENCE + " " + _SCIENCE,
                     ["activate stove", "open freezer", "look around", "wait1"],
                     2, ["global", "same_task", "expert", "other_task"]),
    ]
    for s in sets:
        s.validate()
    return sets


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return Reranker.from_encoder("minilm").eval()


@pytest.fixture(scope="module")
def encoded(minilm):
    return encode_sets(hand_sets(), minilm.tokenizer, minilm.featurizer)


# ------------------------------------------------------------------------------------------ encoding
def test_encode_sets_truncates_only_the_state(minilm, encoded):
    tok = minilm.tokenizer
    assert [e.n_candidates for e in encoded] == [9, 3, 6, 2, 4]
    assert [e.index for e in encoded] == list(range(5))
    assert [e.expert_index for e in encoded] == [0, 1, 3, 0, 2]
    assert [e.env_id for e in encoded] == [ENVS.index(s.env) for s in hand_sets()]
    long_set = encoded[4]
    assert long_set.lengths == [256] * 4  # the doubled ScienceWorld observation is cut to max_length
    for j, ids in enumerate(long_set.input_ids):
        text = tok.decode(ids, skip_special_tokens=True)
        action = hand_sets()[4].candidates[j].lower()
        assert f"action : {action}" in text.replace("  ", " ") or f"action: {action}" in text
        assert "features :" in text or "features:" in text  # the action + features part is never cut
        assert long_set.token_type_ids[j][-1] == 1 and long_set.token_type_ids[j][0] == 0
    assert max(max(e.lengths) for e in encoded[:4]) < 256


def test_encode_sets_long_action_falls_back(minilm):
    cs = CandidateSet("alfworld", "e", 0, "t", "goal", "obs", ["go " * 200, "look"], 1, ["global", "expert"])
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        enc = encode_sets([cs], minilm.tokenizer, Featurizer(), max_length=64)
    assert max(enc[0].lengths) <= 64


# ------------------------------------------------------------------------------------------- sampler
def _lengths(n=200, seed=0):
    rng = random.Random(seed)
    return [rng.randint(2, 20) * rng.randint(40, 100) for _ in range(n)]  # <= 2000 tokens per set


@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_budget_cover_and_whole_sets(shuffle):
    lengths = _lengths() + [5000]  # one set longer than the budget
    with pytest.warns(UserWarning, match="exceed max_tokens"):
        s = TokenBudgetBatchSampler(lengths, max_tokens=4000, shuffle=shuffle, seed=3)
    batches = list(s)
    assert len(batches) == len(s)
    seen = [i for b in batches for i in b]
    assert sorted(seen) == list(range(len(lengths)))  # every set exactly once, never split
    for b in batches:
        tokens = sum(lengths[i] for i in b)
        assert tokens <= 4000 or b == [len(lengths) - 1]
    assert [len(lengths) - 1] in batches
    if not shuffle:
        assert seen == sorted(seen)
    # greedy: no batch could have taken the next set in order
    for b, nxt in zip(batches, batches[1:]):
        if len(nxt) and lengths[nxt[0]] <= 4000 and len(b) and lengths[b[0]] <= 4000:
            assert sum(lengths[i] for i in b) + lengths[nxt[0]] > 4000


def test_sampler_deterministic_per_seed_and_epoch():
    lengths = _lengths()
    a = TokenBudgetBatchSampler(lengths, 3000, seed=7)
    b = TokenBudgetBatchSampler(lengths, 3000, seed=7)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(TokenBudgetBatchSampler(lengths, 3000, seed=8)) != list(TokenBudgetBatchSampler(lengths, 3000, seed=7))


@pytest.mark.parametrize("n_sets, replicas", [(200, 2), (200, 3), (37, 4), (3, 4)])
def test_sampler_distributed_shards(n_sets, replicas):
    lengths = _lengths(n_sets, seed=n_sets)
    for epoch in (0, 1):
        shards = []
        for rank in range(replicas):
            s = TokenBudgetBatchSampler(lengths, 3000, seed=1, num_replicas=replicas, rank=rank)
            s.set_epoch(epoch)
            shards.append(list(s))
        assert len({len(sh) for sh in shards}) == 1  # every rank steps the same number of times
        flat = [i for sh in shards for b in sh for i in b]
        assert set(flat) == set(range(n_sets))
        for sh in shards:
            for b in sh:
                assert sum(lengths[i] for i in b) <= 3000
        if n_sets >= replicas:  # enough sets: batches are split, never repeated -> disjoint, exact cover
            assert sorted(flat) == list(range(n_sets))


def test_sampler_drop_last():
    lengths = _lengths(101)
    full = TokenBudgetBatchSampler(lengths, 3000, seed=0).global_batches()
    dropped = TokenBudgetBatchSampler(lengths, 3000, seed=0, drop_last=True).global_batches()
    assert dropped == full[:-1]
    shards = [list(TokenBudgetBatchSampler(lengths, 3000, seed=0, drop_last=True, num_replicas=4, rank=r))
              for r in range(4)]
    assert len({len(s) for s in shards}) == 1
    flat = [i for s in shards for b in s for i in b]
    assert len(flat) == len(set(flat))


def test_first_fit_decreasing():
    lengths = [100, 30, 60, 200, 90, 10, 300]
    rows = first_fit_decreasing(lengths, 256)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    for r in rows:
        assert sum(lengths[i] for i in r) <= 256 or r == [6]
    assert rows == [[6], [3, 1, 5], [0, 4, 2]]  # 300 alone | 200+30+10 | 100+90+60: longest first, first fit
    # balanced rows: same row count as FFD, but the longest row (the padded width) is shorter
    lengths = [167, 166, 165, 165, 164, 164, 146, 146, 145, 145, 143, 143, 143, 140, 140, 96, 80]
    ffd, bal = first_fit_decreasing(lengths, 512), pack_rows(lengths, 512)
    assert len(bal) == len(ffd) and sorted(i for r in bal for i in r) == list(range(len(lengths)))
    width = lambda rows: max(sum(lengths[i] for i in r) for r in rows)  # noqa: E731
    assert width(bal) < width(ffd) and width(bal) <= 512
    assert pack_rows([300, 10], 256) == [[0], [1]]  # nothing to balance: keeps FFD


# ----------------------------------------------------------------------------------------- collators
@pytest.mark.parametrize("row_len", [256, 512, None])
def test_packed_batch_layout(encoded, row_len):
    items = [encoded[i] for i in (2, 0, 3)]  # out of order: set_index must follow
    b = PackedCollator(pad_token_id=0, row_len=row_len)(items)
    assert b.packed and b.n_candidates == 17 and b.n_sets == 3
    assert b.group_offsets.dtype == torch.int32 and b.group_offsets.tolist() == [0, 6, 15, 17]
    assert b.set_index.tolist() == [2, 0, 3]
    expected_labels = [float(j == it.expert_index) for it in items for j in range(it.n_candidates)]
    assert b.labels.tolist() == expected_labels and b.labels.dtype == torch.float32
    assert b.env_ids.dtype == torch.int64
    assert b.env_ids.tolist() == [it.env_id for it in items for _ in range(it.n_candidates)]
    flat, seg, pos = b.input_ids.flatten(), b.segment_ids.flatten(), b.position_ids.flatten()
    tt = b.token_type_ids.flatten()
    seqs = [(s, t) for it in items for s, t in zip(it.input_ids, it.token_type_ids)]
    for n, (ids, tts) in enumerate(seqs):
        c, ln = int(b.cls_index[n]), int(b.seq_lens[n])
        assert ln == len(ids)
        assert flat[c:c + ln].tolist() == ids and tt[c:c + ln].tolist() == tts
        assert flat[c] == 101  # [CLS] heads every segment
        assert pos[c:c + ln].tolist() == list(range(ln))
        assert len(set(seg[c:c + ln].tolist())) == 1 and seg[c] > 0
        assert c // b.input_ids.shape[1] == (c + ln - 1) // b.input_ids.shape[1]  # never wraps rows
    assert int((b.segment_ids > 0).sum()) == b.n_tokens == sum(len(s) for s, _ in seqs)
    if row_len is not None:
        assert b.input_ids.shape[1] <= row_len
    else:
        assert b.input_ids.shape[0] == 1 and b.padding_fraction == 0.0
    padded = PaddedCollator()(items)
    if row_len != 256:  # (rows of 256 hold one ~165-token candidate + small ones: coarse bins can pad more)
        assert b.padding_fraction < padded.padding_fraction
    assert padded.padding_fraction < PaddedCollator(pad_to=256)(items).padding_fraction


def test_dataloader_integration(encoded):
    from torch.utils.data import DataLoader
    sampler = TokenBudgetBatchSampler([e.n_tokens for e in encoded], max_tokens=3000, seed=0)
    loader = DataLoader(encoded, batch_sampler=sampler, collate_fn=PackedCollator(row_len=512))
    batches = list(loader)
    assert len(batches) == len(sampler) and all(b.n_tokens <= 3000 for b in batches)
    assert sorted(i for b in batches for i in b.set_index.tolist()) == list(range(len(encoded)))
    sampler.set_epoch(1)
    assert [b.set_index.tolist() for b in loader] == [list(b) for b in sampler]


def test_padded_batch_layout(encoded):
    b = PaddedCollator(pad_token_id=0)(encoded[:2])
    assert not b.packed and b.input_ids.shape == (12, max(max(e.lengths) for e in encoded[:2]))
    assert b.cls_index.tolist() == [i * b.input_ids.shape[1] for i in range(12)]
    assert b.attention_mask.sum(1).tolist() == encoded[0].lengths + encoded[1].lengths
    assert b.group_offsets.tolist() == [0, 9, 12]
    with pytest.raises(ValueError, match="pad_to"):
        PaddedCollator(pad_to=128)(encoded)
    moved = b.to("cpu")
    assert isinstance(moved.n_tokens, int) and torch.equal(moved.input_ids, b.input_ids)


# ------------------------------------------------------------------------------------------ exactness
@pytest.fixture(scope="module")
def mixed(encoded):
    """12 candidates from all five sets, 57..256 tokens (a smaller input keeps the MiniLM checks quick)."""
    take = {0: 3, 1: 3, 2: 2, 3: 2, 4: 2}
    return [EncodedSet(e.index, e.input_ids[:take[k]], e.token_type_ids[:take[k]], 0, e.env_id)
            for k, e in enumerate(encoded)]


def _first_token_states(model, batch):
    with torch.no_grad():
        h = model.encode(batch)
    return h.reshape(-1, h.shape[-1]).index_select(0, batch.cls_index)


def _unpacked(model, encoded):
    """Reference: every candidate alone in its own row, no padding at all."""
    rows = []
    for e in encoded:
        for j in range(e.n_candidates):
            one = EncodedSet(0, [e.input_ids[j]], None if e.token_type_ids is None else [e.token_type_ids[j]], 0, 0)
            rows.append(_first_token_states(model, PaddedCollator()([one])))
    return torch.cat(rows)


def _check_exact(model, encoded, collators):
    ref = _unpacked(model, encoded)
    assert ref.std() > 0.05  # a real signal, not a degenerate near-constant output
    for coll in collators:
        batch = coll(encoded)
        assert batch.packed == isinstance(coll, PackedCollator)
        torch.testing.assert_close(_first_token_states(model, batch), ref, atol=1e-5, rtol=0)
    with torch.no_grad():  # the scores of the model's own (packed) layout: w^T h + b on the same states
        torch.testing.assert_close(model(collators[0](encoded)), model.head(ref).squeeze(-1), atol=1e-5, rtol=0)


def _merged_segments(batch):
    """A wrong packing (all candidates of a row attend to each other) to show the check can fail."""
    seg = (batch.segment_ids > 0).long()
    return type(batch)(**{**batch.__dict__, "segment_ids": seg})


@pytest.mark.parametrize("packed_attention", ["varlen", "mask"])
def test_minilm_packed_matches_unpacked(minilm, mixed, packed_attention):
    model = minilm if packed_attention == "varlen" else Reranker(minilm.encoder, minilm.tokenizer,
                                                                 packed_attention="mask")
    if packed_attention == "mask":
        model.encoder.set_attn_implementation("sdpa")
    try:
        assert model.varlen == (packed_attention == "varlen")
        _check_exact(model, mixed, [model.collator(), PackedCollator(row_len=384), PaddedCollator(pad_to=256)])
        if packed_attention == "mask":  # negative control: without the block-diagonal mask the result changes
            batch = PackedCollator(row_len=512)(mixed)
            diff = (_first_token_states(model, _merged_segments(batch)) - _first_token_states(model, batch)).abs()
            assert diff.max() > 1e-2
    finally:
        minilm.encoder.set_attn_implementation("fastrank_varlen")


def _tiny(kind, tokenizer):
    from transformers import DebertaV2Config, RobertaConfig
    common = dict(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=512)
    if kind == "deberta-v3":  # the v3 layout: relative attention with log buckets, no absolute positions
        return DebertaV2Config(**common, pad_token_id=0, relative_attention=True, position_buckets=256,
                               norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
                               position_biased_input=False, max_relative_positions=-1, type_vocab_size=0)
    if kind == "deberta-v2-abs":  # absolute positions + token types: per-segment position_ids needed
        return DebertaV2Config(**common, pad_token_id=0, relative_attention=True, pos_att_type=["c2p", "p2c"],
                               position_biased_input=True, type_vocab_size=2)
    return RobertaConfig(**common, pad_token_id=1, type_vocab_size=2)


@pytest.mark.parametrize("kind", ["deberta-v3", "deberta-v2-abs", "roberta"])
def test_tiny_packed_matches_unpacked(minilm, encoded, kind):  # all 24 candidates: tiny models are fast
    torch.manual_seed(1)
    model = Reranker.from_config(_tiny(kind, minilm.tokenizer), minilm.tokenizer).eval()
    assert model.packing == ("bert" if kind == "roberta" else "deberta-v2")
    _check_exact(model, encoded, [model.collator(), PackedCollator(row_len=256), PackedCollator(row_len=1024),
                                  PaddedCollator()])
    if kind != "roberta":
        if model.varlen:  # disentangled-flash installed: check the row + block-mask fallback too
            torch.manual_seed(1)
            model = Reranker.from_config(_tiny(kind, minilm.tokenizer), minilm.tokenizer, packed_attention="mask")
            model.eval()
            _check_exact(model, encoded, [PackedCollator(row_len=256)])
        # negative control (the block-mask path reads segment_ids)
        batch = PackedCollator(row_len=512)(encoded)
        diff = (_first_token_states(model, _merged_segments(batch)) - _first_token_states(model, batch)).abs()
        assert diff.max() > 1e-3


def test_minilm_preset_path():
    assert PRESETS["deberta-v3-base"] == "microsoft/deberta-v3-base"
    assert PRESETS["deberta-v3-large"] == "microsoft/deberta-v3-large"
    import os
    assert os.path.exists(os.path.join(PRESETS["minilm"], "config.json"))
