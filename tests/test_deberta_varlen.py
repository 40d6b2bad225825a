"""DeBERTa-v2/v3 packed (cu_seqlens) encoding through disentangled-flash (`fastrank.deberta_varlen`).

Reference: the untouched Hugging Face DeBERTa-v2 code (eager), run candidate by candidate. Tiny random configs,
fp32; "equal" means relative L2 error <= 1e-5 per tensor (outputs, scores, every parameter gradient).
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("disentangled_flash")

from fastrank import deberta_varlen  # noqa: E402
from fastrank.model import Reranker  # noqa: E402
from fastrank.packing import EncodedSet, PackedCollator, PaddedCollator  # noqa: E402

VOCAB = 300
TOL = 1e-5


def _config(kind: str, **kw):
    from transformers import DebertaV2Config
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=512, pad_token_id=0, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    if kind == "v3":  # the v3 layout: log-bucket relative positions, shared keys, no absolute positions
        cfg = dict(relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
                   pos_att_type=["p2c", "c2p"], position_biased_input=False, max_relative_positions=-1,
                   type_vocab_size=0)
    else:  # v2 layout: no buckets, separate position projections, absolute positions and token types
        cfg = dict(relative_attention=True, position_buckets=-1, max_relative_positions=128, share_att_key=False,
                   pos_att_type=["c2p", "p2c"], position_biased_input=True, type_vocab_size=2)
    return DebertaV2Config(**{**common, **cfg, **kw})


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A DeBERTa-v3-style tokenizer from a tiny sentencepiece model (the real spm model is not available
    offline). Inputs are built as ids directly; the tokenizer gives the pad id and is saved with checkpoints."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer
    d = tmp_path_factory.mktemp("spm")
    texts = [f"go to {w} {i}" for i in range(30) for w in ("fridge", "desk", "cabinet", "sink basin", "stove")]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(d / "spm"), vocab_size=60, model_type="unigram",
        pad_id=0, pad_piece="[PAD]", bos_id=1, bos_piece="[CLS]", eos_id=2, eos_piece="[SEP]", unk_id=3,
        unk_piece="[UNK]", minloglevel=2, hard_vocab_limit=False)
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "DebertaV2Tokenizer"}))
    t = AutoTokenizer.from_pretrained(d)
    assert t.pad_token_id == 0
    return t


def _pair(tok, kind: str, seed: int = 0, **kw):
    """(HF block-mask reference model, varlen model) with identical weights."""
    torch.manual_seed(seed)
    ref = Reranker.from_config(_config(kind, **kw), tok, packed_attention="mask", attn_implementation="eager",
                               max_length=256)
    var = Reranker(copy.deepcopy(ref.encoder), tok, packed_attention="varlen", max_length=256)
    var.head.load_state_dict(ref.head.state_dict())
    assert ref.varlen_backend is None and var.varlen_backend == "auto" and var.varlen
    return ref.eval(), var.eval()


def _sets(lengths_per_set, seed=0, token_types=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, lengths in enumerate(lengths_per_set):
        ids = [[1] + torch.randint(4, VOCAB, (n - 2,), generator=g).tolist() + [2] for n in lengths]
        tts = [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths] if token_types else None
        out.append(EncodedSet(index=k, input_ids=ids, token_type_ids=tts, expert_index=0, env_id=0))
    return out


def _random_lengths(seed, n_sets=4):
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 20] + torch.randint(1, 21, (n_sets - 2,), generator=g).tolist()
    sets = [torch.randint(2, 251, (k,), generator=g).tolist() for k in sizes]
    sets[0] = [250]
    sets[1][:4] = [2, 2, 37, 37]  # equal lengths share one attention batch in the torch driver
    return sets


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _reference(ref, items):
    """HF eager, candidate by candidate: per-candidate last hidden states and scores, loss-weighted backward."""
    outs, scores = [], []
    for it in items:
        for j, ids in enumerate(it.input_ids):
            tt = None if it.token_type_ids is None else torch.tensor([it.token_type_ids[j]])
            kw = {"token_type_ids": tt} if ref._uses_token_types else {}
            h = ref.encoder(input_ids=torch.tensor([ids]), **kw).last_hidden_state[0]
            outs.append(h)
            scores.append(ref.head(h[0]).squeeze(-1))
    return outs, torch.stack(scores)


def _loss(outs, scores):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(scores.shape, generator=g)
    tok = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)  # every token's output matters
    return (scores * w).sum() + 1e-2 * tok


def _candidate_outputs(hidden, batch):
    flat = hidden.reshape(-1, hidden.shape[-1])
    return [flat[s:s + n] for s, n in zip(batch.cls_index.tolist(), batch.seq_lens.tolist())]


@pytest.mark.parametrize("kind", ["v3", "v2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_outputs_scores_and_every_gradient_match_hf_per_candidate(kind, seed, tok):
    ref, var = _pair(tok, kind, seed)
    items = _sets(_random_lengths(seed), seed, token_types=kind == "v2")
    r_outs, r_scores = _reference(ref, items)
    _loss(r_outs, r_scores).backward()
    batch = var.collator()(items)
    assert batch.input_ids.shape[0] == 1 and batch.padding_fraction == 0  # one unpadded token stream
    hidden = var.encode(batch)
    v_outs = _candidate_outputs(hidden, batch)
    v_scores = var.head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.cls_index)).squeeze(-1)
    torch.testing.assert_close(var(batch), v_scores.detach(), rtol=0, atol=0)  # forward() reads the same rows
    for a, b in zip(v_outs, r_outs):
        assert _rel(a, b) <= TOL
    assert _rel(v_scores, r_scores) <= TOL
    _loss(v_outs, v_scores).backward()
    rp = dict(ref.named_parameters())
    names = [n for n, _ in var.named_parameters()]
    assert names == list(rp)  # the swap keeps every parameter name (and order)
    # Two biases get (nearly) no gradient by symmetry (softmax ignores a per-query constant): pos_key_proj.bias
    # exactly none, key_proj.bias only through p2c when keys are not shared. Their fp32 gradients are mostly
    # cancellation noise, so they are measured against 1e-3 of the largest gradient of their module.
    module_scale = {}
    for n, q in rp.items():
        mod = n.rsplit(".", 2)[0]
        module_scale[mod] = max(module_scale.get(mod, 0.0), float(q.grad.norm()))
    for n, p in var.named_parameters():
        assert p.grad is not None, n
        ref_g = rp[n].grad
        floor = 1e-3 * module_scale[n.rsplit(".", 2)[0]] if n.endswith(("key_proj.bias", "pos_key_proj.bias")) else 0
        err = float((p.grad - ref_g).norm()) / max(float(ref_g.norm()), floor, 1e-30)
        assert err <= TOL, (n, err)


def test_every_layout_gives_the_same_scores(tok):
    """Rows of 256 and padded batches go through the same per-candidate path; scores are the reference's."""
    ref, var = _pair(tok, "v3")
    items = _sets([[250], [2, 9, 9, 120, 64], [31, 200, 17]], seed=3)
    with torch.no_grad():
        _, r_scores = _reference(ref, items)
        for coll in (var.collator(), PackedCollator(0, row_len=256), PaddedCollator(0)):
            assert _rel(var(coll(items)), r_scores) <= TOL
        assert _rel(ref(PackedCollator(0, row_len=256)(items)), r_scores) <= TOL  # the block-mask fallback too


def test_negative_control_merged_candidates_differ(tok):
    """The comparison can fail: attending across candidates (one merged sequence) changes the first tokens."""
    ref, var = _pair(tok, "v3")
    items = _sets([[40, 60, 30]], seed=4)
    batch = var.collator()(items)
    merged = copy.copy(batch)
    merged.seq_lens = batch.seq_lens.sum().view(1)
    merged.cls_index = batch.cls_index[:1]
    with torch.no_grad():
        good = _candidate_outputs(var.encode(batch), batch)
        bad = _candidate_outputs(var.encode(merged), batch)
    assert max(_rel(b, g) for b, g in zip(bad[1:], good[1:])) > 1e-3  # >> TOL


def test_training_steps_match_the_block_mask_path(tok):
    ref, var = _pair(tok, "v3", seed=2)
    ref.train(), var.train()  # dropout is 0 in these configs: the two paths must stay together
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ref, var)]
    g = torch.Generator().manual_seed(5)
    data = [_sets([[250], torch.randint(2, 121, (10,), generator=g).tolist()], s) for s in (5, 6, 7)]
    for step, items in enumerate(data):
        losses = []
        for m, opt, coll in ((ref, opts[0], PackedCollator(0, row_len=256)), (var, opts[1], var.collator())):
            batch = coll(items)
            opt.zero_grad(set_to_none=True)
            scores = m(batch)
            loss = F.binary_cross_entropy_with_logits(scores, (torch.arange(scores.numel()) % 3 == 0).float())
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert abs(float(losses[0] - losses[1])) <= TOL * float(losses[0]), (step, losses)
    for (n, a), b in zip(ref.named_parameters(), var.parameters()):
        assert _rel(b.detach(), a.detach()) <= TOL, n


def test_attention_dropout_applies_in_training_only(tok):
    ref, var = _pair(tok, "v3", attention_probs_dropout_prob=0.5)
    items = _sets([[30, 80, 7]], seed=9)
    batch = var.collator()(items)
    with torch.no_grad():
        _, r_scores = _reference(ref, items)
        assert _rel(var(batch), r_scores) <= TOL  # eval: no dropout
        var.train()
        a, b = var(batch), var(batch)
    assert _rel(a, b) > 1e-3 and _rel(a, r_scores) > 1e-3


def test_save_load_round_trip_keeps_weights_and_path(tmp_path, tok):
    from safetensors.torch import load_file

    ref, var = _pair(tok, "v3")
    items = _sets([[12, 250, 3]], seed=8)
    with torch.no_grad():
        before = var(var.collator()(items))
    var.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "fastrank.json").read_text())
    assert meta["packed_attention"] == "varlen" and meta["packing"] == "deberta-v2"
    assert set(load_file(str(tmp_path / "m" / "model.safetensors"))) == set(ref.state_dict())  # names unchanged
    back = Reranker.from_pretrained(tmp_path / "m")
    assert back.varlen_backend == "auto" and back.varlen
    with torch.no_grad():
        assert torch.equal(back(back.collator()(items)), before)
        # the same file loads into the plain HF block-mask model and scores the same
        ref.load_state_dict(load_file(str(tmp_path / "m" / "model.safetensors")), strict=True)
        assert _rel(ref(PackedCollator(0, row_len=256)(items)), before) <= TOL


def test_backend_choice_and_errors(monkeypatch, tok):
    cpu = torch.device("cpu")
    _, var = _pair(tok, "v3")  # head size 16: no Triton kernels, torch classes
    assert deberta_varlen.resolve_backend("auto", var.encoder, cpu) == "torch"
    assert var.encoder.encoder.backend == "torch"
    with pytest.raises(ValueError, match="head size"):
        Reranker.from_config(_config("v3"), tok, varlen_backend="triton")
    with pytest.raises(ValueError, match="varlen_backend"):
        Reranker.from_config(_config("v3"), tok, varlen_backend="cuda")
    # head size 32 has kernels: the Triton classes install (they subclass the torch ones), auto runs torch on CPU
    m = Reranker.from_config(_config("v3", num_attention_heads=2), tok, max_length=64).eval()
    assert m.encoder.encoder.backend == "triton"
    assert deberta_varlen.resolve_backend("auto", m.encoder, cpu) == "torch"
    items = _sets([[20, 5]])
    with torch.no_grad():
        auto = m(m.collator()(items))
    forced = Reranker(m.encoder, tok, varlen_backend="triton", max_length=64).eval()
    with pytest.raises(RuntimeError, match="CUDA"):
        forced(forced.collator()(items))
    torch_only = Reranker(m.encoder, tok, varlen_backend="torch", max_length=64)
    torch_only.head.load_state_dict(m.head.state_dict())
    with torch.no_grad():
        assert torch.equal(torch_only.eval()(torch_only.collator()(items)), auto)
    # without the extra: "auto" keeps the block-mask path, a forced backend is an error
    monkeypatch.setattr(deberta_varlen, "available", lambda: False)
    assert Reranker.from_config(_config("v3"), tok).varlen_backend is None
    with pytest.raises(ImportError, match=r"fastrank\[deberta\]"):
        Reranker.from_config(_config("v3"), tok, varlen_backend="torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernels)")
def test_cuda_triton_bf16_close_to_hf_fp32(tok):
    ref, var = _pair(tok, "v3", num_attention_heads=2)  # head size 32: Triton kernels
    ref, var = ref.cuda(), var.cuda()
    items = _sets(_random_lengths(0), 0)
    batch = var.collator()(items).to("cuda")
    assert deberta_varlen.resolve_backend("auto", var.encoder, batch.input_ids.device) == "triton"
    with torch.no_grad():
        r = ref(PaddedCollator(0)(items).to("cuda"))
        v32 = var(batch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            v16 = var(batch)
    assert _rel(v32, r) <= 1e-3  # the kernels' fp32 (strict) path
    assert _rel(v16, r) <= 3e-2
