"""The transformer blocks' cross-attention over SDXL's 77 text tokens as one Triton kernel that writes the output
projection's fp8 rows, in fused_norms' blocks unless SCCSDXL_FUSED_CROSS_ATTENTION=0: its kernel alone 0.27 against
0.36 ms for cuDNN's attention and fp8_rows at the 1,024-token level on the H200, 0.51 against 0.72 at 4,096 (session
23); through loadgen +1.4 % (2.621 against 2.585 samples/s on one VM, session 24).

With 77 keys the attention is a pass over its queries and outputs: cuDNN's kernel, the fastest of its engine
configurations, runs it at about 2 TB/s (0.26 ms at the 1,024-token level at batch 50, BENCHMARKS.md session 21), and
fp8_rows then reads its output again to quantize it for the output projection. Here one program takes a block of one
image's tokens for one head with all of that head's keys and values, and writes the output already in e4m3.
Quantizing per row would need every head of a row in one program; instead each image gets one scale, from its
values: softmax weights are a convex combination, so every output of a head lies within the largest |value| of that
head's values, and e4m3, a floating-point format, keeps its relative precision below the scale's top (down to 2**-15
of it, where its subnormals start)."""
from __future__ import annotations

import math

import torch

from .fused import FP8, FP8_MAX, MIN_SCALE, autotune, cross_attend, env_flag, triton

# read once, when fused_norms' blocks are made; on unless =0
FUSED_CROSS_ATTENTION = env_flag("SCCSDXL_FUSED_CROSS_ATTENTION", default=True)
# 1 / 448 rounded to fp32, which the scales are multiplied by (image_scales)
INV_FP8_MAX = float(torch.tensor(1.0 / FP8_MAX, dtype=torch.float32))
KEY_BLOCK = 128  # the keys, padded to a power of two (SDXL's 77 text tokens)
# the tuning's choices: (tokens per block, blocks per program, warps, stages). One block per program loads a head's
# keys and values (32 KB, padded) for every 64 or 128 tokens (8 or 16 KB of queries) and ran at 1.2 TB/s on the H200
# (session 22); several blocks load them once and can load the next block's queries during this one's products
TILES = ((64, 1, 4, 3), (128, 1, 4, 3), (128, 1, 8, 3), (64, 8, 4, 3), (128, 4, 4, 3), (128, 4, 8, 3), (128, 8, 8, 3),
         (64, 16, 4, 3))

if triton is not None:
    import triton.language as tl

    if env_flag("TRITON_INTERPRET"):  # Triton 3.8's interpreter multiplies bf16 operands wrongly; fp32 holds them
        @triton.jit
        def _dot(a, b):
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        @triton.jit
        def _dot(a, b):
            """bf16 operands, fp32 sums: the tensor cores' product."""
            return tl.dot(a, b)

    @autotune(configs=[triton.Config({"BM": bm, "BLOCKS": blocks}, num_warps=warps, num_stages=stages)
                       for bm, blocks, warps, stages in TILES], key=["tokens", "keys", "HEAD_SIZE"])
    @triton.jit
    def _cross_attention_fp8_kernel(q_ptr, kv_ptr, out_ptr, inv_scale_ptr, tokens, keys, q_stride, kv_stride,
                                    out_stride, v_offset, qk_scale, HEAD_SIZE: tl.constexpr, KEYS: tl.constexpr,
                                    BM: tl.constexpr, BLOCKS: tl.constexpr, FP8_MAX: tl.constexpr):
        """softmax(q k^T / sqrt(d)) v for BLOCKS blocks of BM tokens of image program_id(2) and head program_id(1),
        times the image's inverse scale, stored as e4m3 where the head's columns of those rows lie. q: (images *
        tokens, heads * d); kv: (images * keys, 2 * heads * d), keys before values (diffusers' fused k/v
        projection). qk_scale holds log2(e), for exp2. The keys and values are loaded once for the program's blocks,
        whose query loads the loop can run ahead of the products."""
        chunk, head, image = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        columns = head * HEAD_SIZE + tl.arange(0, HEAD_SIZE)
        key = tl.arange(0, KEYS)
        key_ok = key < keys
        at = (image * keys + key).to(tl.int64)[:, None] * kv_stride + columns[None, :]
        k = tl.load(kv_ptr + at, mask=key_ok[:, None], other=0.0)
        v = tl.load(kv_ptr + at + v_offset, mask=key_ok[:, None], other=0.0)
        inv_scale = tl.load(inv_scale_ptr + image)
        for block in tl.range(chunk * BLOCKS, chunk * BLOCKS + BLOCKS):
            token = block * BM + tl.arange(0, BM)
            token_ok = token < tokens
            rows = (image * tokens + token).to(tl.int64)
            q = tl.load(q_ptr + rows[:, None] * q_stride + columns[None, :], mask=token_ok[:, None], other=0.0)
            s = tl.where(key_ok[None, :], _dot(q, tl.trans(k)) * qk_scale, float("-inf"))
            p = tl.exp2(s - tl.max(s, axis=1)[:, None]).to(v.dtype)
            # the sum of the weights as rounded for the product: each output a convex combination of values
            out = _dot(p, v) / tl.sum(p.to(tl.float32), axis=1)[:, None]
            out = tl.clamp(out * inv_scale, -FP8_MAX, FP8_MAX)
            tl.store(out_ptr + rows[:, None] * out_stride + columns[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=token_ok[:, None])

    @triton.jit
    def _image_scales_kernel(kv_ptr, scale_ptr, inv_scale_ptr, keys, width, kv_stride,
                             INV_FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, KEY_STEP: tl.constexpr,
                             COLUMN_STEP: tl.constexpr):
        """Image program_id(0)'s e4m3 scale, its largest |value| times 1 / FP8_MAX (at least MIN_SCALE), and the
        scale's inverse (an IEEE division), rounded as PyTorch rounds them in image_scales and 1 / scale."""
        image = tl.program_id(0)
        key = tl.arange(0, KEY_STEP)[:, None]
        column = tl.arange(0, COLUMN_STEP)[None, :]
        largest = tl.zeros([KEY_STEP, COLUMN_STEP], dtype=tl.float32)
        for first_key in tl.range(0, keys, KEY_STEP):
            rows = (image * keys + first_key + key).to(tl.int64) * kv_stride + width  # the values' columns
            for first_column in tl.range(0, width, COLUMN_STEP):
                ok = (first_key + key < keys) & (first_column + column < width)
                values = tl.load(kv_ptr + rows + first_column + column, mask=ok, other=0.0)
                largest = tl.maximum(largest, tl.abs(values.to(tl.float32)))
        scale = tl.maximum(tl.max(tl.max(largest, axis=1), axis=0) * INV_FP8_MAX, MIN_SCALE)
        tl.store(scale_ptr + image, scale)
        tl.store(inv_scale_ptr + image, tl.math.div_rn(1.0, scale))

    def scales_by_kernel(kv: torch.Tensor, images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """image_scales and their inverses from one kernel launch: (images,) fp32 each."""
        scale = torch.empty(images, device=kv.device, dtype=torch.float32)
        inv_scale = torch.empty_like(scale)
        _image_scales_kernel[(images,)](kv, scale, inv_scale, kv.shape[0] // images, kv.shape[1] // 2, kv.stride(0),
                                        INV_FP8_MAX=INV_FP8_MAX, MIN_SCALE=MIN_SCALE, KEY_STEP=16, COLUMN_STEP=128)
        return scale, inv_scale

    def _launch(kernel, query: torch.Tensor, kv: torch.Tensor, inv_scale: torch.Tensor, out: torch.Tensor,
                images: int, heads: int, **config) -> None:
        """Run ``kernel`` on (images * tokens, width) ``query`` and (images * keys, 2 width) ``kv`` into ``out``."""
        tokens, keys, width = query.shape[0] // images, kv.shape[0] // images, query.shape[1]
        head_size = width // heads

        def grid(meta):
            return (triton.cdiv(tokens, meta["BM"] * meta["BLOCKS"]), heads, images)
        kernel[grid](query, kv, out, inv_scale, tokens, keys, query.stride(0), kv.stride(0), out.stride(0), width,
                     head_size ** -0.5 * math.log2(math.e), HEAD_SIZE=head_size, KEYS=KEY_BLOCK, FP8_MAX=FP8_MAX,
                     **config)

    def run_config(query: torch.Tensor, kv: torch.Tensor, inv_scale: torch.Tensor, out: torch.Tensor, images: int,
                   heads: int, bm: int, blocks: int = 1, num_warps: int = 4, num_stages: int = 3) -> None:
        """One configuration the tuning chooses from, run directly: for tests (Triton's interpreter) and benchmarks."""
        _launch(_cross_attention_fp8_kernel.fn, query, kv, inv_scale, out, images, heads, BM=bm, BLOCKS=blocks,
                num_warps=num_warps, num_stages=num_stages)

    # an opaque op, as sccsdxl.fp8_conv's: as a triton_op, inductor's launch of this kernel took 2.6 times its
    # tuned eager launch on the H200 (0.873 against 0.337 ms at the 1,024-token level, session 22). The scales are
    # made inside it too, by a kernel: with inductor's division by 448 and reciprocal, compiled blocks rounded some
    # e4m3 outputs otherwise than eager ones at the 4,096-token level; with PyTorch's eager ops inside the op, they
    # cost 42 us of GPU time per call where inductor's fused ones took 10 (session 23)
    @torch.library.custom_op("sccsdxl::cross_attention_fp8_rows", mutates_args=(), device_types="cuda")
    def _cross_attention_gpu(query: torch.Tensor, kv: torch.Tensor, images: int,
                             heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale, inv_scale = scales_by_kernel(kv, images)
        out = torch.empty(query.shape, device=query.device, dtype=FP8)
        _launch(_cross_attention_fp8_kernel, query, kv, inv_scale, out, images, heads)
        return out, scale

    @_cross_attention_gpu.register_fake
    def _cross_attention_shape(query, kv, images, heads):
        return (torch.empty(query.shape, device=query.device, dtype=FP8),
                torch.empty(images, device=query.device, dtype=torch.float32))


def image_scales(kv: torch.Tensor, images: int) -> torch.Tensor:
    """(images * keys, 2 width) keys and values -> (images,) fp32 e4m3 scales, each image's largest |value| / 448,
    as a product with 1 / 448 rounded to fp32: what PyTorch computes for a division by a number on a GPU (on the CPU
    it divides), so that the scales are the same bits on either and the op's kernel can make them."""
    values = kv.reshape(images, -1, 2, kv.shape[-1] // 2)[:, :, 1]
    return (values.abs().amax(dim=(1, 2)).float() * INV_FP8_MAX).clamp(min=MIN_SCALE)


def cross_attention_fp8_rows_reference(query: torch.Tensor, kv: torch.Tensor, images: int,
                                       heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition: SDPA of the split heads, merged, divided by the image's scale and cast to e4m3; returns the
    (rows, width) e4m3 values and (rows, 1) fp32 scales that Fp8RowWeight.matmul takes."""
    scales = image_scales(kv, images).repeat_interleave(query.shape[0] // images)[:, None]
    attended = cross_attend(query, kv, images, heads)
    return (attended.float() / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8), scales


def cross_attention_fp8_rows(query: torch.Tensor, kv: torch.Tensor, images: int,
                             heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention of (images * tokens, width) queries over (images * keys, 2 width) keys and values, as the
    output projection's fp8 input: (rows, width) e4m3 values and (rows, 1) fp32 scales, one scale per image."""
    kv = kv.reshape(-1, kv.shape[-1])
    if not (query.is_cuda and triton is not None) or kv.shape[0] // images > KEY_BLOCK:
        return cross_attention_fp8_rows_reference(query, kv, images, heads)
    values, scale = _cross_attention_gpu(query.contiguous(), kv.contiguous(), images, heads)
    return values, scale.repeat_interleave(query.shape[0] // images)[:, None]
