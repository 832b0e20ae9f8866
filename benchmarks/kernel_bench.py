"""Shared by the kernel benchmarks in this directory: GPU timing, the row kernels' shapes and table rows, per-tensor
e4m3 quantization, the error measure, the table loops of the fp8 and cudnn-frontend experiments, and the attention
experiments' shapes and head split."""
import sys

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)

# (name, rows, tokens, heads, head size): the UNet's self-attentions at 50 rows (batch 25 with guidance)
SELF_ATTENTION_SHAPES = [("1280 level: 32x32 tokens, 20 heads", 50, 1024, 20, 64),
                         ("640 level: 64x64 tokens, 10 heads", 50, 4096, 10, 64)]


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused q/k/v projection's (B, S, 3 * H * D) output as three (B, H, S, D) views (no copies)."""
    b, s, width = qkv.shape
    return qkv.view(b, s, 3, heads, width // 3 // heads).permute(2, 0, 3, 1, 4).unbind(0)


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values with one scale for the whole tensor (dynamic, per tensor)."""
    scale = (x.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def relative_error(test: torch.Tensor, reference: torch.Tensor) -> float:
    return float((test.float() - reference.float()).norm() / reference.float().norm())


def gpu_ms(fn, reps: int = 10) -> float:
    """Mean milliseconds per call over ``reps`` calls after one untimed call (compile, autotuning), by CUDA events."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def kernel_table(call, rows: int = 10) -> str:
    """torch.profiler's table of the GPU kernels one call runs, longest first."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


# the transformer blocks' rows at 50 UNet rows (batch 25 with guidance) and their width, at the two block levels
BLOCK_ROWS = {"1280 level (50 rows x 1024 tokens)": (51200, 1280), "640 level (50 rows x 4096 tokens)": (204800, 640)}


def print_row_table(header: str) -> None:
    """The row-kernel benchmarks' output starts: the GPU and torch, then a markdown table with this header line."""
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
    print(header + "\n|" + "---|" * (header.count("|") - 1))


def whole_row_config_rows(shape: str, kernel, run, moved_bytes: int) -> None:
    """One row per configuration of a whole-row kernel's autotuning; ``run(rows, num_warps, **rest)`` runs one
    directly, ``rest`` being the configuration's other choices in lower case (the LayerNorm kernel's ``split``)."""
    for config in kernel.configs:
        rows, warps = config.kwargs["ROWS"], config.num_warps
        rest = {name.lower(): value for name, value in config.kwargs.items() if name != "ROWS"}
        label = f"kernel, {rows} rows per program, {warps} warps" + "".join(f", {k} {v}" for k, v in rest.items())
        print(bandwidth_row(shape, label, lambda: run(rows, warps, **rest), moved_bytes, reps=50))


def inductor_rows(shape: str, label: str, fn, args: tuple, moved_bytes: int) -> None:
    """``fn(*args)`` compiled cold by inductor, one row with its multi_kernel off and one with it on."""
    for multi_kernel in (0, 1):
        torch._dynamo.reset()
        with torch._inductor.config.patch({"triton.multi_kernel": multi_kernel}), torch.no_grad():
            compiled = torch.compile(fn, fullgraph=True)
            print(bandwidth_row(shape, f"{label}, inductor (multi_kernel={multi_kernel})", lambda: compiled(*args),
                                moved_bytes, reps=50))


def bandwidth_row(shape: str, label, fn, moved_bytes: int, reps: int) -> str:
    """One markdown row of the row-kernel benchmarks: ``fn``'s mean ms and the GB/s its ``moved_bytes`` make.
    ``label`` may be a function, read after the timing (an autotuned kernel knows its choice only then)."""
    ms = gpu_ms(fn, reps)
    return f"| {shape} | {label() if callable(label) else label} | {ms:.3f} | {moved_bytes / ms / 1e6:.0f} |"


def cudnn_fp8_graph():
    """A new cudnn-frontend graph with e4m3 inputs and fp32 arithmetic, on a handle of its own: (cudnn, handle,
    graph)."""
    import cudnn

    handle = cudnn.create_handle()
    fp32 = cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=fp32,
                          compute_data_type=fp32, handle=handle)
    return cudnn, handle, graph


def build_cudnn_graph(cudnn, graph) -> torch.Tensor:
    """Validate and build ``graph`` with cuDNN's heuristics (raising where cuDNN cannot run it); returns its
    workspace."""
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return torch.empty(max(graph.get_workspace_size(), 1), device="cuda", dtype=torch.uint8)


def print_cudnn_table(header: str, rows) -> None:
    """The cudnn-frontend experiments' output: versions, then a markdown table whose ``header`` is a '|'-separated
    line, one row per item of ``rows`` (each printed as it is made)."""
    import cudnn

    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"cudnn-frontend {cudnn.__version__} (backend {cudnn.backend_version()})\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        print(row, flush=True)


def run_experiment(run_case, tiny: list, shapes: list, checks: str, timings: str) -> None:
    """One markdown row per shape: on a GPU the real shapes, checked and timed; under ``--interpret`` (Triton's
    CPU interpreter, which the caller switched on before importing Triton) the tiny shapes, checked only."""
    import triton

    interpret = "--interpret" in sys.argv
    torch.manual_seed(0)
    if not interpret:
        print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}\n")
    header = f"| shape | {checks} |" + ("" if interpret else f" {timings} |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for shape in (tiny if interpret else shapes):
        print(run_case(*shape, device="cpu" if interpret else "cuda", timed=not interpret), flush=True)
