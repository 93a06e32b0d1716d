"""Ahead-of-time compilation of every Triton kernel for real GPUs, on a machine without one (DESIGN.md
section 4): does it compile for sm_80 and sm_90, fit in shared memory, avoid register spills, and use the tensor
core instructions of the target (mma on sm_80, wgmma on sm_90)?

    python -m dypo_kernels.aot            # a table; exit status 1 if any kernel fails a check

Must run without TRITON_INTERPRET (the interpreter replaces the kernels' compiled form).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block, A100 and H100/H200


def kernel_specs():
    """(name, kernel, signature, constexprs, launch options, expects tensor cores) for every kernel."""
    from dypo_kernels.advantages import triton_kernels as advantages
    from dypo_kernels.linear_logprobs import triton_kernels as linear_logprobs
    from dypo_kernels.multi_teacher_kl import triton_kernels as multi_teacher_kl

    # exact fp32 products ("ieee") run on the FMA units; only 16-bit products must use tensor cores
    return [(f"{name}[{dtype}]", *rest, dtype != "fp32") for dtype in ("bf16", "fp32")
            for name, *rest in linear_logprobs.aot_specs(dtype)] + [
        (*spec, False) for spec in advantages.aot_specs() + multi_teacher_kl.aot_specs()]


def _resource_usage(cubin: bytes):
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"dypo_aot_{os.getpid()}.cubin"
    path.write_bytes(cubin)
    try:
        text = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                              check=True).stdout
    finally:
        path.unlink()
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text)}


def compile_report():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for name, fn, signature, constexprs, launch, needs_tensor_cores in kernel_specs():
        for capability in (80, 90):
            row = {"kernel": name, "sm": capability, **launch}
            try:
                source = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}},
                                   constexprs=constexprs)
                compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=launch)
                usage = _resource_usage(compiled.asm["cubin"])
                ptx = compiled.asm["ptx"]
                row.update(shared=compiled.metadata.shared, registers=usage.get("REG"),
                           spill_bytes=usage.get("LOCAL", 0), tensor_cores=("wgmma" if "wgmma" in ptx else
                                                                            "mma" if "mma.sync" in ptx else "none"))
                row["ok"] = (row["shared"] <= SHARED_MEMORY_LIMIT[capability] and row["spill_bytes"] == 0
                             and (row["tensor_cores"] != "none" or not needs_tensor_cores))
            except Exception as exc:  # a compile failure is a result to report, not a crash of the report
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
            rows.append(row)
    return rows


def main():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET=1: the interpreter has no compiled kernels")
    rows = compile_report()
    if "--json" in sys.argv:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(" ".join(f"{key}={value}" for key, value in row.items()))
    sys.exit(0 if all(row["ok"] for row in rows) else 1)


if __name__ == "__main__":
    main()
