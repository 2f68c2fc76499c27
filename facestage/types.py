"""The shared vocabulary of facestage: array aliases and the closed sets of choices."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import numpy as np
import numpy.typing as npt

VisionFrame: TypeAlias = npt.NDArray[np.uint8]
"""An image as HxWx3 uint8, BGR (OpenCV's order), unless a name says otherwise."""

Crop: TypeAlias = npt.NDArray[np.uint8]
"""An aligned face crop, SxSx3 uint8, BGR."""

BoundingBox: TypeAlias = npt.NDArray[np.float32]
"""(x_min, y_min, x_max, y_max) in pixels."""

FaceLandmark5: TypeAlias = npt.NDArray[np.float32]
"""5x2 points: left eye, right eye, nose tip, left mouth corner, right mouth corner."""

Embedding: TypeAlias = npt.NDArray[np.float32]
"""A 1-D identity vector."""

Matrix2x3: TypeAlias = npt.NDArray[np.float64]
"""A 2x3 affine transform (frame to crop)."""

Tensor: TypeAlias = npt.NDArray[np.float32]
"""A float32 model input or output."""

Stage = Literal["detector", "embedder", "swapper", "enhancer"]
STAGES: tuple[Stage, ...] = ("detector", "embedder", "swapper", "enhancer")

ExecutionProvider = Literal["tensorrt", "cuda", "cpu"]
EXECUTION_PROVIDERS: tuple[ExecutionProvider, ...] = ("tensorrt", "cuda", "cpu")

AlignmentTemplateName = Literal["arcface_112_v1", "arcface_112_v2", "arcface_128", "ffhq_512"]


@dataclass(frozen=True)
class DetectedFace:
    """A face found by a detector, in the pixel coordinates of the searched image."""

    box: BoundingBox
    landmarks: FaceLandmark5
    score: float
    embedding: Embedding | None = field(default=None, compare=False)
