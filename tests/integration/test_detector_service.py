"""DetectorService through the generated stubs, on an in-process server with the real SCRFD."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from facestage.common.v1 import common_pb2
from facestage.detector.v1 import detector_pb2, detector_pb2_grpc
from facestage.imaging import encode_raw

pytestmark = pytest.mark.shared_models


def jpeg(frame: np.ndarray) -> common_pb2.Image:
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return common_pb2.Image(encoded=data.tobytes())


def boxes(result: detector_pb2.ImageFaces) -> np.ndarray:
    return np.array([[f.box.x_min, f.box.y_min, f.box.x_max, f.box.y_max] for f in result.faces])


def match_boxes(a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance between each box of a and its nearest box in b, in pixels."""
    return float(max(np.abs(b - box).max(axis=1).min() for box in a))


async def detect(channel: grpc.aio.Channel, *images: common_pb2.Image, **options: Any) -> Any:
    stub = detector_pb2_grpc.DetectorServiceStub(channel)
    return await stub.DetectFaces(
        detector_pb2.DetectFacesRequest(
            images=list(images), options=detector_pb2.DetectionOptions(**options)
        )
    )


async def test_six_faces_of_t1_with_landmarks_inside_boxes(
    stage_server: Any, scrfd_2_5g_path: Path, t1_jpeg: bytes, t1_bgr: np.ndarray
) -> None:
    async with stage_server("detector", scrfd_2_5g_path) as (_, channel):
        reply = await detect(channel, common_pb2.Image(encoded=t1_jpeg))
    faces = reply.results[0].faces
    assert len(faces) == 6
    height, width = t1_bgr.shape[:2]
    for face in faces:
        assert 0.5 <= face.score <= 1.0
        assert 0 <= face.box.x_min < face.box.x_max <= width
        assert 0 <= face.box.y_min < face.box.y_max <= height
        assert len(face.landmarks) == 5
        for point in face.landmarks:
            assert face.box.x_min <= point.x <= face.box.x_max
            assert face.box.y_min <= point.y <= face.box.y_max
    scores = [face.score for face in faces]
    assert scores == sorted(scores, reverse=True)


async def test_encoded_and_raw_give_the_same_faces(
    stage_server: Any, scrfd_2_5g_path: Path, t1_bgr: np.ndarray
) -> None:
    png_ok, png = cv2.imencode(".png", t1_bgr)
    assert png_ok
    async with stage_server("detector", scrfd_2_5g_path) as (_, channel):
        reply = await detect(
            channel,
            common_pb2.Image(encoded=png.tobytes()),
            encode_raw(t1_bgr),
            encode_raw(t1_bgr, common_pb2.CHANNEL_ORDER_RGB),
        )
    encoded, raw_bgr, raw_rgb = (boxes(r) for r in reply.results)
    assert len(encoded) == len(raw_bgr) == len(raw_rgb) == 6
    assert np.allclose(encoded, raw_bgr, atol=1e-3)
    assert np.allclose(encoded, raw_rgb, atol=1e-3)


async def test_batch_returns_each_images_own_faces(
    stage_server: Any,
    scrfd_2_5g_path: Path,
    t1_bgr: np.ndarray,
    astronaut_bgr: np.ndarray,
) -> None:
    blank = np.full((240, 320, 3), 128, dtype=np.uint8)
    half = cv2.resize(t1_bgr, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    async with stage_server("detector", scrfd_2_5g_path) as (_, channel):
        reply = await detect(channel, jpeg(t1_bgr), jpeg(astronaut_bgr), jpeg(blank), jpeg(half))
    counts = [len(r.faces) for r in reply.results]
    assert counts == [6, 1, 0, 6]
    astronaut_face = reply.results[1].faces[0]
    # The astronaut's face is in the upper middle of the 512x512 photo.
    assert 150 < astronaut_face.box.x_min < 250 and 50 < astronaut_face.box.y_min < 150
    # Each image answers in its own pixels: the half-size copy has half the coordinates.
    assert match_boxes(boxes(reply.results[3]) * 2, boxes(reply.results[0])) < 6


async def test_options_limit_faces(
    stage_server: Any, scrfd_2_5g_path: Path, t1_jpeg: bytes
) -> None:
    async with stage_server("detector", scrfd_2_5g_path) as (_, channel):
        two = await detect(channel, common_pb2.Image(encoded=t1_jpeg), max_faces=2)
        strict = await detect(channel, common_pb2.Image(encoded=t1_jpeg), score_threshold=0.99)
        small = await detect(channel, common_pb2.Image(encoded=t1_jpeg), detection_size_px=320)
    assert len(two.results[0].faces) == 2
    assert len(strict.results[0].faces) < 6
    assert 1 <= len(small.results[0].faces) <= 6


def _bad_inputs(t1_jpeg: bytes) -> list[tuple[str, detector_pb2.DetectFacesRequest, str]]:
    rng = np.random.default_rng(1)
    raw_short = common_pb2.Image(
        raw=common_pb2.RawImage(pixels=b"\x00" * 100, width_px=10, height_px=10)
    )
    zero = common_pb2.Image(raw=common_pb2.RawImage(pixels=b"", width_px=0, height_px=0))
    return [
        ("random bytes", common_pb2.Image(encoded=rng.bytes(5000)), "images[0].encoded"),
        (
            "truncated jpeg",
            common_pb2.Image(encoded=t1_jpeg[: len(t1_jpeg) // 2]),
            "images[0].encoded",
        ),
        ("empty encoded", common_pb2.Image(encoded=b""), "images[0].encoded"),
        ("zero-size raw", zero, "images[0].raw"),
        ("raw length mismatch", raw_short, "images[0].raw.pixels"),
        ("unset image", common_pb2.Image(), "images[0]"),
        ("bad detection size", None, "options.detection_size_px"),
    ]  # type: ignore[list-item]


async def test_bad_input_is_invalid_argument_and_the_service_keeps_serving(
    stage_server: Any, scrfd_2_5g_path: Path, t1_jpeg: bytes
) -> None:
    stub_request = detector_pb2.DetectFacesRequest
    async with stage_server(
        "detector", scrfd_2_5g_path, max_batch_size=2, max_pixels=1200 * 1000
    ) as (_, channel):
        stub = detector_pb2_grpc.DetectorServiceStub(channel)
        cases: list[tuple[str, detector_pb2.DetectFacesRequest, str]] = []
        for name, image, field in _bad_inputs(t1_jpeg):
            if image is None:
                cases.append(
                    (
                        name,
                        stub_request(
                            images=[common_pb2.Image(encoded=t1_jpeg)],
                            options=detector_pb2.DetectionOptions(detection_size_px=100),
                        ),
                        field,
                    )
                )
            else:
                cases.append((name, stub_request(images=[image]), field))
        big = np.zeros((1100, 1100, 3), dtype=np.uint8)
        cases.append(
            ("over the pixel limit", stub_request(images=[encode_raw(big)]), "images[0].raw")
        )
        cases.append(
            ("over the pixel limit, encoded", stub_request(images=[jpeg(big)]), "images[0].encoded")
        )
        cases.append(
            (
                "batch over the maximum",
                stub_request(images=[common_pb2.Image(encoded=t1_jpeg)] * 3),
                "images",
            )
        )
        cases.append(("empty batch", stub_request(), "images"))
        for name, request, field in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.DetectFaces(request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert field in (caught.value.details() or ""), (name, caught.value.details())
        # Still serving, and still right.
        reply = await stub.DetectFaces(stub_request(images=[common_pb2.Image(encoded=t1_jpeg)]))
        assert len(reply.results[0].faces) == 6


async def test_oversized_message_is_resource_exhausted(
    stage_server: Any, scrfd_2_5g_path: Path, t1_jpeg: bytes
) -> None:
    async with stage_server("detector", scrfd_2_5g_path, max_message_bytes=1_000_000) as (
        _,
        channel,
    ):
        stub = detector_pb2_grpc.DetectorServiceStub(channel)
        big = encode_raw(np.zeros((1000, 1000, 3), dtype=np.uint8))  # 3 MB
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.DetectFaces(detector_pb2.DetectFacesRequest(images=[big]))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        reply = await stub.DetectFaces(
            detector_pb2.DetectFacesRequest(images=[common_pb2.Image(encoded=t1_jpeg)])
        )
        assert len(reply.results[0].faces) == 6


async def test_health_follows_warm_up_and_drain(stage_server: Any, scrfd_2_5g_path: Path) -> None:
    service = "facestage.detector.v1.DetectorService"
    async with stage_server(
        "detector", scrfd_2_5g_path, warm=False, drain_notice_s=1.0, drain_grace_s=2.0
    ) as (server, channel):
        health = health_pb2_grpc.HealthStub(channel)

        async def status(name: str = "") -> int:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            return int(reply.status)

        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        serving = health_pb2.HealthCheckResponse.SERVING
        assert await status() == not_serving
        assert await status(service) == not_serving
        await server.warm_up()
        assert await status() == serving
        assert await status(service) == serving
        draining = asyncio.create_task(server.drain())
        await asyncio.sleep(0.3)
        assert await status(service) == not_serving
        await draining


async def test_reflection_lists_the_service(stage_server: Any, scrfd_2_5g_path: Path) -> None:
    async with stage_server("detector", scrfd_2_5g_path) as (_, channel):
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def requests() -> Any:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names: list[str] = []
        async for reply in stub.ServerReflectionInfo(requests()):
            names += [s.name for s in reply.list_services_response.service]
    assert "facestage.detector.v1.DetectorService" in names
    assert "grpc.health.v1.Health" in names


async def test_model_info_reports_what_runs(stage_server: Any, scrfd_2_5g_path: Path) -> None:
    async with stage_server("detector", scrfd_2_5g_path) as (_, channel):
        stub = detector_pb2_grpc.DetectorServiceStub(channel)
        info = (await stub.GetModelInfo(detector_pb2.GetModelInfoRequest())).model_info
    assert info.model_name == "scrfd_2.5g_bnkps"
    assert info.model_family == "scrfd"
    assert info.execution_provider == "CPUExecutionProvider"
    assert (info.input_width_px, info.input_height_px) == (640, 640)
    assert info.model_sha256 == ("bc24bb349491481c3ca793cf89306723162c280cb284c5a5e49df3760bf5c2ce")
