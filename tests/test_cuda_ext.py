"""The optional native CUDA extension `fastrank._cuda` (kernels/, backend="cuda").

(a) The sources compile: each .cu with nvcc for sm_80 and sm_90 against the installed torch headers, and the
    bindings with the host C++ compiler. No GPU needed, so this is what runs on a CPU machine with nvcc.
(b) The kernels against the reference and the other backends, on the Triton tests' adversarial inputs. These need a
    CUDA GPU *and* the built extension (FASTRANK_BUILD_CUDA=1 pip install --no-build-isolation -e .); they are
    skipped otherwise, with the reason. There is deliberately no CPU stand-in for the kernels.
(c) Routing: a forced backend="cuda" that cannot run is an error; "auto" never picks the extension.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch

from fastrank.ops import _backend, gram_matrix, pairwise_rank_loss, project_gradients
from fastrank.ops.project_gradients import _combine, task_weights

# the Triton tests' batches and reference check, reused as they are (tests/ is on sys.path under pytest)
from test_pairwise_rank_loss import SIZE_CASES, check_against_reference, make_batch, random_sizes, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
CU_SOURCES = sorted(p.name for p in KERNELS.glob("*.cu"))
ARCHS = ("80", "90")


# ------------------------------------------------------------------------------------------- (a) compilation
def _torch_compile_flags():
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    flags = [f"-I{p}" for p in include_paths()]
    # A CPU wheel ships the c10/cuda headers but not the header CMake generates for a CUDA build (its only content
    # is a Windows export macro); this define is c10's own switch for building without it.
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in include_paths()):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags, list(COMMON_NVCC_FLAGS)


@pytest.fixture(scope="module")
def compiled():
    """Compile every source at once (separate processes, so the 2-3 compilers share the cores); {name: result}."""
    nvcc = shutil.which("nvcc")
    cxx = shutil.which("c++") or shutil.which("g++")
    includes, nvcc_flags = _torch_compile_flags()
    out = Path(tempfile.mkdtemp(prefix="fastrank_cuda_objs_"))
    cmds = {}
    for name in CU_SOURCES if nvcc else []:
        gencode = [f for a in ARCHS for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
        cmds[name] = [nvcc, "-c", "-std=c++17", *includes, *nvcc_flags, "-O3", "-Xcompiler", "-fPIC",
                      "-Xptxas", "-v", *gencode, str(KERNELS / name), "-o", str(out / f"{name}.o")]
    if cxx:
        cmds["bindings.cpp"] = [cxx, "-c", "-std=c++17", "-fPIC", "-O2", "-Wall", *includes,
                                f"-I{sysconfig.get_paths()['include']}", "-DTORCH_EXTENSION_NAME=_cuda",
                                "-DTORCH_API_INCLUDE_EXTENSION_H", str(KERNELS / "bindings.cpp"),
                                "-o", str(out / "bindings.o")]
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, c in cmds.items()}
    results = {k: (p.wait(timeout=600), p.stdout.read(), " ".join(cmds[k])) for k, p in procs.items()}
    yield results, out
    shutil.rmtree(out, ignore_errors=True)


def _own_warnings(log):
    return [line for line in log.splitlines() if str(KERNELS) in line and "warning" in line.lower()]


@pytest.mark.slow  # ~75 s for the three compiles on the shared 2-core machine (~65 s of CPU)
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CU_SOURCES)
def test_cu_source_compiles_for_sm80_and_sm90(compiled, source):
    results, out = compiled
    rc, log, cmd = results[source]
    assert rc == 0, f"{cmd}\n{log[-6000:]}"
    assert (out / f"{source}.o").stat().st_size > 0
    assert not _own_warnings(log), "\n".join(_own_warnings(log))
    # ptxas -v: one report per kernel and architecture; a register spill would mean local-memory traffic
    for arch in ARCHS:
        assert f"for 'sm_{arch}'" in log, f"no sm_{arch} code in {source}"
    spills = re.findall(r"(\d+) bytes spill stores", log)
    assert spills and all(s == "0" for s in spills), f"register spills in {source}: {spills}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no host C++ compiler")
def test_bindings_compile_and_match_the_kernels(compiled):
    results, out = compiled
    rc, log, cmd = results["bindings.cpp"]
    assert rc == 0, f"{cmd}\n{log[-6000:]}"
    assert not _own_warnings(log), "\n".join(_own_warnings(log))
    nm = shutil.which("nm")
    if nm is None or not all((out / f"{s}.o").exists() for s in CU_SOURCES):
        return
    # what the bindings call must be exactly what the kernel objects define (same names, same signatures)
    def symbols(obj, flag):
        return set(subprocess.run([nm, flag, str(obj)], capture_output=True, text=True, check=True).stdout.split())

    needed = {s for s in symbols(out / "bindings.o", "-u") if s.startswith("_ZN8fastrank")}
    defined = set().union(*(symbols(out / f"{s}.o", "--defined-only") for s in CU_SOURCES))
    assert len(needed) == 3 and needed <= defined, needed - defined


# ------------------------------------------------------------------------------------------- (b) on a GPU
_ext_ok, _ext_why = _backend.cuda_ext_available(torch.device("cuda"))
_skip_reason = "no CUDA GPU on this machine" if not torch.cuda.is_available() else _ext_why
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and _ext_ok),
                               reason=f"needs a CUDA GPU and the built extension: {_skip_reason}")
DEV = torch.device("cuda")


def _cuda(batch):
    return tuple(t.to(DEV) for t in batch)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(SIZE_CASES))
def test_rank_loss_matches_reference_sizes(case, dtype):
    check_against_reference(*_cuda(make_batch(SIZE_CASES[case], seed=len(case), dtype=dtype)), "cuda")


@needs_gpu
@pytest.mark.parametrize("pos", ["first", "last", "middle"])
@pytest.mark.parametrize("margin,point_weight", [(0.0, 0.5), (0.0, 0.0), (1.0, 1.0), (-0.5, 0.5), (2.5, 0.25)])
def test_rank_loss_margin_point_weight_and_positive_position(pos, margin, point_weight):
    batch = _cuda(make_batch(SIZE_CASES["mixed"], pos=pos, seed=3))
    check_against_reference(*batch, "cuda", margin=margin, point_weight=point_weight)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rank_loss_half_precision(dtype):
    check_against_reference(*_cuda(make_batch(SIZE_CASES["mixed"], dtype=dtype)), "cuda", margin=0.3)


@needs_gpu
@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("labels_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32,
                                          torch.bfloat16, torch.float16, torch.float64])
def test_rank_loss_offsets_and_labels_dtypes(offsets_dtype, labels_dtype):
    batch = make_batch(random_sizes(70, seed=4), offsets_dtype=offsets_dtype, labels_dtype=labels_dtype)
    check_against_reference(*_cuda(batch), "cuda")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_loss_extreme_scores_stay_finite(dtype):
    scores, labels, offsets = make_batch(SIZE_CASES["mixed"][:12], dtype=dtype)
    scores = (torch.sign(scores.float()) * 1e4).to(dtype)
    scores[::7] = 0.5
    out, _ = check_against_reference(*_cuda((scores, labels, offsets)), "cuda", margin=1.0)
    assert out.loss > 1e3


@needs_gpu
def test_rank_loss_empty_batch():
    s = torch.zeros(0, device=DEV, requires_grad=True)
    out = pairwise_rank_loss(s, torch.zeros(0, device=DEV), torch.zeros(1, dtype=torch.int64, device=DEV),
                             backend="cuda")
    assert out.loss.item() == 0.0 and out.hits.shape == (0,)
    out.loss.backward()
    assert s.grad is not None and s.grad.shape == (0,)


@needs_gpu
def test_rank_loss_ties_singletons_and_no_negatives():
    # tie 1 vs 1 is a miss; a singleton is a hit and has no pair term (G' counts groups of size > 1 only)
    scores = torch.tensor([2.0, 0.0, -1.0, 1.0, 1.0], device=DEV)
    labels = torch.tensor([1, 0, 1, 0, 1], device=DEV)
    offsets = torch.tensor([0, 2, 3, 5], device=DEV)
    out, _ = check_against_reference(scores, labels, offsets, "cuda", margin=0.1)
    assert out.hits.tolist() == [True, True, False]
    out, _ = check_against_reference(*_cuda(make_batch([1] * 5)), "cuda", point_weight=2.0)
    assert out.hits.all()


@needs_gpu
def test_rank_loss_backward_scales_noncontiguous_and_validate_false():
    scores, labels, offsets = _cuda(make_batch(random_sizes(40, seed=5)))
    _, grad = run(pairwise_rank_loss, scores, labels, offsets, backend="cuda")
    s = scores.clone().requires_grad_()
    (pairwise_rank_loss(s, labels, offsets, backend="cuda").loss * -3.0).backward()
    torch.testing.assert_close(s.grad, -3.0 * grad)
    wide = torch.stack([scores, torch.full_like(scores, 1e3)], dim=1).reshape(-1)[::2]
    check_against_reference(wide, labels, offsets, "cuda")
    a = pairwise_rank_loss(scores, labels, offsets, backend="cuda")
    b = pairwise_rank_loss(scores, labels, offsets, backend="cuda", validate=False)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.hits, b.hits)


@needs_gpu
def test_rank_loss_bitwise_reproducible_and_agrees_with_triton():
    batch = _cuda(make_batch(random_sizes(3000, seed=9) + [257, 1, 2]))
    (a, ga), (b, gb) = (run(pairwise_rank_loss, *batch, backend="cuda", margin=0.2) for _ in range(2))
    assert torch.equal(a.loss, b.loss) and torch.equal(ga, gb) and torch.equal(a.hits, b.hits)
    small = _cuda(make_batch(SIZE_CASES["mixed"], seed=2))  # TRITON_INTERPRET=1 (conftest) makes Triton slow
    (c, gc), (t, gt) = (run(pairwise_rank_loss, *small, backend=k, margin=0.2) for k in ("cuda", "triton"))
    torch.testing.assert_close(c.loss, t.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gc, gt, rtol=1e-4, atol=1e-7)
    assert torch.equal(c.hits, t.hits)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("P", [1, 255, 4097, 300_001])
def test_gram_and_combine_match_float64(dtype, T, P):
    x = torch.randn(T, P, generator=torch.Generator().manual_seed(T * P)).to(dtype).to(DEV)
    x64 = x.double()
    G = gram_matrix(x, backend="cuda")
    assert G.dtype == torch.float32 and G.shape == (T, T)
    assert torch.equal(G, G.T)  # G[i, j] and G[j, i] are one sum
    n = x64.norm(dim=1)
    assert float(((G.double() - x64 @ x64.T).abs() / (n[:, None] * n[None, :])).max()) <= 1e-5
    w = torch.linspace(-1.0, 2.0, T, device=DEV)
    out = _combine(x, w, "cuda")
    assert out.dtype == dtype and out.shape == (P,)
    ref = w.double() @ x64
    tol = 2e-6 if dtype == torch.float32 else 8e-3  # bf16/fp16: one rounding of the fp32 result
    assert float((out.double() - ref).abs().max()) <= tol * float(ref.abs().max())
    torch.testing.assert_close(gram_matrix(x, backend="cuda"), G, rtol=0, atol=0)  # reproducible


@needs_gpu
def test_gram_combine_strided_rows_empty_and_project_gradients():
    big = torch.randn(4, 9000, device=DEV)
    x = big[:, 1:7001]  # row stride 9000: read in place
    torch.testing.assert_close(gram_matrix(x, backend="cuda").double(), x.double() @ x.double().T, rtol=1e-5,
                               atol=1e-3)
    torch.testing.assert_close(project_gradients(x, "sum", backend="cuda").double(), x.double().sum(0), rtol=1e-6,
                               atol=1e-5)
    assert torch.equal(gram_matrix(torch.zeros(3, 0, device=DEV), backend="cuda"), torch.zeros(3, 3, device=DEV))
    g = torch.randn(5, 20001, generator=torch.Generator().manual_seed(1)).to(DEV)
    g[:2] *= -0.5
    for method in ("pcgrad", "cagrad", "mean"):
        kw = {"generator": torch.Generator().manual_seed(0)} if method == "pcgrad" else {}
        a = project_gradients(g, method, backend="cuda", **kw)
        kw = {"generator": torch.Generator().manual_seed(0)} if method == "pcgrad" else {}
        b = project_gradients(g.cpu(), method, backend="torch", **kw)
        assert float((a.cpu() - b).abs().max()) <= 1e-4 * float(b.abs().max()), method


@needs_gpu
def test_extension_argument_checks():
    ext = _backend.cuda_ext()
    s, y, o = _cuda(make_batch([3, 2]))
    with pytest.raises(RuntimeError, match="scores must be a CUDA tensor"):
        ext.pairwise_rank_loss_forward(s.cpu(), y, o, 0.0, 0.5)
    with pytest.raises(RuntimeError, match="scores must be float32, float16 or bfloat16"):
        ext.pairwise_rank_loss_forward(s.double(), y, o, 0.0, 0.5)
    with pytest.raises(RuntimeError, match="scores must be contiguous"):
        ext.pairwise_rank_loss_forward(torch.stack([s, s], 1)[:, 0], y, o, 0.0, 0.5)
    with pytest.raises(RuntimeError, match="group_offsets must be a 1-D int32/int64"):
        ext.pairwise_rank_loss_forward(s, y, o.float(), 0.0, 0.5)
    with pytest.raises(RuntimeError, match="1 <= T <= 16"):
        ext.gram_matrix(torch.zeros(17, 4, device=DEV))
    with pytest.raises(RuntimeError, match="unit stride along P"):
        ext.gram_matrix(torch.zeros(4, 3, device=DEV).T)
    with pytest.raises(RuntimeError, match="weights must be a float32"):
        ext.combine(torch.zeros(2, 5, device=DEV), torch.zeros(3, device=DEV))


# ------------------------------------------------------------------------------------------- (c) routing, on CPU
def test_forced_cuda_backend_on_cpu_is_an_error():
    scores, labels, offsets = make_batch([3, 2, 1])
    x = torch.randn(3, 100)
    for call in (lambda: pairwise_rank_loss(scores, labels, offsets, backend="cuda"),
                 lambda: project_gradients(x, "pcgrad", backend="cuda"),
                 lambda: gram_matrix(x, backend="cuda"),
                 lambda: task_weights(x @ x.T, "cagrad", backend="cuda")):
        with pytest.raises(RuntimeError, match=r"backend='cuda' was forced but cannot run: .*needs CUDA tensors"):
            call()
    if not _ext_ok:  # and the other half of the reason, when the extension is missing too
        with pytest.raises(RuntimeError, match="FASTRANK_BUILD_CUDA=1"):
            pairwise_rank_loss(scores, labels, offsets, backend="cuda")


@pytest.mark.skipif(_ext_ok, reason="the extension is built here")
def test_forced_cuda_backend_without_extension_names_the_build():
    # a CUDA device object needs no GPU: what fails is the missing extension, and the message says how to build it
    with pytest.raises(RuntimeError, match=r"fastrank\._cuda is not built.*FASTRANK_BUILD_CUDA=1 pip install "
                                           r"--no-build-isolation -e \."):
        _backend.resolve_backend("cuda", torch.device("cuda"))
    with pytest.raises(RuntimeError, match="not built"):
        _backend.cuda_ext()


def test_auto_never_picks_the_extension(monkeypatch):
    monkeypatch.setattr(_backend, "cuda_ext_available", lambda device: (device.type == "cuda", ""))
    assert _backend.resolve_backend("cuda", torch.device("cuda")) == "cuda"
    assert _backend.resolve_backend("auto", torch.device("cuda")) == "triton"
    assert _backend.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve_backend("cuda_ext", torch.device("cuda"))


def test_validation_stays_in_python_before_the_backend():
    scores, labels, offsets = make_batch([3, 4, 5, 2], pos="first")
    labels[7:12] = 0  # group 2 = scores[7:12] has no positive
    with pytest.raises(ValueError, match=r"group 2 \(scores\[7:12\]\)"):
        pairwise_rank_loss(scores, labels, offsets, backend="cuda")


def _run_setup(env_extra):
    env = {k: v for k, v in os.environ.items() if k != "FASTRANK_BUILD_CUDA"} | env_extra
    code = ("import runpy, sys; sys.argv = ['setup.py', '--name']; runpy.run_path('setup.py', run_name='__main__');"
            " print('torch imported:', 'torch' in sys.modules)")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_setup_py_default_install_is_unchanged():
    res = _run_setup({})
    assert res.returncode == 0, res.stderr
    assert "fastrank" in res.stdout and "torch imported: False" in res.stdout  # no torch, no extension
    if torch.version.cuda is None:
        res = _run_setup({"FASTRANK_BUILD_CUDA": "1"})
        assert res.returncode != 0 and "needs a CUDA build of torch" in res.stderr, res.stderr
