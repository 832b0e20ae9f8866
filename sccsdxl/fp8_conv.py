"""Option fp8_convs: the 3x3 convolutions of the UNet's ResNet blocks in fp8, as GEMMs over a zero-framed input.

The UNet's convolutions take about 4.9 s of a 21.8 s batch of 50 on an H200, in bf16 through cuDNN (BENCHMARKS.md,
session 17), while its fp8 GEMMs run near 1,300 TFLOP/s; PyTorch has no fp8 convolution for Hopper, cuDNN's ran at
310 TFLOP/s at most shapes (session 9) and a Triton kernel gathering each 3x3 window through pointers at 770-900
(session 5). Here each ResNet block's GroupNorm + SiLU kernels (sccsdxl.group_norm) write the convolution's input
in e4m3 with one scale, NHWC, every image framed by a one-pixel border of zeros and flattened to
rows of pixels. Then the pixel under tap (dy, dx) of output pixel q is input row q + dy (W + 2) + dx for every q of
the framed grid: each tap's operand is the same matrix shifted by a constant number of rows, every tile of it BM
consecutive rows, and the convolution is one GEMM over K = 9 C_in (weights e4m3, one scale per output channel)
that also computes the frame's outputs (13 % more at 32 x 32, 6 % at 64 x 64, 3 % at 128 x 128) and stores only the
image's. Each operand tile is one TMA block load: 1,150-1,210 TFLOP/s at the 640 and 1280 levels on an H200, where
the same sums with pointer loads ran 630-930 and cuDNN's bf16 680-790; through loadgen the option took the fastest
configuration from 2.297 to 2.414 samples/s (BENCHMARKS.md, session 18).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .fused import FP8_MAX, MIN_SCALE, autotune, env_flag, quantize_rows, swap_modules, triton
from .group_norm import GroupNormResnetBlock, e4m3_scale, frame_e4m3, framed_interior, group_norm_framed_fp8
from .upsample import FoldedUpsample, fold_weight, interleave_phases

# (BM, BN, BK, warps, stages): e4m3 tiles, up to 4 stages of 48 kB in shared memory; BK = 32 for input channels
# that only 32 divides; BN = 64 with BK = 64 for the 320 level, whose 320 outputs leave a third 128-wide tile half
# empty and whose input channels take only 64-wide steps
TILES = ((128, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (128, 256, 64, 8, 4),
         (128, 128, 64, 8, 4), (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (128, 128, 32, 8, 4),
         (128, 64, 64, 4, 4), (256, 64, 64, 8, 4))
K_BLOCKS = tuple(sorted({tile[2] for tile in TILES}))  # one must divide a convolution's input channels
# each ResNet block's residual add (and output scale) in its second convolution's epilogue, one pass over the block's
# output fewer: on unless =0 (read once, when the blocks are made); session 19 measured it in the fastest configuration
RESIDUAL_IN_CONV = env_flag("SCCSDXL_CONV_RESIDUAL_IN_CONV", default=True)
# more tuning choices: tiles of 256 x 128 outputs, which load 25 % fewer operand bytes per FLOP than 128 x 128 ones
# (the convolutions move 9-10 TB/s of operand tiles from L2 at every level, session 21), and persistent kernels, one
# program per SM walking the tiles in turn in one flattened loop, so the loads of a program's next tile can run while
# it stores this one (a 128 x 256 or 256 x 128 tile fills an SM with one program, which otherwise waits at each tile's
# start and end). On since session 22 (+1.3 % through loadgen, the eight convolutions alone 7 % faster); =0 leaves
# them out (read once). One program per SM only: at 130-250 registers per thread two of 256 threads do not fit an SM
# (benchmarks/kernels_ptx.py)
MORE_TILES = env_flag("SCCSDXL_CONV_MORE_TILES", default=True)
# the residual add's and the folded upsampler's forms take only tiles of at most 128 x 128 outputs, as larger ones
# spilled 20-472 bytes of registers in their epilogues; with their epilogue stored in parts of the tile's columns
# (halves; quarters at 256 rows), none but 28 bytes in one folded persistent form (benchmarks/kernels_ptx.py), they
# are offered every tile too. On since session 23 (+1.2 % through loadgen, the residual convolutions alone 14 %
# faster); =0 keeps them to 128 x 128 (read once)
SPLIT_EPILOGUES = env_flag("SCCSDXL_CONV_SPLIT_EPILOGUES", default=True)
WIDE_TILES = ((256, 128, 64, 8, 4), (256, 128, 128, 8, 3))
# the two tiles whose persistent form was the fastest choice at some shape alone (session 22); the persistent forms
# of 128 x 128 x 128, 128 x 128 x 64, 256 x 64 x 64 and 256 x 128 x 64, tried then too, were 8-151 % slower than the
# fastest choice at every shape, plain and with a residual add, and only lengthened a cold start
PERSISTENT_TILES = ((128, 256, 128, 8, 3), (256, 128, 128, 8, 3))

if triton is not None:
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .ffn_gemm import grouped_tile

    # the largest tile (outputs) whose residual add's or folded upsampler's epilogue runs whole; above it the tuning
    # offers such forms a tile only with SPLIT_EPILOGUES, and the kernel stores the epilogue in parts
    WHOLE_EPILOGUE_OUTPUTS = tl.constexpr(128 * 128)

    def configs(more: bool | None = None) -> list:
        """The tuning's choices, one per tile, and with ``more`` (MORE_TILES unless given) the WIDE_TILES and the
        PERSISTENT_TILES as persistent kernels."""
        choices = [(tile, False) for tile in TILES]
        if MORE_TILES if more is None else more:
            choices += [(tile, False) for tile in WIDE_TILES] + [(tile, True) for tile in PERSISTENT_TILES]
        return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8, "PERSISTENT": walk}, num_warps=warps,
                              num_stages=stages) for (bm, bn, bk, warps, stages), walk in choices]

    def fits(configs, named_args, split_epilogues: bool | None = None, **kwargs):
        """Only channel steps that divide the input channels; for a folded upsampler or a residual add no tiles
        larger than 128 x 128 outputs unless ``split_epilogues`` (SPLIT_EPILOGUES unless given)."""
        def flag(name: str) -> bool:
            return bool(named_args.get(name, kwargs.get(name, False)))
        split = SPLIT_EPILOGUES if split_epilogues is None else split_epilogues
        narrow = not split and (flag("FOLDED") or flag("HAS_RESIDUAL"))
        return [c for c in configs if named_args["C_IN"] % c.kwargs["BK"] == 0
                and not (narrow and c.kwargs["BM"] * c.kwargs["BN"] > WHOLE_EPILOGUE_OUTPUTS)]

    def _set_blocks(args: dict) -> bool:
        """The TMA descriptors' blocks follow the tile being run; returns whether the output channels fill whole
        tiles (the kernel's EVEN_N: no channel masks). A heuristic of the kernel's, so it runs at every launch, the
        tuning's timings and a tile given directly alike: as a configuration's pre-hook it would keep Triton from
        keeping the timings."""
        args["x_desc"].block_shape = [args["BM"], args["BK"]]
        args["w_desc"].block_shape = [args["BN"], args["BK"]]
        return args["C_OUT"] % args["BN"] == 0

    @triton.jit
    def _tap_shift(tap, W, FOLDED: tl.constexpr):
        """How many framed rows tap ``tap``'s input lies from the output pixel's (3x3 taps centred; a folded
        upsampler's 2x2 taps from q down and right)."""
        if FOLDED:
            return (tap // 2) * (W + 2) + tap % 2
        else:
            return (tap // 3 - 1) * (W + 2) + tap % 3 - 1

    @autotune(configs=configs(), key=["FRAMED", "H", "W", "C_IN", "C_OUT", "FOLDED", "HAS_RESIDUAL"],
              prune_configs_by={"early_config_prune": fits})
    @triton.heuristics({"EVEN_N": _set_blocks})
    @triton.jit
    def _shifted_conv_kernel(x_desc, amax_ptr, w_desc, w_scale_ptr, bias_ptr, y_ptr,
                             residual_ptr, residual_scale, FRAMED, H, W, C_IN, C_OUT, HAS_BIAS: tl.constexpr,
                             FOLDED: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                             BK: tl.constexpr, GROUP_M: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                             EVEN_N: tl.constexpr, PERSISTENT: tl.constexpr = False):
        """y[pixel, n] = x_scale * w_scale[n] * sum over taps t and channels c of framed[q + shift(t), c] * w[n, t, c]
        (+ bias[n]), q over the FRAMED rows of the framed grid (W + 3 guard rows before them), stored where q is an
        image pixel (int64 addresses: the image rows times channels pass 2**31 at batch 50). Every operand tile is
        one TMA block load (rows past the buffer read as zeros). x_scale = amax / 448, one scalar for the batch.
        EVEN_N: BN divides C_OUT (no channel masks). PERSISTENT: one program per SM, each walking the tiles with the
        grid's stride in one flattened loop; otherwise one program per tile.
        HAS_RESIDUAL: (y + residual) * residual_scale, the residual read where y is stored (a ResNet block's output).
        FOLDED: a folded upsampler's four phases (sccsdxl.upsample), 2x2 taps from q down and right, C_OUT = 4 x
        the channels; phase (a, b)'s output at framed position (y, x) is pixel (2y - a, 2x - b) of the 2H x 2W
        image, where a <= y < a + H and b <= x < b + W."""
        n_m, n_n = tl.cdiv(FRAMED, BM), tl.cdiv(C_OUT, BN)
        if PERSISTENT:
            for tile in tl.range(tl.program_id(0), n_m * n_n, tl.num_programs(0), flatten=True):
                _conv_tile(tile, n_m, n_n, x_desc, amax_ptr, w_desc, w_scale_ptr, bias_ptr, y_ptr, residual_ptr,
                           residual_scale, FRAMED, H, W, C_IN, C_OUT, HAS_BIAS, FOLDED, HAS_RESIDUAL, BM, BN, BK,
                           GROUP_M, FP8_MAX, MIN_SCALE, EVEN_N)
        else:
            _conv_tile(tl.program_id(0), n_m, n_n, x_desc, amax_ptr, w_desc, w_scale_ptr, bias_ptr, y_ptr,
                       residual_ptr, residual_scale, FRAMED, H, W, C_IN, C_OUT, HAS_BIAS, FOLDED, HAS_RESIDUAL, BM, BN,
                       BK, GROUP_M, FP8_MAX, MIN_SCALE, EVEN_N)

    @triton.jit
    def _conv_tile(tile, n_m, n_n, x_desc, amax_ptr, w_desc, w_scale_ptr, bias_ptr, y_ptr, residual_ptr,
                   residual_scale, FRAMED, H, W, C_IN, C_OUT, HAS_BIAS: tl.constexpr, FOLDED: tl.constexpr,
                   HAS_RESIDUAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   GROUP_M: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, EVEN_N: tl.constexpr):
        """One BM x BN output tile of _shifted_conv_kernel: its sums over every tap and channel, then its epilogue."""
        pid_m, pid_n = grouped_tile(tile, n_m, n_n, GROUP_M)
        chunks = C_IN // BK
        if FOLDED:
            n_taps = 4
        else:
            n_taps = 9
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in tl.range(0, n_taps * chunks):
            tap = k // chunks
            channel = (k - tap * chunks) * BK
            a = x_desc.load([(W + 3) + pid_m * BM + _tap_shift(tap, W, FOLDED), channel])
            b = w_desc.load([pid_n * BN, tap * C_IN + channel])
            acc = tl.dot(a, b.T, acc)
        if (HAS_RESIDUAL or FOLDED) and BM * BN > WHOLE_EPILOGUE_OUTPUTS:
            # a residual add's or a folded upsampler's epilogue over the whole tile spills registers (SPLIT_EPILOGUES):
            # store it in parts of the tile's columns, each with that part's addresses and residual values live;
            # halves, and at 256 rows quarters (halves there still spilled 24 bytes)
            if BM == 256:
                left, right = _column_halves(acc, BM, BN)
                _epilogue_in_halves(left, pid_m, pid_n * BN, amax_ptr, w_scale_ptr, bias_ptr, y_ptr, residual_ptr,
                                    residual_scale, FRAMED, H, W, C_OUT, HAS_BIAS, FOLDED, HAS_RESIDUAL, BM, BN // 2,
                                    FP8_MAX, MIN_SCALE, EVEN_N)
                _epilogue_in_halves(right, pid_m, pid_n * BN + BN // 2, amax_ptr, w_scale_ptr, bias_ptr, y_ptr,
                                    residual_ptr, residual_scale, FRAMED, H, W, C_OUT, HAS_BIAS, FOLDED, HAS_RESIDUAL,
                                    BM, BN // 2, FP8_MAX, MIN_SCALE, EVEN_N)
            else:
                _epilogue_in_halves(acc, pid_m, pid_n * BN, amax_ptr, w_scale_ptr, bias_ptr, y_ptr, residual_ptr,
                                    residual_scale, FRAMED, H, W, C_OUT, HAS_BIAS, FOLDED, HAS_RESIDUAL, BM, BN,
                                    FP8_MAX, MIN_SCALE, EVEN_N)
        else:
            _conv_epilogue(acc, pid_m, pid_n * BN, amax_ptr, w_scale_ptr, bias_ptr, y_ptr, residual_ptr,
                           residual_scale, FRAMED, H, W, C_OUT, HAS_BIAS, FOLDED, HAS_RESIDUAL, BM, BN, FP8_MAX,
                           MIN_SCALE, EVEN_N)

    @triton.jit
    def _column_halves(acc, BM: tl.constexpr, BN: tl.constexpr):
        """A BM x BN tile's first and last BN / 2 columns."""
        return tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))

    @triton.jit
    def _epilogue_in_halves(acc, pid_m, first_channel, amax_ptr, w_scale_ptr, bias_ptr, y_ptr, residual_ptr,
                            residual_scale, FRAMED, H, W, C_OUT, HAS_BIAS: tl.constexpr, FOLDED: tl.constexpr,
                            HAS_RESIDUAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, FP8_MAX: tl.constexpr,
                            MIN_SCALE: tl.constexpr, EVEN_N: tl.constexpr):
        """_conv_epilogue of the BM x BN sums ``acc``, one half of its columns after the other."""
        left, right = _column_halves(acc, BM, BN)
        _conv_epilogue(left, pid_m, first_channel, amax_ptr, w_scale_ptr, bias_ptr, y_ptr, residual_ptr,
                       residual_scale, FRAMED, H, W, C_OUT, HAS_BIAS, FOLDED, HAS_RESIDUAL, BM, BN // 2, FP8_MAX,
                       MIN_SCALE, EVEN_N)
        _conv_epilogue(right, pid_m, first_channel + BN // 2, amax_ptr, w_scale_ptr, bias_ptr, y_ptr, residual_ptr,
                       residual_scale, FRAMED, H, W, C_OUT, HAS_BIAS, FOLDED, HAS_RESIDUAL, BM, BN // 2, FP8_MAX,
                       MIN_SCALE, EVEN_N)

    @triton.jit
    def _conv_epilogue(acc, pid_m, first_channel, amax_ptr, w_scale_ptr, bias_ptr, y_ptr, residual_ptr,
                       residual_scale, FRAMED, H, W, C_OUT, HAS_BIAS: tl.constexpr, FOLDED: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, FP8_MAX: tl.constexpr,
                       MIN_SCALE: tl.constexpr, EVEN_N: tl.constexpr):
        """Scale, bias, residual add and store of the BM x BN sums ``acc``: the tile's rows, channels from
        ``first_channel``."""
        q = pid_m * BM + tl.arange(0, BM)
        per_image = (H + 2) * (W + 2)
        image = q // per_image
        row, column = (q % per_image) // (W + 2), q % (W + 2)
        if not FOLDED:
            inside = (q < FRAMED) & (row >= 1) & (row <= H) & (column >= 1) & (column <= W)
        rn = first_channel + tl.arange(0, BN)
        if EVEN_N:
            n_ok = tl.full((BN,), True, tl.int1)
        else:
            n_ok = rn < C_OUT
        x_scale = tl.maximum(tl.load(amax_ptr) / FP8_MAX, MIN_SCALE)
        out = acc * (x_scale * tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0))[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if FOLDED:
            channels = C_OUT // 4
            phase = rn // channels
            a_row, b_column = (phase // 2)[None, :], (phase % 2)[None, :]
            mask = ((q < FRAMED)[:, None] & n_ok[None, :] & (row[:, None] >= a_row) & (row[:, None] < a_row + H)
                    & (column[:, None] >= b_column) & (column[:, None] < b_column + W))
            pixel = (image[:, None] * (2 * H) + 2 * row[:, None] - a_row) * (2 * W) + 2 * column[:, None] - b_column
            tl.store(y_ptr + pixel.to(tl.int64) * channels + (rn - phase * channels)[None, :],
                     out.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            pixel = ((image * H + row - 1) * W + column - 1).to(tl.int64)
            if HAS_RESIDUAL:
                residual = tl.load(residual_ptr + pixel[:, None] * C_OUT + rn[None, :],
                                   mask=inside[:, None] & n_ok[None, :], other=0.0)
                out = (out + residual.to(tl.float32)) * residual_scale
            tl.store(y_ptr + pixel[:, None] * C_OUT + rn[None, :], out.to(y_ptr.dtype.element_ty),
                     mask=inside[:, None] & n_ok[None, :])

    @functools.cache
    def _sm_count(device: torch.device) -> int:
        """The persistent grid's programs (a CPU tensor, in Triton's interpreter: two)."""
        if device.type != "cuda":
            return 2
        return torch.cuda.get_device_properties(device).multi_processor_count

    def _launch(kernel, framed, amax, weight, w_scale, bias, y, height: int, width: int, folded: bool = False,
                residual: torch.Tensor | None = None, residual_scale: float = 1.0, **config) -> None:
        """Run ``kernel`` on ``framed`` rows of (height, width) images into ``y``, whose memory holds (N, H, W, C)
        rows (NHWC-contiguous, or NCHW channels_last; with ``folded``, 2H x 2W and C_out / 4 channels), adding
        ``residual`` (y's shape and memory layout) and scaling by ``residual_scale`` when one is given; ``config``:
        one tile, run directly."""
        n_images, c_out = y.shape[0], weight.shape[0]
        rows = n_images * (height + 2) * (width + 2)
        # host-side TMA descriptors; the kernel's heuristic sets their blocks per tile (a placeholder until then)
        x_desc, w_desc = (TensorDescriptor.from_tensor(tensor, [64, 64]) for tensor in (framed, weight))

        def grid(meta):
            tiles = triton.cdiv(rows, meta["BM"]) * triton.cdiv(c_out, meta["BN"])
            return (min(tiles, _sm_count(framed.device)) if meta.get("PERSISTENT") else tiles,)
        kernel[grid](x_desc, amax, w_desc, w_scale, w_scale if bias is None else bias, y,
                     y if residual is None else residual, residual_scale, rows, height, width, framed.shape[1], c_out,
                     HAS_BIAS=bias is not None, FOLDED=folded, HAS_RESIDUAL=residual is not None, FP8_MAX=FP8_MAX,
                     MIN_SCALE=MIN_SCALE, **config)

    def run_conv_config(framed: torch.Tensor, amax: torch.Tensor, conv: Fp8Conv3x3 | Fp8Upsample, y: torch.Tensor,
                        block: tuple[int, int, int], residual: torch.Tensor | None = None,
                        residual_scale: float = 1.0, persistent: bool = False, **launch) -> None:
        """The kernel with one (BM, BN, BK) tile (``persistent``: one program per SM walking the tiles), run directly
        into NHWC ``y`` (adding NHWC ``residual``): for tests (Triton's interpreter; ``launch``: num_warps and
        num_stages on a GPU)."""
        bm, bn, bk = block
        folded = isinstance(conv, Fp8Upsample)
        height, width = (size // 2 for size in y.shape[1:3]) if folded else y.shape[1:3]
        _launch(_shifted_conv_kernel.fn, framed, amax, conv.weight, conv.scale, conv.bias, y, height, width, folded,
                residual, residual_scale, BM=bm, BN=bn, BK=bk, GROUP_M=2, PERSISTENT=persistent, **launch)

    # an opaque op: torch.compile calls it as it is, and the kernel gets its TMA descriptors made on the host
    @torch.library.custom_op("sccsdxl::shifted_conv_fp8", mutates_args=(), device_types="cuda")
    def _shifted_conv_gpu(framed: torch.Tensor, amax: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                          bias: torch.Tensor, has_bias: bool, n_images: int, height: int, width: int, folded: bool,
                          residual: torch.Tensor | None, residual_scale: float) -> torch.Tensor:
        y = _conv_output(framed, weight, n_images, height, width, folded)
        _launch(_shifted_conv_kernel, framed, amax, weight, w_scale, bias if has_bias else None, y, height, width,
                folded, residual, residual_scale)
        return y

    @_shifted_conv_gpu.register_fake
    def _shifted_conv_shape(framed, amax, weight, w_scale, bias, has_bias, n_images, height, width, folded, residual,
                            residual_scale):
        return _conv_output(framed, weight, n_images, height, width, folded)

    def _conv_output(framed: torch.Tensor, weight: torch.Tensor, n_images: int, height: int, width: int,
                     folded: bool) -> torch.Tensor:
        """bf16 (N, C_out, H, W) in channels_last memory: the (N, H, W, C_out) rows the kernel writes (folded: 2H x
        2W and C_out / 4)."""
        shape = ((n_images, weight.shape[0] // 4, 2 * height, 2 * width) if folded
                 else (n_images, weight.shape[0], height, width))
        return torch.empty(shape, device=framed.device, dtype=torch.bfloat16, memory_format=torch.channels_last)


def _steps_divide(in_channels: int) -> bool:
    """Whether one of the kernel's channel steps divides a convolution's input channels."""
    return any(in_channels % k == 0 for k in K_BLOCKS)


def can_run(conv: torch.nn.Module) -> bool:
    """A plain 3x3 convolution, stride 1, padding 1, whose input channels one of the kernel's steps divides."""
    return (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and _steps_divide(conv.in_channels))


def _register_e4m3_taps(module: torch.nn.Module, weight: torch.Tensor) -> None:
    """``module``'s buffers ``weight`` (C_out, taps x C_in) e4m3, taps before channels as the kernel walks K, and
    ``scale`` (C_out,), one per output channel (torchao's per-row quantization), from (C_out, C_in, kh, kw)
    ``weight``."""
    taps, scale = quantize_rows(weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1))
    module.register_buffer("weight", taps.contiguous())
    module.register_buffer("scale", scale.reshape(-1).contiguous())


def shifted_conv(module: Fp8Conv3x3 | Fp8Upsample, framed: torch.Tensor, amax: torch.Tensor, n_images: int,
                 height: int, width: int, folded: bool, residual: torch.Tensor | None = None,
                 residual_scale: float = 1.0) -> torch.Tensor:
    """``module``'s e4m3 weights (and bias) over ``framed`` rows of (height, width) images, plus ``residual`` (the
    output's shape) times ``residual_scale`` if given: the kernel on a GPU, else the module's reference sums."""
    if framed.is_cuda and triton is not None:
        bias = module.scale if module.bias is None else module.bias
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last)
        return _shifted_conv_gpu(framed, amax, module.weight, module.scale, bias, module.bias is not None, n_images,
                                 height, width, folded, residual, residual_scale)
    out = module.reference(framed, amax, n_images, height, width)
    if residual is None:
        return out
    return ((out.float() + residual.float()) * residual_scale).to(out.dtype)


class Fp8Conv3x3(torch.nn.Module):
    """A 3x3 convolution's weights in e4m3, one scale per output channel (torchao's per-row quantization of the
    weight as (C_out, 9 C_in), taps before channels, as the kernel walks K), applied to framed e4m3 rows."""

    def __init__(self, conv: torch.nn.Conv2d, with_bias: bool = True, extra_bias: torch.Tensor | None = None):
        super().__init__()
        _register_e4m3_taps(self, conv.weight.detach())
        bias = conv.bias if with_bias else None
        if extra_bias is not None:  # another bias added to the same outputs (a ResNet block's shortcut's)
            bias = torch.nn.Parameter((extra_bias if bias is None else bias + extra_bias).detach(),
                                      requires_grad=False)
        self.bias = bias
        self.out_dtype = conv.weight.dtype  # the kernel writes bf16, the only dtype fp8 runs with on a GPU

    def forward(self, framed: torch.Tensor, amax: torch.Tensor, n_images: int, height: int, width: int,
                residual: torch.Tensor | None = None, residual_scale: float = 1.0) -> torch.Tensor:
        return shifted_conv(self, framed, amax, n_images, height, width, False, residual, residual_scale)

    def reference(self, framed: torch.Tensor, amax: torch.Tensor, n_images: int, height: int,
                  width: int) -> torch.Tensor:
        """The same sums in fp32 from the dequantized operands, in the convolution's dtype."""
        x = framed_interior(framed, n_images, height, width).float() * e4m3_scale(amax)
        c_out = self.weight.shape[0]
        weight = (self.weight.float() * self.scale[:, None]).reshape(c_out, 3, 3, -1).permute(0, 3, 1, 2)
        bias = None if self.bias is None else self.bias.float()
        out = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=1)
        return out.to(self.out_dtype).contiguous(memory_format=torch.channels_last)


class Fp8ConvResnetBlock(GroupNormResnetBlock):
    """A GroupNormResnetBlock whose two 3x3 convolutions run in fp8: each GroupNorm + SiLU writes the framed e4m3
    input (group_norm_framed_fp8) that the next convolution reads. The arithmetic is the block's, with e4m3
    operands (about 4 % relative error per convolution against bf16, as the fp8 linears' 6 %)."""

    def __init__(self, block: GroupNormResnetBlock):
        super().__init__(block)  # the same norms, convolutions (for their biases), time projection and shortcut
        self.residual_in_conv = RESIDUAL_IN_CONV
        # the first convolution's bias joins the second norm's shift (GroupNormResnetBlock._shift); with the residual
        # in the second convolution's epilogue, the shortcut convolution's bias joins that convolution's
        shortcut_bias = None if self.conv_shortcut is None or not self.residual_in_conv else self.conv_shortcut.bias
        self.fp8_conv1 = Fp8Conv3x3(block.conv1, with_bias=False)
        self.fp8_conv2 = Fp8Conv3x3(block.conv2, extra_bias=shortcut_bias)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        n_images, _, height, width = input_tensor.shape
        framed, amax = group_norm_framed_fp8(input_tensor, self.norm1)
        hidden = self.fp8_conv1(framed, amax, n_images, height, width)
        framed, amax = group_norm_framed_fp8(hidden, self.norm2, self._shift(temb, hidden))
        if not self.residual_in_conv:
            hidden = self.fp8_conv2(framed, amax, n_images, height, width)
            shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
            return (shortcut + hidden) / self.output_scale_factor
        shortcut = input_tensor if self.conv_shortcut is None else \
            self.conv_shortcut._conv_forward(input_tensor, self.conv_shortcut.weight, None)
        return self.fp8_conv2(framed, amax, n_images, height, width, shortcut, 1.0 / self.output_scale_factor)


def fp8_resnet_convs(unet: torch.nn.Module) -> int:
    """Swap every GroupNormResnetBlock of the UNet (fused_group_norms) whose two convolutions can_run for an
    Fp8ConvResnetBlock; returns how many."""
    def accept(module: torch.nn.Module) -> bool:
        return type(module) is GroupNormResnetBlock and can_run(module.conv1) and can_run(module.conv2)
    return swap_modules(unet, accept, Fp8ConvResnetBlock)


class Fp8Upsample(torch.nn.Module):
    """Stands in for a FoldedUpsample (folded_upsamplers or transposed_upsamplers): the 2x nearest upsample and 3x3
    convolution as the four phases' 2x2 kernels (sccsdxl.upsample's fold_weight) in e4m3, one scale per output
    channel, run as one GEMM over the small image's framed e4m3 rows (frame_e4m3) that writes the phases
    interleaved into the large image."""

    def __init__(self, upsample: FoldedUpsample):
        super().__init__()
        self.conv = upsample.conv  # the 3x3 convolution: for output sizes other than twice the input's
        # the four phases' 2x2 kernels (4 out, in, 2, 2), phase-major, summed in fp32
        _register_e4m3_taps(self, fold_weight(self.conv.weight.detach().float()))
        bias = self.conv.bias
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().repeat(4), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        n_images, _, height, width = hidden_states.shape
        if output_size is not None and tuple(output_size) != (2 * height, 2 * width):
            return self.conv(F.interpolate(hidden_states, size=output_size, mode="nearest"))
        framed, amax = frame_e4m3(hidden_states)
        return shifted_conv(self, framed, amax, n_images, height, width, folded=True)

    def reference(self, framed: torch.Tensor, amax: torch.Tensor, n_images: int, height: int,
                  width: int) -> torch.Tensor:
        """The same sums in fp32 from the dequantized operands, in the convolution's dtype."""
        x = framed_interior(framed, n_images, height, width).float() * e4m3_scale(amax)
        weight = (self.weight.float() * self.scale[:, None]).reshape(self.weight.shape[0], 2, 2, -1)
        bias = None if self.bias is None else self.bias.float()
        phases = F.conv2d(x.permute(0, 3, 1, 2), weight.permute(0, 3, 1, 2), bias, padding=1)
        out = interleave_phases(phases, height, width)
        return out.to(self.conv.weight.dtype).contiguous(memory_format=torch.channels_last)


def can_run_upsample(module: torch.nn.Module) -> bool:
    """A FoldedUpsample whose input channels one of the kernel's steps divides."""
    return type(module) is FoldedUpsample and _steps_divide(module.conv.in_channels)


def fp8_upsamplers(root: torch.nn.Module) -> int:
    """Swap every FoldedUpsample under ``root`` that can_run_upsample accepts for an Fp8Upsample; returns how many."""
    return swap_modules(root, can_run_upsample, Fp8Upsample)

