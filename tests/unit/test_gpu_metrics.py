"""The NVML collector. Without an NVIDIA GPU here, the GPU-present path runs against a
stand-in for the ``pynvml`` module (a fake where the real library cannot run); the
GPU-absent path runs against the real nvidia-ml-py, which finds no driver."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from facestage.metrics import GPU_METRIC_NAMES, GpuCollector


class _Memory:
    used, total = 3 * 2**30, 80 * 2**30


class _Rates:
    gpu = 42


class _Process:
    def __init__(self, pid: int, used: int) -> None:
        self.pid, self.usedGpuMemory = pid, used


def fake_nvml(pid: int) -> types.ModuleType:
    module: Any = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    module.NVMLError = NVMLError
    module.nvmlInit = lambda: None
    module.nvmlDeviceGetCount = lambda: 2
    module.nvmlDeviceGetHandleByIndex = lambda index: index
    module.nvmlDeviceGetUUID = lambda handle: f"GPU-{handle}"

    def rates(handle: int) -> _Rates:
        if handle == 1:  # a MIG slice: no utilisation counter
            raise NVMLError("not supported")
        return _Rates()

    module.nvmlDeviceGetUtilizationRates = rates
    module.nvmlDeviceGetMemoryInfo = lambda handle: _Memory()
    module.nvmlDeviceGetComputeRunningProcesses = lambda handle: (
        [_Process(pid, 2**30), _Process(pid + 1, 5)] if handle == 0 else [_Process(7, 9)]
    )
    return module


def samples(collector: GpuCollector) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {
        family.name: [(dict(s.labels), s.value) for s in family.samples]
        for family in collector.collect()
    }


def test_gpu_series_per_device_read_at_scrape_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(os.getpid()))
    got = samples(GpuCollector("swapper"))
    assert set(got) == set(GPU_METRIC_NAMES)
    assert got["facestage_gpu_available"] == [({"stage": "swapper"}, 1.0)]
    assert got["facestage_gpu_utilization_ratio"] == [
        ({"stage": "swapper", "gpu": "0", "uuid": "GPU-0"}, 0.42)
    ]  # GPU 1 (MIG) has no utilisation series rather than a fake 0
    assert [v for _, v in got["facestage_gpu_memory_total_bytes"]] == [80 * 2**30] * 2
    assert [v for _, v in got["facestage_gpu_memory_used_bytes"]] == [3 * 2**30] * 2
    # Only this process's memory on GPU 0; on GPU 1 NVML lists another PID (host PIDs).
    assert got["facestage_process_gpu_memory_bytes"] == [
        ({"stage": "swapper", "gpu": "0", "uuid": "GPU-0"}, float(2**30))
    ]


def test_without_a_gpu_only_the_availability_gauge_is_exported() -> None:
    got = samples(GpuCollector("detector"))  # the real nvidia-ml-py: no driver here
    assert got == {"facestage_gpu_available": [({"stage": "detector"}, 0.0)]}
