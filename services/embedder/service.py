"""The embedder's gRPC servicer: align or accept crops, embed through the batcher."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from facestage.common.v1 import common_pb2
from facestage.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from facestage.errors import InvalidArgumentError
from facestage.faces import embedding_to_proto, landmarks_from_proto
from facestage.imaging import decode_image
from facestage.runtime import LoadedModel
from facestage.settings import StageSettings, stage_settings_class
from facestage.stage import StageService, build_model_info, check_batch, make_batcher
from facestage.types import Crop
from services.embedder.model import Embedder, normalize_embeddings

SERVICE_NAME = embedder_pb2.DESCRIPTOR.services_by_name["EmbedderService"].full_name
EmbedderSettings = stage_settings_class("embedder", "w600k_r50")


class EmbedderServicer(embedder_pb2_grpc.EmbedderServiceServicer):
    """EmbedFaces and GetModelInfo over a dynamically batched recogniser."""

    def __init__(self, settings: StageSettings, embedder: Embedder, service: StageService) -> None:
        self.settings = settings
        self.embedder = embedder
        self.service = service

    def _crop(self, face: embedder_pb2.FaceToEmbed, field: str) -> Crop:
        kind = face.WhichOneof("face")
        size = self.embedder.crop_size_px
        if kind == "aligned_crop":
            crop = decode_image(
                face.aligned_crop, f"{field}.aligned_crop", self.settings.max_pixels
            )
            if crop.shape[:2] != (size, size):
                raise InvalidArgumentError(
                    f"{field}.aligned_crop",
                    f"crop is {crop.shape[1]}x{crop.shape[0]}, the model takes {size}x{size} "
                    f"crops aligned to {self.embedder.template}",
                )
            return crop
        if kind == "face_in_image":
            frame = decode_image(
                face.face_in_image.image, f"{field}.face_in_image.image", self.settings.max_pixels
            )
            landmarks = landmarks_from_proto(
                face.face_in_image.landmarks, f"{field}.face_in_image.landmarks"
            )
            return self.embedder.align_for_embedding(frame, landmarks).crop
        raise InvalidArgumentError(field, "set `face_in_image` or `aligned_crop`")

    async def EmbedFaces(
        self, request: embedder_pb2.EmbedFacesRequest, context: Any
    ) -> embedder_pb2.EmbedFacesResponse:
        """Raw and normalised embeddings, one per face, in request order."""
        check_batch(len(request.faces), self.settings.max_batch_size, "faces")
        crops = await asyncio.to_thread(
            lambda: [self._crop(face, f"faces[{i}]") for i, face in enumerate(request.faces)]
        )
        raw: list[np.ndarray] = await self.service.batcher.submit(crops)
        normalized = normalize_embeddings(np.stack(raw))
        return embedder_pb2.EmbedFacesResponse(
            embeddings=[
                embedder_pb2.FaceEmbedding(
                    raw=embedding_to_proto(vector), normalized=embedding_to_proto(unit)
                )
                for vector, unit in zip(raw, normalized, strict=True)
            ]
        )

    async def GetModelInfo(
        self, request: embedder_pb2.GetModelInfoRequest, context: Any
    ) -> embedder_pb2.GetModelInfoResponse:
        """The loaded recogniser, its template and embedding size."""
        return embedder_pb2.GetModelInfoResponse(model_info=self.service.model_info)


def build(settings: StageSettings, model: LoadedModel) -> StageService:
    """The embedder service over ``model`` (ArcFace or any recogniser)."""
    embedder = Embedder(model)

    def run_batch(crops: Sequence[Crop], key: Hashable) -> list[np.ndarray]:
        return list(embedder.embed(np.stack(crops)))

    size = embedder.crop_size_px
    info = build_model_info(
        model,
        family=embedder.family,
        settings=settings,
        input_size_px=(size, size),
        template=embedder.template,
        embedding_size=embedder.embedding_size,
        model_channel_order=common_pb2.CHANNEL_ORDER_RGB
        if embedder.normalization.channel_order == "rgb"
        else common_pb2.CHANNEL_ORDER_BGR,
    )
    batcher = make_batcher(run_batch, settings, "embedder", model)

    async def warmup() -> None:
        await batcher.submit([np.zeros((size, size, 3), dtype=np.uint8)])

    service = StageService(warmup=warmup, batcher=batcher, model_info=info)
    return service.bind(
        EmbedderServicer(settings, embedder, service),
        embedder_pb2_grpc.add_EmbedderServiceServicer_to_server,
        SERVICE_NAME,
    )
