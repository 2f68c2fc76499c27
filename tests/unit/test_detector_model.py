"""The detector's model code: real SCRFD and YuNet models on real photos, and the pure steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from facestage.errors import InvalidArgumentError, ModelFileError
from facestage.runtime import LoadedModel, open_session
from facestage.types import DetectedFace, VisionFrame
from services.detector.model import (
    DetectionOptions,
    FaceDetector,
    ScrfdDetector,
    YunetDetector,
    anchor_centres,
    decode_yunet,
    greedy_nms,
    load_detector,
    prepare_detection_batch,
    warmup_frame,
)

DETECTORS = ["scrfd_2_5g", "scrfd_500m", "yunet"]


def _load(path: Path) -> FaceDetector:
    return load_detector(open_session(path, ("cpu",)))


@pytest.fixture(scope="module")
def scrfd_2_5g(scrfd_2_5g_path: Path) -> FaceDetector:
    return _load(scrfd_2_5g_path)


@pytest.fixture(scope="module")
def scrfd_500m(scrfd_500m_path: Path) -> FaceDetector:
    return _load(scrfd_500m_path)


@pytest.fixture(scope="module")
def yunet(yunet_path: Path) -> FaceDetector:
    return _load(yunet_path)


@pytest.fixture(scope="module")
def t1_faces(request: pytest.FixtureRequest, t1_bgr: np.ndarray) -> dict[str, list[DetectedFace]]:
    """Default-option detections of t1.jpg per detector, computed once."""
    return {
        name: request.getfixturevalue(name).detect([t1_bgr], DetectionOptions())[0]
        for name in DETECTORS
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return float(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))


def best_match(box: np.ndarray, boxes: Sequence[np.ndarray]) -> int:
    """Index of the box in ``boxes`` that overlaps ``box`` most; asserts a real overlap."""
    overlaps = [iou(box, other) for other in boxes]
    index = int(np.argmax(overlaps))
    assert overlaps[index] > 0.5, f"no face matches {box} (best IoU {overlaps[index]:.2f})"
    return index


# --- real models on real photos ------------------------------------------------------


@pytest.mark.parametrize("name", DETECTORS)
def test_finds_the_six_faces_of_t1(name: str, t1_faces: dict[str, list[DetectedFace]]) -> None:
    faces = t1_faces[name]
    assert len(faces) == 6
    scores = [face.score for face in faces]
    assert scores == sorted(scores, reverse=True)
    for face in faces:
        assert 0.0 < face.score <= 1.0
        assert face.box.shape == (4,) and face.landmarks.shape == (5, 2)
        x_min, y_min, x_max, y_max = face.box
        assert 60 < x_max - x_min < 200 and 80 < y_max - y_min < 200  # faces of t1 are ~100 px
        assert np.all(face.landmarks[:, 0] > x_min) and np.all(face.landmarks[:, 0] < x_max)
        assert np.all(face.landmarks[:, 1] > y_min) and np.all(face.landmarks[:, 1] < y_max)
        # Image-left eye first, mouth below the eyes: the order alignment templates expect.
        assert face.landmarks[0, 0] < face.landmarks[1, 0]
        assert face.landmarks[3, 1] > face.landmarks[0, 1]


def test_the_families_agree_on_the_faces(t1_faces: dict[str, list[DetectedFace]]) -> None:
    """YuNet's landmarks come out in the SCRFD order, on the same points."""
    reference = [face.box for face in t1_faces["scrfd_2_5g"]]
    for face in t1_faces["yunet"]:
        other = t1_faces["scrfd_2_5g"][best_match(face.box, reference)]
        # Each YuNet point is nearest the SCRFD point of the same index, and close to it
        # (the two models place points up to ~15 px apart on the tilted faces).
        distances = np.linalg.norm(face.landmarks[:, None] - other.landmarks[None], axis=2)
        np.testing.assert_array_equal(distances.argmin(axis=1), np.arange(5))
        assert distances.diagonal().max() < 20


@pytest.mark.parametrize("name", ["scrfd_2_5g", "scrfd_500m"])
def test_scrfd_decode_agrees_with_insightface(
    name: str, request: pytest.FixtureRequest, t1_bgr: np.ndarray
) -> None:
    from insightface.model_zoo.scrfd import SCRFD

    detector: FaceDetector = request.getfixturevalue(name)
    reference = SCRFD(model_file=str(detector.model.path))
    reference.prepare(ctx_id=-1, input_size=(640, 640))
    boxes, keypoints = reference.detect(t1_bgr, input_size=(640, 640))

    faces = detector.detect([t1_bgr], DetectionOptions())[0]
    assert len(faces) == len(boxes) == 6
    for face in faces:
        index = best_match(face.box, list(boxes[:, :4]))
        assert np.abs(face.box - boxes[index, :4]).max() <= 1.0
        assert np.abs(face.landmarks - keypoints[index]).max() <= 1.0
        assert face.score == pytest.approx(float(boxes[index, 4]), abs=1e-3)


def test_yunet_decode_agrees_with_opencv(yunet: FaceDetector, t1_bgr: np.ndarray) -> None:
    """cv2.FaceDetectorYN on the same letterboxed canvas gives the same faces."""
    canvas = np.zeros((640, 640, 3), dtype=np.uint8)
    canvas[:443, :640] = cv2.resize(t1_bgr, (640, 443))  # t1 is 1280x886: scale exactly 0.5
    opencv = cv2.FaceDetectorYN.create(str(yunet.model.path), "", (640, 640), 0.5, 0.4, 5000)
    _, rows = opencv.detect(canvas)
    expected_boxes = np.concatenate([rows[:, :2], rows[:, :2] + rows[:, 2:4]], axis=1) * 2.0

    faces = yunet.detect([t1_bgr], DetectionOptions())[0]
    assert len(faces) == len(rows) == 6
    for face in faces:
        index = best_match(face.box, list(expected_boxes))
        assert np.abs(face.box - expected_boxes[index]).max() <= 1.0
        assert np.abs(face.landmarks - rows[index, 4:14].reshape(5, 2) * 2.0).max() <= 1.0
        assert face.score == pytest.approx(float(rows[index, 14]), abs=1e-3)


@pytest.mark.parametrize("name", ["scrfd_2_5g", "yunet"])
def test_a_batch_returns_each_frames_own_faces(
    name: str,
    request: pytest.FixtureRequest,
    t1_bgr: np.ndarray,
    astronaut_bgr: np.ndarray,
    t1_faces: dict[str, list[DetectedFace]],
) -> None:
    detector: FaceDetector = request.getfixturevalue(name)
    blank = np.zeros((300, 500, 3), dtype=np.uint8)
    # Three sizes in one call: 1280x886, 512x512 and 500x300.
    faces = detector.detect([t1_bgr, astronaut_bgr, blank], DetectionOptions())
    assert [len(f) for f in faces] == [6, 1, 0]
    alone = t1_faces[name]
    for in_batch, single in zip(faces[0], alone, strict=True):
        np.testing.assert_allclose(in_batch.box, single.box, atol=1e-3)
    # The astronaut's face is in the upper middle of her 512x512 portrait.
    x_min, y_min, x_max, y_max = faces[1][0].box
    assert 150 < x_min < (x_min + x_max) / 2 < x_max < 300
    assert 30 < y_min < (y_min + y_max) / 2 < y_max < 230


def test_max_faces_keeps_the_best(
    scrfd_2_5g: FaceDetector, t1_bgr: np.ndarray, t1_faces: dict[str, list[DetectedFace]]
) -> None:
    everything = t1_faces["scrfd_2_5g"]
    two = scrfd_2_5g.detect([t1_bgr], DetectionOptions(max_faces=2))[0]
    assert len(two) == 2
    assert [f.score for f in two] == [f.score for f in everything[:2]]
    np.testing.assert_allclose(two[1].box, everything[1].box)


@pytest.mark.parametrize("threshold", [0.9, 0.99])
def test_score_threshold_drops_weaker_faces(
    threshold: float,
    scrfd_2_5g: FaceDetector,
    t1_bgr: np.ndarray,
    t1_faces: dict[str, list[DetectedFace]],
) -> None:
    strong = [f.score for f in t1_faces["scrfd_2_5g"] if f.score >= threshold]
    faces = scrfd_2_5g.detect([t1_bgr], DetectionOptions(score_threshold=threshold))[0]
    assert len(faces) < 6
    assert [f.score for f in faces] == pytest.approx(strong)


@pytest.mark.parametrize("name", ["scrfd_500m", "yunet"])
def test_coordinates_follow_the_frame_size(
    name: str,
    request: pytest.FixtureRequest,
    t1_bgr: np.ndarray,
    t1_faces: dict[str, list[DetectedFace]],
) -> None:
    detector: FaceDetector = request.getfixturevalue(name)
    half = np.asarray(cv2.resize(t1_bgr, (640, 443), interpolation=cv2.INTER_AREA), np.uint8)
    faces = detector.detect([half], DetectionOptions())[0]
    full = t1_faces[name]
    assert len(faces) == len(full) == 6
    for face in faces:
        index = best_match(face.box * 2.0, [f.box for f in full])
        assert np.abs(face.box * 2.0 - full[index].box).max() < 6.0
        assert np.abs(face.landmarks * 2.0 - full[index].landmarks).max() < 6.0


def test_a_smaller_detection_size_finds_the_same_face(
    scrfd_2_5g: FaceDetector, astronaut_bgr: np.ndarray
) -> None:
    at_640 = scrfd_2_5g.detect([astronaut_bgr], DetectionOptions())[0]
    at_320 = scrfd_2_5g.detect([astronaut_bgr], DetectionOptions(detection_size_px=320))[0]
    assert len(at_640) == len(at_320) == 1
    assert iou(at_640[0].box, at_320[0].box) > 0.8


def test_warmup_frame_runs_and_finds_nothing(yunet: FaceDetector) -> None:
    frame = warmup_frame()
    assert frame.shape == (640, 640, 3)
    assert yunet.detect([frame], DetectionOptions()) == [[]]
    assert yunet.detect([], DetectionOptions()) == []


# --- options and frames ----------------------------------------------------------


@pytest.mark.parametrize("size", [0, 100, 31, 650, 8192])
def test_detection_size_must_be_a_multiple_of_32(size: int) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        DetectionOptions(detection_size_px=size)
    assert info.value.field == "options.detection_size_px"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"score_threshold": 1.5}, "options.score_threshold"),
        ({"nms_iou": 0.0}, "options.nms_iou"),
        ({"max_faces": -1}, "options.max_faces"),
    ],
)
def test_other_options_are_checked(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        DetectionOptions(**kwargs)
    assert info.value.field == field


def test_a_grey_frame_is_rejected_by_index(yunet: FaceDetector) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        grey: VisionFrame = np.zeros((64, 64), dtype=np.uint8)
        yunet.detect([warmup_frame(64), grey], DetectionOptions())
    assert info.value.field == "frames[1]"


# --- unknown and foreign graphs ----------------------------------------------------


def test_an_unknown_graph_is_rejected_naming_the_file(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])
    copy = helper.make_tensor_value_info("copy", TensorProto.FLOAT, [1, 3, 32, 32])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["copy"])], "g", [image], [copy]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "not_a_detector.onnx"
    onnx.save(model, str(path))

    loaded = open_session(path, ("cpu",))
    with pytest.raises(ModelFileError, match=r"not_a_detector\.onnx") as info:
        load_detector(loaded)
    assert "1 outputs" in str(info.value)
    with pytest.raises(ModelFileError, match=r"not_a_detector\.onnx"):
        ScrfdDetector(loaded)
    with pytest.raises(ModelFileError, match=r"not_a_detector\.onnx"):
        YunetDetector(loaded)


@dataclass(frozen=True)
class FakeNode:
    name: str
    shape: Sequence[int | str | None]
    type: str = "tensor(float)"


class FakeSession:
    """Returns fixed outputs by name; records the inputs it was given."""

    def __init__(self, outputs: Mapping[str, np.ndarray], input_shape: list[Any]) -> None:
        self.outputs = dict(outputs)
        self.input_shape = input_shape
        self.fed: list[np.ndarray] = []

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any]) -> list[Any]:
        self.fed.append(input_feed["input.1"])
        return [self.outputs[name] for name in output_names or self.outputs]

    def get_inputs(self) -> Sequence[FakeNode]:
        return [FakeNode("input.1", self.input_shape)]

    def get_outputs(self) -> Sequence[FakeNode]:
        return [FakeNode(name, list(value.shape)) for name, value in self.outputs.items()]

    def get_providers(self) -> list[str]:
        return ["CPUExecutionProvider"]


def fake_model(outputs: Mapping[str, np.ndarray]) -> LoadedModel:
    session = FakeSession(outputs, [1, 3, "?", "?"])
    return LoadedModel(Path("models/fake_scrfd.onnx"), session, "CPUExecutionProvider", "0" * 64)


def test_scrfd_without_keypoints_is_rejected() -> None:
    outputs = {f"o{i}": np.zeros((800, (1, 4)[i // 3]), np.float32) for i in range(6)}
    with pytest.raises(ModelFileError, match=r"fake_scrfd\.onnx.*without keypoints"):
        load_detector(fake_model(outputs))


def test_five_stride_scrfd_decodes_one_anchor() -> None:
    """15 outputs (5 strides, 1 anchor, batch axis kept): exact box and keypoints."""
    size, strides = 128, (8, 16, 32, 64, 128)
    outputs: dict[str, np.ndarray] = {}
    for group, channels in enumerate((1, 4, 10)):
        for level, stride in enumerate(strides):
            cells = (size // stride) ** 2
            outputs[f"o{group * 5 + level}"] = np.zeros((1, cells, channels), np.float32)
    # Stride 16 (level 1), row 2, column 3: anchor point (48, 32).
    outputs["o1"][0, 2 * 8 + 3, 0] = 0.9
    outputs["o6"][0, 2 * 8 + 3] = (1.0, 1.0, 2.0, 2.0)
    outputs["o11"][0, 2 * 8 + 3] = np.tile([0.5, 0.25], 5)
    model = fake_model(outputs)
    detector = load_detector(model)
    assert detector.family == "scrfd"

    frame = np.full((256, 256, 3), (10, 20, 30), dtype=np.uint8)
    faces = detector.detect([frame], DetectionOptions(detection_size_px=size))
    # Canvas box (32, 16, 80, 64) and keypoints (56, 36), doubled back to the 256 frame.
    assert len(faces) == 1 and len(faces[0]) == 1
    np.testing.assert_allclose(faces[0][0].box, [64, 32, 160, 128])
    np.testing.assert_allclose(faces[0][0].landmarks, np.tile([[112.0, 72.0]], (5, 1)))
    assert faces[0][0].score == pytest.approx(0.9)
    fed = model.session.fed[0]  # type: ignore[attr-defined]
    assert fed.shape == (1, 3, 128, 128)
    np.testing.assert_allclose(fed[0, :, 0, 0], np.array([30, 20, 10]) / 128 - 127.5 / 128)


# --- pure steps --------------------------------------------------------------------


def test_prepare_letterboxes_top_left_in_rgb() -> None:
    frame = np.full((2, 4, 3), (10, 20, 30), dtype=np.uint8)
    batch = prepare_detection_batch([frame], 32, to_rgb=True, mean=127.5, std=128.0)
    assert batch.tensor.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(batch.scales, [[8.0, 8.0]])
    # The image fills the top 16 rows (32 wide x 16 high); the rest is normalised black.
    np.testing.assert_allclose(batch.tensor[0, :, 15, 31], (np.array([30, 20, 10]) - 127.5) / 128)
    np.testing.assert_allclose(batch.tensor[0, :, 16, 0], [-127.5 / 128] * 3)


def test_anchor_centres_are_row_major_and_repeated_per_anchor() -> None:
    centres = anchor_centres(2, 3, 8, 2)
    assert centres.shape == (12, 2)
    np.testing.assert_array_equal(centres[:6:2], [[0, 0], [8, 0], [16, 0]])
    np.testing.assert_array_equal(centres[6], [0, 8])
    np.testing.assert_array_equal(centres[0], centres[1])
    assert anchor_centres(2, 3, 8, 2) is centres  # cached


def test_greedy_nms_suppresses_overlaps_only() -> None:
    boxes = np.array(
        [[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 5, 10, 15]], dtype=np.float32
    )
    scores = np.array([0.8, 0.9, 0.7, 0.6], dtype=np.float32)
    # Box 0 overlaps box 1 at IoU 9/11 and goes; box 3 overlaps box 1 at 45/155 and stays.
    np.testing.assert_array_equal(greedy_nms(boxes, scores, 0.4), [1, 2, 3])
    np.testing.assert_array_equal(greedy_nms(boxes, scores, 0.2), [1, 2])


def test_yunet_decode_matches_opencvs_formulas() -> None:
    size, strides = 64, (8, 16, 32)
    cells = [(size // s) ** 2 for s in strides]
    cls = [np.zeros((1, n, 1), np.float32) for n in cells]
    obj = [np.zeros((1, n, 1), np.float32) for n in cells]
    bbox = [np.zeros((1, n, 4), np.float32) for n in cells]
    kps = [np.zeros((1, n, 10), np.float32) for n in cells]
    # Stride 32, row 1, column 0; cls above 1 is clipped as OpenCV does.
    cls[2][0, 2] = 1.7
    obj[2][0, 2] = 0.81
    bbox[2][0, 2] = (0.5, 0.25, np.log(2.0), 0.0)
    kps[2][0, 2] = np.tile([1.0, 0.5], 5)
    found = decode_yunet(
        cls, obj, bbox, kps, batch=1, size_px=size, strides=strides, score_threshold=0.5
    )
    np.testing.assert_allclose(found.scores, [0.9])
    # Centre (16, 40), size 64 x 32.
    np.testing.assert_allclose(found.boxes, [[-16, 24, 48, 56]], atol=1e-5)
    np.testing.assert_allclose(found.landmarks[0], np.tile([[32.0, 48.0]], (5, 1)))
