"""Conversions between detected faces and their proto messages (used by stages and clients)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from facestage.common.v1 import common_pb2
from facestage.errors import InvalidArgumentError
from facestage.types import DetectedFace, Embedding, FaceLandmark5


def face_to_proto(face: DetectedFace) -> common_pb2.Face:
    """A detected face as ``facestage.common.v1.Face``."""
    x0, y0, x1, y1 = (float(v) for v in face.box)
    message = common_pb2.Face(
        box=common_pb2.BoundingBox(x_min=x0, y_min=y0, x_max=x1, y_max=y1),
        score=float(face.score),
    )
    for x, y in face.landmarks:
        message.landmarks.add(x=float(x), y=float(y))
    if face.embedding is not None:
        message.embedding.values.extend(face.embedding.astype(np.float32).tolist())
    return message


def face_from_proto(message: common_pb2.Face) -> DetectedFace:
    """A ``facestage.common.v1.Face`` as a DetectedFace (landmarks may be empty)."""
    box = np.array(
        [message.box.x_min, message.box.y_min, message.box.x_max, message.box.y_max],
        dtype=np.float32,
    )
    landmarks = np.array([[p.x, p.y] for p in message.landmarks], dtype=np.float32).reshape(-1, 2)
    embedding = (
        np.array(message.embedding.values, dtype=np.float32)
        if message.HasField("embedding") and message.embedding.values
        else None
    )
    return DetectedFace(box=box, landmarks=landmarks, score=message.score, embedding=embedding)


def landmarks_from_proto(points: Sequence[common_pb2.Point], field_name: str) -> FaceLandmark5:
    """Five proto points as a (5, 2) array, or INVALID_ARGUMENT naming the field."""
    if len(points) != 5:
        raise InvalidArgumentError(field_name, f"expected 5 landmarks, got {len(points)}")
    landmarks = np.array([[p.x, p.y] for p in points], dtype=np.float32)
    if not np.all(np.isfinite(landmarks)):
        raise InvalidArgumentError(field_name, "landmarks must be finite numbers")
    return landmarks


def embedding_to_proto(vector: Embedding) -> common_pb2.Embedding:
    """A vector as ``facestage.common.v1.Embedding``."""
    return common_pb2.Embedding(values=np.asarray(vector, dtype=np.float32).tolist())


def embeddings_from_proto(messages: Sequence[common_pb2.Embedding], field_name: str) -> np.ndarray:
    """Proto embeddings as an (N, D) float32 array; all must have the same length."""
    if not messages:
        raise InvalidArgumentError(field_name, "is empty: send at least one embedding")
    sizes = {len(m.values) for m in messages}
    if len(sizes) != 1:
        raise InvalidArgumentError(field_name, f"embeddings differ in length: {sorted(sizes)}")
    return np.array([list(m.values) for m in messages], dtype=np.float32)
