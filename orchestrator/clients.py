"""Clients of the four stage services, as the orchestrator calls them.

One ``grpc.aio`` channel per stage. A target is ``host:port`` for one replica or
``dns:///name:port`` for a headless Kubernetes Service; the channel balances calls
``round_robin`` over every resolved address (a ClusterIP would pin one connection) and
retries UNAVAILABLE with exponential backoff, so a replica draining or restarting costs
a retry on another replica rather than a failed job.

Only what a stage needs travels: frames go to the detector downscaled to its detection
size as JPEG, crops go to the other stages at the model's input size. Every call records
its latency and request bytes and maps gRPC status codes to :mod:`facestage.errors`,
naming the stage, at this one boundary.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar

import cv2
import grpc
import numpy as np

from facestage.common.v1 import common_pb2
from facestage.detector.v1 import detector_pb2, detector_pb2_grpc
from facestage.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from facestage.enhancer.v1 import enhancer_pb2, enhancer_pb2_grpc
from facestage.errors import (
    DeadlineExceededError,
    FacestageError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from facestage.faces import embedding_to_proto, embeddings_from_proto, face_from_proto
from facestage.imaging import decode_image, encode_bytes, encode_raw
from facestage.metrics import ORCH_STAGE_BYTES_SENT, ORCH_STAGE_CALL_DURATION
from facestage.swapper.v1 import swapper_pb2, swapper_pb2_grpc
from facestage.types import Crop, DetectedFace, Embedding, Stage, VisionFrame

CropWireFormat = Literal["raw", "png", "jpeg"]

DEFAULT_CALL_TIMEOUT_S = 30.0
DEFAULT_CONNECT_TIMEOUT_S = 60.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_RETRY_ATTEMPTS = 5
DEFAULT_DETECTOR_JPEG_QUALITY = 90
DEFAULT_CROP_JPEG_QUALITY = 95

# gRPC servers refuse pings more often than every 5 minutes by default and answer
# them with GOAWAY "too_many_pings"; the per-call deadline already bounds a hung call,
# so keepalive only has to notice a dead idle connection, and slowly is enough.
_KEEPALIVE_TIME_MS = 6 * 60 * 1000
_KEEPALIVE_TIMEOUT_MS = 20 * 1000
# gRPC's default reconnect backoff grows to 120 s: a restarted single replica would
# then sit unused for minutes in the middle of a long video job.
_MAX_RECONNECT_BACKOFF_MS = 5 * 1000

_SERVICE_NAMES: dict[Stage, str] = {
    "detector": detector_pb2.DESCRIPTOR.services_by_name["DetectorService"].full_name,
    "embedder": embedder_pb2.DESCRIPTOR.services_by_name["EmbedderService"].full_name,
    "swapper": swapper_pb2.DESCRIPTOR.services_by_name["SwapperService"].full_name,
    "enhancer": enhancer_pb2.DESCRIPTOR.services_by_name["EnhancerService"].full_name,
}

# Calls that fail with these codes may succeed on another replica or a moment later.
_RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED}
)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ClientSettings:
    """How the orchestrator talks to the stages: deadlines, sizes, retries, codecs."""

    call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S
    """Deadline of each stage call, retries included."""
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    """How long :meth:`StageClients.connect` waits for each stage's GetModelInfo answer."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest message sent or received."""
    retry_attempts: int = DEFAULT_RETRY_ATTEMPTS
    """Attempts of a call that fails UNAVAILABLE (first one included), backoff 0.1 s to 2 s."""
    detector_jpeg_quality: int = DEFAULT_DETECTOR_JPEG_QUALITY
    """JPEG quality of the downscaled frames sent to the detector."""
    crop_wire_format: CropWireFormat = "jpeg"
    """Encoding of crops sent to the embedder, swapper and enhancer."""
    crop_jpeg_quality: int = DEFAULT_CROP_JPEG_QUALITY
    """JPEG quality of crops when ``crop_wire_format`` is ``jpeg``."""

    def __post_init__(self) -> None:
        if self.call_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("call_timeout_s and connect_timeout_s must be positive")
        if self.max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, got {self.max_message_bytes}")
        if not 1 <= self.retry_attempts <= 5:
            # gRPC caps maxAttempts at 5; 1 means no retries (no retry policy at all,
            # since gRPC rejects a policy of fewer than 2 attempts).
            raise ValueError(f"retry_attempts must be 1..5, got {self.retry_attempts}")
        for name in ("detector_jpeg_quality", "crop_jpeg_quality"):
            quality = getattr(self, name)
            if not 1 <= quality <= 100:
                raise ValueError(f"{name} must be 1..100, got {quality}")
        if self.crop_wire_format not in ("raw", "png", "jpeg"):
            raise ValueError(
                f"crop_wire_format must be raw, png or jpeg, got {self.crop_wire_format}"
            )


@dataclass(frozen=True)
class StageTargets:
    """gRPC targets of the stages: ``host:port``, or ``dns:///name:port`` for replicas."""

    detector: str
    embedder: str
    swapper: str
    enhancer: str | None = None

    def of(self, stage: Stage) -> str | None:
        """The target of ``stage`` (None for an enhancer that is not deployed)."""
        target: str | None = getattr(self, stage)
        return target


def channel_options(stage: Stage, settings: ClientSettings) -> list[tuple[str, Any]]:
    """Channel arguments of the channel to ``stage``: sizes, balancing, retries, keepalive."""
    method_config: dict[str, Any] = {"name": [{"service": _SERVICE_NAMES[stage]}]}
    if settings.retry_attempts > 1:
        method_config["retryPolicy"] = {
            "maxAttempts": settings.retry_attempts,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    service_config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [method_config],
    }
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.service_config", json.dumps(service_config)),
        # A DNS TXT record must not replace the balancing and retry policy above.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1),
        # gRPC only retries requests it could buffer (256 KiB by default); a batch of
        # frames or crops is larger than that and would otherwise never be retried.
        ("grpc.per_rpc_retry_buffer_size", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", _KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS),
    ]


def error_from_rpc(stage: Stage, target: str, error: grpc.aio.AioRpcError) -> FacestageError:
    """The facestage error for a failed stage call, naming the stage and its target."""
    code = error.code()
    details = error.details() or code.name
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(f"{stage} stage at {target} missed its deadline: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(f"{stage} stage at {target} is overloaded: {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgumentError(stage, f"rejected by the stage at {target}: {details}")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPreconditionError(f"{stage} stage at {target}: {details}")
    if code in _RETRYABLE_CODES:
        return UnavailableError(f"{stage} stage unavailable at {target}: {details}")
    # INTERNAL, UNKNOWN, UNIMPLEMENTED (a wrong service behind the target), ...
    return FacestageError(f"{stage} stage at {target} failed with {code.name}: {details}")


def _points(info: common_pb2.ModelInfo, stage: Stage) -> np.ndarray:
    points = np.array([[p.x, p.y] for p in info.alignment_points], dtype=np.float64)
    if points.shape != (5, 2):
        raise FailedPreconditionError(
            f"{stage} model {info.model_name!r} reports {len(info.alignment_points)} alignment "
            "points, expected 5"
        )
    return points


def _crop_size(info: common_pb2.ModelInfo, stage: Stage) -> int:
    if info.input_width_px == 0 or info.input_width_px != info.input_height_px:
        raise FailedPreconditionError(
            f"{stage} model {info.model_name!r} reports an input of "
            f"{info.input_width_px}x{info.input_height_px}; crops must be square"
        )
    return int(info.input_width_px)


def _chunks(count: int, size: int) -> list[range]:
    size = max(1, size)
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


async def _gather_or_cancel(calls: Sequence[Awaitable[T]]) -> list[T]:
    """Results of concurrent calls in order; on the first failure the others are cancelled.

    Plain ``gather`` would leave the sibling calls running and occupying the stage for a
    result nobody reads.
    """
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def detection_scale(height: int, width: int, size_px: int) -> tuple[int, int]:
    """(height, width) of a frame downscaled so its longer side is at most ``size_px``.

    The shorter side is truncated the way the detector's letterbox computes it, so the
    detector receives exactly the size it would resize to and resamples nothing again.
    """
    if max(height, width) <= size_px:
        return height, width
    if height > width:
        return size_px, max(1, int(size_px * width / height))
    return max(1, int(size_px * height / width)), size_px


class StageClients:
    """The orchestrator's connections to the detector, embedder, swapper and enhancer.

    Create with :meth:`connect` (it fetches every stage's ModelInfo, from which crops are
    sized and aligned); close with :meth:`close` or use as an async context manager.
    """

    def __init__(
        self,
        targets: StageTargets,
        settings: ClientSettings,
        channels: dict[Stage, grpc.aio.Channel],
        infos: dict[Stage, common_pb2.ModelInfo],
    ) -> None:
        """Use :meth:`connect`; this only stores what it fetched."""
        self.targets = targets
        self.settings = settings
        self._channels = channels
        self.detector_info = infos["detector"]
        self.embedder_info = infos["embedder"]
        self.swapper_info = infos["swapper"]
        self.enhancer_info: common_pb2.ModelInfo | None = infos.get("enhancer")
        self._detector = detector_pb2_grpc.DetectorServiceStub(channels["detector"])
        self._embedder = embedder_pb2_grpc.EmbedderServiceStub(channels["embedder"])
        self._swapper = swapper_pb2_grpc.SwapperServiceStub(channels["swapper"])
        self._enhancer = (
            enhancer_pb2_grpc.EnhancerServiceStub(channels["enhancer"])
            if "enhancer" in channels
            else None
        )
        self.embed_crop_size_px = _crop_size(self.embedder_info, "embedder")
        self.embed_template_points = _points(self.embedder_info, "embedder")
        self.swap_crop_size_px = _crop_size(self.swapper_info, "swapper")
        self.swap_template_points = _points(self.swapper_info, "swapper")
        self.enhance_crop_size_px: int | None = None
        self.enhance_template_points: np.ndarray | None = None
        if self.enhancer_info is not None:
            self.enhance_crop_size_px = _crop_size(self.enhancer_info, "enhancer")
            self.enhance_template_points = _points(self.enhancer_info, "enhancer")

    @classmethod
    async def connect(
        cls, targets: StageTargets, settings: ClientSettings = ClientSettings()
    ) -> StageClients:
        """Opens a channel per stage and waits for each stage's GetModelInfo answer.

        Raises :class:`UnavailableError` naming the stage and target when a stage does
        not answer within ``settings.connect_timeout_s``.
        """
        stages: list[Stage] = ["detector", "embedder", "swapper"]
        if targets.enhancer is not None:
            stages.append("enhancer")
        channels: dict[Stage, grpc.aio.Channel] = {
            stage: grpc.aio.insecure_channel(
                str(targets.of(stage)), options=channel_options(stage, settings)
            )
            for stage in stages
        }
        try:
            answers = await _gather_or_cancel(
                [
                    _model_info(stage, str(targets.of(stage)), channels[stage], settings)
                    for stage in stages
                ]
            )
            return cls(targets, settings, channels, dict(zip(stages, answers, strict=True)))
        except BaseException:
            await asyncio.gather(*(channel.close(None) for channel in channels.values()))
            raise

    async def __aenter__(self) -> StageClients:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes every channel; calls still running are cancelled."""
        await asyncio.gather(*(channel.close(None) for channel in self._channels.values()))

    # --- calls -----------------------------------------------------------------------

    async def _call(
        self,
        stage: Stage,
        method: Callable[..., Awaitable[R]],
        request: Any,
    ) -> R:
        """One unary call with the deadline, metrics and error mapping of every call."""
        target = str(self.targets.of(stage))
        ORCH_STAGE_BYTES_SENT.labels("orchestrator", stage).inc(request.ByteSize())
        started = time.perf_counter()
        try:
            return await method(request, timeout=self.settings.call_timeout_s)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(stage, target, error) from error
        finally:
            ORCH_STAGE_CALL_DURATION.labels("orchestrator", stage).observe(
                time.perf_counter() - started
            )

    def _encode_crop(self, crop: Crop) -> common_pb2.Image:
        wire = self.settings.crop_wire_format
        if wire == "raw":
            return encode_raw(crop)
        if wire == "png":
            return common_pb2.Image(encoded=encode_bytes(crop, common_pb2.IMAGE_FORMAT_PNG))
        return common_pb2.Image(
            encoded=encode_bytes(
                crop, common_pb2.IMAGE_FORMAT_JPEG, self.settings.crop_jpeg_quality
            )
        )

    def _check_crops(self, crops: Sequence[Crop], size_px: int, stage: Stage) -> None:
        for index, crop in enumerate(crops):
            if crop.dtype != np.uint8 or crop.shape != (size_px, size_px, 3):
                raise ValueError(
                    f"crops[{index}] is {crop.shape} {crop.dtype}; the {stage} takes "
                    f"({size_px}, {size_px}, 3) uint8 crops aligned to its template"
                )

    async def detect(
        self,
        frames: Sequence[VisionFrame],
        *,
        score_threshold: float = 0.5,
        detection_size_px: int | None = None,
    ) -> list[list[DetectedFace]]:
        """Faces of each BGR frame in that frame's own pixels, best score first.

        Each frame is downscaled so its longer side is at most the detection size
        (default: the detector's ``input_width_px``) and sent as JPEG; the boxes and
        landmarks that come back are scaled to the original frame.
        """
        size = detection_size_px or int(self.detector_info.input_width_px)
        if size <= 0:
            raise ValueError(f"detection_size_px must be positive, got {detection_size_px}")
        options = detector_pb2.DetectionOptions(
            score_threshold=score_threshold, detection_size_px=size
        )
        quality = self.settings.detector_jpeg_quality

        def prepare(indices: range) -> tuple[detector_pb2.DetectFacesRequest, np.ndarray]:
            images: list[common_pb2.Image] = []
            scales = np.empty((len(indices), 2), dtype=np.float32)
            for row, index in enumerate(indices):
                frame = frames[index]
                height, width = frame.shape[:2]
                new_height, new_width = detection_scale(height, width, size)
                if (new_height, new_width) != (height, width):
                    # INTER_LINEAR as the detector's own letterbox resizes; its scores
                    # near the threshold were validated with that resampling.
                    frame = np.asarray(cv2.resize(frame, (new_width, new_height)), dtype=np.uint8)
                images.append(
                    common_pb2.Image(
                        encoded=encode_bytes(frame, common_pb2.IMAGE_FORMAT_JPEG, quality)
                    )
                )
                scales[row] = (width / new_width, height / new_height)
            request = detector_pb2.DetectFacesRequest(images=images, options=options)
            return request, scales

        async def detect_chunk(indices: range) -> list[list[DetectedFace]]:
            request, scales = await asyncio.to_thread(prepare, indices)
            reply = await self._call("detector", self._detector.DetectFaces, request)
            if len(reply.results) != len(indices):
                raise FacestageError(
                    f"detector answered {len(reply.results)} results for {len(indices)} images"
                )
            found: list[list[DetectedFace]] = []
            for result, scale in zip(reply.results, scales, strict=True):
                faces = []
                for message in result.faces:
                    face = face_from_proto(message)
                    faces.append(
                        DetectedFace(
                            box=(face.box * np.tile(scale, 2)).astype(np.float32),
                            landmarks=(face.landmarks * scale).astype(np.float32),
                            score=face.score,
                            embedding=face.embedding,
                        )
                    )
                found.append(faces)
            return found

        chunks = _chunks(len(frames), self.detector_info.max_batch_size)
        results = await _gather_or_cancel([detect_chunk(chunk) for chunk in chunks])
        return [faces for chunk in results for faces in chunk]

    async def embed(self, crops: Sequence[Crop]) -> np.ndarray:
        """(N, D) L2-normalised embeddings of crops aligned to the embedder's template."""
        size = self.embed_crop_size_px
        self._check_crops(crops, size, "embedder")
        if not crops:
            return np.zeros((0, self.embedder_info.embedding_size), dtype=np.float32)

        async def embed_chunk(indices: range) -> np.ndarray:
            def prepare() -> embedder_pb2.EmbedFacesRequest:
                return embedder_pb2.EmbedFacesRequest(
                    faces=[
                        embedder_pb2.FaceToEmbed(aligned_crop=self._encode_crop(crops[i]))
                        for i in indices
                    ]
                )

            request = await asyncio.to_thread(prepare)
            reply = await self._call("embedder", self._embedder.EmbedFaces, request)
            if len(reply.embeddings) != len(indices):
                raise FacestageError(
                    f"embedder answered {len(reply.embeddings)} embeddings for {len(indices)} crops"
                )
            return embeddings_from_proto(
                [e.normalized for e in reply.embeddings], "embeddings.normalized"
            )

        chunks = _chunks(len(crops), self.embedder_info.max_batch_size)
        parts = await _gather_or_cancel([embed_chunk(chunk) for chunk in chunks])
        return np.concatenate(parts, axis=0)

    async def _crop_calls(
        self,
        stage: Stage,
        crops: Sequence[Crop],
        max_batch_size: int,
        call: Callable[[list[common_pb2.Image]], Awaitable[Sequence[common_pb2.Image]]],
    ) -> list[Crop]:
        """Crops through ``call`` in chunks of ``max_batch_size``, concurrently, in order."""

        async def run_chunk(indices: range) -> list[Crop]:
            images = await asyncio.to_thread(lambda: [self._encode_crop(crops[i]) for i in indices])
            answered = await call(images)
            if len(answered) != len(indices):
                raise FacestageError(f"{stage} answered {len(answered)} crops for {len(indices)}")
            return await asyncio.to_thread(
                lambda: [
                    decode_image(image, f"{stage}.crops[{i}]")
                    for i, image in zip(indices, answered, strict=True)
                ]
            )

        chunks = _chunks(len(crops), max_batch_size)
        parts = await _gather_or_cancel([run_chunk(chunk) for chunk in chunks])
        return [crop for part in parts for crop in part]

    async def swap(self, crops: Sequence[Crop], source: Embedding) -> list[Crop]:
        """Swapped crops, in order, for crops aligned to the swapper's template and size.

        ``source`` is the recogniser embedding (raw or normalised) for the whole batch.
        """
        self._check_crops(crops, self.swap_crop_size_px, "swapper")
        expected = self.swapper_info.embedding_size
        vector = np.asarray(source, dtype=np.float32).reshape(-1)
        if expected and vector.shape[0] != expected:
            raise ValueError(
                f"source embedding has {vector.shape[0]} values, the swapper takes {expected}"
            )
        source_message = embedding_to_proto(vector)

        async def call(images: list[common_pb2.Image]) -> Sequence[common_pb2.Image]:
            # Answers come back raw: a second lossy step on the output is not worth it.
            request = swapper_pb2.SwapFacesRequest(
                target_crops=images, source_embeddings=[source_message]
            )
            reply = await self._call("swapper", self._swapper.SwapFaces, request)
            return reply.swapped_crops

        return await self._crop_calls("swapper", crops, self.swapper_info.max_batch_size, call)

    async def enhance(self, crops: Sequence[Crop], fidelity_weight: float = 0.5) -> list[Crop]:
        """Enhanced crops, in order, for crops aligned to the enhancer's template and size.

        Raises :class:`FailedPreconditionError` when no enhancer target was configured.
        """
        if (
            self._enhancer is None
            or self.enhancer_info is None
            or self.enhance_crop_size_px is None
        ):
            raise FailedPreconditionError("enhancement requested but no enhancer is configured")
        self._check_crops(crops, self.enhance_crop_size_px, "enhancer")
        if not 0.0 <= fidelity_weight <= 1.0:
            raise ValueError(f"fidelity_weight must be in [0, 1], got {fidelity_weight}")
        stub = self._enhancer

        async def call(images: list[common_pb2.Image]) -> Sequence[common_pb2.Image]:
            request = enhancer_pb2.EnhanceFacesRequest(
                crops=images, fidelity_weight=fidelity_weight
            )
            reply = await self._call("enhancer", stub.EnhanceFaces, request)
            return reply.enhanced_crops

        return await self._crop_calls("enhancer", crops, self.enhancer_info.max_batch_size, call)


_MODEL_INFO_REQUESTS: dict[Stage, Any] = {
    "detector": detector_pb2.GetModelInfoRequest,
    "embedder": embedder_pb2.GetModelInfoRequest,
    "swapper": swapper_pb2.GetModelInfoRequest,
    "enhancer": enhancer_pb2.GetModelInfoRequest,
}
_STUBS: dict[Stage, Any] = {
    "detector": detector_pb2_grpc.DetectorServiceStub,
    "embedder": embedder_pb2_grpc.EmbedderServiceStub,
    "swapper": swapper_pb2_grpc.SwapperServiceStub,
    "enhancer": enhancer_pb2_grpc.EnhancerServiceStub,
}


async def _model_info(
    stage: Stage, target: str, channel: grpc.aio.Channel, settings: ClientSettings
) -> common_pb2.ModelInfo:
    """GetModelInfo of one stage, waiting for it to come up (wait_for_ready)."""
    stub = _STUBS[stage](channel)
    try:
        reply = await stub.GetModelInfo(
            _MODEL_INFO_REQUESTS[stage](),
            timeout=settings.connect_timeout_s,
            wait_for_ready=True,
        )
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise UnavailableError(
                f"{stage} stage unavailable at {target}: no answer within "
                f"{settings.connect_timeout_s:g} s"
            ) from error
        raise error_from_rpc(stage, target, error) from error
    info: common_pb2.ModelInfo = reply.model_info
    return info
