"""sccsdxl.power: what a run records of the GPUs' energy, power and clocks. On the CPU through a stand-in for NVML
that behaves as a power-capped GPU does (the counter, the readings, the reason bits); on a GPU through the real one."""
import time

import pytest
import torch

from sccsdxl import power


class FakeNvml:
    """NVML's calls that the monitor makes, for one GPU drawing ``watts`` at ``mhz`` with the power cap on."""

    def __init__(self, watts=690.0, mhz=1630, reasons=power.SW_POWER_CAP, counter=True, new_names=True):
        self.watts, self.mhz, self.reasons, self.counter = watts, mhz, reasons, counter
        self.started = time.perf_counter()
        if new_names:
            self.nvmlDeviceGetCurrentClocksEventReasons = lambda handle: self.reasons
        else:
            self.nvmlDeviceGetCurrentClocksThrottleReasons = lambda handle: self.reasons

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        if index == 1:
            raise RuntimeError("NVML_ERROR_NO_PERMISSION")  # a GPU of the node this process may not open
        return "handle"

    def nvmlDeviceGetUUID(self, handle):
        return b"GPU-58d9e2b8-AB01-0000-0000-000000000001"

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H200"

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000  # mW

    def nvmlDeviceGetMaxClockInfo(self, handle, clock):
        return 1980

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.counter:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return int(1_000_000 + self.watts * (time.perf_counter() - self.started) * 1000)  # mJ

    def nvmlDeviceGetPowerUsage(self, handle):
        return int(self.watts * 1000)  # mW

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return self.mhz


GPU_UUID = "58d9e2b8-ab01-0000-0000-000000000001"  # torch's form of the stand-in GPU's uuid


def watch_for(seconds: float, nvml, uuids=(GPU_UUID, "58d9e2b8-0000")) -> power.PowerMonitor:
    with power.PowerMonitor(list(uuids), period_s=0.01, nvml=nvml) as watch:
        time.sleep(seconds)
    return watch


def test_a_power_capped_gpu_is_recorded_with_its_energy_from_the_counter():
    record = watch_for(0.3, FakeNvml()).summary(samples=10)
    (gpu,) = record["gpus"]  # found by torch's form of its uuid; the uuid NVML does not know is left out
    assert gpu["name"] == "NVIDIA H200" and gpu["energy_from"] == "counter"
    assert gpu["energy_j"] == pytest.approx(690 * record["seconds"], rel=0.1)
    assert gpu["mean_power_w"] == pytest.approx(690, rel=0.1) and gpu["max_power_w"] == 690
    assert gpu["power_limit_w"] == 700 and (gpu["mean_sm_mhz"], gpu["max_sm_mhz"]) == (1630, 1980)
    assert gpu["power_capped_share"] == 1 and gpu["heat_slowed_share"] == 0
    assert gpu["samples"] >= 5  # sampled on the thread while the run lasted
    assert record["joules_per_sample"] == pytest.approx(record["energy_j"] / 10, abs=0.01)
    line = power.describe(record)
    assert "J per sample" in line and "1630/1980 MHz" in line and "100% of the samples" in line


def test_without_an_energy_counter_the_energy_is_mean_power_times_time():
    record = watch_for(0.2, FakeNvml(watts=300.0, reasons=0, counter=False, new_names=False)).summary()
    (gpu,) = record["gpus"]
    assert gpu["energy_from"] == "samples"
    assert gpu["energy_j"] == pytest.approx(300 * record["seconds"], rel=0.01)
    assert gpu["power_capped_share"] == 0 and record["joules_per_sample"] is None


def test_uuids_match_in_nvmls_form_and_torchs():
    assert power.plain_uuid(b"GPU-58D9E2B8-ab01-0000") == power.plain_uuid("58d9e2b8-ab01-0000") == "58d9e2b8ab010000"


def test_a_gpu_slowed_for_heat_is_told_apart_from_the_power_cap():
    gpu = watch_for(0.05, FakeNvml(reasons=power.HW_THERMAL_SLOWDOWN)).summary()["gpus"][0]
    assert gpu["heat_slowed_share"] == 1 and gpu["power_capped_share"] == 0


def test_no_gpu_nvml_can_find_means_no_record_and_no_failure():
    assert watch_for(0.02, FakeNvml(), uuids=("58d9e2b8-0000",)).summary(samples=5) is None
    assert power.describe(None).startswith("no GPU power record")
    # and where NVML cannot start at all (this CPU machine has no NVIDIA driver library), nothing fails either
    if power.load_nvml() is None:
        with power.PowerMonitor([GPU_UUID]) as watch:
            pass
        assert watch.summary(samples=5) is None


@pytest.mark.skipif(not torch.cuda.is_available() or power.load_nvml() is None,
                    reason="needs an NVIDIA GPU and NVML (run on the H200)")
def test_the_gpu_this_process_uses_is_measured_while_it_works():
    uuids = power.visible_gpu_uuids()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    with power.PowerMonitor(uuids[:1], period_s=0.1) as watch:
        deadline = time.perf_counter() + 2.0
        while time.perf_counter() < deadline:
            a = (a @ a).clamp_(-1, 1)
            torch.cuda.synchronize()
    record = watch.summary(samples=1)
    (gpu,) = record["gpus"]
    assert "NVIDIA" in gpu["name"] and gpu["samples"] >= 10
    assert 0 < gpu["mean_power_w"] <= gpu["power_limit_w"] * 1.2
    assert 0 < gpu["mean_sm_mhz"] <= gpu["max_sm_mhz"]
    assert record["joules_per_sample"] == record["energy_j"] > 0
