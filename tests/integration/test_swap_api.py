"""The public API (``facestage.swap.v1.FaceSwapService``) through the generated stub, on an
in-process orchestrator over real in-process stage servers: the real SCRFD 2.5G detector
and the contract fixtures for ArcFace-512, inswapper_128 and GFPGAN. The fixtures' faces
are plumbing, not swaps: these tests check what changes where, counts, formats, status
codes and clean-up, never how a swap looks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from facestage.common.v1 import common_pb2
from facestage.imaging import decode_image, sniff_format
from facestage.runtime import open_session
from facestage.swap.v1 import swap_pb2
from orchestrator.video import probe
from tests.integration.conftest import running_stage
from tests.integration.orchestrator_helpers import (
    running_orchestrator,
    running_stages,
    swap_stub,
)
from tests.media import frame_count, make_test_video

pytestmark = pytest.mark.shared_models

CHUNK_BYTES = 64 * 1024
VIDEO_SECONDS = 2.0
VIDEO_FPS = 25
VIDEO_SIZE = (320, 240)

Stub = Any  # the generated async stub; its type lives only in the .pyi


# --- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
async def stage_targets(
    scrfd_2_5g_path: Path, contract_fixtures: dict[str, Path]
) -> AsyncIterator[dict[str, str]]:
    async with running_stages(scrfd_2_5g_path, contract_fixtures) as targets:
        yield targets


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
async def stub(stage_targets: dict[str, str], spool_dir: Path) -> AsyncIterator[Stub]:
    """The API with small output chunks, so a small video comes back in several."""
    async with running_orchestrator(
        stage_targets, spool_dir=str(spool_dir), chunk_bytes=CHUNK_BYTES
    ) as (_, channel):
        yield swap_stub(channel)


def png(frame: np.ndarray) -> common_pb2.Image:
    ok, data = cv2.imencode(".png", frame)
    assert ok
    return common_pb2.Image(encoded=data.tobytes())


def image_request(
    source: np.ndarray, target_jpeg: bytes, **options: Any
) -> swap_pb2.SwapImageRequest:
    return swap_pb2.SwapImageRequest(
        source_images=[png(source)],
        target_image=common_pb2.Image(encoded=target_jpeg),
        options=swap_pb2.SwapOptions(**options),
        output_format=common_pb2.IMAGE_FORMAT_PNG,
    )


def box_mask(shape: tuple[int, ...], faces: Any, grow: float) -> np.ndarray:
    """True inside every face box, each grown by ``grow`` times its size on every side."""
    mask = np.zeros(shape[:2], dtype=bool)
    for face in faces:
        box = face.box
        dx, dy = (box.x_max - box.x_min) * grow, (box.y_max - box.y_min) * grow
        x0, y0 = max(0, int(box.x_min - dx)), max(0, int(box.y_min - dy))
        x1, y1 = int(np.ceil(box.x_max + dx)), int(np.ceil(box.y_max + dy))
        mask[y0:y1, x0:x1] = True
    return mask


def mean_change_in_box(a: np.ndarray, b: np.ndarray, face: Any) -> float:
    box = face.box
    region = (
        slice(int(box.y_min), int(box.y_max)),
        slice(int(box.x_min), int(box.x_max)),
    )
    return float(np.abs(a[region].astype(np.int16) - b[region].astype(np.int16)).mean())


def jobs_total(kind: str, state: str) -> float:
    value = REGISTRY.get_sample_value(
        "facestage_orchestrator_jobs_total",
        {"stage": "orchestrator", "kind": kind, "state": state},
    )
    return value or 0.0


async def rpc_error(call: Callable[[], Any]) -> grpc.aio.AioRpcError:
    """The status a unary call or a fully read stream ends with (fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    return info.value


def entries(directory: Path) -> list[str]:
    """Names in ``directory`` (none if it does not exist)."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


async def wait_until_empty(directory: Path, timeout_s: float = 5.0) -> list[str]:
    """The directory's entries once it is empty, or what is left after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        left = entries(directory)
        if not left or asyncio.get_running_loop().time() > deadline:
            return left
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def video_bytes(tmp_path_factory: pytest.TempPathFactory, t1_bgr: np.ndarray) -> bytes:
    """A 2 s, 25 fps, 320x240 H.264 video of t1 (six faces) with an AAC tone."""
    path = tmp_path_factory.mktemp("video") / "t1.mp4"
    make_test_video(
        path, frame_source=t1_bgr, seconds=VIDEO_SECONDS, fps=VIDEO_FPS, size=VIDEO_SIZE
    )
    return path.read_bytes()


def video_config(source: np.ndarray, **output: Any) -> swap_pb2.SwapVideoConfig:
    return swap_pb2.SwapVideoConfig(
        source_images=[png(source)], output=swap_pb2.VideoOutputOptions(**output)
    )


async def video_requests(
    config: swap_pb2.SwapVideoConfig | None, data: bytes, chunk_bytes: int = CHUNK_BYTES
) -> AsyncIterator[swap_pb2.SwapVideoRequest]:
    if config is not None:
        yield swap_pb2.SwapVideoRequest(config=config)
    for start in range(0, len(data), chunk_bytes):
        yield swap_pb2.SwapVideoRequest(chunk=data[start : start + chunk_bytes])


# --- SwapImage ------------------------------------------------------------------------------


async def test_swap_image_many_changes_every_face_and_nothing_far_from_faces(
    stub: Stub, t1_jpeg: bytes, t1_bgr: np.ndarray, astronaut_bgr: np.ndarray
) -> None:
    reply = await stub.SwapImage(image_request(astronaut_bgr, t1_jpeg))

    assert len(reply.target_faces) == 6
    assert list(reply.swapped_face_indices) == [0, 1, 2, 3, 4, 5]
    assert sniff_format(reply.image.encoded) == "png"
    swapped = decode_image(reply.image)
    assert swapped.shape == t1_bgr.shape
    for face in reply.target_faces:
        assert mean_change_in_box(swapped, t1_bgr, face) > 2.0
    far = ~box_mask(t1_bgr.shape, reply.target_faces, grow=1.0)
    assert far.mean() > 0.2, "the test needs a sizeable area far from every face"
    np.testing.assert_array_equal(swapped[far], t1_bgr[far])


async def test_swap_image_mode_one_swaps_only_the_largest_face(
    stub: Stub, t1_jpeg: bytes, t1_bgr: np.ndarray, astronaut_bgr: np.ndarray
) -> None:
    reply = await stub.SwapImage(
        image_request(astronaut_bgr, t1_jpeg, face_selector_mode=swap_pb2.FACE_SELECTOR_MODE_ONE)
    )

    faces = reply.target_faces
    assert len(faces) == 6
    areas = [(f.box.x_max - f.box.x_min) * (f.box.y_max - f.box.y_min) for f in faces]
    largest = int(np.argmax(areas))
    assert list(reply.swapped_face_indices) == [largest]
    swapped = decode_image(reply.image)
    assert mean_change_in_box(swapped, t1_bgr, faces[largest]) > 2.0
    far = ~box_mask(t1_bgr.shape, [faces[largest]], grow=1.0)
    np.testing.assert_array_equal(swapped[far], t1_bgr[far])


@pytest.mark.parametrize(
    ("image_format", "kind"),
    [
        (common_pb2.IMAGE_FORMAT_JPEG, "jpeg"),
        (common_pb2.IMAGE_FORMAT_PNG, "png"),
        (common_pb2.IMAGE_FORMAT_UNSPECIFIED, "png"),
        (common_pb2.IMAGE_FORMAT_RAW, None),
    ],
)
async def test_swap_image_answers_in_the_requested_format(
    stub: Stub,
    t1_jpeg: bytes,
    t1_bgr: np.ndarray,
    astronaut_bgr: np.ndarray,
    image_format: int,
    kind: str | None,
) -> None:
    request = image_request(astronaut_bgr, t1_jpeg)
    request.output_format = image_format  # type: ignore[assignment]
    reply = await stub.SwapImage(request)

    if kind is None:
        assert reply.image.WhichOneof("data") == "raw"
        assert (reply.image.raw.width_px, reply.image.raw.height_px) == (
            t1_bgr.shape[1],
            t1_bgr.shape[0],
        )
    else:
        assert sniff_format(reply.image.encoded) == kind
    assert decode_image(reply.image).shape == t1_bgr.shape


async def test_swap_image_enhance_changes_the_faces_only(
    stub: Stub, t1_jpeg: bytes, t1_bgr: np.ndarray, astronaut_bgr: np.ndarray
) -> None:
    plain = await stub.SwapImage(image_request(astronaut_bgr, t1_jpeg, enhance=False))
    enhanced = await stub.SwapImage(image_request(astronaut_bgr, t1_jpeg, enhance=True))

    assert list(enhanced.swapped_face_indices) == list(plain.swapped_face_indices)
    a, b = decode_image(plain.image), decode_image(enhanced.image)
    changed = [mean_change_in_box(a, b, face) for face in enhanced.target_faces]
    assert min(changed) > 0.5, changed
    far = ~box_mask(t1_bgr.shape, enhanced.target_faces, grow=1.0)
    np.testing.assert_array_equal(a[far], b[far])


async def test_swap_image_enhance_without_an_enhancer_is_failed_precondition(
    scrfd_2_5g_path: Path,
    contract_fixtures: dict[str, Path],
    tmp_path: Path,
    t1_jpeg: bytes,
    astronaut_bgr: np.ndarray,
) -> None:
    async with (
        running_stages(scrfd_2_5g_path, contract_fixtures, enhancer=False) as targets,
        running_orchestrator(targets, spool_dir=str(tmp_path)) as (_, channel),
    ):
        api = swap_stub(channel)
        error = await rpc_error(
            lambda: api.SwapImage(image_request(astronaut_bgr, t1_jpeg, enhance=True))
        )
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "options.enhance" in (error.details() or "")
        assert "no enhancer" in (error.details() or "")
        # Without enhance the same orchestrator serves.
        reply = await api.SwapImage(image_request(astronaut_bgr, t1_jpeg))
        assert len(reply.swapped_face_indices) == 6


async def test_swap_image_source_without_a_face_is_failed_precondition_with_a_hint(
    stub: Stub, t1_jpeg: bytes
) -> None:
    grey = np.full((256, 256, 3), 128, dtype=np.uint8)
    failed_before = jobs_total("image", "failed")

    error = await rpc_error(lambda: stub.SwapImage(image_request(grey, t1_jpeg)))

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "source_images[0]" in (error.details() or "")
    assert "frontal" in (error.details() or "")
    assert jobs_total("image", "failed") == failed_before + 1


async def test_swap_image_without_a_source_is_invalid_argument(stub: Stub, t1_jpeg: bytes) -> None:
    request = swap_pb2.SwapImageRequest(target_image=common_pb2.Image(encoded=t1_jpeg))
    error = await rpc_error(lambda: stub.SwapImage(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("source_images")


async def test_swap_image_corrupt_target_is_invalid_argument(
    stub: Stub, t1_jpeg: bytes, astronaut_bgr: np.ndarray
) -> None:
    request = image_request(astronaut_bgr, t1_jpeg[: len(t1_jpeg) // 2])
    error = await rpc_error(lambda: stub.SwapImage(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("target_image")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"enhancer_blend": 1.5}, "options.enhancer_blend"),
        ({"mask_blur": -0.1}, "options.mask_blur"),
        ({"detection_score_threshold": float("nan")}, "options.detection_score_threshold"),
        ({"mask_padding": swap_pb2.MaskPadding(top_percent=101)}, "options.mask_padding"),
        ({"reference_face_distance": 2.0}, "options.reference_face_distance"),
        (
            {"face_selector_mode": swap_pb2.FACE_SELECTOR_MODE_REFERENCE},
            "options.reference_face_image",
        ),
    ],
)
async def test_swap_image_options_out_of_range_are_invalid_argument_naming_the_field(
    stub: Stub, t1_jpeg: bytes, astronaut_bgr: np.ndarray, options: dict[str, Any], field: str
) -> None:
    error = await rpc_error(
        lambda: stub.SwapImage(image_request(astronaut_bgr, t1_jpeg, **options))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith(field)


async def test_swap_image_reference_mode_swaps_the_reference_face(
    stub: Stub, t1_jpeg: bytes, t1_bgr: np.ndarray, astronaut_bgr: np.ndarray
) -> None:
    """The target itself as reference: its largest face is the one within the distance."""
    reply = await stub.SwapImage(
        image_request(
            astronaut_bgr,
            t1_jpeg,
            face_selector_mode=swap_pb2.FACE_SELECTOR_MODE_REFERENCE,
            reference_face_image=common_pb2.Image(encoded=t1_jpeg),
            reference_face_distance=0.01,
        )
    )
    faces = reply.target_faces
    areas = [(f.box.x_max - f.box.x_min) * (f.box.y_max - f.box.y_min) for f in faces]
    assert list(reply.swapped_face_indices) == [int(np.argmax(areas))]


# --- SwapVideo ------------------------------------------------------------------------------


async def test_swap_video_streams_progress_result_and_the_output_in_chunks(
    stub: Stub, spool_dir: Path, video_bytes: bytes, astronaut_bgr: np.ndarray
) -> None:
    assert len(video_bytes) > 3 * CHUNK_BYTES, "the upload must take several chunks"
    expected_frames = frame_count(VIDEO_SECONDS, VIDEO_FPS)
    succeeded_before = jobs_total("video", "succeeded")
    config = video_config(astronaut_bgr)
    config.target_size_bytes = len(video_bytes)

    kinds: list[str] = []
    progress: list[swap_pb2.SwapVideoProgress] = []
    results: list[swap_pb2.SwapVideoResult] = []
    chunks: list[bytes] = []
    async for message in stub.SwapVideo(video_requests(config, video_bytes)):
        kind = message.WhichOneof("message")
        if not kinds or kinds[-1] != kind:
            kinds.append(kind)
        if kind == "progress":
            progress.append(message.progress)
        elif kind == "result":
            results.append(message.result)
        else:
            chunks.append(message.chunk)

    assert kinds == ["progress", "result", "chunk"]
    done = [p.frames_done for p in progress]
    assert done == sorted(done)
    assert progress[-1].frames_done == progress[-1].frames_total == expected_frames
    assert all(p.frames_total == expected_frames for p in progress)
    assert progress[-1].frames_per_second > 0
    (result,) = results
    assert result.frames_total == expected_frames
    assert 0 < result.frames_with_swaps <= expected_frames
    assert result.faces_swapped >= result.frames_with_swaps
    assert result.mime_type == "video/mp4"
    assert len(chunks) > 1
    assert all(len(chunk) <= CHUNK_BYTES for chunk in chunks)
    output = b"".join(chunks)
    assert len(output) == result.output_size_bytes

    path = spool_dir.parent / "out.mp4"
    path.write_bytes(output)
    info = probe(path)
    assert info.frame_count == expected_frames
    assert info.fps == Fraction(VIDEO_FPS)
    assert info.size == VIDEO_SIZE
    assert info.has_audio
    assert await wait_until_empty(spool_dir) == []
    assert jobs_total("video", "succeeded") == succeeded_before + 1


async def test_swap_video_output_options_resample_resize_and_drop_audio(
    stub: Stub, spool_dir: Path, video_bytes: bytes, astronaut_bgr: np.ndarray
) -> None:
    config = video_config(astronaut_bgr, fps=12.5, width_px=160, container="mkv", keep_audio=False)
    chunks: list[bytes] = []
    last: swap_pb2.SwapVideoProgress | None = None
    result: swap_pb2.SwapVideoResult | None = None
    async for message in stub.SwapVideo(video_requests(config, video_bytes)):
        if message.WhichOneof("message") == "progress":
            last = message.progress
        elif message.WhichOneof("message") == "result":
            result = message.result
        else:
            chunks.append(message.chunk)

    # Half the rate over the same 2 s: half the frames, height from the aspect ratio.
    expected_frames = frame_count(VIDEO_SECONDS, 12.5)
    assert last is not None and last.frames_done == last.frames_total == expected_frames
    assert result is not None and result.mime_type == "video/x-matroska"
    path = spool_dir.parent / "out.mkv"
    path.write_bytes(b"".join(chunks))
    info = probe(path)
    assert info.frame_count == expected_frames or info.frame_count_source == "estimated"
    assert info.fps == Fraction(25, 2)
    assert info.size == (160, 120)
    assert abs(info.duration_s - VIDEO_SECONDS) < 0.1
    assert not info.has_audio
    assert await wait_until_empty(spool_dir) == []


async def test_swap_video_corrupt_bytes_are_invalid_argument(
    stub: Stub, spool_dir: Path, astronaut_bgr: np.ndarray
) -> None:
    garbage = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    error = await rpc_error(
        lambda: stub.SwapVideo(video_requests(video_config(astronaut_bgr), garbage))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("chunk")
    assert await wait_until_empty(spool_dir) == []


async def test_swap_video_truncated_file_is_invalid_argument(
    stub: Stub, spool_dir: Path, video_bytes: bytes, astronaut_bgr: np.ndarray
) -> None:
    """The header survives but the frames do not: fails in probing or decoding, cleaned."""
    error = await rpc_error(
        lambda: stub.SwapVideo(
            video_requests(video_config(astronaut_bgr), video_bytes[: len(video_bytes) // 3])
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await wait_until_empty(spool_dir) == []


async def test_swap_video_empty_upload_is_invalid_argument(
    stub: Stub, spool_dir: Path, astronaut_bgr: np.ndarray
) -> None:
    error = await rpc_error(
        lambda: stub.SwapVideo(video_requests(video_config(astronaut_bgr), b""))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("chunk")
    assert "empty" in (error.details() or "")
    assert await wait_until_empty(spool_dir) == []


async def test_swap_video_without_config_is_invalid_argument(
    stub: Stub, spool_dir: Path, video_bytes: bytes
) -> None:
    error = await rpc_error(lambda: stub.SwapVideo(video_requests(None, video_bytes)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("config")
    assert await wait_until_empty(spool_dir) == []


@pytest.mark.parametrize(
    ("output", "field"),
    [
        ({"width_px": 321}, "config.output.width_px"),
        ({"quality": 101}, "config.output.quality"),
        ({"fps": 0.0}, "config.output.fps"),
        ({"video_codec": "no-such-codec"}, "config.output.video_codec"),
        ({"container": "webm"}, "config.output.video_codec"),
        ({"container": "flv"}, "config.output.container"),
    ],
)
async def test_swap_video_bad_output_options_are_invalid_argument_naming_the_field(
    stub: Stub,
    spool_dir: Path,
    video_bytes: bytes,
    astronaut_bgr: np.ndarray,
    output: dict[str, Any],
    field: str,
) -> None:
    config = video_config(astronaut_bgr, **output)
    error = await rpc_error(lambda: stub.SwapVideo(video_requests(config, video_bytes)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith(field)
    assert await wait_until_empty(spool_dir) == []


async def test_swap_video_over_the_upload_limit_is_resource_exhausted(
    stage_targets: dict[str, str],
    spool_dir: Path,
    video_bytes: bytes,
    astronaut_bgr: np.ndarray,
) -> None:
    limit = len(video_bytes) // 2
    async with running_orchestrator(
        stage_targets, spool_dir=str(spool_dir), max_upload_bytes=limit
    ) as (_, channel):
        api = swap_stub(channel)
        # Declared up front: refused before any byte is read.
        declared = video_config(astronaut_bgr)
        declared.target_size_bytes = len(video_bytes)
        error = await rpc_error(lambda: api.SwapVideo(video_requests(declared, video_bytes)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "target_size_bytes" in (error.details() or "")
        # Not declared: refused once the bytes received pass the limit.
        error = await rpc_error(
            lambda: api.SwapVideo(video_requests(video_config(astronaut_bgr), video_bytes))
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(limit) in (error.details() or "")
        assert await wait_until_empty(spool_dir) == []


async def test_swap_video_source_without_a_face_fails_before_the_upload(
    stub: Stub, spool_dir: Path, video_bytes: bytes
) -> None:
    grey = np.full((256, 256, 3), 128, dtype=np.uint8)
    error = await rpc_error(lambda: stub.SwapVideo(video_requests(video_config(grey), video_bytes)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "frontal" in (error.details() or "")
    assert await wait_until_empty(spool_dir) == []


async def test_swap_video_cancelled_midway_deletes_its_files_and_frees_its_slot(
    stage_targets: dict[str, str],
    spool_dir: Path,
    video_bytes: bytes,
    t1_jpeg: bytes,
    astronaut_bgr: np.ndarray,
) -> None:
    cancelled_before = jobs_total("video", "cancelled")
    async with running_orchestrator(
        stage_targets, spool_dir=str(spool_dir), max_concurrent_jobs=1
    ) as (_, channel):
        api = swap_stub(channel)
        call = api.SwapVideo(video_requests(video_config(astronaut_bgr), video_bytes))
        first = await call.read()
        assert first.WhichOneof("message") == "progress"
        assert first.progress.frames_done < first.progress.frames_total
        assert entries(spool_dir), "the job spools into spool_dir while it runs"

        # The one job slot is taken: a second job is refused, not queued.
        busy = await rpc_error(lambda: api.SwapImage(image_request(astronaut_bgr, t1_jpeg)))
        assert busy.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        busy = await rpc_error(
            lambda: api.SwapVideo(video_requests(video_config(astronaut_bgr), video_bytes))
        )
        assert busy.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "maximum of 1 jobs" in (busy.details() or "")

        call.cancel()
        assert await wait_until_empty(spool_dir) == []
        for _ in range(100):
            if jobs_total("video", "cancelled") == cancelled_before + 1:
                break
            await asyncio.sleep(0.05)
        assert jobs_total("video", "cancelled") == cancelled_before + 1

        # The slot is free again.
        reply = await api.SwapImage(image_request(astronaut_bgr, t1_jpeg))
        assert len(reply.swapped_face_indices) == 6


async def test_swap_video_cancelled_during_the_upload_deletes_the_spooled_part(
    stub: Stub, spool_dir: Path, video_bytes: bytes, astronaut_bgr: np.ndarray
) -> None:
    sent = asyncio.Event()

    async def stalled_upload() -> AsyncIterator[swap_pb2.SwapVideoRequest]:
        yield swap_pb2.SwapVideoRequest(config=video_config(astronaut_bgr))
        yield swap_pb2.SwapVideoRequest(chunk=video_bytes[:CHUNK_BYTES])
        sent.set()
        await asyncio.Event().wait()  # the client never half-closes

    cancelled_before = jobs_total("video", "cancelled")
    call = stub.SwapVideo(stalled_upload())
    await sent.wait()
    for _ in range(100):  # until the server has started spooling
        if entries(spool_dir):
            break
        await asyncio.sleep(0.05)
    assert entries(spool_dir), "the upload is spooled into spool_dir"
    call.cancel()

    assert await wait_until_empty(spool_dir) == []
    for _ in range(100):
        if jobs_total("video", "cancelled") == cancelled_before + 1:
            break
        await asyncio.sleep(0.05)
    assert jobs_total("video", "cancelled") == cancelled_before + 1


@pytest.mark.shared_models
async def test_reference_mode_with_the_real_recogniser_swaps_only_the_matching_face(
    scrfd_2_5g_path: Path,
    mobilefacenet_path: Path,
    tmp_path: Path,
    t1_bgr: np.ndarray,
    t1_jpeg: bytes,
    astronaut_bgr: np.ndarray,
) -> None:
    """Matching is real here: the real 128-d MobileFaceNet embeds the target faces and a
    reference photo of one of them (a re-framed, rescaled, brightened copy, not the same
    pixels); only that face is swapped. The swapper is an inswapper-shaped fixture sized
    for 128-d identities (plumbing, not a swap)."""
    import onnx

    from facestage.fixtures import build_inswapper_fixture
    from services.detector.model import DetectionOptions, load_detector

    swapper_path = tmp_path / "inswapper_128d_fixture.onnx"
    onnx.save_model(build_inswapper_fixture(embedding_size=128), str(swapper_path))
    faces = load_detector(open_session(scrfd_2_5g_path, ["cpu"])).detect(
        [t1_bgr], DetectionOptions()
    )[0]
    person = faces[2]
    x0, y0, x1, y1 = person.box.astype(int)
    w, h = x1 - x0, y1 - y0
    portrait = t1_bgr[max(y0 - h, 0) : y1 + h, max(x0 - w, 0) : x1 + w]
    portrait = cv2.resize(portrait, None, fx=1.7, fy=1.7, interpolation=cv2.INTER_CUBIC)
    portrait = cv2.convertScaleAbs(portrait, alpha=1.1, beta=12)
    ok, reference = cv2.imencode(".jpg", portrait, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    async with contextlib.AsyncExitStack() as stack:
        targets = {"enhancer": ""}
        for stage, model in (
            ("detector", scrfd_2_5g_path),
            ("embedder", mobilefacenet_path),
            ("swapper", swapper_path),
        ):
            server, _ = await stack.enter_async_context(running_stage(stage, model))  # type: ignore[arg-type]
            targets[stage] = f"127.0.0.1:{server.port}"
        _, channel = await stack.enter_async_context(running_orchestrator(targets))
        reply = await swap_stub(channel).SwapImage(
            image_request(
                astronaut_bgr,
                t1_jpeg,
                face_selector_mode=swap_pb2.FACE_SELECTOR_MODE_REFERENCE,
                reference_face_image=common_pb2.Image(encoded=reference.tobytes()),
            )
        )
    assert len(reply.target_faces) == 6
    assert len(reply.swapped_face_indices) == 1
    swapped = reply.target_faces[reply.swapped_face_indices[0]]
    centre = np.array(
        [(swapped.box.x_min + swapped.box.x_max) / 2, (swapped.box.y_min + swapped.box.y_max) / 2]
    )
    assert np.linalg.norm(centre - person.box.reshape(2, 2).mean(axis=0)) < 5
