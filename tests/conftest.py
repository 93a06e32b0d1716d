"""Shared test set-up. Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors, which must be
switched on before triton is first imported (docs/testing.md)."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dypo_kernels.backend import cpu_extension  # noqa: E402

# Small tiles under the interpreter, so that tiny shapes still cross several row, vocabulary and D blocks
INTERPRETER_TILES = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16)


def available_backends():
    backends = ["triton"]
    if not HAS_CUDA:
        backends += ["cpp", "torch"] if cpu_extension() is not None else ["torch"]
    return backends


def available_impls():
    """(backend, impl) pairs: the Triton backend runs both implementations, the CPU backends the chunked one."""
    return [(backend, impl) for backend in available_backends()
            for impl in (("chunked", "fused") if backend == "triton" else ("chunked",))]


# Chunks of a few rows, so that tiny shapes cross several chunks (the production chunks hold 128 MiB to 1 GiB)
TEST_CHUNK_BYTES = 16 * 1024


@pytest.fixture(params=available_impls(), ids=lambda pair: pair[0] if pair[1] == "chunked" else "-".join(pair))
def backend(request, monkeypatch):
    """Forces a backend and an implementation for the test; yields the device its tensors must live on."""
    name, impl = request.param
    monkeypatch.setenv("DYPO_KERNELS_BACKEND", name)
    monkeypatch.setenv("DYPO_KERNELS_IMPL", impl)
    monkeypatch.setenv("DYPO_KERNELS_CHUNK_BYTES", str(TEST_CHUNK_BYTES))
    if name == "triton" and not HAS_CUDA:
        from dypo_kernels.linear_logprobs import triton_kernels

        monkeypatch.setattr(triton_kernels, "TILE_OVERRIDE", INTERPRETER_TILES)
    request.node.backend_name = name
    request.node.impl_name = impl
    return torch.device("cuda" if name == "triton" and HAS_CUDA else "cpu")


def set_chunk_rows(monkeypatch, rows, vocab_size, backend_name):
    """Sets DYPO_KERNELS_CHUNK_BYTES so that a log-prob sweep's chunks hold ``rows`` rows at ``vocab_size`` on
    ``backend_name`` (what LogprobPass holds per logit; on Triton the chunk's logits get half the budget)."""
    from dypo_kernels.logprob_pass import logprob_bytes_per_logit

    share = 2 if backend_name == "triton" else 1
    monkeypatch.setenv("DYPO_KERNELS_CHUNK_BYTES",
                       str(rows * vocab_size * logprob_bytes_per_logit(backend_name) * share))


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| in float64."""
    expected = expected.detach().double()
    return ((actual.detach().double() - expected).norm() / expected.norm().clamp(min=1e-30)).item()
