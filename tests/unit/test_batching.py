"""DynamicBatcher: merging, limits, keys, failures, cancellation, close and the queue gauge.

``run_batch`` is a plain function that records every batch it is given and answers each
item with a value derived from it, so a caller can tell its own results from others'.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass, field

import pytest
from prometheus_client import REGISTRY

from facestage.batching import DynamicBatcher
from facestage.errors import ResourceExhaustedError, UnavailableError

_STAGE_IDS = itertools.count()
Batcher = DynamicBatcher[str, tuple[str, Hashable]]
Make = Callable[..., Batcher]


def _stage() -> str:
    return f"test-batcher-{next(_STAGE_IDS)}"


def _depth(stage: str) -> float | None:
    return REGISTRY.get_sample_value("facestage_batcher_queue_depth", {"stage": stage})


class Boom(Exception):
    pass


@dataclass
class Model:
    """Answers item ``x`` with ``(x, key)``; can be held, and fails on the item 'boom'."""

    batches: list[tuple[list[str], Hashable]] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    hold: bool = False

    def __post_init__(self) -> None:
        if not self.hold:
            self.release.set()

    def __call__(self, items: Sequence[str], key: Hashable) -> list[tuple[str, Hashable]]:
        self.batches.append((list(items), key))
        self.started.set()
        assert self.release.wait(5.0), "test never released the model"
        if "boom" in items:
            raise Boom("model failed")
        return [(item, key) for item in items]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    made: list[Batcher] = []

    def factory(model: Model, **options: float) -> Batcher:
        settings: dict[str, float] = {
            "max_batch_size": 8,
            "window_s": 0.0,
            "max_queue_items": 64,
        }
        settings.update(options)
        batcher: Batcher = DynamicBatcher(
            model,
            stage=_stage(),
            model_name="fake",
            max_batch_size=int(settings["max_batch_size"]),
            window_s=float(settings["window_s"]),
            max_queue_items=int(settings["max_queue_items"]),
        )
        made.append(batcher)
        return batcher

    yield factory
    for batcher in made:
        await batcher.close()


async def _until(predicate: Callable[[], bool], timeout_s: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


async def test_concurrent_submits_merge_in_arrival_order(make: Make) -> None:
    model = Model()
    # The window is long; the batch goes as soon as it is full (7 = 2 + 1 + 3 + 1 items).
    batcher = make(model, max_batch_size=7, window_s=10.0)
    requests = [["a0", "a1"], ["b0"], ["c0", "c1", "c2"], ["d0"]]

    results = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(items) for items in requests)), 3.0
    )

    assert model.batches == [(["a0", "a1", "b0", "c0", "c1", "c2", "d0"], None)]
    for items, result in zip(requests, results, strict=True):
        assert result == [(item, None) for item in items]


async def test_requests_within_the_window_merge(make: Make) -> None:
    model = Model()
    batcher = make(model, max_batch_size=64, window_s=0.2)

    async def later(delay: float, items: list[str]) -> list[tuple[str, Hashable]]:
        await asyncio.sleep(delay)
        return await batcher.submit(items)

    results = await asyncio.gather(later(0.0, ["x"]), later(0.02, ["y"]), later(0.04, ["z"]))

    assert model.batches == [(["x", "y", "z"], None)]
    assert list(results) == [[("x", None)], [("y", None)], [("z", None)]]


async def test_batches_never_exceed_the_maximum(make: Make) -> None:
    model = Model()
    batcher = make(model, max_batch_size=4, window_s=0.02)
    requests = [[f"r{i}-{j}" for j in range(1 + i % 3)] for i in range(12)]

    results = await asyncio.gather(*(batcher.submit(items) for items in requests))

    for items, result in zip(requests, results, strict=True):
        assert result == [(item, None) for item in items]
    sizes = [len(items) for items, _ in model.batches]
    assert max(sizes) <= 4
    seen = [item for items, _ in model.batches for item in items]
    assert sorted(seen) == sorted(item for items in requests for item in items)
    assert len(model.batches) >= 6  # 24 items, at most 4 per batch
    for items, _ in model.batches:  # within a batch, requests keep their arrival order
        order = [int(item[1:].split("-")[0]) for item in items]
        assert order == sorted(order)


async def test_different_keys_are_never_merged(make: Make) -> None:
    model = Model()
    batcher = make(model, max_batch_size=16, window_s=0.02)
    keys = ["small", "large", "small", "large", "small"]

    results = await asyncio.gather(
        *(batcher.submit([f"{key}-{i}"], key=key) for i, key in enumerate(keys))
    )

    for i, (key, result) in enumerate(zip(keys, results, strict=True)):
        assert result == [(f"{key}-{i}", key)]
    assert sorted(model.batches, key=lambda b: str(b[1])) == [
        (["large-1", "large-3"], "large"),
        (["small-0", "small-2", "small-4"], "small"),
    ]


async def test_a_single_submit_with_no_window_runs_at_once(make: Make) -> None:
    model = Model()
    batcher = make(model, max_batch_size=8, window_s=0.0)
    assert await asyncio.wait_for(batcher.submit(["only"]), 2.0) == [("only", None)]
    assert model.batches == [(["only"], None)]


async def test_empty_submit_returns_nothing(make: Make) -> None:
    model = Model()
    batcher = make(model)
    assert await batcher.submit([]) == []
    assert model.batches == []


async def test_a_request_over_the_batch_size_is_refused(make: Make) -> None:
    model = Model()
    batcher = make(model, max_batch_size=3)
    with pytest.raises(ResourceExhaustedError, match=r"4 items .* maximum batch size 3"):
        await batcher.submit(["a", "b", "c", "d"])
    assert model.batches == []
    assert await batcher.submit(["a", "b", "c"]) == [("a", None), ("b", None), ("c", None)]


async def test_a_full_queue_is_refused_and_the_gauge_follows(make: Make) -> None:
    model = Model(hold=True)
    batcher = make(model, max_batch_size=2, max_queue_items=3)
    stage = batcher.stage

    first = asyncio.create_task(batcher.submit(["a"]))
    await asyncio.to_thread(model.started.wait, 2.0)  # "a" is in the model, not queued
    waiting = asyncio.create_task(batcher.submit(["b", "c"]))
    await _until(lambda: _depth(stage) == 2)
    with pytest.raises(ResourceExhaustedError, match="queue is full"):
        await batcher.submit(["d", "e"])
    third = asyncio.create_task(batcher.submit(["f"]))  # 3 items fit exactly
    await _until(lambda: _depth(stage) == 3)

    model.release.set()
    assert await first == [("a", None)]
    assert await waiting == [("b", None), ("c", None)]
    assert await third == [("f", None)]
    assert _depth(stage) == 0
    assert [items for items, _ in model.batches] == [["a"], ["b", "c"], ["f"]]


async def test_a_model_error_reaches_every_caller_and_the_batcher_recovers(make: Make) -> None:
    model = Model()
    batcher = make(model, max_batch_size=3, window_s=10.0)

    results = await asyncio.gather(
        batcher.submit(["ok1"]),
        batcher.submit(["boom"]),
        batcher.submit(["ok2"]),
        return_exceptions=True,
    )

    assert model.batches == [(["ok1", "boom", "ok2"], None)]
    assert all(isinstance(result, Boom) for result in results)
    after = await asyncio.wait_for(batcher.submit(["x", "y", "z"]), 2.0)
    assert after == [("x", None), ("y", None), ("z", None)]
    assert _depth(batcher.stage) == 0


async def test_a_cancelled_waiting_submit_does_not_break_others(make: Make) -> None:
    model = Model(hold=True)
    batcher = make(model, max_batch_size=8)

    first = asyncio.create_task(batcher.submit(["a"]))
    await asyncio.to_thread(model.started.wait, 2.0)
    cancelled = asyncio.create_task(batcher.submit(["gone"]))
    kept = asyncio.create_task(batcher.submit(["kept"]))
    await _until(lambda: _depth(batcher.stage) == 2)
    cancelled.cancel()
    model.release.set()

    assert await first == [("a", None)]
    assert await kept == [("kept", None)]
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert [items for items, _ in model.batches] == [["a"], ["kept"]]
    assert _depth(batcher.stage) == 0
    assert await batcher.submit(["again"]) == [("again", None)]


async def test_a_submit_cancelled_while_running_does_not_break_its_batch(make: Make) -> None:
    model = Model(hold=True)
    batcher = make(model, max_batch_size=2, window_s=10.0)

    one = asyncio.create_task(batcher.submit(["one"]))
    two = asyncio.create_task(batcher.submit(["two"]))
    await asyncio.to_thread(model.started.wait, 2.0)
    one.cancel()
    model.release.set()

    assert await two == [("two", None)]
    with pytest.raises(asyncio.CancelledError):
        await one
    assert model.batches == [(["one", "two"], None)]


async def test_close_fails_waiting_requests_with_unavailable(make: Make) -> None:
    model = Model(hold=True)
    batcher = make(model, max_batch_size=8)

    running = asyncio.create_task(batcher.submit(["running"]))
    await asyncio.to_thread(model.started.wait, 2.0)
    waiting = asyncio.create_task(batcher.submit(["waiting"]))
    await _until(lambda: _depth(batcher.stage) == 1)

    closing = asyncio.create_task(batcher.close())
    with pytest.raises(UnavailableError, match="shutting down"):
        await asyncio.wait_for(waiting, 2.0)
    assert _depth(batcher.stage) == 0
    model.release.set()  # the batch already in the model finishes
    await asyncio.wait_for(closing, 2.0)
    assert await running == [("running", None)]
    with pytest.raises(UnavailableError):
        await batcher.submit(["late"])
    assert [items for items, _ in model.batches] == [["running"]]


async def test_queue_gauge_returns_to_zero_after_work_drains(make: Make) -> None:
    model = Model()
    batcher = make(model, max_batch_size=4, window_s=0.005)
    stage = batcher.stage
    assert _depth(stage) == 0

    results = await asyncio.gather(*(batcher.submit([f"i{i}"]) for i in range(20)))

    assert [result[0][0] for result in results] == [f"i{i}" for i in range(20)]
    assert _depth(stage) == 0
    other = make(Model(), max_batch_size=4)
    assert _depth(other.stage) == 0
    assert REGISTRY.get_sample_value("facestage_items_processed_total", {"stage": stage}) == 20
