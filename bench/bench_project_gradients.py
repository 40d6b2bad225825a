"""Gradient surgery over T=4 task gradients of P parameters (P up to DeBERTa-v3-base's 184M), fp32.

Run: `pytest bench/ --benchmark-only` (CUDA: the Triton kernels; CPU: the torch backend -- Gram by one BLAS
matmul, combine by torch.mv). Compared per P (one benchmark group each):
  textbook_pcgrad  per-pair PCGrad on the vectors, a host sync (.item()) per dot product (the reference)
  pcgrad, cagrad   fastrank.project_gradients: Gram pass + on-device T x T solve + combine pass, no sync
  mean             the one-pass lower bound (no surgery)
and, at P=1e8 only, the two passes on their own (gram_only, combine_only; combine_mv = torch.mv, for CUDA).
`*_cuda` variants (pcgrad_cuda, cagrad_cuda, gram_cuda, combine_cuda): backend="cuda", the native kernels of the
optional extension `fastrank._cuda` (FASTRANK_BUILD_CUDA=1, see setup.py); skipped unless it is built and on CUDA.
extra_info: min_bytes (pcgrad/cagrad: 2 reads of T*P + 1 write of P; mean/combine: 1 read + 1 write; gram: 1
read), achieved GB/s = min_bytes / median, and the machine's copy bandwidth (a P-element copy_, read + write)
for scale. The largest size is skipped on CPU when FASTRANK_BENCH_MAX_P says so (default: run everything).
"""
import os

import pytest
import torch

from fastrank.ops import project_gradients, project_gradients_reference
from fastrank.ops._backend import cuda_ext_available, resolve_backend
from fastrank.ops.project_gradients import _combine, gram_matrix, task_weights

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T = 4
SIZES = {"1e6": 1_000_000, "1e8": 100_000_000, "1.84e8": 184_000_000}
MAX_P = float(os.environ.get("FASTRANK_BENCH_MAX_P", "inf"))
_copy_gbps = {}


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=list(SIZES))
def grads(request):
    P = SIZES[request.param]
    if P > MAX_P:
        pytest.skip(f"P={P} > FASTRANK_BENCH_MAX_P={MAX_P:g}")
    # a 2^20-column random block tiled to P columns: realistic conflicts (the dot-product signs of the block), and
    # cheap to build (randn of 7e8 numbers takes longer than the benchmark). Tasks 0/1 conflict with 2/3.
    g = torch.Generator().manual_seed(0)
    block = torch.randn(1, 1 << 20, generator=g) + 0.8 * torch.randn(T, 1 << 20, generator=g)
    block[:2] *= -0.7
    x = block.to(DEVICE).repeat(1, -(-P // (1 << 20)))[:, :P].contiguous()
    del block
    yield request.param, x
    del x
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def _copy_bandwidth(x):
    P = x.shape[1]
    if P not in _copy_gbps:
        dst = torch.empty_like(x[0])
        dst.copy_(x[0])
        _sync()
        import time

        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            dst.copy_(x[1])
            _sync()
            best = min(best, time.perf_counter() - t)
        _copy_gbps[P] = 2 * x[0].numel() * x.element_size() / best / 1e9
    return _copy_gbps[P]


def _run(benchmark, fn, x, name, size, min_bytes, rounds):
    benchmark.group = f"project_gradients T={T} P={size} {x.dtype} {DEVICE.type}"
    benchmark.name = name

    def call():
        out = fn()
        _sync()
        return out

    out = benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1 if rounds > 1 else 0)
    benchmark.extra_info["min_bytes"] = min_bytes
    benchmark.extra_info["copy_GBps"] = round(_copy_bandwidth(x), 2)
    if benchmark.stats is not None:
        med = benchmark.stats.stats.median
        benchmark.extra_info["achieved_GBps"] = round(min_bytes / med / 1e9, 2)
    return out


def _skip_without_cuda_ext(impl):
    if impl.endswith("_cuda"):
        ok, why = cuda_ext_available(DEVICE)
        if not ok:
            pytest.skip(f"backend='cuda' cannot run here: {why}")


def _rounds(P, slow=False):
    if P <= 1_000_000:
        return 20
    return 2 if slow else 3


@pytest.mark.parametrize("impl", ["textbook_pcgrad", "pcgrad", "cagrad", "mean", "pcgrad_cuda", "cagrad_cuda"])
def test_project_gradients(benchmark, grads, impl):
    _skip_without_cuda_ext(impl)
    size, x = grads
    P, e = x.shape[1], x.element_size()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    fns = {
        "textbook_pcgrad": lambda: project_gradients_reference(x, "pcgrad", generator=gen()),
        "pcgrad": lambda: project_gradients(x, "pcgrad", generator=gen()),
        "cagrad": lambda: project_gradients(x, "cagrad"),
        "mean": lambda: project_gradients(x, "mean"),
        "pcgrad_cuda": lambda: project_gradients(x, "pcgrad", generator=gen(), backend="cuda"),
        "cagrad_cuda": lambda: project_gradients(x, "cagrad", backend="cuda"),
    }
    passes = 1 if impl == "mean" else 2
    out = _run(benchmark, fns[impl], x, impl, size, passes * T * P * e + P * e, _rounds(P, impl == "textbook_pcgrad"))
    if impl in ("pcgrad", "pcgrad_cuda"):  # same result as the textbook loop (same orders)
        ref = project_gradients_reference(x[:, : 1 << 20], "pcgrad", generator=gen())
        fast = project_gradients(x[:, : 1 << 20].contiguous(), "pcgrad", generator=gen(),
                                 backend="cuda" if impl == "pcgrad_cuda" else "auto")
        assert float((fast - ref).abs().max()) <= 1e-4 * float(ref.abs().max())  # both accumulate in fp32
        assert out.shape == (P,)


@pytest.mark.parametrize("part", ["gram_only", "combine_only", "combine_mv", "gram_cuda", "combine_cuda"])
def test_passes(benchmark, grads, part):
    _skip_without_cuda_ext(part)
    size, x = grads
    if size != "1e8":
        pytest.skip("pass breakdown only at P=1e8")
    P, e = x.shape[1], x.element_size()
    w = task_weights(gram_matrix(x), "pcgrad", generator=torch.Generator().manual_seed(0))
    if part == "gram_only":
        _run(benchmark, lambda: gram_matrix(x), x, part, size, T * P * e, 3)
    elif part == "combine_only":  # what project_gradients runs (CPU: torch.mv; CUDA: the Triton kernel)
        _run(benchmark, lambda: _combine(x, w, resolve_backend("auto", DEVICE)), x, part, size, T * P * e + P * e, 3)
    elif part == "gram_cuda":
        _run(benchmark, lambda: gram_matrix(x, backend="cuda"), x, part, size, T * P * e, 3)
    elif part == "combine_cuda":
        _run(benchmark, lambda: _combine(x, w, "cuda"), x, part, size, T * P * e + P * e, 3)
    else:
        _run(benchmark, lambda: torch.mv(x.T, w), x, part, size, T * P * e + P * e, 3)
