"""Which implementation of a fused op runs: the Triton kernel, the plain PyTorch path or the compiled CUDA extension.

`backend="auto"` picks Triton when the tensor lives on a CUDA device and PyTorch otherwise.
`backend="triton"` on CPU tensors runs the kernel under TRITON_INTERPRET=1 — how the kernels are tested
without a GPU.
`backend="cuda"` runs the native kernels of `kernels/*.cu` from the optional extension `fastrank._cuda`
(built only with FASTRANK_BUILD_CUDA=1, see setup.py) on CUDA tensors. `auto` never picks it: those kernels
have not been run on a GPU yet (see tests/test_cuda_ext.py).
A *forced* backend that cannot run is an error, never a silent fallback: a user who asks for the kernel
and silently gets the reference would benchmark the wrong thing.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "triton", "torch", "cuda")
CUDA_EXT = "fastrank._cuda"
BUILD_HINT = (
    "build it with `FASTRANK_BUILD_CUDA=1 pip install --no-build-isolation -e .` "
    "(needs nvcc and a CUDA build of torch)"
)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device) -> tuple[bool, str]:
    """(usable, why-not) for running a Triton kernel on tensors of `device`."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton is a hard dependency, but may fail to import
        return False, f"triton cannot be imported ({exc})"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and triton_interpret():
        return True, ""
    return False, (
        f"tensors are on {device.type!r}; the Triton kernel needs CUDA tensors "
        "(or TRITON_INTERPRET=1 set before fastrank.ops is imported, for CPU testing)"
    )


@functools.lru_cache(maxsize=None)
def _load_cuda_ext():
    """(module or None, why-not). Cached: an import attempt costs a filesystem search."""
    try:
        return importlib.import_module(CUDA_EXT), ""
    except ModuleNotFoundError as exc:
        if exc.name != CUDA_EXT:  # the extension exists but something it needs does not
            return None, f"{CUDA_EXT} is built but cannot be imported ({exc})"
        return None, f"the compiled extension {CUDA_EXT} is not built: {BUILD_HINT}"
    except ImportError as exc:  # e.g. built against another torch, or no CUDA runtime on this machine
        return None, f"{CUDA_EXT} is built but cannot be imported ({exc})"


def cuda_ext():
    """The `fastrank._cuda` module; RuntimeError with the reason when it cannot be loaded."""
    ext, why = _load_cuda_ext()
    if ext is None:
        raise RuntimeError(why)
    return ext


def cuda_ext_available(device: torch.device) -> tuple[bool, str]:
    """(usable, why-not) for running the compiled CUDA extension on tensors of `device`."""
    reasons = []
    if device.type != "cuda":
        reasons.append(f"tensors are on {device.type!r}; the CUDA extension needs CUDA tensors")
    ext, why = _load_cuda_ext()
    if ext is None:
        reasons.append(why)
    return not reasons, "; ".join(reasons)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return "triton", "torch" or "cuda" for this call, or raise if a forced backend cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cuda":
        ok, why = cuda_ext_available(device)
        if not ok:
            raise RuntimeError(f"backend='cuda' was forced but cannot run: {why}")
        return "cuda"
    ok, why = triton_available(device)
    if backend == "triton":
        if not ok:
            raise RuntimeError(f"backend='triton' was forced but cannot run: {why}")
        return "triton"
    if backend == "torch":
        return "torch"
    # auto: the compiled kernel on CUDA only. The interpreter (CPU) is for testing the kernels when forced:
    # picking it automatically would make every CPU training step run interpreted Triton.
    return "triton" if ok and device.type == "cuda" else "torch"
