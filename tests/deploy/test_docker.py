"""Dockerfiles (structure; no Docker engine here), their context filters, the
entrypoint's dispatch and the grpc.health.v1 health check against a real server."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .helpers import DEPLOY, ROOT

DOCKER = DEPLOY / "docker"


def stages_of(dockerfile: Path) -> list[tuple[str, list[str]]]:
    """(FROM line, instructions) per build stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.upper().startswith("FROM "):
            stages.append((stripped, []))
        elif stages:
            stages[-1][1].append(stripped)
    return stages


def args_of(dockerfile: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile.read_text(), re.M))


@pytest.mark.parametrize(
    ("name", "base"),
    [
        ("Dockerfile", r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu(22|24)\.04"),
        ("Dockerfile.cpu", r"python:3\.11-slim(-bookworm)?"),
    ],
)
def test_dockerfile_is_multi_stage_non_root_with_healthcheck(name: str, base: str) -> None:
    path = DOCKER / name
    stages = stages_of(path)
    assert (
        len(stages) == 2
        and stages[0][0].endswith(" AS builder")
        and stages[1][0].endswith(" AS runtime")
    )
    args = args_of(path)
    final_from = stages[1][0].split()[1]
    final_image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], final_from)
    assert re.fullmatch(base, final_image), final_image
    final = "\n".join(stages[1][1])
    assert "COPY --from=builder /opt/facestage /opt/facestage" in final
    assert re.search(r"^USER 10001:10001$", final, re.M)
    assert re.search(r'^HEALTHCHECK .*CMD \["facestage-healthcheck"\]', final, re.M)
    assert re.search(
        r'^ENTRYPOINT \["/usr/bin/tini", "--", "/usr/local/bin/facestage-entrypoint"\]', final, re.M
    )
    assert "FACESTAGE_MODEL_DIR=/models" in final
    # No compilers in the final stage; they are only in the builder.
    assert not re.search(
        r"build-essential|\bgcc\b(?! \|\|)|g\+\+(?! ;)|-dev\b",
        final.replace("command -v gcc", "").replace("command -v g++", ""),
    )
    assert "build-essential" in "\n".join(stages[0][1])


def test_gpu_image_swaps_onnxruntime_for_onnxruntime_gpu() -> None:
    args = args_of(DOCKER / "Dockerfile")
    assert args["ONNXRUNTIME_DIST"] == "onnxruntime-gpu"
    assert args["PYTHON"] in {"python3.11", "python3.12"}
    reqs = subprocess.run(
        [
            sys.executable,
            str(DOCKER / "runtime-requirements.py"),
            str(ROOT / "pyproject.toml"),
            "--onnxruntime",
            "onnxruntime-gpu",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in reqs}
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names
    assert "opencv-python-headless" in names and "opencv-python" not in names
    assert "grpcio-health-checking" in names


@pytest.mark.parametrize("name", ["Dockerfile.dockerignore", "Dockerfile.cpu.dockerignore"])
def test_context_filter_is_an_allow_list(name: str) -> None:
    lines = [x for x in (DOCKER / name).read_text().splitlines() if x and not x.startswith("#")]
    assert lines[0] == "*"
    allowed = {x[1:] for x in lines if x.startswith("!")}
    assert {"pyproject.toml", "facestage", "services", "orchestrator"} <= allowed
    for copied in re.findall(r"COPY --chmod=\d+ (\S+)", (DOCKER / "Dockerfile").read_text()):
        assert copied in allowed, copied
    assert "deploy/docker/runtime-requirements.py" in allowed


# ------------------------------------------------------------------ entrypoint
@pytest.fixture
def stub_path(tmp_path: Path) -> Path:
    """A PATH whose facestage executables print their name and arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for exe in (
        "facestage",
        "facestage-detector",
        "facestage-embedder",
        "facestage-swapper",
        "facestage-enhancer",
        "facestage-healthcheck",
    ):
        script = bin_dir / exe
        script.write_text(f'#!/bin/sh\necho "{exe} $*"\n')
        script.chmod(0o755)
    return bin_dir


def entrypoint(stub_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {"PATH": f"{stub_path}:/usr/bin:/bin", **env}
    return subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("stage", ["detector", "embedder", "swapper", "enhancer"])
def test_entrypoint_runs_a_stage(stub_path: Path, stage: str) -> None:
    out = entrypoint(stub_path, stage, "--port", "50061")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"facestage-{stage} --port 50061"


def test_entrypoint_runs_the_orchestrator(stub_path: Path) -> None:
    out = entrypoint(stub_path, "orchestrator", "--port=50050")
    assert out.stdout.strip() == "facestage serve --port=50050"


def test_entrypoint_pulls_models_one_by_one(stub_path: Path) -> None:
    out = entrypoint(stub_path, "pull-models", "det_10g", "gfpgan_1.4", FACESTAGE_MODEL_DIR="/m")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "facestage models pull --no-progress det_10g --cache-dir /m",
        "facestage models pull --no-progress gfpgan_1.4 --cache-dir /m",
    ]
    out = entrypoint(stub_path, "pull-models", "det_10g", FACESTAGE_ALLOW_UNPINNED_MODELS="1")
    assert out.stdout.splitlines() == [
        "facestage models pull --no-progress --allow-unpinned det_10g --cache-dir /models"
    ]


def test_entrypoint_refuses_unknown_roles(stub_path: Path) -> None:
    assert entrypoint(stub_path, "swapperr").returncode == 64
    assert entrypoint(stub_path).returncode == 64
    assert entrypoint(stub_path, "pull-models").returncode == 64


# ------------------------------------------------------------------ health check
def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "facestage_healthcheck", DOCKER / "healthcheck.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_finds_the_port() -> None:
    hc = load_healthcheck()
    tini = ["/usr/bin/tini", "--", "/usr/local/bin/facestage-entrypoint"]
    assert hc.resolve_port(None, {}, [*tini, "swapper"]) == 50051
    assert hc.resolve_port(None, {}, [*tini, "orchestrator"]) == 50050
    assert hc.resolve_port(None, {"FACESTAGE_SWAPPER_PORT": "6000"}, [*tini, "swapper"]) == 6000
    assert hc.resolve_port(None, {}, [*tini, "detector", "--port", "7000"]) == 7000
    assert hc.resolve_port(None, {}, [*tini, "orchestrator", "--port=7001"]) == 7001
    assert hc.resolve_port(None, {"FACESTAGE_HEALTHCHECK_PORT": "7002"}, []) == 7002
    assert hc.resolve_port(7003, {"FACESTAGE_HEALTHCHECK_PORT": "7002"}, []) == 7003


HealthServer = tuple[health.HealthServicer, int]


@pytest.fixture
def health_server() -> Iterator[HealthServer]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(grace=None).wait()


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DOCKER / "healthcheck.py"), "--port", str(port), "--timeout", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ},
    )


def test_healthcheck_against_a_real_server(health_server: HealthServer) -> None:
    servicer, port = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    out = run_healthcheck(port)
    assert out.returncode == 1 and "NOT_SERVING" in out.stderr
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    out = run_healthcheck(port)
    assert out.returncode == 0, out.stderr
    assert "SERVING" in out.stdout


def test_healthcheck_fails_when_nothing_listens() -> None:
    out = subprocess.run(
        [sys.executable, str(DOCKER / "healthcheck.py"), "--port", "1", "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr
