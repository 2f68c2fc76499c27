"""Face alignment: the similarity fit, warping onto templates, masks and pasting back."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage.transform import SimilarityTransform

from facestage.alignment import (
    TEMPLATES,
    align_face,
    box_mask,
    estimate_similarity,
    paste_back,
    template_points,
)


def _similarity(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    angle = np.deg2rad(angle_deg)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.hstack([rotation, np.array(shift, dtype=np.float64)[:, None]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.asarray(np.asarray(points, dtype=np.float64) @ matrix[:, :2].T + matrix[:, 2])


def _frame_landmarks(
    name: str, size: int, angle_deg: float, face_px: float, centre: float
) -> np.ndarray:
    """The template's points placed in a frame: rotated, scaled to ``face_px``, centred."""
    points = template_points(name, size)  # type: ignore[arg-type]
    scale = face_px / size
    matrix = _similarity(angle_deg, scale, (0.0, 0.0))
    placed = _apply(matrix, points - size / 2) + centre
    return placed.astype(np.float32)


def _dot_image(shape: tuple[int, int], points: np.ndarray, sigma: float) -> np.ndarray:
    """A black BGR frame with a Gaussian dot of peak 255 at each point (sub-pixel)."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    image = np.zeros(shape, dtype=np.float64)
    for x, y in points:
        image += 255.0 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    gray = np.clip(image, 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


def _centroid_near(image: np.ndarray, point: np.ndarray, radius: int) -> np.ndarray:
    gray = image[..., 0].astype(np.float64)
    x0, y0 = round(point[0]) - radius, round(point[1]) - radius
    window = gray[max(y0, 0) : y0 + 2 * radius + 1, max(x0, 0) : x0 + 2 * radius + 1]
    assert window.sum() > 0, f"no dot near {point}"
    ys, xs = np.mgrid[0 : window.shape[0], 0 : window.shape[1]]
    total = window.sum()
    return np.array(
        [(xs * window).sum() / total + max(x0, 0), (ys * window).sum() / total + max(y0, 0)]
    )


# --- estimate_similarity ----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_estimate_similarity_agrees_with_skimage(seed: int) -> None:
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 200, size=(5, 2))
    truth = _similarity(
        rng.uniform(-180, 180), rng.uniform(0.2, 3.0), tuple(rng.uniform(-50, 50, 2))
    )
    dst = _apply(truth, src) + rng.normal(0, 2.0, size=(5, 2))  # not exactly similar

    reference = SimilarityTransform.from_estimate(src, dst)
    assert reference
    np.testing.assert_allclose(estimate_similarity(src, dst), reference.params[:2], atol=1e-6)


def test_estimate_similarity_recovers_a_known_transform_exactly() -> None:
    src = TEMPLATES["arcface_112_v2"][1]
    truth = _similarity(33.0, 1.75, (12.5, -40.25))
    matrix = estimate_similarity(src, _apply(truth, src))
    np.testing.assert_allclose(matrix, truth, atol=1e-9)


def test_estimate_similarity_identity() -> None:
    src = TEMPLATES["ffhq_512"][1]
    np.testing.assert_allclose(estimate_similarity(src, src), np.eye(2, 3), atol=1e-9)


# --- templates ---------------------------------------------------------------------------


def test_template_points_scale_with_the_crop_size() -> None:
    native, points = TEMPLATES["arcface_128"]
    assert native == 128
    np.testing.assert_allclose(template_points("arcface_128", 128), points)
    np.testing.assert_allclose(template_points("arcface_128", 256), points * 2)
    np.testing.assert_allclose(template_points("ffhq_512", 256), TEMPLATES["ffhq_512"][1] / 2)
    np.testing.assert_allclose(
        template_points("arcface_112_v2", 224)[0], [38.2946 * 2, 51.6963 * 2]
    )
    # arcface_128 is arcface_112_v2 shifted 8 px right at its own size.
    np.testing.assert_allclose(
        template_points("arcface_128", 128) - template_points("arcface_112_v2", 112), [[8, 0]] * 5
    )


# --- align_face --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("arcface_112_v2", 112),
        ("arcface_128", 128),
        ("ffhq_512", 512),
        ("arcface_128", 256),
        ("arcface_112_v2", 224),
    ],
)
def test_align_face_maps_landmarks_onto_the_template(name: str, size: int) -> None:
    landmarks = _frame_landmarks(name, size, angle_deg=17.0, face_px=180.0, centre=150.0)
    sigma = 2.5
    frame = _dot_image((300, 300), landmarks, sigma)

    aligned = align_face(frame, landmarks, name, size)  # type: ignore[arg-type]

    assert aligned.crop.shape == (size, size, 3)
    assert aligned.crop.dtype == np.uint8
    expected = template_points(name, size)  # type: ignore[arg-type]
    np.testing.assert_allclose(_apply(aligned.matrix, landmarks), expected, atol=1e-3)
    radius = max(5, round(4 * sigma * size / 180.0))
    for point in expected:
        found = _centroid_near(aligned.crop, point, radius)
        assert np.linalg.norm(found - point) < 1.0, (name, size, point, found)


def test_align_face_accepts_template_points_directly() -> None:
    landmarks = _frame_landmarks("arcface_128", 128, angle_deg=-8.0, face_px=120.0, centre=100.0)
    frame = _dot_image((200, 200), landmarks, 2.0)
    by_name = align_face(frame, landmarks, "arcface_128", 128)
    by_points = align_face(frame, landmarks, template_points("arcface_128", 128), 128)
    np.testing.assert_array_equal(by_name.crop, by_points.crop)
    np.testing.assert_allclose(by_name.matrix, by_points.matrix)


# --- box_mask ----------------------------------------------------------------------------


def test_box_mask_is_one_inside_and_zero_at_the_border() -> None:
    mask = box_mask(128)
    assert mask.shape == (128, 128)
    assert mask.dtype == np.float32
    assert mask[64, 64] == pytest.approx(1.0, abs=1e-4)
    assert mask[32:96, 32:96].min() > 0.99
    for edge in (mask[0, :], mask[-1, :], mask[:, 0], mask[:, -1]):
        assert edge.max() < 0.1
    assert mask[0, 0] < 0.01
    assert mask.min() >= 0.0 and mask.max() <= 1.0 + 1e-6


def test_box_mask_padding_zeroes_its_side_only() -> None:
    plain = box_mask(128)
    top = box_mask(128, padding_percent=(25, 0, 0, 0))
    left = box_mask(128, padding_percent=(0, 0, 0, 50))
    assert plain[20, 64] > 0.95 and top[20, 64] < 0.05
    assert top[100, 64] == pytest.approx(plain[100, 64], abs=1e-4)
    assert plain[64, 40] > 0.95 and left[64, 40] < 0.05
    assert left[64, 100] == pytest.approx(plain[64, 100], abs=1e-4)


def test_box_mask_without_blur_is_a_hard_box() -> None:
    mask = box_mask(64, blur=0.0)
    assert set(np.unique(mask).tolist()) == {0.0, 1.0}
    assert mask[0, 32] == 0.0 and mask[32, 32] == 1.0


# --- paste_back --------------------------------------------------------------------------


def _textured_frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colourful frame (interpolation barely changes it)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [
        128 + 100 * np.sin(xs / 23.0 + seed),
        128 + 100 * np.cos(ys / 17.0),
        128 + 80 * np.sin((xs + ys) / 31.0),
    ]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def _mapped_bbox(matrix: np.ndarray, size: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], dtype=np.float64)
    mapped = _apply(inverse, corners)
    x0 = max(int(np.floor(mapped[:, 0].min())), 0)
    y0 = max(int(np.floor(mapped[:, 1].min())), 0)
    x1 = min(int(np.ceil(mapped[:, 0].max())) + 1, shape[1])
    y1 = min(int(np.ceil(mapped[:, 1].max())) + 1, shape[0])
    return x0, y0, x1, y1


def test_paste_back_changes_only_the_face_region() -> None:
    frame = _textured_frame(240, 320)
    landmarks = _frame_landmarks("arcface_128", 128, angle_deg=25.0, face_px=90.0, centre=120.0)
    aligned = align_face(frame, landmarks, "arcface_128", 128)
    white = np.full((128, 128, 3), 255, dtype=np.uint8)
    before = frame.copy()

    result = paste_back(frame, white, aligned.matrix, box_mask(128))

    assert result is frame
    x0, y0, x1, y1 = _mapped_bbox(aligned.matrix, 128, frame.shape)
    assert 0 < x0 < x1 < 320 and 0 < y0 < y1 < 240
    outside = np.ones(frame.shape[:2], dtype=bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(frame[outside], before[outside])
    # The face centre (nose) is white now; the region really changed.
    nose_x, nose_y = np.round(landmarks[2]).astype(int)
    assert frame[nose_y, nose_x].min() >= 250
    changed = np.any(frame != before, axis=-1)
    assert changed.sum() > 0.3 * (x1 - x0) * (y1 - y0)


def test_paste_back_with_zero_blend_changes_nothing() -> None:
    frame = _textured_frame(200, 200)
    landmarks = _frame_landmarks("arcface_112_v2", 112, angle_deg=5.0, face_px=100.0, centre=100.0)
    aligned = align_face(frame, landmarks, "arcface_112_v2", 112)
    before = frame.copy()
    paste_back(frame, np.zeros((112, 112, 3), np.uint8), aligned.matrix, box_mask(112), blend=0.0)
    np.testing.assert_array_equal(frame, before)


def test_paste_back_half_blend_is_halfway() -> None:
    frame = np.full((200, 200, 3), 100, dtype=np.uint8)
    landmarks = _frame_landmarks("arcface_128", 128, angle_deg=0.0, face_px=100.0, centre=100.0)
    aligned = align_face(frame, landmarks, "arcface_128", 128)
    white = np.full((128, 128, 3), 200, dtype=np.uint8)
    paste_back(frame, white, aligned.matrix, box_mask(128), blend=0.5)
    assert frame[100, 100].tolist() == [150, 150, 150]


@pytest.mark.parametrize(("name", "size"), [("arcface_128", 128), ("ffhq_512", 512)])
def test_paste_back_of_an_aligned_crop_round_trips(name: str, size: int) -> None:
    frame = _textured_frame(240, 320, seed=3)
    landmarks = _frame_landmarks(name, size, angle_deg=-20.0, face_px=140.0, centre=120.0)
    aligned = align_face(frame, landmarks, name, size)  # type: ignore[arg-type]
    mask = box_mask(size)
    pasted = paste_back(frame.copy(), aligned.crop, aligned.matrix, mask)

    inverse = cv2.invertAffineTransform(aligned.matrix)
    frame_mask = cv2.warpAffine(mask, inverse, (320, 240), flags=cv2.INTER_LINEAR)
    interior = frame_mask > 0.99
    assert interior.sum() > 2000
    diff = np.abs(pasted.astype(int) - frame.astype(int))[interior]
    assert diff.mean() < 1.5
    assert diff.max() <= 12


@pytest.mark.parametrize("centre", [(10.0, 15.0), (310.0, 230.0)])
def test_face_near_the_frame_edge(centre: tuple[float, float]) -> None:
    frame = _textured_frame(240, 320)
    points = template_points("arcface_128", 128) - 64
    landmarks = (points * (120 / 128) + np.array(centre)).astype(np.float32)
    aligned = align_face(frame, landmarks, "arcface_128", 128)
    assert aligned.crop.shape == (128, 128, 3)
    before = frame.copy()

    white = np.full((128, 128, 3), 255, dtype=np.uint8)
    paste_back(frame, white, aligned.matrix, box_mask(128))

    assert frame.shape == (240, 320, 3)
    x0, y0, x1, y1 = _mapped_bbox(aligned.matrix, 128, frame.shape)
    assert (x0 == 0 and y0 == 0) or (x1 == 320 and y1 == 240)  # clipped
    outside = np.ones(frame.shape[:2], dtype=bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(frame[outside], before[outside])
    cx, cy = int(centre[0]), int(centre[1])
    assert frame[cy, cx].min() >= 240  # the part of the face inside the frame is pasted


def test_paste_back_of_a_face_entirely_outside_is_a_no_op() -> None:
    frame = _textured_frame(100, 100)
    points = template_points("arcface_128", 128) + 1000.0
    matrix = estimate_similarity(points, template_points("arcface_128", 128))
    before = frame.copy()
    paste_back(frame, np.zeros((128, 128, 3), np.uint8), matrix, box_mask(128))
    np.testing.assert_array_equal(frame, before)
