"""StageClients against real stage servers on loopback: in-process servers with SCRFD 2.5G
and the contract fixtures (ArcFace-512, inswapper_128, GFPGAN), and two detector
processes behind one round-robin target. Fixture outputs are plumbing, not swaps."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from facestage.errors import UnavailableError
from facestage.local_suite import StageProcess, free_port, start_stage
from facestage.runtime import open_session
from facestage.server import GrpcServer
from facestage.types import Stage
from orchestrator.clients import ClientSettings, StageClients, StageTargets
from services.detector.model import DetectionOptions, load_detector

pytestmark = pytest.mark.shared_models

StageServer = Callable[..., contextlib.AbstractAsyncContextManager[tuple[GrpcServer, Any]]]


@contextlib.asynccontextmanager
async def running_suite(
    stage_server: StageServer,
    detector_model: Path,
    fixtures: dict[str, Path],
    settings: ClientSettings | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[StageClients, dict[Stage, GrpcServer]]]:
    """All four stages in process (``overrides`` applied to each) and clients to them."""
    models: dict[Stage, Path] = {
        "detector": detector_model,
        "embedder": fixtures["arcface"],
        "swapper": fixtures["inswapper"],
        "enhancer": fixtures["gfpgan"],
    }
    async with contextlib.AsyncExitStack() as stack:
        servers: dict[Stage, GrpcServer] = {}
        for stage, model in models.items():
            server, _ = await stack.enter_async_context(stage_server(stage, model, **overrides))
            servers[stage] = server
        targets = StageTargets(
            **{stage: f"127.0.0.1:{server.port}" for stage, server in servers.items()}
        )
        clients = await stack.enter_async_context(
            await StageClients.connect(targets, settings or ClientSettings())
        )
        yield clients, servers


def requests_ok(stage: str, method: str) -> float:
    """Calls of ``method`` that the in-process ``stage`` server answered OK so far."""
    value = REGISTRY.get_sample_value(
        "facestage_requests_total", {"stage": stage, "method": method, "code": "OK"}
    )
    return value or 0.0


def bytes_sent(stage: str) -> float:
    value = REGISTRY.get_sample_value(
        "facestage_orchestrator_stage_bytes_sent_total",
        {"stage": "orchestrator", "target_stage": stage},
    )
    return value or 0.0


def crops_of(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct smooth test crops (not faces)."""
    rng = np.random.default_rng(seed)
    return [
        np.asarray(
            cv2.resize(
                rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8),
                (size, size),
                interpolation=cv2.INTER_CUBIC,
            ),
            dtype=np.uint8,
        )
        for _ in range(count)
    ]


def nearest_distance(points: np.ndarray, candidates: np.ndarray) -> float:
    """Largest distance, in pixels, from each row of ``points`` to its nearest candidate."""
    return float(max(np.abs(candidates - row).max(axis=1).min() for row in points))


async def test_detect_answers_in_original_pixels_and_sends_small_frames(
    stage_server: StageServer,
    scrfd_2_5g_path: Path,
    contract_fixtures: dict[str, Path],
    t1_bgr: np.ndarray,
) -> None:
    direct = load_detector(open_session(scrfd_2_5g_path, ["cpu"]))
    expected = direct.detect([t1_bgr], DetectionOptions())[0]
    assert len(expected) == 6
    async with running_suite(stage_server, scrfd_2_5g_path, contract_fixtures) as (clients, _):
        assert clients.detector_info.input_width_px == 640
        sent_before = bytes_sent("detector")
        faces = (await clients.detect([t1_bgr]))[0]
        sent = bytes_sent("detector") - sent_before

    assert len(faces) == 6
    raw_size = t1_bgr.shape[0] * t1_bgr.shape[1] * 3
    assert t1_bgr.shape == (886, 1280, 3)
    assert 0 < sent < 0.10 * raw_size, f"{sent} bytes sent for a {raw_size}-byte frame"
    got_boxes = np.stack([face.box for face in faces])
    want_boxes = np.stack([face.box for face in expected])
    # Full-resolution coordinates: a box only right at 640-px scale would be off by ~2x.
    assert nearest_distance(want_boxes, got_boxes) <= 2.0
    assert nearest_distance(got_boxes, want_boxes) <= 2.0
    got_points = np.stack([face.landmarks.reshape(-1) for face in faces])
    want_points = np.stack([face.landmarks.reshape(-1) for face in expected])
    assert nearest_distance(want_points, got_points) <= 2.0
    assert max(float(face.box[2]) for face in faces) > 640  # right half of the frame too


async def test_detect_splits_batches_and_scales_each_frame_by_its_own_size(
    stage_server: StageServer,
    scrfd_2_5g_path: Path,
    contract_fixtures: dict[str, Path],
    t1_bgr: np.ndarray,
) -> None:
    half = np.asarray(cv2.resize(t1_bgr, (640, 443), interpolation=cv2.INTER_AREA))
    blank = np.zeros((300, 200, 3), dtype=np.uint8)
    frames = [t1_bgr, half, blank, t1_bgr, half]
    async with running_suite(
        stage_server, scrfd_2_5g_path, contract_fixtures, max_batch_size=2
    ) as (clients, _):
        assert clients.detector_info.max_batch_size == 2
        calls_before = requests_ok("detector", "DetectFaces")
        results = await clients.detect(frames)
        calls = requests_ok("detector", "DetectFaces") - calls_before

    assert calls == 3  # 5 frames in chunks of 2
    assert [len(faces) for faces in results] == [6, 6, 0, 6, 6]
    full = np.stack([face.box for face in results[0]])
    halved = np.stack([face.box for face in results[1]])
    assert nearest_distance(full, np.stack([face.box for face in results[3]])) < 1e-3
    # The same faces, in each frame's own pixels: the half-size frame's boxes are half.
    assert nearest_distance(halved * 2.0, full) <= 6.0


async def test_embed_swap_enhance_keep_order_and_sizes_across_chunks(
    stage_server: StageServer, scrfd_2_5g_path: Path, contract_fixtures: dict[str, Path]
) -> None:
    async with running_suite(
        stage_server, scrfd_2_5g_path, contract_fixtures, max_batch_size=2
    ) as (clients, _):
        assert clients.swap_crop_size_px == 128
        assert clients.swap_template_points.shape == (5, 2)
        assert clients.embed_crop_size_px == 112
        assert clients.enhance_crop_size_px == 512
        assert clients.enhance_template_points is not None
        assert clients.enhance_template_points.shape == (5, 2)

        embed_crops = crops_of(5, clients.embed_crop_size_px, seed=1)
        before = requests_ok("embedder", "EmbedFaces")
        vectors = await clients.embed(embed_crops)
        assert requests_ok("embedder", "EmbedFaces") - before == 3
        singles = np.concatenate([await clients.embed([crop]) for crop in embed_crops])
        assert vectors.shape == (5, clients.embedder_info.embedding_size)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(vectors, singles, atol=1e-4)
        # Distinct crops give distinct vectors, so matching rows prove the order.
        assert (np.argmax(vectors @ singles.T, axis=1) == np.arange(5)).all()

        swap_crops = crops_of(5, clients.swap_crop_size_px, seed=2)
        before = requests_ok("swapper", "SwapFaces")
        swapped = await clients.swap(swap_crops, vectors[0])
        assert requests_ok("swapper", "SwapFaces") - before == 3
        assert [crop.shape for crop in swapped] == [(128, 128, 3)] * 5
        for crop, swapped_crop in zip(swap_crops, swapped, strict=True):
            alone = (await clients.swap([crop], vectors[0]))[0]
            assert np.abs(alone.astype(int) - swapped_crop.astype(int)).max() <= 1

        enhance_crops = crops_of(5, 512, seed=3)
        before = requests_ok("enhancer", "EnhanceFaces")
        enhanced = await clients.enhance(enhance_crops)
        assert requests_ok("enhancer", "EnhanceFaces") - before == 3
        assert [crop.shape for crop in enhanced] == [(512, 512, 3)] * 5
        third = (await clients.enhance([enhance_crops[3]]))[0]
        diffs = [float(np.abs(e.astype(int) - third.astype(int)).mean()) for e in enhanced]
        assert int(np.argmin(diffs)) == 3 and diffs[3] < 1.0

        assert await clients.swap([], vectors[0]) == []
        assert (await clients.embed([])).shape == (0, clients.embedder_info.embedding_size)
        with pytest.raises(ValueError, match=r"crops\[1\]"):
            await clients.swap([swap_crops[0], embed_crops[0]], vectors[0])
        with pytest.raises(ValueError, match="source embedding"):
            await clients.swap(swap_crops[:1], vectors[0][:100])


@pytest.mark.parametrize("wire", ["raw", "png"])
async def test_lossless_crop_wire_formats_round_trip(
    stage_server: StageServer,
    scrfd_2_5g_path: Path,
    contract_fixtures: dict[str, Path],
    wire: Any,
) -> None:
    settings = ClientSettings(crop_wire_format=wire)
    async with running_suite(stage_server, scrfd_2_5g_path, contract_fixtures, settings) as (
        clients,
        _,
    ):
        crops = crops_of(3, clients.embed_crop_size_px, seed=4)
        before = bytes_sent("embedder")
        vectors = await clients.embed(crops)
        sent = bytes_sent("embedder") - before
    raw_bytes = 3 * crops[0].size
    assert vectors.shape[0] == 3
    if wire == "raw":
        assert sent >= raw_bytes
    else:
        assert sent < raw_bytes  # smooth crops compress


async def test_a_stopped_stage_is_unavailable_naming_it_within_bounded_time(
    stage_server: StageServer, scrfd_2_5g_path: Path, contract_fixtures: dict[str, Path]
) -> None:
    async with running_suite(stage_server, scrfd_2_5g_path, contract_fixtures) as (
        clients,
        servers,
    ):
        crops = crops_of(2, clients.swap_crop_size_px)
        source = np.ones(clients.swapper_info.embedding_size, dtype=np.float32)
        assert len(await clients.swap(crops, source)) == 2
        await servers["swapper"].drain(0)
        started = time.monotonic()
        with pytest.raises(UnavailableError) as caught:
            await clients.swap(crops, source)
        elapsed = time.monotonic() - started
    message = str(caught.value)
    assert "swapper" in message and clients.targets.swapper in message
    assert elapsed < 15.0


async def test_connect_to_a_silent_stage_names_it_and_its_target(
    stage_server: StageServer, scrfd_2_5g_path: Path, contract_fixtures: dict[str, Path]
) -> None:
    async with (
        stage_server("detector", scrfd_2_5g_path) as (detector, _),
        stage_server("swapper", contract_fixtures["inswapper"]) as (swapper, _),
    ):
        silent = f"127.0.0.1:{free_port()}"
        targets = StageTargets(
            detector=f"127.0.0.1:{detector.port}",
            embedder=silent,
            swapper=f"127.0.0.1:{swapper.port}",
        )
        started = time.monotonic()
        with pytest.raises(UnavailableError) as caught:
            await StageClients.connect(targets, ClientSettings(connect_timeout_s=1.0))
        elapsed = time.monotonic() - started
    assert "embedder" in str(caught.value) and silent in str(caught.value)
    assert elapsed < 10.0


def scrape_requests_ok(process: StageProcess, method: str) -> float:
    """``facestage_requests_total{method, code="OK"}`` from a stage process's /metrics."""
    url = f"http://127.0.0.1:{process.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "facestage_requests_total"
                and sample.labels.get("method") == method
                and sample.labels.get("code") == "OK"
            ):
                total += sample.value
    return total


async def test_round_robin_spreads_calls_over_detector_replicas(
    stage_server: StageServer,
    scrfd_2_5g_path: Path,
    contract_fixtures: dict[str, Path],
    t1_bgr: np.ndarray,
    tmp_path: Path,
) -> None:
    args = ["--providers", "cpu", "--intra-op-threads", "1", "--max-batch-size", "4"]
    replicas = [
        start_stage("detector", scrfd_2_5g_path, extra_args=args, log_dir=tmp_path)
        for _ in range(2)
    ]
    try:
        await asyncio.gather(*(asyncio.to_thread(p.wait_serving, 120.0) for p in replicas))
        async with (
            stage_server("embedder", contract_fixtures["arcface"]) as (embedder, _),
            stage_server("swapper", contract_fixtures["inswapper"]) as (swapper, _),
        ):
            # One target, several addresses: what a headless Service's DNS answer is.
            targets = StageTargets(
                detector="ipv4:" + ",".join(p.address for p in replicas),
                embedder=f"127.0.0.1:{embedder.port}",
                swapper=f"127.0.0.1:{swapper.port}",
            )
            frame = np.asarray(cv2.resize(t1_bgr, (320, 222)), dtype=np.uint8)
            async with await StageClients.connect(targets) as clients:
                before = [scrape_requests_ok(p, "DetectFaces") for p in replicas]
                for _ in range(8):
                    assert len((await clients.detect([frame]))[0]) >= 1
                after = [scrape_requests_ok(p, "DetectFaces") for p in replicas]
    finally:
        for process in replicas:
            await asyncio.to_thread(process.stop)
    calls = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(calls) == 8
    assert min(calls) >= 2, f"calls per replica {calls}: round robin did not spread them"
