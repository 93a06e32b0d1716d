"""Shared test set-up. Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors, which must be
switched on before triton is first imported (DESIGN.md section 4)."""

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


# CPU chunks of a few rows, so that tiny shapes cross several chunks (the production chunks hold 128 MiB of logits)
TEST_CHUNK_BYTES = 16 * 1024


@pytest.fixture(params=available_backends())
def backend(request, monkeypatch):
    """Forces a backend for the test; yields the device its tensors must live on."""
    from dypo_kernels import multi_teacher_kl
    from dypo_kernels.linear_logprobs import cpu

    monkeypatch.setenv("DYPO_KERNELS_BACKEND", request.param)
    monkeypatch.setattr(cpu, "LOGITS_CHUNK_BYTES", TEST_CHUNK_BYTES)
    monkeypatch.setitem(multi_teacher_kl.CHUNK_BYTES, "cpu", TEST_CHUNK_BYTES)
    if request.param == "triton" and not HAS_CUDA:
        from dypo_kernels.linear_logprobs import triton_kernels

        monkeypatch.setattr(triton_kernels, "TILE_OVERRIDE", INTERPRETER_TILES)
    request.node.backend_name = request.param
    return torch.device("cuda" if request.param == "triton" and HAS_CUDA else "cpu")


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| in float64."""
    expected = expected.detach().double()
    return ((actual.detach().double() - expected).norm() / expected.norm().clamp(min=1e-30)).item()
