"""End to end with real processes: the four stage services as subprocesses (real SCRFD,
contract fixtures for embedder, swapper and enhancer), the orchestrator as a process in
front (``facestage serve``), clients in other processes, videos generated from t1.jpg.

The fixtures are plumbing, not a face swapper: what is checked is what a user of the
platform would notice (frames, timing, audio, where pixels change, status codes, files
left behind), not what the swapped faces look like."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from facestage.common.v1 import common_pb2
from facestage.local_suite import StageProcess, local_stages
from facestage.local_suite import start_orchestrator as launch_orchestrator
from facestage.runtime import open_session
from facestage.swap.v1 import swap_pb2, swap_pb2_grpc
from orchestrator.video import VideoWriter, iter_frames, probe
from services.detector.model import DetectionOptions, load_detector
from tests.media import make_test_video, stream_duration_s
from tests.metric_names import documented_names, exported_families, family_name, scrape

pytestmark = [pytest.mark.shared_models, pytest.mark.slow]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def models(scrfd_2_5g_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from facestage.fixtures import write_contract_fixtures

    fixtures = write_contract_fixtures(tmp_path_factory.mktemp("e2e-fixtures"))
    return {
        "detector": scrfd_2_5g_path,
        "embedder": fixtures["arcface"],
        "swapper": fixtures["inswapper"],
        "enhancer": fixtures["gfpgan"],
    }


@pytest.fixture(scope="module")
def stages(
    models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, StageProcess]]:
    with local_stages(
        models,  # type: ignore[arg-type]
        extra_args={stage: ["--providers", "cpu"] for stage in models},  # type: ignore[misc]
        log_dir=tmp_path_factory.mktemp("e2e-logs"),
    ) as processes:
        yield processes  # type: ignore[misc]


def start_orchestrator(
    stages: dict[str, StageProcess], spool: Path, log_dir: Path, **extra: str
) -> StageProcess:
    """``facestage serve`` (the console script's code) in front of ``stages``, SERVING."""
    flags = ["--spool-dir", str(spool), "--call-timeout-s", "20"]
    flags += [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]
    orchestrator = launch_orchestrator(
        {stage: p.address for stage, p in stages.items()}, extra_args=flags, log_dir=log_dir
    )
    try:
        orchestrator.wait_serving(120)
    except BaseException:
        orchestrator.stop()
        raise
    return orchestrator


@pytest.fixture(scope="module")
def orchestrator(
    stages: dict[str, StageProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[StageProcess, Path]]:
    spool = tmp_path_factory.mktemp("spool")
    process = start_orchestrator(stages, spool, tmp_path_factory.mktemp("orch-logs"))
    try:
        yield process, spool
    finally:
        assert process.stop() == 0, process.log_tail()


def astronaut_jpeg(path: Path) -> Path:
    from skimage import data

    cv2.imwrite(str(path), np.ascontiguousarray(data.astronaut()[..., ::-1]))
    return path


def video_requests(
    video: Path, source: Path, chunk: int = 256 * 1024
) -> Iterator[swap_pb2.SwapVideoRequest]:
    yield swap_pb2.SwapVideoRequest(
        config=swap_pb2.SwapVideoConfig(
            source_images=[common_pb2.Image(encoded=source.read_bytes())],
            target_size_bytes=video.stat().st_size,
        )
    )
    data = video.read_bytes()
    for start in range(0, len(data), chunk):
        yield swap_pb2.SwapVideoRequest(chunk=data[start : start + chunk])


def face_masks(frames: list[np.ndarray], detector_path: Path) -> tuple[list, list]:
    """Per frame: a mask inside the faces (shrunk boxes) and one far from any face."""
    detector = load_detector(open_session(detector_path, ["cpu"]))
    inside, far = [], []
    for frame in frames:
        faces = detector.detect([frame], DetectionOptions())[0]
        near = np.zeros(frame.shape[:2], dtype=bool)
        core = np.zeros(frame.shape[:2], dtype=bool)
        for face in faces:
            x0, y0, x1, y1 = face.box
            w, h = x1 - x0, y1 - y0
            core[int(y0 + 0.3 * h) : int(y1 - 0.2 * h), int(x0 + 0.25 * w) : int(x1 - 0.25 * w)] = 1
            near[max(int(y0 - h), 0) : int(y1 + h), max(int(x0 - w), 0) : int(x1 + w)] = 1
        inside.append(core)
        far.append(~near)
    return inside, far


def test_video_through_the_suite_keeps_frames_timing_audio_and_changes_only_faces(
    orchestrator: tuple[StageProcess, Path], models: dict[str, Path], tmp_path: Path
) -> None:
    process, spool = orchestrator
    video = make_test_video(
        tmp_path / "in.mp4",
        frame_source=cv2.imread(str(_t1())),
        seconds=2.4,
        fps=25,
        size=(480, 320),
        audio=True,
    )
    source = astronaut_jpeg(tmp_path / "source.jpg")
    output = tmp_path / "out.mp4"
    progress: list[int] = []
    with grpc.insecure_channel(process.address) as channel, output.open("wb") as out:
        stub = swap_pb2_grpc.FaceSwapServiceStub(channel)
        for reply in stub.SwapVideo(video_requests(video, source), timeout=600):
            kind = reply.WhichOneof("message")
            if kind == "progress":
                progress.append(reply.progress.frames_done)
            elif kind == "chunk":
                out.write(reply.chunk)
    before, after = probe(video), probe(output)
    assert after.frame_count == before.frame_count == 60
    assert after.fps == before.fps
    assert abs(after.duration_s - before.duration_s) <= 1 / 25 + 1e-6
    assert after.has_audio and after.audio_codec == "aac"
    assert abs(stream_duration_s(output, "audio") - stream_duration_s(video, "audio")) < 0.05
    assert progress == sorted(progress) and progress[-1] == 60
    frames_in = list(iter_frames(video))
    frames_out = list(iter_frames(output))
    inside, far = face_masks(frames_in, models["detector"])
    changed = [
        float(np.abs(a.astype(int) - b.astype(int))[m].mean())
        for a, b, m in zip(frames_in, frames_out, inside, strict=True)
        if m.any()
    ]
    untouched = [
        float(np.abs(a.astype(int) - b.astype(int))[m].mean())
        for a, b, m in zip(frames_in, frames_out, far, strict=True)
        if m.any()
    ]
    # Codec noise: the same frames re-encoded with no swap at all, at the same quality.
    baseline = tmp_path / "reencoded.mp4"
    with VideoWriter(baseline, target=video) as writer:
        for frame in frames_in:
            writer.write(frame)
    noise = [
        float(np.abs(a.astype(int) - b.astype(int))[m].mean())
        for a, b, m in zip(frames_in, iter_frames(baseline), far, strict=True)
        if m.any()
    ]
    assert len(changed) >= 50  # faces found in nearly every frame
    assert min(changed) > 8.0, f"faces not changed: {min(changed):.1f}"
    assert max(untouched) <= max(noise) + 0.5, (max(untouched), max(noise))
    assert np.mean(untouched) <= np.mean(noise) * 1.1 + 0.1, (np.mean(untouched), np.mean(noise))
    assert list(spool.iterdir()) == []
    # The orchestrator exports every documented orchestrator metric.
    families = exported_families(scrape(f"http://127.0.0.1:{process.metrics_port}/metrics"))
    names = documented_names()["Orchestrator"] + [
        "facestage_requests_total",
        "facestage_request_duration_seconds",
    ]
    assert [n for n in names if family_name(n) not in families] == []


def _t1() -> Path:
    import insightface

    return Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"


def test_swap_image_from_a_separate_client_process(
    orchestrator: tuple[StageProcess, Path], tmp_path: Path
) -> None:
    process, _ = orchestrator
    source = astronaut_jpeg(tmp_path / "source.jpg")
    output = tmp_path / "swapped.png"
    client = textwrap.dedent(
        f"""
        import grpc
        from facestage.common.v1 import common_pb2
        from facestage.swap.v1 import swap_pb2, swap_pb2_grpc
        with grpc.insecure_channel({process.address!r}) as channel:
            stub = swap_pb2_grpc.FaceSwapServiceStub(channel)
            reply = stub.SwapImage(swap_pb2.SwapImageRequest(
                source_images=[common_pb2.Image(encoded=open({str(source)!r}, "rb").read())],
                target_image=common_pb2.Image(encoded=open({str(_t1())!r}, "rb").read()),
                output_format=common_pb2.IMAGE_FORMAT_PNG), timeout=120)
            open({str(output)!r}, "wb").write(reply.image.encoded)
            print(len(reply.target_faces), len(reply.swapped_face_indices))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", client], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["6", "6"]
    swapped = cv2.imread(str(output))
    original = cv2.imread(str(_t1()))
    assert swapped.shape == original.shape
    assert np.abs(swapped.astype(int) - original.astype(int)).mean() > 0.5


def test_killed_stage_fails_the_job_with_unavailable_and_leaves_nothing(
    stages: dict[str, StageProcess], models: dict[str, Path], tmp_path: Path
) -> None:
    from facestage.local_suite import start_stage

    # A swapper of this test's own, so killing it leaves the shared suite alone.
    swapper = start_stage(
        "swapper", models["swapper"], log_dir=tmp_path, extra_args=["--providers", "cpu"]
    )
    swapper.wait_serving(60)
    spool = tmp_path / "spool"
    spool.mkdir()
    own = {**stages, "swapper": swapper}
    orchestrator = start_orchestrator(own, spool, tmp_path, call_timeout_s="5")
    video = make_test_video(
        tmp_path / "in.mp4", frame_source=cv2.imread(str(_t1())), seconds=4, fps=25, size=(480, 320)
    )
    source = astronaut_jpeg(tmp_path / "source.jpg")
    try:
        with grpc.insecure_channel(orchestrator.address) as channel:
            stub = swap_pb2_grpc.FaceSwapServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                for reply in stub.SwapVideo(video_requests(video, source), timeout=300):
                    if reply.WhichOneof("message") == "progress" and swapper.process.poll() is None:
                        swapper.process.kill()
                    assert reply.WhichOneof("message") != "chunk", "output of a failed job"
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "swapper" in (caught.value.details() or "")
        deadline = time.monotonic() + 10
        while list(spool.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(spool.iterdir()) == []
    finally:
        swapper.stop()
        assert orchestrator.stop() == 0, orchestrator.log_tail()


def test_facestage_swap_cli_turns_a_video_into_a_playable_mp4(
    models: dict[str, Path], tmp_path: Path
) -> None:
    video = make_test_video(
        tmp_path / "in.mp4",
        frame_source=cv2.imread(str(_t1())),
        seconds=2,
        fps=25,
        size=(320, 240),
        audio=True,
    )
    source = astronaut_jpeg(tmp_path / "source.jpg")
    output = tmp_path / "out.mp4"
    result = subprocess.run(
        [
            str(BIN / "facestage"),
            "swap",
            "--source",
            str(source),
            "--target",
            str(video),
            "--output",
            str(output),
            "--enhance",
            *[f"--{stage}-model={path}" for stage, path in models.items()],
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "FACESTAGE_DETECTOR_PROVIDERS": "cpu",
            "FACESTAGE_EMBEDDER_PROVIDERS": "cpu",
            "FACESTAGE_SWAPPER_PROVIDERS": "cpu",
            "FACESTAGE_ENHANCER_PROVIDERS": "cpu",
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = probe(output)
    assert info.frame_count == 50 and info.has_audio and info.codec == "h264"
    assert "50 frames" in result.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_facestage_swap_without_models_names_the_pull_command(tmp_path: Path) -> None:
    source = astronaut_jpeg(tmp_path / "source.jpg")
    result = subprocess.run(
        [
            str(BIN / "facestage"),
            "swap",
            "--source",
            str(source),
            "--target",
            str(source),
            "--output",
            str(tmp_path / "out.png"),
            "--model-dir",
            str(tmp_path / "empty"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "facestage models pull det_10g w600k_r50 inswapper_128" in result.stderr
    assert not (tmp_path / "out.png").exists()
