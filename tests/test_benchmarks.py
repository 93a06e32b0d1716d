"""The benchmark suite and the GPU report keep running: both at tiny shapes, in a subprocess (no timing asserted);
the design-floor model of benchmarks/floor.py against values worked out by hand."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.floor import GPUS, design_floor, grad_weight_accumulation_bytes, prediction_table

ROOT = Path(__file__).parents[1]


def run(*args):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "DYPO_KERNELS_BACKEND", "DYPO_KERNELS_IMPL", "DYPO_KERNELS_CHUNK_BYTES")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)


def test_pytest_benchmark_suite_runs_at_tiny_shapes():
    result = run("-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--shapes", "tiny", "--no-memory",
                 "--benchmark-disable", "-k", "not compiled")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_report_checks_correctness_and_writes_its_tables():
    result = run("-m", "benchmarks.report", "--shapes", "tiny", "--out", "-")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "| dypo | dypo-chunked |" in out and "| pass |" in out and "FAIL" not in out and "error:" not in out
    assert "| grpo | liger |" in out or "liger-kernel unavailable" in out
    assert "| scoring | dypo-chunked |" in out and "| bare forward | torch.mm |" in out
    assert "measured / floor" in out and "Faster impl for the losses" in out


def test_design_floor_of_grpo_chunked_on_an_h100_by_hand():
    # 6NDV = 6 * 8,192 * 4,096 * 151,936 = 30,588,757,082,112 FLOP at 790 TFLOP/s: 38.71995 ms;
    # 12 B per logit entry * 8,192 * 151,936 = 14,935,916,544 B at 3.0 TB/s: 4.97864 ms
    floor = design_floor("grpo", "chunked", 8192, 4096, 151936, **GPUS["H100 SXM"])
    assert floor.flop == 30_588_757_082_112
    assert floor.pass_bytes == 14_935_916_544
    assert floor.seconds == pytest.approx(0.04369858, rel=1e-6)


def test_design_floor_of_each_op_at_round_numbers():
    shape = dict(N=1000, D=100, V=1000, tflops=1.0, bandwidth_gbs=1.0)  # NDV = 1e8; 1e12 FLOP/s, 1e9 B/s
    # kl, m = 2: 2N(3D)V + 4NDV = 1e9 FLOP (1 ms); (3 + 6) * 4 + 2 + 3 * 2 = 44 B per entry, 4.4e7 B (44 ms)
    assert design_floor("kl", "chunked", **shape, teachers=2).seconds == pytest.approx(0.045)
    assert design_floor("sft", "fused", **shape).seconds == pytest.approx(8e-4)  # 8NDV, no pass bytes
    assert design_floor("scoring", "chunked", **shape).seconds == pytest.approx(2e-4 + 6e-3)  # 2NDV; 6 B per entry
    assert design_floor("logprobs", "chunked", **shape).seconds == pytest.approx(8e-4 + 14e-3)  # 8NDV; 14 B
    with pytest.raises(ValueError, match="no fused impl"):
        design_floor("kl", "fused", **shape)


def test_grad_weight_accumulation_of_the_chunked_impl_by_hand():
    # 1 GiB of fp32 logits / (151,936 * 4 B) = 1,766 rows, 1,664 as a multiple of 128; 1 GiB of bf16 gradients holds
    # two such chunks: waves of 3,328 rows, 3 at N = 8,192, each reading and writing the [V, D] fp32 grad_W:
    # 3 * 151,936 * 4,096 * 8 B
    assert grad_weight_accumulation_bytes("grpo", 8192, 4096, 151936) == 14_935_916_544
    assert grad_weight_accumulation_bytes("scoring", 8192, 4096, 151936) == 0


def test_prediction_table_is_labelled_as_a_model():
    table = prediction_table()
    assert "a model" in table and "| H100 SXM (ms) | H200 (ms) |" in table
    assert "| sft, grpo, gal, dypo | chunked | 8,192 | 4,096 | 151,936 | 30.6 | 14.9 | 43.7 | 42.2 | 15 |" in table
