"""ONNX Runtime sessions: execution providers from settings, a logged fallback, one place.

Every model of every stage is opened through :func:`open_session`, which returns a
:class:`LoadedModel`: the session plus what a ``GetModelInfo`` answer needs (the
provider really in use, the file's sha256, input and output metadata).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from facestage.errors import ModelFileError
from facestage.types import EXECUTION_PROVIDERS, ExecutionProvider

log = logging.getLogger(__name__)

ORT_PROVIDER_NAMES: dict[ExecutionProvider, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
DEFAULT_PROVIDERS: tuple[ExecutionProvider, ...] = EXECUTION_PROVIDERS


class NodeArg(Protocol):
    """What ONNX Runtime tells about one input or output."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> Sequence[int | str | None]: ...

    @property
    def type(self) -> str: ...


class InferenceSession(Protocol):
    """The part of ``onnxruntime.InferenceSession`` facestage uses.

    Model wrappers depend on this protocol, so their prepare/normalise steps and their
    batching can be tested with any object that runs arrays.
    """

    def run(
        self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any]
    ) -> list[Any]: ...

    def get_inputs(self) -> Sequence[NodeArg]: ...

    def get_outputs(self) -> Sequence[NodeArg]: ...

    def get_providers(self) -> list[str]: ...


@dataclass(frozen=True)
class LoadedModel:
    """An open session and the facts about it that services report."""

    path: Path
    session: InferenceSession
    provider: str
    sha256: str

    @property
    def name(self) -> str:
        """The file stem, e.g. ``scrfd_2.5g_bnkps``."""
        return self.path.stem

    def input_shape(self, index: int = 0) -> Sequence[int | str | None]:
        """Declared shape of input ``index``; strings or None mark dynamic axes."""
        return self.session.get_inputs()[index].shape

    @property
    def batch_dim_fixed(self) -> bool:
        """True when the first input's batch axis is a fixed 1 (one item per run)."""
        first = self.input_shape(0)[0] if self.input_shape(0) else 1
        return isinstance(first, int) and first == 1

    @property
    def fp16(self) -> bool:
        """True when the first input is float16."""
        return "float16" in self.session.get_inputs()[0].type


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_providers(
    wanted: Sequence[ExecutionProvider], available: Sequence[str], device_id: int = 0
) -> list[str | tuple[str, dict[str, Any]]]:
    """Maps provider names from settings to the ones this ONNX Runtime build has.

    Providers that are not available are dropped with a warning; CPU is always last so
    there is something to fall back to.
    """
    chosen: list[str | tuple[str, dict[str, Any]]] = []
    for name in wanted:
        ort_name = ORT_PROVIDER_NAMES[name]
        if ort_name not in available:
            log.warning("execution provider %s is not available in this build", ort_name)
            continue
        if name == "tensorrt":
            cache = os.environ.get("FACESTAGE_TRT_CACHE", str(Path.home() / ".cache/facestage/trt"))
            chosen.append(
                (
                    ort_name,
                    {
                        "device_id": device_id,
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": cache,
                        "trt_fp16_enable": True,
                    },
                )
            )
        elif name == "cuda":
            chosen.append((ort_name, {"device_id": device_id}))
        else:
            chosen.append(ort_name)
    if ORT_PROVIDER_NAMES["cpu"] not in [c if isinstance(c, str) else c[0] for c in chosen]:
        chosen.append(ORT_PROVIDER_NAMES["cpu"])
    return chosen


def open_session(
    path: Path,
    providers: Sequence[ExecutionProvider] = DEFAULT_PROVIDERS,
    *,
    intra_op_threads: int = 0,
    device_id: int = 0,
) -> LoadedModel:
    """Opens an ONNX model, or raises :class:`ModelFileError` naming the file.

    The provider really in use is read back from the session: if CUDA was asked for but
    could not start, ONNX Runtime falls back to CPU and this says so in the log and in
    ``LoadedModel.provider``.
    """
    import onnxruntime as ort

    if not path.is_file():
        raise ModelFileError(str(path), "not found")
    sha256 = file_sha256(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads > 0:
        options.intra_op_num_threads = intra_op_threads
    options.log_severity_level = 3
    resolved = resolve_providers(providers, ort.get_available_providers(), device_id)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=resolved)
    except Exception as exc:  # ORT raises its own types for corrupt or foreign files
        raise ModelFileError(str(path), f"cannot be loaded by ONNX Runtime ({exc})") from exc
    in_use = session.get_providers()[0]
    wanted_first = ORT_PROVIDER_NAMES[providers[0]] if providers else in_use
    if in_use != wanted_first:
        log.warning("model %s runs on %s (asked for %s first)", path.name, in_use, wanted_first)
    else:
        log.info("model %s runs on %s", path.name, in_use)
    return LoadedModel(path=path, session=session, provider=in_use, sha256=sha256)


def run_batched(
    model: LoadedModel,
    inputs: Mapping[str, np.ndarray[Any, Any]],
    output_names: Sequence[str] | None = None,
    shared: Mapping[str, np.ndarray[Any, Any]] | None = None,
) -> list[np.ndarray[Any, Any]]:
    """Runs a batch in one ``session.run``, or item by item when the batch axis is fixed.

    Every array in ``inputs`` has the batch on axis 0; ``shared`` inputs (a CodeFormer
    ``weight``, say) go unchanged into every run. Outputs are concatenated back on axis
    0, so callers see one call either way.
    """
    shared = dict(shared or {})
    first = next(iter(inputs.values()))
    if not model.batch_dim_fixed or first.shape[0] == 1:
        feed = {**inputs, **shared}
        return [np.asarray(o) for o in model.session.run(output_names, feed)]
    per_item = [
        model.session.run(output_names, {**{k: v[i : i + 1] for k, v in inputs.items()}, **shared})
        for i in range(first.shape[0])
    ]
    return [
        np.concatenate([np.asarray(item[j]) for item in per_item], axis=0)
        for j in range(len(per_item[0]))
    ]
