"""Environment-aware LoRA routing + per-environment gradient projection (fastrank/routing/, paper §5.6)."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastrank.config import load_config
from fastrank.data import load_bundled
from fastrank.data.bundle import dataset_path
from fastrank.data.record import write_records
from fastrank.model import PRESETS, Reranker
from fastrank.ops import pairwise_rank_loss, project_gradients
from fastrank.packing import encode_sets
from fastrank.routing import (
    ADAPTERS, GradientProjector, RoutedReranker, batch_totals, build_model, detect_divergence, env_task_losses,
    pcgrad_fire_count, routed_lora_linear_class, split_by_env,
)
from fastrank.train import train

ROOT = Path(__file__).resolve().parents[1]
ENV_ORDER = ("alfworld", "scienceworld", "webshop")  # = ENVS: task t is env id t


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(PRESETS["minilm"])


def _bert_cfg(tok, dropout=0.0):
    from transformers import BertConfig

    return BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=160, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout)


@pytest.fixture(scope="module")
def sets():
    """Three candidate sets per environment (bundled real data)."""
    return [cs for env in ENV_ORDER for cs in load_bundled(env, "train")[:3]]


def _model(tok, seed=0, **routing):
    torch.manual_seed(seed)
    m = RoutedReranker.from_config(_bert_cfg(tok), tok, max_length=96, routing=routing or None)
    with torch.no_grad():  # adapters that differ clearly from each other, and a router that is not ~uniform
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.2)
        m.router.fc2.weight.normal_(0, 0.5)
    return m.eval()


def _batch(model, sets, packed=True):
    enc = encode_sets(sets, model.tokenizer, model.featurizer, model.max_length)
    return model.collator(packed=packed)(enc)


# ----------------------------------------------------------------------------------------------- router
def test_router_weights_sum_to_one_depend_on_input_not_label(tok, sets):
    m = _model(tok)
    b = _batch(m, sets)
    with torch.no_grad():
        w = m.routing_weights(b)
    assert w.shape == (b.n_candidates, len(ADAPTERS))
    torch.testing.assert_close(w.sum(1), torch.ones(b.n_candidates), rtol=0, atol=1e-6)
    assert (w > 0).all()
    assert float(w.std(0).max()) > 1e-3  # different candidates (inputs) get different weights
    # computed from the input only: relabelling every candidate's environment changes nothing
    b2 = copy.copy(b)
    b2.env_ids = (b.env_ids + 1) % 3
    with torch.no_grad():
        assert torch.equal(m.routing_weights(b2), w)
    # per candidate: packed rows, padded rows and a candidate set scored alone agree
    with torch.no_grad():
        torch.testing.assert_close(m.routing_weights(_batch(m, sets, packed=False)), w, rtol=1e-5, atol=1e-6)
        alone = m.routing_weights(_batch(m, sets[4:5]))
    off = b.group_offsets.tolist()
    torch.testing.assert_close(alone, w[off[4]:off[5]], rtol=1e-5, atol=1e-6)
    # and the weights reach the scores: a different router output changes them
    with torch.no_grad():
        s = m(b)
        m.router.fc2.bias.add_(torch.tensor([3.0, 0, 0, 0]))
        assert not torch.allclose(m(b), s, atol=1e-4)


def test_packed_equals_padded_and_rank(tok, sets):
    m = _model(tok)
    with torch.no_grad():
        sp, sd = m(_batch(m, sets)), m(_batch(m, sets, packed=False))
    torch.testing.assert_close(sp, sd, rtol=1e-5, atol=1e-5)
    cs = sets[7]
    off = _batch(m, sets).group_offsets.tolist()
    r = m.rank(cs.goal, cs.observation, cs.candidates)
    torch.testing.assert_close(torch.tensor(r.scores), sp[off[7]:off[8]], rtol=1e-5, atol=1e-5)


def _peft_reference(m: RoutedReranker, adapter: str) -> Reranker:
    """The same weights run by peft's own lora.Linear forward with only `adapter` active."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    enc = copy.deepcopy(m.encoder)
    enc.embeddings._forward_hooks.clear()  # the router hook belongs to the routed model
    routed_cls = routed_lora_linear_class()
    n = 0
    for mod in enc.modules():
        if isinstance(mod, routed_cls):
            mod.__class__ = PeftLinear
            mod.set_adapter(adapter)
            n += 1
    assert n == 4  # query + value in 2 layers
    ref = Reranker(enc, m.tokenizer, m.featurizer, max_length=m.max_length)
    ref.head.load_state_dict(m.head.state_dict())
    return ref.eval()


def test_one_hot_routing_equals_single_adapter_lora(tok, sets):
    m = _model(tok)
    b = _batch(m, sets)
    outs = {}
    for k, name in enumerate(ADAPTERS):
        onehot = torch.zeros(len(ADAPTERS))
        onehot[k] = 1
        with torch.no_grad(), m.force_routing(onehot):
            outs[name] = m(b)
            ref = _peft_reference(m, name)(b)
        torch.testing.assert_close(outs[name], ref, rtol=1e-5, atol=1e-5)
    # the adapters really differ (so the check above would catch a wrong adapter / weight)
    assert float((outs["alfworld"] - outs["webshop"]).abs().max()) > 1e-3


def test_lora_layer_mixes_adapters_linearly(tok, sets):
    """At one layer: y(w) - Wx = sum_k w_k (y(e_k) - Wx), per token, with per-candidate weights."""
    m = _model(tok)
    b = _batch(m, sets)
    layer = m.encoder.encoder.layer[0].attention.self.query
    seen = {}
    h = layer.register_forward_hook(lambda mod, a, out: seen.__setitem__("y", out.detach().clone()))
    n = b.n_candidates
    w = torch.softmax(torch.randn(n, 4, generator=torch.Generator().manual_seed(0)) * 2, dim=1)
    ys = []
    try:
        with torch.no_grad():
            for k in range(4):
                with m.force_routing(torch.eye(4)[k]):
                    m(b)
                ys.append(seen["y"])
            with m.force_routing(torch.zeros(4)):
                m(b)
            base = seen["y"]
            with m.force_routing(w):
                m(b)
            mixed = seen["y"]
    finally:
        h.remove()
    # per-token weights: candidate n's tokens are flat cls_index[n] .. + seq_lens[n] - 1
    tw = torch.zeros(b.input_ids.numel(), 4)
    for i in range(n):
        s, length = int(b.cls_index[i]), int(b.seq_lens[i])
        tw[s:s + length] = w[i]
    tw = tw.view(*b.input_ids.shape, 4)
    expected = base + sum(tw[..., k:k + 1] * (ys[k] - base) for k in range(4))
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)


def test_deberta_routed_packed_equals_padded(tok, sets):
    """DeBERTa-v2 family: block-diagonal packed rows; relative-position projections use the shared adapter."""
    from transformers import DebertaV2Config

    torch.manual_seed(0)
    cfg = DebertaV2Config(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=160, relative_attention=True,
                          pos_att_type=["p2c", "c2p"], position_buckets=32, max_relative_positions=64,
                          share_att_key=True, position_biased_input=False, type_vocab_size=0,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # DeBERTa-v3 layout
    m = RoutedReranker.from_config(cfg, tok, max_length=96, row_len=256).eval()
    assert m.packing == "deberta-v2"
    with torch.no_grad():  # adapters that matter, a decisive router, scores of order 1
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)
        m.router.fc2.weight.normal_(0, 3.0)
        m.head.weight.normal_(0, 1.0)
        sp, sd = m(_batch(m, sets)), m(_batch(m, sets, packed=False))
    torch.testing.assert_close(sp, sd, rtol=1e-4, atol=1e-4)
    # a packed batch of exactly one row of 2 * position_buckets tokens has the relative embeddings' shape (1, 64):
    # it must still route per token (the model widens the row by one masked column)
    from fastrank.packing import EncodedSet

    g = torch.Generator().manual_seed(0)
    ids = [[101] + torch.randint(1000, 9000, (n - 2,), generator=g).tolist() + [102] for n in (30, 34)]
    item = [EncodedSet(index=0, input_ids=ids, token_type_ids=None, expert_index=0, env_id=0)]
    packed = m.collator()(item)
    assert tuple(packed.input_ids.shape) == (1, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(packed), m(m.collator(packed=False)(item)), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ per-env losses
def test_per_env_losses_sum_to_the_fused_loss(tok, sets):
    m = _model(tok)
    b = _batch(m, sets[:3] + sets[3:4] + sets[6:8])  # unbalanced: 3 alfworld, 1 scienceworld, 2 webshop sets
    scores = (2 * torch.randn(b.n_candidates, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    losses, fused, hits = env_task_losses(scores, b, [0, 1, 2])
    ref = pairwise_rank_loss(scores, b.labels, b.group_offsets)
    torch.testing.assert_close(sum(losses), ref.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused, ref.loss, rtol=1e-6, atol=1e-6)
    assert torch.equal(hits, ref.hits)
    g_sum = torch.autograd.grad(sum(losses), scores, retain_graph=True)[0]
    g_ref = torch.autograd.grad(ref.loss, scores)[0]
    torch.testing.assert_close(g_sum, g_ref, rtol=1e-5, atol=1e-7)
    # each env's loss only sees its own candidates
    for t, env in enumerate(ENV_ORDER):
        g = torch.autograd.grad(losses[t], scores, retain_graph=True)[0]
        assert (g[b.env_ids != t] == 0).all() and (g[b.env_ids == t] != 0).any(), env
    # negative control: unweighted per-env means do NOT sum to the fused loss on this batch
    naive = sum(pairwise_rank_loss(scores[b.env_ids == t], b.labels[b.env_ids == t],
                                   torch.tensor([0, *torch.cumsum(torch.diff(b.group_offsets.long())[
                                       b.env_ids[b.group_offsets[:-1].long()] == t], 0).tolist()])).loss
                for t in range(3)) / 3
    assert abs(naive.item() - ref.loss.item()) > 1e-3
    # an environment missing from the batch: None, and the rest still sums to the fused loss
    sub = _batch(m, sets[:3] + sets[6:])  # alfworld + webshop
    s2 = m(sub).detach()
    l2, f2, _ = env_task_losses(s2, sub, [0, 1, 2])
    assert l2[1] is None
    torch.testing.assert_close(f2, pairwise_rank_loss(s2, sub.labels, sub.group_offsets).loss)


# ------------------------------------------------------------------------------------------- projection
def _flat_grads(losses, params):
    rows = []
    for loss in losses:
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("method", ["pcgrad", "cagrad"])
def test_projected_grad_equals_project_gradients_on_autograd_grads(tok, sets, method):
    m = _model(tok)
    m.train()  # no dropout in the config: train mode is deterministic here
    b = _batch(m, sets)
    params = [p for p in m.parameters() if p.requires_grad]
    losses = env_task_losses(m(b), b, [0, 1, 2])[0]
    grads = _flat_grads(losses, params)
    proj = GradientProjector(params, 3, method, alpha=0.5, seed=7)
    expected = project_gradients(grads, method, generator=proj.generator(5), alpha=0.5)

    m.zero_grad(set_to_none=True)
    proj.backward(env_task_losses(m(b), b, [0, 1, 2])[0])
    torch.testing.assert_close(proj.buf.buffer, grads, rtol=1e-5, atol=1e-7)  # per-env rows = autograd.grad
    info = proj.combine(step=5)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    # .grad are views of one combined buffer (no per-parameter copies)
    ptr = params[0].grad.untyped_storage().data_ptr()
    assert all(p.grad.untyped_storage().data_ptr() == ptr for p in params)
    # diagnostics: cosine matrix from the Gram matrix
    cos = info["cos"]
    ref_cos = torch.nn.functional.cosine_similarity(grads[:, None].double(), grads[None].double(), dim=-1)
    torch.testing.assert_close(cos, ref_cos, rtol=1e-4, atol=1e-5)
    assert info["conflicts"] == sum(int(grads[i] @ grads[j] < 0) for i in range(3) for j in range(i + 1, 3))
    # negative control: the projected update is not the plain sum (unless nothing conflicts and method == pcgrad)
    if method == "cagrad" or info["conflicts"]:
        assert not torch.allclose(got, grads.sum(0), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("packed", [True, False])
def test_per_env_forward_gives_the_same_task_gradients(tok, sets, packed):
    """One forward+backward per env sub-batch == one packed forward + per-env backwards (candidates never interact)."""
    m = _model(tok).train()  # no dropout in the config
    b = _batch(m, sets, packed=packed)
    params = [p for p in m.parameters() if p.requires_grad]
    one = GradientProjector(params, 3, "pcgrad")
    one.backward(env_task_losses(m(b), b, [0, 1, 2])[0])
    subs = split_by_env(b, m.collator(packed=packed))
    assert sorted(subs) == [0, 1, 2] and sum(x.n_candidates for x in subs.values()) == b.n_candidates
    split = GradientProjector(params, 3, "pcgrad")
    full_scores = m(b).detach()
    for t in range(3):
        scores = m(subs[t])
        torch.testing.assert_close(scores.detach(), full_scores[b.env_ids == t], rtol=1e-5, atol=1e-5)
        (loss,), _, _ = env_task_losses(scores, subs[t], [t], totals=batch_totals(b))
        split.backward_task(t, loss)
    assert float(one.buf.buffer.abs().sum(1).min()) > 0
    torch.testing.assert_close(split.buf.buffer, one.buf.buffer, rtol=1e-4, atol=1e-6)


def test_pcgrad_fire_count_matches_the_vector_algorithm():
    g = torch.Generator().manual_seed(0)
    total = 0
    for trial in range(30):
        T = 2 + trial % 4
        base = torch.randn(6, generator=g)
        grads = torch.stack([torch.randn(6, generator=g) - (0.8 if i % 2 else -0.3) * base for i in range(T)]).double()
        orders = [[j for j in range(T) if j != i] for i in range(T)]
        for o in orders:
            perm = torch.randperm(len(o), generator=g).tolist()
            o[:] = [o[p] for p in perm]
        fired = 0
        for i in range(T):
            gi = grads[i].clone()
            for j in orders[i]:
                d = float(gi @ grads[j])
                if d < 0:
                    gi -= d / float(grads[j] @ grads[j]) * grads[j]
                    fired += 1
        assert pcgrad_fire_count(grads @ grads.T, orders) == fired
        total += fired
    assert total > 0


# ------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory, tok):
    from transformers import BertModel

    out = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    BertModel(_bert_cfg(tok, dropout=0.0)).save_pretrained(out)  # no dropout: per-env sub-batches == one pass
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    for env in ENV_ORDER:
        for split, n in (("train", 6), ("eval", 4)):
            write_records(dataset_path(out, env, split, "sampled"), load_bundled(env, split, "sampled")[:n])
    return str(out)


def _cfg(tiny_encoder, small_data, out, *extra):
    return load_config(ROOT / "recipes" / "router_pcgrad.yaml", [
        f"model={tiny_encoder}", f"data_dir={small_data}", f"output_dir={out}", "max_train_sets=null",
        "max_eval_sets=null", "max_tokens=700", "max_length=48", "lr=0.001", "log_every=1", "seeds=null",
        "eval_modes=[]", "save_every=0", "upsample={}", *extra])


def test_router_lr_gets_its_own_param_groups(tok):
    from fastrank.config import TrainConfig
    from fastrank.train import build_optimizer, linear_warmup

    m = _model(tok)
    opt = build_optimizer(TrainConfig(lr=1e-4, router_lr=3e-3, routing=True), m)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in m.parameters() if p.requires_grad)  # each exactly once
    router = {id(p) for p in m.router.parameters()}
    for g in opt.param_groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= router or not ids & router  # no group mixes router and other parameters
        assert g["lr"] == (3e-3 if ids & router else 1e-4)
        if ids & router:
            assert g["weight_decay"] == (0.0 if all(p.ndim < 2 for p in g["params"]) else 0.01)
    sched = linear_warmup(opt, warmup=2, total=10)  # the schedule scales both rates alike
    opt.step(), sched.step()
    assert {round(g["lr"] / g["initial_lr"], 9) for g in opt.param_groups} == {1.0}
    with pytest.raises(ValueError, match="no router"):
        build_optimizer(TrainConfig(router_lr=1e-3), Reranker.from_config(_bert_cfg(tok), tok, max_length=96))


def test_warmup_freezes_lora_while_router_and_encoder_train(tiny_encoder, small_data, tmp_path):
    from accelerate.utils import set_seed

    def init(cfg):
        set_seed(cfg.seed)
        return {k: v.detach().clone() for k, v in build_model(cfg).state_dict().items()}

    def changed(a, b, pred):
        return {k for k in a if pred(k) and not torch.equal(a[k], b[k])}

    is_lora = lambda k: ".lora_A." in k or ".lora_B." in k  # noqa: E731
    is_router = lambda k: k.startswith("router.")  # noqa: E731
    is_encoder = lambda k: k.startswith("encoder.") and not is_lora(k)  # noqa: E731

    cfg = _cfg(tiny_encoder, small_data, tmp_path / "warm", "max_steps=3", "router_warmup_steps=3", "weight_decay=0")
    w0 = init(cfg)
    res = train(cfg)
    w1 = load_file(tmp_path / "warm" / "model" / "model.safetensors")
    assert not changed(w0, w1, is_lora)  # frozen for all 3 steps
    assert changed(w0, w1, is_router) and changed(w0, w1, is_encoder) and not torch.equal(w0["head.weight"],
                                                                                          w1["head.weight"])
    assert [r["lora_frozen"] for r in res["routing_diagnostics"]["history"]] == [True, True, True]
    # control: without warm-up the same 3 steps move the LoRA weights
    cfg = _cfg(tiny_encoder, small_data, tmp_path / "cold", "max_steps=3", "router_warmup_steps=0", "weight_decay=0")
    train(cfg)
    w2 = load_file(tmp_path / "cold" / "model" / "model.safetensors")
    assert len(changed(w0, w2, is_lora)) == len([k for k in w0 if is_lora(k)])
    # and why B is not zero-initialised: with B = 0, a frozen-LoRA warm-up gives the router no gradient at all
    cfg = _cfg(tiny_encoder, small_data, tmp_path / "zero", "max_steps=2", "router_warmup_steps=2",
               "weight_decay=0", "lora_b_init_std=0")
    w0z = init(cfg)
    train(cfg)
    w3 = load_file(tmp_path / "zero" / "model" / "model.safetensors")
    assert not changed(w0z, w3, is_router) and not changed(w0z, w3, is_lora)


def test_routed_pcgrad_training_end_to_end(tiny_encoder, small_data, tmp_path):
    out = tmp_path / "run"
    res = train(_cfg(tiny_encoder, small_data, out, "max_steps=3", "router_warmup_steps=1", "eval_modes=[sampled]"))
    assert res["steps"] == 3 and all(math.isfinite(x) for x in res["history"]["loss"])
    assert "diverged" in res and isinstance(res["divergence"]["reasons"], list)
    hist = res["routing_diagnostics"]["history"]
    assert [h["step"] for h in hist] == [1, 2, 3] and [h["lora_frozen"] for h in hist] == [True, False, False]
    for h in hist:
        assert set(h["route"]) <= set(ENV_ORDER) and h["route"]
        for r in h["route"].values():
            assert abs(sum(r["mean"]) - 1) < 1e-3 and 0 <= r["entropy"] <= math.log(4) + 1e-6
        cos = h["grad_cos"]
        assert h["tasks"] == list(ENV_ORDER) and len(cos) == 3
        for i in range(3):
            if cos[i][i] is not None:
                assert abs(cos[i][i] - 1) < 1e-4
            for j in range(3):
                assert cos[i][j] == cos[j][i]
        assert 0 <= h["conflict_step_rate"] <= 1 and h["pcgrad_fired"] >= 0
    # the saved routed model loads (routing settings in fastrank.json) and ranks like the trained one
    meta = json.loads((out / "model" / "fastrank.json").read_text())
    assert meta["routing"]["r"] == 8 and meta["routing"]["alpha"] == 16
    assert meta["routing"]["adapters"] == list(ADAPTERS)
    model = Reranker.from_pretrained(out / "model")
    assert isinstance(model, RoutedReranker)
    cs = load_bundled("webshop", "eval")[0]
    assert sorted(model.rank(cs.goal, cs.observation, cs.candidates).order) == list(range(len(cs.candidates)))
    assert res["eval"]["sampled"]["combined"]["states"] == 12


@pytest.mark.parametrize("per_env_forward", [False, True])
def test_sum_projection_reproduces_plain_training(tiny_encoder, small_data, tmp_path, per_env_forward):
    """Per-env losses + buffer + all-reduce + 'sum' == the plain fused-loss step (same data, same seed)."""
    common = ["max_steps=3", "routing=false", "lr=0.0005"]
    train(_cfg(tiny_encoder, small_data, tmp_path / "plain", *common, "grad_projection=none"))
    train(_cfg(tiny_encoder, small_data, tmp_path / "sum", *common, "grad_projection=sum",
               f"per_env_forward={str(per_env_forward).lower()}"))
    a = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    b = load_file(tmp_path / "sum" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    init = load_file(Path(tiny_encoder) / "model.safetensors")
    k0 = "encoder.encoder.layer.0.attention.self.query.weight"
    assert float((a[k0] - init[k0.removeprefix("encoder.")]).abs().max()) > 1e-4  # training moved the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=k)


def test_save_load_round_trip_identical_scores(tok, sets, tmp_path):
    m = _model(tok)
    b = _batch(m, sets)
    path = m.save_pretrained(tmp_path / "routed")
    loaded = RoutedReranker.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(loaded(b), m(b))
    cs = sets[2]
    assert loaded.rank(cs.goal, cs.observation, cs.candidates).scores == m.rank(cs.goal, cs.observation,
                                                                                 cs.candidates).scores
    # Reranker.from_pretrained dispatches on the checkpoint: the adapters and the router come back too.
    via_base = Reranker.from_pretrained(path)
    assert isinstance(via_base, RoutedReranker)
    with torch.no_grad():
        assert torch.equal(via_base(b), m(b))
    with pytest.raises(FileNotFoundError, match="not a fastrank checkpoint"):
        Reranker.from_pretrained(tmp_path)
    plain = Reranker.from_config(_bert_cfg(tok), tok, max_length=96).save_pretrained(tmp_path / "plain")
    assert type(Reranker.from_pretrained(plain)) is Reranker
    with pytest.raises(ValueError, match="plain Reranker"):
        RoutedReranker.from_pretrained(plain)


def test_base_class_dispatch_needs_no_routing_import(tok, tmp_path):
    """fastrank.model does not import fastrank.routing (no cycle), yet a routed checkpoint loaded through
    the base class in a process that never imported routing comes back routed; so do folders written
    before fastrank.json recorded the class; a class outside fastrank is refused."""
    path = _model(tok).save_pretrained(tmp_path / "routed")
    meta = json.loads((path / "fastrank.json").read_text())
    assert meta["class"] == "fastrank.routing.model:RoutedReranker"
    code = ("import sys; from fastrank.model import Reranker; assert 'fastrank.routing' not in sys.modules; "
            f"print(type(Reranker.from_pretrained({str(path)!r})).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "RoutedReranker"
    old = {k: v for k, v in meta.items() if k != "class"}
    (path / "fastrank.json").write_text(json.dumps(old))
    assert isinstance(Reranker.from_pretrained(path), RoutedReranker)
    (path / "fastrank.json").write_text(json.dumps({**meta, "class": "os:system"}))
    with pytest.raises(ValueError, match="not a fastrank Reranker class"):
        Reranker.from_pretrained(path)


# ------------------------------------------------------------------------------------------- divergence
def test_divergence_detector_on_crafted_histories():
    def epochs(means, per=20, noise=0.02, seed=0):
        g = torch.Generator().manual_seed(seed)
        xs = []
        for mu in means:
            xs += (mu + noise * torch.randn(per, generator=g)).tolist()
        return list(range(1, len(xs) + 1)), xs, per

    # the paper's collapsed seed 123: 0.927 -> 1.251 -> 1.196 per epoch
    d = detect_divergence(*epochs([0.927, 1.251, 1.196]))
    assert d["diverged"] and "epoch 2" in d["reasons"][0] and len(d["epoch_loss"]) == 3
    # healthy seeds: decreasing epoch means, noisy steps
    assert not detect_divergence(*epochs([0.95, 0.70, 0.62]))["diverged"]
    # a healthy single epoch: fast drop then a plateau with noise
    steps = list(range(1, 61))
    loss = [1.0 * math.exp(-s / 10) + 0.4 + 0.02 * math.sin(s) for s in steps]
    assert not detect_divergence(steps, loss, 60)["diverged"]
    # one epoch that goes down and then climbs back up (no epoch boundary to compare)
    loss = [1.0 - 0.01 * s if s <= 30 else 0.7 + 0.015 * (s - 30) for s in steps]
    d = detect_divergence(steps, loss, 60)
    assert d["diverged"] and "within the last epoch" in d["reasons"][0]
    # NaN
    assert detect_divergence([1, 2, 3], [1.0, float("nan"), 1.0], 10)["diverged"]
    # too few, noisy points are not judged: a healthy CPU run logged every 10 steps (single-batch losses)
    assert not detect_divergence([10, 20, 30, 40, 50, 52], [0.877, 0.512, 0.551, 0.592, 0.574, 0.737], 52)["diverged"]
    # flat noise over two short epochs: a 10 % rise of one epoch mean over the other is batch noise, not divergence
    flagged = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        xs = (0.6 + 0.1 * torch.randn(10, generator=g)).tolist()
        flagged += detect_divergence(list(range(1, 11)), xs, 5)["diverged"]
    assert flagged <= 2  # (4 of these 40 without the noise guard, 1 with it)
    # while a real rise between two short epochs is still caught
    assert detect_divergence(list(range(1, 11)), [0.60, 0.62, 0.58, 0.61, 0.59, 0.80, 0.83, 0.79, 0.82, 0.81],
                             5)["diverged"]
    # tolerance: a 5 % epoch rise is noise at tol 0.1 but divergence at tol 0.02
    assert not detect_divergence(*epochs([1.0, 1.05], noise=0.0))["diverged"]
    assert detect_divergence(*epochs([1.0, 1.05], noise=0.0), tol=0.02)["diverged"]


def test_diverged_run_is_reported_loudly(tmp_path, capsys):
    from fastrank.routing import report_divergence

    res = {"history": {"steps": [1, 2, 3, 4, 5, 6], "loss": [1.0, 0.9, 0.95, 1.3, 1.4, 1.5]}}
    with pytest.warns(RuntimeWarning, match="DIVERGED"):
        report_divergence(res, steps_per_epoch=3, tol=0.1, out=tmp_path)
    assert res["diverged"] is True and (tmp_path / "DIVERGED.txt").exists()
    assert "TRAINING DIVERGED" in capsys.readouterr().out


@pytest.mark.slow
def test_routed_resume_is_bit_for_bit(tiny_encoder, small_data, tmp_path):
    """Resuming mid-run (after the LoRA warm-up switch, PCGrad orders seeded per step) ends with identical weights."""
    import shutil

    args = ["max_steps=6", "save_every=3", "router_warmup_steps=2", "eval_modes=[]"]
    full = tmp_path / "full"
    res_full = train(_cfg(tiny_encoder, small_data, full, *args))
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint", resumed / "checkpoint")
    res = train(_cfg(tiny_encoder, small_data, resumed, *args, "resume=true"))
    a, b = load_file(full / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert res["steps"] == 6 and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert res["routing_diagnostics"]["history"] == res_full["routing_diagnostics"]["history"]


# ------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
@pytest.mark.parametrize("per_env_forward", [False, True])
def test_two_cpu_processes_keep_routed_parameters_identical(tiny_encoder, small_data, tmp_path, per_env_forward):
    """2 gloo processes: per-env backward under no_sync, one all-reduce of the (T, P) buffer, same PCGrad orders."""
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "recipes" / "router_pcgrad.py"), "--no-baseline", f"model={tiny_encoder}",
           f"data_dir={small_data}", f"output_dir={out}", "max_train_sets=null", "max_eval_sets=null",
           "max_tokens=1200", "max_length=64", "max_steps=4", "router_warmup_steps=2", "eval_modes=[sampled]",
           "seeds=[42]", "upsample={}", "lr=0.001", "log_every=1", "save_every=0",
           f"per_env_forward={str(per_env_forward).lower()}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "routed" / "seed_42" / "results.json").read_text())
    sums = res["rank_param_checksums"]
    assert res["steps"] == 4 and len(sums) == 2 and sums[0] == sums[1]
    assert res["eval"]["sampled"]["combined"]["states"] == 12
    hist = res["routing_diagnostics"]["history"]
    assert [h["lora_frozen"] for h in hist] == [True, True, False, False]
    assert (out / "comparison.md").exists()


def test_comparison_table_shows_the_lexical_floor(small_data):
    from types import SimpleNamespace

    from fastrank.lexical_floor import floor_for_run, mean_floor
    from fastrank.routing.compare import _comparison_md

    configs = [{"data_dir": str(small_data), "seed": s, "max_eval_sets": 4, "eval_modes": ["sampled"]} for s in (1, 2)]
    floor = mean_floor(configs)
    want = sum(floor_for_run(c)["sampled"]["alfworld"]["net_gain"] for c in configs) / 2
    assert floor["sampled"]["alfworld"] == pytest.approx(want)
    assert mean_floor([{"data_dir": "/no/such/dir", "eval_modes": ["sampled"]}]) == {}
    agg = {"sampled": {env: {"net_gain_mean": 0.5, "net_gain_std": 0.0, "values": [0.5, 0.5]}
                       for env in floor["sampled"]}}
    arm = {"diverged_seeds": [], "aggregate": agg, "aggregate_non_diverged": None, "train_seconds": [1, 1]}
    cfg = SimpleNamespace(routing=True, lora_r=8, lora_alpha=16, router_warmup_steps=0, grad_projection="none",
                          output_dir="out", model="tiny", envs=["alfworld"])
    md = _comparison_md({"seeds": [1, 2], "arms": {"routed": arm, "baseline": arm}, "lexical_floor": floor}, cfg)
    assert f"| +0.000 | {floor['sampled']['alfworld']:+.3f} |" in md and "Lexical floor" in md
