"""Shared-prefix layout (fastrank/prefix.py): the state once per set, each candidate attending to it."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer, BertConfig

from fastrank.data.features import Featurizer
from fastrank.data.record import CandidateSet
from fastrank.model import PRESETS, Reranker
from fastrank.prefix import prefix_attention_mask


@pytest.fixture(scope="module")
def models():
    tok = AutoTokenizer.from_pretrained(PRESETS["minilm"])
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    out = {}
    for impl in ("sdpa", "eager"):
        m = Reranker.from_config(copy.deepcopy(cfg), tok, featurizer=Featurizer("history"), max_length=64,
                                 layout="shared_prefix", attn_implementation=impl)
        if out:
            m.load_state_dict(out["sdpa"].state_dict())
        out[impl] = m.eval()
    assert out["sdpa"].encoder.config._attn_implementation != out["eager"].encoder.config._attn_implementation
    return out


def _reference_scores(model: Reranker, goal, obs, cands, history):
    """Each candidate alone: [CLS] state [SEP] [CLS] action [SEP] run through the plain HF encoder with a 2-D
    -> 4-D mask where state tokens see only the state (what the layout promises)."""
    tok = model.tokenizer
    state_text, action_texts = model.featurizer.texts(goal, obs, cands, history)
    state = tok(state_text, truncation=True, max_length=model.max_length)["input_ids"]
    out = []
    for c, text in zip(cands, action_texts):
        act = tok(text, truncation=True, max_length=32)["input_ids"]
        ids = torch.tensor([state + act])
        n, m = len(state), len(act)
        allow = torch.ones(n + m, n + m, dtype=torch.bool)
        allow[:n, n:] = False
        tt = torch.tensor([[0] * n + [1] * m])
        h = model.encoder(input_ids=ids, token_type_ids=tt, attention_mask=allow[None, None]).last_hidden_state
        out.append(model.head(h[0, n]).squeeze(-1))
    return torch.stack(out)


HIST = [("go to countertop 1", "On the countertop 1, you see a bread 1."), ("go to drawer 1", "The drawer 1 is closed.")]
CANDS = ["open drawer 1", "go to countertop 2", "take bread 1 from countertop 1", "look", "go to fridge 1"]


def test_scores_equal_the_one_pair_reference(models):
    m = models["sdpa"]
    got = m.score("put a bread in fridge.", "The drawer 1 is closed.", CANDS, history=HIST)
    with torch.no_grad():
        ref = _reference_scores(m, "put a bread in fridge.", "The drawer 1 is closed.", CANDS, HIST)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_candidates_do_not_see_each_other_and_eager_matches_sdpa(models):
    m = models["sdpa"]
    together = m.score("g", "o", CANDS, history=HIST)
    alone = torch.cat([m.score("g", "o", [c], history=HIST) for c in CANDS])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(models["eager"].score("g", "o", CANDS, history=HIST), together, rtol=1e-5, atol=1e-5)


def test_score_many_batches_sets_of_different_sizes(models):
    m = models["sdpa"]
    states = [("g1", "o1", CANDS, HIST), ("g2", "o2", [], None), ("g3", "o3", CANDS[:2], [])]
    many = m.score_many(states)
    assert [len(s) for s in many] == [5, 0, 2]
    torch.testing.assert_close(many[0], m.score("g1", "o1", CANDS, history=HIST), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(many[2], m.score("g3", "o3", CANDS[:2], history=[]), rtol=1e-5, atol=1e-6)
    # on a CPU score_many runs one set per forward; the padded rows of one batch (training, GPUs) agree
    sets = [CandidateSet(env="alfworld", episode_id="e", step=0, task_type="t", goal=g, observation=o,
                         candidates=list(c), expert_index=0, sources=[], history=h) for g, o, c, h in states if c]
    with torch.no_grad():
        padded = m(m.collator()(m.encode_sets(sets)))
    torch.testing.assert_close(torch.cat([many[0], many[2]]), padded, rtol=1e-5, atol=1e-5)


def test_batch_layout_and_gradients(models):
    m = models["sdpa"]
    sets = [CandidateSet(env="alfworld", episode_id=f"e{i}", step=0, task_type="t", goal="g", observation="o",
                         candidates=CANDS[: 2 + i], expert_index=i, sources=["expert"] * (2 + i), history=HIST)
            for i in range(3)]
    batch = m.collator()(m.encode_sets(sets))
    assert batch.prefix and batch.input_ids.shape[0] == 3 and batch.n_candidates == 2 + 3 + 4
    assert batch.group_offsets.tolist() == [0, 2, 5, 9]
    assert batch.labels.tolist() == [1, 0, 0, 1, 0, 0, 0, 1, 0]
    # a candidate's first token sits right after the state, positions continue from the state's length
    flat_pos = batch.position_ids.flatten()[batch.cls_index]
    n_state = (batch.segment_ids == 1).sum(1)
    assert flat_pos.tolist()[:2] == [n_state[0].item()] * 2
    mask = prefix_attention_mask(batch.segment_ids)
    seg = batch.segment_ids[0]
    q = (seg == 2).nonzero()[0, 0]
    assert mask[0, q][seg == 1].all() and mask[0, q][seg == 2].all() and not mask[0, q][seg == 3].any()
    assert not mask[0, (seg == 1).nonzero()[0, 0]][seg > 1].any()  # the state never reads a candidate
    m.train()
    m(batch).sum().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad and "pooler" not in n)
    m.zero_grad()
    m.eval()


def test_shared_prefix_rejects_relative_position_encoders():
    from transformers import DebertaV2Config

    tok = AutoTokenizer.from_pretrained(PRESETS["minilm"])
    cfg = DebertaV2Config(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64)
    with pytest.raises(ValueError, match="BERT-family"):
        Reranker.from_config(cfg, tok, layout="shared_prefix")
    with pytest.raises(ValueError, match="layout must be"):
        Reranker.from_config(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64), tok, layout="bogus")


def test_bf16_autocast_scores_are_fp32_and_close_to_fp32(models):
    """`agent-eval --bf16` scores under CPU bf16 autocast: the matmuls round to bf16 (8 mantissa bits), the
    returned scores stay fp32 and near the fp32 ones."""
    m = models["sdpa"]
    ref = m.score("put a bread in fridge.", "The drawer 1 is closed.", CANDS, history=HIST)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.score("put a bread in fridge.", "The drawer 1 is closed.", CANDS, history=HIST)
    assert got.dtype == torch.float32
    assert not torch.equal(got, ref)  # bf16 did run
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)

