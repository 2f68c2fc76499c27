#!/usr/bin/env python3
"""Container health check through grpc.health.v1 (Docker HEALTHCHECK, compose healthcheck).

Exit 0 when the server answers SERVING for the overall service (""), 1 otherwise
(NOT_SERVING while loading, warming up or draining; connection refused; timeout).
Installed in the image as /usr/local/bin/facestage-healthcheck.

The port, in order: --port; $FACESTAGE_HEALTHCHECK_PORT; the `--port` argument of the
container's main process (/proc/1/cmdline); $FACESTAGE_<ROLE>_PORT of that role; the
role's default (50050 for the orchestrator, 50051 for a stage).

Kubernetes does not need this: it probes grpc.health.v1 natively (`grpc: {port: ...}`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

STAGES = ("detector", "embedder", "swapper", "enhancer")


def main_process_args(cmdline: Path = Path("/proc/1/cmdline")) -> list[str]:
    try:
        raw = cmdline.read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def role_of(args: list[str]) -> str | None:
    for arg in args:
        base = os.path.basename(arg)
        if base == "serve" or base in ("orchestrator",):
            return "orchestrator"
        for stage in STAGES:
            if base in (stage, f"facestage-{stage}") or arg == f"services.{stage}":
                return stage
    return None


def port_from_args(args: list[str]) -> int | None:
    for i, arg in enumerate(args):
        if arg == "--port" and i + 1 < len(args):
            return int(args[i + 1])
        if arg.startswith("--port="):
            return int(arg.split("=", 1)[1])
    return None


def resolve_port(explicit: int | None, environ: dict[str, str], args: list[str]) -> int:
    if explicit is not None:
        return explicit
    if environ.get("FACESTAGE_HEALTHCHECK_PORT"):
        return int(environ["FACESTAGE_HEALTHCHECK_PORT"])
    from_args = port_from_args(args)
    if from_args is not None:
        return from_args
    role = role_of(args)
    if role is not None and environ.get(f"FACESTAGE_{role.upper()}_PORT"):
        return int(environ[f"FACESTAGE_{role.upper()}_PORT"])
    return 50050 if role == "orchestrator" else 50051


def check(host: str, port: int, service: str, timeout: float) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"{host}:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as err:
        return False, f"{target}: {err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="grpc.health.v1 check for facestage containers")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--service", default="", help='health service name ("" = the server)')
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    port = resolve_port(args.port, dict(os.environ), main_process_args())
    ok, message = check(args.host, port, args.service, args.timeout)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
