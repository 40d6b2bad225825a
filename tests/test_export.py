"""HF / sentence-transformers interop: export a checkpoint as a cross-encoder, import a cross-encoder's head."""
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, RobertaConfig

from fastrank.cli import main as cli_main
from fastrank.data import load_bundled
from fastrank.export import POOLER_SCALE, export_checkpoint
from fastrank.model import PRESETS, Reranker

ENVS = ("alfworld", "scienceworld", "webshop")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(PRESETS["minilm"])


@pytest.fixture(scope="module")
def sets():
    return [cs for env in ENVS for cs in load_bundled(env, "eval")[:3]]


def tiny_bert(tok, **kw):
    return BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512, **kw)


def tiny_reranker(tok, seed=0):
    torch.manual_seed(seed)
    model = Reranker.from_config(tiny_bert(tok), tok, max_length=256)
    with torch.no_grad():  # a head far from its init, with a bias: a dropped bias or scale would show
        model.head.weight.normal_(0, 1.0)
        model.head.bias.fill_(0.7)
    return model.eval()


def hf_logits(hf, tok, model, cs):
    pairs = model.featurizer.pairs(cs.goal, cs.observation, cs.candidates)
    enc = tok([p[0] for p in pairs], [p[1] for p in pairs], padding=True, truncation="only_first",
              max_length=model.max_length, return_tensors="pt")
    with torch.no_grad():
        return hf(**enc).logits.squeeze(-1).float()


def assert_same_scores(model, other, sets, tol=1e-5):
    worst = max(float((model.score(cs.goal, cs.observation, cs.candidates) - other(cs)).abs().max()) for cs in sets)
    assert worst <= tol, worst


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = tiny_reranker(tokenizer)
    model.save_pretrained(root / "run" / "model")
    results = {"config": {"model": "tiny", "envs": list(ENVS), "negatives": "sampled", "upsample": {"alfworld": 6},
                          "seed": 1, "loss": "listwise"}, "train_sets": 123, "steps": 7,
               "eval": {"sampled": {"combined": {"states": 9, "original_top1": 0.1, "reranked_top1": 0.6,
                                                 "net_gain": 0.5}}}}
    (root / "run" / "results.json").write_text(json.dumps(results))
    assert cli_main(["export", str(root / "run" / "model"), str(root / "st"), "--to", "sentence-transformers"]) == 0
    return model, root / "st"


def test_export_round_trip_transformers(exported, tokenizer, sets):
    model, out = exported
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.num_labels == 1 and type(hf).__name__ == "BertForSequenceClassification"
    assert (out / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.model_max_length == model.max_length
    assert_same_scores(model, lambda cs: hf_logits(hf, tok, model, cs), sets)


def test_export_round_trip_cross_encoder(exported, sets):
    st = pytest.importorskip("sentence_transformers")  # optional extra `fastrank[peers]`
    model, out = exported
    ce = st.CrossEncoder(str(out), device="cpu")
    assert ce.max_seq_length == model.max_length

    def predict(cs):
        pairs = model.featurizer.pairs(cs.goal, cs.observation, cs.candidates)
        return torch.as_tensor(ce.predict(pairs, batch_size=32, convert_to_numpy=True)).float()

    assert_same_scores(model, predict, sets)  # raw logits: no Sigmoid, thanks to the config's Identity activation


def test_model_card(exported):
    card = (exported[1] / "README.md").read_text()
    assert "state: goal: {goal} observation: {observation}" in card
    assert "features: jaccard" in card  # the default feature mode's second text
    assert "123 training candidate sets" in card and "+0.500" in card  # from results.json beside the checkpoint
    assert "loss `listwise`" in card


def test_scale_trick_is_what_was_written(exported):
    model, out = exported
    hf = AutoModelForSequenceClassification.from_pretrained(out)
    torch.testing.assert_close(hf.bert.pooler.dense.weight, torch.eye(32) * POOLER_SCALE, rtol=0, atol=0)
    torch.testing.assert_close(hf.classifier.weight * POOLER_SCALE, model.head.weight, rtol=0, atol=0)


def test_routed_checkpoint_is_refused(tmp_path, tokenizer, capsys):
    ckpt = tmp_path / "routed"
    tiny_reranker(tokenizer).save_pretrained(ckpt)
    meta = json.loads((ckpt / "fastrank.json").read_text())
    meta["class"] = "fastrank.routing.model:RoutedReranker"
    meta["routing"] = {"lora_r": 8}
    (ckpt / "fastrank.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="routed checkpoint"):
        export_checkpoint(ckpt, tmp_path / "out")
    assert cli_main(["export", str(ckpt), str(tmp_path / "out")]) == 2
    assert "cannot be exported as one plain model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a fastrank checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------------- import
def save_cross_encoder(config, tok, path, seed=1):
    torch.manual_seed(seed)
    hf = AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # a trained-looking head: random pooler/classifier weights, non-zero biases
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return hf


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_import_keeps_the_trained_head(arch, tokenizer, sets, tmp_path):
    if arch == "bert":
        config = tiny_bert(tokenizer, num_labels=1)
    else:  # type_vocab_size 2: the BERT tokenizer used here emits token types 0/1
        config = RobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64, max_position_embeddings=520,
                               type_vocab_size=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    hf = save_cross_encoder(config, tokenizer, tmp_path / "ce")
    model = Reranker.from_encoder(str(tmp_path / "ce"), max_length=256).eval()
    assert model.pooler is not None
    assert_same_scores(model, lambda cs: hf_logits(hf, tokenizer, model, cs), sets)
    # the head survives save/load, and exports back to the same classifier
    model.save_pretrained(tmp_path / "ft")
    again = Reranker.from_pretrained(tmp_path / "ft")
    assert again.pooler is not None
    assert_same_scores(again, lambda cs: hf_logits(hf, tokenizer, model, cs), sets)
    out = export_checkpoint(tmp_path / "ft", tmp_path / "back")
    back = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert_same_scores(model, lambda cs: hf_logits(back, tokenizer, model, cs), sets)


def test_plain_encoder_still_gets_a_fresh_linear_head(tokenizer, tmp_path):
    from transformers import BertModel

    BertModel(tiny_bert(tokenizer)).save_pretrained(tmp_path / "enc")
    tokenizer.save_pretrained(tmp_path / "enc")
    model = Reranker.from_encoder(str(tmp_path / "enc"))
    assert model.pooler is None and model.meta()["head"]["type"] == "linear_first_token"


def test_multi_label_classifier_is_refused(tokenizer, tmp_path):
    save_cross_encoder(tiny_bert(tokenizer, num_labels=3), tokenizer, tmp_path / "ce3")
    with pytest.raises(ValueError, match="3 labels"):
        Reranker.from_encoder(str(tmp_path / "ce3"))


def test_routed_wrapper_keeps_the_imported_head(tokenizer, sets, tmp_path):
    from fastrank.routing.model import RoutedReranker

    hf = save_cross_encoder(tiny_bert(tokenizer, num_labels=1), tokenizer, tmp_path / "ce")
    model = Reranker.from_encoder(str(tmp_path / "ce"), max_length=256).eval()
    routed = RoutedReranker.from_reranker(model).eval()  # LoRA B starts at 0: same function as the base
    assert routed.pooler is not None  # a fresh linear head would be off by O(1), not by the LoRA path's rounding
    assert_same_scores(routed, lambda cs: hf_logits(hf, tokenizer, model, cs), sets, tol=2e-4)
    routed.save_pretrained(tmp_path / "routed")
    assert RoutedReranker.from_pretrained(tmp_path / "routed").pooler is not None


def test_routing_refuses_the_shared_prefix_layout(tokenizer, tmp_path):
    from fastrank.routing.model import RoutedReranker

    save_cross_encoder(tiny_bert(tokenizer, num_labels=1), tokenizer, tmp_path / "ce")
    with pytest.raises(ValueError, match="layout='pairs'"):
        RoutedReranker.from_reranker(Reranker.from_encoder(str(tmp_path / "ce"), layout="shared_prefix"))
