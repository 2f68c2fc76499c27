"""Pipeline benchmark: the full local suite against the same models in one process.

1. Generates a 720p test video (t1.jpg moving and scaling, AAC audio) with PyAV.
2. Suite: detector, embedder and swapper as separate processes, the orchestrator as a
   process (``facestage serve``), the video sent through ``SwapVideo``. Frames per second
   from the first byte sent to the last byte received.
3. In-process: the same frames through the same models in this process, no gRPC,
   sequentially (decode, detect, align, swap, paste back, encode, frame by frame).
4. Prints both rates and their ratio (target >= 1.0: the suite's stages overlap), the
   bytes sent to the stages per frame against the raw frame (target < 5 %), and the
   orchestrator's peak resident memory on a short and a long video (target: no growth
   with length, within 20 %).

    python bench/pipeline.py                      # 10 s and 120 s videos
    python bench/pipeline.py --long-seconds 30    # quicker

The swapper and embedder are the project's contract fixtures unless real models are
given (the fixture's cost is not inswapper's: say so next to any figure).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from facestage.alignment import align_face, box_mask, paste_back  # noqa: E402
from facestage.common.v1 import common_pb2  # noqa: E402
from facestage.local_suite import StageProcess, local_stages, start_orchestrator  # noqa: E402
from facestage.runtime import open_session  # noqa: E402
from facestage.swap.v1 import swap_pb2, swap_pb2_grpc  # noqa: E402
from orchestrator.video import VideoWriter, iter_frames, probe  # noqa: E402
from services.detector.model import DetectionOptions, load_detector  # noqa: E402
from services.embedder.model import Embedder, normalize_embeddings  # noqa: E402
from services.swapper.model import Swapper  # noqa: E402
from tests.media import make_test_video  # noqa: E402
from tests.metric_names import exported_families, scrape  # noqa: E402

SHARED = ROOT.parent / "shared" / "models"


def photo() -> np.ndarray:
    import insightface

    frame = cv2.imread(str(Path(insightface.__file__).parent / "data/images/t1.jpg"))
    assert frame is not None
    return frame


def source_jpeg() -> bytes:
    from skimage import data

    ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(data.astronaut()[..., ::-1]))
    assert ok
    return bytes(jpeg.tobytes())


@contextlib.contextmanager
def orchestrator_process(targets: dict[str, str], log_dir: Path) -> Iterator[StageProcess]:
    """``facestage serve`` as its own process, so its memory is its own."""
    orchestrator = start_orchestrator(targets, log_dir=log_dir)
    try:
        orchestrator.wait_serving(120)
        yield orchestrator
    finally:
        orchestrator.stop()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def swap_video(address: str, video: Path, output: Path) -> tuple[float, int]:
    """Sends the video through SwapVideo; returns (seconds, frames)."""

    def requests() -> Iterator[swap_pb2.SwapVideoRequest]:
        yield swap_pb2.SwapVideoRequest(
            config=swap_pb2.SwapVideoConfig(
                source_images=[common_pb2.Image(encoded=source_jpeg())],
                target_size_bytes=video.stat().st_size,
            )
        )
        with video.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                yield swap_pb2.SwapVideoRequest(chunk=chunk)

    options = [("grpc.max_receive_message_length", 1 << 28)]
    frames = 0
    with grpc.insecure_channel(address, options=options) as channel, output.open("wb") as out:
        stub = swap_pb2_grpc.FaceSwapServiceStub(channel)
        started = time.perf_counter()
        for reply in stub.SwapVideo(requests(), timeout=3600):
            kind = reply.WhichOneof("message")
            if kind == "result":
                frames = reply.result.frames_total
            elif kind == "chunk":
                out.write(reply.chunk)
        return time.perf_counter() - started, frames


def in_process(video: Path, output: Path, models: dict[str, str]) -> tuple[float, int]:
    """The same work in this process, sequentially, no gRPC; returns (seconds, frames)."""
    detector = load_detector(open_session(Path(models["detector"]), ["cpu"]))
    embedder = Embedder(open_session(Path(models["embedder"]), ["cpu"]))
    swapper = Swapper(open_session(Path(models["swapper"]), ["cpu"]))
    mask = box_mask(128)
    started = time.perf_counter()
    source = cv2.imdecode(np.frombuffer(source_jpeg(), np.uint8), cv2.IMREAD_COLOR)
    face = detector.detect([source], DetectionOptions())[0][0]
    crop = align_face(source, face.landmarks, embedder.template, embedder.crop_size_px).crop
    identity = normalize_embeddings(embedder.embed(crop[None]))
    frames = 0
    with VideoWriter(output, target=video) as writer:
        for frame in iter_frames(video):
            frame = np.array(frame, copy=True)
            for target in detector.detect([frame], DetectionOptions())[0]:
                aligned = align_face(frame, target.landmarks, swapper.template, 128)
                swapped = swapper.swap(aligned.crop[None], identity)[0]
                paste_back(frame, swapped, aligned.matrix, mask)
            writer.write(frame)
            frames += 1
    return time.perf_counter() - started, frames


def stage_bytes(metrics_port: int) -> float:
    families = exported_families(scrape(f"http://127.0.0.1:{metrics_port}/metrics"))
    return sum(v for _, v in families.get("facestage_orchestrator_stage_bytes_sent", []))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--detector-model", default=str(SHARED / "scrfd_500m_bnkps.onnx"))
    parser.add_argument("--embedder-model", default="")
    parser.add_argument("--swapper-model", default="")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--short-seconds", type=float, default=10.0)
    parser.add_argument("--long-seconds", type=float, default=120.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = {
            "detector": args.detector_model,
            "embedder": args.embedder_model,
            "swapper": args.swapper_model,
        }
        if not (models["embedder"] and models["swapper"]):
            from facestage.fixtures import write_contract_fixtures

            fixtures = write_contract_fixtures(tmp / "fixtures")
            models["embedder"] = models["embedder"] or str(fixtures["arcface"])
            models["swapper"] = models["swapper"] or str(fixtures["inswapper"])
        print(f"models: {', '.join(f'{k}={Path(v).name}' for k, v in models.items())}")
        videos = {}
        for name, seconds in (("short", args.short_seconds), ("long", args.long_seconds)):
            videos[name] = make_test_video(
                tmp / f"{name}.mp4",
                frame_source=photo(),
                seconds=seconds,
                fps=args.fps,
                size=(args.width, args.height),
            )
        raw_frame = args.width * args.height * 3
        with local_stages(
            models, extra_args={s: ["--providers", "cpu"] for s in models}, log_dir=tmp
        ) as stages:
            targets = {stage: p.address for stage, p in stages.items()}
            peaks = {}
            for name in ("short", "long"):
                with orchestrator_process(targets, tmp) as orchestrator:
                    seconds, frames = swap_video(
                        orchestrator.address, videos[name], tmp / f"{name}-out.mp4"
                    )
                    sent = stage_bytes(orchestrator.metrics_port)
                    peaks[name] = peak_rss_mb(orchestrator.process.pid)
                if name == "short":
                    suite_fps = frames / seconds
                    print(f"suite:      {frames} frames in {seconds:.1f} s = {suite_fps:.2f} fps")
                    print(
                        f"bytes sent to stages per frame: {sent / frames / 1024:.1f} KiB = "
                        f"{100 * sent / frames / raw_frame:.2f} % of a raw "
                        f"{args.width}x{args.height} frame"
                    )
                print(
                    f"orchestrator peak RSS, {name} video "
                    f"({probe(videos[name]).duration_s:.0f} s): {peaks[name]:.0f} MiB"
                )
        seconds, frames = in_process(videos["short"], tmp / "inproc.mp4", models)
        inproc_fps = frames / seconds
        print(f"in-process: {frames} frames in {seconds:.1f} s = {inproc_fps:.2f} fps")
        print(f"ratio suite / in-process: {suite_fps / inproc_fps:.2f} (target >= 1.0)")
        print(f"peak memory long / short: {peaks['long'] / peaks['short']:.2f} (target <= 1.2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
