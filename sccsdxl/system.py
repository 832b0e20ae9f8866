"""What machine this is: GPUs, CPU, memory, disk and software, detected without vendor tools (works on ROCm too).

01_setup shows this as its machine report; the run records carry ``describe_machine()``; the submission step
maps the same detection onto the MLPerf system description (``system_description``, spec §8.3). Every probe is
best effort: a value that cannot be read is ``""`` or ``0``, never an exception, so a report always comes out.
nvidia-smi / rocm-smi are used only when present, and only for the driver version.
"""
from __future__ import annotations

import importlib
import os
import platform
import re
import shutil
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

SYS_CPU = Path("/sys/devices/system/cpu")
SYS_NET = Path("/sys/class/net")
SYS_IB = Path("/sys/class/infiniband")
SYS_PCI = Path("/sys/bus/pci/devices")

# (import name, distribution, what the kit needs it for). Required: the benchmark cannot run without them.
REQUIRED_PACKAGES: tuple[tuple[str, str, str], ...] = (
    ("torch", "torch", "runs the model"),
    ("diffusers", "diffusers", "the SDXL pipeline"),
    ("transformers", "transformers", "text encoders and tokenizers"),
    ("huggingface_hub", "huggingface_hub", "downloads the weights"),
    ("safetensors", "safetensors", "reads weight files"),
    ("accelerate", "accelerate", "fast weight loading"),
    ("open_clip", "open_clip_torch", "CLIP score (accuracy) and the offline tokenizer"),
    ("mlperf_loadgen", "mlcommons-loadgen", "MLPerf LoadGen"),
    ("numpy", "numpy", "arrays"),
    ("pandas", "pandas", "tables"),
    ("yaml", "pyyaml", "parameter files"),
    ("tqdm", "tqdm", "progress bars"),
    ("matplotlib", "matplotlib", "plots"),
    ("PIL", "pillow", "images"),
    ("ijson", "ijson", "streams the accuracy log"),
    ("papermill", "papermill", "runs the notebooks headless"),
)
OPTIONAL_PACKAGES: tuple[tuple[str, str, str], ...] = (
    ("pytorch_fid", "pytorch-fid", "05_accuracy: the FID Inception network"),
    ("scipy", "scipy", "05_accuracy: FID (matrix square root)"),
    ("ipywidgets", "ipywidgets", "interactive controls in JupyterLab"),
    ("pynvml", "nvidia-ml-py", "each run's GPU energy, power and clocks (NVIDIA)"),
)

GiB = 1024 ** 3


def _read(path: Path | str) -> str:
    """A small sysfs/procfs file's text, or '' when it cannot be read."""
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _run(command: list[str], timeout: float = 5.0) -> str:
    """stdout of an optional tool, or '' if it is absent, fails or hangs."""
    if shutil.which(command[0]) is None:
        return ""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


# ---------------------------------------------------------------- CPU and memory

def _cpuinfo() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU (empty off Linux)."""
    blocks, current = [], {}
    for line in _read("/proc/cpuinfo").splitlines() + [""]:
        if not line.strip():
            if current:
                blocks.append(current)
            current = {}
            continue
        key, _, value = line.partition(":")
        current[key.strip().lower()] = value.strip()
    return blocks


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else what platform reports."""
    for block in _cpuinfo():
        if block.get("model name"):
            return block["model name"]
    return platform.processor() or platform.machine()


def cpu_topology() -> dict[str, int]:
    """Sockets, physical cores and logical CPUs (hyper-threads) of this node."""
    blocks = _cpuinfo()
    logical = os.cpu_count() or len(blocks) or 0
    sockets = {b.get("physical id") for b in blocks if b.get("physical id") is not None}
    cores = {(b.get("physical id"), b.get("core id")) for b in blocks if b.get("core id") is not None}
    n_sockets = len(sockets) or 1
    n_cores = len(cores) or logical
    return {"sockets": n_sockets, "cores": n_cores, "cores_per_socket": max(1, n_cores // n_sockets),
            "logical_cpus": logical}


def cpu_frequency_mhz() -> float:
    """Maximum CPU clock (cpufreq), else the current one from /proc/cpuinfo; 0 when unknown."""
    khz = _read(SYS_CPU / "cpu0" / "cpufreq" / "cpuinfo_max_freq")
    if khz.isdigit():
        return int(khz) / 1000
    for block in _cpuinfo():
        try:
            return float(block.get("cpu mhz", ""))
        except ValueError:
            continue
    return 0.0


def cpu_caches() -> str:
    """Cache sizes as the kernel reports them for cpu0, e.g. 'L1d 48K, L1i 32K, L2 2048K, L3 307200K'."""
    parts = []
    for index in sorted((SYS_CPU / "cpu0" / "cache").glob("index*")):
        level, kind, size = _read(index / "level"), _read(index / "type"), _read(index / "size")
        if level and size:
            suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
            parts.append(f"L{level}{suffix} {size}")
    return ", ".join(parts)


def memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (what a new process can use without swapping)."""
    match = re.search(r"^MemAvailable:\s+(\d+) kB", _read("/proc/meminfo"), re.M)
    return int(match.group(1)) * 1024 if match else 0


# ---------------------------------------------------------------- GPUs

def gpu_driver_version() -> str:
    """The GPU kernel driver's version: NVIDIA or AMD, from procfs/sysfs, else nvidia-smi / rocm-smi if present."""
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", _read("/proc/driver/nvidia/version"))
    if match:
        return f"NVIDIA {match.group(1)}"
    amd = _read("/sys/module/amdgpu/version")
    if amd:
        return f"amdgpu {amd}"
    smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if smi:
        return f"NVIDIA {smi.splitlines()[0].strip()}"
    match = re.search(r"Driver version:\s*(\S+)", _run(["rocm-smi", "--showdriverversion"]))
    return f"amdgpu {match.group(1)}" if match else ""


def pcie_link(domain: int, bus: int, device: int) -> str:
    """Current PCIe link of a GPU from sysfs, e.g. '32.0 GT/s PCIe x16'; '' when not readable."""
    node = SYS_PCI / f"{domain:04x}:{bus:02x}:{device:02x}.0"
    speed, width = _read(node / "current_link_speed"), _read(node / "current_link_width")
    return f"{speed} x{width}" if speed and width else ""


def gpus() -> list[dict]:
    """Every GPU torch sees: name, memory, compute capability (CUDA) or arch (ROCm), clocks, PCIe link."""
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        bus = (getattr(props, "pci_domain_id", None), getattr(props, "pci_bus_id", None),
               getattr(props, "pci_device_id", None))
        found.append({
            "index": i, "name": props.name, "memory_bytes": int(props.total_memory),
            "capability": f"{props.major}.{props.minor}",
            "arch": getattr(props, "gcnArchName", "") or f"sm_{props.major}{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "clock_mhz": int(getattr(props, "clock_rate", 0) or 0) // 1000,
            "memory_clock_mhz": int(getattr(props, "memory_clock_rate", 0) or 0) // 1000,
            "memory_bus_bits": int(getattr(props, "memory_bus_width", 0) or 0),
            "pcie": pcie_link(*bus) if None not in bus else "",
        })
    return found


def accelerator_runtime() -> dict:
    """torch and its GPU runtime: CUDA or HIP version."""
    import torch

    return {"torch": torch.__version__, "cuda": torch.version.cuda or "", "hip": getattr(torch.version, "hip", "") or ""}


# ---------------------------------------------------------------- disk and network

def existing_parent(path: str | Path) -> Path:
    """The nearest directory that exists at or above ``path`` (a data_dir may not be created yet)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mount_of(path: Path) -> tuple[str, str, str]:
    """(device, mount point, filesystem type) of the mount holding ``path``, from /proc/mounts."""
    best = ("", "", "")
    target = str(path.resolve())
    for line in _read("/proc/mounts").splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        device, mount, fstype = fields[0], fields[1].replace("\\040", " "), fields[2]
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[1]):
            best = (device, mount, fstype)
    return best


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "fuse.sshfs", "wekafs")


def storage_kind(device: str, fstype: str) -> str:
    """'NVMe SSD', 'SSD', 'HDD', 'network (lustre)' ... for the block device behind a mount; '' if unknown."""
    if fstype in NETWORK_FILESYSTEMS:
        return f"network ({fstype})"
    name = Path(device).name
    block = Path("/sys/class/block") / name
    if not name or not block.exists():
        return fstype
    queue = block / "queue" if (block / "queue").exists() else block.resolve().parent / "queue"
    rotational = _read(queue / "rotational")
    if rotational == "1":
        return "HDD"
    return "NVMe SSD" if name.startswith("nvme") else ("SSD" if rotational == "0" else fstype)


def disk_info(path: str | Path) -> dict[str, Any]:
    """Free and total bytes, filesystem and storage kind where ``path`` lives (or would be created)."""
    where = existing_parent(path)
    try:
        usage = shutil.disk_usage(where)
        total, free = usage.total, usage.free
    except OSError:
        total = free = 0
    device, mount, fstype = _mount_of(where)
    return {"path": str(Path(path).expanduser()), "checked_at": str(where), "free_bytes": free, "total_bytes": total,
            "mount": mount, "filesystem": fstype, "storage": storage_kind(device, fstype)}


def network_interfaces() -> list[dict[str, Any]]:
    """Physical network ports (Ethernet from /sys/class/net, InfiniBand ports) with their link speed in Gb/s."""
    ports = []
    for iface in sorted(SYS_NET.glob("*")) if SYS_NET.exists() else []:
        if not (iface / "device").exists():  # loopback, bridges, veth, ifb: no hardware behind them
            continue
        kind = "InfiniBand" if _read(iface / "type") == "32" else "Ethernet"
        speed = _read(iface / "speed")
        gbps = int(speed) / 1000 if speed.lstrip("-").isdigit() and int(speed) > 0 else 0.0
        ports.append({"name": iface.name, "kind": kind, "gbps": gbps})
    for port in sorted(SYS_IB.glob("*/ports/*")) if SYS_IB.exists() else []:
        match = re.match(r"([\d.]+) Gb/sec", _read(port / "rate"))
        ports.append({"name": f"{port.parent.parent.name}/{port.name}", "kind": "InfiniBand",
                      "gbps": float(match.group(1)) if match else 0.0})
    return ports


# ---------------------------------------------------------------- software

def package_status(packages: tuple[tuple[str, str, str], ...] = REQUIRED_PACKAGES) -> list[dict[str, str]]:
    """Import each package for real (a broken install shows here, not deep inside a later notebook)."""
    rows = []
    for module, dist, purpose in packages:
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = ""
        try:
            importlib.import_module(module)
            error = ""
        except Exception as exc:  # noqa: BLE001 - any import failure is what we report
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        rows.append({"module": module, "package": dist, "version": version, "imports": not error,
                     "error": error, "purpose": purpose})
    return rows


def operating_system() -> str:
    """Distribution name and version (e.g. 'Ubuntu 22.04.4 LTS'), else platform's string."""
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", "") or platform.platform()
    except (OSError, AttributeError):
        return platform.platform()


# ---------------------------------------------------------------- reports

def describe_machine() -> dict:
    """A compact machine description for run records."""
    return {
        "hostname": socket.gethostname(), "os": platform.platform(), "python": platform.python_version(),
        "cpu_model": cpu_model(), "cpu_cores": os.cpu_count() or 0, "memory_bytes": memory_bytes(),
        "gpus": gpus(), **accelerator_runtime(), "gpu_driver": gpu_driver_version(),
    }


def machine_report(data_dir: str | Path, disk_needed_bytes: int = 0, optional: bool = True) -> dict[str, Any]:
    """Everything 01_setup shows: describe_machine() plus topology, caches, disk at data_dir, network, packages."""
    report = describe_machine()
    packages = package_status(REQUIRED_PACKAGES)
    if optional:
        packages += [{**row, "optional": True} for row in package_status(OPTIONAL_PACKAGES)]
    report.update({
        "distribution": operating_system(), "cpu": {**cpu_topology(), "frequency_mhz": cpu_frequency_mhz(),
                                                    "caches": cpu_caches()},
        "memory_available_bytes": available_memory_bytes(),
        "disk": {**disk_info(data_dir), "needed_bytes": int(disk_needed_bytes)},
        "network": network_interfaces(), "packages": packages,
    })
    report["problems"] = machine_problems(report)
    return report


def machine_problems(report: dict[str, Any]) -> list[str]:
    """What stops the benchmark on this machine: no GPU, too little disk, a package that does not import."""
    problems = []
    if not report.get("gpus"):
        problems.append("torch sees no GPU: only model_source tiny (CPU rehearsal) can run here")
    disk = report.get("disk", {})
    if disk.get("needed_bytes", 0) > disk.get("free_bytes", 0):
        problems.append(f"{disk.get('checked_at')}: {_gb(disk['free_bytes'])} free, the missing assets need "
                        f"{_gb(disk['needed_bytes'])} (set data_dir / $SCCSDXL_DATA_DIR to a larger disk)")
    for row in report.get("packages", []):
        if not row["imports"] and not row.get("optional"):
            problems.append(f"{row['package']} does not import ({row['error'] or 'not installed'}): "
                            f"pip install {row['package']}")
    return problems


def _runtime_text(report: dict[str, Any]) -> str:
    """Which GPU runtime torch was built for (a CUDA build on a machine without a GPU still says CUDA)."""
    if report.get("hip"):
        return f"ROCm/HIP {report['hip']}"
    if report.get("cuda"):
        return f"CUDA {report['cuda']}" + ("" if report.get("gpus") else " (torch build; no GPU visible)")
    return "none (CPU-only torch build)"


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def machine_table(report: dict[str, Any]):
    """The machine report as a two-column pandas table (item, value) for display."""
    import pandas as pd

    cpu, disk = report.get("cpu", {}), report.get("disk", {})
    rows = [
        ("host", report["hostname"]), ("OS", report.get("distribution") or report["os"]),
        ("Python", report["python"]), ("torch", report["torch"]),
        ("GPU runtime", _runtime_text(report)),
        ("GPU driver", report.get("gpu_driver") or "not detected"),
    ]
    for gpu in report.get("gpus", []):
        extra = f", {gpu['pcie']}" if gpu.get("pcie") else ""
        rows.append((f"GPU {gpu['index']}", f"{gpu['name']}, {gpu['memory_bytes'] / GiB:.1f} GiB, "
                                            f"{gpu['arch']}, {gpu['multiprocessors']} SMs/CUs{extra}"))
    if not report.get("gpus"):
        rows.append(("GPUs", "none visible to torch"))
    rows += [
        ("CPU", f"{report['cpu_model']}: {cpu.get('sockets', '?')} socket(s), {cpu.get('cores', '?')} cores, "
                f"{report['cpu_cores']} logical CPUs"),
        ("RAM", f"{report['memory_bytes'] / GiB:.1f} GiB "
                f"({report.get('memory_available_bytes', 0) / GiB:.1f} GiB available)"),
        ("data disk", f"{disk.get('checked_at', '')}: {_gb(disk.get('free_bytes', 0))} free of "
                      f"{_gb(disk.get('total_bytes', 0))} ({disk.get('storage') or disk.get('filesystem') or '?'}); "
                      f"missing assets need {_gb(disk.get('needed_bytes', 0))}"),
        ("network", ", ".join(f"{p['name']} {p['kind']} " + (f"{p['gbps']:g} Gb/s" if p["gbps"] else "(speed unknown)")
                              for p in report.get("network", [])) or "no physical ports found"),
    ]
    return pd.DataFrame(rows, columns=["item", "value"])


def package_table(report: dict[str, Any]):
    """One row per package: version, whether it imports, what it is for."""
    import pandas as pd

    rows = [{"package": r["package"], "version": r["version"] or "-",
             "imports": "yes" if r["imports"] else f"NO: {r['error'] or 'not installed'}",
             "needed": "optional" if r.get("optional") else "required", "for": r["purpose"]}
            for r in report.get("packages", [])]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- MLPerf system description (spec §8.3)

SYSTEM_DESC_REQUIRED_FIELDS: tuple[str, ...] = (
    "division", "submitter", "status", "system_name", "number_of_nodes", "host_processor_model_name",
    "host_processors_per_node", "host_processor_core_count", "host_processor_frequency", "host_processor_caches",
    "host_processor_interconnect", "host_memory_capacity", "host_memory_configuration", "host_storage_capacity",
    "host_storage_type", "host_networking", "host_networking_topology", "host_network_card_count",
    "accelerators_per_node", "accelerator_model_name", "accelerator_memory_capacity",
    "accelerator_memory_configuration", "accelerator_frequency", "accelerator_host_interconnect",
    "accelerator_interconnect", "accelerator_interconnect_topology", "accelerator_on-chip_memories", "framework",
    "operating_system", "other_software_stack", "system_type", "system_type_detail", "cooling", "hw_notes", "sw_notes",
)
# The checker rejects these when empty (unless --skip-meaningful-fields-emptiness-check).
SYSTEM_DESC_NONEMPTY_FIELDS: tuple[str, ...] = (
    "division", "submitter", "system_type", "status", "system_name", "number_of_nodes", "host_processor_model_name",
    "host_processors_per_node", "host_processor_core_count", "host_memory_capacity", "host_memory_configuration",
    "host_storage_capacity", "host_storage_type", "host_networking", "host_network_card_count",
    "host_networking_topology", "accelerators_per_node", "accelerator_model_name", "accelerator_memory_capacity",
    "accelerator_host_interconnect", "accelerator_memory_configuration", "accelerator_interconnect", "cooling",
    "framework", "operating_system", "other_software_stack",
)


def _software_stack() -> str:
    versions = []
    for dist in ("diffusers", "transformers", "mlcommons-loadgen", "open_clip_torch"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join([f"Python {platform.python_version()}", *versions])


def system_description(report: dict[str, Any] | None = None, data_dir: str | Path = ".",
                       **overrides: Any) -> dict[str, Any]:
    """The MLPerf ``systems/<id>.json`` fields, filled from detection; what cannot be detected stays ''."""
    report = report or machine_report(data_dir, optional=False)
    cpu = report.get("cpu") or {**cpu_topology(), "frequency_mhz": cpu_frequency_mhz(), "caches": cpu_caches()}
    gpu_list, disk = report.get("gpus", []), report.get("disk") or disk_info(data_dir)
    runtime = f"CUDA {report['cuda']}" if report.get("cuda") else (f"ROCm {report['hip']}" if report.get("hip") else "")
    ports = report.get("network") if "network" in report else network_interfaces()
    first = gpu_list[0] if gpu_list else {}
    desc: dict[str, Any] = dict.fromkeys(SYSTEM_DESC_REQUIRED_FIELDS, "")
    desc.update({
        "division": "open", "status": "available", "system_type": "datacenter", "number_of_nodes": 1,
        "system_name": f"{report.get('hostname', '')} ({len(gpu_list)}x {first.get('name', 'CPU')})",
        "host_processor_model_name": report.get("cpu_model", ""),
        "host_processors_per_node": cpu.get("sockets", 1), "host_processor_core_count": cpu.get("cores_per_socket", 0),
        "host_processor_frequency": f"{cpu['frequency_mhz']:.0f} MHz" if cpu.get("frequency_mhz") else "",
        "host_processor_caches": cpu.get("caches", ""),
        "host_memory_capacity": f"{report.get('memory_bytes', 0) / GiB:.0f} GB",
        "host_storage_capacity": f"{disk.get('total_bytes', 0) / 1e12:.1f} TB" if disk.get("total_bytes") else "",
        "host_storage_type": disk.get("storage", ""),
        "host_networking": ", ".join(sorted({p["kind"] + (f" {p['gbps']:g} Gb/s" if p["gbps"] else "") for p in ports})),
        "host_network_card_count": len(ports),
        "accelerators_per_node": len(gpu_list),
        "accelerator_model_name": first.get("name", "N/A"),
        "accelerator_memory_capacity": f"{first['memory_bytes'] / GiB:.0f} GB" if first else "N/A",
        "accelerator_frequency": f"{first['clock_mhz']} MHz" if first.get("clock_mhz") else "",
        "accelerator_host_interconnect": f"PCIe {first['pcie']}" if first.get("pcie") else "",
        "framework": f"PyTorch {report.get('torch', '')}" + (f", {runtime}" if runtime else ""),
        "operating_system": report.get("distribution") or report.get("os", ""),
        "other_software_stack": ", ".join(filter(None, [_software_stack(), report.get("gpu_driver", "")])),
        "sw_notes": "sccsdxl kit (MLPerf reference SDXL pipeline)",
    })
    desc.update(overrides)
    return desc


def missing_system_fields(desc: dict[str, Any]) -> list[str]:
    """Fields the submission checker requires to be non-empty that are still empty: the team fills these in."""
    return [k for k in SYSTEM_DESC_NONEMPTY_FIELDS if desc.get(k) in ("", None)]
