"""Option fp8_projections: each UNet Transformer2DModel's proj_in and proj_out in fp8.

With fused_norms every linear inside the transformer blocks runs in fp8, but the two 1280x1280 (640x640) linears
around them stayed in bf16: 7.4 TFLOP of each 100-row UNet forward, about 15 ms of bf16 GEMM on the H200 (session
19's profile). Quantizing their inputs in a pass of their own would cost about what fp8 saves, so neither input is
made by one: the transformer's input GroupNorm writes proj_in's input in e4m3 (one scale for the batch, from the
largest value its statistics pass finds, as fp8_convs' norms do), and the blocks' last residual add writes proj_out's
input as fp8 rows (sccsdxl.fused.add_fp8_rows) instead of the sum in bf16. The output is handed on in channels_last
memory, as nhwc_transformer_outputs does for diffusers' module."""
from __future__ import annotations

import torch

from .fused import Fp8RowWeight, Fp8TransformerChain, add_fp8_rows, swap_modules
from .group_norm import GroupNormSiLU, e4m3_scale, group_norm_fp8


class Fp8ProjectionsTransformer(torch.nn.Module):
    """Stands in for a Transformer2DModel that can_take_transformer accepts, computing the same but for e4m3
    rounding: GroupNorm, proj_in, the fused_norms chain of blocks, proj_out, the residual add."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        norm = transformer.norm
        self.norm = norm.norm if isinstance(norm, GroupNormSiLU) else norm
        self.proj_in, self.proj_out = Fp8RowWeight(transformer.proj_in), Fp8RowWeight(transformer.proj_out)
        self.transformer_blocks = transformer.transformer_blocks  # one Fp8TransformerChain: its names stay as they were

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                timestep=None, added_cond_kwargs=None, class_labels=None, cross_attention_kwargs=None,
                attention_mask: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                return_dict: bool = True):
        if attention_mask is not None or encoder_attention_mask is not None:
            raise ValueError("fp8_projections builds SDXL's transformers, which run without attention masks")
        batch, channels, height, width = hidden_states.shape
        x = normed_projection(hidden_states, self.norm, self.proj_in)
        # through the chain's call, so that compile without compile_transformers runs it as its compiled region
        x, pending = self.transformer_blocks[0](x.view(batch, height * width, channels),
                                                encoder_hidden_states=encoder_hidden_states, unsummed=True)
        out = self.proj_out.matmul(*add_fp8_rows(pending, x), hidden_states.dtype)
        out = out.view(batch, height, width, channels).permute(0, 3, 1, 2) + hidden_states  # channels_last
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


def normed_projection(x: torch.Tensor, norm: torch.nn.GroupNorm, proj: Fp8RowWeight) -> torch.Tensor:
    """proj(norm(x)) as (N * H * W, C) rows of (N, C, H, W) ``x``, the GroupNorm kernels writing proj's e4m3 input."""
    batch, channels, height, width = x.shape
    rows = batch * height * width
    values, amax = group_norm_fp8(x, norm)
    scales = e4m3_scale(amax).expand(rows, 1).contiguous()  # one for the batch, as the row-scaled GEMM takes it
    return proj.matmul(values.permute(0, 2, 3, 1).reshape(rows, channels), scales, x.dtype)


def can_take_transformer(transformer: torch.nn.Module) -> bool:
    """A Transformer2DModel as SDXL's UNet builds it, after fused_norms: continuous input, an affine GroupNorm (or
    fused_group_norms' form of it, without SiLU), linear projections of the same width as the input, and its blocks
    as one Fp8TransformerChain."""
    if type(transformer).__name__ != "Transformer2DModel" or not getattr(transformer, "is_input_continuous", False):
        return False
    norm = transformer.norm
    if isinstance(norm, GroupNormSiLU):
        norm = None if norm.silu else norm.norm
    blocks = transformer.transformer_blocks
    linear = torch.nn.Linear
    return (isinstance(norm, torch.nn.GroupNorm) and norm.affine and transformer.use_linear_projection
            and isinstance(transformer.proj_in, linear) and isinstance(transformer.proj_out, linear)
            and norm.num_channels == transformer.proj_in.in_features == transformer.proj_in.out_features
            == transformer.proj_out.in_features == transformer.proj_out.out_features
            and len(blocks) == 1 and isinstance(blocks[0], Fp8TransformerChain))


def fp8_projections(unet: torch.nn.Module) -> int:
    """Swap every Transformer2DModel of ``unet`` that can_take_transformer accepts; returns how many."""
    return swap_modules(unet, can_take_transformer, Fp8ProjectionsTransformer)
