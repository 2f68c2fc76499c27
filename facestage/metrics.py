"""Prometheus metrics of every facestage process; names documented in docs/metrics.md.

Metric objects live in the default registry, created once per process. Every series
carries ``stage`` (the role of the process), so several in-process servers of different
stages (as in tests) stay apart. GPU series come from NVML at scrape time through
:class:`GpuCollector`; without an NVIDIA GPU they are absent and
``facestage_gpu_available`` is 0.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# `_created` series double the scrape size and no dashboard or rule reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter(
    "facestage_requests",
    "RPCs finished, by method and gRPC status code.",
    ["stage", "method", "code"],
)
REQUEST_DURATION = Histogram(
    "facestage_request_duration_seconds",
    "Wall time of an RPC in the server.",
    ["stage", "method"],
    buckets=_LATENCY_BUCKETS,
)
REQUESTS_IN_FLIGHT = Gauge(
    "facestage_requests_in_flight", "RPCs being handled now.", ["stage", "method"]
)
ITEMS_PROCESSED = Counter(
    "facestage_items_processed",
    "Items through the model: images, faces or crops.",
    ["stage"],
)
BATCH_SIZE = Histogram(
    "facestage_batch_size",
    "Items per inference batch after dynamic batching.",
    ["stage"],
    buckets=_BATCH_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "facestage_inference_duration_seconds",
    "Time of one batched model call, pre- and post-processing included.",
    ["stage", "model"],
    buckets=_LATENCY_BUCKETS,
)
BATCHER_QUEUE_DEPTH = Gauge(
    "facestage_batcher_queue_depth", "Items waiting in the dynamic batcher.", ["stage"]
)
MODEL_INFO = Gauge(
    "facestage_model_info",
    "The loaded model and the execution provider in use (always 1).",
    ["stage", "model", "provider", "precision", "sha256"],
)
SERVING = Gauge("facestage_serving", "1 while health reports SERVING, else 0.", ["stage"])

ORCH_FRAMES = Counter("facestage_orchestrator_frames", "Frames written to outputs.", ["stage"])
ORCH_FPS = Gauge(
    "facestage_orchestrator_frames_per_second",
    "Frames per second over all running jobs, recent average.",
    ["stage"],
)
ORCH_FACES_SWAPPED = Counter(
    "facestage_orchestrator_faces_swapped", "Faces swapped into outputs.", ["stage"]
)
ORCH_STAGE_CALL_DURATION = Histogram(
    "facestage_orchestrator_stage_call_duration_seconds",
    "Latency of calls to a stage service as the orchestrator sees it.",
    ["stage", "target_stage"],
    buckets=_LATENCY_BUCKETS,
)
ORCH_STAGE_BYTES_SENT = Counter(
    "facestage_orchestrator_stage_bytes_sent",
    "Request bytes sent to a stage service.",
    ["stage", "target_stage"],
)
ORCH_QUEUE_DEPTH = Gauge(
    "facestage_orchestrator_queue_depth",
    "Batches waiting between pipeline steps.",
    ["stage", "queue"],
)
ORCH_JOBS_IN_PROGRESS = Gauge(
    "facestage_orchestrator_jobs_in_progress", "Jobs running now.", ["stage", "kind"]
)
ORCH_JOBS = Counter(
    "facestage_orchestrator_jobs",
    "Jobs finished, by kind and end state.",
    ["stage", "kind", "state"],
)


GPU_METRIC_NAMES = (
    "facestage_gpu_available",
    "facestage_gpu_utilization_ratio",
    "facestage_gpu_memory_used_bytes",
    "facestage_gpu_memory_total_bytes",
    "facestage_process_gpu_memory_bytes",
)
"""Every series :class:`GpuCollector` can export (per-GPU ones only with a GPU)."""


class GpuCollector(Collector):
    """Reads GPU utilisation and memory from NVML at every scrape (nvidia-ml-py).

    NVML is initialised lazily and once; when it cannot be (no driver, no GPU) only
    ``facestage_gpu_available 0`` is exported, never zeros that look like an idle GPU.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._init_error: str | None = None

    def _init(self) -> Any:
        with self._lock:
            if self._nvml is None and self._init_error is None:
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._nvml = pynvml
                except Exception as exc:  # NVMLError, ImportError, missing libnvidia-ml
                    self._init_error = str(exc)
                    log.info("GPU metrics unavailable: %s", exc)
            return self._nvml

    def describe(self) -> Iterator[Metric]:
        """Names only, so registration does not touch NVML."""
        yield GaugeMetricFamily("facestage_gpu_available", "1 when NVML sees a GPU.")

    def collect(self) -> Iterator[Metric]:
        """One reading per GPU; absent series when NVML is unavailable."""
        available = GaugeMetricFamily(
            "facestage_gpu_available", "1 when NVML sees a GPU, else 0.", labels=["stage"]
        )
        nvml = self._init()
        if nvml is None:
            available.add_metric([self.stage], 0.0)
            yield available
            return
        labels = ["stage", "gpu", "uuid"]
        util = GaugeMetricFamily(
            "facestage_gpu_utilization_ratio", "GPU busy ratio 0..1.", labels=labels
        )
        used = GaugeMetricFamily(
            "facestage_gpu_memory_used_bytes", "Device memory in use.", labels=labels
        )
        total = GaugeMetricFamily(
            "facestage_gpu_memory_total_bytes", "Device memory in total.", labels=labels
        )
        process = GaugeMetricFamily(
            "facestage_process_gpu_memory_bytes",
            "Device memory of this process, where NVML attributes it.",
            labels=labels,
        )
        pid = os.getpid()
        try:
            count = nvml.nvmlDeviceGetCount()
            for index in range(count):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                values = [self.stage, str(index), uuid]
                try:
                    rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                    util.add_metric(values, rates.gpu / 100.0)
                except nvml.NVMLError:  # MIG slices have no utilisation counter
                    pass
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric(values, float(memory.used))
                total.add_metric(values, float(memory.total))
                try:
                    procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                except nvml.NVMLError:
                    procs = []
                for proc in procs:
                    # In a container without the host PID namespace NVML reports host
                    # PIDs, so no entry matches and the series stays absent.
                    if proc.pid == pid and proc.usedGpuMemory is not None:
                        process.add_metric(values, float(proc.usedGpuMemory))
        except Exception as exc:  # a GPU fell off the bus mid-scrape
            log.warning("NVML read failed: %s", exc)
            available.add_metric([self.stage], 0.0)
            yield available
            return
        available.add_metric([self.stage], 1.0 if count > 0 else 0.0)
        yield available
        yield from (util, used, total, process)


_gpu_collector: GpuCollector | None = None
_collector_lock = threading.Lock()


def ensure_gpu_collector(stage: str) -> GpuCollector:
    """Registers the NVML collector once per process (the first stage names it)."""
    global _gpu_collector
    with _collector_lock:
        if _gpu_collector is None:
            _gpu_collector = GpuCollector(stage)
            REGISTRY.register(_gpu_collector)
        return _gpu_collector


def start_metrics_server(host: str, port: int, stage: str) -> int | None:
    """Serves /metrics on ``host:port`` in a daemon thread; returns the bound port.

    ``port`` -1 disables the server; 0 picks a free port.
    """
    ensure_gpu_collector(stage)
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=host)
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
