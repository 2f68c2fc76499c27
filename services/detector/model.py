"""Face detection models: SCRFD/RetinaFace and YuNet behind one interface.

Each detector follows the same three steps (FaceFusion's split):

- :func:`prepare_detection_batch` letterboxes every frame into one square canvas of the
  detection size (aspect kept, image at the top-left, zeros elsewhere) and stacks them into
  an ``(N, 3, S, S)`` tensor: pure numpy.
- ``forward_*`` is the only code that runs the ONNX session. Both model families have a
  batch axis fixed at 1, so :func:`facestage.runtime.run_batched` runs frame by frame.
- :func:`decode_scrfd` / :func:`decode_yunet` turn the raw outputs of the whole batch into
  candidates at once, and :func:`select_faces` filters, suppresses and scales them back to
  each frame's own pixels: pure numpy.

Warm-up: a server runs ``detector.detect([warmup_frame()], DetectionOptions())`` once
before it reports SERVING; the blank frame finds no face and costs one inference.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
import numpy.typing as npt

from facestage.errors import InvalidArgumentError, ModelFileError
from facestage.runtime import LoadedModel, NodeArg, run_batched
from facestage.types import DetectedFace, Tensor, VisionFrame

DEFAULT_SCORE_THRESHOLD = 0.5
DEFAULT_NMS_IOU = 0.4
DEFAULT_DETECTION_SIZE_PX = 640
DETECTION_SIZE_MULTIPLE_PX = 32
"""Both families downsample by 32 at their coarsest level, so the canvas must divide by it."""
MAX_DETECTION_SIZE_PX = 4096
"""Guards memory: at 4096 the input tensor alone is 200 MB of float32 per frame."""

SCRFD_MEAN = 127.5
SCRFD_STD = 128.0


@dataclass(frozen=True)
class DetectionOptions:
    """Per-request detection settings; invalid values raise :class:`InvalidArgumentError`."""

    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    nms_iou: float = DEFAULT_NMS_IOU
    max_faces: int = 0
    """Keep at most this many faces per frame, best scores first; 0 keeps all."""
    detection_size_px: int = DEFAULT_DETECTION_SIZE_PX
    """Side of the square canvas each frame is letterboxed into; a multiple of 32."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_threshold <= 1.0:
            raise InvalidArgumentError(
                "options.score_threshold", f"must be in [0, 1], got {self.score_threshold}"
            )
        if not 0.0 < self.nms_iou <= 1.0:
            raise InvalidArgumentError("options.nms_iou", f"must be in (0, 1], got {self.nms_iou}")
        if self.max_faces < 0:
            raise InvalidArgumentError(
                "options.max_faces", f"must be 0 (no limit) or positive, got {self.max_faces}"
            )
        size = self.detection_size_px
        if (
            size < DETECTION_SIZE_MULTIPLE_PX
            or size > MAX_DETECTION_SIZE_PX
            or size % DETECTION_SIZE_MULTIPLE_PX
        ):
            raise InvalidArgumentError(
                "options.detection_size_px",
                f"must be a multiple of {DETECTION_SIZE_MULTIPLE_PX} between "
                f"{DETECTION_SIZE_MULTIPLE_PX} and {MAX_DETECTION_SIZE_PX}, got {size}",
            )


class FaceDetector(Protocol):
    """A face detection model: BGR frames in, faces per frame in that frame's pixels."""

    @property
    def family(self) -> str:
        """The model family, ``scrfd`` or ``yunet``."""
        ...

    @property
    def default_size_px(self) -> int:
        """The detection size the model was trained for."""
        ...

    @property
    def model(self) -> LoadedModel:
        """The open session and the facts a ``GetModelInfo`` answer reports."""
        ...

    def detect(
        self, frames: Sequence[VisionFrame], options: DetectionOptions
    ) -> list[list[DetectedFace]]:
        """Faces of each frame, sorted by score (highest first), ``max_faces`` applied."""
        ...


def warmup_frame(size_px: int = DEFAULT_DETECTION_SIZE_PX) -> VisionFrame:
    """A blank BGR frame for the one inference a server runs before reporting SERVING."""
    return np.zeros((size_px, size_px, 3), dtype=np.uint8)


# --- prepare -------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedBatch:
    """Letterboxed frames as one model input, and how to map results back per frame."""

    tensor: Tensor
    """(N, 3, S, S) float32."""
    scales: npt.NDArray[np.float64]
    """(N, 2): canvas pixels per frame pixel along x and y."""


def validate_frames(frames: Sequence[VisionFrame]) -> None:
    """Rejects anything that is not a non-empty HxWx3 uint8 image, naming the frame."""
    for index, frame in enumerate(frames):
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise InvalidArgumentError(
                f"frames[{index}]",
                f"must be HxWx3 uint8 BGR, got shape {frame.shape} {frame.dtype}",
            )
        if frame.shape[0] == 0 or frame.shape[1] == 0:
            raise InvalidArgumentError(f"frames[{index}]", "is empty")


def letterbox_size(height: int, width: int, size_px: int) -> tuple[int, int]:
    """(new_height, new_width) of a frame resized to fit a square, aspect kept.

    The longer side becomes ``size_px`` and the other is truncated, exactly as InsightFace
    computes it, so the compared decodes see the same pixels.
    """
    if height > width:
        return size_px, max(1, int(size_px * width / height))
    return max(1, int(size_px * height / width)), size_px


def prepare_detection_batch(
    frames: Sequence[VisionFrame],
    size_px: int,
    *,
    to_rgb: bool,
    mean: float,
    std: float,
) -> PreparedBatch:
    """Letterboxes BGR frames into one ``(N, 3, size, size)`` tensor, (x - mean) / std.

    Every frame lands at the top-left of a zero canvas, so canvas coordinates divided by
    the per-axis scale are frame coordinates, with no offset to undo. The padding is
    normalised like the image (zero pixels, not zero values), as the reference does.
    """
    canvas = np.zeros((len(frames), size_px, size_px, 3), dtype=np.uint8)
    scales = np.empty((len(frames), 2), dtype=np.float64)
    for index, frame in enumerate(frames):
        height, width = frame.shape[:2]
        new_height, new_width = letterbox_size(height, width, size_px)
        # INTER_LINEAR, not INTER_AREA: the reference implementations resize this way and
        # the scores near the threshold depend on it.
        canvas[index, :new_height, :new_width] = cv2.resize(frame, (new_width, new_height))
        scales[index] = (new_width / width, new_height / height)
    channels = canvas[..., ::-1] if to_rgb else canvas
    tensor = channels.transpose(0, 3, 1, 2).astype(np.float32)
    if mean != 0.0 or std != 1.0:
        tensor = (tensor - np.float32(mean)) / np.float32(std)
    return PreparedBatch(tensor=np.ascontiguousarray(tensor), scales=scales)


# --- decode and select -------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def anchor_centres(height: int, width: int, stride: int, anchors: int) -> Tensor:
    """(height * width * anchors, 2) anchor points (col * stride, row * stride).

    Rows outer, columns inner, each point repeated once per anchor, no half-cell offset:
    the order the models emit their rows in. Cached because every frame of a given
    detection size needs the same grid; read-only because the cache shares it.
    """
    rows, cols = np.mgrid[:height, :width]
    centres = (np.stack([cols, rows], axis=-1).reshape(-1, 2) * stride).astype(np.float32)
    centres = np.repeat(centres, anchors, axis=0)
    centres.setflags(write=False)
    return centres


@dataclass(frozen=True)
class Candidates:
    """Scored detections of a whole batch before NMS, in canvas pixels."""

    frame_index: npt.NDArray[np.intp]
    """(K,) which frame of the batch each candidate belongs to."""
    boxes: Tensor
    """(K, 4) x_min, y_min, x_max, y_max."""
    landmarks: Tensor
    """(K, 5, 2)."""
    scores: Tensor
    """(K,)."""


def _stack_levels(outputs: Sequence[Tensor], batch: int, channels: int) -> Tensor:
    """Per-level outputs (B, N_level, C) or (B * N_level, C) joined into (B, N, C)."""
    return np.concatenate([o.reshape(batch, -1, channels) for o in outputs], axis=1)


def _level_grid(size_px: int, strides: Sequence[int], anchors: int) -> tuple[Tensor, Tensor]:
    """Anchor points and their stride for all levels, concatenated like the outputs."""
    centres = [anchor_centres(size_px // s, size_px // s, s, anchors) for s in strides]
    per_anchor = [
        np.full(len(c), s, dtype=np.float32) for c, s in zip(centres, strides, strict=True)
    ]
    return np.concatenate(centres), np.concatenate(per_anchor)


def _check_anchor_count(got: int, centres: Tensor, what: str) -> None:
    if got != len(centres):
        raise ModelFileError(
            what, f"emits {got} anchors per frame where its contract gives {len(centres)}"
        )


def decode_scrfd(
    scores: Sequence[Tensor],
    distances: Sequence[Tensor],
    keypoints: Sequence[Tensor],
    *,
    batch: int,
    size_px: int,
    strides: Sequence[int],
    anchors: int,
    score_threshold: float,
    model_name: str = "scrfd",
) -> Candidates:
    """SCRFD outputs of a batch to candidates above ``score_threshold`` (canvas pixels).

    Box = (cx - d0, cy - d1, cx + d2, cy + d3) and keypoint k = (cx + dx_k, cy + dy_k),
    every distance in units of the level's stride. Scores are probabilities already.
    """
    score = _stack_levels(scores, batch, 1)[..., 0]
    centres, stride = _level_grid(size_px, strides, anchors)
    _check_anchor_count(score.shape[1], centres, model_name)
    frame_index, anchor = np.nonzero(score >= score_threshold)
    # Only the survivors are decoded: a few dozen rows instead of 16800 per frame.
    distance = _stack_levels(distances, batch, 4)[frame_index, anchor]
    offsets = _stack_levels(keypoints, batch, 10)[frame_index, anchor].reshape(-1, 5, 2)
    point = centres[anchor]
    step = stride[anchor, None]
    boxes = np.concatenate([point - distance[:, :2] * step, point + distance[:, 2:] * step], axis=1)
    landmarks = point[:, None, :] + offsets * step[:, :, None]
    return Candidates(frame_index, boxes, landmarks, score[frame_index, anchor])


def decode_yunet(
    cls: Sequence[Tensor],
    obj: Sequence[Tensor],
    bbox: Sequence[Tensor],
    kps: Sequence[Tensor],
    *,
    batch: int,
    size_px: int,
    strides: Sequence[int],
    score_threshold: float,
    model_name: str = "yunet",
) -> Candidates:
    """YuNet outputs of a batch to candidates above ``score_threshold`` (canvas pixels).

    As OpenCV's FaceDetectorYN decodes them: score = sqrt(clip(cls) * clip(obj)); the
    centre is (col + dx, row + dy) * stride, the size exp(dw), exp(dh) times the stride,
    keypoint k = (col + kx_k, row + ky_k) * stride. One anchor per cell.
    """
    cls_score = np.clip(_stack_levels(cls, batch, 1)[..., 0], 0.0, 1.0)
    obj_score = np.clip(_stack_levels(obj, batch, 1)[..., 0], 0.0, 1.0)
    score = np.sqrt(cls_score * obj_score)
    cells, stride = _level_grid(size_px, strides, 1)
    _check_anchor_count(score.shape[1], cells, model_name)
    frame_index, anchor = np.nonzero(score >= score_threshold)
    delta = _stack_levels(bbox, batch, 4)[frame_index, anchor]
    offsets = _stack_levels(kps, batch, 10)[frame_index, anchor].reshape(-1, 5, 2)
    corner = cells[anchor]
    step = stride[anchor, None]
    centre = corner + delta[:, :2] * step
    half = np.exp(delta[:, 2:]) * step / 2.0
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    landmarks = corner[:, None, :] + offsets * step[:, :, None]
    return Candidates(frame_index, boxes, landmarks, score[frame_index, anchor])


def greedy_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> npt.NDArray[np.intp]:
    """Indices of the boxes greedy NMS keeps, best score first.

    Each step compares the best remaining box against all the others at once, so the
    loop runs once per kept face, not once per candidate. Areas are continuous (no +1):
    coordinates are sub-pixel floats, not pixel indices.
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.clip(x2 - x1, 0.0, None) * np.clip(y2 - y1, 0.0, None)
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        width = np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
        height = np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None)
        inter = width * height
        iou = inter / np.maximum(areas[best] + areas[rest] - inter, np.float32(1e-9))
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.intp)


def select_faces(
    candidates: Candidates, scales: npt.NDArray[np.float64], options: DetectionOptions
) -> list[list[DetectedFace]]:
    """NMS per frame, best ``max_faces`` kept, coordinates divided back to frame pixels.

    Boxes are not clipped to the frame: a face cut by the edge keeps its full extent, which
    alignment needs, as in the reference implementations.
    """
    frame_scale = scales[candidates.frame_index].astype(np.float32)
    boxes = candidates.boxes / np.tile(frame_scale, 2)
    landmarks = candidates.landmarks / frame_scale[:, None, :]
    faces: list[list[DetectedFace]] = []
    for index in range(len(scales)):
        rows = np.flatnonzero(candidates.frame_index == index)
        kept = rows[greedy_nms(candidates.boxes[rows], candidates.scores[rows], options.nms_iou)]
        if options.max_faces:
            kept = kept[: options.max_faces]
        faces.append(
            [
                DetectedFace(
                    box=boxes[row].astype(np.float32),
                    landmarks=landmarks[row].astype(np.float32),
                    score=float(candidates.scores[row]),
                )
                for row in kept
            ]
        )
    return faces


# --- model families ------------------------------------------------------------------


def _dim_is(dim: int | str | None, expected: int) -> bool:
    """True when a declared axis is ``expected`` or dynamic (a name or None)."""
    return not isinstance(dim, int) or dim == expected


def _describe(nodes: Sequence[NodeArg]) -> str:
    shown = ", ".join(f"{n.name}{list(n.shape)}" for n in nodes[:6])
    return shown + (f" and {len(nodes) - 6} more" if len(nodes) > 6 else "")


def _check_image_input(model: LoadedModel) -> str:
    """The name of the model's single NCHW, 3-channel input, or ModelFileError."""
    inputs = model.session.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or not _dim_is(inputs[0].shape[1], 3):
        raise ModelFileError(
            str(model.path), f"needs one [N,3,H,W] image input, found {_describe(inputs)}"
        )
    return inputs[0].name


SCRFD_LAYOUTS: dict[int, tuple[tuple[int, ...], int]] = {
    9: ((8, 16, 32), 2),
    15: ((8, 16, 32, 64, 128), 1),
}
"""Output count to (strides, anchors per cell) for the layouts with keypoints."""
SCRFD_LAYOUTS_WITHOUT_KEYPOINTS = (6, 10)


class ScrfdDetector:
    """SCRFD / RetinaFace ONNX models (det_10g, scrfd_2.5g_bnkps, det_500m).

    Fed RGB, (x - 127.5) / 128, as InsightFace does (FaceFusion feeds BGR; the models
    were trained on RGB and InsightFace is the reference the tests compare against).
    """

    family = "scrfd"
    default_size_px = DEFAULT_DETECTION_SIZE_PX

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self._input_name = _check_image_input(model)
        outputs = model.session.get_outputs()
        path = str(model.path)
        if len(outputs) in SCRFD_LAYOUTS_WITHOUT_KEYPOINTS:
            raise ModelFileError(
                path,
                f"is an SCRFD export without keypoints ({len(outputs)} outputs: scores and "
                "boxes only); facestage needs the 5 landmarks to align faces",
            )
        if len(outputs) not in SCRFD_LAYOUTS:
            raise ModelFileError(
                path,
                f"has {len(outputs)} outputs ({_describe(outputs)}); an SCRFD model has 9 "
                "(3 strides x scores, boxes, keypoints) or 15 (5 strides)",
            )
        self._strides, self._anchors = SCRFD_LAYOUTS[len(outputs)]
        levels = len(self._strides)
        for index, output in enumerate(outputs):
            channels = (1, 4, 10)[index // levels]
            shape = list(output.shape)
            if len(shape) not in (2, 3) or not _dim_is(shape[-1], channels):
                raise ModelFileError(
                    path,
                    f"output {index} ({output.name}) has shape {shape}; expected "
                    f"(N,{channels}) or (1,N,{channels}) in the SCRFD order "
                    "scores, boxes, keypoints",
                )
        self._output_names = [o.name for o in outputs]

    def forward_scrfd(self, tensor: Tensor) -> list[Tensor]:
        """Raw outputs for a prepared batch; the model's batch axis is fixed at 1."""
        outputs = run_batched(self.model, {self._input_name: tensor}, self._output_names)
        return [o.astype(np.float32, copy=False) for o in outputs]

    def detect(
        self, frames: Sequence[VisionFrame], options: DetectionOptions
    ) -> list[list[DetectedFace]]:
        """Faces of each BGR frame in its own pixels, best first (see :class:`FaceDetector`)."""
        validate_frames(frames)
        if not frames:
            return []
        size = options.detection_size_px
        batch = prepare_detection_batch(frames, size, to_rgb=True, mean=SCRFD_MEAN, std=SCRFD_STD)
        outputs = self.forward_scrfd(batch.tensor)
        levels = len(self._strides)
        candidates = decode_scrfd(
            outputs[:levels],
            outputs[levels : 2 * levels],
            outputs[2 * levels :],
            batch=len(frames),
            size_px=size,
            strides=self._strides,
            anchors=self._anchors,
            score_threshold=options.score_threshold,
            model_name=str(self.model.path),
        )
        return select_faces(candidates, batch.scales, options)


YUNET_STRIDES = (8, 16, 32)
YUNET_HEADS = {"cls": 1, "obj": 1, "bbox": 4, "kps": 10}
"""Output name prefix to channel count; outputs are named ``<head>_<stride>``."""
YUNET_OUTPUT_NAMES = tuple(f"{head}_{s}" for head in YUNET_HEADS for s in YUNET_STRIDES)


class YunetDetector:
    """OpenCV's YuNet ONNX model, run through ONNX Runtime with FaceDetectorYN's decode.

    Fed BGR pixels as they are (0..255, no mean or scale), as FaceDetectorYN's
    ``blobFromImage`` call does. Its input height and width are dynamic; OpenCV pads them
    to multiples of 32, which the square canvas of a validated detection size already is.
    """

    family = "yunet"
    default_size_px = DEFAULT_DETECTION_SIZE_PX

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self._input_name = _check_image_input(model)
        found = {o.name: list(o.shape) for o in model.session.get_outputs()}
        for name in YUNET_OUTPUT_NAMES:
            channels = YUNET_HEADS[name.split("_")[0]]
            shape = found.get(name)
            if shape is None or len(shape) not in (2, 3) or not _dim_is(shape[-1], channels):
                raise ModelFileError(
                    str(model.path),
                    f"output {name} is {shape}; a YuNet model has (1,N,{channels}) there",
                )

    def forward_yunet(self, tensor: Tensor) -> list[Tensor]:
        """Raw outputs in ``YUNET_OUTPUT_NAMES`` order; the batch axis is fixed at 1."""
        outputs = run_batched(self.model, {self._input_name: tensor}, YUNET_OUTPUT_NAMES)
        return [o.astype(np.float32, copy=False) for o in outputs]

    def detect(
        self, frames: Sequence[VisionFrame], options: DetectionOptions
    ) -> list[list[DetectedFace]]:
        """Faces of each BGR frame in its own pixels, best first (see :class:`FaceDetector`)."""
        validate_frames(frames)
        if not frames:
            return []
        size = options.detection_size_px
        batch = prepare_detection_batch(frames, size, to_rgb=False, mean=0.0, std=1.0)
        outputs = self.forward_yunet(batch.tensor)
        levels = len(YUNET_STRIDES)
        cls, obj, bbox, kps = (outputs[i : i + levels] for i in range(0, 4 * levels, levels))
        candidates = decode_yunet(
            cls,
            obj,
            bbox,
            kps,
            batch=len(frames),
            size_px=size,
            strides=YUNET_STRIDES,
            score_threshold=options.score_threshold,
            model_name=str(self.model.path),
        )
        return select_faces(candidates, batch.scales, options)


def load_detector(model: LoadedModel) -> FaceDetector:
    """The detector for a model's graph, told apart by its output names and count.

    YuNet names its outputs ``cls_8`` ... ``kps_32``; SCRFD exports have anonymous
    numbered outputs, 9 or 15 of them (6 or 10 without keypoints, rejected by
    :class:`ScrfdDetector` with the reason). Anything else is a :class:`ModelFileError`.
    """
    outputs = model.session.get_outputs()
    names = {o.name for o in outputs}
    if set(YUNET_OUTPUT_NAMES) <= names:
        return YunetDetector(model)
    if len(outputs) in (*SCRFD_LAYOUTS, *SCRFD_LAYOUTS_WITHOUT_KEYPOINTS):
        return ScrfdDetector(model)
    raise ModelFileError(
        str(model.path),
        f"is not a known face detector graph (inputs {_describe(model.session.get_inputs())}; "
        f"{len(outputs)} outputs {_describe(outputs)}); expected SCRFD/RetinaFace "
        "(9 or 15 outputs) or YuNet (outputs cls_8 ... kps_32)",
    )
