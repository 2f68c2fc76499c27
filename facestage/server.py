"""The gRPC server bootstrap every facestage process runs.

One place for: grpc.aio server options (message size limits, max connection age),
grpc.health.v1 (NOT_SERVING until the model has loaded and run a warm-up inference,
NOT_SERVING again while draining), reflection, the interceptor that maps exceptions to
status codes and counts every call, the metrics endpoint, and graceful drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from facestage import metrics
from facestage.errors import FacestageError
from facestage.settings import ServerSettings

log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def _method_name(full: str) -> str:
    return full.rsplit("/", 1)[-1]


class StatusInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Maps exceptions to gRPC status codes and records request metrics, in one place.

    facestage errors carry their status code; an uncaught exception is a bug and becomes
    INTERNAL with its traceback logged, never a bare UNKNOWN.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        full = handler_call_details.method
        if full.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        method = _method_name(full)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, method),  # type: ignore[arg-type]
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _fail(self, context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
        if isinstance(exc, FacestageError):
            await context.abort(exc.status_code, str(exc))
        log.error("uncaught exception in handler", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    def _record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        metrics.REQUESTS.labels(self.stage, method, code.name).inc()
        metrics.REQUEST_DURATION.labels(self.stage, method).observe(time.perf_counter() - started)

    @staticmethod
    def _code_of(
        context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None
    ) -> grpc.StatusCode:
        if isinstance(exc, asyncio.CancelledError):
            return grpc.StatusCode.CANCELLED
        if isinstance(exc, FacestageError):
            return exc.status_code
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code
        return grpc.StatusCode.OK if exc is None else grpc.StatusCode.INTERNAL

    def _wrap_unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            in_flight = metrics.REQUESTS_IN_FLIGHT.labels(self.stage, method)
            in_flight.inc()
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError) as exc:
                error = exc if isinstance(exc, asyncio.CancelledError) else None
                raise
            except Exception as exc:
                error = exc
                await self._fail(context, exc)
                raise  # unreachable: abort raises
            finally:
                in_flight.dec()
                self._record(method, self._code_of(context, error), started)

        return wrapper

    def _wrap_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapper(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            started = time.perf_counter()
            in_flight = metrics.REQUESTS_IN_FLIGHT.labels(self.stage, method)
            in_flight.inc()
            error: BaseException | None = None
            try:
                async for response in behavior(request, context):
                    yield response
            except (asyncio.CancelledError, grpc.aio.AbortError) as exc:
                error = exc if isinstance(exc, asyncio.CancelledError) else None
                raise
            except Exception as exc:
                error = exc
                await self._fail(context, exc)
                raise
            finally:
                in_flight.dec()
                self._record(method, self._code_of(context, error), started)

        return wrapper


@dataclass(frozen=True)
class ServiceBinding:
    """A servicer and how to add it to a server (the generated ``add_*_to_server``)."""

    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    service_name: str


def server_options(settings: ServerSettings) -> list[tuple[str, Any]]:
    """Channel arguments of every facestage server."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.drain_grace_s * 1000) or 1000),
        ]
    return options


class GrpcServer:
    """A grpc.aio server with health, reflection, the status interceptor and drain.

    Life cycle: ``start`` (bound, health NOT_SERVING) -> ``warm_up`` (runs the warm-up,
    then SERVING) -> ``drain`` (NOT_SERVING, in-flight calls finish within the grace,
    then stop). ``serve_forever`` does all three and drains on SIGTERM or SIGINT.
    """

    def __init__(
        self,
        settings: ServerSettings,
        stage: str,
        bindings: Sequence[ServiceBinding],
        warmup: Callable[[], Awaitable[None]] | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.stage = stage
        self.bindings = list(bindings)
        self._warmup = warmup
        self._on_close = on_close
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.server = grpc.aio.server(
            interceptors=[StatusInterceptor(stage)], options=server_options(settings)
        )
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._stopped = asyncio.Event()
        self._serving_gauge = metrics.SERVING.labels(stage)

    @property
    def service_names(self) -> list[str]:
        """Full names of the application services (without health and reflection)."""
        return [b.service_name for b in self.bindings]

    async def _set_health(self, status: Any) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, status)
        self._serving_gauge.set(1 if status == health_pb2.HealthCheckResponse.SERVING else 0)

    async def start(self) -> int:
        """Binds and starts the server, reporting NOT_SERVING; returns the bound port."""
        for binding in self.bindings:
            binding.add_to_server(binding.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.settings.host}:{self.settings.port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {address}")
        await self.server.start()
        self.metrics_port = metrics.start_metrics_server(
            self.settings.metrics_host, self.settings.metrics_port, self.stage
        )
        log.info("%s listening on %s:%d", self.stage, self.settings.host, self.port)
        return self.port

    async def warm_up(self) -> None:
        """Runs the warm-up inference, then reports SERVING."""
        if self._warmup is not None:
            started = time.perf_counter()
            await self._warmup()
            log.info("warm-up done in %.2f s", time.perf_counter() - started)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("%s SERVING", self.stage)

    async def drain(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, then lets in-flight calls finish for up to the grace, then stops."""
        grace = self.settings.drain_grace_s if grace_s is None else grace_s
        log.info("draining (grace %.1f s)", grace)
        await self.health.enter_graceful_shutdown()
        self._serving_gauge.set(0)
        notice = min(self.settings.drain_notice_s, grace)
        if notice > 0:
            # Still accepting calls while NOT_SERVING spreads to balancers and probes.
            await asyncio.sleep(notice)
        await self.server.stop(grace - notice)
        if self._on_close is not None:
            await self._on_close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Returns once the server has drained and stopped."""
        await self._stopped.wait()

    async def serve_forever(self) -> None:
        """Starts, warms up, serves until SIGTERM/SIGINT, then drains."""
        loop = asyncio.get_running_loop()
        drain_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, drain_requested.set)
        await self.start()
        print(f"{self.stage} listening on {self.settings.host}:{self.port}", flush=True)
        warm = loop.create_task(self.warm_up())
        stop = loop.create_task(drain_requested.wait())
        await asyncio.wait({warm, stop}, return_when=asyncio.FIRST_COMPLETED)
        if warm.done() and warm.exception() is not None:
            stop.cancel()
            await self.drain(0)
            raise RuntimeError(f"warm-up failed: {warm.exception()}") from warm.exception()
        await stop
        if not warm.done():
            warm.cancel()
        await self.drain()


def configure_logging(level: str) -> None:
    """One log format for every facestage process, on stderr."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
