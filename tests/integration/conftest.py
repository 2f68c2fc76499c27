"""In-process stage servers on loopback port 0, called through the generated stubs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from facestage.runtime import open_session
from facestage.server import GrpcServer
from facestage.settings import StageSettings
from facestage.stage import BuildFn, create_server
from facestage.types import Stage


@pytest.fixture(scope="session")
def contract_fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The project's contract fixtures (ArcFace-512, inswapper_128, GFPGAN, CodeFormer)."""
    from facestage.fixtures import write_contract_fixtures

    return write_contract_fixtures(tmp_path_factory.mktemp("fixtures"))


def _build_fn(stage: Stage) -> tuple[type[StageSettings], BuildFn]:
    if stage == "detector":
        from services.detector.service import DetectorSettings, build

        return DetectorSettings, build
    if stage == "embedder":
        from services.embedder.service import EmbedderSettings, build

        return EmbedderSettings, build
    if stage == "swapper":
        from services.swapper.service import SwapperSettings, build

        return SwapperSettings, build
    from services.enhancer.service import EnhancerSettings, build

    return EnhancerSettings, build


@contextlib.asynccontextmanager
async def running_stage(
    stage: Stage, model_path: Path, *, warm: bool = True, **overrides: Any
) -> AsyncIterator[tuple[GrpcServer, grpc.aio.Channel]]:
    """A real stage server on 127.0.0.1:0 and an aio channel to it; drained on exit."""
    settings_cls, build = _build_fn(stage)
    settings = settings_cls.model_validate(
        {
            "model": str(model_path),
            "host": "127.0.0.1",
            "port": 0,
            "metrics_port": -1,
            "providers": ["cpu"],
            **overrides,
        }
    )
    model = open_session(model_path, ["cpu"])
    server = create_server(stage, settings, build(settings, model))
    port = await server.start()
    if warm:
        await server.warm_up()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ("grpc.max_send_message_length", 256 * 1024 * 1024),
        ],
    )
    try:
        yield server, channel
    finally:
        await channel.close(None)
        await server.drain(0)


@pytest.fixture
def stage_server() -> Callable[..., Any]:
    """``async with stage_server(stage, model_path, **settings) as (server, channel)``."""
    return running_stage
