"""The swapper's model: inswapper_128, target crops plus a source identity in, crops out.

inswapper takes ``target`` [1,3,128,128] (RGB, x / 255, aligned to arcface_128) and
``source`` [1,512], a latent made from an ArcFace w600k_r50 embedding through the matrix
``emap`` stored as the graph's last initializer. Its output is RGB in [0,1].

Latent normalisation, the one place the two reference implementations differ:

- ``insightface`` (default): latent = (e / ||e||) @ emap, then divided by its own norm.
- ``facefusion``: latent = (e / ||e||) @ emap, left at whatever norm emap gives it.

We default to ``insightface`` because InsightFace trained and published inswapper and
its ``INSwapper.get`` is the reference the model was released with; the re-normalised
latent is also independent of how emap scales vectors, so an averaged or re-scaled
source embedding lands on the same unit sphere the reference feeds. ``facefusion`` is
kept as an option for callers who need pixel parity with FaceFusion's output.

``emap`` is read at load without ``onnx.load``: the real file is 554 MB of embedded
weights that ONNX Runtime already holds, so :func:`read_last_initializer` walks the
protobuf wire format over a memory map, skips every payload, and decodes only the last
initializer (1 MB).

``prepare_*`` and ``normalize_*`` are pure numpy; :meth:`Swapper.forward_swap` is the only
place that runs the session (through :func:`facestage.runtime.run_batched`, which loops
item by item because inswapper fixes its batch axis at 1).
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any, Literal

import numpy as np

from facestage.errors import InvalidArgumentError, ModelFileError
from facestage.runtime import LoadedModel, run_batched
from facestage.types import AlignmentTemplateName, Tensor

LatentNormalization = Literal["insightface", "facefusion"]
LATENT_NORMALIZATIONS: tuple[LatentNormalization, ...] = ("insightface", "facefusion")

SWAPPER_TEMPLATE: AlignmentTemplateName = "arcface_128"
SWAPPER_CROP_SIZE_PX = 128
TARGET_INPUT = "target"
SOURCE_INPUT = "source"

# Field numbers of onnx.proto: ModelProto.graph = 7, GraphProto.initializer = 5.
_MODEL_GRAPH_FIELD = 7
_GRAPH_INITIALIZER_FIELD = 5


def _read_varint(buffer: Any, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buffer[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buffer: Any, start: int, end: int) -> list[tuple[int, int, int]]:
    """(field number, payload start, payload end) of the length-delimited fields in a range.

    Other wire types are skipped; payloads are never copied, so walking a 554 MB model
    touches only the few pages that hold field headers.
    """
    found: list[tuple[int, int, int]] = []
    pos = start
    while pos < end:
        key, pos = _read_varint(buffer, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _read_varint(buffer, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _read_varint(buffer, pos)
            found.append((field, pos, pos + length))
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
    if pos != end:
        raise ValueError("truncated protobuf message")
    return found


def read_last_initializer(path: Path) -> tuple[str, np.ndarray]:
    """Name and value of the last initializer of an ONNX file, without loading the rest.

    Raises :class:`ModelFileError` naming the file when it has no initializer or cannot be
    parsed.
    """
    from onnx import TensorProto, numpy_helper

    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            last: tuple[int, int] | None = None
            for field, start, end in _fields(buf, 0, len(buf)):
                if field != _MODEL_GRAPH_FIELD:
                    continue
                # Protobuf merges repeated graph fields, so the last one with initializers wins.
                for inner, inner_start, inner_end in _fields(buf, start, end):
                    if inner == _GRAPH_INITIALIZER_FIELD:
                        last = (inner_start, inner_end)
            if last is None:
                raise ModelFileError(str(path), "the graph has no initializer (no emap)")
            tensor = TensorProto.FromString(bytes(buf[last[0] : last[1]]))
    except (OSError, ValueError, IndexError) as exc:
        raise ModelFileError(str(path), f"cannot read its initializers ({exc})") from exc
    try:
        value = numpy_helper.to_array(tensor, base_dir=str(path.parent))
    except Exception as exc:  # onnx raises assorted types for bad or external data
        raise ModelFileError(
            str(path), f"cannot decode initializer {tensor.name!r} ({exc})"
        ) from exc
    return str(tensor.name), np.asarray(value)


def prepare_swapper_input(crops: np.ndarray) -> Tensor:
    """(N,128,128,3) uint8 BGR crops -> (N,3,128,128) float32 RGB in [0,1]."""
    rgb = crops[..., ::-1].astype(np.float32) / 255.0
    prepared: Tensor = np.ascontiguousarray(rgb.transpose(0, 3, 1, 2), dtype=np.float32)
    return prepared


def prepare_source_latents(
    embeddings: np.ndarray, emap: np.ndarray, mode: LatentNormalization = "insightface"
) -> Tensor:
    """(N,512) ArcFace embeddings (raw or unit) -> (N,512) inswapper latents.

    Both modes start from the unit embedding times ``emap``; ``insightface`` then
    re-normalises the latent, ``facefusion`` does not (see the module docstring).
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    latents = unit @ np.asarray(emap, dtype=np.float64)
    if mode == "insightface":
        latents = latents / np.linalg.norm(latents, axis=1, keepdims=True)
    prepared: Tensor = latents.astype(np.float32)
    return prepared


def normalize_swapper_output(output: np.ndarray) -> np.ndarray:
    """(N,3,128,128) RGB in [0,1] -> (N,128,128,3) uint8 BGR (x * 255, rounded, clipped)."""
    rgb = np.clip(np.asarray(output, dtype=np.float32) * 255.0, 0.0, 255.0).round()
    return np.ascontiguousarray(rgb.transpose(0, 2, 3, 1)[..., ::-1].astype(np.uint8))


class Swapper:
    """inswapper_128: swaps a source identity into aligned 128x128 target crops.

    The output is whatever the loaded graph computes; with a contract fixture it is not
    a swap (see :mod:`facestage.fixtures`).
    """

    def __init__(
        self,
        model: LoadedModel,
        latent_normalization: LatentNormalization = "insightface",
    ) -> None:
        if latent_normalization not in LATENT_NORMALIZATIONS:
            raise ValueError(f"latent_normalization must be one of {LATENT_NORMALIZATIONS}")
        path = str(model.path)
        inputs = {node.name: node for node in model.session.get_inputs()}
        outputs = model.session.get_outputs()
        if set(inputs) != {TARGET_INPUT, SOURCE_INPUT} or len(outputs) != 1:
            raise ModelFileError(
                path,
                f"not an inswapper graph: inputs {sorted(inputs)} and {len(outputs)} outputs, "
                f"expected inputs {TARGET_INPUT!r} and {SOURCE_INPUT!r} and one output",
            )
        target_shape = list(inputs[TARGET_INPUT].shape)
        if target_shape[1:] != [3, SWAPPER_CROP_SIZE_PX, SWAPPER_CROP_SIZE_PX]:
            raise ModelFileError(
                path, f"target input {target_shape} is not [1,3,128,128] (inswapper_128)"
            )
        name, emap = read_last_initializer(model.path)
        if emap.ndim != 2 or emap.shape[0] != emap.shape[1]:
            raise ModelFileError(
                path, f"last initializer {name!r} {emap.shape} is not a square emap matrix"
            )
        source_shape = list(inputs[SOURCE_INPUT].shape)
        latent_axis = source_shape[-1] if source_shape else None
        if len(source_shape) != 2 or (
            isinstance(latent_axis, int) and latent_axis != emap.shape[1]
        ):
            raise ModelFileError(
                path, f"source input {source_shape} does not take {emap.shape[1]}-d latents"
            )
        self.model = model
        self.latent_normalization: LatentNormalization = latent_normalization
        self.emap = emap.astype(np.float32)
        self._output_name = outputs[0].name

    @property
    def crop_size_px(self) -> int:
        """Side of the square target crop (128)."""
        return SWAPPER_CROP_SIZE_PX

    @property
    def template(self) -> AlignmentTemplateName:
        """The alignment template target crops must be warped to."""
        return SWAPPER_TEMPLATE

    @property
    def embedding_size(self) -> int:
        """Length of the source embedding it takes: the rows of emap (512, ArcFace)."""
        return int(self.emap.shape[0])

    def validate(self, crops: np.ndarray, embeddings: np.ndarray) -> None:
        """Raises :class:`InvalidArgumentError` naming ``target_crops`` or
        ``source_embeddings`` when shapes, dtypes or values do not fit."""
        size = self.crop_size_px
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
            raise InvalidArgumentError(
                "target_crops",
                f"expected (N,{size},{size},3) uint8 crops aligned to {self.template}, "
                f"got {crops.shape} {crops.dtype}",
            )
        if crops.shape[0] == 0:
            raise InvalidArgumentError("target_crops", "the batch is empty")
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            got = embeddings.shape[-1] if embeddings.ndim else 0
            raise InvalidArgumentError(
                "source_embeddings",
                f"expected {self.embedding_size}-d ArcFace (w600k_r50) embeddings, "
                f"got {got} (shape {embeddings.shape}); other recognisers' vectors do not fit "
                "inswapper",
            )
        if embeddings.shape[0] not in (1, crops.shape[0]):
            raise InvalidArgumentError(
                "source_embeddings",
                f"expected 1 or {crops.shape[0]} embeddings (one per crop), "
                f"got {embeddings.shape[0]}",
            )
        norms = np.linalg.norm(embeddings.astype(np.float64), axis=1)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise InvalidArgumentError("source_embeddings", "embeddings must be finite, non-zero")

    def forward_swap(self, target: Tensor, latents: Tensor) -> np.ndarray:
        """Runs inswapper on prepared (N,3,128,128) targets and (N,512) latents."""
        (output,) = run_batched(
            self.model, {TARGET_INPUT: target, SOURCE_INPUT: latents}, [self._output_name]
        )
        return np.asarray(output)

    def swap(self, crops: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """(N,128,128,3) uint8 BGR target crops and (N,512) or (1,512) float32 source
        embeddings -> (N,128,128,3) uint8 BGR crops, in order.

        One embedding is used for every crop of the batch.
        """
        embeddings = np.asarray(embeddings)
        self.validate(crops, embeddings)
        latents = prepare_source_latents(embeddings, self.emap, self.latent_normalization)
        if latents.shape[0] != crops.shape[0]:
            latents = np.repeat(latents, crops.shape[0], axis=0)
        output = self.forward_swap(prepare_swapper_input(crops), latents)
        return normalize_swapper_output(output)
