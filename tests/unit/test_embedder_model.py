"""Embedder model: the real MobileFaceNet on real faces, and the ArcFace contract fixture."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from facestage.errors import InvalidArgumentError
from facestage.fixtures import write_contract_fixtures
from facestage.runtime import InferenceSession, LoadedModel, NodeArg, open_session
from services.embedder.model import (
    INPUT_NORMALIZATIONS,
    Embedder,
    normalize_embeddings,
    prepare_embedder_input,
)


class CountingSession:
    """Wraps a session and counts ``run`` calls (how a batch reaches the model)."""

    def __init__(self, inner: InferenceSession) -> None:
        self.inner = inner
        self.runs = 0

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any]) -> list[Any]:
        self.runs += 1
        return self.inner.run(output_names, input_feed)

    def get_inputs(self) -> Sequence[NodeArg]:
        return self.inner.get_inputs()

    def get_outputs(self) -> Sequence[NodeArg]:
        return self.inner.get_outputs()

    def get_providers(self) -> list[str]:
        return self.inner.get_providers()


def counting(model: LoadedModel) -> tuple[LoadedModel, CountingSession]:
    session = CountingSession(model.session)
    return dataclasses.replace(model, session=session), session


@pytest.fixture(scope="module")
def mobilefacenet(mobilefacenet_path: Path) -> Embedder:
    return Embedder(open_session(mobilefacenet_path, ["cpu"]))


@pytest.fixture(scope="module")
def t1_landmarks(t1_bgr: np.ndarray, scrfd_2_5g_path: Path) -> np.ndarray:
    """Five landmarks of each face of t1.jpg, from InsightFace's SCRFD on the real model."""
    from insightface.model_zoo.scrfd import SCRFD

    detector = SCRFD(model_file=str(scrfd_2_5g_path))
    detector.prepare(-1, input_size=(640, 640))
    _, landmarks = detector.detect(t1_bgr, input_size=(640, 640))
    assert landmarks is not None and len(landmarks) == 6
    return np.asarray(landmarks, dtype=np.float32)


def _unit_embeddings(embedder: Embedder, frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    crops = np.stack([embedder.align_for_embedding(frame, points).crop for points in landmarks])
    return normalize_embeddings(embedder.embed(crops))


@pytest.mark.shared_models
def test_mobilefacenet_is_detected_and_sized_from_the_model(mobilefacenet: Embedder) -> None:
    assert mobilefacenet.family == "mobilefacenet"
    assert mobilefacenet.normalization.channel_order == "bgr"
    assert mobilefacenet.embedding_size == 128
    assert mobilefacenet.crop_size_px == 112
    assert mobilefacenet.template == "arcface_112_v2"
    # The file fixes its batch axis at 1, so batches are run item by item.
    assert mobilefacenet.model.batch_dim_fixed


@pytest.mark.shared_models
@pytest.mark.parametrize(
    ("scale", "shift"), [(0.7, (40.0, 25.0)), (1.3, (-60.0, -30.0)), (0.5, (100.0, 50.0))]
)
def test_same_face_shifted_and_rescaled_embeds_close(
    mobilefacenet: Embedder,
    t1_bgr: np.ndarray,
    t1_landmarks: np.ndarray,
    scale: float,
    shift: tuple[float, float],
) -> None:
    original = _unit_embeddings(mobilefacenet, t1_bgr, t1_landmarks)
    matrix = np.array([[scale, 0.0, shift[0]], [0.0, scale, shift[1]]])
    height, width = t1_bgr.shape[:2]
    moved = cv2.warpAffine(
        t1_bgr, matrix, (int(width * max(scale, 1.0)), int(height * max(scale, 1.0)))
    )
    moved_landmarks = t1_landmarks @ matrix[:, :2].T + matrix[:, 2]
    moved_embeddings = _unit_embeddings(mobilefacenet, moved, moved_landmarks)
    similarity = moved_embeddings @ original.T
    # Measured 0.97 to 1.00 on all six faces; 0.9 leaves room for resampling noise.
    assert np.all(np.diag(similarity) > 0.9), np.diag(similarity)
    # Each moved face is closest to itself, not to anyone else.
    assert list(similarity.argmax(axis=1)) == list(range(len(original)))


@pytest.mark.shared_models
def test_different_faces_of_t1_are_not_close(
    mobilefacenet: Embedder, t1_bgr: np.ndarray, t1_landmarks: np.ndarray
) -> None:
    embeddings = _unit_embeddings(mobilefacenet, t1_bgr, t1_landmarks)
    similarity = embeddings @ embeddings.T
    off_diagonal = similarity[~np.eye(len(embeddings), dtype=bool)]
    # Measured at most 0.32 between the six people (MODELS.md: below 0.35).
    assert off_diagonal.max() < 0.45, off_diagonal.max()


@pytest.mark.shared_models
def test_batch_gives_the_same_vectors_as_single_calls(
    mobilefacenet: Embedder, t1_bgr: np.ndarray, t1_landmarks: np.ndarray
) -> None:
    crops = np.stack([mobilefacenet.align_for_embedding(t1_bgr, p).crop for p in t1_landmarks])
    model, session = counting(mobilefacenet.model)
    embedder = Embedder(model)
    batch = embedder.embed(crops)
    assert session.runs == len(crops)  # fixed batch axis: one run per crop
    singles = np.concatenate([embedder.embed(crop[None]) for crop in crops])
    assert batch.shape == (6, 128) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, singles, atol=1e-4)


@pytest.fixture(scope="module")
def arcface_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_contract_fixtures(tmp_path_factory.mktemp("fixtures"))["arcface"]


def test_arcface_fixture_one_run_n_in_n_out_in_order(arcface_fixture: Path) -> None:
    model, session = counting(open_session(arcface_fixture, ["cpu"]))
    embedder = Embedder(model)
    assert embedder.family == "arcface"
    assert embedder.embedding_size == 512 and embedder.crop_size_px == 112
    rng = np.random.default_rng(4)
    crops = rng.integers(0, 256, size=(5, 112, 112, 3), dtype=np.uint8)
    raw = embedder.embed(crops)
    assert session.runs == 1  # dynamic batch axis: the whole batch in one session.run
    assert raw.shape == (5, 512) and raw.dtype == np.float32
    reversed_raw = embedder.embed(crops[::-1].copy())
    np.testing.assert_allclose(reversed_raw, raw[::-1], rtol=1e-5, atol=1e-4)
    # Rows really differ, so the order check above could fail.
    assert np.abs(raw[0] - raw[1]).max() > 1e-2


def test_family_can_be_forced_over_detection(arcface_fixture: Path) -> None:
    embedder = Embedder(open_session(arcface_fixture, ["cpu"]), family="mobilefacenet")
    assert embedder.normalization == INPUT_NORMALIZATIONS["mobilefacenet"]


def test_prepare_follows_each_family_convention() -> None:
    crop = np.zeros((1, 112, 112, 3), dtype=np.uint8)
    crop[..., 0] = 255  # pure blue in BGR
    arcface = prepare_embedder_input(crop, INPUT_NORMALIZATIONS["arcface"])
    mobile = prepare_embedder_input(crop, INPUT_NORMALIZATIONS["mobilefacenet"])
    assert arcface.shape == mobile.shape == (1, 3, 112, 112)
    # ArcFace: RGB, so blue is the last plane; (255 - 127.5) / 127.5 = 1.
    assert arcface[0, 2].min() == arcface[0, 2].max() == 1.0
    assert arcface[0, 0].max() == -1.0
    # MobileFaceNet: BGR, blue first; (255 - 127.5) / 128.
    np.testing.assert_allclose(mobile[0, 0], 127.5 / 128)
    np.testing.assert_allclose(mobile[0, 2], -127.5 / 128)


def test_normalize_embeddings_gives_unit_vectors_and_keeps_zero() -> None:
    raw = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    unit = normalize_embeddings(raw)
    np.testing.assert_allclose(unit[0], [0.6, 0.8], rtol=1e-6)
    assert np.all(unit[1] == 0.0)


def test_wrong_crops_name_the_field(arcface_fixture: Path) -> None:
    embedder = Embedder(open_session(arcface_fixture, ["cpu"]))
    with pytest.raises(InvalidArgumentError) as excinfo:
        embedder.embed(np.zeros((2, 128, 128, 3), dtype=np.uint8))
    assert excinfo.value.field == "crops"
    assert "112" in str(excinfo.value)
    with pytest.raises(InvalidArgumentError):
        embedder.embed(np.zeros((2, 112, 112, 3), dtype=np.float32))
