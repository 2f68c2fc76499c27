"""In-process orchestrators (and the stages behind them) on loopback, for API and e2e tests.

``running_stages`` starts the four stage servers: the real SCRFD 2.5G detector and the
contract fixtures for the 512-d ArcFace, inswapper_128 and GFPGAN (the real 128-d
MobileFaceNet cannot feed inswapper, which takes 512-d identities). Fixture outputs are
plumbing, not swaps. ``running_orchestrator`` builds the public API server exactly as
``facestage serve`` does and yields it with an aio channel to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from facestage.server import GrpcServer
from facestage.swap.v1 import swap_pb2_grpc
from orchestrator.api import build_orchestrator
from orchestrator.settings import OrchestratorSettings
from tests.integration.conftest import running_stage

CHANNEL_MESSAGE_BYTES = 256 * 1024 * 1024


@contextlib.asynccontextmanager
async def running_stages(
    detector_model: Path, fixtures: Mapping[str, Path], *, enhancer: bool = True
) -> AsyncIterator[dict[str, str]]:
    """The stage servers on 127.0.0.1:0; yields orchestrator settings naming their targets.

    ``fixtures`` is the ``contract_fixtures`` fixture's mapping. Without ``enhancer`` the
    ``enhancer`` target is empty (none deployed).
    """
    async with contextlib.AsyncExitStack() as stack:
        models = {
            "detector": detector_model,
            "embedder": fixtures["arcface"],
            "swapper": fixtures["inswapper"],
        }
        if enhancer:
            models["enhancer"] = fixtures["gfpgan"]
        targets = {"enhancer": ""}
        for stage, model in models.items():
            server, _ = await stack.enter_async_context(running_stage(stage, model))  # type: ignore[arg-type]
            targets[stage] = f"127.0.0.1:{server.port}"
        yield targets


@contextlib.asynccontextmanager
async def running_orchestrator(
    stage_targets: Mapping[str, str], **settings: Any
) -> AsyncIterator[tuple[GrpcServer, grpc.aio.Channel]]:
    """An orchestrator on 127.0.0.1:0 over ``stage_targets``; yields (server, channel).

    ``settings`` override OrchestratorSettings fields (``spool_dir``, ``chunk_bytes``, ...).
    Drained (and its stage channels closed) on exit.
    """
    config = OrchestratorSettings.model_validate(
        {"host": "127.0.0.1", "port": 0, "metrics_port": -1, **stage_targets, **settings}
    )
    server, _clients = await build_orchestrator(config)
    port = await server.start()
    await server.warm_up()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.max_receive_message_length", CHANNEL_MESSAGE_BYTES),
            ("grpc.max_send_message_length", CHANNEL_MESSAGE_BYTES),
        ],
    )
    try:
        yield server, channel
    finally:
        await channel.close(None)
        await server.drain(0)


def swap_stub(channel: grpc.aio.Channel) -> Any:
    """The generated FaceSwapService stub on ``channel``."""
    return swap_pb2_grpc.FaceSwapServiceStub(channel)
