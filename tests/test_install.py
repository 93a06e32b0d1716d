"""`pip install .` (non-editable) gives an importable package that still finds csrc/ for the C++ kernels."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_non_editable_install_imports_and_ships_csrc(tmp_path):
    # --target keeps this environment untouched; --no-deps and --no-build-isolation keep the test offline
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(tmp_path / "site"), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    check = ("import dypo_kernels; from dypo_kernels import fused_linear_logprobs; "
             "from dypo_kernels.backend import _csrc_dir; "
             "assert dypo_kernels.__file__.startswith(%r), dypo_kernels.__file__; "
             "assert (_csrc_dir() / 'vocab_pass.cpp').is_file(), _csrc_dir()" % str(tmp_path / "site"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    subprocess.run([sys.executable, "-c", check], check=True, cwd=tmp_path, env=env)
