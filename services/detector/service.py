"""The detector's gRPC servicer: decode images, detect through the batcher, answer."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from facestage.common.v1 import common_pb2
from facestage.detector.v1 import detector_pb2, detector_pb2_grpc
from facestage.faces import face_to_proto
from facestage.runtime import LoadedModel
from facestage.settings import StageSettings, stage_settings_class
from facestage.stage import (
    StageService,
    build_model_info,
    check_batch,
    decode_images,
    make_batcher,
)
from facestage.types import DetectedFace, VisionFrame
from services.detector.model import DetectionOptions, FaceDetector, load_detector, warmup_frame

SERVICE_NAME = detector_pb2.DESCRIPTOR.services_by_name["DetectorService"].full_name
DetectorSettings = stage_settings_class("detector", "det_10g")


class DetectorServicer(detector_pb2_grpc.DetectorServiceServicer):
    """DetectFaces and GetModelInfo over a dynamically batched detector."""

    def __init__(
        self, settings: StageSettings, detector: FaceDetector, service: StageService
    ) -> None:
        self.settings = settings
        self.detector = detector
        self.service = service

    def _options(self, request: detector_pb2.DetectFacesRequest) -> DetectionOptions:
        given = request.options
        return DetectionOptions(
            score_threshold=given.score_threshold if given.HasField("score_threshold") else 0.5,
            max_faces=given.max_faces if given.HasField("max_faces") else 0,
            detection_size_px=(
                given.detection_size_px
                if given.HasField("detection_size_px")
                else self.detector.default_size_px
            ),
        )

    async def DetectFaces(
        self, request: detector_pb2.DetectFacesRequest, context: Any
    ) -> detector_pb2.DetectFacesResponse:
        """Faces of every image, in request order and each image's own pixels."""
        check_batch(len(request.images), self.settings.max_batch_size, "images")
        options = self._options(request)
        frames = await decode_images(request.images, "images", self.settings.max_pixels)
        results: list[list[DetectedFace]] = await self.service.batcher.submit(frames, options)
        return detector_pb2.DetectFacesResponse(
            results=[
                detector_pb2.ImageFaces(faces=[face_to_proto(face) for face in faces])
                for faces in results
            ]
        )

    async def GetModelInfo(
        self, request: detector_pb2.GetModelInfoRequest, context: Any
    ) -> detector_pb2.GetModelInfoResponse:
        """The loaded detector."""
        return detector_pb2.GetModelInfoResponse(model_info=self.service.model_info)


def build(settings: StageSettings, model: LoadedModel) -> StageService:
    """The detector service over ``model`` (SCRFD/RetinaFace or YuNet)."""
    detector = load_detector(model)

    def run_batch(frames: Sequence[VisionFrame], key: Hashable) -> list[list[DetectedFace]]:
        assert isinstance(key, DetectionOptions)
        return detector.detect(frames, key)

    size = detector.default_size_px
    info = build_model_info(
        model,
        family=detector.family,
        settings=settings,
        input_size_px=(size, size),
        model_channel_order=common_pb2.CHANNEL_ORDER_RGB
        if detector.family == "scrfd"
        else common_pb2.CHANNEL_ORDER_BGR,
    )
    batcher = make_batcher(run_batch, settings, "detector", model)

    async def warmup() -> None:
        await batcher.submit([warmup_frame(size)], DetectionOptions(detection_size_px=size))

    service = StageService(warmup=warmup, batcher=batcher, model_info=info)
    return service.bind(
        DetectorServicer(settings, detector, service),
        detector_pb2_grpc.add_DetectorServiceServicer_to_server,
        SERVICE_NAME,
    )
