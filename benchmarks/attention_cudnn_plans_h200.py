"""Experiment: is any of cuDNN's engine configurations for bf16 attention faster than the one PyTorch runs?

Attention is the second-largest kind of GPU work in a batch of 50 (4.26 of 20.45 s in session 18's profile), all
of it one cuDNN kernel that PyTorch's scaled_dot_product_attention picks by cuDNN's heuristics
(``flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1``: 64 query rows per program, one warpgroup). Alone it ran at
458-491 TFLOP/s at the self-attention shapes (session 6). Here the same attention is built as a cudnn-frontend graph
(``pip install nvidia-cudnn-frontend==1.14.1``, carried as a wheel), every engine configuration that heuristics A,
B and the fallback list offer is built, and each is timed on the layout the UNet hands over (q, k and v strided
views of the fused projection for self-attention; the text's keys and values, 77 tokens, for cross-attention) at
100 rows (batch 50 with guidance), with its error against PyTorch's output. Run on a GPU node:
  python3 benchmarks/attention_cudnn_plans_h200.py
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernel_bench import gpu_ms, print_cudnn_table, relative_error, split_heads

ROWS = 100  # batch 50 with guidance
# (name, query tokens, key tokens, heads, head size): the UNet's self- and cross-attention at its two block levels
SHAPES = [("1280 level, self: 1,024 tokens, 20 heads", 1024, None, 20, 64),
          ("640 level, self: 4,096 tokens, 10 heads", 4096, None, 10, 64),
          ("1280 level, cross: 1,024 x 77 tokens, 20 heads", 1024, 77, 20, 64),
          ("640 level, cross: 4,096 x 77 tokens, 10 heads", 4096, 77, 10, 64)]


def inputs(tokens: int, keys: int | None, heads: int, d: int) -> tuple[torch.Tensor, ...]:
    """(B, H, S, D) views as the UNet has them: split from the fused q/k/v projection for self-attention; for
    cross-attention q from its own projection, k and v from the text's (77 tokens)."""
    if keys is None:
        return split_heads(torch.randn(ROWS, tokens, 3 * heads * d, device="cuda", dtype=torch.bfloat16), heads)
    q, k, v = (torch.randn(ROWS, n, heads * d, device="cuda", dtype=torch.bfloat16) for n in (tokens, keys, keys))
    return tuple(t.view(ROWS, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))


def plans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The attention as a cudnn-frontend graph with every plan built: (cudnn, handle, graph, tensors, output)."""
    import cudnn

    handle = cudnn.create_handle()
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    tensors = [graph.tensor(name=n, dim=list(t.shape), stride=list(t.stride()), data_type=cudnn.data_type.BFLOAT16)
               for n, t in zip("qkv", (q, k, v))]
    o, _ = graph.sdpa(name="attention", q=tensors[0], k=tensors[1], v=tensors[2], is_inference=True,
                      attn_scale=1.0 / math.sqrt(q.shape[-1]), use_causal_mask=False)
    b, h, s, d = q.shape
    o.set_output(True).set_dim([b, h, s, d]).set_stride([s * h * d, d, h * d, 1])  # (B, S, H * D): the projection's
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans(cudnn.build_plan_policy.ALL)
    return cudnn, handle, graph, tensors, o


def run_case(name: str, tokens: int, keys: int | None, heads: int, d: int) -> list[str]:
    q, k, v = inputs(tokens, keys, heads, d)
    flop = 4 * ROWS * heads * tokens * (keys or tokens) * d
    rate = lambda ms: f"{ms:.3f} ({flop / ms / 1e9:.0f})"  # noqa: E731
    def torch_ms() -> str:
        return rate(gpu_ms(lambda: F.scaled_dot_product_attention(q, k, v)))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        reference = F.scaled_dot_product_attention(q, k, v)
        rows = [f"| {name} | PyTorch, cuDNN backend | | {torch_ms()} |"]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        rows.append(f"| {name} | PyTorch, flash backend | | {torch_ms()} |")
    try:
        cudnn, handle, graph, tensors, o = plans(q, k, v)
    except Exception as exc:  # cuDNN says which part it cannot run
        return rows + [f"| {name} | cudnn-frontend cannot build it: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200]} | | |"]
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    out = torch.empty(ROWS, tokens, heads * d, device="cuda", dtype=torch.bfloat16)
    pack = {tensors[0]: q, tensors[1]: k, tensors[2]: v, o: out}
    for index in range(graph.get_execution_plan_count()):
        try:
            workspace = torch.empty(max(graph.get_workspace_size_plan_at_index(index), 1), device="cuda",
                                    dtype=torch.uint8)
            run = lambda: graph.execute_plan_at_index(pack, workspace, index, handle=handle)  # noqa: E731
            ms = gpu_ms(run)
            error = relative_error(out.view(ROWS, tokens, heads, d).transpose(1, 2), reference)
            rows.append(f"| {name} | plan {index}: {graph.get_plan_name_at_index(index)} | {error:.4f} | "
                        f"{rate(ms)} |")
        except Exception as exc:  # a plan cuDNN listed but cannot run here
            rows.append(f"| {name} | plan {index}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]} | | |")
    return rows


def main() -> None:
    torch.manual_seed(0)
    print_cudnn_table("| shape | attention | rel. error against PyTorch | ms (TFLOP/s) |",
                      (row for shape in SHAPES for row in run_case(*shape)))


if __name__ == "__main__":
    main()
