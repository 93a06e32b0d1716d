"""Ahead-of-time compilation of every Triton kernel for real GPUs, on a machine without one (docs/design.md,
"Testing without a GPU"): does it compile for sm_80 and sm_90, fit in shared memory, avoid register spills, and use
the tensor core instructions of the target (mma on sm_80, wgmma on sm_90)?

    python -m dypo_kernels.aot            # a table; exit status 1 if any kernel fails a check

Each kernel is compiled as Triton's JIT specialises it at a launch with real shapes: pointers 16-byte aligned
(torch's allocations are), and the integer arguments a spec marks ``"i32:16"`` multiples of 16 (D, V and the row
strides of real models; Triton's own AOT compiler takes the same notation). Without these hints Triton compiles
scalar, unvectorised loads and a kernel unlike the one that runs. Spills are read from the SASS (``STL`` local
stores, ``LDL`` loads), not from the cubin's LOCAL figure, which counts only declared local arrays and stays 0
while registers spill to the stack. A kernel fails the check when a spill instruction lies inside a loop (between
a backward branch and its target); ptxas sometimes parks a few registers once outside the loops to raise
occupancy, which costs a handful of instructions per program and is reported but allowed.

Must run without TRITON_INTERPRET (the interpreter replaces the kernels' compiled form). Triton 3.2 to 3.9.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

# bytes per block: H100/H200; the sm_80 tiles also run on sm_86/sm_89 GPUs (A10, L4, L40), 99 KiB there (A100: 163)
SHARED_MEMORY_LIMIT = {80: 99 * 1024, 90: 227 * 1024}


def kernel_specs(capability):
    """(name, kernel, signature, constexprs, launch options, expects tensor cores) for every kernel, as launched on
    GPUs of ``capability`` (80 or 90)."""
    from dypo_kernels.advantages import triton_kernels as advantages
    from dypo_kernels.linear_logprobs import triton_kernels as linear_logprobs
    from dypo_kernels.multi_teacher_kl import triton_kernels as multi_teacher_kl
    from dypo_kernels.vocab_pass import triton_pass as vocab_pass

    # exact fp32 products ("ieee") run on the FMA units; only 16-bit products must use tensor cores
    return [(f"{name}[{dtype}]", *rest, dtype != "fp32") for dtype in ("bf16", "fp32")
            for name, *rest in linear_logprobs.aot_specs(dtype, capability)] + [
        (*spec, False) for spec in advantages.aot_specs() + multi_teacher_kl.aot_specs() + vocab_pass.aot_specs()]


def _resource_usage(cubin: bytes):
    """Registers, stack bytes, spill stores (STL instructions) and spill instructions inside loops of the cubin's
    kernel."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"dypo_aot_{os.getpid()}.cubin"
    path.write_bytes(cubin)
    try:
        usage = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([str(tool), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    finally:
        path.unlink()
    counts = {key: int(value) for key, value in re.findall(r"\b(REG|STACK):(\d+)", usage)}
    instructions = [(int(address, 16), text) for address, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(target.group(1), 16), address) for address, text in instructions
             if (target := re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)) and int(target.group(1), 16) < address]
    spills = [address for address, text in instructions if re.search(r"\b(STL|LDL)\b", text)]
    return {"registers": counts["REG"], "stack": counts["STACK"],
            "spill_stores": sum(bool(re.search(r"\bSTL\b", text)) for _, text in instructions),
            "spills_in_loops": sum(any(start <= address <= end for start, end in loops) for address in spills)}


def _source(fn, signature, constexprs):
    """The kernel's ASTSource with the JIT's launch-time specialisation (module docstring)."""
    from triton.compiler import ASTSource

    aligned = [fn.arg_names.index(name) for name, kind in signature.items()
               if kind.startswith("*") or kind.endswith(":16")]
    signature = {**{name: kind.split(":")[0] for name, kind in signature.items()},
                 **{name: "constexpr" for name in constexprs}}
    try:
        from triton.backends.compiler import AttrsDescriptor  # Triton 3.2
    except ImportError:
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                         attrs={(index,): [["tt.divisibility", 16]] for index in aligned})
    return ASTSource(fn=fn, signature=signature, constants=constexprs,
                     attrs=AttrsDescriptor.from_hints({index: 16 for index in aligned}))


def check_kernel(spec, capability):
    """The report row of one kernel spec (an item of ``kernel_specs``) compiled for ``capability``."""
    import triton
    from triton.backends.compiler import GPUTarget

    name, fn, signature, constexprs, launch, needs_tensor_cores = spec
    row = {"kernel": name, "sm": capability, **launch}
    try:
        compiled = triton.compile(_source(fn, signature, constexprs), target=GPUTarget("cuda", capability, 32),
                                  options=launch)
        ptx = compiled.asm["ptx"]
        row.update(shared=compiled.metadata.shared, **_resource_usage(compiled.asm["cubin"]),
                   tensor_cores=("wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "none"))
        row["ok"] = (row["shared"] <= SHARED_MEMORY_LIMIT[capability] and row["spills_in_loops"] == 0
                     and (row["tensor_cores"] != "none" or not needs_tensor_cores))
    except Exception as exc:  # a compile failure is a result to report, not a crash of the report
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
    return row


def compile_report():
    return [check_kernel(spec, capability) for capability in (80, 90) for spec in kernel_specs(capability)]


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
