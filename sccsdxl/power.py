"""The GPUs' energy, power and clocks while a loadgen run lasts, read through NVML (the nvidia-ml-py package).

On an H200 at batch 50 the kit's fastest configuration draws the GPU's whole 700 W limit, and the driver holds the SM
clock near 1,630 of its 1,980 MHz (BENCHMARKS.md, session 16). A GPU held at its power cap turns energy into images:
joules per sample then sets samples per second, and a Student Cluster Competition team under a power budget needs
both. Each performance and accuracy run records, per GPU this process sees: the energy (the driver's counter where
the GPU has one, else mean power x time), mean and largest power, the power limit, the SM clock, and how much of the
run the driver slowed the clock for power or heat. NVIDIA GPUs only: elsewhere, or without the driver's library,
a run has no power record and nothing fails.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

# NVML's clock-event reason bits (nvmlClocksEventReason*, formerly *ThrottleReason*)
SW_POWER_CAP = 0x4
HW_SLOWDOWN = 0x8
SW_THERMAL_SLOWDOWN = 0x20
HW_THERMAL_SLOWDOWN = 0x40
HW_POWER_BRAKE = 0x80
POWER_REASONS = SW_POWER_CAP | HW_POWER_BRAKE
HEAT_REASONS = SW_THERMAL_SLOWDOWN | HW_THERMAL_SLOWDOWN | HW_SLOWDOWN
NVML_CLOCK_SM = 1  # nvml.NVML_CLOCK_SM


def load_nvml():
    """pynvml, initialised, or None where NVML cannot start (no package, no NVIDIA driver: CPU machines, ROCm)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - ImportError or NVMLError (library not found, driver not loaded, ...)
        return None
    return pynvml


def visible_gpu_uuids() -> list[str]:
    """The UUIDs of the GPUs torch sees here: NVML lists every GPU of the node and ignores CUDA_VISIBLE_DEVICES, so
    a run measures only the GPUs it can use."""
    import torch

    if not torch.cuda.is_available() or torch.version.hip is not None:
        return []
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def plain_uuid(uuid: str | bytes) -> str:
    """NVML's 'GPU-58d9e2b8-...' and torch's '58d9e2b8-...' alike: the hex digits only, in lower case."""
    text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    return re.sub(r"[^0-9a-f]", "", text.lower().removeprefix("gpu-"))


@dataclass
class _Watched:
    """One GPU under watch: its handle, fixed facts and the samples taken (power W, SM MHz, reason bits)."""

    handle: object
    name: str
    power_limit_w: float
    max_sm_mhz: int
    energy_start_mj: int | None
    energy_end_mj: int | None = None
    samples: list[tuple[float, int, int]] = field(default_factory=list)


class PowerMonitor:
    """``with PowerMonitor(uuids) as watch: <run>`` then ``watch.summary(samples)``: samples each GPU's power, SM
    clock and clock-event reasons every ``period_s`` on a thread, and reads its energy counter at both ends."""

    def __init__(self, uuids: list[str] | None = None, period_s: float = 0.5, nvml=None):
        self.uuids, self.period_s, self.nvml = uuids, period_s, nvml
        self.gpus: list[_Watched] = []
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PowerMonitor:
        self.nvml = self.nvml or load_nvml()
        if self.nvml is not None:
            self.gpus = [gpu for gpu in map(self._watch, self._handles()) if gpu is not None]
        self._started = time.perf_counter()
        if self.gpus:
            self._thread = threading.Thread(target=self._sample_until_stopped, name="sccsdxl-power", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.seconds = time.perf_counter() - self._started
        for gpu in self.gpus:
            self._sample(gpu)  # a short run still gets a sample
            gpu.energy_end_mj = self._energy_mj(gpu.handle)

    def _handles(self) -> list:
        """NVML's handles of the GPUs named by ``uuids`` (all of them if None), in that order."""
        nvml = self.nvml
        every = {}
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                every[plain_uuid(nvml.nvmlDeviceGetUUID(handle))] = handle
            except Exception:  # noqa: BLE001 - a GPU NVML cannot open is left out of the record
                continue
        if self.uuids is None:
            return list(every.values())
        return [every[uuid] for uuid in map(plain_uuid, self.uuids) if uuid in every]

    def _watch(self, handle) -> _Watched | None:
        nvml = self.nvml
        try:
            name = nvml.nvmlDeviceGetName(handle)
            return _Watched(handle=handle, name=name.decode() if isinstance(name, bytes) else str(name),
                            power_limit_w=nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000,
                            max_sm_mhz=int(nvml.nvmlDeviceGetMaxClockInfo(handle, NVML_CLOCK_SM)),
                            energy_start_mj=self._energy_mj(handle))
        except Exception:  # noqa: BLE001 - a GPU that cannot report power (some virtual GPUs) has no record
            return None

    def _energy_mj(self, handle) -> int | None:
        """The driver's energy counter (mJ since it loaded; Volta and later), or None where there is none."""
        try:
            return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        except Exception:  # noqa: BLE001 - not supported on this GPU
            return None

    def _reasons(self, handle) -> int:
        nvml = self.nvml
        read = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            nvml.nvmlDeviceGetCurrentClocksThrottleReasons  # the older name
        return int(read(handle))

    def _sample(self, gpu: _Watched) -> None:
        nvml = self.nvml
        try:
            gpu.samples.append((nvml.nvmlDeviceGetPowerUsage(gpu.handle) / 1000,
                                int(nvml.nvmlDeviceGetClockInfo(gpu.handle, NVML_CLOCK_SM)), self._reasons(gpu.handle)))
        except Exception:  # noqa: BLE001 - a failed read is a missing sample, not a failed run
            pass

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.period_s):
            for gpu in self.gpus:
                self._sample(gpu)

    def summary(self, samples: int | None = None) -> dict | None:
        """The run's record: per GPU and in total; joules per sample when ``samples`` (images served) is given."""
        gpus = [_gpu_summary(gpu, self.seconds) for gpu in self.gpus if gpu.samples]
        if not gpus:
            return None
        energy = sum(g["energy_j"] for g in gpus)
        return {"seconds": round(self.seconds, 3), "gpus": gpus, "energy_j": round(energy, 1),
                "mean_power_w": round(energy / self.seconds, 1) if self.seconds else None,
                "joules_per_sample": round(energy / samples, 2) if samples else None}


def _gpu_summary(gpu: _Watched, seconds: float) -> dict:
    powers = [p for p, _, _ in gpu.samples]
    clocks = [c for _, c, _ in gpu.samples]
    counted = gpu.energy_start_mj is not None and gpu.energy_end_mj is not None
    energy = (gpu.energy_end_mj - gpu.energy_start_mj) / 1000 if counted else sum(powers) / len(powers) * seconds
    def share(bits: int) -> float:
        """The share of samples in which the driver gave one of these reasons for holding the clock down."""
        return round(sum(1 for *_, reasons in gpu.samples if reasons & bits) / len(gpu.samples), 3)

    return {"name": gpu.name, "energy_j": round(energy, 1), "energy_from": "counter" if counted else "samples",
            "mean_power_w": round(energy / seconds, 1) if seconds else None, "max_power_w": round(max(powers), 1),
            "power_limit_w": round(gpu.power_limit_w, 1), "mean_sm_mhz": round(sum(clocks) / len(clocks)),
            "min_sm_mhz": min(clocks), "max_sm_mhz": gpu.max_sm_mhz, "power_capped_share": share(POWER_REASONS),
            "heat_slowed_share": share(HEAT_REASONS), "samples": len(gpu.samples)}


def describe(record: dict | None) -> str:
    """One line for notebooks and logs: total energy, power and clock, and whether the power cap held the clock."""
    if not record:
        return "no GPU power record (needs an NVIDIA GPU and its driver's NVML library)"
    clock = ", ".join(f"{g['mean_sm_mhz']}/{g['max_sm_mhz']} MHz" for g in record["gpus"])
    capped = max(g["power_capped_share"] for g in record["gpus"])
    per_sample = f", {record['joules_per_sample']} J per sample" if record.get("joules_per_sample") else ""
    return (f"{len(record['gpus'])} GPU(s): {record['energy_j']:.0f} J in {record['seconds']:.0f} s, "
            f"{record['mean_power_w']} W{per_sample}; SM clock {clock}; held by the power cap in "
            f"{capped:.0%} of the samples")
