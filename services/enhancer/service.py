"""The enhancer's gRPC servicer: aligned crops -> restored crops."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from facestage.enhancer.v1 import enhancer_pb2, enhancer_pb2_grpc
from facestage.errors import InvalidArgumentError
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
from facestage.types import Crop
from services.enhancer.model import Enhancer

SERVICE_NAME = enhancer_pb2.DESCRIPTOR.services_by_name["EnhancerService"].full_name
EnhancerSettings = stage_settings_class("enhancer", "gfpgan_1.4")
DEFAULT_FIDELITY_WEIGHT = 0.5


class EnhancerServicer(enhancer_pb2_grpc.EnhancerServiceServicer):
    """EnhanceFaces and GetModelInfo over a dynamically batched restorer."""

    def __init__(self, settings: StageSettings, enhancer: Enhancer, service: StageService) -> None:
        self.settings = settings
        self.enhancer = enhancer
        self.service = service

    async def EnhanceFaces(
        self, request: enhancer_pb2.EnhanceFacesRequest, context: Any
    ) -> enhancer_pb2.EnhanceFacesResponse:
        """Enhanced crops, one per crop, in request order."""
        check_batch(len(request.crops), self.settings.max_batch_size, "crops")
        weight = (
            request.fidelity_weight
            if request.HasField("fidelity_weight")
            else DEFAULT_FIDELITY_WEIGHT
        )
        if not 0.0 <= weight <= 1.0:
            raise InvalidArgumentError("fidelity_weight", f"must be in [0, 1], got {weight}")
        frames = await decode_images(request.crops, "crops", self.settings.max_pixels)
        crops = check_crop_size(frames, self.enhancer.crop_size_px, "crops")
        # Only models with a weight input care; others merge whatever the weight.
        key = round(weight, 4) if self.enhancer.has_fidelity_weight else None
        enhanced: list[Crop] = await self.service.batcher.submit(list(crops), key)
        return enhancer_pb2.EnhanceFacesResponse(
            enhanced_crops=encode_crops(enhanced, request.crops, request.output_format)
        )

    async def GetModelInfo(
        self, request: enhancer_pb2.GetModelInfoRequest, context: Any
    ) -> enhancer_pb2.GetModelInfoResponse:
        """The loaded restorer: crop size and template."""
        return enhancer_pb2.GetModelInfoResponse(model_info=self.service.model_info)


def build(settings: StageSettings, model: LoadedModel) -> StageService:
    """The enhancer service over ``model`` (GFPGAN 1.4 or a CodeFormer-style export)."""
    enhancer = Enhancer(model)

    def run_batch(crops: Sequence[Crop], key: Hashable) -> list[Crop]:
        weight = float(key) if isinstance(key, float) else DEFAULT_FIDELITY_WEIGHT
        return list(enhancer.enhance(np.stack(crops), weight))

    size = enhancer.crop_size_px
    info = build_model_info(
        model,
        family="codeformer" if enhancer.has_fidelity_weight else "gfpgan",
        settings=settings,
        input_size_px=(size, size),
        template=enhancer.template,
    )
    batcher = make_batcher(run_batch, settings, "enhancer", model)

    async def warmup() -> None:
        await batcher.submit([np.zeros((size, size, 3), dtype=np.uint8)])

    service = StageService(warmup=warmup, batcher=batcher, model_info=info)
    return service.bind(
        EnhancerServicer(settings, enhancer, service),
        enhancer_pb2_grpc.add_EnhancerServiceServicer_to_server,
        SERVICE_NAME,
    )
