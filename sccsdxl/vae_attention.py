"""Option vae_attention_gemms: the VAE decoder's attention as two batched GEMMs and a softmax, compiled.

SDXL's decoder has one attention, in its mid block: 128x128 latent pixels (16,384 tokens) and a single head 512
wide. cuDNN's and flash attention do not take a head that wide, so PyTorch runs its memory-efficient kernel, at
about 125 TFLOP/s on an H200: 4.4 ms per image. Written as two GEMMs (the scores in fp32, as flash attention keeps
them) and a softmax that writes bf16 probabilities, a few images at a time so that the scores (1 GiB per image in
fp32) stay small, and compiled, the same attention took 1.35 ms per image with the same error against fp32
(benchmarks/vae_attention_h200.py, BENCHMARKS.md session 12). compile_vae compiles the module that does it.
"""
from __future__ import annotations

import torch

from .fused import swap_modules

IMAGES_PER_CHUNK = 5  # images whose scores are held at once; 5 compiled ran fastest of those measured (2, 5, 10)


def attention_by_gemms(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                       images_per_chunk: int = IMAGES_PER_CHUNK) -> torch.Tensor:
    """softmax(query key^T * scale) value for (images, tokens, width) tensors of one head, a chunk of images at a
    time: the scores in fp32, the probabilities in the inputs' dtype."""
    out = torch.empty_like(query)
    for start in range(0, query.shape[0], images_per_chunk):
        part = slice(start, start + images_per_chunk)
        scores = _scores(query[part], key[part])
        out[part] = torch.bmm(torch.softmax(scores * scale, dim=-1).to(query.dtype), value[part])
    return out


def _scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """query key^T in fp32: on a GPU straight out of the GEMM (bf16/fp16 in, fp32 out); the CPU has no such GEMM."""
    if query.is_cuda and query.dtype != torch.float32:
        return torch.bmm(query, key.transpose(1, 2), out_dtype=torch.float32)
    return torch.bmm(query.float(), key.float().transpose(1, 2))


def can_take(module: torch.nn.Module) -> bool:
    """A diffusers Attention as the SDXL VAE builds it: self-attention over an image's pixels, one head, its own
    GroupNorm first and the residual added after, no mask or spatial norm."""
    return (type(module).__name__ == "Attention" and module.heads == 1 and module.group_norm is not None
            and module.spatial_norm is None and module.residual_connection and not module.is_cross_attention
            and module.norm_q is None and module.norm_k is None and module.to_out[1].p == 0.0)


class GemmAttention(torch.nn.Module):
    """Stands in for an Attention that can_take accepts, computing what diffusers' AttnProcessor2_0 computes for it
    (or FusedAttnProcessor2_0, with fuse_qkv), with attention_by_gemms in place of scaled_dot_product_attention."""

    def __init__(self, attention: torch.nn.Module):
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        attn = self.attention
        images, channels, height, width = hidden_states.shape
        tokens = attn.group_norm(hidden_states.view(images, channels, height * width)).transpose(1, 2)
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(tokens).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        out = attn.to_out[0](attention_by_gemms(query, key, value, attn.scale))
        out = out.transpose(1, 2).reshape(images, channels, height, width)
        return (out + hidden_states) / attn.rescale_output_factor


def swap_vae_attention(decoder: torch.nn.Module) -> int:
    """Swap every attention of the VAE decoder that can_take accepts for a GemmAttention; returns how many."""
    return swap_modules(decoder, can_take, GemmAttention)
