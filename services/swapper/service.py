"""The swapper's gRPC servicer: aligned target crops + source embedding -> swapped crops."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from facestage.faces import embeddings_from_proto
from facestage.runtime import LoadedModel
from facestage.settings import StageSettings, stage_settings_class
from facestage.stage import (
    StageService,
    build_model_info,
    check_batch,
    check_crop_size,
    decode_images,
    encode_crops,
    make_batcher,
)
from facestage.swapper.v1 import swapper_pb2, swapper_pb2_grpc
from facestage.types import Crop
from services.swapper.model import Swapper

SERVICE_NAME = swapper_pb2.DESCRIPTOR.services_by_name["SwapperService"].full_name
SwapperSettings = stage_settings_class("swapper", "inswapper_128")

SwapItem = tuple[Crop, np.ndarray]
"""One target crop and its source embedding (the batcher's unit of work)."""


class SwapperServicer(swapper_pb2_grpc.SwapperServiceServicer):
    """SwapFaces and GetModelInfo over a dynamically batched swapper."""

    def __init__(self, settings: StageSettings, swapper: Swapper, service: StageService) -> None:
        self.settings = settings
        self.swapper = swapper
        self.service = service

    async def SwapFaces(
        self, request: swapper_pb2.SwapFacesRequest, context: Any
    ) -> swapper_pb2.SwapFacesResponse:
        """Swapped crops, one per target crop, in request order."""
        check_batch(len(request.target_crops), self.settings.max_batch_size, "target_crops")
        embeddings = embeddings_from_proto(request.source_embeddings, "source_embeddings")
        frames = await decode_images(request.target_crops, "target_crops", self.settings.max_pixels)
        crops = check_crop_size(frames, self.swapper.crop_size_px, "target_crops")
        # Validates sizes and counts here, naming the field, before any work is queued.
        self.swapper.validate(crops, embeddings)
        if len(embeddings) == 1:
            embeddings = np.repeat(embeddings, len(crops), axis=0)
        swapped: list[Crop] = await self.service.batcher.submit(
            list(zip(crops, embeddings, strict=True))
        )
        return swapper_pb2.SwapFacesResponse(
            swapped_crops=encode_crops(swapped, request.target_crops, request.output_format)
        )

    async def GetModelInfo(
        self, request: swapper_pb2.GetModelInfoRequest, context: Any
    ) -> swapper_pb2.GetModelInfoResponse:
        """The loaded swapper: crop size, template, embedding size."""
        return swapper_pb2.GetModelInfoResponse(model_info=self.service.model_info)


def build(settings: StageSettings, model: LoadedModel) -> StageService:
    """The swapper service over ``model`` (inswapper_128)."""
    swapper = Swapper(model)

    def run_batch(items: Sequence[SwapItem], key: Hashable) -> list[Crop]:
        crops = np.stack([crop for crop, _ in items])
        embeddings = np.stack([embedding for _, embedding in items])
        return list(swapper.swap(crops, embeddings))

    size = swapper.crop_size_px
    info = build_model_info(
        model,
        family="inswapper",
        settings=settings,
        input_size_px=(size, size),
        template=swapper.template,
        embedding_size=swapper.embedding_size,
    )
    batcher = make_batcher(run_batch, settings, "swapper", model)

    async def warmup() -> None:
        embedding = np.ones(swapper.embedding_size, dtype=np.float32)
        await batcher.submit([(np.zeros((size, size, 3), dtype=np.uint8), embedding)])

    service = StageService(warmup=warmup, batcher=batcher, model_info=info)
    return service.bind(
        SwapperServicer(settings, swapper, service),
        swapper_pb2_grpc.add_SwapperServiceServicer_to_server,
        SERVICE_NAME,
    )
