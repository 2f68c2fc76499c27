"""Starts stage services as local processes on free loopback ports and waits for SERVING.

Used by ``facestage swap`` and ``facestage up`` (the same entry points production runs,
``python -m services.<stage>``) and by the integration tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facestage.errors import UnavailableError
from facestage.types import Stage

DEFAULT_START_TIMEOUT_S = 120.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def health_status(address: str, service: str = "", timeout_s: float = 2.0) -> int | None:
    """The grpc.health.v1 status of ``service`` at ``address``, or None if unreachable."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return None
        return int(reply.status)


@dataclass
class StageProcess:
    """A stage service running as a child process."""

    stage: str
    model: str
    host: str
    port: int
    metrics_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    _log_file: object = field(repr=False, default=None)

    @property
    def address(self) -> str:
        """``host:port`` of its gRPC server."""
        return f"{self.host}:{self.port}"

    def log_tail(self, max_chars: int = 4000) -> str:
        """The end of what the process printed (stdout and stderr)."""
        try:
            return self.log_path.read_text(errors="replace")[-max_chars:]
        except OSError:
            return ""

    def wait_serving(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> None:
        """Blocks until health reports SERVING; raises if the process dies or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise UnavailableError(
                    f"{self.stage} exited with code {code} before serving:\n{self.log_tail()}"
                )
            if health_status(self.address, timeout_s=1.0) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
        raise UnavailableError(
            f"{self.stage} did not report SERVING within {timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def request_stop(self) -> None:
        """Sends SIGTERM (graceful drain) without waiting."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(Exception):
            self._log_file.close()  # type: ignore[attr-defined]
        return int(self.process.returncode)


def start_stage(
    stage: Stage,
    model: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    metrics_port: int | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
) -> StageProcess:
    """Starts ``python -m services.<stage>`` on free loopback ports (does not wait)."""
    port = port or free_port(host)
    metrics_port = metrics_port if metrics_port is not None else free_port(host)
    log_dir = log_dir or Path(tempfile.gettempdir())
    log_path = log_dir / f"facestage-{stage}-{port}.log"
    log_file = log_path.open("wb")
    args = [
        sys.executable,
        "-m",
        f"services.{stage}",
        "--model",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--metrics-host",
        host,
        *extra_args,
    ]
    process = subprocess.Popen(
        args,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we drain them
    )
    return StageProcess(stage, str(model), host, port, metrics_port, process, log_path, log_file)


def start_orchestrator(
    targets: Mapping[str, str],
    *,
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    log_dir: Path | None = None,
) -> StageProcess:
    """Starts ``facestage serve`` in front of stage ``targets`` on free loopback ports."""
    port, metrics_port = free_port(host), free_port(host)
    log_path = (log_dir or Path(tempfile.gettempdir())) / f"facestage-orchestrator-{port}.log"
    log_file = log_path.open("wb")
    args = [
        sys.executable, "-m", "facestage.cli", "serve", "--host", host, "--port", str(port),
        "--metrics-port", str(metrics_port), "--metrics-host", host,
        *[f"--{stage}={target}" for stage, target in targets.items()],
        *extra_args,
    ]  # fmt: skip
    process = subprocess.Popen(
        args,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    return StageProcess("orchestrator", "", host, port, metrics_port, process, log_path, log_file)


@contextlib.contextmanager
def local_stages(
    models: Mapping[Stage, str | Path],
    *,
    host: str = "127.0.0.1",
    extra_args: Mapping[Stage, Sequence[str]] | None = None,
    timeout_s: float = DEFAULT_START_TIMEOUT_S,
    log_dir: Path | None = None,
) -> Iterator[dict[Stage, StageProcess]]:
    """Starts one process per stage, waits until all are SERVING, stops them on exit."""
    started: dict[Stage, StageProcess] = {}
    try:
        for stage, model in models.items():
            started[stage] = start_stage(
                stage,
                model,
                host=host,
                extra_args=(extra_args or {}).get(stage, ()),
                log_dir=log_dir,
            )
        for process in started.values():
            process.wait_serving(timeout_s)
        yield started
    finally:
        # Drain all at once rather than one after the other.
        for process in started.values():
            process.request_stop()
        for process in started.values():
            process.stop()
