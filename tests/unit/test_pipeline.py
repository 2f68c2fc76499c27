"""SwapPipeline.swap_stream: output order, exactly-once writes, backpressure, failure, cancel.

The stage clients are replaced by an in-test class with the methods the pipeline uses.
It answers after random short sleeps so batches finish out of order, finds one face per
frame, and "swaps" by returning white crops. It exercises the pipeline's scheduling only;
the real clients are tested against real stages elsewhere.

Every frame is filled with a colour that encodes its index (blue = index, green =
255 - index), so the output order can be read back from the far corner, and the fake
swapper can tell which frame a crop came from.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from facestage.alignment import template_points
from facestage.types import Crop, DetectedFace, Embedding, VisionFrame
from orchestrator.clients import StageClients
from orchestrator.pipeline import PipelineSettings, SwapParams, SwapPipeline

SIZE = 256
RED = 100
# The face sits in the lower right of the frame; the top-left corner is far from it.
LANDMARKS = (template_points("arcface_112_v2", 112) + 110.0).astype(np.float32)
NOSE = np.round(LANDMARKS[2]).astype(int)
CORNER = (slice(0, 24), slice(0, 24))
SOURCE: Embedding = np.ones(512, dtype=np.float32) / np.sqrt(512)


class SwapFailed(Exception):
    pass


def make_frame(index: int) -> VisionFrame:
    frame = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    frame[...] = (index % 256, 255 - index % 256, RED)
    return frame


def frame_index(frame: VisionFrame) -> int:
    """The index a frame carries in its far corner (asserting the corner is untouched)."""
    corner = frame[CORNER]
    index = int(corner[0, 0, 0])
    expected = np.array([index, 255 - index, RED], dtype=np.uint8)
    assert (corner == expected).all(), "the far corner was changed"
    return index


class FakeStageClients:
    """The StageClients surface SwapPipeline uses, answering after random short sleeps."""

    embed_crop_size_px = 112
    embed_template_points = template_points("arcface_112_v2", 112)
    swap_crop_size_px = 128
    swap_template_points = template_points("arcface_128", 128)
    enhance_crop_size_px: int | None = None
    enhance_template_points: np.ndarray | None = None

    def __init__(self, seed: int = 0, fail_batch: int | None = None, batch_size: int = 4) -> None:
        self.random = random.Random(seed)
        self.fail_batch = fail_batch
        self.batch_size = batch_size
        self.detect_done: list[int] = []
        self.swap_done: list[int] = []
        self.swap_calls = 0

    async def _pause(self, first_index: int) -> None:
        # Even batches take longer than odd ones, so the next batch often overtakes.
        slow = (first_index // self.batch_size) % 2 == 0
        await asyncio.sleep(self.random.uniform(0.004, 0.012) if slow else 0.0005)

    async def detect(
        self, frames: Sequence[VisionFrame], score_threshold: float = 0.5
    ) -> list[list[DetectedFace]]:
        await self._pause(int(frames[0][0, 0, 0]))
        self.detect_done.append(int(frames[0][0, 0, 0]))
        box = np.array([100, 100, 230, 240], dtype=np.float32)
        return [[DetectedFace(box=box, landmarks=LANDMARKS.copy(), score=0.9)] for _ in frames]

    async def embed(self, crops: Sequence[Crop]) -> np.ndarray:
        await asyncio.sleep(0)
        return np.tile(SOURCE, (len(crops), 1))

    async def swap(self, crops: Sequence[Crop], source: Embedding) -> list[Crop]:
        self.swap_calls += 1
        indices = [int(crop[64, 64, 0]) for crop in crops]  # the frame colour survives warping
        await self._pause(indices[0])
        if self.fail_batch is not None and indices[0] // self.batch_size == self.fail_batch:
            raise SwapFailed(f"swapper failed on frames {indices}")
        self.swap_done.append(indices[0])
        return [np.full((128, 128, 3), 255, dtype=np.uint8) for _ in crops]

    async def enhance(self, crops: Sequence[Crop], fidelity_weight: float = 0.5) -> list[Crop]:
        raise AssertionError("enhance is not requested in these tests")


class Recorder:
    """Counts frames handed out by the input iterator and frames written (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.read = 0
        self.written: list[VisionFrame] = []
        self.max_ahead = 0

    def frames(self, count: int | None) -> Iterator[VisionFrame]:
        index = 0
        while count is None or index < count:
            with self.lock:
                self.read += 1
                self._ahead()
            yield make_frame(index)
            index += 1

    def write(self, frame: VisionFrame) -> None:
        with self.lock:
            self.written.append(frame.copy())
            self._ahead()

    def _ahead(self) -> None:
        self.max_ahead = max(self.max_ahead, self.read - len(self.written))


def _pipeline(fake: FakeStageClients, **settings: int) -> SwapPipeline:
    return SwapPipeline(fake, PipelineSettings(**settings))  # type: ignore[arg-type]


def _check_swapped(frame: VisionFrame) -> None:
    assert frame[NOSE[1], NOSE[0]].min() >= 245, "the face was not swapped"


async def test_frames_come_out_in_order_exactly_once() -> None:
    fake = FakeStageClients(seed=1, batch_size=4)
    recorder = Recorder()
    pipeline = _pipeline(fake, batch_size=4, detect_in_flight=2, swap_in_flight=3)

    stats = await asyncio.wait_for(
        pipeline.swap_stream(recorder.frames(41), recorder.write, SOURCE, SwapParams()), 20.0
    )

    assert [frame_index(frame) for frame in recorder.written] == list(range(41))
    for frame in recorder.written:
        _check_swapped(frame)
    assert stats.frames == 41
    assert stats.frames_with_swaps == 41
    assert stats.faces_swapped == 41
    # The batches really finished out of order: the pipeline had to reorder them.
    assert fake.detect_done != sorted(fake.detect_done) or fake.swap_done != sorted(fake.swap_done)


async def test_the_swap_changes_only_the_face_region() -> None:
    fake = FakeStageClients(seed=2)
    recorder = Recorder()
    await _pipeline(fake, batch_size=4).swap_stream(
        recorder.frames(4), recorder.write, SOURCE, SwapParams()
    )
    for index, frame in enumerate(recorder.written):
        original = make_frame(index)
        changed = np.any(frame != original, axis=-1)
        ys, xs = np.nonzero(changed)
        assert changed.sum() > 3000  # the face, not a few pixels
        assert xs.min() >= 90 and ys.min() >= 90  # nothing left of or above the face's crop
        _check_swapped(frame)
        assert frame_index(frame) == index


async def test_frames_without_faces_pass_through_untouched() -> None:
    class NoFaces(FakeStageClients):
        async def detect(
            self, frames: Sequence[VisionFrame], score_threshold: float = 0.5
        ) -> list[list[DetectedFace]]:
            await asyncio.sleep(0)
            return [[] for _ in frames]

    fake = NoFaces()
    recorder = Recorder()
    stats = await _pipeline(fake, batch_size=3).swap_stream(
        recorder.frames(7), recorder.write, SOURCE, SwapParams()
    )
    assert stats.frames == 7 and stats.faces_swapped == 0
    assert fake.swap_calls == 0
    for index, frame in enumerate(recorder.written):
        np.testing.assert_array_equal(frame, make_frame(index))


async def test_reading_is_bounded_by_batches_in_flight() -> None:
    batch_size, in_flight = 2, 2
    fake = FakeStageClients(seed=3, batch_size=batch_size)
    recorder = Recorder()
    pipeline = _pipeline(fake, batch_size=batch_size, max_batches_in_flight=in_flight)

    await asyncio.wait_for(
        pipeline.swap_stream(recorder.frames(40), recorder.write, SOURCE, SwapParams()), 20.0
    )

    assert len(recorder.written) == 40
    assert recorder.read == 40
    # Never more than the batches in flight (plus the one being read) ahead of writing.
    assert recorder.max_ahead <= in_flight * batch_size + batch_size
    assert recorder.max_ahead >= batch_size  # the check did observe frames ahead


async def test_a_stage_failure_propagates_and_stops_writing() -> None:
    batch_size = 2
    fake = FakeStageClients(seed=4, fail_batch=3, batch_size=batch_size)
    recorder = Recorder()
    pipeline = _pipeline(fake, batch_size=batch_size, max_batches_in_flight=4)

    with pytest.raises(SwapFailed, match="swapper failed on frames"):
        await asyncio.wait_for(
            pipeline.swap_stream(recorder.frames(40), recorder.write, SOURCE, SwapParams()), 20.0
        )

    written = [frame_index(frame) for frame in recorder.written]
    assert written == list(range(len(written)))  # a prefix, in order
    assert len(written) <= 3 * batch_size  # nothing from the failed batch or after it
    await asyncio.sleep(0.05)
    assert len(recorder.written) == len(written)
    assert recorder.read < 40  # it stopped reading


async def test_cancelling_stops_reading() -> None:
    fake = FakeStageClients(seed=5, batch_size=2)
    recorder = Recorder()
    pipeline = _pipeline(fake, batch_size=2, max_batches_in_flight=2)

    task = asyncio.create_task(
        pipeline.swap_stream(recorder.frames(None), recorder.write, SOURCE, SwapParams())
    )
    for _ in range(1000):
        if len(recorder.written) >= 6:
            break
        await asyncio.sleep(0.005)
    assert len(recorder.written) >= 6
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    read_at_cancel = recorder.read
    await asyncio.sleep(0.1)
    assert recorder.read == read_at_cancel  # nothing reads on after the task ended
    written = [frame_index(frame) for frame in recorder.written]
    assert written == list(range(len(written)))
    assert recorder.read <= len(written) + 3 * 2


def test_the_fake_has_what_the_pipeline_uses() -> None:
    """The fake mirrors StageClients: same method and attribute names."""
    for name in ("detect", "embed", "swap", "enhance"):
        assert callable(getattr(StageClients, name))
    for name in (
        "embed_crop_size_px",
        "embed_template_points",
        "swap_crop_size_px",
        "swap_template_points",
        "enhance_crop_size_px",
        "enhance_template_points",
    ):
        assert hasattr(FakeStageClients, name)
