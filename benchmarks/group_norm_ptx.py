"""What the GroupNorm statistics kernel's loop compiles to for an H200 (sm_90), without a GPU.

Triton compiles the kernel ahead of time for sm_90 and the ptxas it assembles with reports registers and spills; the
script counts, inside the loop over a slice's pixels, the barriers, shared-memory accesses and 16-byte global loads.
A reduction across threads at every step shows as barriers and shared memory in the loop (BENCHMARKS.md, session
10). With a git revision, the kernel as it was there is compiled too, for comparison. Runs on a CPU:
  python3 benchmarks/group_norm_ptx.py [REVISION ...]
"""
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

sys.path.insert(0, ".")
from sccsdxl import group_norm  # noqa: E402

TYPES = {"x_ptr": "*bf16", "shift_ptr": "*bf16", "mean_ptr": "*fp32", "m2_ptr": "*fp32", "low_ptr": "*fp32",
         "high_ptr": "*fp32", "n_pixels": "i32", "n_channels": "i32", "pixels_per_slice": "i32", "n_slices": "i32"}
TILES = ((32, 64, 4), (32, 128, 4), (64, 64, 4), (128, 64, 8))  # (pixels, channels, warps)


def ptxas_path() -> str:
    """The ptxas Triton itself assembles with (TRITON_PTXAS_PATH, else the one in the triton package)."""
    return get_ptxas(90).path


def module_at(revision: str, name: str = "group_norm"):
    """sccsdxl/<name>.py as it was at ``revision``, imported under a name of its own (its relative imports resolve
    in this tree's sccsdxl)."""
    source = subprocess.run(["git", "show", f"{revision}:sccsdxl/{name}.py"], capture_output=True, text=True,
                            check=True).stdout
    path = os.path.join(tempfile.mkdtemp(), f"{name}_at_revision.py")
    with open(path, "w") as fh:
        fh.write(source)
    spec = importlib.util.spec_from_file_location(f"sccsdxl.{name}_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loop_counts(ptx: str) -> dict:
    """Barriers, shared-memory accesses and 16-byte loads between each loop's head and its backward branch."""
    lines = ptx.splitlines()
    labels = {line.split(":")[0]: i for i, line in enumerate(lines) if re.match(r"^\$L__BB\d+_\d+:", line)}
    counts = {"barriers": 0, "shared accesses": 0, "16-byte loads": 0, "PTX lines": 0}
    for i, line in enumerate(lines):
        branch = re.search(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if branch and labels.get(branch.group(1), i) < i:
            body = lines[labels[branch.group(1)]:i]
            counts["barriers"] += sum("bar.sync" in x for x in body)
            counts["shared accesses"] += sum("st.shared" in x or "ld.shared" in x for x in body)
            counts["16-byte loads"] += sum("ld.global.v4" in x for x in body)
            counts["PTX lines"] += len(body)
    return counts


def ptxas_report(ptx: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
        fh.write(ptx)
    done = subprocess.run([ptxas_path(), "-v", "-arch=sm_90a", fh.name, "-o", os.devnull], capture_output=True,
                          text=True)
    if done.returncode != 0:  # the message goes in the table, so that a run elsewhere shows why
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return f"ptxas failed ({done.returncode}): {last}"
    registers = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores", done.stderr)
    return f"{registers.group(1) if registers else '?'} registers, {spills.group(1) if spills else '?'} B spilled"


def main() -> None:
    kernels = [("this tree", group_norm)] + [(revision, module_at(revision)) for revision in sys.argv[1:]]
    print(f"Triton {triton.__version__}, sm_90\n")
    print("| kernel | tile (pixels, channels, warps) | in the loop: barriers | shared accesses | 16-byte loads | "
          "PTX lines | ptxas |\n|---|---|---|---|---|---|---|")
    for name, module in kernels:
        for block_p, block_c, warps in TILES:
            kernel = module._slice_statistics_kernel.fn
            # the arguments of the kernel at that revision (since session 18 it has EXTREMES, off here as in the
            # plain GroupNorm; since session 20 STAGES, its loop unpipelined here)
            signature = {name: TYPES.get(name, "constexpr") for name in kernel.arg_names}
            constexprs = {"HAS_SHIFT": False, "EXTREMES": False, "BLOCK_P": block_p, "BLOCK_C": block_c, "STAGES": 1}
            source = ASTSource(kernel, signature, constexprs={k: v for k, v in constexprs.items() if k in signature},
                               attrs={(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                                      if name in TYPES})
            ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                 options={"num_warps": warps, "num_stages": 3}).asm["ptx"]
            counts = loop_counts(ptx)
            print(f"| {name} | ({block_p}, {block_c}, {warps}) | {counts['barriers']} | {counts['shared accesses']} "
                  f"| {counts['16-byte loads']} | {counts['PTX lines']} | {ptxas_report(ptx)} |")


if __name__ == "__main__":
    main()
