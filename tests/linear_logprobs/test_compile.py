"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, fits in shared memory, does not spill
registers, and (16-bit inputs) uses tensor cores: mma on sm_80, wgmma on sm_90."""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-m", "dypo_kernels.aot", "--json"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.stdout, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_kernel_compiled_for_both_architectures(report):
    kernels = {row["kernel"] for row in report}
    assert {"logprobs_fwd[bf16]", "logprobs_bwd[bf16]", "multi_teacher_kl[jsd,mean]"} <= kernels
    assert {(row["kernel"], row["sm"]) for row in report} == {(k, sm) for k in kernels for sm in (80, 90)}


def test_kernels_fit_and_do_not_spill(report):
    failures = [row for row in report if not row["ok"]]
    assert not failures, failures


def test_sm90_bf16_kernels_use_wgmma(report):
    assert all(row["tensor_cores"] == "wgmma" for row in report if row["sm"] == 90 and "bf16" in row["kernel"])
