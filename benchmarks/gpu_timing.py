"""GPU time of a call, for the kernel benchmarks in this directory."""
import torch


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
