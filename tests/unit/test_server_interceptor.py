"""GrpcServer and its StatusInterceptor: error mapping, request metrics and health.

A real server on a free port serves a tiny raw-bytes service whose behaviour is chosen
by the request bytes; calls go through a real grpc.aio channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from facestage.errors import FailedPreconditionError, InvalidArgumentError
from facestage.server import GrpcServer, ServiceBinding
from facestage.settings import ServerSettings

SERVICE = "facestage.test.v1.EchoService"
SECRET = "password=hunter2"
_STAGE_IDS = itertools.count()


def _settings() -> ServerSettings:
    return ServerSettings.model_validate({"host": "127.0.0.1", "port": 0, "metrics_port": -1})


def _behave(request: bytes) -> bytes:
    if request == b"invalid":
        raise InvalidArgumentError("crops[1]", "is not square")
    if request == b"precondition":
        raise FailedPreconditionError("no face found in source_images[0]")
    if request == b"bug":
        raise ValueError(f"leaked internals: {SECRET}")
    return request.upper()


class EchoServicer:
    async def Unary(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await asyncio.sleep(0)
        return _behave(request)

    async def Stream(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        for i in range(2):
            yield b"part%d" % i
        yield _behave(request)


def _add_to_server(servicer: EchoServicer, server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(servicer.Unary),
            "Stream": grpc.unary_stream_rpc_method_handler(servicer.Stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))


@dataclass
class Running:
    server: GrpcServer
    channel: grpc.aio.Channel
    stage: str

    async def unary(self, request: bytes) -> bytes:
        call = self.channel.unary_unary(f"/{SERVICE}/Unary", None, None)
        reply: bytes = await call(request, timeout=5.0)
        return reply

    async def stream(self, request: bytes) -> tuple[list[bytes], grpc.aio.AioRpcError | None]:
        call = self.channel.unary_stream(f"/{SERVICE}/Stream", None, None)(request, timeout=5.0)
        received: list[bytes] = []
        try:
            async for message in call:
                received.append(message)
        except grpc.aio.AioRpcError as error:
            return received, error
        return received, None

    def requests(self, method: str, code: str) -> float:
        value = REGISTRY.get_sample_value(
            "facestage_requests_total", {"stage": self.stage, "method": method, "code": code}
        )
        return value or 0.0

    async def wait_requests(self, method: str, code: str, expected: float) -> None:
        """The metric is recorded as the handler ends; give it a moment to land."""
        for _ in range(200):
            if self.requests(method, code) >= expected:
                break
            await asyncio.sleep(0.005)
        assert self.requests(method, code) == expected


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    stage = f"test-server-{next(_STAGE_IDS)}"
    settings = _settings()
    binding = ServiceBinding(EchoServicer(), _add_to_server, SERVICE)
    server = GrpcServer(settings, stage, [binding])
    port = await server.start()
    assert port > 0
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Running(server, channel, stage)
    finally:
        await channel.close(None)
        await server.drain(0)


async def test_a_successful_call(running: Running) -> None:
    assert await running.unary(b"hello") == b"HELLO"
    await running.wait_requests("Unary", "OK", 1)
    assert running.requests("Unary", "INTERNAL") == 0


@pytest.mark.parametrize(
    ("request_bytes", "code", "details"),
    [
        (b"invalid", grpc.StatusCode.INVALID_ARGUMENT, "crops[1]: is not square"),
        (b"precondition", grpc.StatusCode.FAILED_PRECONDITION, "no face found in source_images[0]"),
    ],
)
async def test_facestage_errors_map_to_their_codes(
    running: Running, request_bytes: bytes, code: grpc.StatusCode, details: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await running.unary(request_bytes)
    assert info.value.code() == code
    assert info.value.details() == details
    await running.wait_requests("Unary", code.name, 1)
    assert running.requests("Unary", "OK") == 0


async def test_an_uncaught_exception_is_internal_without_its_message(running: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await running.unary(b"bug")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    details = info.value.details() or ""
    assert SECRET not in details
    assert "leaked internals" not in details
    assert "ValueError" in details
    await running.wait_requests("Unary", "INTERNAL", 1)
    assert running.requests("Unary", "UNKNOWN") == 0


async def test_a_stream_that_succeeds(running: Running) -> None:
    received, error = await running.stream(b"done")
    assert error is None
    assert received == [b"part0", b"part1", b"DONE"]
    await running.wait_requests("Stream", "OK", 1)


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"invalid", grpc.StatusCode.INVALID_ARGUMENT),
        (b"precondition", grpc.StatusCode.FAILED_PRECONDITION),
        (b"bug", grpc.StatusCode.INTERNAL),
    ],
)
async def test_errors_mid_stream_map_the_same_way(
    running: Running, request_bytes: bytes, code: grpc.StatusCode
) -> None:
    received, error = await running.stream(request_bytes)
    assert received == [b"part0", b"part1"]  # what was sent before the failure arrives
    assert error is not None
    assert error.code() == code
    assert SECRET not in (error.details() or "")
    await running.wait_requests("Stream", code.name, 1)
    assert running.requests("Stream", "OK") == 0
    assert running.requests("Stream", "UNKNOWN") == 0


async def test_counts_accumulate_per_code(running: Running) -> None:
    for request in (b"a", b"invalid", b"b", b"invalid", b"bug", b"c"):
        with contextlib.suppress(grpc.aio.AioRpcError):
            await running.unary(request)
    await running.wait_requests("Unary", "OK", 3)
    await running.wait_requests("Unary", "INVALID_ARGUMENT", 2)
    await running.wait_requests("Unary", "INTERNAL", 1)


async def test_unknown_method_is_unimplemented(running: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await running.channel.unary_unary(f"/{SERVICE}/Missing", None, None)(b"x", timeout=5.0)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_is_not_serving_until_warmed_up(running: Running) -> None:
    stub = health_pb2_grpc.HealthStub(running.channel)
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", SERVICE):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5.0)
        assert reply.status == not_serving
    assert REGISTRY.get_sample_value("facestage_serving", {"stage": running.stage}) == 0

    await running.server.warm_up()

    for service in ("", SERVICE):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5.0)
        assert reply.status == serving
    assert REGISTRY.get_sample_value("facestage_serving", {"stage": running.stage}) == 1
    # Health checks are not counted as requests of the stage.
    assert running.requests("Check", "OK") == 0


async def test_warm_up_runs_the_warmup_first() -> None:
    stage = f"test-server-{next(_STAGE_IDS)}"
    settings = _settings()
    statuses: list[int] = []
    server: GrpcServer | None = None

    async def warmup() -> None:
        assert server is not None
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5.0
        )
        statuses.append(reply.status)
        await channel.close(None)

    server = GrpcServer(settings, stage, [], warmup=warmup)
    await server.start()
    try:
        await server.warm_up()
    finally:
        await server.drain(0)
    assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
