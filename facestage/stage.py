"""What every stage service shares: model loading at start, request checks, model info,
and the ``main`` that ``python -m services.<stage>`` and ``facestage-<stage>`` run.

A stage package provides only ``build(settings, model) -> StageService``: its servicer,
its warm-up, its batcher. Everything else is here once.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from facestage import metrics
from facestage.alignment import template_points
from facestage.batching import DynamicBatcher
from facestage.common.v1 import common_pb2
from facestage.errors import InvalidArgumentError, ModelFileError
from facestage.imaging import decode_image, encode_image, reply_channel_order
from facestage.runtime import LoadedModel, open_session
from facestage.server import GrpcServer, ServiceBinding, configure_logging
from facestage.settings import StageSettings, parse_settings
from facestage.types import AlignmentTemplateName, Stage, VisionFrame

log = logging.getLogger(__name__)


@dataclass
class StageService:
    """A built stage: its gRPC bindings, a warm-up, and what to close at shutdown."""

    warmup: Callable[[], Awaitable[None]]
    batcher: DynamicBatcher[Any, Any]
    model_info: common_pb2.ModelInfo
    bindings: Sequence[ServiceBinding] = field(default_factory=list)

    def bind(
        self,
        servicer: Any,
        add_to_server: Callable[[Any, grpc.aio.Server], None],
        service_name: str,
    ) -> StageService:
        """Attaches the stage's servicer (built with this object) and returns self."""
        self.bindings = [ServiceBinding(servicer, add_to_server, service_name)]
        return self

    async def close(self) -> None:
        """Fails queued work with UNAVAILABLE and stops the batcher's threads."""
        await self.batcher.close()


BuildFn = Callable[[StageSettings, LoadedModel], StageService]


def check_batch(count: int, max_batch_size: int, field_name: str) -> None:
    """Rejects empty batches (INVALID_ARGUMENT) and too-large ones (INVALID_ARGUMENT)."""
    if count == 0:
        raise InvalidArgumentError(field_name, "is empty: send at least one item")
    if count > max_batch_size:
        raise InvalidArgumentError(
            field_name, f"has {count} items, more than the maximum batch size {max_batch_size}"
        )


async def decode_images(
    images: Sequence[common_pb2.Image], field_name: str, max_pixels: int
) -> list[VisionFrame]:
    """Decodes request images off the event loop, naming ``field[i]`` in errors."""

    def decode_all() -> list[VisionFrame]:
        return [
            decode_image(image, f"{field_name}[{i}]", max_pixels) for i, image in enumerate(images)
        ]

    return await asyncio.to_thread(decode_all)


def check_crop_size(frames: Sequence[VisionFrame], size_px: int, field_name: str) -> np.ndarray:
    """Stacks crops into (N, S, S, 3), rejecting any crop not ``size_px`` square."""
    for i, frame in enumerate(frames):
        if frame.shape[:2] != (size_px, size_px):
            raise InvalidArgumentError(
                f"{field_name}[{i}]",
                f"crop is {frame.shape[1]}x{frame.shape[0]}, the model takes "
                f"{size_px}x{size_px} crops aligned to its template (see GetModelInfo)",
            )
    return np.stack(frames)


def encode_crops(
    crops: Sequence[VisionFrame], requested: Sequence[common_pb2.Image], image_format: int
) -> list[common_pb2.Image]:
    """Answer crops in the requested format, raw ones in each request crop's channel order."""
    return [
        encode_image(crop, image_format, reply_channel_order(source))
        for crop, source in zip(crops, requested, strict=True)
    ]


def build_model_info(
    model: LoadedModel,
    *,
    family: str,
    settings: StageSettings,
    input_size_px: tuple[int, int],
    template: AlignmentTemplateName | None = None,
    embedding_size: int = 0,
    model_channel_order: int = common_pb2.CHANNEL_ORDER_RGB,
) -> common_pb2.ModelInfo:
    """The GetModelInfo answer, from what the loaded model really is."""
    info = common_pb2.ModelInfo(
        model_name=model.name,
        model_family=family,
        model_sha256=model.sha256,
        input_width_px=input_size_px[0],
        input_height_px=input_size_px[1],
        alignment_template=template or "",
        embedding_size=embedding_size,
        precision=common_pb2.PRECISION_FP16 if model.fp16 else common_pb2.PRECISION_FP32,
        execution_provider=model.provider,
        max_batch_size=settings.max_batch_size,
        model_channel_order=model_channel_order,  # type: ignore[arg-type]
    )
    if template is not None:
        for x, y in template_points(template, input_size_px[0]):
            info.alignment_points.add(x=float(x), y=float(y))
    return info


def make_batcher(
    run_batch: Callable[[Sequence[Any], Any], Sequence[Any]],
    settings: StageSettings,
    stage: Stage,
    model: LoadedModel,
) -> DynamicBatcher[Any, Any]:
    """A dynamic batcher configured from the stage's settings."""
    return DynamicBatcher(
        run_batch,
        stage=stage,
        model_name=model.name,
        max_batch_size=settings.max_batch_size,
        window_s=settings.batch_window_ms / 1000.0,
        max_queue_items=settings.max_queue_items,
        threads=settings.inference_threads,
    )


def load_stage_model(settings: StageSettings) -> LoadedModel:
    """Finds, verifies and opens the stage's model, or raises ModelFileError."""
    from facestage.model_store import resolve_verified_model

    path = resolve_verified_model(settings.model, settings.model_dir)
    return open_session(
        path,
        settings.providers,
        intra_op_threads=settings.intra_op_threads,
        device_id=settings.device_id,
    )


def publish_model_info(stage: Stage, info: common_pb2.ModelInfo) -> None:
    """Exports ``facestage_model_info`` for the loaded model."""
    metrics.MODEL_INFO.labels(
        stage,
        info.model_name,
        info.execution_provider,
        common_pb2.Precision.Name(info.precision).removeprefix("PRECISION_").lower(),
        info.model_sha256,
    ).set(1)


def create_server(stage: Stage, settings: StageSettings, service: StageService) -> GrpcServer:
    """The stage's gRPC server: bindings, warm-up, and the batcher closed at drain."""
    publish_model_info(stage, service.model_info)
    return GrpcServer(
        settings, stage, service.bindings, warmup=service.warmup, on_close=service.close
    )


def run_stage(
    stage: Stage,
    settings_cls: type[StageSettings],
    build: BuildFn,
    argv: list[str] | None = None,
) -> int:
    """The ``main`` of a stage service. Returns the process exit code.

    A missing or corrupt model exits with code 2 and one message naming the file and the
    ``facestage models pull`` command, before anything listens.
    """
    settings = parse_settings(settings_cls, sys.argv[1:] if argv is None else argv)
    configure_logging(settings.log_level)
    try:
        model = load_stage_model(settings)
    except ModelFileError as exc:
        print(f"facestage-{stage}: error: {exc}", file=sys.stderr, flush=True)
        return 2

    async def serve() -> None:
        # gRPC's aio server and the batcher belong to the loop that runs them.
        server = create_server(stage, settings, build(settings, model))
        await server.serve_forever()

    try:
        asyncio.run(serve())
    except ModelFileError as exc:  # the graph is not of this stage's contract
        print(f"facestage-{stage}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # bind failure, or the warm-up inference failed
        log.debug("server failed", exc_info=exc)
        print(f"facestage-{stage}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
