"""Options fused_group_norms and vae_group_norms: the GroupNorms of the UNet and of the VAE decoder over
channels_last activations as Triton kernels.

In the compiled UNet at batch 25 with guidance, inductor's GroupNorm (+ SiLU) kernels take about 35 ms of a
567 ms forward on an H200 (BENCHMARKS.md, session 9), while the bytes a GroupNorm must move (each activation
read twice, for the statistics and to normalize it, and written once) take about 12 ms at 4 TB/s. Here each
GroupNorm is three kernels over the (image, pixel, channel) layout that channels_last gives: per-channel
statistics of a slice of pixels (sums of deviations from the slice's first pixel), the group's mean and inverse
standard deviation from those slices (Chan's merge), written as each channel's affine with the per-(image, channel)
shift folded in (a ResNet block's convolution bias plus its time embedding: GroupNorm(x + shift) = x * scale +
offset), and one pass that applies it (one FMA per element), then SiLU, and writes the result. Until session 20 the
normalizing pass found each element's group and gathered its statistics, weight and bias itself: for sm_90 its
framed e4m3 write compiled to 31-66 machine instructions per element, now 25-30. ResnetBlock2D runs as
GroupNormResnetBlock, each Transformer2DModel's norm and the UNet's output norm as GroupNormSiLU. Measured on the
H200 (BENCHMARKS.md): the normalizing pass at 3.3-3.6 TB/s, the statistics pass at 2.3-3.1 TB/s (0.6-1.2 in session
10, when it reduced across threads at every step), the three kernels up to 1.57x faster than inductor's code for the
same work, and through loadgen +1.9 % (session 11). In the VAE decoder at 1024x1024 they took 191 ms of GroupNorm
per 50 images where inductor's took 533, and the run gained +3.2 % (session 12).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused import FP8, FP8_MAX, MIN_SCALE, autotune, env_flag, triton

# SiLU's sigmoid from one approximate exp2 and one approximate reciprocal (sccsdxl.fused's) instead of the compiler's
# exp and division with their range checks: the normalizing kernels ran 31-66 machine instructions per element for
# sm_90, by estimate issue-bound at the power-capped clock (session 19). On the H200 it measured no faster (the framed
# write 6.32 against 6.35 ms over eight ResNet shapes, session 20), so it stays off; =1 turns it on.
FAST_SILU = env_flag("SCCSDXL_FAST_SILU")

if triton is not None:
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    from .fused import approx_exp2, approx_reciprocal

SLICES_PER_SM = 8  # statistics programs per multiprocessor to aim for: enough to hide memory latency
STAT_CHANNELS = 128  # channels per statistics program, as the work count is planned (the tuned block may be less)


def group_norm_reference(x: torch.Tensor, norm: torch.nn.GroupNorm, shift: torch.Tensor | None = None,
                         silu: bool = False) -> torch.Tensor:
    """``norm``(x + shift[:, :, None, None]), then SiLU if asked: the unfused definition, as diffusers computes it."""
    if shift is not None:
        x = x + shift[:, :, None, None].to(x.dtype)
    out = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(out) if silu else out


if triton is not None:
    E4M3_MAX = tl.constexpr(FP8_MAX)  # the largest float8_e4m3fn value
    SILU_MIN_AT, SILU_MIN = tl.constexpr(-1.2784645), tl.constexpr(-0.2784645)  # SiLU's minimum: where, and its value

    def _block_keywords(block: tuple[int, ...]) -> dict:
        """(pixels, channels[, warps[, stages]]) as the kernels' block keywords (STAGES: the statistics kernel's
        loop, only where given)."""
        return {"BLOCK_P": block[0], "BLOCK_C": block[1], **({"STAGES": block[3]} if len(block) > 3 else {})}

    def _block_configs(blocks: tuple) -> list:
        """(pixels, channels, warps[, stages]) per program: wide channel blocks read whole 128-byte lines of an NHWC
        row."""
        return [triton.Config(_block_keywords(block), num_warps=block[2]) for block in blocks]

    # the tiles that ran fastest on the H200 (benchmarks/group_norm_split_h200.py, session 10), and their neighbours
    STATISTICS_BLOCKS = ((32, 64, 4), (64, 64, 4), (128, 64, 8), (64, 128, 8), (128, 32, 4))
    NORMALIZE_BLOCKS = ((32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 4))
    # each statistics tile also with its loop's loads pipelined three deep (cp.async through shared memory): unpipelined,
    # a program has one tile's loads in flight only while it waits (the pass ran at 2.3-3.1 TB/s alone, session 10);
    # (pixels, channels, warps, stages)
    STATISTICS_CHOICES = tuple((*block, stages) for block in STATISTICS_BLOCKS for stages in (1, 3))

    @autotune(configs=_block_configs(STATISTICS_CHOICES), key=["n_pixels", "n_channels", "HAS_SHIFT", "EXTREMES"])
    @triton.jit
    def _slice_statistics_kernel(x_ptr, shift_ptr, mean_ptr, m2_ptr, low_ptr, high_ptr, n_pixels, n_channels,
                                 pixels_per_slice, n_slices, HAS_SHIFT: tl.constexpr, EXTREMES: tl.constexpr,
                                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr = 1):
        """Per channel, over one slice of one image's pixels: the mean and the sum of squared deviations (M2), and
        with EXTREMES the smallest and largest value (of x + shift). STAGES > 1 pipelines the loop's loads.

        The sums run elementwise over the tile and are reduced across its pixels once, after the loop: a reduction
        across threads at every step held this kernel to 0.6-1.2 TB/s on the H200, where a channel sum reads 2.7-3.6
        (BENCHMARKS.md, session 10). They are sums of deviations from the slice's first pixel, so that the sum of
        squares does not cancel in fp32; the shift moves every pixel of a channel alike, so it enters the mean
        alone."""
        image = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        channel_mask = channels < n_channels
        first = part * pixels_per_slice
        end = tl.minimum(first + pixels_per_slice, n_pixels)
        pivot = tl.load(x_ptr + (image * n_pixels + first) * n_channels + channels, mask=channel_mask,
                        other=0.0).to(tl.float32)
        sums = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        squares = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        if EXTREMES:
            lows = tl.full((BLOCK_P, BLOCK_C), float("inf"), dtype=tl.float32)
            highs = tl.full((BLOCK_P, BLOCK_C), float("-inf"), dtype=tl.float32)
        for start in tl.range(first, end, BLOCK_P, num_stages=STAGES):
            pixels = start + tl.arange(0, BLOCK_P)
            mask = (pixels < end)[:, None] & channel_mask[None, :]
            at = (image * n_pixels + pixels)[:, None] * n_channels + channels[None, :]
            tile = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
            deviation = tl.where(mask, tile - pivot[None, :], 0.0)
            sums += deviation
            squares += deviation * deviation
            if EXTREMES:
                lows = tl.minimum(lows, tl.where(mask, tile, float("inf")))
                highs = tl.maximum(highs, tl.where(mask, tile, float("-inf")))
        count = (end - first).to(tl.float32)
        total = tl.sum(sums, axis=0)
        offset = tl.zeros((BLOCK_C,), dtype=tl.float32)
        if HAS_SHIFT:
            offset += tl.load(shift_ptr + image * n_channels + channels, mask=channel_mask, other=0.0).to(tl.float32)
        mean = pivot + total / count + offset
        m2 = tl.maximum(tl.sum(squares, axis=0) - total * total / count, 0.0)
        out = (image * n_slices + part) * n_channels + channels
        tl.store(mean_ptr + out, mean, mask=channel_mask)
        tl.store(m2_ptr + out, m2, mask=channel_mask)
        if EXTREMES:
            tl.store(low_ptr + out, tl.min(lows, axis=0) + offset, mask=channel_mask)
            tl.store(high_ptr + out, tl.max(highs, axis=0) + offset, mask=channel_mask)

    @triton.jit
    def _group_statistics_kernel(mean_ptr, m2_ptr, shift_ptr, weight_ptr, bias_ptr, scale_ptr, offset_ptr, n_pixels,
                                 n_channels, pixels_per_slice, n_slices, n_groups, eps, low_ptr, high_ptr, amax_ptr,
                                 HAS_SHIFT: tl.constexpr, EXTREMES: tl.constexpr, SILU: tl.constexpr,
                                 BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr):
        """One (image, group): its slices' per-channel statistics merged into a mean and 1 / std, written as each of
        its channels' affine: GroupNorm(x + shift) = x * scale + offset, scale = weight / std and offset = bias +
        (shift - mean) * scale, so that the normalizing pass has no group to find per element. With EXTREMES the
        group's largest |GroupNorm + SiLU| (|GroupNorm| without SILU) is folded into the batch's (atomic max)."""
        image = tl.program_id(0).to(tl.int64)
        group = tl.program_id(1)
        per_group = n_channels // n_groups
        parts = tl.arange(0, BLOCK_S)
        lanes = tl.arange(0, BLOCK_G)
        mask = (parts < n_slices)[:, None] & (lanes < per_group)[None, :]
        at = (image * n_slices + parts[:, None]) * n_channels + group * per_group + lanes[None, :]
        means = tl.load(mean_ptr + at, mask=mask, other=0.0)
        m2s = tl.load(m2_ptr + at, mask=mask, other=0.0)
        counts = tl.where(parts < n_slices, tl.minimum(pixels_per_slice, n_pixels - parts * pixels_per_slice), 0)
        counts = counts.to(tl.float32)[:, None]
        total = (n_pixels * per_group).to(tl.float32)
        mean = tl.sum(tl.sum(means * counts, axis=1), axis=0) / total
        delta = tl.where(mask, means - mean, 0.0)
        m2 = tl.sum(tl.sum(m2s + delta * delta * counts, axis=1), axis=0)
        rstd = 1.0 / tl.sqrt(m2 / total + eps)
        channels = group * per_group + lanes
        lane_ok = lanes < per_group
        scale = rstd * tl.load(weight_ptr + channels, mask=lane_ok, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + channels, mask=lane_ok, other=0.0).to(tl.float32)
        shift = tl.zeros((BLOCK_G,), dtype=tl.float32)
        if HAS_SHIFT:  # the slice statistics' mean is x + shift's
            shift += tl.load(shift_ptr + image * n_channels + channels, mask=lane_ok, other=0.0).to(tl.float32)
        tl.store(scale_ptr + image * n_channels + channels, scale, mask=lane_ok)
        tl.store(offset_ptr + image * n_channels + channels, bias + (shift - mean) * scale, mask=lane_ok)
        if EXTREMES:
            low = tl.min(tl.load(low_ptr + at, mask=mask, other=float("inf")), axis=0)
            high = tl.max(tl.load(high_ptr + at, mask=mask, other=float("-inf")), axis=0)
            if SILU:
                largest = _largest_silu(low, high, mean, scale, bias)
            else:  # an affine map's largest |value| over an interval is at one of its ends
                largest = tl.maximum(tl.abs((low - mean) * scale + bias), tl.abs((high - mean) * scale + bias))
            tl.atomic_max(amax_ptr, tl.max(tl.where(lane_ok, largest, 0.0)))

    @triton.jit
    def _largest_silu(low, high, mean, scale, shift):
        """max |SiLU(v)| over v = (x - mean) * scale + shift for x in [low, high]: at an end of v's interval, or
        at SiLU's minimum (-0.2785 at v = -1.2785) where the interval holds it. The normalizing pass rounds v to
        x's dtype before SiLU, so its largest value may differ by that rounding (bf16: 0.4 %); it clamps to e4m3's
        range."""
        a = (low - mean) * scale + shift
        b = (high - mean) * scale + shift
        ends = tl.maximum(tl.abs(a * tl.sigmoid(a)), tl.abs(b * tl.sigmoid(b)))
        holds_minimum = (tl.minimum(a, b) < SILU_MIN_AT) & (tl.maximum(a, b) > SILU_MIN_AT)
        return tl.where(holds_minimum, tl.maximum(ends, -SILU_MIN), ends)

    @triton.jit
    def _normalized_tile(x_ptr, scale_ptr, offset_ptr, image, pixels, channels, n_pixels, n_channels,
                         SILU: tl.constexpr):
        """x * scale + offset (the channel's GroupNorm affine, from _group_statistics_kernel), SiLU, in fp32 for a tile
        of one image's pixels and channels, with the tile's mask and addresses. The normalized value is rounded to
        x's dtype before SiLU, as the unfused ops round it."""
        channel_mask = channels < n_channels
        mask = (pixels < n_pixels)[:, None] & channel_mask[None, :]
        at = (image * n_pixels + pixels)[:, None] * n_channels + channels[None, :]
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + image * n_channels + channels, mask=channel_mask, other=0.0)
        offset = tl.load(offset_ptr + image * n_channels + channels, mask=channel_mask, other=0.0)
        out = tl.fma(x, scale[None, :], offset[None, :])
        if SILU:
            out = _silu(out.to(x_ptr.dtype.element_ty).to(tl.float32))
        return out, mask, at

    if FAST_SILU:
        @triton.jit
        def _silu(x):
            """x sigmoid(x) = x / (1 + 2 ** (-x log2 e)), approximate: 0 below about -88, where the exp2 overflows."""
            return x * approx_reciprocal(1.0 + approx_exp2(x * -1.4426950408889634))
    else:
        @triton.jit
        def _silu(x):
            return x * tl.sigmoid(x)

    @autotune(configs=_block_configs(NORMALIZE_BLOCKS), key=["n_pixels", "n_channels", "SILU", "FP8_OUT"])
    @triton.jit
    def _normalize_kernel(x_ptr, scale_ptr, offset_ptr, out_ptr, out_scale_ptr, n_pixels, n_channels,
                          SILU: tl.constexpr, FP8_OUT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """The normalized tile (_normalized_tile) of one image's pixels and channels, written as x's layout. With
        FP8_OUT the result is written in e4m3, divided by the one scale at ``out_scale_ptr``
        (benchmarks/resnet_fp8_h200.py: an fp8 convolution's input made where it is normalized)."""
        image = tl.program_id(0).to(tl.int64)
        pixels = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        out, mask, at = _normalized_tile(x_ptr, scale_ptr, offset_ptr, image, pixels, channels, n_pixels,
                                         n_channels, SILU)
        if FP8_OUT:
            out = tl.clamp(out * (1.0 / tl.load(out_scale_ptr)), -E4M3_MAX, E4M3_MAX)
        tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=mask)

    @autotune(configs=_block_configs(NORMALIZE_BLOCKS), key=["n_pixels", "n_channels"])
    @triton.jit
    def _normalize_framed_kernel(x_ptr, scale_ptr, offset_ptr, amax_ptr, out_ptr, n_pixels, n_channels, width, guard,
                                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, MIN_SCALE: tl.constexpr):
        """GroupNorm + SiLU of a tile in e4m3, divided by the batch's scale (amax / 448), each pixel written to its
        row of the zero-framed grid (frame_rows): where sccsdxl.fp8_conv's convolution reads it."""
        image = tl.program_id(0).to(tl.int64)
        pixels = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        out, mask, _ = _normalized_tile(x_ptr, scale_ptr, offset_ptr, image, pixels, channels, n_pixels, n_channels,
                                        True)
        store_framed(out_ptr, out, mask, amax_ptr, image, pixels, channels, n_pixels, n_channels, width, guard,
                     MIN_SCALE)

    @triton.jit
    def store_framed(out_ptr, out, mask, amax_ptr, image, pixels, channels, n_pixels, n_channels, width, guard,
                     MIN_SCALE: tl.constexpr):
        """A tile of one image's pixels (fp32) in e4m3, divided by the batch's scale (amax / 448), each pixel
        written to its row of the zero-framed grid (frame_rows)."""
        inverse_scale = 1.0 / tl.maximum(tl.load(amax_ptr) / E4M3_MAX, MIN_SCALE)  # one division per program
        height = n_pixels // width
        rows = guard + image * (height + 2) * (width + 2) + (pixels // width + 1) * (width + 2) + pixels % width + 1
        out = tl.clamp(out * inverse_scale, -E4M3_MAX, E4M3_MAX)
        tl.store(out_ptr + rows[:, None] * n_channels + channels[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mask)

    def _slices(n_images: int, n_pixels: int, n_channels: int, per_sm: int = SLICES_PER_SM) -> tuple[int, int]:
        """(pixels per slice, slices per image): ``per_sm`` statistics programs per multiprocessor, to fill the GPU,
        each slice non-empty."""
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count \
            if torch.cuda.is_available() else 132
        wanted = triton.cdiv(per_sm * sms, n_images * triton.cdiv(n_channels, STAT_CHANNELS))
        per_slice = triton.cdiv(n_pixels, max(1, min(wanted, n_pixels)))
        return per_slice, triton.cdiv(n_pixels, per_slice)

    def _statistics(slice_kernel, group_kernel, x, shift, weight, bias, n_groups: int, eps: float,
                    stat_config: dict | None = None, amax: torch.Tensor | None = None,
                    silu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Each (image, channel)'s GroupNorm affine (scale, offset), (N, C) fp32 each, from channels_last ``x``
        (N, C, H, W) plus ``shift``: GroupNorm(x + shift) = x * scale + offset. With ``amax``: the largest
        |GroupNorm + SiLU| (|GroupNorm| unless ``silu``) folded into the zeroed (1,) ``amax``, from each channel's
        smallest and largest value, with no pass of its own over x."""
        n_images, n_channels, height, width = x.shape
        n_pixels = height * width
        per_slice, n_slices = _slices(n_images, n_pixels, n_channels)
        means = torch.empty((n_images, n_slices, n_channels), device=x.device, dtype=torch.float32)
        m2s = torch.empty_like(means)
        lows, highs = (torch.empty_like(means), torch.empty_like(means)) if amax is not None else (means, m2s)
        scale = torch.empty((n_images, n_channels), device=x.device, dtype=torch.float32)
        offset = torch.empty_like(scale)
        has_shift = shift is not None
        stat = stat_config or {}
        slice_kernel[_grid(n_images, n_slices, n_channels, stat, pixels=False)](
            x, shift if has_shift else x, means, m2s, lows, highs, n_pixels, n_channels, per_slice, n_slices,
            HAS_SHIFT=has_shift, EXTREMES=amax is not None, **stat)
        group_kernel[(n_images, n_groups)](
            means, m2s, shift if has_shift else x, weight, bias, scale, offset, n_pixels, n_channels, per_slice,
            n_slices, n_groups, eps, lows, highs, scale if amax is None else amax, HAS_SHIFT=has_shift,
            EXTREMES=amax is not None, SILU=silu, BLOCK_S=triton.next_power_of_2(n_slices),
            BLOCK_G=triton.next_power_of_2(n_channels // n_groups))
        return scale, offset

    def _launch(kernels, x, shift, weight, bias, n_groups: int, eps: float, silu: bool, out,
                stat_config: dict | None = None, normalize_config: dict | None = None,
                out_scale: torch.Tensor | None = None) -> None:
        """Run the three kernels on channels_last ``x`` (N, C, H, W) and ``shift`` (N, C) or None, writing ``out``
        (e4m3 divided by ``out_scale`` when one is given). A config given runs that configuration directly."""
        slice_kernel, group_kernel, normalize_kernel = kernels
        n_images, n_channels, height, width = x.shape
        scale, offset = _statistics(slice_kernel, group_kernel, x, shift, weight, bias, n_groups, eps, stat_config)
        norm = normalize_config or {}
        normalize_kernel[_grid(n_images, height * width, n_channels, norm, pixels=True)](
            x, scale, offset, out, scale if out_scale is None else out_scale, height * width, n_channels,
            SILU=silu, FP8_OUT=out_scale is not None, **norm)

    def _launch_framed(kernels, x, shift, weight, bias, n_groups: int, eps: float, framed: torch.Tensor,
                       amax: torch.Tensor, configs: tuple[dict, dict] | None = None) -> None:
        """GroupNorm + SiLU of channels_last ``x`` into the image pixels of ``framed`` rows (e4m3; the frame is
        zero_frame's) and its largest |value| into the zeroed (1,) ``amax``: the statistics with the largest value,
        then the framed write."""
        slice_kernel, group_kernel, framed_kernel = kernels
        stat, write = configs or ({}, {})
        n_images, n_channels, height, width = x.shape
        scale, offset = _statistics(slice_kernel, group_kernel, x, shift, weight, bias, n_groups, eps, stat, amax)
        framed_kernel[_grid(n_images, height * width, n_channels, write, pixels=True)](
            x, scale, offset, amax, framed, height * width, n_channels, width, width + 3, MIN_SCALE=MIN_SCALE,
            **write)

    def _grid(n_images: int, rows: int, n_channels: int, config: dict, pixels: bool):
        """(image, slice or pixel block, channel block): from ``config`` when run directly, else the tuned one's."""
        def size(meta):
            return (n_images, triton.cdiv(rows, meta["BLOCK_P"]) if pixels else rows,
                    triton.cdiv(n_channels, meta["BLOCK_C"]))
        return size(config) if config else size

    _KERNELS = (_slice_statistics_kernel, _group_statistics_kernel, _normalize_kernel)

    def run_group_norm_config(x: torch.Tensor, norm: torch.nn.GroupNorm, shift: torch.Tensor | None, silu: bool,
                              out: torch.Tensor, stat_block: tuple[int, ...], normalize_block: tuple[int, ...],
                              out_scale: torch.Tensor | None = None) -> None:
        """One configuration of each tuned kernel, (BLOCK_P, BLOCK_C) or (BLOCK_P, BLOCK_C, warps), run directly:
        for tests and benchmarks. With ``out_scale`` (one fp32 value) ``out`` is e4m3, the result divided by it."""
        _launch((_slice_statistics_kernel.fn, _group_statistics_kernel, _normalize_kernel.fn), x,
                shift, norm.weight, norm.bias, norm.num_groups, norm.eps, silu, out, _direct_config(stat_block),
                _direct_config(normalize_block), out_scale)

    def _direct_config(block: tuple[int, ...]) -> dict:
        """(BLOCK_P, BLOCK_C[, warps[, stages]]) as a kernel launch's keywords (4 warps unless given; the stages of
        the statistics kernel's loop, 1 unless given)."""
        return {**_block_keywords(block), "num_warps": (*block, 4)[2]}

    def each_tuning_choice() -> list[tuple[tuple[int, ...], tuple[int, int, int]]]:
        """(statistics choice, normalizing tile) pairs that between them run every choice each kernel's tuning may
        make, the other kernel's at its first: what tests and benchmarks run through run_group_norm_config."""
        return ([(stat, NORMALIZE_BLOCKS[0]) for stat in STATISTICS_CHOICES]
                + [(STATISTICS_CHOICES[0], normalize) for normalize in NORMALIZE_BLOCKS[1:]])

    @triton_op("sccsdxl::group_norm_nhwc", mutates_args=())
    def _group_norm_gpu(x: torch.Tensor, shift: torch.Tensor, has_shift: bool, weight: torch.Tensor,
                        bias: torch.Tensor, n_groups: int, eps: float, silu: bool) -> torch.Tensor:
        out = torch.empty_like(x, memory_format=torch.channels_last)
        _launch(tuple(wrap_triton(k) for k in _KERNELS), x, shift if has_shift else None, weight, bias, n_groups,
                eps, silu, out)
        return out

    _FRAMED_KERNELS = (_slice_statistics_kernel, _group_statistics_kernel, _normalize_framed_kernel)

    def run_framed_config(x: torch.Tensor, norm: torch.nn.GroupNorm, shift: torch.Tensor | None,
                          framed: torch.Tensor, amax: torch.Tensor, stat_block: tuple[int, ...],
                          normalize_block: tuple[int, ...]) -> None:
        """group_norm_framed_fp8's kernels with one configuration each, run directly, into ``framed`` (its frame
        zeroed: zero_frame) and zeroed ``amax``: for tests (Triton's interpreter) and benchmarks."""
        _launch_framed((_slice_statistics_kernel.fn, _group_statistics_kernel, _normalize_framed_kernel.fn), x, shift,
                       norm.weight, norm.bias, norm.num_groups, norm.eps, framed, amax,
                       (_direct_config(stat_block), _direct_config(normalize_block)))

    # an opaque op, its torch calls run as written: inductor's code for zeroing the frame in place writes e4m3
    # constants that Triton 3.6 cannot build (H200, session 18)
    @torch.library.custom_op("sccsdxl::group_norm_framed_fp8", mutates_args=(), device_types="cuda")
    def _group_norm_framed_gpu(x: torch.Tensor, shift: torch.Tensor, has_shift: bool, weight: torch.Tensor,
                               bias: torch.Tensor, n_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        framed, amax = _framed_outputs(x, zeroed_frame=True)
        _launch_framed(_FRAMED_KERNELS, x, shift if has_shift else None, weight, bias, n_groups, eps, framed, amax)
        return framed, amax

    @_group_norm_framed_gpu.register_fake
    def _group_norm_framed_shapes(x, shift, has_shift, weight, bias, n_groups, eps):
        return _framed_outputs(x)

    def _launch_fp8(kernels, x, weight, bias, n_groups: int, eps: float, out: torch.Tensor, amax: torch.Tensor,
                    configs: tuple[dict, dict] | None = None) -> None:
        """GroupNorm of channels_last ``x`` into ``out`` (e4m3, channels_last) divided by one scale, its largest
        |value| (into the zeroed (1,) ``amax``) / 448: the statistics with the largest value, then the write."""
        slice_kernel, group_kernel, normalize_kernel = kernels
        stat, write = configs or ({}, {})
        n_images, n_channels, height, width = x.shape
        scale, offset = _statistics(slice_kernel, group_kernel, x, None, weight, bias, n_groups, eps, stat, amax,
                                    silu=False)
        normalize_kernel[_grid(n_images, height * width, n_channels, write, pixels=True)](
            x, scale, offset, out, e4m3_scale(amax), height * width, n_channels, SILU=False, FP8_OUT=True, **write)

    def run_fp8_config(x: torch.Tensor, norm: torch.nn.GroupNorm, out: torch.Tensor, amax: torch.Tensor,
                       stat_block: tuple[int, ...], normalize_block: tuple[int, ...]) -> None:
        """group_norm_fp8's kernels with one configuration each, run directly, into ``out`` and zeroed ``amax``: for
        tests (Triton's interpreter) and benchmarks."""
        _launch_fp8((_slice_statistics_kernel.fn, _group_statistics_kernel, _normalize_kernel.fn), x, norm.weight,
                    norm.bias, norm.num_groups, norm.eps, out, amax,
                    (_direct_config(stat_block), _direct_config(normalize_block)))

    @torch.library.custom_op("sccsdxl::group_norm_fp8", mutates_args=(), device_types="cuda")
    def _group_norm_fp8_gpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, n_groups: int,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        out, amax = _fp8_outputs(x)
        amax.zero_()
        _launch_fp8(_KERNELS, x, weight, bias, n_groups, eps, out, amax)
        return out, amax

    @_group_norm_fp8_gpu.register_fake
    def _group_norm_fp8_shapes(x, weight, bias, n_groups, eps):
        return _fp8_outputs(x)

    def _fp8_outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty e4m3 values shaped and laid out as channels_last ``x``, and a (1,) fp32 largest value."""
        return (torch.empty_like(x, dtype=FP8, memory_format=torch.channels_last),
                torch.empty((1,), device=x.device, dtype=torch.float32))

    @autotune(configs=_block_configs(NORMALIZE_BLOCKS), key=["n_pixels", "n_channels"])
    @triton.jit
    def _frame_kernel(x_ptr, amax_ptr, out_ptr, n_pixels, n_channels, width, guard, BLOCK_P: tl.constexpr,
                      BLOCK_C: tl.constexpr, MIN_SCALE: tl.constexpr):
        """A tile of one image's pixels and channels of channels_last x, in e4m3 into its framed rows."""
        image = tl.program_id(0).to(tl.int64)
        pixels = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (pixels < n_pixels)[:, None] & (channels < n_channels)[None, :]
        at = (image * n_pixels + pixels)[:, None] * n_channels + channels[None, :]
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        store_framed(out_ptr, x, mask, amax_ptr, image, pixels, channels, n_pixels, n_channels, width, guard,
                     MIN_SCALE)

    def run_frame_config(x: torch.Tensor, framed: torch.Tensor, amax: torch.Tensor, block: tuple[int, int]) -> None:
        """_frame_kernel with one (pixels, channels) block into ``framed`` (its frame zeroed), ``amax`` holding x's
        largest |value|: for tests (Triton's interpreter)."""
        n_images, n_channels, height, width = x.shape
        config = _direct_config(block)
        _frame_kernel.fn[_grid(n_images, height * width, n_channels, config, pixels=True)](
            x, amax, framed, height * width, n_channels, width, width + 3, MIN_SCALE=MIN_SCALE, **config)

    @torch.library.custom_op("sccsdxl::frame_e4m3", mutates_args=(), device_types="cuda")
    def _frame_gpu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        framed, amax = _framed_outputs(x, zeroed_frame=True)
        n_images, n_channels, height, width = x.shape
        low, high = torch.aminmax(x)
        amax.copy_(torch.maximum(low.abs(), high).float().reshape(1))
        _frame_kernel[_grid(n_images, height * width, n_channels, {}, pixels=True)](
            x, amax, framed, height * width, n_channels, width, width + 3, MIN_SCALE=MIN_SCALE)
        return framed, amax

    @_frame_gpu.register_fake
    def _frame_shapes(x):
        return _framed_outputs(x)

    @triton.jit
    def _zero_frame_kernel(bytes_ptr, amax_ptr, n_images, row_bytes, height, width, guard, BLOCK_R: tl.constexpr,
                           BLOCK_B: tl.constexpr):
        """Zero a block of the framed grid's frame rows, every byte: the guard rows before and after, then each
        image's border in memory order (its top row, its left and right pixels row by row, its bottom row); the
        first program also zeros amax, which the statistics kernel's atomic maximum starts from."""
        grid_rows = (height + 2) * (width + 2)
        border = 2 * (width + 2) + 2 * height
        index = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        image, at = (index - 2 * guard) // border, (index - 2 * guard) % border
        side = at - (width + 2)  # 0, 1: row 1's left and right pixels; 2, 3: row 2's; ...
        in_image = tl.where(at < width + 2, at,
                            tl.where(side < 2 * height, (1 + side // 2) * (width + 2) + (side % 2) * (width + 1),
                                     (height + 1) * (width + 2) + side - 2 * height))
        row = tl.where(index < guard, index, tl.where(index < 2 * guard, n_images * grid_rows + index,
                                                      guard + image * grid_rows + in_image)).to(tl.int64)
        valid = index < 2 * guard + n_images * border
        for start in range(0, row_bytes, BLOCK_B):
            at_byte = start + tl.arange(0, BLOCK_B)
            zeros = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.uint8)
            tl.store(bytes_ptr + row[:, None] * row_bytes + at_byte[None, :], zeros,
                     mask=valid[:, None] & (at_byte < row_bytes)[None, :])
        if tl.program_id(0) == 0:
            tl.store(amax_ptr, 0.0)

    def zero_frame_and_amax(framed: torch.Tensor, amax: torch.Tensor, n_images: int, height: int,
                            width: int) -> None:
        """zero_frame as one kernel (where the torch form launches six), and ``amax`` zeroed by it too: the framed
        ops' host time counts where each image is a call of its own (the decoder under vae_slicing, session 19)."""
        guard, n_channels = width + 3, framed.shape[1]
        n_frame_rows = 2 * guard + n_images * (2 * (width + 2) + 2 * height)
        block_r = 16
        _zero_frame_kernel[(triton.cdiv(n_frame_rows, block_r),)](
            framed.view(torch.uint8), amax, n_images, n_channels, height, width, guard, BLOCK_R=block_r,
            BLOCK_B=min(128, triton.next_power_of_2(n_channels)), num_warps=4)

    def _framed_outputs(x: torch.Tensor, zeroed_frame: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Framed e4m3 rows for (N, C, H, W) ``x`` and its (1,) fp32 largest value: uninitialized, or with the frame
        and the largest value zeroed (the kernels write every image pixel)."""
        n_images, n_channels, height, width = x.shape
        framed = torch.empty((frame_rows(n_images, height, width), n_channels), device=x.device, dtype=FP8)
        amax = torch.empty((1,), device=x.device, dtype=torch.float32)
        if zeroed_frame:  # through a byte view: zeroing e4m3 in place is what Triton 3.6 could not compile
            zero_frame_and_amax(framed, amax, n_images, height, width)
        return framed, amax


def frame_rows(n_images: int, height: int, width: int) -> int:
    """Rows of the zero-framed grid: each image's pixels with a one-pixel border of zeros, (width + 3) zero guard
    rows before and after, so that a 3x3 window's row shifts (up to width + 3) never leave the buffer."""
    return 2 * (width + 3) + n_images * (height + 2) * (width + 2)


def zero_frame(framed: torch.Tensor, n_images: int, height: int, width: int) -> None:
    """Zero the guard rows and each image's border in framed rows, leaving the image pixels as they are: a few
    percent of the buffer, where zeroing all of it would write it twice. The torch form of zero_frame_and_amax's
    kernel, which the GPU path runs: tests check the kernel against it."""
    guard = width + 3
    framed[:guard].zero_()
    framed[-guard:].zero_()
    grid = framed[guard:-guard].view(n_images, height + 2, width + 2, -1)
    for border in (grid[:, 0], grid[:, -1], grid[:, 1:-1, 0], grid[:, 1:-1, -1]):
        border.zero_()


def framed_interior(framed: torch.Tensor, n_images: int, height: int, width: int) -> torch.Tensor:
    """The image pixels of framed rows, as an (N, H, W, C) view."""
    guard = width + 3
    grid = framed[guard:guard + n_images * (height + 2) * (width + 2)]
    return grid.view(n_images, height + 2, width + 2, -1)[:, 1:height + 1, 1:width + 1]


def e4m3_scale(amax: torch.Tensor) -> torch.Tensor:
    """The e4m3 scale from the largest |value|: what the framed writes divide by."""
    return (amax.float() / FP8_MAX).clamp(min=MIN_SCALE)


def frame_e4m3_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """frame_e4m3 in torch: (N, C, H, W) ``x`` in e4m3 rows of the zero-framed grid, scaled by its largest |value|,
    and that value."""
    values = x.float()
    n_images, n_channels, height, width = x.shape
    amax = values.abs().amax().reshape(1)
    framed = torch.zeros((frame_rows(n_images, height, width), n_channels), device=x.device, dtype=FP8)
    scaled = (values / e4m3_scale(amax)).clamp(-FP8_MAX, FP8_MAX)
    framed_interior(framed, n_images, height, width).copy_(scaled.permute(0, 2, 3, 1).to(FP8))
    return framed, amax


def frame_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) ``x`` as sccsdxl.fp8_conv reads it, where no GroupNorm comes before: e4m3 rows of the
    zero-framed grid divided by one scale, and its largest |value| (1,) fp32 (a folded upsampler's input)."""
    if x.is_cuda and triton is not None:
        return _frame_gpu(x.contiguous(memory_format=torch.channels_last))
    return frame_e4m3_reference(x)


def group_norm_framed_fp8_reference(x: torch.Tensor, norm: torch.nn.GroupNorm,
                                    shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """group_norm_framed_fp8 in torch: GroupNorm + SiLU, scaled by its largest |value|."""
    return frame_e4m3_reference(group_norm_reference(x, norm, shift, silu=True))


def group_norm_fp8_reference(x: torch.Tensor, norm: torch.nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """group_norm_fp8 in torch: the GroupNorm in fp32, divided by its largest |value| / 448, in e4m3."""
    out = F.group_norm(x.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps).detach()
    amax = out.abs().amax().reshape(1)
    values = (out / e4m3_scale(amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return values.contiguous(memory_format=torch.channels_last), amax


def group_norm_fp8(x: torch.Tensor, norm: torch.nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``norm``(x) of (N, C, H, W) ``x`` in e4m3 for a linear over its channels (a transformer's proj_in under
    fp8_projections): channels_last values divided by one scale for the batch, and their largest |value| (1,)
    fp32, from which the scale is made (e4m3_scale), taken from each channel's extremes in the statistics pass."""
    if x.is_cuda and triton is not None:
        return _group_norm_fp8_gpu(x.contiguous(memory_format=torch.channels_last), norm.weight, norm.bias,
                                   norm.num_groups, norm.eps)
    return group_norm_fp8_reference(x, norm)


def _kernel_inputs(x: torch.Tensor, shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """What the kernels' ops take: x in channels_last memory, the shift (N, C) in x's dtype (x itself, unread,
    where there is none) and whether there is one."""
    x = x.contiguous(memory_format=torch.channels_last)
    if shift is None:
        return x, x, False
    return x, shift.to(x.dtype).contiguous(), True


def group_norm_framed_fp8(x: torch.Tensor, norm: torch.nn.GroupNorm,
                          shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(``norm``(x + shift)) of (N, C, H, W) ``x`` in e4m3 for sccsdxl.fp8_conv: (frame_rows, C) rows of the
    zero-framed NHWC grid divided by one scale, and its largest |value| (1,) fp32, from which the scale is made
    (e4m3_scale). One scale for the batch: GroupNorm's output is on the same scale in every image."""
    if x.is_cuda and triton is not None:
        return _group_norm_framed_gpu(*_kernel_inputs(x, shift), norm.weight, norm.bias, norm.num_groups, norm.eps)
    return group_norm_framed_fp8_reference(x, norm, shift)


def group_norm(x: torch.Tensor, norm: torch.nn.GroupNorm, shift: torch.Tensor | None = None,
               silu: bool = False) -> torch.Tensor:
    """``norm``(x + shift[:, :, None, None]) (SiLU'd if asked) of (N, C, H, W) ``x``, with ``shift`` (N, C); on a
    GPU three kernels over channels_last memory, the result channels_last too."""
    if x.is_cuda and triton is not None:
        return _group_norm_gpu(*_kernel_inputs(x, shift), norm.weight, norm.bias, norm.num_groups, norm.eps, silu)
    return group_norm_reference(x, norm, shift, silu)


class GroupNormSiLU(torch.nn.Module):
    """Stands in for a GroupNorm (and the SiLU after it, with ``silu``): a Transformer2DModel's input norm, or the
    UNet's output norm with its conv_act."""

    def __init__(self, norm: torch.nn.GroupNorm, silu: bool = False):
        super().__init__()
        self.norm, self.silu = norm, silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.norm, silu=self.silu)


def _is_group_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.GroupNorm) and module.affine


def can_fuse_resnet(block: torch.nn.Module) -> bool:
    """A ResnetBlock2D as SDXL's UNet and VAE decoder build it: GroupNorm + SiLU before each convolution, the time
    embedding (the UNet's) added before the second norm, no resampling inside the block, no dropout. The decoder's
    blocks say time_embedding_norm "group" and have no time embedding: diffusers then runs the plain second norm."""
    if type(block).__name__ != "ResnetBlock2D":
        return False
    plain_second_norm = block.time_embedding_norm == "default" or (
        block.time_emb_proj is None and block.time_embedding_norm != "scale_shift")
    return (_is_group_norm(block.norm1) and _is_group_norm(block.norm2)
            and isinstance(block.nonlinearity, torch.nn.SiLU) and block.upsample is None
            and block.downsample is None and plain_second_norm and not block.skip_time_act
            and block.dropout.p == 0.0)


class GroupNormResnetBlock(torch.nn.Module):
    """Stands in for a ResnetBlock2D that can_fuse_resnet accepts, computing the same: each GroupNorm + SiLU is
    group_norm's kernels, and the first convolution's bias joins the time embedding as the second norm's shift, so
    that the sum before that norm is never written."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.norm1, self.conv1, self.norm2, self.conv2 = block.norm1, block.conv1, block.norm2, block.conv2
        self.time_emb_proj, self.conv_shortcut = block.time_emb_proj, block.conv_shortcut
        self.output_scale_factor = block.output_scale_factor

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        hidden = group_norm(input_tensor, self.norm1, silu=True)
        hidden = self.conv1._conv_forward(hidden, self.conv1.weight, None)
        hidden = group_norm(hidden, self.norm2, self._shift(temb, hidden), silu=True)
        hidden = self.conv2(hidden)
        shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        return (shortcut + hidden) / self.output_scale_factor

    def _shift(self, temb: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
        """(N, C): the first convolution's bias plus the projected time embedding, what diffusers adds before norm2."""
        shift = None
        if self.time_emb_proj is not None and temb is not None:
            shift = self.time_emb_proj(F.silu(temb))
        bias = self.conv1.bias
        if bias is not None:
            shift = bias.expand(hidden.shape[0], -1) if shift is None else shift + bias
        return shift


def fuse_group_norms(model: torch.nn.Module) -> dict:
    """Swap the GroupNorms of a UNet (or a VAE decoder) for group_norm's kernels: every ResnetBlock2D that
    can_fuse_resnet accepts, every Transformer2DModel's input norm and the output norm with its SiLU. Returns how
    many of each."""
    counts = {"resnets": 0, "transformer_norms": 0, "output_norm": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if can_fuse_resnet(child):
                setattr(parent, name, GroupNormResnetBlock(child))
                counts["resnets"] += 1
            elif type(parent).__name__ == "Transformer2DModel" and name == "norm" and _is_group_norm(child):
                parent.norm = GroupNormSiLU(child)
                counts["transformer_norms"] += 1
    if _is_group_norm(getattr(model, "conv_norm_out", None)) and isinstance(getattr(model, "conv_act", None),
                                                                           torch.nn.SiLU):
        model.conv_norm_out, model.conv_act = GroupNormSiLU(model.conv_norm_out, silu=True), torch.nn.Identity()
        counts["output_norm"] = 1
    return counts

