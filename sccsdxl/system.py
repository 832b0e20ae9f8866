"""What machine this is: GPUs, CPU, memory and software, detected without vendor tools (works on ROCm too)."""
from __future__ import annotations

import os
import platform
import socket


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def gpus() -> list[dict]:
    """Every GPU torch sees: name, memory, compute capability (CUDA) or arch (ROCm)."""
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        found.append({
            "index": i, "name": props.name, "memory_bytes": int(props.total_memory),
            "capability": f"{props.major}.{props.minor}",
            "arch": getattr(props, "gcnArchName", "") or f"sm_{props.major}{props.minor}",
            "multiprocessors": props.multi_processor_count,
        })
    return found


def accelerator_runtime() -> dict:
    """torch and its GPU runtime: CUDA or HIP version."""
    import torch

    return {"torch": torch.__version__, "cuda": torch.version.cuda or "", "hip": getattr(torch.version, "hip", "") or ""}


def describe_machine() -> dict:
    """A compact machine description for run records."""
    return {
        "hostname": socket.gethostname(), "os": platform.platform(), "python": platform.python_version(),
        "cpu_model": cpu_model(), "cpu_cores": os.cpu_count() or 0, "memory_bytes": memory_bytes(),
        "gpus": gpus(), **accelerator_runtime(),
    }
