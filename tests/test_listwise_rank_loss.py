"""listwise_rank_loss: Triton kernel (under TRITON_INTERPRET=1, set by conftest) and torch path vs the reference."""
import importlib
import math

import pytest
import torch

from fastrank.ops import listwise_rank_loss, listwise_rank_loss_reference, pairwise_rank_loss
from tests.test_pairwise_rank_loss import make_batch, random_sizes, run

lrl = importlib.import_module("fastrank.ops.listwise_rank_loss")  # the package re-export shadows the module

BACKENDS = ["triton", "torch"]
MIXES = {  # (temperature, list_weight, pair_weight, point_weight, margin)
    "listnet": (1.0, 1.0, 0.0, 0.0, 0.0),
    "infonce_t0.05": (0.05, 1.0, 0.0, 0.0, 0.0),
    "t3": (3.0, 0.7, 0.0, 0.0, 0.0),
    "mixed": (0.5, 1.0, 0.5, 0.25, 0.3),
    "pair_only": (1.0, 0.0, 1.0, 0.5, 0.0),
}


def kw_of(mix):
    t, lw, pw, ptw, m = MIXES[mix]
    return dict(temperature=t, list_weight=lw, pair_weight=pw, point_weight=ptw, margin=m)


def check(scores, labels, offsets, backend, grad_tol=None, ref_dtype=torch.float32, **kw):
    out, grad = run(listwise_rank_loss, scores, labels, offsets, backend=backend, **kw)
    ref, ref_grad = run(listwise_rank_loss_reference, scores.to(ref_dtype), labels, offsets, **kw)
    ref, ref_grad = type(ref)(ref.loss.float(), ref.hits), ref_grad.float()
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    assert out.hits.dtype == torch.bool and out.hits.shape == (offsets.numel() - 1,)
    assert grad.dtype == scores.dtype and grad.shape == scores.shape
    assert torch.isfinite(out.loss) and torch.isfinite(grad.float()).all()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.hits, ref.hits)
    if grad_tol is None:
        grad_tol = dict(rtol=1e-4, atol=1e-7) if scores.dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad, **grad_tol)
    return out, grad


SIZE_CASES = {
    "random": random_sizes(150),
    "all_1": [1] * 7,
    "all_2": [2] * 100,
    "all_20": [20] * 70,
    "one_257": [257],  # several BLOCK_C chunks: exercises the online logsumexp rescaling
    "mixed": [1, 257, 2, 20, 3, 1, 9, 64, 2, 33, 1, 5] * 6,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SIZE_CASES))
@pytest.mark.parametrize("mix", ["listnet", "mixed"])
def test_matches_reference_sizes(case, mix, backend):
    check(*make_batch(SIZE_CASES[case], seed=len(case)), backend, **kw_of(mix))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix", list(MIXES))
def test_weights_and_temperature(mix, backend):
    check(*make_batch(random_sizes(90, seed=3)), backend, ref_dtype=torch.float64, **kw_of(mix))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pos", ["first", "last", "middle"])
def test_positive_position(pos, backend):
    check(*make_batch(SIZE_CASES["mixed"][:12], pos=pos), backend, **kw_of("mixed"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype, backend):
    check(*make_batch(SIZE_CASES["mixed"], dtype=dtype), backend, **kw_of("mixed"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("labels_dtype", [torch.bool, torch.uint8, torch.float32])
def test_offsets_and_labels_dtypes(offsets_dtype, labels_dtype, backend):
    batch = make_batch(random_sizes(70, seed=4), offsets_dtype=offsets_dtype, labels_dtype=labels_dtype)
    check(*batch, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.05])
def test_extreme_scores_stay_finite(dtype, temperature, backend):
    scores, labels, offsets = make_batch(SIZE_CASES["mixed"][:12], dtype=dtype)
    scores = (torch.sign(scores.float()) * 1e4).to(dtype)  # exp(+-1e4 / T) overflows any naive softmax
    scores[::7] = 0.5
    # fp64 reference: an fp32 softmax of s/T at |s/T| = 2e5 is itself off by the ulp of s/T (0.016)
    out, _ = check(scores, labels, offsets, backend, temperature=temperature, pair_weight=0.5, point_weight=0.5,
                   ref_dtype=torch.float64)
    assert out.loss > 1e3  # violations of ~1e4 must show in the loss, not saturate or vanish


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_empty_batch(backend):
    s = torch.zeros(0, requires_grad=True)
    fn = listwise_rank_loss_reference if backend == "reference" else listwise_rank_loss
    kw = {} if backend == "reference" else {"backend": backend}
    out = fn(s, torch.zeros(0), torch.zeros(1, dtype=torch.int64), point_weight=0.5, **kw)
    assert out.loss.item() == 0.0 and out.hits.shape == (0,)
    out.loss.backward()
    assert s.grad is not None and s.grad.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_value(backend):
    # group 0: [2 (pos), 0]; group 1: singleton (no list/pair term, not counted in G'); group 2: [1, 1 (pos), -1]
    scores = torch.tensor([2.0, 0.0, -1.0, 1.0, 1.0, -1.0], requires_grad=True)
    labels = torch.tensor([1, 0, 1, 0, 1, 0])
    offsets = torch.tensor([0, 2, 3, 6])
    t = 0.5
    ce0 = math.log(math.exp(2 / t) + math.exp(0)) - 2 / t
    ce2 = math.log(2 * math.exp(1 / t) + math.exp(-1 / t)) - 1 / t
    out = listwise_rank_loss(scores, labels, offsets, temperature=t, backend=backend)
    assert out.loss.item() == pytest.approx((ce0 + ce2) / 2, rel=1e-6)
    assert out.hits.tolist() == [True, True, False]  # a tie is not a hit
    out.loss.backward()
    # d/ds_i = softmax_i / (T G') for negatives, (softmax_pos - 1) / (T G') for the positive; singleton: 0
    p0 = torch.softmax(torch.tensor([2.0, 0.0]) / t, 0)
    p2 = torch.softmax(torch.tensor([1.0, 1.0, -1.0]) / t, 0)
    want = torch.cat([p0 - torch.tensor([1.0, 0]), torch.zeros(1), p2 - torch.tensor([0, 1.0, 0])]) / (2 * t)
    torch.testing.assert_close(scores.grad, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_only_equals_pairwise_op(backend):
    scores, labels, offsets = make_batch(random_sizes(80, seed=9))
    a, ga = run(listwise_rank_loss, scores, labels, offsets, list_weight=0.0, pair_weight=1.0, point_weight=0.5,
                margin=0.2, backend=backend)
    b, gb = run(pairwise_rank_loss, scores, labels, offsets, margin=0.2, point_weight=0.5, backend=backend)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(ga, gb)
    assert torch.equal(a.hits, b.hits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_is_shift_invariant_per_group(backend):
    # softmax CE only sees score differences within a group: shifting one group by +500 changes nothing
    scores, labels, offsets = make_batch([3, 5, 20, 2])
    shifted = scores.clone()
    shifted[3:8] += 500.0
    a = listwise_rank_loss(scores, labels, offsets, backend=backend).loss
    b = listwise_rank_loss(shifted, labels, offsets, backend=backend).loss
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_scales_with_grad_output(backend):
    scores, labels, offsets = make_batch(random_sizes(40, seed=5))
    _, grad = run(listwise_rank_loss, scores, labels, offsets, backend=backend, **kw_of("mixed"))
    s = scores.clone().requires_grad_()
    (listwise_rank_loss(s, labels, offsets, backend=backend, **kw_of("mixed")).loss * -3.0).backward()
    torch.testing.assert_close(s.grad, -3.0 * grad)


def test_non_contiguous_scores():
    scores, labels, offsets = make_batch(random_sizes(50, seed=6))
    wide = torch.stack([scores, torch.full_like(scores, 1e3)], dim=1).reshape(-1)[::2]
    assert not wide.is_contiguous()
    check(wide, labels, offsets, "triton")


def test_one_launch(monkeypatch):
    grids = []
    kernel = lrl._listwise_rank_loss_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(lrl, "_listwise_rank_loss_kernel", Spy())
    sizes = random_sizes(300, seed=8) + [257]
    check(*make_batch(sizes), "triton", **kw_of("mixed"))
    assert grids == [(math.ceil(len(sizes) / lrl.BLOCK_G),)]


def test_gradcheck_fp64():
    scores, labels, offsets = make_batch([1, 3, 5, 2, 4], dtype=torch.float64)
    s = scores.requires_grad_()
    kw = kw_of("mixed")
    assert torch.autograd.gradcheck(lambda x: listwise_rank_loss_reference(x, labels, offsets, **kw).loss.double(), s)
    assert torch.autograd.gradcheck(
        lambda x: listwise_rank_loss(x, labels, offsets, backend="torch", **kw).loss.double(), s)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_wrong_positive_count_names_group(backend):
    scores, labels, offsets = make_batch([3, 4, 5, 2], pos="first")
    labels[7:12] = 0  # group 2 = scores[7:12] has no positive
    fn = listwise_rank_loss_reference if backend == "reference" else listwise_rank_loss
    kw = {} if backend == "reference" else {"backend": backend}
    with pytest.raises(ValueError, match=r"group 2 \(scores\[7:12\]\)"):
        fn(scores, labels, offsets, **kw)


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(temperature=-1.0), dict(pair_weight=-0.1)])
def test_bad_weights_raise(bad):
    scores, labels, offsets = make_batch([3, 2])
    with pytest.raises(ValueError, match=next(iter(bad))):
        listwise_rank_loss(scores, labels, offsets, **bad)


def test_forced_cuda_raises_clearly():
    scores, labels, offsets = make_batch([3, 2])
    with pytest.raises(RuntimeError, match="no compiled CUDA kernel"):
        listwise_rank_loss(scores, labels, offsets, backend="cuda")


def test_train_config_selects_the_objective():
    # `loss=` in TrainConfig picks the op in the training step; pairwise stays the default (the paper's loss)
    from types import SimpleNamespace

    from fastrank.config import TrainConfig, load_config
    from fastrank.train import rank_loss

    scores, labels, offsets = make_batch(random_sizes(30, seed=11))
    batch = SimpleNamespace(labels=labels, group_offsets=offsets)
    assert TrainConfig().loss == "pairwise"
    got = rank_loss(TrainConfig(), scores, batch).loss
    torch.testing.assert_close(got, pairwise_rank_loss(scores, labels, offsets).loss)
    cfg = load_config(None, ["loss=listwise", "temperature=0.5", "list_mix_pairwise=0.3", "list_mix_point=0.2",
                             "margin=0.1"])
    want = listwise_rank_loss_reference(scores, labels, offsets, temperature=0.5, pair_weight=0.3, point_weight=0.2,
                                        margin=0.1).loss
    torch.testing.assert_close(rank_loss(cfg, scores, batch).loss, want)
    with pytest.raises(ValueError, match="loss must be one of"):
        rank_loss(TrainConfig(loss="listnet"), scores, batch)


def test_recipe_summary_line():
    # the recipe's last line: report path, combined net gain per eval mode, throughput (issue 14)
    from pathlib import Path

    from fastrank.train import summary_line

    one = {"eval": {"sampled": {"combined": {"net_gain": 0.5531}}, "hard": {"combined": {"net_gain": -0.02}}},
           "candidates_per_s": 15.64}
    line = summary_line(Path("runs/x/report.md"), one)
    assert line == "report: runs/x/report.md | net gain (combined) sampled +0.553, hard -0.020 | 15.6 candidates/s"
    agg = {"seeds": {1: {"candidates_per_s": 10.0}, 2: {"candidates_per_s": 12.0}},
           "aggregate": {"sampled": {"combined": {"net_gain_mean": 0.4, "net_gain_std": 0.05}}}}
    want = "report: r.md | net gain (combined) sampled +0.400±0.050 | 11.0 candidates/s"
    assert summary_line(Path("r.md"), agg) == want
