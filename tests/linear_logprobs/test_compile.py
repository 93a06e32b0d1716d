"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 as the JIT specialises it at real shapes, fits
in shared memory, does not spill registers in its loops, and (16-bit inputs) uses tensor cores: mma on sm_80,
wgmma on sm_90."""

import json
import os
import subprocess
import sys

import pytest


def compiled(*args):
    """Runs python with ``args`` without the interpreter (its kernels have no compiled form); the last stdout line
    as JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.stdout, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report():
    return compiled("-m", "dypo_kernels.aot", "--json")


def test_every_kernel_compiled_for_both_architectures(report):
    kernels = {row["kernel"] for row in report}
    assert {"logprobs_fwd[bf16]", "logprobs_bwd[bf16]", "multi_teacher_kl[jsd,mean]"} <= kernels
    assert {(row["kernel"], row["sm"]) for row in report} == {(k, sm) for k in kernels for sm in (80, 90)}


def test_kernels_fit_and_do_not_spill(report):
    failures = [row for row in report if not row["ok"]]
    assert not failures, failures


def test_sm90_bf16_kernels_use_wgmma(report):
    assert all(row["tensor_cores"] == "wgmma" for row in report if row["sm"] == 90 and "bf16" in row["kernel"])


# fp32 products on the FMA units over a 128 x 128 tile with 8 warps: more live values than 255 registers hold
SPILLING_TILE = """
import json
from dypo_kernels import aot
name, kernel, signature, constexprs, launch, _ = {spec[0]: spec for spec in aot.kernel_specs(90)}["logprobs_fwd[fp32]"]
constexprs = dict(constexprs, BLOCK_N=128, BLOCK_V=128, BLOCK_D=64)
print(json.dumps(aot.check_kernel((name, kernel, signature, constexprs, launch, False), 90)))
"""


def test_spill_check_sees_spills_in_loops():
    row = compiled("-c", SPILLING_TILE)
    assert row["spills_in_loops"] > 0 and row["spill_stores"] > 0, row
    assert not row["ok"]
