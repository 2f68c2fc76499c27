"""The enhancer's model: GFPGAN 1.4 and CodeFormer-style ONNX face restorers.

Contract (MODEL_CONTRACTS.md, FaceFusion's face_enhancer): input ``input`` [1,3,S,S] with
S from the model (512 for GFPGAN 1.4 and CodeFormer), crop aligned to ffhq_512 scaled to
S, RGB, (x / 255 - 0.5) / 0.5; output [1,3,S,S] in [-1,1]: clip, (x + 1) / 2 * 255, round,
uint8. CodeFormer exports take a second input ``weight`` (the fidelity weight, 0 = most
restoration, 1 = closest to the input); FaceFusion feeds it as
``numpy.array([w]).astype(numpy.double)``. Here it is fed with the dtype and rank the
model declares, as a shared input of every run of the batch.

``prepare_*`` and ``normalize_*`` are pure numpy (the PyTorch backend reuses them);
:meth:`Enhancer.forward_enhance` is the only place that runs the session, through
:func:`facestage.runtime.run_batched`, which loops item by item for these exports because
their batch axis is fixed at 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from facestage.errors import InvalidArgumentError, ModelFileError
from facestage.runtime import LoadedModel, run_batched
from facestage.types import AlignmentTemplateName, Tensor

ENHANCER_TEMPLATE: AlignmentTemplateName = "ffhq_512"
IMAGE_INPUT = "input"
WEIGHT_INPUT = "weight"
DEFAULT_FIDELITY_WEIGHT = 0.5

# ONNX Runtime's type strings for the dtypes an enhancer input may declare.
_ORT_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
}


def prepare_enhancer_input(crops: np.ndarray, dtype: np.dtype[Any] | None = None) -> Tensor:
    """(N,S,S,3) uint8 BGR crops -> (N,3,S,S) RGB in [-1,1] ((x / 255 - 0.5) / 0.5)."""
    rgb = crops[..., ::-1].astype(np.float32) / 255.0
    tensor = (rgb - 0.5) / 0.5
    return np.ascontiguousarray(tensor.transpose(0, 3, 1, 2), dtype=dtype or np.float32)


def prepare_fidelity_weight(
    fidelity_weight: float, dtype: np.dtype[Any], shape: list[Any]
) -> np.ndarray:
    """The ``weight`` input: a scalar for a rank-0 input, else an array of one value."""
    value = np.asarray(fidelity_weight, dtype=dtype)
    return value if len(shape) == 0 else value.reshape([1] * len(shape))


def normalize_enhancer_output(output: np.ndarray) -> np.ndarray:
    """(N,3,S,S) RGB in [-1,1] -> (N,S,S,3) uint8 BGR: clip, (x + 1) / 2 * 255, round."""
    rgb = (np.clip(np.asarray(output, dtype=np.float32), -1.0, 1.0) + 1.0) / 2.0
    pixels = (rgb * 255.0).round()
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1)[..., ::-1].astype(np.uint8))


def validate_enhancer_request(crops: np.ndarray, fidelity_weight: float, crop_size_px: int) -> None:
    """Raises :class:`InvalidArgumentError` naming ``crops`` or ``fidelity_weight``."""
    size = crop_size_px
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
        raise InvalidArgumentError(
            "crops",
            f"expected (N,{size},{size},3) uint8 crops aligned to {ENHANCER_TEMPLATE}, "
            f"got {crops.shape} {crops.dtype}",
        )
    if crops.shape[0] == 0:
        raise InvalidArgumentError("crops", "the batch is empty")
    if not 0.0 <= fidelity_weight <= 1.0:
        raise InvalidArgumentError(
            "fidelity_weight", f"must be within [0, 1], got {fidelity_weight}"
        )


class Enhancer:
    """A face restorer (GFPGAN 1.4, CodeFormer, ...) on aligned ffhq_512 crops.

    The output is whatever the loaded graph computes; with a contract fixture nothing is
    restored (see :mod:`facestage.fixtures`).
    """

    def __init__(self, model: LoadedModel) -> None:
        path = str(model.path)
        inputs = {node.name: node for node in model.session.get_inputs()}
        outputs = model.session.get_outputs()
        if IMAGE_INPUT not in inputs or not set(inputs) <= {IMAGE_INPUT, WEIGHT_INPUT}:
            raise ModelFileError(
                path,
                f"not a face enhancer graph: inputs {sorted(inputs)}, expected "
                f"{IMAGE_INPUT!r} and optionally {WEIGHT_INPUT!r}",
            )
        if len(outputs) < 1:
            raise ModelFileError(path, "the graph has no output")
        shape = list(inputs[IMAGE_INPUT].shape)
        if (
            len(shape) != 4
            or shape[1] != 3
            or not isinstance(shape[2], int)
            or shape[2] != shape[3]
        ):
            raise ModelFileError(path, f"input shape {shape} is not [N,3,S,S] with a fixed S")
        image_type = inputs[IMAGE_INPUT].type
        if image_type not in _ORT_DTYPES:
            raise ModelFileError(path, f"input type {image_type} is not a float tensor")
        self.model = model
        self._crop_size_px = int(shape[2])
        self._image_dtype = _ORT_DTYPES[image_type]
        self._output_name = outputs[0].name
        self._weight: tuple[np.dtype[Any], list[Any]] | None = None
        if WEIGHT_INPUT in inputs:
            weight = inputs[WEIGHT_INPUT]
            if weight.type not in _ORT_DTYPES:
                raise ModelFileError(path, f"weight input type {weight.type} is not a float")
            self._weight = (_ORT_DTYPES[weight.type], list(weight.shape))

    @property
    def crop_size_px(self) -> int:
        """Side of the square crop the model takes, from its input shape (512)."""
        return self._crop_size_px

    @property
    def template(self) -> AlignmentTemplateName:
        """The alignment template crops must be warped to (scaled to the crop size)."""
        return ENHANCER_TEMPLATE

    @property
    def has_fidelity_weight(self) -> bool:
        """True for CodeFormer-style models that take a ``weight`` input."""
        return self._weight is not None

    def forward_enhance(self, tensor: Tensor, fidelity_weight: float) -> np.ndarray:
        """Runs the restorer on a prepared (N,3,S,S) batch; returns (N,3,S,S) raw output."""
        shared: dict[str, np.ndarray] = {}
        if self._weight is not None:
            dtype, shape = self._weight
            shared[WEIGHT_INPUT] = prepare_fidelity_weight(fidelity_weight, dtype, shape)
        (output,) = run_batched(
            self.model, {IMAGE_INPUT: tensor}, [self._output_name], shared=shared
        )
        return np.asarray(output)

    def enhance(
        self, crops: np.ndarray, fidelity_weight: float = DEFAULT_FIDELITY_WEIGHT
    ) -> np.ndarray:
        """(N,S,S,3) uint8 BGR aligned crops -> the same shape, restored, in order.

        ``fidelity_weight`` (0..1) only matters to models with a ``weight`` input.
        """
        validate_enhancer_request(crops, fidelity_weight, self.crop_size_px)
        tensor = prepare_enhancer_input(crops, self._image_dtype)
        return normalize_enhancer_output(self.forward_enhance(tensor, fidelity_weight))
