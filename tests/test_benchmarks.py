"""The benchmark suite and the GPU report keep running: both at tiny shapes, in a subprocess (no timing asserted)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def run(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DYPO_KERNELS_BACKEND")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)


def test_pytest_benchmark_suite_runs_at_tiny_shapes():
    result = run("-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--shapes", "tiny", "--no-memory",
                 "--benchmark-disable", "-k", "not compiled")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_report_checks_correctness_and_writes_its_tables():
    result = run("-m", "benchmarks.report", "--shapes", "tiny", "--out", "-")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| dypo m=1 |" in result.stdout and "| pass |" in result.stdout and "FAIL" not in result.stdout
    assert "| grpo | liger |" in result.stdout or "liger-kernel unavailable" in result.stdout
