"""Registers and spills of the kit's row and convolution kernels for an H200 (sm_90), without a GPU.

Triton compiles each autotuning configuration ahead of time for sm_90 and the ptxas it assembles with reports its
registers and spills (group_norm_ptx.py's report), with the PTX's global loads and stores, wgmma instructions and
TMA (cp.async.bulk.tensor) or cp.async loads, and for the GEGLU kernel and the framed GroupNorm write their machine
instructions (nvdisasm) per element each thread handles: sccsdxl.fused's GEGLU + fp8 and LayerNorm + fp8 kernels,
sccsdxl.group_norm's framed e4m3 write and its statistics kernel (whether its loop's loads are pipelined),
sccsdxl.fp8_conv's convolution (TMA loads since session 18), also in its folded-upsampler form. With a git
revision, the LayerNorm kernel as it was there is compiled too and compared configuration by configuration
(BENCHMARKS.md, session 17).
Arguments are specialized as Triton's launcher specializes them at the UNet's shapes: pointers 16-byte aligned and
integers divisible by 16 (the rows, widths and strides at batch 50). Before session 19 the row kernels' widths were
left unspecialized here, so their loads and stores counted one element each where the launched kernels vectorize
them (16 bytes). Runs on a CPU:
  python3 benchmarks/kernels_ptx.py [REVISION]      # from the repo root
"""
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from group_norm_ptx import module_at, ptxas_path, ptxas_report  # noqa: E402

from sccsdxl import cross_attention, fp8_conv, fused, group_norm  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compiled(fn, signature: dict, constants: dict, aligned: tuple, warps: int, stages: int = 3) -> dict:
    """ptxas's report and counts of the PTX of ``fn`` with these constants (the others typed by ``signature``)."""
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs), target=TARGET,
                            options={"num_warps": warps, "num_stages": stages})
    ptx = kernel.asm["ptx"]
    return {"ptxas": ptxas_report(ptx), "global loads": ptx.count("ld.global"), "global stores": ptx.count("st.global"),
            "wgmma": ptx.count("wgmma.mma_async"),
            "wgmma shapes": "/".join(sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))),
            "TMA loads": ptx.count("cp.async.bulk.tensor"),
            "cp.async": ptx.count("cp.async.cg"), "div.rn": ptx.count("div.rn.f32"), **sass_counts(kernel.asm["cubin"])}


def sass_counts(cubin: bytes) -> dict:
    """Machine instructions in the compiled kernel (nvdisasm, beside ptxas), for the instruction-bound row kernels,
    and its plain (LDG) and cp.async (LDGSTS) global loads."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(cubin)
    listing = subprocess.run([str(Path(ptxas_path()).with_name("nvdisasm")), "-c", fh.name], capture_output=True,
                             text=True).stdout
    return {"sass": sum(1 for line in listing.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/\s+\S", line)
                        and "NOP" not in line),
            "plain loads": len(re.findall(r" LDG[.]", listing)), "cp.async loads": len(re.findall(r" LDGSTS", listing))}


def with_constants(names: list[str], types: dict) -> dict:
    return {name: types.get(name, "constexpr") for name in names}


def geglu_rows() -> None:
    names = ["hidden_ptr", "out_ptr", "scale_ptr", "n_rows", "n_cols", "hidden_stride", "out_stride", "BLOCK",
             "HEAD", "TAIL", "ROWS", "CHUNK", "SPLIT", "FP8_MAX", "MIN_SCALE"]
    types = {"hidden_ptr": "*bf16", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32",
             "hidden_stride": "i32", "out_stride": "i32"}
    for width, head, tail in ((5120, 4096, 1024), (2560, 2048, 512)):
        for config in fused._configs():
            constants = {"BLOCK": triton.next_power_of_2(width), "HEAD": head, "TAIL": tail, "FP8_MAX": fused.FP8_MAX,
                         "MIN_SCALE": fused.MIN_SCALE, **config.kwargs}
            got = compiled(fused._geglu_fp8_rows_kernel.fn, with_constants(names, types), constants, range(7),
                           config.num_warps)
            kw = config.kwargs
            held = kw["ROWS"] * (head + tail if kw["SPLIT"] else constants["BLOCK"]) / (32 * config.num_warps)
            count = (f"{got['sass']} ({got['sass'] / held:.1f} per element held)" if kw["CHUNK"] == 0
                     else f"{got['sass']} (loops over chunks)")
            print(f"| GEGLU + fp8, {width} | {kw}, {config.num_warps} warps | {got['ptxas']} | "
                  f"{got['global loads']} | {got['global stores']} | {count} |")


def layer_norm_rows(revision: str | None) -> None:
    names = ["x_ptr", "residual_ptr", "sum_ptr", "weight_ptr", "bias_ptr", "out_ptr", "scale_ptr", "n_rows",
             "n_cols", "eps", "BLOCK", "HEAD", "TAIL", "ROWS", "SPLIT", "HAS_RESIDUAL", "FP8_MAX", "MIN_SCALE"]
    types = {"x_ptr": "*bf16", "residual_ptr": "*bf16", "sum_ptr": "*bf16", "weight_ptr": "*bf16",
             "bias_ptr": "*bf16", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32",
             "eps": "fp32"}
    old = module_at(revision, "fused") if revision else None
    same = total = 0
    for width, head, tail in ((1280, 1024, 256), (640, 512, 128)):
        for residual in (True, False):
            for config in fused._layer_norm_fp8_rows_kernel.configs:
                constants = {"BLOCK": triton.next_power_of_2(width), "HEAD": head, "TAIL": tail,
                             "HAS_RESIDUAL": residual, "FP8_MAX": fused.FP8_MAX, "MIN_SCALE": fused.MIN_SCALE,
                             **config.kwargs}
                got = compiled(fused._layer_norm_fp8_rows_kernel.fn, with_constants(names, types), constants,
                               range(9), config.num_warps)
                line = (f"| LayerNorm + fp8, {width}, residual {residual} | {config.kwargs}, {config.num_warps} warps"
                        f" | {got['ptxas']} | {got['global loads']} | {got['global stores']} |")
                if old is not None:
                    before_names = names + (["PER_SM"] if "PER_SM" in old._layer_norm_fp8_rows_kernel.arg_names
                                            else [])
                    before = compiled(old._layer_norm_fp8_rows_kernel.fn, with_constants(before_names, types),
                                      {**constants, **({"PER_SM": 0} if "PER_SM" in before_names else {})},
                                      range(9), config.num_warps)
                    agree = all(before[k] == got[k] for k in ("ptxas", "global loads", "global stores"))
                    same, total = same + agree, total + 1
                    line += f" {'same' if agree else 'differs: ' + before['ptxas']} at {revision} |"
                print(line)
    if old is not None:
        print(f"\nLayerNorm configurations compiling to the same registers, loads and stores as at {revision}: "
              f"{same} of {total}")


def group_norm_rows() -> None:
    """The framed GroupNorm + SiLU write (fp8_convs' norm), each tile the tuning may choose (the shift is in its
    per-channel affine since session 20)."""
    kernel = group_norm._normalize_framed_kernel.fn
    types = {"x_ptr": "*bf16", "scale_ptr": "*fp32", "offset_ptr": "*fp32", "amax_ptr": "*fp32", "out_ptr": "*fp8e4nv",
             "n_pixels": "i32", "n_channels": "i32", "width": "i32", "guard": "i32"}
    aligned = [i for i, name in enumerate(kernel.arg_names) if name in types and name != "guard"]  # guard: W + 3
    for pixels, channels, warps in group_norm.NORMALIZE_BLOCKS:
        got = compiled(kernel, with_constants(kernel.arg_names, types),
                       {"BLOCK_P": pixels, "BLOCK_C": channels, "MIN_SCALE": fused.MIN_SCALE},
                       aligned, warps)
        held = pixels * channels / (32 * warps)
        print(f"| GroupNorm + SiLU, framed e4m3 | {pixels} pixels x {channels} channels, {warps} warps | "
              f"{got['ptxas']} | {got['global loads']} | {got['global stores']} | "
              f"{got['sass']} ({got['sass'] / held:.1f} per element held) |")


def projection_rows() -> None:
    """fp8_projections' kernels: the blocks' last residual add as fp8 rows at both widths, each choice of its tuning;
    the GroupNorm's group kernel folding the largest |GroupNorm| (no SiLU) and the normalizing pass writing e4m3."""
    kernel = fused._fp8_rows_kernel.fn
    types = {"x_ptr": "*bf16", "residual_ptr": "*bf16", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
             **{n: "i32" for n in ("n_rows", "n_cols", "x_stride", "residual_stride", "out_stride")}}
    aligned = [i for i, name in enumerate(kernel.arg_names) if name in types and name not in ("n_rows", "n_cols")]
    for width in (1280, 640):
        for config in fused._fp8_rows_kernel.configs:
            got = compiled(kernel, with_constants(kernel.arg_names, types),
                           {"BLOCK": triton.next_power_of_2(width), "HAS_RESIDUAL": True, "FP8_MAX": fused.FP8_MAX,
                            "MIN_SCALE": fused.MIN_SCALE, **config.kwargs}, aligned, config.num_warps)
            print(f"| residual add + fp8 rows, {width} | {config.kwargs['ROWS']} rows, {config.num_warps} warps | "
                  f"{got['ptxas']} | {got['global loads']} | {got['global stores']} | {got['sass']} |")
    kernel = group_norm._group_statistics_kernel
    types = {**{n: "*fp32" for n in ("mean_ptr", "m2_ptr", "scale_ptr", "offset_ptr", "low_ptr", "high_ptr",
                                      "amax_ptr")}, "shift_ptr": "*bf16", "weight_ptr": "*bf16", "bias_ptr": "*bf16",
             **{n: "i32" for n in ("n_pixels", "n_channels", "pixels_per_slice", "n_slices", "n_groups")},
             "eps": "fp32"}
    for silu in (True, False):
        got = compiled(kernel, with_constants(kernel.arg_names, types),
                       {"HAS_SHIFT": False, "EXTREMES": True, "SILU": silu, "BLOCK_S": 4, "BLOCK_G": 64}, (), 4)
        print(f"| GroupNorm group kernel, largest value {'with' if silu else 'without'} SiLU | 4 slices, 64 "
              f"channels, 4 warps | {got['ptxas']} | {got['global loads']} | {got['global stores']} | {got['sass']} |")
    kernel = group_norm._normalize_kernel.fn
    types = {"x_ptr": "*bf16", "scale_ptr": "*fp32", "offset_ptr": "*fp32", "out_ptr": "*fp8e4nv",
             "out_scale_ptr": "*fp32", "n_pixels": "i32", "n_channels": "i32"}
    aligned = [i for i, name in enumerate(kernel.arg_names) if name in types]
    for pixels, channels, warps in group_norm.NORMALIZE_BLOCKS:
        got = compiled(kernel, with_constants(kernel.arg_names, types),
                       {"SILU": False, "FP8_OUT": True, "BLOCK_P": pixels, "BLOCK_C": channels}, aligned, warps)
        print(f"| GroupNorm, e4m3 | {pixels} pixels x {channels} channels, {warps} warps | {got['ptxas']} | "
              f"{got['global loads']} | {got['global stores']} | {got['sass']} |")


def statistics_rows() -> None:
    """The GroupNorm statistics kernel as fp8_convs runs it (a shift, the extremes), each choice of its tuning:
    whether its loop's loads are pipelined (cp.async, LDGSTS in the machine code) or plain loads (LDG)."""
    kernel = group_norm._slice_statistics_kernel.fn
    types = {"x_ptr": "*bf16", "shift_ptr": "*bf16", "mean_ptr": "*fp32", "m2_ptr": "*fp32", "low_ptr": "*fp32",
             "high_ptr": "*fp32", "n_pixels": "i32", "n_channels": "i32", "pixels_per_slice": "i32", "n_slices": "i32"}
    aligned = [i for i, name in enumerate(kernel.arg_names) if name in types and name != "n_slices"]
    for pixels, channels, warps, stages in group_norm.STATISTICS_CHOICES:
        got = compiled(kernel, with_constants(kernel.arg_names, types),
                       {"HAS_SHIFT": True, "EXTREMES": True, "BLOCK_P": pixels, "BLOCK_C": channels, "STAGES": stages},
                       aligned, warps)
        print(f"| ({pixels}, {channels}, {warps}) | {stages} | {got['ptxas']} | {got['cp.async loads']} | "
              f"{got['plain loads']} |")


def convolution_rows() -> None:
    kernel = fp8_conv._shifted_conv_kernel.fn.fn  # under the tuning and the heuristic that sets the TMA blocks
    names = kernel.arg_names
    # fp8_convs' 3x3 convolutions (the first of each block, and the second with the residual add); fp8_upsamplers'
    # four phases; every choice, the 256 x 128 tiles and persistent kernels too
    for form, folded, residual in (("", False, False), (", residual", False, True), (", folded upsampler", True, False)):
        for config in fp8_conv.configs(more=True):
            kw = config.kwargs
            types = {"x_desc": f"tensordesc<fp8e4nv[{kw['BM']}, {kw['BK']}]>", "amax_ptr": "*fp32",
                     "w_desc": f"tensordesc<fp8e4nv[{kw['BN']}, {kw['BK']}]>", "w_scale_ptr": "*fp32",
                     "bias_ptr": "*bf16", "y_ptr": "*bf16", "residual_ptr": "*bf16", "residual_scale": "fp32",
                     **{n: "i32" for n in ("FRAMED", "H", "W", "C_IN", "C_OUT")}}
            aligned = tuple(names.index(n) for n in ("amax_ptr", "w_scale_ptr", "bias_ptr", "y_ptr", "residual_ptr",
                                                     "C_IN", "C_OUT"))
            got = compiled(kernel, with_constants(names, types),
                           {"HAS_BIAS": True, "FOLDED": folded, "HAS_RESIDUAL": residual, "FP8_MAX": fused.FP8_MAX,
                            "MIN_SCALE": fused.MIN_SCALE, "EVEN_N": True, **kw}, aligned, config.num_warps,
                           config.num_stages)
            persistent = "persistent, " if kw["PERSISTENT"] else ""
            tile = (f"{kw['BM']} x {kw['BN']} x {kw['BK']}, {config.num_warps} warps, {persistent}"
                    f"{config.num_stages} stages")
            print(f"| shifted convolution{form} (TMA loads) | {tile} | {got['ptxas']} | {got['wgmma']} wgmma "
                  f"({got['wgmma shapes']}), {got['TMA loads']} TMA loads, {got['global stores']} global stores, "
                  f"{got['sass']} machine instructions |")


def cross_attention_rows() -> None:
    kernel = cross_attention._cross_attention_fp8_kernel.fn  # under the tuning
    names = kernel.arg_names
    types = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "out_ptr": "*fp8e4nv", "inv_scale_ptr": "*fp32",
             **{n: "i32" for n in ("tokens", "keys", "q_stride", "kv_stride", "out_stride", "v_offset")},
             "qk_scale": "fp32"}
    aligned = tuple(names.index(n) for n in ("q_ptr", "kv_ptr", "out_ptr", "inv_scale_ptr", "q_stride", "kv_stride",
                                             "out_stride", "v_offset"))
    for config in cross_attention._cross_attention_fp8_kernel.configs:  # the tuning's choices
        got = compiled(kernel, with_constants(names, types),
                       {"HEAD_SIZE": 64, "KEYS": cross_attention.KEY_BLOCK, "FP8_MAX": fused.FP8_MAX, **config.kwargs},
                       aligned, config.num_warps, config.num_stages)
        print(f"| cross-attention, fp8 rows | {config.kwargs['BLOCKS']} x {config.kwargs['BM']} tokens x "
              f"{cross_attention.KEY_BLOCK} keys, {config.num_warps} warps, {config.num_stages} stages | "
              f"{got['ptxas']} | {got['wgmma']} wgmma ({got['wgmma shapes']}), {got['global loads']} global loads, "
              f"{got['cp.async']} cp.async, {got['global stores']} global stores, {got['sass']} machine instructions |")

    kernel = cross_attention._image_scales_kernel  # the op's scales, one program per image
    names = kernel.arg_names
    types = {"kv_ptr": "*bf16", "scale_ptr": "*fp32", "inv_scale_ptr": "*fp32",
             **{n: "i32" for n in ("keys", "width", "kv_stride")}}
    got = compiled(kernel, with_constants(names, types),
                   {"INV_FP8_MAX": cross_attention.INV_FP8_MAX, "MIN_SCALE": fused.MIN_SCALE, "KEY_STEP": 16,
                    "COLUMN_STEP": 128},
                   tuple(names.index(n) for n in ("kv_ptr", "scale_ptr", "inv_scale_ptr", "width", "kv_stride")), 4, 3)
    print(f"| cross-attention, image scales | 16 keys x 128 values per step, 4 warps | {got['ptxas']} | "
          f"{got['global loads']} global loads, {got['global stores']} global stores, {got['sass']} machine "
          f"instructions, {got['div.rn']} IEEE divisions (div.rn.f32) |")


def main() -> None:
    revision = sys.argv[1] if len(sys.argv) > 1 else None
    print(f"Triton {triton.__version__}, sm_90\n")
    print("| kernel | configuration | ptxas | global loads | global stores | machine instructions |")
    print("|---|---|---|---|---|---|")
    geglu_rows()
    group_norm_rows()
    print("\n| kernel | configuration | ptxas | global loads | global stores |" + (" at the revision |" if revision
                                                                                       else ""))
    print("|---|---|---|---|---|" + ("---|" if revision else ""))
    layer_norm_rows(revision)
    print("\n| GroupNorm statistics tile (pixels, channels, warps) | stages | ptxas | cp.async loads (LDGSTS) | "
          "plain loads (LDG) |\n|---|---|---|---|---|")
    statistics_rows()
    print("\n| kernel | configuration | ptxas | global loads | global stores | machine instructions |\n"
          "|---|---|---|---|---|---|")
    projection_rows()
    print("\n| kernel | tile | ptxas | PTX |\n|---|---|---|---|")
    convolution_rows()
    cross_attention_rows()


if __name__ == "__main__":
    main()
