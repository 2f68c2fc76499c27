"""The public API, ``facestage.swap.v1.FaceSwapService``, over the swap pipeline.

``SwapImage`` is one request and one answer. ``SwapVideo`` is a bidirectional stream:

1. the first client message is the config; it is validated, and the source identity
   computed, before any video byte is accepted, so a photo without a face or a bad
   option fails before a multi-gigabyte upload;
2. the chunks are spooled to a file in a per-job directory under ``spool_dir`` (never
   held in memory), counting bytes against ``max_upload_bytes``;
3. once the client half-closes, the file is probed and the pipeline runs in a
   background task, decoding from the spooled file and encoding into a temporary output
   beside it, while this handler streams progress at most every ``progress_interval_s``;
4. a final progress message (frames done == frames total), one result, then the output
   in ``chunk_bytes`` pieces.

Whatever ends a job (success, an error, the client cancelling, the server draining), the
pipeline task is cancelled, the encoder aborted and the job directory deleted, in one
place: :meth:`VideoJob.close`. Errors are raised as :mod:`facestage.errors` exceptions
and mapped to status codes by the server's interceptor.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Final, Literal

import av

from facestage.common.v1 import common_pb2
from facestage.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from facestage.faces import face_to_proto
from facestage.imaging import decode_image, encode_image, reply_channel_order
from facestage.server import GrpcServer, ServiceBinding
from facestage.stage import decode_images
from facestage.swap.v1 import swap_pb2, swap_pb2_grpc
from facestage.types import Embedding, VisionFrame
from orchestrator.clients import StageClients
from orchestrator.jobs import (
    GuardedFrames,
    GuardedWriter,
    JobProgress,
    JobSlots,
    JobState,
    Spool,
    VideoJob,
    discard_rest,
    run_blocking,
)
from orchestrator.pipeline import STAGE, StreamStats, SwapParams, SwapPipeline
from orchestrator.selection import selection_from_proto
from orchestrator.settings import OrchestratorSettings
from orchestrator.video import (
    DEFAULT_CODEC,
    DEFAULT_CONTAINER,
    DEFAULT_QUALITY,
    VideoInfo,
    VideoWriter,
    iter_frames,
    probe,
)

log = logging.getLogger(__name__)

SERVICE_NAME: Final = swap_pb2.DESCRIPTOR.services_by_name["FaceSwapService"].full_name


DEFAULT_OUTPUT_FORMAT: Final = common_pb2.IMAGE_FORMAT_PNG
MAX_OUTPUT_SIDE_PX: Final = 8192
MAX_OUTPUT_FPS: Final = 240.0

VIDEO_FIELD: Final = "chunk"
"""Request field named in errors about the uploaded video (its bytes arrive as chunks)."""


@dataclass(frozen=True)
class _Container:
    ffmpeg_format: str
    suffix: str
    mime_type: str


_CONTAINERS: Final[dict[str, _Container]] = {
    "mp4": _Container("mp4", ".mp4", "video/mp4"),
    "mkv": _Container("matroska", ".mkv", "video/x-matroska"),
    "matroska": _Container("matroska", ".mkv", "video/x-matroska"),
    "webm": _Container("webm", ".webm", "video/webm"),
    "mov": _Container("mov", ".mov", "video/quicktime"),
}
# WebM admits only VP8, VP9 and AV1; the muxer would fail only after the job had run.
_WEBM_CODECS: Final = frozenset({"libvpx", "libvpx-vp9", "libaom-av1", "libsvtav1"})


# --- options ----------------------------------------------------------------------------


def _unit_interval(message: Any, name: str, default: float, prefix: str) -> float:
    if not message.HasField(name):
        return default
    value = float(getattr(message, name))
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise InvalidArgumentError(f"{prefix}.{name}", f"must be within 0..1, got {value:g}")
    return value


def swap_params_from_proto(
    options: swap_pb2.SwapOptions,
    reference_embedding: Embedding | None,
    *,
    has_enhancer: bool,
    prefix: str = "options",
) -> SwapParams:
    """The pipeline's parameters for ``options``, with the defaults swap.proto documents.

    Raises:
        InvalidArgumentError: a value out of range, naming ``<prefix>.<field>``.
        FailedPreconditionError: ``enhance`` is set but no enhancer stage is configured.
    """
    defaults = SwapParams()
    if options.enhance and not has_enhancer:
        raise FailedPreconditionError(
            f"{prefix}.enhance: this orchestrator has no enhancer stage configured; "
            "send enhance=false or deploy an enhancer (setting `enhancer`)"
        )
    padding = options.mask_padding
    sides = ("top_percent", "right_percent", "bottom_percent", "left_percent")
    values = tuple(int(getattr(padding, side)) for side in sides)
    for side, value in zip(sides, values, strict=True):
        if value > 100:
            raise InvalidArgumentError(
                f"{prefix}.mask_padding.{side}", f"must be within 0..100, got {value}"
            )
    try:
        selection = selection_from_proto(options, reference_embedding)
    except InvalidArgumentError as error:
        if prefix == "options":
            raise
        # selection names fields from `options`; the video config nests them deeper.
        raise _renamed(error, prefix) from None
    return SwapParams(
        selection=selection,
        enhance=options.enhance,
        enhancer_blend=_unit_interval(options, "enhancer_blend", defaults.enhancer_blend, prefix),
        mask_blur=_unit_interval(options, "mask_blur", defaults.mask_blur, prefix),
        mask_padding=(values[0], values[1], values[2], values[3]),
        score_threshold=_unit_interval(
            options, "detection_score_threshold", defaults.score_threshold, prefix
        ),
    )


def _renamed(error: InvalidArgumentError, prefix: str) -> InvalidArgumentError:
    field = f"{prefix}.{error.field.removeprefix('options.')}"
    message = str(error).removeprefix(f"{error.field}: ")
    return InvalidArgumentError(field, message)


@dataclass(frozen=True)
class VideoOutput:
    """Validated output settings of a video job (from ``VideoOutputOptions``)."""

    quality: int = DEFAULT_QUALITY
    fps: float | None = None
    """None keeps the target's rate."""
    width_px: int | None = None
    height_px: int | None = None
    codec: str = DEFAULT_CODEC
    container: str = DEFAULT_CONTAINER
    keep_audio: bool = True

    @property
    def ffmpeg_format(self) -> str:
        """The muxer's name (``matroska`` for ``mkv``)."""
        return _CONTAINERS[self.container].ffmpeg_format

    @property
    def suffix(self) -> str:
        """File name suffix of the output."""
        return _CONTAINERS[self.container].suffix

    @property
    def mime_type(self) -> str:
        """MIME type of the output, as SwapVideoResult reports it."""
        return _CONTAINERS[self.container].mime_type

    def size_for(self, info: VideoInfo) -> tuple[int, int] | None:
        """The output (width, height) for a target; None keeps the target's size.

        With only one side set the other follows the target's aspect ratio, rounded to
        an even number as 4:2:0 encoders need.
        """
        if self.width_px is None and self.height_px is None:
            return None
        if self.width_px is not None and self.height_px is not None:
            return self.width_px, self.height_px
        if self.width_px is not None:
            return self.width_px, _even(self.width_px * info.height / info.width)
        assert self.height_px is not None
        return _even(self.height_px * info.width / info.height), self.height_px


def _even(value: float) -> int:
    return max(2, 2 * round(value / 2))


def _side(
    output: swap_pb2.VideoOutputOptions, name: Literal["width_px", "height_px"], prefix: str
) -> int | None:
    if not output.HasField(name):
        return None
    value = int(getattr(output, name))
    if not 2 <= value <= MAX_OUTPUT_SIDE_PX or value % 2:
        raise InvalidArgumentError(
            f"{prefix}.{name}",
            f"must be an even number of pixels within 2..{MAX_OUTPUT_SIDE_PX}, got {value}",
        )
    return value


def video_output_from_proto(
    output: swap_pb2.VideoOutputOptions, prefix: str = "config.output"
) -> VideoOutput:
    """Validates ``output``, filling the defaults swap.proto documents.

    Raises:
        InvalidArgumentError: naming ``<prefix>.<field>``.
    """
    quality = DEFAULT_QUALITY
    if output.HasField("quality"):
        quality = int(output.quality)
        if quality > 100:
            raise InvalidArgumentError(f"{prefix}.quality", f"must be within 0..100, got {quality}")
    fps: float | None = None
    if output.HasField("fps"):
        fps = float(output.fps)
        if not 0.0 < fps <= MAX_OUTPUT_FPS:  # also rejects NaN
            raise InvalidArgumentError(
                f"{prefix}.fps", f"must be within 0..{MAX_OUTPUT_FPS:g} (exclusive of 0), got {fps}"
            )
    codec = output.video_codec or DEFAULT_CODEC
    try:
        is_video_encoder = av.codec.Codec(codec, "w").type == "video"
    except (ValueError, av.FFmpegError):
        is_video_encoder = False
    if not is_video_encoder:
        raise InvalidArgumentError(
            f"{prefix}.video_codec", f"{codec!r} is not a video encoder of this server's FFmpeg"
        )
    container = (output.container or DEFAULT_CONTAINER).lower()
    if container not in _CONTAINERS:
        raise InvalidArgumentError(
            f"{prefix}.container",
            f"{container!r} is not supported; use one of {', '.join(sorted(_CONTAINERS))}",
        )
    if _CONTAINERS[container].ffmpeg_format == "webm" and codec not in _WEBM_CODECS:
        raise InvalidArgumentError(
            f"{prefix}.video_codec",
            f"WebM carries only {', '.join(sorted(_WEBM_CODECS))}, not {codec!r}",
        )
    return VideoOutput(
        quality=quality,
        fps=fps,
        width_px=_side(output, "width_px", prefix),
        height_px=_side(output, "height_px", prefix),
        codec=codec,
        container=container,
        keep_audio=output.keep_audio if output.HasField("keep_audio") else True,
    )


def resample_frames(
    frames: Iterator[VisionFrame], source_fps: Fraction, output_fps: Fraction
) -> Iterator[VisionFrame]:
    """Frames at ``output_fps`` from frames at ``source_fps``, keeping the duration.

    Output frame ``j`` shows the source frame on screen at its time, ``j / output_fps``,
    so a lower rate drops frames and a higher one repeats them (as copies: the pipeline
    pastes faces into frames in place).
    """
    if source_fps == output_fps:
        yield from frames
        return
    step = source_fps / output_fps
    shown = 0
    for index, frame in enumerate(frames):
        first = True
        while math.floor(shown * step) == index:
            yield frame if first else frame.copy()
            first = False
            shown += 1


def resampled_count(count: int, source_fps: Fraction, output_fps: Fraction) -> int:
    """How many frames :func:`resample_frames` yields for ``count`` source frames."""
    return math.ceil(count * output_fps / source_fps)


# --- jobs: admission, metrics, clean-up ---------------------------------------------------


async def _first_message(
    requests: AsyncIterator[swap_pb2.SwapVideoRequest],
) -> swap_pb2.SwapVideoRequest | None:
    async for message in requests:
        return message
    return None


class FaceSwapServicer(swap_pb2_grpc.FaceSwapServiceServicer):
    """``facestage.swap.v1.FaceSwapService`` over a :class:`SwapPipeline`."""

    def __init__(self, pipeline: SwapPipeline, settings: OrchestratorSettings) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self._slots = JobSlots(settings.max_concurrent_jobs)
        settings.spool_dir.mkdir(parents=True, exist_ok=True)

    @property
    def has_enhancer(self) -> bool:
        """Whether an enhancer stage is configured (``enhance=true`` is served)."""
        return self.pipeline.clients.enhancer_info is not None

    async def _swap_params(self, options: swap_pb2.SwapOptions, prefix: str) -> SwapParams:
        reference: Embedding | None = None
        reference_mode = options.face_selector_mode == swap_pb2.FACE_SELECTOR_MODE_REFERENCE
        if reference_mode and options.HasField("reference_face_image"):
            field = f"{prefix}.reference_face_image"
            image = await asyncio.to_thread(
                decode_image, options.reference_face_image, field, self.settings.max_pixels
            )
            reference = await self.pipeline.identity([image], field)
        return swap_params_from_proto(
            options, reference, has_enhancer=self.has_enhancer, prefix=prefix
        )

    def _check_options(self, options: swap_pb2.SwapOptions, prefix: str) -> None:
        """Rejects bad options before any decoding or stage call (a dry run of the mapping)."""
        if options.face_selector_mode != swap_pb2.FACE_SELECTOR_MODE_REFERENCE:
            swap_params_from_proto(options, None, has_enhancer=self.has_enhancer, prefix=prefix)
            return
        probe_options = swap_pb2.SwapOptions()
        probe_options.CopyFrom(options)
        probe_options.face_selector_mode = swap_pb2.FACE_SELECTOR_MODE_MANY
        if not options.HasField("reference_face_image"):
            raise InvalidArgumentError(
                f"{prefix}.reference_face_image",
                "face selector mode reference needs an image of the reference face",
            )
        swap_params_from_proto(probe_options, None, has_enhancer=self.has_enhancer, prefix=prefix)

    # --- SwapImage ------------------------------------------------------------------------

    async def SwapImage(
        self, request: swap_pb2.SwapImageRequest, context: Any
    ) -> swap_pb2.SwapImageResponse:
        """Swaps the source identity into the selected faces of the target image."""
        ticket = self._slots.acquire("image")
        state: JobState = "cancelled"
        try:
            response = await self._swap_image(request)
            state = "succeeded"
            return response
        except Exception:
            state = "failed"
            raise
        finally:
            ticket.finish(state)

    async def _swap_image(self, request: swap_pb2.SwapImageRequest) -> swap_pb2.SwapImageResponse:
        if not request.source_images:
            raise InvalidArgumentError(
                "source_images", "is empty: send at least one photo of the source person"
            )
        output_format = request.output_format or DEFAULT_OUTPUT_FORMAT
        if output_format not in common_pb2.ImageFormat.values():
            raise InvalidArgumentError("output_format", f"unknown value {output_format}")
        self._check_options(request.options, "options")
        max_pixels = self.settings.max_pixels
        sources = await decode_images(request.source_images, "source_images", max_pixels)
        target = await asyncio.to_thread(
            decode_image, request.target_image, "target_image", max_pixels
        )
        params = await self._swap_params(request.options, "options")
        identity = await self.pipeline.identity(sources, "source_images")
        frame, faces = await self.pipeline.swap_image(target, identity, params)
        image = await asyncio.to_thread(
            encode_image, frame, output_format, reply_channel_order(request.target_image)
        )
        return swap_pb2.SwapImageResponse(
            image=image,
            target_faces=[face_to_proto(face) for face in faces.faces],
            swapped_face_indices=faces.swapped,
        )

    # --- SwapVideo ------------------------------------------------------------------------

    async def SwapVideo(
        self, request_iterator: AsyncIterator[swap_pb2.SwapVideoRequest], context: Any
    ) -> AsyncIterator[swap_pb2.SwapVideoResponse]:
        """Config, then the video in chunks -> progress, one result, the output in chunks."""
        try:
            ticket = self._slots.acquire("video")
        except ResourceExhaustedError:
            await discard_rest(request_iterator)
            raise
        job = VideoJob(ticket, self.settings.spool_dir)
        # The generator may be left suspended at a yield when the client goes away; the
        # RPC's done callback still releases the job's files and task promptly.
        context.add_done_callback(lambda _: job.close_soon())
        try:
            async for message in self._swap_video(job, request_iterator):
                yield message
            job.state = "succeeded"
        except Exception:
            job.state = "failed"
            if not job.upload_done:
                await discard_rest(request_iterator)
            raise
        finally:
            await job.close()

    async def _read_config(
        self, job: VideoJob, requests: AsyncIterator[swap_pb2.SwapVideoRequest]
    ) -> swap_pb2.SwapVideoConfig:
        first = await _first_message(requests)
        job.upload_done = first is None
        if first is None or first.WhichOneof("message") != "config":
            raise InvalidArgumentError(
                "config", "the first message must carry the config, then the video in chunks"
            )
        config = first.config
        if not config.source_images:
            raise InvalidArgumentError(
                "config.source_images", "is empty: send at least one photo of the source person"
            )
        limit = self.settings.max_upload_bytes
        if config.target_size_bytes > limit:
            raise ResourceExhaustedError(
                f"config.target_size_bytes: {config.target_size_bytes} bytes is over this "
                f"server's upload limit of {limit} bytes"
            )
        return config

    async def _spool(
        self, job: VideoJob, requests: AsyncIterator[swap_pb2.SwapVideoRequest], path: Path
    ) -> int:
        """Writes the chunks to ``path`` until the client half-closes; returns the size."""
        file = await run_blocking(lambda: path.open("wb"))
        try:
            spool = Spool(file, self.settings.max_upload_bytes)
            async for message in requests:
                kind = message.WhichOneof("message")
                if kind == "config":
                    raise InvalidArgumentError("config", "sent twice; only the first message")
                if kind != "chunk":
                    raise InvalidArgumentError("chunk", "a message after the config set nothing")
                await spool.add(message.chunk)
            job.upload_done = True
            await spool.flush()
            return spool.size
        finally:
            await run_blocking(file.close)

    def _open_writer(
        self, job: VideoJob, target: Path, info: VideoInfo, output: VideoOutput
    ) -> GuardedWriter:
        assert job.directory is not None
        writer = VideoWriter(
            job.directory / f"output{output.suffix}",
            target=target,
            fps=output.fps,
            size=output.size_for(info),
            codec=output.codec,
            container_format=output.ffmpeg_format,
            quality=output.quality,
            copy_audio=output.keep_audio,
            field=VIDEO_FIELD,
        )
        writer.open()
        return GuardedWriter(writer)

    async def _render(
        self, job: VideoJob, identity: Embedding, params: SwapParams, progress: JobProgress
    ) -> StreamStats:
        assert job.frames is not None and job.writer is not None
        stats = await self.pipeline.swap_stream(
            job.frames, job.writer.write, identity, params, progress.update
        )
        await run_blocking(job.writer.commit)
        return stats

    async def _swap_video(
        self, job: VideoJob, requests: AsyncIterator[swap_pb2.SwapVideoRequest]
    ) -> AsyncIterator[swap_pb2.SwapVideoResponse]:
        config = await self._read_config(job, requests)
        output = video_output_from_proto(config.output)
        self._check_options(config.options, "config.options")
        sources = await decode_images(
            config.source_images, "config.source_images", self.settings.max_pixels
        )
        # The identity before the upload: a photo without a face fails in a second, not
        # after gigabytes have been sent.
        params = await self._swap_params(config.options, "config.options")
        identity = await self.pipeline.identity(sources, "config.source_images")

        directory = await job.make_directory()
        target = directory / "target_video"
        if await self._spool(job, requests, target) == 0:
            raise InvalidArgumentError(
                VIDEO_FIELD, "target video is empty: send its bytes in chunks after the config"
            )
        info = await run_blocking(lambda: probe(target, field=VIDEO_FIELD))
        job.writer = await run_blocking(self._open_writer, job, target, info, output)
        output_fps = job.writer.writer.fps
        decoder = iter_frames(target, field=VIDEO_FIELD)
        job.frames = GuardedFrames(resample_frames(decoder, info.fps, output_fps), decoder)
        progress = JobProgress(resampled_count(info.frame_count, info.fps, output_fps))
        job.task = asyncio.create_task(self._render(job, identity, params, progress))

        yield progress.message()
        sent = 0
        while not job.task.done():
            await asyncio.wait({job.task}, timeout=self.settings.progress_interval_s)
            if not job.task.done() and progress.frames_done > sent:
                sent = progress.frames_done
                yield progress.message()
        stats = job.task.result()
        progress.update(stats.frames)
        yield progress.message(final=True)

        path = job.writer.writer.path
        size = (await run_blocking(path.stat)).st_size
        yield swap_pb2.SwapVideoResponse(
            result=swap_pb2.SwapVideoResult(
                frames_total=stats.frames,
                frames_with_swaps=stats.frames_with_swaps,
                faces_swapped=stats.faces_swapped,
                output_size_bytes=size,
                mime_type=output.mime_type,
            )
        )
        file = await run_blocking(lambda: path.open("rb"))
        try:
            while chunk := await run_blocking(file.read, self.settings.chunk_bytes):
                yield swap_pb2.SwapVideoResponse(chunk=chunk)
        finally:
            await run_blocking(file.close)


async def build_orchestrator(
    settings: OrchestratorSettings,
) -> tuple[GrpcServer, StageClients]:
    """Connects to the stages and builds the orchestrator's server (not yet started).

    Waits for every stage's GetModelInfo (crops are sized and aligned from those answers),
    so once the returned server is started and warmed up it can serve at once; stopping
    the server (``drain``) closes the stage channels.
    """
    clients = await StageClients.connect(settings.targets(), settings.to_client_settings())
    pipeline = SwapPipeline(clients, settings.to_pipeline_settings())
    servicer = FaceSwapServicer(pipeline, settings)
    binding = ServiceBinding(
        servicer, swap_pb2_grpc.add_FaceSwapServiceServicer_to_server, SERVICE_NAME
    )

    async def warm_up() -> None:
        # The stages answered GetModelInfo in connect(); report what this process will use.
        for stage, info in (
            ("detector", clients.detector_info),
            ("embedder", clients.embedder_info),
            ("swapper", clients.swapper_info),
            ("enhancer", clients.enhancer_info),
        ):
            if info is not None:
                log.info(
                    "%s: %s (%s, %s)",
                    stage,
                    info.model_name,
                    info.execution_provider,
                    common_pb2.Precision.Name(info.precision),
                )

    server = GrpcServer(settings, STAGE, [binding], warmup=warm_up, on_close=clients.close)
    return server, clients
