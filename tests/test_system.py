"""Machine detection: works without vendor tools, reports what blocks the benchmark, feeds the MLPerf system JSON."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from sccsdxl import system as S

OLD_KEYS = {"hostname", "os", "python", "cpu_model", "cpu_cores", "memory_bytes", "gpus", "torch", "cuda", "hip"}


def fake_gpu(name: str = "NVIDIA H100 NVL", memory: int = 94 * S.GiB):
    return SimpleNamespace(name=name, total_memory=memory, major=9, minor=0, multi_processor_count=132,
                           gcnArchName="", clock_rate=1_785_000, memory_clock_rate=2_619_000, memory_bus_width=6144,
                           pci_domain_id=0, pci_bus_id=0x41, pci_device_id=0)


@pytest.fixture
def two_gpus(monkeypatch, tmp_path):
    """torch sees two GPUs; sysfs reports their PCIe link."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: fake_gpu())
    node = tmp_path / "pci" / "0000:41:00.0"
    node.mkdir(parents=True)
    (node / "current_link_speed").write_text("32.0 GT/s PCIe\n")
    (node / "current_link_width").write_text("16\n")
    monkeypatch.setattr(S, "SYS_PCI", tmp_path / "pci")


def test_describe_machine_keeps_its_keys():
    machine = S.describe_machine()
    assert OLD_KEYS <= set(machine) and "gpu_driver" in machine
    assert machine["cpu_cores"] >= 1 and machine["memory_bytes"] > 0


def test_gpus_are_described_from_torch(two_gpus):
    found = S.gpus()
    assert len(found) == 2 and found[1]["index"] == 1
    gpu = found[0]
    assert gpu["name"] == "NVIDIA H100 NVL" and gpu["arch"] == "sm_90" and gpu["capability"] == "9.0"
    assert gpu["clock_mhz"] == 1785 and gpu["pcie"] == "32.0 GT/s PCIe x16"


def test_rocm_arch_name_is_used(monkeypatch):
    torch = pytest.importorskip("torch")
    props = fake_gpu("AMD Instinct MI300X")
    props.gcnArchName = "gfx942:sramecc+:xnack-"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(S, "SYS_PCI", S.Path("/nonexistent"))
    assert S.gpus()[0]["arch"].startswith("gfx942") and S.gpus()[0]["pcie"] == ""


def test_driver_version_from_procfs_sysfs_or_optional_tools(monkeypatch):
    files = {"/proc/driver/nvidia/version": "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar 5"}
    monkeypatch.setattr(S, "_read", lambda path: files.get(str(path), ""))
    monkeypatch.setattr(S.shutil, "which", lambda tool: None)
    assert S.gpu_driver_version() == "NVIDIA 550.54.15"
    files.clear()
    files["/sys/module/amdgpu/version"] = "6.7.0"
    assert S.gpu_driver_version() == "amdgpu 6.7.0"
    files.clear()
    assert S.gpu_driver_version() == ""  # no driver files and no nvidia-smi / rocm-smi: empty, no error
    monkeypatch.setattr(S, "_run", lambda cmd, timeout=5.0: "Driver version: 6.8.5" if cmd[0] == "rocm-smi" else "")
    assert S.gpu_driver_version() == "amdgpu 6.8.5"


def test_missing_tool_is_not_an_error():
    assert S._run(["surely-not-a-real-tool-sccsdxl"]) == ""


def test_packages_are_really_imported(monkeypatch, tmp_path):
    (tmp_path / "broken_pkg_sccsdxl.py").write_text("raise RuntimeError('compiled for another CUDA')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = S.package_status((("json", "json", "std"), ("broken_pkg_sccsdxl", "broken", "x"),
                             ("no_such_module_sccsdxl", "no-such-dist", "y")))
    ok, broken, absent = rows
    assert ok["imports"] and ok["error"] == ""
    assert not broken["imports"] and broken["error"] == "RuntimeError: compiled for another CUDA"
    assert not absent["imports"] and absent["version"] == "" and "ModuleNotFoundError" in absent["error"]
    sys.modules.pop("broken_pkg_sccsdxl", None)


def test_disk_is_checked_where_the_data_will_go(tmp_path):
    info = S.disk_info(tmp_path / "not" / "yet" / "created")
    assert info["checked_at"] == str(tmp_path) and info["free_bytes"] > 0 and info["total_bytes"] >= info["free_bytes"]
    assert S.storage_kind("server:/export", "nfs4") == "network (nfs4)"
    assert S.storage_kind("", "tmpfs") == "tmpfs"


def test_cpu_and_network_probes_are_sane():
    topo = S.cpu_topology()
    assert topo["logical_cpus"] >= topo["cores"] >= 1 and topo["sockets"] >= 1
    for port in S.network_interfaces():
        assert port["kind"] in ("Ethernet", "InfiniBand") and port["gbps"] >= 0


def test_report_lists_what_blocks_the_benchmark(monkeypatch, tmp_path):
    monkeypatch.setattr(S, "package_status", lambda packages=S.REQUIRED_PACKAGES: [
        {"module": "torch", "package": "torch", "version": "2.4", "imports": True, "error": "", "purpose": ""},
        {"module": "mlperf_loadgen", "package": "mlcommons-loadgen", "version": "", "imports": False,
         "error": "ModuleNotFoundError: No module named 'mlperf_loadgen'", "purpose": ""}])
    monkeypatch.setattr(S, "gpus", lambda: [])
    report = S.machine_report(tmp_path, disk_needed_bytes=10 ** 18)
    problems = " | ".join(report["problems"])
    assert "no GPU" in problems and "pip install mlcommons-loadgen" in problems
    assert "free, the missing assets need" in problems
    table = S.machine_table(report)
    assert {"GPU driver", "RAM", "data disk", "GPUs"} <= set(table["item"])
    assert "required" in set(S.package_table(report)["needed"])


def test_report_with_gpus_has_no_gpu_problem(two_gpus, monkeypatch, tmp_path):
    monkeypatch.setattr(S, "package_status", lambda packages=S.REQUIRED_PACKAGES: [])
    report = S.machine_report(tmp_path)
    assert report["problems"] == [] and len(report["gpus"]) == 2
    assert "GPU 1" in set(S.machine_table(report)["item"])


def test_system_description_has_every_checker_field(two_gpus, monkeypatch, tmp_path):
    monkeypatch.setattr(S, "package_status", lambda packages=S.REQUIRED_PACKAGES: [])
    desc = S.system_description(S.machine_report(tmp_path), submitter="TeamX", cooling="air")
    assert set(S.SYSTEM_DESC_REQUIRED_FIELDS) <= set(desc)
    assert set(S.SYSTEM_DESC_NONEMPTY_FIELDS) <= set(S.SYSTEM_DESC_REQUIRED_FIELDS)
    assert desc["submitter"] == "TeamX" and desc["status"] == "available" and desc["number_of_nodes"] == 1
    assert desc["accelerators_per_node"] == 2 and desc["accelerator_model_name"] == "NVIDIA H100 NVL"
    assert desc["accelerator_memory_capacity"] == "94 GB" and desc["accelerator_host_interconnect"].startswith("PCIe 32.0")
    assert desc["framework"].startswith("PyTorch ")
    missing = S.missing_system_fields(desc)
    assert "submitter" not in missing and "cooling" not in missing and "host_memory_configuration" in missing
