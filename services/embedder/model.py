"""The embedder's model: aligned 112x112 face crops in, identity vectors out.

Any recogniser with a [N,3,S,S] input and an [N,D] output works; D (512 for ArcFace
w600k_r50, 128 for the MobileFaceNet of ../shared/models) is read from the model's output
shape, the crop size S from its input shape.

Recognisers differ in what their input expects (MODEL_CONTRACTS.md, MODELS.md):

- ``arcface``: InsightFace's ArcFace exports (w600k_r50 of buffalo_l): RGB,
  (x - 127.5) / 127.5.
- ``mobilefacenet``: the generic recogniser convention of the MobileFaceNet export: BGR,
  (x - 127.5) / 128.

How the family is detected when the constructor is not told: InsightFace's exports come
from PyTorch with unnamed inputs, so their input is called ``input.1`` (w600k_r50 answers
``input.1`` -> ``683``); a recogniser whose first input is ``input.1`` is treated as
ArcFace, any other as the generic (MobileFaceNet) convention. Names are a weak signal, so
the family is a constructor parameter and the service's settings should pass it for any
model they know.

``prepare_*`` and ``normalize_*`` are pure numpy; :meth:`Embedder.forward_embeddings` is
the only place that runs the session, through :func:`facestage.runtime.run_batched`: one
``session.run`` for the whole batch when the batch axis is dynamic (ArcFace), one per crop
when the model fixes it at 1 (the MobileFaceNet file does: [1,3,112,112]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from facestage.alignment import AlignedCrop, align_face
from facestage.errors import InvalidArgumentError, ModelFileError
from facestage.runtime import LoadedModel, run_batched
from facestage.types import (
    AlignmentTemplateName,
    Embedding,
    FaceLandmark5,
    Tensor,
    VisionFrame,
)

RecognizerFamily = Literal["arcface", "mobilefacenet"]
RECOGNIZER_FAMILIES: tuple[RecognizerFamily, ...] = ("arcface", "mobilefacenet")

EMBEDDER_TEMPLATE: AlignmentTemplateName = "arcface_112_v2"
DEFAULT_CROP_SIZE_PX = 112

# The input name of InsightFace's PyTorch exports (w600k_r50, w600k_mbf, glintr100).
_INSIGHTFACE_INPUT_NAME = "input.1"


@dataclass(frozen=True)
class InputNormalization:
    """How a recogniser wants its pixels: channel order, then (x - mean) / std."""

    channel_order: Literal["rgb", "bgr"]
    mean: float
    std: float


INPUT_NORMALIZATIONS: dict[RecognizerFamily, InputNormalization] = {
    "arcface": InputNormalization(channel_order="rgb", mean=127.5, std=127.5),
    "mobilefacenet": InputNormalization(channel_order="bgr", mean=127.5, std=128.0),
}


def detect_recognizer_family(model: LoadedModel) -> RecognizerFamily:
    """Guesses the family from the graph: ``input.1`` (InsightFace export) is ArcFace."""
    first_input = model.session.get_inputs()[0].name
    return "arcface" if first_input == _INSIGHTFACE_INPUT_NAME else "mobilefacenet"


def prepare_embedder_input(crops: np.ndarray, normalization: InputNormalization) -> Tensor:
    """(N,S,S,3) uint8 BGR crops -> (N,3,S,S) float32 in the recogniser's convention."""
    pixels = crops[..., ::-1] if normalization.channel_order == "rgb" else crops
    tensor = (pixels.astype(np.float32) - normalization.mean) / normalization.std
    prepared: Tensor = np.ascontiguousarray(tensor.transpose(0, 3, 1, 2), dtype=np.float32)
    return prepared


def normalize_embeddings(raw: np.ndarray) -> Embedding:
    """Raw (N,D) embeddings -> unit vectors (e / ||e||), the form cosine similarity uses.

    A zero vector stays zero instead of turning into NaNs.
    """
    raw = np.asarray(raw, dtype=np.float32)
    norms = np.linalg.norm(raw, axis=-1, keepdims=True)
    unit: Embedding = (raw / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32)
    return unit


class Embedder:
    """A face recogniser: aligned crops in, raw (not normalised) embeddings out."""

    def __init__(self, model: LoadedModel, family: RecognizerFamily | None = None) -> None:
        inputs = model.session.get_inputs()
        outputs = model.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ModelFileError(
                str(model.path),
                f"a recogniser has one input and an embedding output, this has "
                f"{len(inputs)} inputs and {len(outputs)} outputs",
            )
        input_shape = list(inputs[0].shape)
        output_shape = list(outputs[0].shape)
        if len(input_shape) != 4 or input_shape[1] != 3:
            raise ModelFileError(str(model.path), f"input shape {input_shape} is not [N,3,S,S]")
        if len(output_shape) != 2 or not isinstance(output_shape[1], int):
            raise ModelFileError(
                str(model.path), f"output shape {output_shape} is not [N,D] with a fixed D"
            )
        height, width = input_shape[2], input_shape[3]
        # A recogniser with free spatial axes still wants the template's native size.
        size = height if isinstance(height, int) else DEFAULT_CROP_SIZE_PX
        if isinstance(width, int) and width != size:
            raise ModelFileError(str(model.path), f"input {width}x{height} is not square")
        self.model = model
        self.family: RecognizerFamily = family or detect_recognizer_family(model)
        self.normalization = INPUT_NORMALIZATIONS[self.family]
        self._input_name = inputs[0].name
        self._output_name = outputs[0].name
        self._crop_size_px = size
        self._embedding_size = int(output_shape[1])

    @property
    def crop_size_px(self) -> int:
        """Side of the square crop the model takes (112 for ArcFace and MobileFaceNet)."""
        return self._crop_size_px

    @property
    def template(self) -> AlignmentTemplateName:
        """The alignment template crops must be warped to."""
        return EMBEDDER_TEMPLATE

    @property
    def embedding_size(self) -> int:
        """Length of one embedding, from the model's output shape (512, 128, ...)."""
        return self._embedding_size

    def align_for_embedding(self, frame: VisionFrame, landmarks: FaceLandmark5) -> AlignedCrop:
        """Warps the face with these five landmarks to this model's template and size."""
        return align_face(frame, landmarks, self.template, self.crop_size_px)

    def validate_crops(self, crops: np.ndarray) -> None:
        """Raises :class:`InvalidArgumentError` (field ``crops``) unless (N,S,S,3) uint8."""
        size = self.crop_size_px
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
            raise InvalidArgumentError(
                "crops",
                f"expected (N,{size},{size},3) uint8 crops aligned to {self.template}, "
                f"got {crops.shape} {crops.dtype}",
            )
        if crops.shape[0] == 0:
            raise InvalidArgumentError("crops", "the batch is empty")

    def forward_embeddings(self, tensor: Tensor) -> np.ndarray:
        """Runs the recogniser on a prepared (N,3,S,S) batch; returns raw (N,D) float32."""
        (raw,) = run_batched(self.model, {self._input_name: tensor}, [self._output_name])
        return np.asarray(raw, dtype=np.float32).reshape(tensor.shape[0], -1)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N,S,S,3) uint8 BGR aligned crops -> (N,D) float32 raw embeddings, in order."""
        self.validate_crops(crops)
        return self.forward_embeddings(prepare_embedder_input(crops, self.normalization))
