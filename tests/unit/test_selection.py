"""Face selection: orders, mode one, reference distance, averaging, proto mapping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facestage.common.v1 import common_pb2
from facestage.errors import InvalidArgumentError
from facestage.swap.v1 import swap_pb2
from facestage.types import DetectedFace, Embedding
from orchestrator.selection import (
    DEFAULT_REFERENCE_DISTANCE,
    FACE_ORDERS,
    FaceOrder,
    SelectionOptions,
    average_identity,
    identity_distance,
    select_faces,
    selection_from_proto,
    sort_faces,
)


def face(x0: float, y0: float, x1: float, y1: float, score: float = 0.9) -> DetectedFace:
    return DetectedFace(
        box=np.array([x0, y0, x1, y1], dtype=np.float32),
        landmarks=np.zeros((5, 2), dtype=np.float32),
        score=score,
    )


# Detector order is by score; geometry chosen so every order gives a different answer.
FACES = [
    face(100, 50, 140, 90, score=0.95),  # 0: 40x40 = 1600, middle left, top
    face(300, 200, 400, 300, score=0.90),  # 1: 100x100 = 10000, right, bottom
    face(10, 120, 70, 180, score=0.80),  # 2: 60x60 = 3600, leftmost, middle
]


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        ("large-small", [1, 2, 0]),
        ("small-large", [0, 2, 1]),
        ("left-right", [2, 0, 1]),
        ("right-left", [1, 0, 2]),
        ("top-bottom", [0, 2, 1]),
        ("bottom-top", [1, 2, 0]),
        ("best-worst", [0, 1, 2]),
    ],
)
def test_sort_faces_by_each_order(order: FaceOrder, expected: list[int]) -> None:
    assert sort_faces(FACES, order) == expected


def test_every_order_is_tested_and_ties_keep_detector_order() -> None:
    assert len(FACE_ORDERS) == 7
    twins = [face(0, 0, 10, 10), face(50, 0, 60, 10), face(100, 0, 110, 10)]
    assert sort_faces(twins, "large-small") == [0, 1, 2]
    assert sort_faces(twins, "small-large") == [0, 1, 2]
    assert sort_faces([], "left-right") == []


def test_mode_many_selects_all_in_detector_order() -> None:
    assert select_faces(FACES, SelectionOptions()) == [0, 1, 2]
    assert select_faces([], SelectionOptions()) == []


@pytest.mark.parametrize(
    ("order", "position", "expected"),
    [
        ("large-small", 0, [1]),
        ("large-small", 1, [2]),
        ("left-right", 0, [2]),
        ("right-left", 2, [2]),
        ("best-worst", 1, [1]),
        ("large-small", 3, []),  # beyond the count: nothing, not the last face
        ("large-small", 99, []),
    ],
)
def test_mode_one_takes_the_face_at_position(
    order: FaceOrder, position: int, expected: list[int]
) -> None:
    options = SelectionOptions(mode="one", order=order, position=position)
    assert select_faces(FACES, options) == expected


def unit(degrees: float, dims: int = 8, length: float = 1.0) -> Embedding:
    """A vector of ``length`` at ``degrees`` from the first axis, in the plane of axes 0 and 1."""
    vector = np.zeros(dims, dtype=np.float32)
    vector[0] = length * math.cos(math.radians(degrees))
    vector[1] = length * math.sin(math.radians(degrees))
    return vector


def test_identity_distance_is_one_minus_cosine_halved() -> None:
    assert identity_distance(unit(0), unit(0)) == pytest.approx(0.0, abs=1e-6)
    assert identity_distance(unit(0), unit(90)) == pytest.approx(0.5, abs=1e-6)
    assert identity_distance(unit(0), unit(180)) == pytest.approx(1.0, abs=1e-6)
    # cos 60 deg = 0.5 -> 0.25; the norm of the inputs does not matter.
    assert identity_distance(unit(0, length=7.0), unit(60, length=0.1)) == pytest.approx(
        0.25, abs=1e-6
    )
    # The default threshold 0.3 is cosine 0.4, as MODEL_CONTRACTS.md states.
    threshold_angle = math.degrees(math.acos(0.4))
    assert identity_distance(unit(0), unit(threshold_angle)) == pytest.approx(
        DEFAULT_REFERENCE_DISTANCE, abs=1e-6
    )
    with pytest.raises(ValueError, match="shape"):
        identity_distance(unit(0, 8), unit(0, 4))


def test_reference_mode_matches_strictly_below_the_distance() -> None:
    reference = unit(0, length=3.0)  # raw, unnormalised reference
    threshold_angle = math.degrees(math.acos(0.4))  # distance exactly 0.3
    embeddings = np.stack(
        [
            unit(threshold_angle - 2),  # cos ~0.43 -> 0.28: match
            unit(threshold_angle + 2),  # cos ~0.37 -> 0.32: no match
            unit(10),  # same person: match
        ]
    )
    options = SelectionOptions(mode="reference", reference_embedding=reference)
    assert select_faces(FACES, options, embeddings) == [0, 2]
    strict = SelectionOptions(
        mode="reference", reference_embedding=reference, reference_distance=0.01
    )
    # 10 degrees apart: (1 - cos 10 deg) / 2 = 0.0076 < 0.01.
    assert select_faces(FACES, strict, embeddings) == [2]
    loose = SelectionOptions(
        mode="reference", reference_embedding=reference, reference_distance=0.5
    )
    assert select_faces(FACES, loose, embeddings) == [0, 1, 2]
    none = SelectionOptions(mode="reference", reference_embedding=reference, reference_distance=0.0)
    assert select_faces(FACES, none, embeddings) == []


def test_reference_mode_needs_embeddings_of_every_face() -> None:
    options = SelectionOptions(mode="reference", reference_embedding=unit(0))
    with pytest.raises(ValueError, match="embeddings"):
        select_faces(FACES, options)
    with pytest.raises(ValueError, match=r"\(3, D\)"):
        select_faces(FACES, options, np.stack([unit(0), unit(0)]))
    with pytest.raises(ValueError, match="reference_embedding"):
        select_faces(FACES, SelectionOptions(mode="reference"), np.stack([unit(0)] * 3))
    assert select_faces([], options, None) == []


def test_average_identity_is_the_renormalised_mean_of_unit_vectors() -> None:
    # 0 and 90 degrees, one of them long: each photo weighs the same -> 45 degrees.
    average = average_identity(np.stack([unit(0, length=10.0), unit(90, length=0.5)]))
    assert average.dtype == np.float32
    assert np.linalg.norm(average) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(average, unit(45), atol=1e-6)
    np.testing.assert_allclose(average_identity(unit(30)[np.newaxis]), unit(30), atol=1e-6)
    with pytest.raises(ValueError, match="cancel"):
        average_identity(np.stack([unit(0), unit(180)]))
    with pytest.raises(ValueError, match="N >= 1"):
        average_identity(np.zeros((0, 8), dtype=np.float32))


def test_selection_from_proto_defaults_are_facefusion_defaults() -> None:
    options = selection_from_proto(swap_pb2.SwapOptions(), None)
    assert options == SelectionOptions(
        mode="many", order="large-small", position=0, reference_distance=0.3
    )


def test_selection_from_proto_maps_every_enum_value() -> None:
    modes = {
        swap_pb2.FACE_SELECTOR_MODE_MANY: "many",
        swap_pb2.FACE_SELECTOR_MODE_ONE: "one",
    }
    for value, mode in modes.items():
        assert (
            selection_from_proto(swap_pb2.SwapOptions(face_selector_mode=value), None).mode == mode
        )
    orders = {
        swap_pb2.FACE_SELECTOR_ORDER_LARGE_SMALL: "large-small",
        swap_pb2.FACE_SELECTOR_ORDER_SMALL_LARGE: "small-large",
        swap_pb2.FACE_SELECTOR_ORDER_LEFT_RIGHT: "left-right",
        swap_pb2.FACE_SELECTOR_ORDER_RIGHT_LEFT: "right-left",
        swap_pb2.FACE_SELECTOR_ORDER_TOP_BOTTOM: "top-bottom",
        swap_pb2.FACE_SELECTOR_ORDER_BOTTOM_TOP: "bottom-top",
        swap_pb2.FACE_SELECTOR_ORDER_BEST_WORST: "best-worst",
    }
    assert set(orders.values()) == set(FACE_ORDERS)
    for order_value, order in orders.items():
        mapped = selection_from_proto(swap_pb2.SwapOptions(face_selector_order=order_value), None)
        assert mapped.order == order
    one = selection_from_proto(
        swap_pb2.SwapOptions(face_selector_mode=swap_pb2.FACE_SELECTOR_MODE_ONE, face_position=2),
        None,
    )
    assert (one.mode, one.position) == ("one", 2)


def test_selection_from_proto_reference_mode() -> None:
    reference = unit(0)
    request = swap_pb2.SwapOptions(
        face_selector_mode=swap_pb2.FACE_SELECTOR_MODE_REFERENCE,
        reference_face_image=common_pb2.Image(encoded=b"\xff\xd8\xff"),
        reference_face_distance=0.45,
    )
    options = selection_from_proto(request, reference)
    assert options.mode == "reference"
    assert options.reference_distance == pytest.approx(0.45)
    assert options.reference_embedding is reference


def test_reference_mode_without_an_image_names_the_field() -> None:
    request = swap_pb2.SwapOptions(face_selector_mode=swap_pb2.FACE_SELECTOR_MODE_REFERENCE)
    with pytest.raises(InvalidArgumentError) as caught:
        selection_from_proto(request, None)
    assert caught.value.field == "options.reference_face_image"
    # Even with an embedding from elsewhere, the image is what the caller must send.
    with pytest.raises(InvalidArgumentError) as caught:
        selection_from_proto(request, unit(0))
    assert caught.value.field == "options.reference_face_image"


@pytest.mark.parametrize("distance", [-0.1, 1.5, float("nan")])
def test_distance_outside_zero_one_names_the_field(distance: float) -> None:
    request = swap_pb2.SwapOptions(reference_face_distance=distance)
    with pytest.raises(InvalidArgumentError) as caught:
        selection_from_proto(request, None)
    assert caught.value.field == "options.reference_face_distance"


def test_unknown_enum_values_name_the_field() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        selection_from_proto(swap_pb2.SwapOptions(face_selector_mode=42), None)  # type: ignore[arg-type]
    assert caught.value.field == "options.face_selector_mode"
    with pytest.raises(InvalidArgumentError) as caught:
        selection_from_proto(swap_pb2.SwapOptions(face_selector_order=42), None)  # type: ignore[arg-type]
    assert caught.value.field == "options.face_selector_order"
