"""Embedder, swapper and enhancer services through the generated stubs, on in-process
servers: the real 128-d MobileFaceNet for embeddings of real faces, and the project's
contract fixtures (production names, shapes and dtypes) for the 512-d ArcFace,
inswapper_128, GFPGAN and CodeFormer plumbing. Fixture outputs are not swaps."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from facestage.alignment import align_face
from facestage.common.v1 import common_pb2
from facestage.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from facestage.enhancer.v1 import enhancer_pb2, enhancer_pb2_grpc
from facestage.imaging import decode_image, encode_raw
from facestage.runtime import open_session
from facestage.swapper.v1 import swapper_pb2, swapper_pb2_grpc
from services.detector.model import DetectionOptions, load_detector


def crops_of(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct smooth test crops (not faces): plumbing input for the fixtures."""
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        crops.append(cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC))
    return crops


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def batch_counts(stage: str) -> tuple[float, float]:
    """(batches run, batches of exactly one item) so far for a stage."""
    total = REGISTRY.get_sample_value("facestage_batch_size_count", {"stage": stage}) or 0.0
    ones = REGISTRY.get_sample_value("facestage_batch_size_bucket", {"stage": stage, "le": "1.0"})
    return total, ones or 0.0


# --- embedder ---------------------------------------------------------------------------


@pytest.mark.shared_models
async def test_real_embeddings_match_the_same_face_and_separate_different_faces(
    stage_server: Any, mobilefacenet_path: Path, scrfd_2_5g_path: Path, t1_bgr: np.ndarray
) -> None:
    detector = load_detector(open_session(scrfd_2_5g_path, ["cpu"]))
    faces = detector.detect([t1_bgr], DetectionOptions())[0]
    assert len(faces) == 6
    # The same photo shifted by (37, 21) px and scaled by 0.8 inside a larger canvas.
    matrix = np.array([[0.8, 0.0, 37.0], [0.0, 0.8, 21.0]])
    moved = cv2.warpAffine(t1_bgr, matrix, (t1_bgr.shape[1], t1_bgr.shape[0]))
    moved_faces = detector.detect([moved], DetectionOptions())[0]
    target = faces[0]
    expected_centre = matrix[:, :2] @ target.landmarks.mean(axis=0) + matrix[:, 2]
    moved_face = min(
        moved_faces, key=lambda f: float(np.linalg.norm(f.landmarks.mean(0) - expected_centre))
    )

    def face_in_image(frame: np.ndarray, landmarks: np.ndarray) -> embedder_pb2.FaceToEmbed:
        request = embedder_pb2.FaceInImage(image=encode_raw(frame))
        for x, y in landmarks:
            request.landmarks.add(x=float(x), y=float(y))
        return embedder_pb2.FaceToEmbed(face_in_image=request)

    async with stage_server("embedder", mobilefacenet_path) as (_, channel):
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        info = (await stub.GetModelInfo(embedder_pb2.GetModelInfoRequest())).model_info
        assert info.embedding_size == 128 and info.alignment_template == "arcface_112_v2"
        request = embedder_pb2.EmbedFacesRequest(
            faces=[face_in_image(t1_bgr, f.landmarks) for f in faces]
            + [face_in_image(moved, moved_face.landmarks)]
        )
        reply = await stub.EmbedFaces(request)
        aligned = align_face(t1_bgr, target.landmarks, "arcface_112_v2", 112).crop
        crop_reply = await stub.EmbedFaces(
            embedder_pb2.EmbedFacesRequest(
                faces=[embedder_pb2.FaceToEmbed(aligned_crop=encode_raw(aligned))]
            )
        )
    vectors = np.array([list(e.normalized.values) for e in reply.embeddings])
    assert vectors.shape == (7, 128)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    raw0 = np.array(reply.embeddings[0].raw.values)
    assert abs(np.linalg.norm(raw0) - 1.0) > 1e-3  # raw really is the unnormalised output
    assert cosine(vectors[0], vectors[6]) > 0.8  # same face, moved and rescaled
    for i in range(6):
        for j in range(i + 1, 6):
            assert cosine(vectors[i], vectors[j]) < 0.5, (i, j)  # different people
    # An aligned crop sent by the caller embeds as the service's own alignment does.
    assert cosine(np.array(crop_reply.embeddings[0].normalized.values), vectors[0]) > 0.999


async def test_arcface_fixture_batch_in_order_and_independent_of_merging(
    stage_server: Any, contract_fixtures: dict[str, Path]
) -> None:
    crops = crops_of(6, 112, seed=3)
    requests = [
        embedder_pb2.EmbedFacesRequest(faces=[embedder_pb2.FaceToEmbed(aligned_crop=encode_raw(c))])
        for c in crops
    ]
    async with stage_server(
        "embedder", contract_fixtures["arcface"], batch_window_ms=200, max_batch_size=8
    ) as (_, channel):
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        together = await stub.EmbedFaces(
            embedder_pb2.EmbedFacesRequest(faces=[r.faces[0] for r in requests])
        )
        before = batch_counts("embedder")
        merged = await asyncio.gather(*(stub.EmbedFaces(r) for r in requests))
        after = batch_counts("embedder")
    batched = np.array([list(e.raw.values) for e in together.embeddings])
    separate = np.array([list(m.embeddings[0].raw.values) for m in merged])
    assert batched.shape == (6, 512)
    assert np.allclose(batched, separate, atol=1e-4)
    # Six concurrent single-face calls ran in fewer than six batches: they were merged.
    assert after[0] - before[0] < 6
    assert len({round(float(v[0]), 5) for v in batched}) == 6  # distinct faces, distinct rows


# --- swapper ----------------------------------------------------------------------------


def swap_request(
    crops: list[np.ndarray], embeddings: list[np.ndarray], **kwargs: Any
) -> swapper_pb2.SwapFacesRequest:
    return swapper_pb2.SwapFacesRequest(
        target_crops=[encode_raw(c) for c in crops],
        source_embeddings=[common_pb2.Embedding(values=e.tolist()) for e in embeddings],
        **kwargs,
    )


def crops_from(reply: swapper_pb2.SwapFacesResponse) -> np.ndarray:
    return np.stack([decode_image(image) for image in reply.swapped_crops])


async def test_swapper_fixture_end_to_end(
    stage_server: Any, contract_fixtures: dict[str, Path]
) -> None:
    rng = np.random.default_rng(7)
    source_a, source_b = rng.normal(size=(2, 512)).astype(np.float32)
    crops = crops_of(5, 128, seed=11)
    async with stage_server(
        "swapper", contract_fixtures["inswapper"], batch_window_ms=200, max_batch_size=8
    ) as (_, channel):
        stub = swapper_pb2_grpc.SwapperServiceStub(channel)
        info = (await stub.GetModelInfo(swapper_pb2.GetModelInfoRequest())).model_info
        assert (info.input_width_px, info.alignment_template, info.embedding_size) == (
            128,
            "arcface_128",
            512,
        )
        assert len(info.alignment_points) == 5
        batch = crops_from(await stub.SwapFaces(swap_request(crops, [source_a])))
        per_crop = crops_from(await stub.SwapFaces(swap_request(crops, [source_a] * 5)))
        other = crops_from(await stub.SwapFaces(swap_request(crops, [source_b])))
        before = batch_counts("swapper")
        singles = await asyncio.gather(
            *(stub.SwapFaces(swap_request([c], [source_a])) for c in crops)
        )
        after = batch_counts("swapper")
        png = await stub.SwapFaces(
            swap_request(crops[:1], [source_a], output_format=common_pb2.IMAGE_FORMAT_PNG)
        )
    assert batch.shape == (5, 128, 128, 3)
    assert np.array_equal(batch, per_crop)  # one embedding for all == one per crop
    merged = np.stack([crops_from(s)[0] for s in singles])
    assert np.abs(merged.astype(int) - batch.astype(int)).max() <= 1  # merging changes nothing
    assert after[0] - before[0] < 5
    # Order: each output belongs to its own input (the outputs differ crop to crop).
    assert all(not np.array_equal(batch[i], batch[i + 1]) for i in range(4))
    # A different source identity gives a clearly different output.
    assert np.abs(batch.astype(int) - other.astype(int)).mean() > 2.0
    assert png.swapped_crops[0].encoded[:4] == b"\x89PNG"
    assert np.array_equal(decode_image(png.swapped_crops[0]), batch[0])


async def test_swapper_rejects_bad_embeddings_and_crops(
    stage_server: Any, contract_fixtures: dict[str, Path]
) -> None:
    crops = crops_of(3, 128)
    good = np.ones(512, dtype=np.float32)
    cases = [
        (swap_request(crops, [np.ones(128, dtype=np.float32)]), "source_embeddings"),
        (swap_request(crops, [good, good]), "source_embeddings"),
        (swap_request(crops, []), "source_embeddings"),
        (swap_request(crops, [np.zeros(512, dtype=np.float32)]), "source_embeddings"),
        (swap_request(crops_of(1, 112), [good]), "target_crops[0]"),
        (swap_request([], [good]), "target_crops"),
    ]
    async with stage_server("swapper", contract_fixtures["inswapper"]) as (_, channel):
        stub = swapper_pb2_grpc.SwapperServiceStub(channel)
        for request, field in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.SwapFaces(request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in (caught.value.details() or "")
        reply = await stub.SwapFaces(swap_request(crops, [good]))
        assert len(reply.swapped_crops) == 3


# --- enhancer ---------------------------------------------------------------------------


async def test_enhancer_fixtures_end_to_end(
    stage_server: Any, contract_fixtures: dict[str, Path]
) -> None:
    crops = crops_of(3, 512, seed=5)
    request = enhancer_pb2.EnhanceFacesRequest(crops=[encode_raw(c) for c in crops])
    async with stage_server("enhancer", contract_fixtures["gfpgan"]) as (_, channel):
        stub = enhancer_pb2_grpc.EnhancerServiceStub(channel)
        info = (await stub.GetModelInfo(enhancer_pb2.GetModelInfoRequest())).model_info
        assert (info.input_width_px, info.alignment_template) == (512, "ffhq_512")
        reply = await stub.EnhanceFaces(request)
        single = await stub.EnhanceFaces(
            enhancer_pb2.EnhanceFacesRequest(crops=[encode_raw(crops[2])])
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.EnhanceFaces(
                enhancer_pb2.EnhanceFacesRequest(crops=[encode_raw(crops_of(1, 128)[0])])
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "crops[0]" in (caught.value.details() or "")
    out = np.stack([decode_image(i) for i in reply.enhanced_crops])
    assert out.shape == (3, 512, 512, 3)
    assert np.array_equal(out[2], decode_image(single.enhanced_crops[0]))
    assert not np.array_equal(out[0], out[1])

    async with stage_server("enhancer", contract_fixtures["codeformer"]) as (_, channel):
        stub = enhancer_pb2_grpc.EnhancerServiceStub(channel)
        low = await stub.EnhanceFaces(
            enhancer_pb2.EnhanceFacesRequest(crops=request.crops[:1], fidelity_weight=0.1)
        )
        high = await stub.EnhanceFaces(
            enhancer_pb2.EnhanceFacesRequest(crops=request.crops[:1], fidelity_weight=0.9)
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.EnhanceFaces(
                enhancer_pb2.EnhanceFacesRequest(crops=request.crops[:1], fidelity_weight=1.5)
            )
        assert "fidelity_weight" in (caught.value.details() or "")
    assert not np.array_equal(
        decode_image(low.enhanced_crops[0]), decode_image(high.enhanced_crops[0])
    )
