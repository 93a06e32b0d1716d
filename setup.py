"""Metadata lives in pyproject.toml; this file only ships csrc/ inside the package, so that a non-editable
install can still build the C++ CPU kernels on first use (dypo_kernels/backend.py looks there first)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithCsrc(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "dypo_kernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in (Path(__file__).parent / "csrc").glob("*.cpp"):
            shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildPyWithCsrc})
