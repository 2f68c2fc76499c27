"""Which target faces get swapped: FaceFusion's face selector modes, orders and distance.

Semantics follow FaceFusion 3.x (``facefusion/face_selector.py`` and
``facefusion/face_analyser.py``), re-implemented here:

- ``many`` swaps every detected face; ``one`` swaps the face at ``position`` after
  sorting by ``order``; ``reference`` swaps every face whose identity distance to the
  reference face is below ``reference_distance``.
- Orders sort by the box's left edge, top edge, area, or the detector score, exactly as
  FaceFusion's ``sort_faces_by_order`` does (ties keep detector order).
- Identity distance is FaceFusion's: ``1 - cos`` of the normalised embeddings (0..2),
  mapped linearly onto 0..1 (``numpy.interp(d, [0, 2], [0, 1])`` in its
  ``compare_faces``), so the 0..1 distance is ``(1 - cos) / 2``. A face matches when the
  distance is strictly below the threshold; the default 0.3 means cosine above 0.4,
  which is what MODEL_CONTRACTS.md states. (FaceFusion 1.x/2.x compared the raw
  ``1 - cos`` instead; the 0..1 scale of 3.x is the one its users now set.)

Two deliberate differences: in mode ``one`` a ``position`` past the last face selects
no face, where FaceFusion clamps to the last face (swapping a face the caller did not
ask for is worse than swapping none); and :func:`average_identity` renormalises the mean
of the normalised embeddings, where FaceFusion keeps the shorter mean vector (which
shrinks every cosine it enters and so moves the threshold).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from facestage.errors import InvalidArgumentError
from facestage.swap.v1 import swap_pb2
from facestage.types import DetectedFace, Embedding

SelectorMode = Literal["many", "one", "reference"]
FaceOrder = Literal[
    "large-small",
    "small-large",
    "left-right",
    "right-left",
    "top-bottom",
    "bottom-top",
    "best-worst",
]
SELECTOR_MODES: tuple[SelectorMode, ...] = get_args(SelectorMode)
FACE_ORDERS: tuple[FaceOrder, ...] = get_args(FaceOrder)

DEFAULT_REFERENCE_DISTANCE = 0.3
"""FaceFusion's default ``reference_face_distance``: a match needs cosine above 0.4."""

_MODES_FROM_PROTO: dict[int, SelectorMode] = {
    swap_pb2.FACE_SELECTOR_MODE_UNSPECIFIED: "many",
    swap_pb2.FACE_SELECTOR_MODE_MANY: "many",
    swap_pb2.FACE_SELECTOR_MODE_ONE: "one",
    swap_pb2.FACE_SELECTOR_MODE_REFERENCE: "reference",
}
_ORDERS_FROM_PROTO: dict[int, FaceOrder] = {
    swap_pb2.FACE_SELECTOR_ORDER_UNSPECIFIED: "large-small",
    swap_pb2.FACE_SELECTOR_ORDER_LARGE_SMALL: "large-small",
    swap_pb2.FACE_SELECTOR_ORDER_SMALL_LARGE: "small-large",
    swap_pb2.FACE_SELECTOR_ORDER_LEFT_RIGHT: "left-right",
    swap_pb2.FACE_SELECTOR_ORDER_RIGHT_LEFT: "right-left",
    swap_pb2.FACE_SELECTOR_ORDER_TOP_BOTTOM: "top-bottom",
    swap_pb2.FACE_SELECTOR_ORDER_BOTTOM_TOP: "bottom-top",
    swap_pb2.FACE_SELECTOR_ORDER_BEST_WORST: "best-worst",
}


@dataclass(frozen=True)
class SelectionOptions:
    """How target faces are selected; the defaults are FaceFusion's."""

    mode: SelectorMode = "many"
    order: FaceOrder = "large-small"
    """Order used by mode ``one``."""
    position: int = 0
    """Mode ``one``: index in ``order`` of the face to swap."""
    reference_embedding: Embedding | None = None
    """Mode ``reference``: the reference face's embedding (any norm)."""
    reference_distance: float = DEFAULT_REFERENCE_DISTANCE
    """Mode ``reference``: faces strictly closer than this (0..1 scale) are swapped."""

    def __post_init__(self) -> None:
        if self.mode not in SELECTOR_MODES:
            raise ValueError(f"mode must be one of {SELECTOR_MODES}, got {self.mode!r}")
        if self.order not in FACE_ORDERS:
            raise ValueError(f"order must be one of {FACE_ORDERS}, got {self.order!r}")
        if self.position < 0:
            raise ValueError(f"position must be 0 or more, got {self.position}")
        if not 0.0 <= self.reference_distance <= 1.0:
            raise ValueError(f"reference_distance must be in [0, 1], got {self.reference_distance}")


def _area(face: DetectedFace) -> float:
    x0, y0, x1, y1 = (float(v) for v in face.box[:4])
    return (x1 - x0) * (y1 - y0)


_ORDER_KEYS: dict[FaceOrder, tuple[Callable[[DetectedFace], float], bool]] = {
    "large-small": (_area, True),
    "small-large": (_area, False),
    "left-right": (lambda face: float(face.box[0]), False),
    "right-left": (lambda face: float(face.box[0]), True),
    "top-bottom": (lambda face: float(face.box[1]), False),
    "bottom-top": (lambda face: float(face.box[1]), True),
    "best-worst": (lambda face: float(face.score), True),
}


def sort_faces(faces: Sequence[DetectedFace], order: FaceOrder) -> list[int]:
    """Indices of ``faces`` in ``order``; equal keys keep detector order.

    Keys as in FaceFusion: box area for large/small, the box's left edge for
    left/right, its top edge for top/bottom, the detector score for best-worst.
    """
    key, descending = _ORDER_KEYS[order]
    # sorted() is stable also with reverse=True, so ties stay in detector order.
    return sorted(range(len(faces)), key=lambda i: key(faces[i]), reverse=descending)


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    norm = np.linalg.norm(vector, axis=-1, keepdims=True)
    if np.any(norm == 0) or not np.all(np.isfinite(norm)):
        raise ValueError("an embedding has zero or non-finite length")
    unit: np.ndarray = vector / norm
    return unit


def identity_distance(a: Embedding, b: Embedding) -> float:
    """FaceFusion's identity distance on its 0..1 scale: ``(1 - cos(a, b)) / 2``.

    0 for the same direction, 0.5 for orthogonal vectors, 1 for opposite ones. The
    vectors are normalised here, so raw and normalised embeddings give the same answer.
    """
    if np.shape(a) != np.shape(b):
        raise ValueError(f"embeddings differ in shape: {np.shape(a)} and {np.shape(b)}")
    cosine = float(np.dot(_unit(a), _unit(b)))
    return float(np.clip((1.0 - cosine) / 2.0, 0.0, 1.0))


def select_faces(
    faces: Sequence[DetectedFace],
    options: SelectionOptions,
    embeddings: np.ndarray | None = None,
) -> list[int]:
    """Indices of the faces to swap, in detector order.

    ``embeddings`` (N, D), one row per face, is needed in mode ``reference`` only;
    without it, or without ``options.reference_embedding``, that mode raises ValueError
    (the caller must embed the targets first).
    """
    if options.mode == "many":
        return list(range(len(faces)))
    if options.mode == "one":
        ordered = sort_faces(faces, options.order)
        return [ordered[options.position]] if options.position < len(ordered) else []
    if options.reference_embedding is None:
        raise ValueError("reference mode needs options.reference_embedding")
    if not faces:
        return []
    if embeddings is None:
        raise ValueError("reference mode needs the target faces' embeddings")
    vectors = np.asarray(embeddings)
    reference = np.asarray(options.reference_embedding).reshape(-1)
    if vectors.ndim != 2 or vectors.shape[0] != len(faces):
        raise ValueError(f"expected embeddings of shape ({len(faces)}, D), got {vectors.shape}")
    if vectors.shape[1] != reference.shape[0]:
        raise ValueError(
            f"target embeddings have {vectors.shape[1]} values, the reference {reference.shape[0]}"
        )
    cosines = _unit(vectors) @ _unit(reference)
    distances = (1.0 - cosines) / 2.0
    return [int(i) for i in np.flatnonzero(distances < options.reference_distance)]


def average_identity(embeddings: np.ndarray) -> Embedding:
    """One identity from several source faces: the mean of the normalised vectors, renormalised.

    Normalising first gives each photo the same weight whatever its embedding's length
    (which tracks image quality more than identity).
    """
    vectors = np.asarray(embeddings, dtype=np.float64)
    if vectors.ndim == 1:
        vectors = vectors[np.newaxis]
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"expected embeddings of shape (N, D) with N >= 1, got {vectors.shape}")
    mean = _unit(vectors).mean(axis=0)
    if np.linalg.norm(mean) < 1e-6:
        raise ValueError("the source identities cancel out (their mean is the zero vector)")
    return np.asarray(_unit(mean), dtype=np.float32)


def selection_from_proto(
    options: swap_pb2.SwapOptions, reference_embedding: Embedding | None
) -> SelectionOptions:
    """The selection a request asks for; unset enums take FaceFusion's defaults.

    ``reference_embedding`` is the embedding of the largest face of
    ``options.reference_face_image``, which the caller computes (None if none given).
    Raises :class:`InvalidArgumentError` naming the offending field.
    """
    mode = _MODES_FROM_PROTO.get(options.face_selector_mode)
    if mode is None:
        raise InvalidArgumentError(
            "options.face_selector_mode", f"unknown value {options.face_selector_mode}"
        )
    order = _ORDERS_FROM_PROTO.get(options.face_selector_order)
    if order is None:
        raise InvalidArgumentError(
            "options.face_selector_order", f"unknown value {options.face_selector_order}"
        )
    distance = DEFAULT_REFERENCE_DISTANCE
    if options.HasField("reference_face_distance"):
        distance = float(options.reference_face_distance)
        if not 0.0 <= distance <= 1.0:  # also rejects NaN
            raise InvalidArgumentError(
                "options.reference_face_distance",
                f"must be in [0, 1] ((1 - cosine) / 2; default {DEFAULT_REFERENCE_DISTANCE}), "
                f"got {distance:g}",
            )
    if mode == "reference" and not options.HasField("reference_face_image"):
        raise InvalidArgumentError(
            "options.reference_face_image",
            "face selector mode reference needs an image of the reference face",
        )
    if mode == "reference" and reference_embedding is None:
        # The caller embeds the reference image before mapping; without a face in it
        # there is nothing to compare against.
        raise InvalidArgumentError(
            "options.reference_face_image", "no reference embedding was computed from it"
        )
    return SelectionOptions(
        mode=mode,
        order=order,
        position=int(options.face_position),
        reference_embedding=reference_embedding if mode == "reference" else None,
        reference_distance=distance,
    )
