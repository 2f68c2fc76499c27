"""The deploy/ files against live processes: every metric name the dashboard, the rules
and the autoscaler read is exported by a running stage or orchestrator, and a real
Prometheus (Debian's package) scraping a live local suite answers the throughput and
latency queries while a job runs."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
import yaml

from facestage.common.v1 import common_pb2
from facestage.local_suite import StageProcess, free_port, local_stages, start_orchestrator
from facestage.metrics import GPU_METRIC_NAMES
from facestage.swap.v1 import swap_pb2, swap_pb2_grpc
from tests.deploy.helpers import RULE_FILES, metric_names_used
from tests.media import make_test_video
from tests.metric_names import exported_families, family_name, scrape

pytestmark = [pytest.mark.shared_models, pytest.mark.slow]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def suite(
    scrfd_2_5g_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, StageProcess]]:
    """Four stage processes and ``facestage serve`` in front, all on loopback."""
    from facestage.fixtures import write_contract_fixtures

    tmp = tmp_path_factory.mktemp("live")
    fixtures = write_contract_fixtures(tmp / "fixtures")
    models = {
        "detector": scrfd_2_5g_path,
        "embedder": fixtures["arcface"],
        "swapper": fixtures["inswapper"],
        "enhancer": fixtures["gfpgan"],
    }
    with local_stages(
        models,  # type: ignore[arg-type]
        extra_args={s: ["--providers", "cpu"] for s in models},  # type: ignore[misc]
        log_dir=tmp,
    ) as stages:
        orchestrator = start_orchestrator(
            {stage: p.address for stage, p in stages.items()}, log_dir=tmp
        )
        try:
            orchestrator.wait_serving(120)
            yield {**stages, "orchestrator": orchestrator}
        finally:
            orchestrator.stop()


def source_image() -> common_pb2.Image:
    from skimage import data

    ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(data.astronaut()[..., ::-1]))
    assert ok
    return common_pb2.Image(encoded=jpeg.tobytes())


def run_video_job(address: str, video: Path, enhance: bool) -> int:
    """One SwapVideo job; returns the frames in the result."""

    def requests() -> Iterator[swap_pb2.SwapVideoRequest]:
        yield swap_pb2.SwapVideoRequest(
            config=swap_pb2.SwapVideoConfig(
                source_images=[source_image()], options=swap_pb2.SwapOptions(enhance=enhance)
            )
        )
        yield swap_pb2.SwapVideoRequest(chunk=video.read_bytes())

    frames = 0
    with grpc.insecure_channel(address) as channel:
        for reply in swap_pb2_grpc.FaceSwapServiceStub(channel).SwapVideo(requests(), timeout=600):
            if reply.WhichOneof("message") == "result":
                frames = reply.result.frames_total
    return frames


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory, t1_bgr: np.ndarray) -> Path:
    return make_test_video(
        tmp_path_factory.mktemp("video") / "t1.mp4",
        frame_source=t1_bgr,
        seconds=3,
        fps=25,
        size=(320, 240),
    )


def test_every_metric_that_deploy_reads_is_exported_by_a_live_process(
    suite: dict[str, StageProcess], video: Path
) -> None:
    assert run_video_job(suite["orchestrator"].address, video, enhance=True) == 75
    exported: set[str] = set()
    for process in suite.values():
        families = exported_families(scrape(f"http://127.0.0.1:{process.metrics_port}/metrics"))
        exported |= {name for name, samples in families.items() if samples}
    used = metric_names_used()
    assert used, "no metric names found in deploy/"
    # Per-GPU series need an NVIDIA GPU; tests/unit/test_gpu_metrics.py checks the
    # collector emits exactly these names, and without a GPU they are absent by design.
    gpu_only = set(GPU_METRIC_NAMES) - {"facestage_gpu_available"}
    missing = sorted(n for n in used - gpu_only if family_name(n) not in exported)
    assert missing == [], f"deploy/ reads metrics no live process exports: {missing}"
    assert used & gpu_only <= set(GPU_METRIC_NAMES)


def prometheus_query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


@contextlib.contextmanager
def prometheus(targets: list[str], tmp: Path) -> Iterator[int]:
    """Debian's Prometheus on loopback, scraping ``targets`` every second with our rules."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (.ci/install-deploy-tools.sh installs it)")
    rules = []
    for path in RULE_FILES:
        copy = tmp / path.name
        copy.write_text(path.read_text())
        rules.append(str(copy))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": rules,
        "scrape_configs": [{"job_name": "facestage", "static_configs": [{"targets": targets}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1)
                break
            time.sleep(0.2)
        else:
            pytest.fail("prometheus did not become ready: " + (tmp / "prometheus.log").read_text())
        yield port
    finally:
        process.terminate()
        process.wait(20)
        log.close()


def test_prometheus_scrapes_the_suite_and_answers_throughput_and_latency_during_a_job(
    suite: dict[str, StageProcess], video: Path, tmp_path: Path
) -> None:
    targets = [f"127.0.0.1:{p.metrics_port}" for p in suite.values()]
    queries = {
        "detector throughput": 'rate(facestage_items_processed_total{stage="detector"}[5s])',
        "swapper p95 latency": "histogram_quantile(0.95, sum by (le) (rate("
        'facestage_request_duration_seconds_bucket{stage="swapper"}[5s])))',
        "orchestrator fps": "facestage_orchestrator_frames_per_second",
        "recorded stage latency": "stage:facestage_request_duration_seconds:p95_5m",
    }
    with prometheus(targets, tmp_path) as port:
        time.sleep(2)  # a first scrape before the job, so rates have a baseline
        job_frames: list[int] = []
        job = threading.Thread(
            target=lambda: job_frames.append(
                run_video_job(suite["orchestrator"].address, video, enhance=False)
            )
        )
        job.start()
        seen: dict[str, float] = {}
        while job.is_alive() and len(seen) < len(queries):
            for name, expr in queries.items():
                values = [float(r["value"][1]) for r in prometheus_query(port, expr)]
                values = [v for v in values if v == v and v > 0]  # drop NaN and zeros
                if values and name not in seen:
                    seen[name] = max(values)
            time.sleep(0.5)
        job.join(600)
        up = prometheus_query(port, "up")
    assert job_frames == [75]
    assert sorted(seen) == sorted(queries), f"answered while the job ran: {seen}"
    assert len(up) == 5 and all(r["value"][1] == "1" for r in up)
