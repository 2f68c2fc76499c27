"""The streaming swap pipeline: frames in, swapped frames out, in order.

A video job runs as four concurrent steps joined by bounded queues::

    read (thread) -> detect [+ embed targets] -> swap + paste back -> [enhance + paste]
      -> write (thread, in frame order)

While batch k is being swapped, batch k+1 is detected and batch k+2 read. A semaphore
bounds the batches between reading and writing, so a slow stage slows the reader and
memory stays bounded whatever the video's length. Only what a stage needs travels:
downscaled frames to the detector (see :mod:`orchestrator.clients`), aligned crops to the
swapper and enhancer; pasting back warps the crop into the face's region only.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from facestage import metrics
from facestage.alignment import align_face, box_mask, paste_back
from facestage.errors import FailedPreconditionError
from facestage.types import DetectedFace, Embedding, VisionFrame
from orchestrator.clients import StageClients
from orchestrator.selection import SelectionOptions, average_identity, select_faces

STAGE = "orchestrator"
SOURCE_HINT = "use a frontal, well lit photo of one face"
_REJECTED_SCORE_FLOOR = 0.1


@dataclass(frozen=True)
class PipelineSettings:
    """How frames are batched and how much work is in flight at each step."""

    batch_size: int = 8
    """Frames per batch sent through the stages."""
    detect_in_flight: int = 2
    """Batches being detected at once."""
    swap_in_flight: int = 2
    """Batches being swapped (and pasted back) at once."""
    enhance_in_flight: int = 2
    """Batches being enhanced at once."""
    max_batches_in_flight: int = 8
    """Batches between reading and writing; bounds memory to this times batch_size frames."""
    source_cache_size: int = 128
    """Source identities remembered by content hash."""


@dataclass(frozen=True)
class SwapParams:
    """Per-job options (from the public API's SwapOptions)."""

    selection: SelectionOptions = field(default_factory=SelectionOptions)
    enhance: bool = False
    enhancer_blend: float = 0.8
    mask_blur: float = 0.3
    mask_padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    score_threshold: float = 0.5


@dataclass
class FrameFaces:
    """What happened in one frame: faces found and the indices of those swapped."""

    faces: list[DetectedFace]
    swapped: list[int]


@dataclass
class StreamStats:
    """Totals of a finished stream."""

    frames: int = 0
    frames_with_swaps: int = 0
    faces_swapped: int = 0
    seconds: float = 0.0


@dataclass
class _Batch:
    seq: int
    frames: list[VisionFrame]
    faces: list[FrameFaces] = field(default_factory=list)


_DONE: Any = object()
T = TypeVar("T")


class _Threads:
    """Blocking calls in worker threads that outlive a cancelled awaiter, and can be
    waited for (a cancelled ``asyncio.to_thread`` leaves its thread running unseen)."""

    def __init__(self) -> None:
        self._pending: set[asyncio.Future[Any]] = set()

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        future = asyncio.get_running_loop().run_in_executor(None, function, *args)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return await asyncio.shield(future)

    async def wait(self) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending))


class FpsMeter:
    """Frames per second over the last few seconds, read at scrape time."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, frames: int) -> None:
        """Counts frames written now."""
        with self._lock:
            self._events.append((time.monotonic(), frames))

    def rate(self) -> float:
        """Frames per second over the window (0 when idle)."""
        now = time.monotonic()
        with self._lock:
            while self._events and self._events[0][0] < now - self.window_s:
                self._events.popleft()
            return sum(n for _, n in self._events) / self.window_s


FPS_METER = FpsMeter()
metrics.ORCH_FPS.labels(STAGE).set_function(FPS_METER.rate)


class SwapPipeline:
    """Swaps a source identity into images and frame streams through the stage clients."""

    def __init__(self, clients: StageClients, settings: PipelineSettings | None = None) -> None:
        self.clients = clients
        self.settings = settings or PipelineSettings()
        self._identities: collections.OrderedDict[str, Embedding] = collections.OrderedDict()
        self._masks: dict[tuple[int, float, tuple[int, int, int, int]], np.ndarray] = {}

    # --- identities ---------------------------------------------------------------------

    async def _largest_face(self, frame: VisionFrame, field_name: str) -> DetectedFace:
        faces = (await self.clients.detect([frame], score_threshold=_REJECTED_SCORE_FLOOR))[0]
        accepted = [f for f in faces if f.score >= 0.5]
        if not accepted:
            rejected = ", ".join(
                f"box ({f.box[0]:.0f},{f.box[1]:.0f},{f.box[2]:.0f},{f.box[3]:.0f}) "
                f"score {f.score:.2f}"
                for f in faces
            )
            detail = f"; faces rejected for a low score: {rejected}" if rejected else ""
            raise FailedPreconditionError(f"no face found in {field_name}: {SOURCE_HINT}{detail}")
        return max(accepted, key=lambda f: float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))

    async def identity(
        self, images: Sequence[VisionFrame], field_name: str = "source_images"
    ) -> Embedding:
        """The averaged, normalised identity of the largest face of each image.

        Cached by content, so a batch of jobs with one source embeds it once. No face in
        an image is FAILED_PRECONDITION naming the image, with a hint for the user.
        """
        digest = hashlib.sha256()
        for image in images:
            digest.update(np.ascontiguousarray(image).data)
            digest.update(str(image.shape).encode())
        key = digest.hexdigest()
        cached = self._identities.get(key)
        if cached is not None:
            self._identities.move_to_end(key)
            return cached
        faces = await asyncio.gather(
            *(self._largest_face(image, f"{field_name}[{i}]") for i, image in enumerate(images))
        )
        size = self.clients.embed_crop_size_px
        points = self.clients.embed_template_points
        crops = [
            align_face(image, face.landmarks, points, size).crop
            for image, face in zip(images, faces, strict=True)
        ]
        identity = average_identity(await self.clients.embed(crops))
        self._identities[key] = identity
        if len(self._identities) > self.settings.source_cache_size:
            self._identities.popitem(last=False)
        return identity

    # --- one batch, step by step --------------------------------------------------------

    def _mask(self, size: int, params: SwapParams) -> np.ndarray:
        key = (size, params.mask_blur, params.mask_padding)
        if key not in self._masks:
            self._masks[key] = box_mask(size, params.mask_blur, params.mask_padding)
        return self._masks[key]

    async def _detect(self, batch: _Batch, params: SwapParams) -> _Batch:
        found = await self.clients.detect(batch.frames, score_threshold=params.score_threshold)
        embeddings: list[np.ndarray | None] = [None] * len(found)
        if params.selection.mode == "reference":
            # Targets are embedded only when the selection needs their identity.
            size = self.clients.embed_crop_size_px
            points = self.clients.embed_template_points
            crops, owners = [], []
            for i, (frame, faces) in enumerate(zip(batch.frames, found, strict=True)):
                for face in faces:
                    crops.append(align_face(frame, face.landmarks, points, size).crop)
                    owners.append(i)
            if crops:
                vectors = await self.clients.embed(crops)
                for i in range(len(found)):
                    rows = [k for k, owner in enumerate(owners) if owner == i]
                    embeddings[i] = vectors[rows] if rows else None
        batch.faces = [
            FrameFaces(faces=faces, swapped=select_faces(faces, params.selection, embeddings[i]))
            if faces
            else FrameFaces(faces=[], swapped=[])
            for i, faces in enumerate(found)
        ]
        return batch

    async def _swap(self, batch: _Batch, source: Embedding, params: SwapParams) -> _Batch:
        size = self.clients.swap_crop_size_px
        points = self.clients.swap_template_points
        jobs = [
            (i, align_face(batch.frames[i], faces.faces[k].landmarks, points, size))
            for i, faces in enumerate(batch.faces)
            for k in faces.swapped
        ]
        if not jobs:
            return batch
        swapped = await self.clients.swap([aligned.crop for _, aligned in jobs], source)
        mask = self._mask(size, params)

        def paste_all() -> None:
            for (i, aligned), crop in zip(jobs, swapped, strict=True):
                paste_back(batch.frames[i], crop, aligned.matrix, mask)

        await asyncio.to_thread(paste_all)
        return batch

    async def _enhance(self, batch: _Batch, params: SwapParams) -> _Batch:
        size = self.clients.enhance_crop_size_px
        points = self.clients.enhance_template_points
        if size is None or points is None:
            return batch
        jobs = [
            (i, align_face(batch.frames[i], faces.faces[k].landmarks, points, size))
            for i, faces in enumerate(batch.faces)
            for k in faces.swapped
        ]
        if not jobs:
            return batch
        enhanced = await self.clients.enhance([aligned.crop for _, aligned in jobs])
        mask = self._mask(size, params)

        def paste_all() -> None:
            for (i, aligned), crop in zip(jobs, enhanced, strict=True):
                paste_back(batch.frames[i], crop, aligned.matrix, mask, params.enhancer_blend)

        await asyncio.to_thread(paste_all)
        return batch

    async def _process(self, batch: _Batch, source: Embedding, params: SwapParams) -> _Batch:
        batch = await self._detect(batch, params)
        batch = await self._swap(batch, source, params)
        if params.enhance:
            batch = await self._enhance(batch, params)
        return batch

    # --- public entry points ------------------------------------------------------------

    async def swap_image(
        self, frame: VisionFrame, source: Embedding, params: SwapParams
    ) -> tuple[VisionFrame, FrameFaces]:
        """Swaps the selected faces of one image; returns the image and what was done."""
        batch = await self._process(_Batch(0, [np.array(frame, copy=True)]), source, params)
        faces = batch.faces[0]
        metrics.ORCH_FRAMES.labels(STAGE).inc()
        metrics.ORCH_FACES_SWAPPED.labels(STAGE).inc(len(faces.swapped))
        FPS_METER.add(1)
        return batch.frames[0], faces

    async def swap_stream(
        self,
        frames: Iterator[VisionFrame],
        write: Callable[[VisionFrame], None],
        source: Embedding,
        params: SwapParams,
        progress: Callable[[int], None] | None = None,
    ) -> StreamStats:
        """Runs every frame of ``frames`` through the stages and ``write``s them in order.

        ``frames`` and ``write`` are blocking (a decoder and an encoder) and run in worker
        threads. Frames without a selected face pass through untouched. Any failure or
        cancellation stops every step and propagates; nothing is written after it.
        """
        settings = self.settings
        started = time.monotonic()
        stats = StreamStats()
        room = asyncio.Semaphore(settings.max_batches_in_flight)
        queues = {
            name: asyncio.Queue[Any](maxsize=settings.max_batches_in_flight)
            for name in ("detect", "swap", "enhance", "write")
        }
        gauges = {name: metrics.ORCH_QUEUE_DEPTH.labels(STAGE, name) for name in queues}
        steps: list[tuple[str, str, int, Callable[[_Batch], Any]]] = [
            ("detect", "swap", settings.detect_in_flight, lambda b: self._detect(b, params)),
            (
                "swap",
                "enhance" if params.enhance else "write",
                settings.swap_in_flight,
                lambda b: self._swap(b, source, params),
            ),
        ]
        if params.enhance:
            steps.append(
                ("enhance", "write", settings.enhance_in_flight, lambda b: self._enhance(b, params))
            )
        workers = {name: count for name, _, count, _ in steps}
        workers["write"] = 1

        async def put(name: str, item: Any) -> None:
            await queues[name].put(item)
            gauges[name].set(queues[name].qsize())

        async def get(name: str) -> Any:
            item = await queues[name].get()
            gauges[name].set(queues[name].qsize())
            return item

        stopping = threading.Event()
        threads = _Threads()

        def read_batch() -> list[VisionFrame]:
            batch: list[VisionFrame] = []
            while len(batch) < settings.batch_size and not stopping.is_set():
                frame = next(frames, None)
                if frame is None:
                    break
                # Decoders may hand out read-only buffers; pasting back writes in place.
                batch.append(frame if frame.flags.writeable else np.array(frame, copy=True))
            return batch

        async def read() -> None:
            seq = 0
            while True:
                await room.acquire()
                batch = await threads.run(read_batch)
                if not batch:
                    room.release()
                    break
                await put("detect", _Batch(seq, batch))
                seq += 1
            for _ in range(workers["detect"]):
                await put("detect", _DONE)

        async def run_step(
            name: str, downstream: str, count: int, step: Callable[[_Batch], Any]
        ) -> None:
            async def worker() -> None:
                while (item := await get(name)) is not _DONE:
                    await put(downstream, await step(item))

            await asyncio.gather(*(worker() for _ in range(count)))
            for _ in range(workers[downstream]):
                await put(downstream, _DONE)

        def write_batch(batch: _Batch) -> None:
            for frame in batch.frames:
                write(frame)

        async def write_in_order() -> None:
            waiting: dict[int, _Batch] = {}
            next_seq = 0
            while (item := await get("write")) is not _DONE:
                waiting[item.seq] = item
                while next_seq in waiting:
                    batch = waiting.pop(next_seq)
                    await threads.run(write_batch, batch)
                    swapped = sum(len(f.swapped) for f in batch.faces)
                    stats.frames += len(batch.frames)
                    stats.frames_with_swaps += sum(1 for f in batch.faces if f.swapped)
                    stats.faces_swapped += swapped
                    metrics.ORCH_FRAMES.labels(STAGE).inc(len(batch.frames))
                    metrics.ORCH_FACES_SWAPPED.labels(STAGE).inc(swapped)
                    FPS_METER.add(len(batch.frames))
                    next_seq += 1
                    room.release()
                    if progress is not None:
                        progress(stats.frames)

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(read())
                for name, downstream, count, step in steps:
                    group.create_task(run_step(name, downstream, count, step))
                group.create_task(write_in_order())
        except BaseExceptionGroup as group_error:
            # Surface the first real error (a stage down, bad media) rather than a group.
            first = group_error.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        finally:
            # A thread cannot be interrupted: stop the reader between frames and wait for
            # any read or write still running, so nothing touches the decoder or the
            # encoder after swap_stream has returned or raised.
            stopping.set()
            await threads.wait()
            for gauge in gauges.values():
                gauge.set(0)
        stats.seconds = time.monotonic() - started
        return stats
