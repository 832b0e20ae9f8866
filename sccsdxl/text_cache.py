"""Option text_kv_once: each cross-attention's key/value projection of the text, computed once per batch.

The pipeline hands the UNet the same text embeddings at all 20 denoising steps of a batch, so every
cross-attention projects the same 77 tokens to the same keys and values 20 times: about 2.6 TFLOP per UNet
forward at batch 25 with guidance (70 blocks, 2,048 -> 2 x 1,280 or 2 x 640); on an H200 the UNet's bf16 GEMM
time rose by 4.1 ms when these projections left fp8 (BENCHMARKS.md, session 9). Here each of those
projections is a TextProjectionCache that returns what it computed when the text last changed; a forward pre-hook
on the UNet recomputes them, outside the compiled regions, only when the UNet is given a different text tensor (or
the same one changed in place). The arithmetic is the same: the projection is the same module on the same input,
run once instead of 20 times. The price is memory: one batch's projections stay on the GPU, about 1.3 GB at batch
25 with guidance in bf16 (2.6 GB at batch 50). Through loadgen on an H200 at batch 50 it gained 1.2 % (2.029
against 2.006 samples/s) for 2.4 GiB more peak memory (BENCHMARKS.md, session 11).
"""
from __future__ import annotations

import torch

from .errors import ParameterError


class TextProjectionCache(torch.nn.Module):
    """Stands in for a cross-attention's key/value projection: returns its output for the batch's text, which
    ``refresh`` computed. The result lives in one buffer that later texts of the same shape are copied into, so
    that compiled regions (and CUDA graphs) reading it see the same tensor, new values."""

    def __init__(self, projection: torch.nn.Module):
        super().__init__()
        self.projection = projection
        self.register_buffer("projected", None, persistent=False)

    def refresh(self, text: torch.Tensor) -> None:
        with torch.no_grad():
            projected = self.projection(text)
        if self._can_take(projected):
            self.projected.copy_(projected)
        else:
            self.projected = projected

    def _can_take(self, projected: torch.Tensor) -> bool:
        """Whether the buffer can be overwritten with ``projected``: same shape and dtype, and not an inference
        tensor outside inference mode (which torch forbids changing)."""
        held = self.projected
        return (held is not None and held.shape == projected.shape and held.dtype == projected.dtype
                and (torch.is_inference_mode_enabled() or not held.is_inference()))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        if self.projected is None:
            raise RuntimeError("text_kv_once: the projection was called before the UNet's pre-hook computed it; "
                               "call the UNet (not one of its blocks), which refreshes the text's projections")
        return self.projected


def _version(text: torch.Tensor) -> int | None:
    """The tensor's in-place change counter; None for inference tensors, which keep none (the kit generates in
    inference mode, where a text changed in place would go unseen: the pipeline never changes it)."""
    return None if text.is_inference() else text._version


class TextChangeHook:
    """UNet forward pre-hook: refresh every TextProjectionCache when the text embeddings are not the tensor (and
    version) of the last call. Keeps the last text alive, so that its identity cannot pass to a new tensor."""

    def __init__(self, caches: list[TextProjectionCache]):
        self.caches, self.text, self.version = caches, None, None
        self.refreshes = 0  # how many times the projections ran: once per batch when the cache works

    def __call__(self, module, args, kwargs) -> None:
        text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if text is None:
            raise ValueError("text_kv_once: the UNet was called without encoder_hidden_states")
        if text is self.text and _version(text) == self.version:
            return
        for cache in self.caches:
            cache.refresh(text)
        self.text, self.version = text, _version(text)
        self.refreshes += 1


def _cross_attention_projections(unet: torch.nn.Module):
    """(owner, attribute name) of each key/value projection that reads the UNet's text as it is given."""
    for module in unet.modules():
        if type(module).__name__ == "Attention" and getattr(module, "is_cross_attention", False):
            if getattr(module, "norm_cross", None):
                continue  # projects a normalized text, not the UNet's
            # after fuse_qkv the processor reads to_kv alone (diffusers keeps to_k and to_v beside it, unused)
            yield from ((module, name) for name in (("to_kv",) if getattr(module, "fused_projections", False)
                                                    else ("to_k", "to_v")))
        elif type(module).__name__ == "Fp8TransformerBlock":  # fused_norms keeps the block's projection as kv2
            yield module, "kv2"


def cache_text_projections(unet: torch.nn.Module) -> TextChangeHook:
    """Swap every cross-attention key/value projection for a TextProjectionCache and hook the UNet to refresh them;
    returns the hook (its ``caches``, one per projection, and its count of ``refreshes``)."""
    if getattr(unet, "encoder_hid_proj", None) is not None:
        raise ParameterError("text_kv_once: this UNet projects its text embeddings before the cross-attentions",
                             "leave text_kv_once out for this model (SDXL's UNet hands them on unchanged)")
    caches: dict[int, TextProjectionCache] = {}
    for owner, name in list(_cross_attention_projections(unet)):
        projection = getattr(owner, name)
        if isinstance(projection, TextProjectionCache):
            raise ParameterError("text_kv_once was applied to this UNet already", "apply it once")
        if id(projection) not in caches:  # a projection shared by two owners gets one cache
            caches[id(projection)] = TextProjectionCache(projection)
        setattr(owner, name, caches[id(projection)])
    hook = TextChangeHook(list(caches.values()))
    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return hook
