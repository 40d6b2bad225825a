# Metadata lives in pyproject.toml; this shim keeps `python setup.py develop` and older pips working.
#
# It also builds the optional native CUDA extension `fastrank._cuda` (kernels/*.cu, backend="cuda" in fastrank.ops),
# and only when asked to: FASTRANK_BUILD_CUDA=1. Without it nothing here imports torch and the install is exactly the
# pure-Python one. The extension build needs torch at build time, which pip's isolated build environment
# (pyproject.toml's build-system) does not have, and a CUDA build of torch with a matching nvcc:
#     FASTRANK_BUILD_CUDA=1 pip install --no-build-isolation -e .
# TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0": A100 and H100).
import os

from setuptools import setup

KERNEL_SOURCES = ["kernels/bindings.cpp", "kernels/pairwise_rank_loss.cu", "kernels/project_gradients.cu"]
DEFAULT_ARCHS = "8.0;9.0"


def cuda_extension_kwargs() -> dict:
    if os.environ.get("FASTRANK_BUILD_CUDA", "0") != "1":
        return {}
    # Asked for explicitly, so every obstacle is an error: a silently skipped extension would surface much later as
    # "backend='cuda' ... not built".
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError(
            "FASTRANK_BUILD_CUDA=1 needs torch importable at build time; pip's build isolation hides it. "
            "Install torch first, then: FASTRANK_BUILD_CUDA=1 pip install --no-build-isolation -e ."
        ) from exc
    if torch.version.cuda is None:
        raise RuntimeError(
            f"FASTRANK_BUILD_CUDA=1 needs a CUDA build of torch; the installed torch {torch.__version__} is CPU-only"
        )
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        raise RuntimeError(
            f"FASTRANK_BUILD_CUDA=1 but nvcc was not found (CUDA_HOME={CUDA_HOME!r}); "
            "set CUDA_HOME to the CUDA toolkit root or put its bin/ on PATH"
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)  # read by torch when it composes the nvcc flags
    return dict(
        ext_modules=[
            CUDAExtension(
                "fastrank._cuda",
                KERNEL_SOURCES,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
            )
        ],
        cmdclass={"build_ext": BuildExtension},
    )


setup(**cuda_extension_kwargs())
