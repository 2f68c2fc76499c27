"""Each stage as a real process started from its console script: SERVING, reflection,
/metrics with every documented name, clean start-up failures, graceful drain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from facestage.common.v1 import common_pb2
from facestage.detector.v1 import detector_pb2, detector_pb2_grpc
from facestage.local_suite import StageProcess, free_port, start_stage
from facestage.types import Stage
from tests.metric_names import documented_names, exported_families, family_name, scrape

BIN = Path(sys.executable).parent
SERVICES = {
    "detector": "facestage.detector.v1.DetectorService",
    "embedder": "facestage.embedder.v1.EmbedderService",
    "swapper": "facestage.swapper.v1.SwapperService",
    "enhancer": "facestage.enhancer.v1.EnhancerService",
}


def start_script(stage: Stage, model: Path, tmp_path: Path) -> StageProcess:
    """Starts ``facestage-<stage>`` (the console script) on free loopback ports."""
    port, metrics_port = free_port(), free_port()
    log_path = tmp_path / f"{stage}.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [
            str(BIN / f"facestage-{stage}"),
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--metrics-host",
            "127.0.0.1",
            "--providers",
            "cpu",
            "--drain-grace-s",
            "3",
            "--drain-notice-s",
            "0.2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return StageProcess(stage, str(model), "127.0.0.1", port, metrics_port, process, log_path, log)


def reflection_services(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        return [s.name for reply in replies for s in reply.list_services_response.service]


def check_metrics(process: StageProcess) -> None:
    families = exported_families(scrape(f"http://127.0.0.1:{process.metrics_port}/metrics"))
    sections = documented_names()
    stage_names = (
        sections["Served requests (every process, from the one interceptor)"]
        + sections["Inference (stage services)"]
    )
    missing = [n for n in stage_names if family_name(n) not in families]
    assert not missing, f"{process.stage} does not export {missing}"
    for name in stage_names:
        labels = [labels for labels, _ in families[family_name(name)]]
        assert labels and all(lab.get("stage") == process.stage for lab in labels), name
    # No NVIDIA GPU here: the gauge says so and no per-GPU series pretends otherwise.
    assert families["facestage_gpu_available"][0][1] == 0.0
    for name in sections["GPU (every process, read from NVML at scrape time)"]:
        if name != "facestage_gpu_available":
            assert not families.get(name), f"{name} exported without a GPU"
    assert families["facestage_serving"][0][1] == 1.0


@pytest.mark.shared_models
def test_every_stage_starts_from_its_console_script(
    tmp_path: Path, scrfd_2_5g_path: Path, contract_fixtures: dict[str, Path], t1_jpeg: bytes
) -> None:
    models = {
        "detector": scrfd_2_5g_path,
        "embedder": contract_fixtures["arcface"],
        "swapper": contract_fixtures["inswapper"],
        "enhancer": contract_fixtures["gfpgan"],
    }
    processes = {stage: start_script(stage, model, tmp_path) for stage, model in models.items()}
    try:
        for process in processes.values():
            process.wait_serving(120)
        for stage, process in processes.items():
            assert SERVICES[stage] in reflection_services(process.address)
            assert "grpc.health.v1.Health" in reflection_services(process.address)
        with grpc.insecure_channel(processes["detector"].address) as channel:
            stub = detector_pb2_grpc.DetectorServiceStub(channel)
            reply = stub.DetectFaces(
                detector_pb2.DetectFacesRequest(images=[common_pb2.Image(encoded=t1_jpeg)]),
                timeout=30,
            )
            assert len(reply.results[0].faces) == 6
        for stage, process in processes.items():
            if stage != "detector":  # one call each, so per-method series exist
                with grpc.insecure_channel(process.address) as channel:
                    reply_bytes = channel.unary_unary(
                        f"/{SERVICES[stage]}/GetModelInfo",
                        request_serializer=lambda _: b"",
                        response_deserializer=lambda data: data,
                    )(None, timeout=10)
                    assert len(reply_bytes) > 64  # a ModelInfo with a sha256 in it
            check_metrics(process)
    finally:
        codes = {stage: process.stop(20) for stage, process in processes.items()}
    # SIGTERM drains and exits cleanly.
    assert codes == dict.fromkeys(models, 0), {s: p.log_tail() for s, p in processes.items()}


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "not found"), (b"", "empty"), (b"\x08\x01garbage that is not an onnx graph", "")],
    ids=["missing", "empty", "corrupt"],
)
def test_bad_model_file_exits_non_zero_naming_file_and_pull_command(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    model = tmp_path / "w600k_r50.onnx"
    if content is not None:
        model.write_bytes(content)
    process = start_stage("embedder", model, log_dir=tmp_path, extra_args=["--providers", "cpu"])
    code = process.process.wait(60)
    output = process.log_tail()
    process.stop()
    assert code == 2, output
    assert str(model) in output
    assert "facestage models pull" in output
    assert problem in output
    assert "Traceback" not in output


def test_model_of_another_stage_is_refused_at_start(
    tmp_path: Path, contract_fixtures: dict[str, Path]
) -> None:
    process = start_stage("swapper", contract_fixtures["gfpgan"], log_dir=tmp_path)
    code = process.process.wait(60)
    output = process.log_tail()
    process.stop()
    assert code == 2, output
    assert str(contract_fixtures["gfpgan"]) in output
    assert "inswapper" in output


def test_unknown_model_name_says_how_to_list_models(tmp_path: Path) -> None:
    process = start_stage("detector", "no_such_model", log_dir=tmp_path)
    code = process.process.wait(60)
    output = process.log_tail()
    process.stop()
    assert code == 2
    assert "no_such_model" in output and "facestage models list" in output


def test_random_noise_is_not_a_model(tmp_path: Path) -> None:
    model = tmp_path / "noise.onnx"
    model.write_bytes(np.random.default_rng(0).bytes(4096))
    process = start_stage("enhancer", model, log_dir=tmp_path)
    assert process.process.wait(60) == 2
    output = process.log_tail()
    process.stop()
    assert str(model) in output and "facestage models pull" in output
