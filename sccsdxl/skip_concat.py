"""Option concat_in_resnets: each UNet up block's skip concatenation made part of the ResNet block that reads it.

Before each of its ResNet blocks, a diffusers up block concatenates the hidden state with the matching down
block's output along the channels. That `torch.cat` runs eagerly, between compiled regions: on an H200 it took 311
ms of a 22-s batch of 50 images, about 1.6 TB/s where a copy reaches 4.3 (BENCHMARKS.md, session 15). Here the
ResNet blocks of the up blocks take the two tensors and concatenate them themselves, so with compile_resnets the
concatenation is inside the ResNet's compiled region and inductor writes it (channels_last in, channels_last out).
The arithmetic is unchanged: the same concatenation feeds the same block.
"""
from __future__ import annotations

import types

import torch

from .errors import ParameterError

UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
_FREEU = ("s1", "s2", "b1", "b2")


class ConcatResnet(torch.nn.Module):
    """A ResNet block that takes its input as the hidden state and skip tensor its up block concatenates."""

    def __init__(self, resnet: torch.nn.Module):
        super().__init__()
        self.resnet = resnet

    def forward(self, hidden: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.resnet(torch.cat([hidden, skip], dim=1), temb)


def _freeu_enabled(block: torch.nn.Module) -> bool:
    return all(getattr(block, name, None) for name in _FREEU)


def can_move_concat(block: torch.nn.Module) -> bool:
    """An SDXL-style up block (ResNets, optionally each followed by a transformer, then upsamplers) without FreeU."""
    return type(block).__name__ in UP_BLOCKS and not _freeu_enabled(block)


def _up_block_forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                      temb: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                      cross_attention_kwargs: dict | None = None, upsample_size=None,
                      attention_mask: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                      *args, **kwargs) -> torch.Tensor:
    """The up block's steps in their order, each skip tensor handed to its ConcatResnet instead of concatenated."""
    if _freeu_enabled(self):
        raise ParameterError("FreeU was enabled on a UNet built with concat_in_resnets, which does not apply it",
                             "leave concat_in_resnets out of the optimizations when using FreeU")
    skips = list(res_hidden_states_tuple)
    attentions = getattr(self, "attentions", None) or [None] * len(self.resnets)
    for resnet, attention in zip(self.resnets, attentions):
        hidden_states = resnet(hidden_states, skips.pop(), temb)
        if attention is not None:
            hidden_states = attention(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                      cross_attention_kwargs=cross_attention_kwargs, attention_mask=attention_mask,
                                      encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]
    for upsampler in self.upsamplers or ():
        hidden_states = upsampler(hidden_states, upsample_size)
    return hidden_states


def concat_in_resnets(unet: torch.nn.Module) -> int:
    """Give every up block that can_move_concat accepts ConcatResnets and the forward that feeds them; returns how
    many ResNet blocks now concatenate their own input."""
    moved = 0
    for block in unet.up_blocks:
        if can_move_concat(block):
            block.resnets = torch.nn.ModuleList(ConcatResnet(resnet) for resnet in block.resnets)
            block.forward = types.MethodType(_up_block_forward, block)
            moved += len(block.resnets)
    return moved
