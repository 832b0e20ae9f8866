"""Named, combinable speed options for the SDXL pipeline, and the accuracy guard that vets them.

An optimization string is a comma-separated list of option names, e.g. ``"fuse_qkv,compile,fp8"``;
the dtype stays a separate parameter. Classifier-free guidance already runs the conditional and
unconditional rows as one UNet batch in diffusers' SDXL pipeline, so it needs no option.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ParameterError
from .record import archive_existing, unique_file

# name -> what it does (shown in 04_quantization and in error messages)
OPTIONS: dict[str, str] = {
    "fuse_qkv": "fuse the q, k, v projections of every attention into one matmul",
    "channels_last": "UNet tensors in NHWC memory layout (the VAE decoder stays NCHW unless vae_group_norms: with "
                     "inductor's GroupNorm it ran slower in NHWC on an H200)",
    "compile": "torch.compile the UNet's repeated transformer blocks (regional compilation, cached on disk)",
    "compile_resnets": "with compile: also compile the UNet's ResNet blocks and up/down samplers",
    "compile_transformers": "with compile: compile each whole Transformer2DModel (its norm, projections and blocks) "
                            "instead of each transformer block",
    "cudnn_benchmark": "cuDNN times its algorithms for each convolution shape at the first call and keeps the "
                       "fastest (torch.backends.cudnn.benchmark) for the convolutions left in bf16: the ResNet "
                       "shortcuts, the downsamplers, the decoder's",
    "cuda_graphs": "with compile: CUDA graphs for the UNet's compiled regions (mode reduce-overhead), one UNet "
                   "forward per graph-tree step, every batch generated on one thread",
    "autotune": "with compile: inductor's coordinate-descent tuning of the UNet's compiled kernels (a few % faster, "
                "cold compile much longer: over 18 minutes at batch 50 on an H200)",
    "multi_kernel": "with compile: inductor also builds one-pass (persistent) variants of row reductions up to 16k "
                    "wide, such as LayerNorm fused with fp8 row scales, and keeps the faster at the first call",
    "compile_vae": "torch.compile the VAE decoder's ResNet blocks and upsamplers (regional, cached on disk)",
    "vae_no_upcast": "decode in the model dtype instead of upcasting the VAE to fp32 (checked for NaN/black images)",
    "vae_slicing": "decode one image at a time, or N with vae_slicing=N (less memory at large batch sizes; a few "
                   "images per slice launch fewer kernels per image, which the decoder's fp8 kernels need)",
    "fp8": "torchao fp8 dynamic quantization of the UNet's wide linear layers, per-row scales (needs bf16, Hopper/Ada/MI300)",
    "int8": "torchao int8 dynamic quantization of the UNet's wide linear layers (Ampere and newer; needs compile)",
    "quant_all_linears": "with fp8/int8: quantize every linear of the transformer blocks, not only the wide ones",
    "fused_geglu": "with fp8: each feed-forward's GEGLU and the fp8 row scaling of its down projection run as one "
                   "Triton kernel, and the down projection runs in fp8 (sccsdxl.fused)",
    "fused_ffn_gemm": "with fp8, in place of fused_geglu: each feed-forward's up projection, GEGLU and fp8 "
                      "quantization run as one Triton GEMM kernel, and the down projection as a blockwise-scaled "
                      "fp8 GEMM (Hopper only; sccsdxl.ffn_gemm)",
    "fp8_attn_out": "with fp8: each transformer-block attention's output projection runs in fp8, its input "
                    "quantized per row by one Triton kernel (sccsdxl.fused)",
    "fused_norms": "with fp8 and fuse_qkv: each transformer block's LayerNorms run in one Triton kernel each with "
                   "the residual add before them and the fp8 row quantization of the linear after them; every block "
                   "linear but the text key/value projection in fp8 (sccsdxl.fused)",
    "fp8_projections": "with fused_norms and fused_group_norms: each transformer's proj_in and proj_out in fp8, "
                       "their inputs written in e4m3 by the transformer's GroupNorm kernels (one scale for the batch) "
                       "and by the blocks' last residual add (per row) (sccsdxl.projections)",
    "fused_group_norms": "with channels_last: the UNet's GroupNorms (with the SiLU after them, and in each ResNet "
                         "block the convolution bias and time embedding added before the second) run as Triton "
                         "kernels over channels_last memory (sccsdxl.group_norm)",
    "fp8_convs": "with fused_group_norms and fp8: the two 3x3 convolutions of each UNet ResNet block in fp8, their "
                 "input written by the GroupNorm + SiLU kernels in e4m3 with a zero frame, each convolution one GEMM "
                 "over the framed rows with TMA loads (NVIDIA Hopper or later; sccsdxl.fp8_conv)",
    "vae_group_norms": "the VAE decoder in channels_last memory, the GroupNorms (with SiLU) of its ResNet blocks and "
                       "output as sccsdxl.group_norm's Triton kernels: no layout conversion around its convolutions",
    "fp8_upsamplers": "with fp8 and folded_upsamplers or transposed_upsamplers: the UNet's two upsamplers in fp8, "
                      "their four phases' 2x2 kernels one GEMM over the small image's zero-framed e4m3 rows, written "
                      "interleaved (NVIDIA Hopper or later; sccsdxl.fp8_conv)",
    "vae_fp8_convs": "with vae_group_norms, in bf16: the two 3x3 convolutions of each VAE decoder ResNet block in "
                     "fp8, as fp8_convs runs the UNet's (NVIDIA Hopper or later; sccsdxl.fp8_conv)",
    "vae_fp8_upsamplers": "with folded_upsamplers or transposed_upsamplers, in bf16: the VAE decoder's three "
                          "upsamplers in fp8, as fp8_upsamplers runs the UNet's two (NVIDIA Hopper or later; "
                          "sccsdxl.fp8_conv)",
    "vae_attention_gemms": "with compile_vae: the VAE decoder's attention (one head 512 wide, which cuDNN's and flash "
                           "attention do not take) as two GEMMs and a softmax, a few images at a time, compiled "
                           "(sccsdxl.vae_attention)",
    "nhwc_transformer_outputs": "with channels_last: each Transformer2DModel of the UNet hands its output on in "
                                "channels_last memory (diffusers' makes it NCHW, so the ResNet blocks, samplers and "
                                "skip concatenations after it ran on mixed layouts)",
    "folded_upsamplers": "each 2x nearest upsampler of the UNet and VAE decoder and the 3x3 convolution after it as "
                         "one 2x2 convolution of the small image with four times the outputs, then interleaved: "
                         "the same sums with 16 multiplications for 36 (sccsdxl.upsample)",
    "transposed_upsamplers": "in place of folded_upsamplers: the same folded taps as one stride-2 transposed "
                             "convolution with 4x4 taps, which writes the four phases interleaved itself "
                             "(sccsdxl.upsample)",
    "concat_in_resnets": "with compile_resnets: each UNet up block's skip concatenation runs inside the compiled "
                         "region of the ResNet block that reads it, written by inductor instead of an eager torch.cat "
                         "(sccsdxl.skip_concat)",
    "text_kv_once": "each cross-attention's key/value projection of the text computed once per batch instead of "
                    "at every step (the text is the same at all 20): the same arithmetic, less of it "
                    "(sccsdxl.text_cache)",
}
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
# Dynamic quantization reads the whole input once per call, so it pays only where the matmul is wide next to
# that input: on an H200 (BENCHMARKS.md, kernels) the transformer blocks' GEGLU projections (out 5120/10240) and
# fused q/k/v (3840) ran faster in fp8, while 1280->1280 projections, the cross-attention k/v and the
# feed-forward down projection ran slower or broke even once their input was quantized.
MIN_QUANT_OUT_FEATURES = 3072
QUANT_SCOPE = "transformer_blocks."  # only inside the blocks that `compile` fuses; eager quantization is slower


@dataclass(frozen=True)
class Optimizations:
    fuse_qkv: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_resnets: bool = False
    compile_transformers: bool = False
    cuda_graphs: bool = False
    cudnn_benchmark: bool = False
    autotune: bool = False
    multi_kernel: bool = False
    compile_vae: bool = False
    vae_no_upcast: bool = False
    vae_slicing: int = 0  # images per decoder call: 0 for the whole batch
    fp8: bool = False
    int8: bool = False
    quant_all_linears: bool = False
    fused_geglu: bool = False
    fused_ffn_gemm: bool = False
    fp8_attn_out: bool = False
    fused_norms: bool = False
    fused_group_norms: bool = False
    fp8_projections: bool = False
    fp8_convs: bool = False
    fp8_upsamplers: bool = False
    vae_group_norms: bool = False
    vae_fp8_convs: bool = False
    vae_fp8_upsamplers: bool = False
    vae_attention_gemms: bool = False
    folded_upsamplers: bool = False
    transposed_upsamplers: bool = False
    nhwc_transformer_outputs: bool = False
    concat_in_resnets: bool = False
    text_kv_once: bool = False
    sdpa: str = "auto"

    @property
    def compiles(self) -> bool:
        """Whether any part is compiled (and so has a cold and a warm first call)."""
        return self.compile or self.compile_vae

    @property
    def quantization(self) -> str:
        return "fp8" if self.fp8 else "int8" if self.int8 else "none"

    def names(self) -> list[str]:
        chosen = [self._named(f.name) for f in fields(self) if f.name != "sdpa" and getattr(self, f.name)]
        return chosen + ([f"sdpa={self.sdpa}"] if self.sdpa != "auto" else [])

    def _named(self, name: str) -> str:
        """A flag by its name; vae_slicing by its name for one image, as vae_slicing=N for N."""
        value = getattr(self, name)
        return name if value == 1 else f"{name}={value}"

    def __str__(self) -> str:
        return ",".join(self.names()) or "none"


def parse_optimizations(text: str) -> Optimizations:
    """'fuse_qkv,compile,fp8,sdpa=flash' -> Optimizations; unknown names stop with the list of known ones."""
    values: dict[str, Any] = {}
    for item in (part.strip() for part in (text or "").split(",")):
        if not item or item == "none":
            continue
        if item.startswith("sdpa="):
            backend = item.split("=", 1)[1]
            if backend not in SDPA_BACKENDS:
                raise ParameterError(f"unknown SDPA backend {backend!r}", f"use sdpa= one of {', '.join(SDPA_BACKENDS)}")
            values["sdpa"] = backend
        elif item.startswith("vae_slicing="):
            values["vae_slicing"] = _images_per_slice(item.split("=", 1)[1])
        elif item == "vae_slicing":
            values["vae_slicing"] = 1
        elif item in OPTIONS:
            values[item] = True
        else:
            raise ParameterError(f"unknown optimization {item!r}",
                                 f"use a comma-separated list of: {', '.join(OPTIONS)}, sdpa=<{'|'.join(SDPA_BACKENDS)}>, "
                                 "vae_slicing=<images>")
    return Optimizations(**values)


def _images_per_slice(text: str) -> int:
    """vae_slicing=N's N, refused unless a whole number from 1."""
    if not text.isdigit() or int(text) < 1:
        raise ParameterError(f"vae_slicing={text}: the images per decoder call must be a whole number from 1",
                             "use vae_slicing=N with N >= 1, say 10 at batch 50 (a divisor of the batch size "
                             "keeps every slice the same shape, so compile_vae compiles once)")
    return int(text)


def fp8_capable(device: str) -> bool:
    """fp8 matmuls need NVIDIA compute capability >= 8.9 (Ada, Hopper, Blackwell) or AMD MI300 (gfx94x)."""
    import torch

    if device != "cuda" or not torch.cuda.is_available():
        return False
    props = torch.cuda.get_device_properties(0)
    arch = getattr(props, "gcnArchName", "") or ""
    return arch.startswith("gfx94") or arch.startswith("gfx95") or (props.major, props.minor) >= (8, 9)


def hopper_or_later(device: str) -> bool:
    """NVIDIA compute capability >= 9.0: the TMA block loads fp8_convs' kernel is built on."""
    import torch

    if device != "cuda" or not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    return torch.cuda.get_device_capability(0) >= (9, 0)


def supported_options(device: str) -> list[str]:
    """Options that can work on this device."""
    import torch

    names = ["fuse_qkv", "channels_last", "compile", "compile_resnets", "compile_transformers", "compile_vae",
             "autotune", "multi_kernel", "vae_no_upcast", "vae_slicing", "vae_attention_gemms", "folded_upsamplers",
             "transposed_upsamplers", "nhwc_transformer_outputs", "concat_in_resnets", "text_kv_once"]
    if device == "cuda":
        triton_kernels = _fused_kernel_available()
        names += ["cuda_graphs", "int8", "quant_all_linears"]
        names += ["cudnn_benchmark"] if torch.backends.cudnn.is_available() else []
        names += ["fused_group_norms", "vae_group_norms"] if triton_kernels else []
        if fp8_capable(device):
            names += ["fp8"] + (["fused_geglu", "fp8_attn_out", "fused_norms", "fp8_projections"]
                                if triton_kernels else [])
            names += ["fused_ffn_gemm"] if _blockwise_gemm_available() else []
            names += (["fp8_convs", "fp8_upsamplers", "vae_fp8_convs", "vae_fp8_upsamplers"]
                      if _fp8_conv_kernel_available(device) else [])
    return names


def _fused_kernel_available() -> bool:
    from .fused import available

    return available()


def _blockwise_gemm_available() -> bool:
    from .ffn_gemm import blockwise_gemm_available

    return blockwise_gemm_available()


def _fp8_conv_kernel_available(device: str) -> bool:
    """sccsdxl.fp8_conv's kernel can run: Triton, and an NVIDIA Hopper or later GPU for its TMA loads."""
    return _fused_kernel_available() and hopper_or_later(device)


def _needs_hopper(name: str, device: str) -> str:
    """The refusal for an option built on sccsdxl.fp8_conv's kernel, which loads its tiles through TMA."""
    return (f"{name} is a Triton kernel with e4m3 tiles and TMA loads: it needs an NVIDIA Hopper or later GPU "
            f"(compute capability 9.0); this run is on {device_name(device)}")


def _decoder_kernel_problems(name: str, outputs: str, dtype: str, device: str) -> list[str]:
    """What keeps a decoder option built on sccsdxl.fp8_conv's kernel, whose ``outputs`` are bf16, from this run."""
    if dtype != "bf16":
        return [f"{name} writes {outputs} in bf16: use the bf16 dtype"]
    return [] if _fp8_conv_kernel_available(device) else [_needs_hopper(name, device)]


def _needs_triton(name: str) -> str:
    return f"{name} is a Triton kernel: it needs an NVIDIA GPU and the triton package"


def check_optimizations(opts: Optimizations, dtype: str, device: str) -> None:
    """Refuse combinations that cannot work here, naming what does."""
    problems = []
    supported = supported_options(device)
    if opts.fp8 and opts.int8:
        problems.append("fp8 and int8 exclude each other")
    if opts.fp8 and not fp8_capable(device):
        problems.append(f"fp8 needs a GPU with fp8 matmuls (NVIDIA compute capability >= 8.9 or AMD MI300); "
                        f"this run is on {device_name(device)}")
    if opts.fp8 and dtype != "bf16":
        problems.append("fp8 with per-row scales needs bf16 weights: add -p dtype bf16")
    if opts.int8 and device != "cuda":
        problems.append("int8 dynamic quantization is built for GPUs here")
    if opts.int8 and not opts.compile:
        problems.append("int8 dynamic quantization is only fast when compiled (torchao): add compile")
    if (opts.cuda_graphs or opts.compile_resnets or opts.compile_transformers) and not opts.compile:
        problems.append("cuda_graphs, compile_resnets and compile_transformers apply to compiled regions: add compile")
    for name in ("autotune", "multi_kernel"):
        if getattr(opts, name) and not opts.compiles:
            problems.append(f"{name} changes compiled kernels: add compile or compile_vae")
    for name, what in (("fused_geglu", "the feed-forward's down projection"),
                       ("fp8_attn_out", "the attention's output projection"),
                       ("fused_norms", "every transformer-block linear after a LayerNorm")):
        if getattr(opts, name) and not opts.fp8:
            problems.append(f"{name} runs {what} in fp8: add fp8")
        elif getattr(opts, name) and not _fused_kernel_available():
            problems.append(_needs_triton(name))
    if opts.fused_ffn_gemm and not opts.fp8:
        problems.append("fused_ffn_gemm runs the feed-forward's projections in fp8: add fp8")
    elif opts.fused_ffn_gemm and opts.fused_geglu:
        problems.append("fused_ffn_gemm takes the place of fused_geglu (both replace the feed-forward): name one")
    elif opts.fused_ffn_gemm and not _blockwise_gemm_available():
        problems.append(f"fused_ffn_gemm needs a Triton kernel and torch._scaled_mm's blockwise fp8 GEMM (cuBLAS "
                        f"12.9 or later, Hopper GPUs only); this run is on {device_name(device)}")
    if opts.fused_norms and not opts.fuse_qkv:
        problems.append("fused_norms quantizes the fused q/k/v projection's input: add fuse_qkv")
    if opts.fused_group_norms and not opts.channels_last:
        problems.append("fused_group_norms reads the UNet's activations in channels_last memory: add channels_last")
    elif opts.fused_group_norms and not _fused_kernel_available():
        problems.append(_needs_triton("fused_group_norms"))
    if opts.fp8_projections and not (opts.fused_norms and opts.fused_group_norms):
        problems.append("fp8_projections has the fused_norms blocks' last residual add and the fused GroupNorm "
                        "kernels write its fp8 inputs: add fused_norms (with fp8, fuse_qkv) and fused_group_norms "
                        "(with channels_last)")
    if opts.fp8_convs and not (opts.fused_group_norms and opts.fp8):
        problems.append("fp8_convs has the fused GroupNorm kernels write its fp8 input: add fused_group_norms "
                        "(with channels_last) and fp8")
    elif opts.fp8_convs and not _fp8_conv_kernel_available(device):
        problems.append(_needs_hopper("fp8_convs", device))
    if opts.fp8_upsamplers and not ((opts.folded_upsamplers or opts.transposed_upsamplers) and opts.fp8):
        problems.append("fp8_upsamplers runs the folded upsamplers' four phases in fp8: add folded_upsamplers (or "
                        "transposed_upsamplers) and fp8")
    elif opts.fp8_upsamplers and not _fp8_conv_kernel_available(device):
        problems.append(_needs_hopper("fp8_upsamplers", device))
    if opts.vae_fp8_convs and not opts.vae_group_norms:
        problems.append("vae_fp8_convs has the decoder's fused GroupNorm kernels write its fp8 input: add "
                        "vae_group_norms")
    elif opts.vae_fp8_convs:
        problems += _decoder_kernel_problems("vae_fp8_convs", "the convolutions' outputs", dtype, device)
    if opts.vae_fp8_upsamplers and not (opts.folded_upsamplers or opts.transposed_upsamplers):
        problems.append("vae_fp8_upsamplers runs the decoder's folded upsamplers' four phases in fp8: add "
                        "folded_upsamplers (or transposed_upsamplers)")
    elif opts.vae_fp8_upsamplers:
        problems += _decoder_kernel_problems("vae_fp8_upsamplers", "the upsamplers' outputs", dtype, device)
    if opts.nhwc_transformer_outputs and not opts.channels_last:
        problems.append("nhwc_transformer_outputs keeps the UNet's channels_last layout after each transformer: "
                        "add channels_last")
    if opts.folded_upsamplers and opts.transposed_upsamplers:
        problems.append("transposed_upsamplers takes the place of folded_upsamplers (both replace the upsamplers): "
                        "name one")
    if opts.concat_in_resnets and not opts.compile_resnets:
        problems.append("concat_in_resnets moves the skip concatenations into the compiled ResNet regions: add "
                        "compile,compile_resnets")
    if opts.vae_attention_gemms and not opts.compile_vae:
        problems.append("vae_attention_gemms is only faster compiled: add compile_vae")
    if opts.vae_group_norms and not _fused_kernel_available():
        problems.append(_needs_triton("vae_group_norms"))
    if opts.quant_all_linears and opts.quantization == "none":
        problems.append("quant_all_linears widens fp8 or int8 quantization: add fp8 (or int8)")
    if opts.cuda_graphs and device != "cuda":
        problems.append("CUDA graphs need a GPU")
    if opts.cudnn_benchmark and "cudnn_benchmark" not in supported:
        problems.append(f"cudnn_benchmark times cuDNN's convolution algorithms: it needs an NVIDIA GPU with cuDNN; "
                        f"this run is on {device_name(device)}")
    if opts.sdpa in ("flash", "efficient", "cudnn") and device != "cuda":
        problems.append(f"the {opts.sdpa} attention kernel needs a GPU; use sdpa=math or leave sdpa out on the CPU")
    if problems:
        raise ParameterError("optimization options that cannot work here: " + "; ".join(problems),
                             f"options available on this machine: {', '.join(supported)}")


def device_name(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "the CPU"


def _quantizable(module, fqn: str) -> bool:
    """The linears that gain from dynamic fp8/int8: wide ones inside the UNet's transformer blocks."""
    return _in_blocks(module, fqn) and module.out_features >= MIN_QUANT_OUT_FEATURES


def _in_blocks(module, fqn: str) -> bool:
    """Every linear inside the UNet's transformer blocks (quant_all_linears)."""
    import torch

    return isinstance(module, torch.nn.Linear) and QUANT_SCOPE in fqn


def quantize_unet(unet, kind: str, all_linears: bool = False) -> int:
    """Dynamic fp8/int8 quantization of the UNet's transformer-block linears with torchao; returns how many."""
    try:
        from torchao.quantization import quantize_
    except ImportError:
        raise ParameterError(f"{kind} quantization needs torchao", "pip install torchao") from None
    if kind == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    else:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        config = Int8DynamicActivationInt8WeightConfig()
    chosen = _in_blocks if all_linears else _quantizable
    count = sum(1 for name, m in unet.named_modules() if chosen(m, name))
    quantize_(unet, config, filter_fn=chosen)
    return count


def is_compiled(info: dict) -> bool:
    """A runner (by its info) holds compiled regions, UNet or VAE: each new batch shape compiles a new graph."""
    return bool(info.get("compiled_regions") or info.get("compiled_vae_regions"))


def static_graphs() -> None:
    """One static graph per batch shape: a ragged batch must not switch every later call to dynamic-shape kernels."""
    import torch

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.automatic_dynamic_shapes = False


def _compile_modules(root, names: set[str], options: dict | None = None) -> int:
    """Compile every submodule whose class is named in ``names``, each as one full graph with these inductor
    ``options``, except those inside one compiled already (its graph holds them); returns how many."""
    static_graphs()
    compiled: list[str] = []
    for name, module in root.named_modules():
        if type(module).__name__ in names and not any(name.startswith(outer + ".") for outer in compiled):
            module.compile(fullgraph=True, options=options or None)
            compiled.append(name)
    return len(compiled)


def compile_regions(unet, resnets: bool, cuda_graphs: bool, transformers: bool = False, autotune: bool = False) -> int:
    """Regional compilation: each repeated block compiled once per shape, far faster than the whole UNet."""
    names = ({"Transformer2DModel", "Fp8ProjectionsTransformer"} if transformers
             else {"BasicTransformerBlock", "Fp8TransformerChain"})
    samplers = {"Downsample2D", "Upsample2D", "FoldedUpsample", "Fp8Upsample"}
    names |= {"ResnetBlock2D", "GroupNormResnetBlock", "Fp8ConvResnetBlock", "ConcatResnet"} | samplers \
        if resnets else set()
    options = {"triton.cudagraphs": True} if cuda_graphs else {}  # what mode="reduce-overhead" sets
    # the tuning times each kernel's variants at the run's shapes, so its cost grows with them: it is kept to the
    # UNet, where it was measured (the VAE decoder's kernels at batch 50 move gigabytes each)
    options |= {"coordinate_descent_tuning": True} if autotune else {}
    return _compile_modules(unet, names, options)


def compile_vae_regions(vae) -> int:
    """Regional compilation of the VAE decoder: each ResNet block, upsampler and (vae_attention_gemms) attention is
    compiled once per shape."""
    return _compile_modules(vae.decoder, {"ResnetBlock2D", "GroupNormResnetBlock", "Fp8ConvResnetBlock",
                                           "Upsample2D", "FoldedUpsample", "Fp8Upsample", "GemmAttention"})


@contextlib.contextmanager
def own_inductor_settings():
    """Restore torch.compile's inductor options on exit: torchao's quantization switches on coordinate-descent
    tuning for the whole process, which must not carry over to the next configuration measured."""
    import torch._inductor.config as inductor

    saved = inductor.get_config_copy()
    try:
        yield
    finally:
        inductor.load_config(saved)


def use_compile_cache(cache_dir: str | Path | None) -> str | None:
    """Keep inductor's compiled kernels in a directory the user keeps, so a second run starts warm."""
    if not cache_dir:
        return None
    path = Path(cache_dir).expanduser() / "inductor"
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path.resolve())
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return str(path)


def configure_inductor(opts: Optimizations, cache_dir: str | Path | None = None) -> dict:
    """Inductor's process-wide settings for the compiled options; returns them for the run record."""
    import torch._inductor.config as inductor

    # torchao's quantize_ switches this on for the whole process; on an H200 it made the compiled UNet 3 %
    # faster but its cold compile 8 times longer (BENCHMARKS.md), so it is a choice of its own, made per region
    # (compile_regions)
    inductor.coordinate_descent_tuning = False
    # a row of 1280-10240 values is reduced in two passes unless persistent; 1 = build both, time them
    inductor.triton.multi_kernel = 1 if opts.multi_kernel else 0
    if opts.multi_kernel:
        # torch 2.11 + Triton 3.6: a graph loaded from the disk cache fails while it reads the file that remembers
        # which variant won ("'NoneType' object does not support the context manager protocol"); without that
        # file each new process times the variants once at its first call, and the cached graph loads
        os.environ.setdefault("TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE", "1")
    return {"coordinate_descent_tuning": opts.autotune, "multi_kernel": opts.multi_kernel,
            "inductor_cache": use_compile_cache(cache_dir)}


def _new_cuda_graph_step(module, args):
    """Forward pre-hook: one UNet forward is one step of the CUDA graph trees. Without it, each compiled region's
    call counts as a new step, which frees the outputs of the regions before it while later regions still read
    them (the skip connections), and the next region fails ("accessing tensor output of CUDAGraphs that has been
    overwritten by a subsequent run", on the H200)."""
    import torch

    torch.compiler.cudagraph_mark_step_begin()


def decode_in_slices(vae, images: int) -> None:
    """Make ``vae.decode`` decode at most ``images`` latents per call to the decoder (diffusers' own slicing takes
    one): the decoder's peak memory grows with the slice, not the batch."""
    import torch
    from diffusers.models.autoencoders.vae import DecoderOutput

    decode = vae.decode

    def sliced(z, return_dict: bool = True, generator=None):
        images_out = torch.cat([decode(part, return_dict=False)[0] for part in z.split(images)])
        return DecoderOutput(sample=images_out) if return_dict else (images_out,)
    vae.decode = sliced


def _input_in(memory_format):
    """A forward pre-hook that hands its module the first input in ``memory_format`` (the VAE decoder its latents:
    NCHW, or channels_last with vae_group_norms)."""
    def hook(module, args):
        return (args[0].contiguous(memory_format=memory_format),) + tuple(args[1:])
    return hook


def _nhwc_output(module, args, output):
    """Forward hook: a Transformer2DModel's output in channels_last memory (option nhwc_transformer_outputs)."""
    import torch

    if isinstance(output, tuple):
        return (output[0].contiguous(memory_format=torch.channels_last),) + tuple(output[1:])
    return type(output)(sample=output.sample.contiguous(memory_format=torch.channels_last))


def keep_transformer_outputs_nhwc(unet) -> int:
    """Hook every Transformer2DModel of the UNet to hand its output on in channels_last memory; returns how many.
    Registered before the first call, the hook is part of the compiled region (compile_transformers)."""
    transformers = [m for m in unet.modules() if type(m).__name__ == "Transformer2DModel"]
    for transformer in transformers:
        transformer.register_forward_hook(_nhwc_output)
    return len(transformers)


def apply_optimizations(pipe, opts: Optimizations, cache_dir: str | Path | None = None) -> dict:
    """Change the loaded pipeline in place; returns what was done (for run records)."""
    import torch

    info: dict[str, Any] = {"optimizations": str(opts)}
    started = time.perf_counter()
    # process-wide: each configuration built sets it, on or off, so none inherits the one built before
    torch.backends.cudnn.benchmark = opts.cudnn_benchmark
    if opts.fuse_qkv:
        pipe.fuse_qkv_projections()
    if opts.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if opts.vae_group_norms:  # before compile_vae_regions, which compiles the blocks it swaps in
        from .group_norm import fuse_group_norms

        pipe.vae.decoder.to(memory_format=torch.channels_last)
        pipe.vae.decoder.register_forward_pre_hook(_input_in(torch.channels_last))
        info["vae_group_norms"] = fuse_group_norms(pipe.vae.decoder)
    if opts.vae_fp8_convs:  # after vae_group_norms, whose blocks it takes; before compile_vae_regions
        from .fp8_conv import fp8_resnet_convs

        info["vae_fp8_convs"] = fp8_resnet_convs(pipe.vae.decoder)
    elif opts.channels_last:
        # the UNet's NHWC latents would make it NHWC
        pipe.vae.decoder.register_forward_pre_hook(_input_in(torch.contiguous_format))
    if opts.vae_attention_gemms:  # before compile_vae_regions, which compiles the module it swaps in
        from .vae_attention import swap_vae_attention

        info["vae_attention_gemms"] = swap_vae_attention(pipe.vae.decoder)
    if opts.nhwc_transformer_outputs:
        info["nhwc_transformer_outputs"] = keep_transformer_outputs_nhwc(pipe.unet)
    if opts.folded_upsamplers or opts.transposed_upsamplers:  # after the layout changes, whose layout it keeps
        from .upsample import fold_upsamplers

        transposed = opts.transposed_upsamplers
        info["transposed_upsamplers" if transposed else "folded_upsamplers"] = (
            fold_upsamplers(pipe.unet, transposed) + fold_upsamplers(pipe.vae.decoder, transposed))
    if opts.fp8_upsamplers:  # after the folding, whose UNet upsamplers it takes; before compile_regions
        from .fp8_conv import fp8_upsamplers

        info["fp8_upsamplers"] = fp8_upsamplers(pipe.unet)
    if opts.vae_fp8_upsamplers:  # after the folding, whose decoder upsamplers it takes; before compile_vae_regions
        from .fp8_conv import fp8_upsamplers

        info["vae_fp8_upsamplers"] = fp8_upsamplers(pipe.vae.decoder)
    if opts.vae_no_upcast:
        pipe.vae.register_to_config(force_upcast=False)
    if opts.vae_slicing:
        decode_in_slices(pipe.vae, opts.vae_slicing)
    if opts.fused_geglu:  # before quantize_: the up projection it keeps is quantized with the other wide linears
        from .fused import fuse_geglu_feed_forwards

        info["fused_feed_forwards"] = fuse_geglu_feed_forwards(pipe.unet)
    if opts.fused_ffn_gemm:  # before quantize_ (its projections are fp8 already) and fused_norms (which takes it)
        from .ffn_gemm import fuse_feed_forward_gemms

        info["fused_ffn_gemms"] = fuse_feed_forward_gemms(pipe.unet)
    if opts.fp8_attn_out:  # before quantize_ too: the projection it takes over must not be quantized twice
        from .fused import quantize_attention_outputs

        info["fp8_attention_outputs"] = quantize_attention_outputs(pipe.unet, QUANT_SCOPE)
    if opts.fused_norms:  # after those two (it takes over their fp8 weights), before quantize_ (same reason)
        from .fused import fuse_transformer_blocks

        info["fused_blocks"] = fuse_transformer_blocks(pipe.unet)
    if opts.fused_group_norms:  # before compile_regions, which compiles the blocks it swaps in
        from .group_norm import fuse_group_norms

        info["fused_group_norms"] = fuse_group_norms(pipe.unet)
    if opts.fp8_convs:  # after fused_group_norms, whose blocks it takes; before concat_in_resnets, which wraps them
        from .fp8_conv import fp8_resnet_convs

        info["fp8_convs"] = fp8_resnet_convs(pipe.unet)
    if opts.fp8_projections:  # after fused_norms and fused_group_norms, whose chains and norms it takes
        from .projections import fp8_projections

        info["fp8_projections"] = fp8_projections(pipe.unet)
    if opts.quantization != "none":
        info["quantized_linears"] = quantize_unet(pipe.unet, opts.quantization, opts.quant_all_linears)
    if opts.text_kv_once:  # after fused_norms and quantize_, whose text projections it takes over as they are
        from .text_cache import cache_text_projections

        info["text_projections_once"] = len(cache_text_projections(pipe.unet).caches)
    if opts.concat_in_resnets:  # after fused_group_norms, whose blocks it wraps; before compile_regions
        from .skip_concat import concat_in_resnets

        info["concat_in_resnets"] = concat_in_resnets(pipe.unet)
    if opts.compiles:
        info.update(configure_inductor(opts, cache_dir))
    if opts.compile:
        info["compiled_regions"] = compile_regions(pipe.unet, opts.compile_resnets, opts.cuda_graphs,
                                                   opts.compile_transformers, opts.autotune)
        if opts.cuda_graphs:
            pipe.unet.register_forward_pre_hook(_new_cuda_graph_step)
    if opts.compile_vae:
        info["compiled_vae_regions"] = compile_vae_regions(pipe.vae)
    info["apply_seconds"] = round(time.perf_counter() - started, 2)
    return info


def sdpa_context(backend: str):
    """Scaled-dot-product attention prefers this backend ('auto': torch chooses).

    Where the preferred kernel cannot take a shape (the VAE's single 512-wide attention head exceeds the
    flash and cuDNN limits), torch falls back to the next of flash, cuDNN, memory-efficient, math.
    """
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    order = [table[backend]] + [b for name, b in table.items() if name != backend]
    return sdpa_kernel(order, set_priority=True)


# ---------------------------------------------------------------- accuracy guard

CLIP_TOLERANCE = 0.01  # TEST01 fallback: CLIP within 1 %
FID_TOLERANCE = 0.02  # and FID within 2 %
DARK_LEVEL = 8  # an image whose every pixel is below this is black


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (inf when identical)."""
    mse = float(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def broken_images(images: np.ndarray) -> list[int]:
    """Indices of black or flat images (what a NaN/overflowing decode produces)."""
    flat = images.reshape(len(images), -1)
    return [i for i, px in enumerate(flat) if px.max() < DARK_LEVEL or px.min() == px.max()]


@dataclass
class GuardResult:
    """How far a configuration's images are from the fp16 reference's, and whether that is acceptable."""

    config: str
    samples: int
    mean_psnr_db: float
    min_psnr_db: float
    mean_abs_diff: float
    broken: list
    clip_reference: float | None = None
    clip_test: float | None = None
    fid_reference: float | None = None
    fid_test: float | None = None
    verdict: str = "unverified"  # pass | fail | unverified (no metric models to decide with)
    reasons: list | None = None

    @property
    def clip_delta(self) -> float | None:
        if self.clip_reference is None or self.clip_test is None:
            return None
        return abs(self.clip_test - self.clip_reference) / abs(self.clip_reference)

    @property
    def fid_delta(self) -> float | None:
        if self.fid_reference is None or self.fid_test is None:
            return None
        return abs(self.fid_test - self.fid_reference) / max(abs(self.fid_reference), 1e-12)

    def as_row(self) -> dict:
        row = asdict(self)
        row.update(clip_delta=self.clip_delta, fid_delta=self.fid_delta)
        return row


def judge(result: GuardResult) -> GuardResult:
    """Pass only when CLIP (and FID, if computed) stay within the TEST01 tolerances and no image is broken."""
    reasons = []
    if result.broken:
        reasons.append(f"{len(result.broken)} black or flat images (NaN/overflow): indices {result.broken[:5]}")
    if result.clip_delta is not None and result.clip_delta > CLIP_TOLERANCE:
        reasons.append(f"CLIP moved {result.clip_delta:.2%} (> {CLIP_TOLERANCE:.0%})")
    if result.fid_delta is not None and result.fid_delta > FID_TOLERANCE:
        reasons.append(f"FID moved {result.fid_delta:.2%} (> {FID_TOLERANCE:.0%})")
    if reasons:
        result.verdict = "fail"
    elif result.clip_delta is not None:
        result.verdict = "pass"
    else:
        result.verdict = "unverified"
        reasons.append("no CLIP model given: only pixel differences were measured")
    result.reasons = reasons
    return result


def compare_images(config: str, reference: np.ndarray, test: np.ndarray, clip_scores=None) -> GuardResult:
    """Pixel and metric comparison of one configuration's images with the reference's (same prompts, same latent).

    ``clip_scores``: optional callable images -> mean CLIP score (from sccsdxl.accuracy), the same for both sets.
    """
    if reference.shape != test.shape:
        raise ParameterError(f"reference images {reference.shape} and {config!r} images {test.shape} differ in shape",
                             "generate both from the same prompts with the same model")
    values = [psnr(r, t) for r, t in zip(reference, test)]
    finite = [v for v in values if np.isfinite(v)] or [float("inf")]
    result = GuardResult(config=config, samples=len(test), mean_psnr_db=float(np.mean(finite)),
                         min_psnr_db=float(min(values)),
                         mean_abs_diff=float(np.mean(np.abs(reference.astype(np.int16) - test.astype(np.int16)))),
                         broken=broken_images(test))
    if clip_scores is not None:
        result.clip_reference, result.clip_test = float(clip_scores(reference)), float(clip_scores(test))
    return judge(result)


# ---------------------------------------------------------------- measuring configurations

REFERENCE_SPEC = "fp16:"  # the guard's reference on a GPU: fp16, no options (the CPU has no fast fp16: fp32 there)


def reference_spec(device: str) -> str:
    return REFERENCE_SPEC if device == "cuda" else "fp32:"
MIN_FID_SAMPLES = 100  # below this, FID of the guard images is noise; only CLIP decides
RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class ConfigSpec:
    """One candidate configuration: a dtype and an optimization string, written 'bf16:compile,fp8'."""

    dtype: str
    optimizations: Optimizations

    @property
    def name(self) -> str:
        return f"{self.dtype}:{self.optimizations}" if self.optimizations.names() else f"{self.dtype}:"


def parse_config(spec: str) -> ConfigSpec:
    from .pipeline import DTYPES

    dtype, _, options = spec.partition(":")
    dtype = dtype.strip()
    if dtype not in DTYPES:
        raise ParameterError(f"configuration {spec!r} does not start with a dtype",
                             f"write configurations as '<dtype>:<options>', dtype one of {', '.join(DTYPES)}, "
                             "e.g. 'bf16:compile,fp8' or 'fp16:'")
    return ConfigSpec(dtype, parse_optimizations(options))


def check_configs(specs: list[str], device: str) -> list[ConfigSpec]:
    """Parse and vet every configuration before any GPU time is spent."""
    if not specs or not all(isinstance(s, str) for s in specs):
        raise ParameterError(f"configs must be a non-empty list of strings, got {specs!r}",
                             "pass e.g. -y \"configs: ['fp16:', 'bf16:compile,fp8']\"")
    parsed = [parse_config(s) for s in specs]
    for spec in parsed:
        check_optimizations(spec.optimizations, spec.dtype, device)
    return parsed


def guard_prompts(samples, count: int) -> list[str]:
    """The first ``count`` captions of the variant: fixed prompts, and the latent is fixed too."""
    return samples.captions[:max(1, min(count, len(samples)))]


def _to_pil(images: np.ndarray):
    from PIL import Image

    return [Image.fromarray(image) for image in images]


def metric_scorers(models, captions: list[str]):
    """(clip, fid) callables over uint8 image arrays, from sccsdxl.accuracy's metric models (same code as 05)."""
    from .accuracy import feature_statistics, frechet_distance, inception_features

    def clip(images: np.ndarray) -> float:
        return float(np.mean(models.clip.scores(_to_pil(images), captions[:len(images)])))

    def fid(images: np.ndarray) -> float:
        mu, sigma = feature_statistics(inception_features(models.inception, _to_pil(images), models.device))
        return frechet_distance(models.mu_ref, models.sigma_ref, mu, sigma)

    return clip, fid


def guard_images(runner, prompts: list[str], batch_size: int) -> np.ndarray:
    """The guard's images in calls of the run's batch size; a compiled runner pads the last call to that size,
    so its first call compiles the one graph the performance run will use."""
    if is_compiled(runner.info):
        runner.pad_to = batch_size
    return np.concatenate([runner.generate(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])


def _load_done(path: Path) -> dict[str, dict]:
    import json

    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["config"]: row for row in rows}


def evaluate_configs(base, specs: list[str], guard_samples: int = 8, metric_models=None, results_dir=None,
                     show_progress: bool = True, warm_start: bool = False) -> list[dict]:
    """For each configuration: build it, time its first call (compile included), run loadgen's performance
    test through the harness, and compare its images with the fp16 reference's. Rows are appended to
    ``results_dir/results.jsonl`` as they finish, so an interrupted evaluation resumes where it stopped.
    With ``warm_start``, compiled configurations are also started once more in a new process that reuses the
    on-disk compile cache (``warm_first_call_seconds``)."""
    import json

    from .data import sample_set
    from .pipeline import free_gpu_memory, resolve_device

    base.validate()
    device = resolve_device(base.device, base.model_source)
    parsed = check_configs(specs, device)
    results_dir = Path(results_dir or Path(base.output_dir) / "quantization")
    results_dir.mkdir(parents=True, exist_ok=True)
    done = _load_done(results_dir / RESULTS_FILE)
    prompts = guard_prompts(sample_set(base.variant), guard_samples)
    scorers = metric_scorers(metric_models, prompts) if metric_models is not None else (None, None)

    reference_path = results_dir / "reference_images.npy"
    if reference_path.is_file() and np.load(reference_path, mmap_mode="r").shape[0] == len(prompts):
        reference = np.load(reference_path)
    else:
        with own_inductor_settings():
            runner, reference, _, _ = _build(base, parse_config(reference_spec(device)), prompts)
        np.save(reference_path, reference)
        del runner
        free_gpu_memory()
    rows = []
    for spec in parsed:
        if spec.name in done:
            rows.append(done[spec.name])
            continue
        row = {"config": spec.name, "dtype": spec.dtype, "optimizations": str(spec.optimizations),
               "reference": reference_spec(device)}
        with own_inductor_settings():  # torchao's quantize_ changes inductor options process-wide
            row.update(_evaluate(base, spec, prompts, reference, scorers, show_progress, warm_start, results_dir))
        with open(results_dir / RESULTS_FILE, "a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
        rows.append(row)
    return rows


def _build(base, spec: ConfigSpec, prompts: list[str]):
    """The configuration's runner and its guard images; returns (runner, images, load s, first call s)."""
    from .pipeline import make_runner

    started = time.perf_counter()
    runner = make_runner(base.model_source, spec.dtype, base.device, base.model_path or None,
                         str(Path(base.output_dir) / "cache"), optimizations=str(spec.optimizations),
                         data_dir=base.data_dir)
    loaded = time.perf_counter()
    images = guard_images(runner, prompts, base.batch_size)  # first call: compilation happens here
    return runner, images, loaded - started, time.perf_counter() - loaded


def _evaluate(base, spec: ConfigSpec, prompts: list[str], reference: np.ndarray, scorers, show_progress: bool,
              warm_start: bool, results_dir: Path | None = None) -> dict[str, Any]:
    """One configuration's row: speed, guard verdict, compile times; an OOM or a failing option is a result."""
    from dataclasses import replace

    from .distributed import is_oom
    from .harness import run_benchmark
    from .pipeline import free_gpu_memory

    clip, fid = scorers
    runner = None
    try:
        runner, images, load_s, first_call_s = _build(base, spec, prompts)
        run = run_benchmark(replace(base, dtype=spec.dtype, optimizations=str(spec.optimizations)),
                            modes=("performance",), generator=runner, show_progress=show_progress,
                            label=f"quant-{spec.dtype}-{'-'.join(spec.optimizations.names()) or 'none'}")
        perf = run.result("performance")
        guard = compare_images(spec.name, reference, images, clip)
        if fid is not None and len(prompts) >= MIN_FID_SAMPLES:
            guard.fid_reference, guard.fid_test = fid(reference), fid(images)
            guard = judge(guard)
        row = dict(status="ok", samples_per_second=perf["samples_per_second"], valid=perf["valid"],
                   peak_gpu_memory_bytes=perf["peak_gpu_memory_bytes"], load_seconds=round(load_s, 2),
                   first_call_seconds=round(first_call_s, 2), run_dir=str(run.run_dir), guard=guard.as_row(),
                   verdict=guard.verdict, gpu_power=perf.get("gpu_power"))
        if warm_start and spec.optimizations.compiles:
            runner = None  # free this process's copy before the second start loads another
            free_gpu_memory()
            try:
                warm = warm_start_seconds(base, spec.name, len(prompts), log_dir=results_dir)
                row["warm_first_call_seconds"] = warm["first_call_seconds"]
            except Exception as exc:  # noqa: BLE001 - the measurements above stand; the failure is reported
                row["warm_start_error"] = f"{type(exc).__name__}: {exc}"
        return row
    except Exception as exc:  # noqa: BLE001 - an OOM or a failing option is a result, not the end of the sweep
        return dict(status="out of memory" if is_oom(exc) else "error", error=f"{type(exc).__name__}: {exc}",
                    verdict="fail")
    finally:
        runner = None
        free_gpu_memory()


def results_table(rows: list[dict]):
    """Speed and accuracy per configuration, with the speed-up over the fp16 reference configuration."""
    import pandas as pd

    table = pd.DataFrame([{
        "config": r["config"], "status": r["status"], "samples/s": r.get("samples_per_second"),
        "peak GiB": (r.get("peak_gpu_memory_bytes") or 0) / 2**30 or None,
        "first call s": r.get("first_call_seconds"), "warm first call s": r.get("warm_first_call_seconds"),
        "GPU W": (r.get("gpu_power") or {}).get("mean_power_w"),
        "J/sample": (r.get("gpu_power") or {}).get("joules_per_sample"),
        "verdict": r["verdict"],
        "PSNR dB": (r.get("guard") or {}).get("mean_psnr_db"), "CLIP delta": (r.get("guard") or {}).get("clip_delta"),
        "error": r.get("error") or r.get("warm_start_error"),
    } for r in rows]).set_index("config")
    reference = table["samples/s"].get(rows[0].get("reference", REFERENCE_SPEC)) if rows else None
    table["speedup"] = table["samples/s"] / reference if reference else None
    return table


def choose(rows: list[dict]) -> dict | None:
    """The fastest configuration that passed the guard (or, without metric models, was not failed)."""
    ok = [r for r in rows if r["status"] == "ok" and r["verdict"] == "pass"]
    if not ok:
        ok = [r for r in rows if r["status"] == "ok" and r["verdict"] == "unverified"]
    return max(ok, key=lambda r: r["samples_per_second"] or 0, default=None)


def write_tuned_params(output_dir: str | Path, base, row: dict, name: str = "quantized.yaml") -> Path:
    """The chosen configuration as a papermill parameter file for 05 and 06; an earlier file is kept, renamed."""
    import yaml

    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    archive_existing(path)
    params = {"variant": base.variant, "model_source": base.model_source, "model_path": base.model_path,
              "dtype": row["dtype"], "batch_size": base.batch_size, "optimizations": row["optimizations"]
              if row["optimizations"] != "none" else ""}
    header = (f"# written by 04_quantization: {row['config']}, {row.get('samples_per_second')} samples/s, "
              f"guard verdict {row['verdict']}\n")
    path.write_text(header + yaml.safe_dump(params, sort_keys=False))
    return path


def resolve_device_for(config) -> str:
    from .pipeline import resolve_device

    return resolve_device(config.device, config.model_source)


def options_table(device: str):
    """Every option, what it does, and whether it can run on this machine."""
    import pandas as pd

    available = set(supported_options(device))
    return pd.DataFrame([{"option": name, "what it does": text, "here": "yes" if name in available else "no"}
                         for name, text in OPTIONS.items()]).set_index("option")


def plot_results(rows: list[dict]):
    """samples/s per configuration, coloured by the guard's verdict."""
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["status"] == "ok"]
    colours = {"pass": "tab:green", "unverified": "tab:gray", "fail": "tab:red"}
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * max(len(measured), 1)))
    ax.barh([r["config"] for r in measured], [r["samples_per_second"] for r in measured],
            color=[colours[r["verdict"]] for r in measured])
    ax.set_xlabel("samples/s (loadgen Offline)")
    ax.set_title("green: passes the accuracy guard; grey: unverified; red: fails")
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- warm start: a new process with the compile cache

def warm_start_seconds(base, spec: str, count: int, timeout_s: float = 1800, log_dir: str | Path | None = None) -> dict:
    """Load + first call of ``spec`` in a fresh process that reuses the kit's on-disk compile cache.

    The in-process first call measures a cold compile; this measures what a second notebook run costs. When the
    process fails, its whole output goes to a new log file in ``log_dir`` (default: the output directory) and
    the error names the exception and that file.
    """
    import json
    import subprocess

    command = [sys.executable, "-m", "sccsdxl.quant", "--first-call", spec, "--model-source", base.model_source,
               "--model-path", base.model_path, "--device", base.device, "--output-dir", str(base.output_dir),
               "--data-dir", base.data_dir, "--count", str(count), "--batch-size", str(base.batch_size)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        log = unique_file(Path(log_dir or base.output_dir), f"warm-start-{time.strftime('%Y%m%d-%H%M%S')}", ".log",
                          "a warm-start log")
        log.write_text(f"$ {' '.join(command)}\n\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
        raise RuntimeError(f"warm-start measurement of {spec!r} failed: {failure_line(done.stderr or done.stdout)} "
                           f"(full output: {log})")
    return json.loads(lines[-1])


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Failed|Interrupt)\b.*")


def failure_line(output: str) -> str:
    """The line of a traceback that names the exception, not the hints printed after it (dynamo's, for one)."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    named = [line for line in lines if _EXCEPTION_LINE.match(line)]
    return (named or lines or ["no output"])[-1]


def _first_call_main(argv: list[str] | None = None) -> int:
    """``python -m sccsdxl.quant --first-call SPEC ...``: prints load and first-call seconds as JSON (exit 0), or
    what is wrong with the input and how to fix it (exit 2)."""
    from .errors import KitError

    try:
        _first_call(argv)
    except KitError as exc:  # a line the warm start's failure_line finds, not a traceback
        print(f"{type(exc).__name__}: {exc.message}", file=sys.stderr)
        return 2
    return 0


def _first_call(argv: list[str] | None) -> None:
    import argparse
    import json

    from .data import sample_set
    from .pipeline import make_runner

    parser = argparse.ArgumentParser(prog="python -m sccsdxl.quant")
    parser.add_argument("--first-call", required=True, metavar="SPEC")
    for flag in ("--model-source", "--model-path", "--device", "--output-dir", "--data-dir"):
        parser.add_argument(flag, default="")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    spec = parse_config(args.first_call)
    started = time.perf_counter()
    runner = make_runner(args.model_source, spec.dtype, args.device or "auto", args.model_path or None,
                         str(Path(args.output_dir) / "cache"), optimizations=str(spec.optimizations),
                         data_dir=args.data_dir)
    loaded = time.perf_counter()
    guard_images(runner, guard_prompts(sample_set("base"), args.count), args.batch_size)
    print(json.dumps({"config": spec.name, "load_seconds": round(loaded - started, 2),
                      "first_call_seconds": round(time.perf_counter() - loaded, 2)}))


if __name__ == "__main__":
    sys.exit(_first_call_main())
