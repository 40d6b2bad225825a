"""The Reranker: scoring/ranking, save/load round trip, gradients, aux heads, encoders without a packed path."""
import json
import os

import pytest
import torch

from fastrank.data.features import NOTES_VERSION, Featurizer
from fastrank.model import FORMAT_VERSION, Reranker, Ranking
from fastrank.packing import EncodedSet, PackedCollator, PaddedCollator, encode_sets
from test_packing import _tiny, hand_sets  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return Reranker.from_encoder("minilm").eval()


@pytest.fixture(scope="module")
def spm_tokenizer_dir(tmp_path_factory):
    """A DeBERTa-v3-style tokenizer: a tiny sentencepiece model trained on the hand-written sets (~0.1 s).

    (The real deberta-v3 spm model is not obtainable offline; `DebertaV2Tokenizer(vocab_file=...)` ignores the
    file in transformers 5, so it is loaded through `from_pretrained(dir)`.)"""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("spm")
    texts = [t for s in hand_sets() for pair in Featurizer().pairs(s.goal, s.observation, s.candidates) for t in pair]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts * 3), model_prefix=str(d / "spm"), vocab_size=300, model_type="unigram",
        pad_id=0, pad_piece="[PAD]", bos_id=1, bos_piece="[CLS]", eos_id=2, eos_piece="[SEP]", unk_id=3,
        unk_piece="[UNK]", user_defined_symbols=["[MASK]"], minloglevel=2, hard_vocab_limit=False)
    (d / "spm.vocab").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "DebertaV2Tokenizer",
                                                          "model_max_length": 512, "do_lower_case": False}))
    return d


@pytest.fixture(scope="module")
def tiny_deberta_v3(spm_tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(spm_tokenizer_dir)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["[PAD]", "[CLS]", "[SEP]"]
    torch.manual_seed(0)
    cfg = _tiny("deberta-v3", tok)
    return Reranker.from_config(cfg, tok, featurizer=Featurizer("state_action"), max_length=128,
                                aux_heads={"source": 5}).eval()


GOAL = "put a clean apple in fridge."
OBS = hand_sets()[0].observation
CANDS = hand_sets()[0].candidates


# ----------------------------------------------------------------------------------------- inference
def test_rank_is_argsort_of_scores(minilm):
    s = minilm.score(GOAL, OBS, CANDS)
    assert s.shape == (9,) and s.dtype == torch.float32 and not s.requires_grad
    r = minilm.rank(GOAL, OBS, CANDS)
    assert isinstance(r, Ranking) and len(r) == 9
    assert r.order == torch.argsort(s, descending=True, stable=True).tolist()
    assert [i for i, _ in r] == r.order and r.best == r.order[0] == int(s.argmax())
    assert [sc for _, sc in r] == sorted(s.tolist(), reverse=True)
    assert r[0] == (r.best, s.max().item())
    # the packed one-call path equals scoring the same set from a padded batch
    enc = encode_sets([hand_sets()[0]], minilm.tokenizer, minilm.featurizer)
    with torch.no_grad():
        torch.testing.assert_close(minilm(PaddedCollator()(enc)), s, atol=1e-5, rtol=0)
    assert minilm.score(GOAL, OBS, []).numel() == 0


def test_score_uses_eval_mode_and_restores_it(tiny_deberta_v3):
    m = tiny_deberta_v3
    m.train()
    try:
        a, b = m.score(GOAL, OBS, CANDS), m.score(GOAL, OBS, CANDS)
        assert torch.equal(a, b)  # no dropout while scoring
        assert m.training
    finally:
        m.eval()


def test_attributes(minilm, tiny_deberta_v3):
    assert minilm.device == torch.device("cpu") and minilm.max_length == 256
    assert minilm.featurizer == Featurizer() and minilm.tokenizer.pad_token_id == 0
    assert minilm.packing == "bert" and minilm.varlen and minilm.encoder.pooler is None
    from fastrank import deberta_varlen
    dv = deberta_varlen.available()  # the extra fastrank[deberta]: packed DeBERTa without rows or block masks
    assert tiny_deberta_v3.packing == "deberta-v2" and tiny_deberta_v3.varlen == dv
    assert tiny_deberta_v3.collator().row_len == (None if dv else 256) and minilm.collator().row_len is None


# ---------------------------------------------------------------------------------------- save / load
def _roundtrip(model, path):
    before = model.score(GOAL, OBS, CANDS)
    model.save_pretrained(path)
    model.save_pretrained(path)  # overwriting an existing save is atomic too
    leftovers = [p for p in os.listdir(path.parent) if p.startswith(".")]
    assert leftovers == []
    restored = Reranker.from_pretrained(path)
    after = restored.score(GOAL, OBS, CANDS)
    assert torch.equal(before, after)
    return restored, json.loads((path / "fastrank.json").read_text())


def test_save_load_roundtrip_deberta_v3_spm(tiny_deberta_v3, tmp_path):
    path = tmp_path / "out" / "reranker"
    restored, meta = _roundtrip(tiny_deberta_v3, path)
    assert {"config.json", "model.safetensors", "fastrank.json", "tokenizer_config.json"} <= set(os.listdir(path))
    assert meta["featurizer"] == {"mode": "state_action", "notes": NOTES_VERSION,
                                  "observation_view": "feedback"} and meta["max_length"] == 128
    assert meta["format_version"] == FORMAT_VERSION and meta["aux_heads"] == {"source": 5}
    assert meta["head"]["in_features"] == 64 and meta["packing"] == "deberta-v2"
    assert restored.featurizer == Featurizer("state_action") and restored.max_length == 128
    assert restored.tokenizer("state: x", "action: y")["input_ids"] == \
        tiny_deberta_v3.tokenizer("state: x", "action: y")["input_ids"]
    enc = encode_sets(hand_sets()[:2], restored.tokenizer, restored.featurizer, restored.max_length)
    batch = restored.collator()(enc)
    with torch.no_grad():
        s0, aux0 = tiny_deberta_v3(batch, return_aux=True)
        s1, aux1 = restored(batch, return_aux=True)
    assert torch.equal(s0, s1) and torch.equal(aux0["source"], aux1["source"])


def test_save_load_roundtrip_minilm(minilm, tmp_path):
    restored, meta = _roundtrip(minilm, tmp_path / "minilm")
    assert restored.varlen and meta["packing"] == "bert"
    assert not any(k.startswith("encoder.pooler") for k in restored.state_dict())


def test_from_pretrained_rejects_unknown_format(tiny_deberta_v3, tmp_path):
    tiny_deberta_v3.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "fastrank.json").read_text())
    (tmp_path / "m" / "fastrank.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format"):
        Reranker.from_pretrained(tmp_path / "m")


# ------------------------------------------------------------------------------------------ training
def _small_batch(model, layout):
    enc = encode_sets(hand_sets()[:2], model.tokenizer, model.featurizer, model.max_length)
    enc = [EncodedSet(e.index, e.input_ids[:3], None if e.token_type_ids is None else e.token_type_ids[:3],
                      0, e.env_id) for e in enc]
    pad = model.tokenizer.pad_token_id
    return {"packed": model.collator(), "padded": PaddedCollator(pad),
            "rows": PackedCollator(pad, row_len=200)}[layout](enc)  # rows: packed rows with row padding


@pytest.mark.parametrize("which", ["minilm", "tiny_deberta_v3"])
def test_gradients_flow_and_match_padded(which, request):
    model = request.getfixturevalue(which)
    grads = {}
    for layout in ("packed", "padded", "rows"):
        model.zero_grad(set_to_none=True)
        batch = _small_batch(model, layout)
        assert batch.packed == (layout != "padded")
        scores = model(batch)  # eval mode: no dropout, so all layouts must agree
        assert scores.dtype == torch.float32 and scores.requires_grad
        (scores * torch.linspace(-1, 1, scores.numel())).sum().backward()
        grads[layout] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, _ in model.named_parameters()} - {n for n, _ in model.named_parameters()
                                                             if n.startswith("aux_heads.")}
    assert set(grads["packed"]) == trainable  # every encoder weight and the head get a gradient
    assert grads["packed"]["head.weight"].abs().sum() > 0
    enc_nonzero = [n for n, g in grads["packed"].items() if n.startswith("encoder.") and g.abs().sum() > 0]
    assert len(enc_nonzero) >= 0.9 * sum(n.startswith("encoder.") for n in trainable)
    for layout in ("padded", "rows"):
        for n in grads["packed"]:
            torch.testing.assert_close(grads[layout][n], grads["packed"][n], atol=1e-5, rtol=1e-4)
    model.zero_grad(set_to_none=True)


def test_aux_heads_hook(tiny_deberta_v3, minilm):
    batch = _small_batch(tiny_deberta_v3, "packed")
    with torch.no_grad():
        scores, aux = tiny_deberta_v3(batch, return_aux=True)
        assert torch.equal(scores, tiny_deberta_v3(batch))
    assert set(aux) == {"source"} and aux["source"].shape == (6, 5) and aux["source"].dtype == torch.float32
    assert len(minilm.aux_heads) == 0


def test_encoder_without_packed_path_falls_back_to_padding(minilm):
    from transformers import DistilBertConfig
    cfg = DistilBertConfig(vocab_size=minilm.tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    model = Reranker.from_config(cfg, minilm.tokenizer).eval()
    assert model.packing is None and not model.supports_packing
    assert isinstance(model.collator(), PaddedCollator)
    with pytest.raises(ValueError, match="packed"):
        model.collator(packed=True)
    enc = encode_sets(hand_sets()[:1], model.tokenizer, model.featurizer)
    with pytest.raises(ValueError, match="packed"):
        model(PackedCollator()(enc))
    r = model.rank(GOAL, OBS, CANDS)
    assert sorted(r.order) == list(range(9))


@pytest.mark.parametrize("family", ["bert", "deberta-v3"])
def test_attention_dropout_reaches_every_layer(family, spm_tokenizer_dir):
    """set_attention_dropout: with hidden dropout off, a train-mode forward is random only through attention
    dropout, so p = 0 makes it equal the eval-mode scores, and p = 0.5 does not."""
    from transformers import AutoTokenizer, BertConfig

    from fastrank.model import PRESETS

    if family == "bert":
        tok = AutoTokenizer.from_pretrained(PRESETS["minilm"])
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.1)
    else:
        tok = AutoTokenizer.from_pretrained(spm_tokenizer_dir)
        cfg = _tiny("deberta-v3", tok)
        cfg.hidden_dropout_prob, cfg.num_hidden_layers = 0.0, 3
    torch.manual_seed(0)
    model = Reranker.from_config(cfg, tok, featurizer=Featurizer("state_action"), max_length=64)
    batch = model.collator()(model.encode_sets(hand_sets()[:2]))
    with torch.no_grad():
        ref = model.eval()(batch)
        assert model.set_attention_dropout(0.5) == 3
        model.train()
        assert not torch.allclose(model(batch), ref)
        assert model.set_attention_dropout(0.0) == 3
        torch.testing.assert_close(model(batch), ref, rtol=1e-5, atol=1e-6)
    assert model.encoder.config.attention_probs_dropout_prob == 0.0
    with pytest.raises(ValueError, match="must be in"):
        model.set_attention_dropout(1.0)
