"""Option folded_upsamplers: each 2x nearest upsampler and the 3x3 convolution after it as one 2x2 convolution.

After a 2x nearest upsample, each output pixel's 3x3 window reads only 2x2 distinct input pixels, and which
taps fall on the same input pixel depends only on the output pixel's phase (row and column even or odd). So the
upsample and convolution equal four 2x2 convolutions of the small image, one per phase, whose taps are sums of
the 3x3 taps: 16 multiplications per output pixel and channel pair instead of 36. Here they run as one
convolution with four times the output channels, then the phases are interleaved into the large image. The
result is the same sums (the folded taps are added in fp32, then rounded once to the weights' dtype).

Option transposed_upsamplers runs the same four 2x2 kernels as one stride-2 transposed convolution with 4x4 taps:
output row 2i + a reads input rows i - 1 + a and i + a through taps 3 - a and 1 - a, so the convolution library
writes the phases interleaved itself, with no second pass over the large image.

SDXL has five such upsamplers: two in the UNet (1280 channels at 64x64, 640 at 128x128 out) and three in the VAE
decoder (512 at 256x256 and 512x512, 256 at 1024x1024 out), 15 % of the UNet's and 28 % of the decoder's
convolution arithmetic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused import swap_modules

# for an output row of phase a (0: even, 1: odd), which 3x3 tap rows land on each of the two input rows it reads
# (rows i-1, i for even outputs of input row i; rows i, i+1 for odd ones)
_TAPS_BY_PHASE = ((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1))


def fold_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel (out, in, 3, 3) -> the four phases' 2x2 kernels as one (4 * out, in, 2, 2), phase (a, b) at
    rows [(2a + b) * out, (2a + b + 1) * out), summed in fp32."""
    taps = torch.tensor(_TAPS_BY_PHASE, dtype=torch.float32, device=weight.device)  # (phase, 2, 3)
    phases = [torch.einsum("ph,qw,oihw->oipq", taps[a], taps[b], weight.float()) for a in (0, 1) for b in (0, 1)]
    return torch.cat(phases).to(weight.dtype)


def transposed_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel (out, in, 3, 3) -> the stride-2 transposed convolution's (in, out, 4, 4) that computes the 2x
    nearest upsample and the convolution, summed in fp32."""
    # with stride 2 and padding 1, transposed tap row k = 3 - a - 2r serves the r-th input row of output phase a:
    # the phases' tap rows ordered by (r, a), reversed
    taps = torch.tensor(_TAPS_BY_PHASE, dtype=torch.float32, device=weight.device).transpose(0, 1).reshape(4, 3)
    taps = taps.flip(0)
    return torch.einsum("kh,lw,oihw->iokl", taps, taps, weight.float()).to(weight.dtype)


def interleave_phases(phases: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(images, 4 * out, height + 1, width + 1), phase (a, b) valid at [a:a + height, b:b + width] ->
    (images, out, 2 * height, 2 * width), in the input's memory format.

    Output pixel (2i + a, 2j + b) is phase (a, b)'s pixel (i + a, j + b): a fixed step in memory for each of i, a,
    j and b, so the whole interleave is one strided view of the phases and one copy out of it. (Built from slices
    and stacks, inductor compiled it into intermediate buffers and, for channels_last, a transpose after them.)"""
    images, channels = phases.shape[0], phases.shape[1] // 4
    s_image, s_channel, s_row, s_column = phases.stride()
    grid = phases.as_strided(  # (image, channel, i, a, j, b)
        (images, channels, height, 2, width, 2),
        (s_image, s_channel, s_row, 2 * channels * s_channel + s_row, s_column, channels * s_channel + s_column))
    if phases.is_contiguous(memory_format=torch.channels_last):
        pixels = grid.permute(0, 2, 3, 4, 5, 1).reshape(images, 2 * height, 2 * width, channels)
        return pixels.permute(0, 3, 1, 2)
    return grid.reshape(images, channels, 2 * height, 2 * width)


def can_fold(module: torch.nn.Module) -> bool:
    """A diffusers Upsample2D that upsamples 2x by nearest interpolation, then runs a plain 3x3 convolution."""
    if type(module).__name__ != "Upsample2D" or not (module.interpolate and module.use_conv):
        return False
    conv = module.conv if module.name == "conv" else getattr(module, "Conv2d_0", None)
    return (not module.use_conv_transpose and module.norm is None and isinstance(conv, torch.nn.Conv2d)
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


class FoldedUpsample(torch.nn.Module):
    """Stands in for an Upsample2D that can_fold accepts: one 2x2 convolution with four times the outputs and an
    interleave, or (``transposed``) one stride-2 transposed convolution; an output size other than twice the
    input's is upsampled to and convolved as the original does."""

    def __init__(self, upsample: torch.nn.Module, transposed: bool = False):
        super().__init__()
        self.transposed = transposed
        self.conv = upsample.conv if upsample.name == "conv" else upsample.Conv2d_0  # for other output sizes
        weight = (transposed_weight if transposed else fold_weight)(self.conv.weight.detach())
        if self.conv.weight.is_contiguous(memory_format=torch.channels_last):
            weight = weight.contiguous(memory_format=torch.channels_last)
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        bias = self.conv.bias
        if bias is not None:  # the transposed convolution's outputs are the large image's; the folded one's, 4 phases
            bias = torch.nn.Parameter(bias.detach() if transposed else bias.detach().repeat(4), requires_grad=False)
        self.bias = bias

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        height, width = hidden_states.shape[-2:]
        if output_size is not None and tuple(output_size) != (2 * height, 2 * width):
            return self.conv(F.interpolate(hidden_states, size=output_size, mode="nearest"))
        if self.transposed:
            return F.conv_transpose2d(hidden_states, self.weight, self.bias, stride=2, padding=1)
        phases = F.conv2d(hidden_states, self.weight, self.bias, padding=1)
        return interleave_phases(phases, height, width)


def fold_upsamplers(root: torch.nn.Module, transposed: bool = False) -> int:
    """Swap every upsampler under ``root`` that can_fold accepts for a FoldedUpsample; returns how many."""
    return swap_modules(root, can_fold, lambda upsample: FoldedUpsample(upsample, transposed))
