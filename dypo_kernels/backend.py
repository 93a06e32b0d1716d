"""Which backend runs an op (docs/design.md, "Backends"), and the C++ CPU extension's loader.

| tensors | backend  | what runs |
|---------|----------|-----------|
| CUDA    | "triton" | the Triton kernels |
| CPU     | "cpp"    | chunked PyTorch products, the per-chunk vocabulary pass in C++ (csrc/, built on first use) |
| CPU     | "torch"  | chunked PyTorch only; the fallback where the C++ extension cannot be built |

``DYPO_KERNELS_BACKEND`` forces one of them (tests and benchmarks). "triton" on CPU tensors needs
``TRITON_INTERPRET=1`` set before triton is imported.
"""

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

BACKENDS = ("triton", "cpp", "torch")
BACKEND_ENV = "DYPO_KERNELS_BACKEND"


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def select_backend(device: torch.device) -> str:
    forced = os.environ.get(BACKEND_ENV, "")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r}: expected one of {BACKENDS}")
        if forced == "triton" and device.type != "cuda" and not triton_interpreter_enabled():
            raise ValueError(f"{BACKEND_ENV}=triton with tensors on {device}: the Triton kernels need CUDA tensors, "
                             "or TRITON_INTERPRET=1 set before triton is imported")
        if forced in ("cpp", "torch") and device.type != "cpu":
            raise ValueError(f"{BACKEND_ENV}={forced} needs CPU tensors, got tensors on {device}")
        if forced == "cpp" and cpu_extension() is None:
            raise RuntimeError(f"{BACKEND_ENV}=cpp but the C++ extension could not be built (see the warning above)")
        return forced
    if device.type == "cuda":
        return "triton"
    return "cpp" if cpu_extension() is not None else "torch"


def _csrc_dir() -> Path:
    installed = Path(__file__).parent / "csrc"  # copied there by setup.py for non-editable installs
    return installed if installed.is_dir() else Path(__file__).parents[1] / "csrc"


@functools.lru_cache(maxsize=None)
def cpu_extension():
    """The compiled csrc/vocab_pass.cpp module, or None (with one warning) where it cannot be built."""
    try:
        from torch.utils.cpp_extension import load

        # one build per Python environment: environments sharing torch's extension cache would otherwise rebuild it
        # (about 25 s) each time the other one loaded it last
        environment = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
        return load(
            name=f"dypo_kernels_cpu_{environment}",
            sources=[str(_csrc_dir() / "vocab_pass.cpp")],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, no headers: all mean the same for the user
        warnings.warn(f"dypo_kernels: could not build the C++ CPU kernels ({type(exc).__name__}: {exc}); "
                      "falling back to the plain PyTorch CPU path, which is slower", RuntimeWarning, stacklevel=2)
        return None
