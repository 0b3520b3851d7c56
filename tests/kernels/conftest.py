"""Shared setup for the kernel tests.

Without a GPU the Triton launchers run on CPU tensors through Triton's interpreter.  Triton
decides interpreted-vs-compiled when ``@triton.jit`` runs, i.e. when the kernel modules are
imported, so ``TRITON_INTERPRET=1`` is set here, before any test module imports them.  If some
earlier test directory already imported them compiled (a full ``pytest`` run), they are reloaded
once the variable is set.  With a GPU nothing is changed and the launchers get CUDA tensors.
"""

import importlib
import os
import sys
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

_KERNEL_MODULES = (  # reload order matters: the others import helpers from the first
    "gemma4_passes.kernels.norm_residual",
    "gemma4_passes.kernels.gelu_mul",
    "gemma4_passes.kernels.qkv_norm_rope",
    "gemma4_passes.kernels.moe_norms",
    "gemma4_passes.kernels.moe_router",
    "gemma4_passes.kernels.moe_dispatch",
    "gemma4_passes.kernels.oneshot_allreduce",
)

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        import triton

        stale = [
            m for m in map(sys.modules.get, _KERNEL_MODULES)
            if m is not None
            and any(isinstance(v, triton.runtime.JITFunction) for v in vars(m).values())
        ]
        if stale:
            for name in _KERNEL_MODULES:
                if name in sys.modules:
                    importlib.reload(sys.modules[name])


def _interpreted() -> bool:
    from gemma4_passes.kernels import norm_residual

    return not isinstance(norm_residual._rmsnorm_residual_kernel, __import__("triton").runtime.JITFunction)


@pytest.fixture(scope="session")
def device() -> str:
    """Where the Triton launchers run: 'cuda' if present, else 'cpu' through the interpreter."""
    if HAS_CUDA:
        return "cuda"
    if not _interpreted():
        pytest.skip("no GPU and Triton kernels were compiled (TRITON_INTERPRET is not 1)")
    return "cpu"


@pytest.fixture(autouse=True)
def _seed(request):
    """A fresh, reproducible seed per test (derived from the test id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
