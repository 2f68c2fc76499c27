"""The plumbing of one video job: admission slots, the spooled upload, the guarded
decoder and encoder, progress messages, and the one place that cleans a job up
(:meth:`VideoJob.close`). Used by :mod:`orchestrator.api`."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from facestage import metrics
from facestage.errors import ResourceExhaustedError
from facestage.swap.v1 import swap_pb2
from facestage.types import VisionFrame
from orchestrator.pipeline import STAGE, StreamStats
from orchestrator.video import VideoWriter

log = logging.getLogger(__name__)

T = TypeVar("T")
JobKind = Literal["image", "video"]
JobState = Literal["succeeded", "failed", "cancelled"]

SPOOL_WRITE_BYTES = 1024 * 1024
"""Uploaded chunks are gathered to this size before one write, whatever the client sends."""

DISCARD_MAX_BYTES = 16 * 1024 * 1024
DISCARD_MAX_S = 5.0
"""Bounds of what a failed upload still reads (and drops) before its error is sent."""


class JobSlots:
    """Admission control: at most ``limit`` jobs at once; the rest RESOURCE_EXHAUSTED."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def acquire(self, kind: JobKind) -> JobTicket:
        # Refusing at once (rather than queueing) lets a client retry on another replica.
        if self.active >= self.limit:
            raise ResourceExhaustedError(
                f"this orchestrator is running its maximum of {self.limit} jobs; retry later"
            )
        self.active += 1
        metrics.ORCH_JOBS_IN_PROGRESS.labels(STAGE, kind).inc()
        return JobTicket(self, kind)


class JobTicket:
    """One admitted job; :meth:`finish` frees its slot and counts its end state once."""

    def __init__(self, slots: JobSlots, kind: JobKind) -> None:
        self._slots = slots
        self.kind = kind
        self._finished = False

    def finish(self, state: JobState) -> None:
        """Frees the slot and counts the job as ``state``; later calls do nothing."""
        if self._finished:
            return
        self._finished = True
        self._slots.active -= 1
        metrics.ORCH_JOBS_IN_PROGRESS.labels(STAGE, self.kind).dec()
        metrics.ORCH_JOBS.labels(STAGE, self.kind, state).inc()


async def run_blocking(function: Callable[..., T], *args: Any) -> T:
    """Runs ``function`` in a thread; if cancelled, waits for the thread before re-raising.

    A plain ``asyncio.to_thread`` returns at once on cancellation while its thread keeps
    running; a job's clean-up must not delete files a thread is still writing.
    """
    future = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait({future})
        raise


class GuardedFrames(Iterator[VisionFrame]):
    """Frames from a decoder that can be closed from another thread between two frames.

    The pipeline reads frames in worker threads; closing the decoder while one of them
    is inside ``next`` would free FFmpeg state under its feet, so both take one lock.
    ``frames`` is what is iterated (the decoder, or frames derived from it); ``decoder``
    is closed explicitly, as a wrapping generator does not close what it iterates.
    """

    def __init__(self, frames: Iterator[VisionFrame], decoder: Iterator[VisionFrame]) -> None:
        self._frames = frames
        self._decoder = decoder
        self._lock = threading.Lock()
        self._closed = False

    def __next__(self) -> VisionFrame:
        with self._lock:
            if self._closed:
                raise StopIteration
            return next(self._frames)

    def close(self) -> None:
        """Stops the iteration and closes the decoder (waits for a frame being read)."""
        with self._lock:
            self._closed = True
            for iterator in (self._frames, self._decoder):
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()


class GuardedWriter:
    """A VideoWriter whose abort waits for a frame being encoded in another thread."""

    def __init__(self, writer: VideoWriter) -> None:
        self.writer = writer
        self._lock = threading.Lock()
        self._ended = False

    def write(self, frame: VisionFrame) -> None:
        """Encodes one frame; refused once the job has ended."""
        with self._lock:
            if self._ended:
                raise RuntimeError("the job has ended; no more frames are written")
            self.writer.write(frame)

    def commit(self) -> Path:
        """Finishes the file and renames it into place."""
        with self._lock:
            self._ended = True
            return self.writer.commit()

    def abort(self) -> None:
        """Discards the output (no-op after a commit)."""
        with self._lock:
            if not self._ended:
                self._ended = True
                self.writer.abort()


class JobProgress:
    """Frames done, as the pipeline reports them, and the rate since the job started."""

    def __init__(self, frames_total: int) -> None:
        self.frames_total = frames_total
        self.frames_done = 0
        self.started = time.monotonic()

    def update(self, frames_done: int) -> None:
        """The pipeline's progress callback (on the event loop)."""
        self.frames_done = frames_done

    def message(self, final: bool = False) -> swap_pb2.SwapVideoResponse:
        """A progress message; ``final`` makes the total what was really done."""
        done = self.frames_done
        # The total is an estimate when the container does not state it: never report
        # more frames done than the total, and end exactly on what was done.
        total = done if final else max(self.frames_total, done)
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        return swap_pb2.SwapVideoResponse(
            progress=swap_pb2.SwapVideoProgress(
                frames_done=done,
                frames_total=total,
                frames_per_second=rate,
                eta_seconds=eta,
            )
        )


_CLOSING: set[asyncio.Task[None]] = set()


class VideoJob:
    """Everything one SwapVideo call owns on disk and in tasks, released by :meth:`close`."""

    def __init__(self, ticket: JobTicket, spool_dir: Path) -> None:
        self.ticket = ticket
        self.spool_dir = spool_dir
        self.state: JobState = "cancelled"
        self.upload_done = False
        """The client has half-closed: every request message has been read."""
        self.directory: Path | None = None
        self.frames: GuardedFrames | None = None
        self.writer: GuardedWriter | None = None
        self.task: asyncio.Task[StreamStats] | None = None
        self._closing: asyncio.Task[None] | None = None

    async def make_directory(self) -> Path:
        """Creates the job's own directory under the spool directory."""
        self.directory = Path(
            await run_blocking(tempfile.mkdtemp, "", "facestage-job-", str(self.spool_dir))
        )
        return self.directory

    def close_soon(self) -> None:
        """Starts :meth:`close` without waiting (from the RPC's done callback)."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())
            # The loop keeps only weak references to tasks; this one must outlive the RPC.
            _CLOSING.add(self._closing)
            self._closing.add_done_callback(_CLOSING.discard)

    async def close(self) -> None:
        """Cancels the pipeline, aborts the encoder, deletes the job directory; idempotent.

        Shielded: a second cancellation of the caller must not stop a clean-up halfway.
        """
        self.close_soon()
        assert self._closing is not None
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        try:
            if self.task is not None and not self.task.done():
                self.task.cancel()
                await asyncio.wait({self.task})
            if self.task is not None and self.task.done() and not self.task.cancelled():
                self.task.exception()  # retrieved here; the handler reports it
            frames, writer, directory = self.frames, self.writer, self.directory

            def release() -> None:
                if frames is not None:
                    frames.close()
                if writer is not None:
                    writer.abort()
                if directory is not None:
                    shutil.rmtree(directory, ignore_errors=True)

            await asyncio.to_thread(release)
        finally:
            self.ticket.finish(self.state)


class Spool:
    """Writes the upload to a file in large writes, off the event loop."""

    def __init__(self, file: IO[bytes], limit: int) -> None:
        self._file = file
        self._limit = limit
        self._pending = bytearray()
        self.size = 0

    async def add(self, data: bytes) -> None:
        """Appends ``data``; RESOURCE_EXHAUSTED once the upload passes the limit."""
        self.size += len(data)
        if self.size > self._limit:
            raise ResourceExhaustedError(
                f"the target video is larger than this server's limit of {self._limit} bytes"
            )
        self._pending += data
        if len(self._pending) >= SPOOL_WRITE_BYTES:
            await self.flush()

    async def flush(self) -> None:
        """Writes what is pending."""
        if self._pending:
            pending, self._pending = bytes(self._pending), bytearray()
            await run_blocking(write_spool, self._file, pending)


def write_spool(file: IO[bytes], data: bytes) -> None:
    try:
        file.write(data)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise ResourceExhaustedError("the server's spool disk is full; retry later") from None
        raise


# --- the servicer -------------------------------------------------------------------------


async def discard_rest(requests: AsyncIterator[swap_pb2.SwapVideoRequest]) -> None:
    """Reads and drops what the client still sends, within bounds, before an error is sent.

    A grpc.aio client whose write crosses the server's status reports INTERNAL "Internal
    error from Core" instead of that status (grpc/grpc#36066). Reading until the client
    half-closes avoids the race for small uploads; the bounds keep a huge upload from
    being read in full only to be refused.
    """
    discarded = 0
    with contextlib.suppress(Exception):
        async with asyncio.timeout(DISCARD_MAX_S):
            async for message in requests:
                discarded += message.ByteSize()
                if discarded > DISCARD_MAX_BYTES:
                    return
