"""Throughput of each stage service, items per second at batch 1 and at a larger batch.

Each stage runs as its own process (``python -m services.<stage>``) on loopback; a client
sends calls of 1 item, then of ``--batch`` items, back to back, for ``--seconds`` each,
and prints items per second. Also prints the rate with ``--concurrency`` clients sending
single items at once, which the server's dynamic batcher merges.

    python bench/stages.py                     # real SCRFD + MobileFaceNet, fixtures for the rest
    python bench/stages.py --detector-model det_10g --swapper-model inswapper_128 ...

Fixture models measure the serving path (decode, batching, gRPC), not production model
cost: say which model a figure comes from.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from facestage.common.v1 import common_pb2  # noqa: E402
from facestage.detector.v1 import detector_pb2, detector_pb2_grpc  # noqa: E402
from facestage.embedder.v1 import embedder_pb2, embedder_pb2_grpc  # noqa: E402
from facestage.enhancer.v1 import enhancer_pb2, enhancer_pb2_grpc  # noqa: E402
from facestage.imaging import encode_raw  # noqa: E402
from facestage.local_suite import start_stage  # noqa: E402
from facestage.swapper.v1 import swapper_pb2, swapper_pb2_grpc  # noqa: E402

SHARED = ROOT.parent / "shared" / "models"


def t1() -> np.ndarray:
    import insightface

    frame = cv2.imread(str(Path(insightface.__file__).parent / "data/images/t1.jpg"))
    assert frame is not None
    return frame


def requests_for(stage: str, batch: int) -> tuple[Any, Callable[[Any], Any]]:
    """(stub class, function making a request of ``batch`` items)."""
    rng = np.random.default_rng(0)
    if stage == "detector":
        _, jpeg = cv2.imencode(".jpg", t1())
        image = common_pb2.Image(encoded=jpeg.tobytes())
        return detector_pb2_grpc.DetectorServiceStub, lambda stub: stub.DetectFaces(
            detector_pb2.DetectFacesRequest(images=[image] * batch), timeout=600
        )
    if stage == "embedder":
        crop = encode_raw(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
        face = embedder_pb2.FaceToEmbed(aligned_crop=crop)
        return embedder_pb2_grpc.EmbedderServiceStub, lambda stub: stub.EmbedFaces(
            embedder_pb2.EmbedFacesRequest(faces=[face] * batch), timeout=600
        )
    if stage == "swapper":
        crop = encode_raw(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
        source = common_pb2.Embedding(values=rng.normal(size=512).tolist())
        return swapper_pb2_grpc.SwapperServiceStub, lambda stub: stub.SwapFaces(
            swapper_pb2.SwapFacesRequest(target_crops=[crop] * batch, source_embeddings=[source]),
            timeout=600,
        )
    crop = encode_raw(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8))
    return enhancer_pb2_grpc.EnhancerServiceStub, lambda stub: stub.EnhanceFaces(
        enhancer_pb2.EnhanceFacesRequest(crops=[crop] * batch), timeout=600
    )


def sequential_rate(address: str, stage: str, batch: int, seconds: float) -> float:
    stub_cls, call = requests_for(stage, batch)
    options = [
        ("grpc.max_send_message_length", 1 << 28),
        ("grpc.max_receive_message_length", 1 << 28),
    ]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = stub_cls(channel)
        call(stub)  # warm
        items, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            call(stub)
            items += batch
        return items / (time.perf_counter() - started)


async def concurrent_rate(address: str, stage: str, clients: int, seconds: float) -> float:
    aio_stub_cls = {
        "detector": detector_pb2_grpc.DetectorServiceStub,
        "embedder": embedder_pb2_grpc.EmbedderServiceStub,
        "swapper": swapper_pb2_grpc.SwapperServiceStub,
        "enhancer": enhancer_pb2_grpc.EnhancerServiceStub,
    }[stage]
    _, make = requests_for(stage, 1)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = aio_stub_cls(channel)
        deadline = time.perf_counter() + seconds
        counts = [0] * clients

        async def client(i: int) -> None:
            while time.perf_counter() < deadline:
                await make(stub)
                counts[i] += 1

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        return sum(counts) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--detector-model", default=str(SHARED / "scrfd_2.5g_bnkps.onnx"))
    parser.add_argument("--embedder-model", default=str(SHARED / "mobilefacenet_128.onnx"))
    parser.add_argument("--swapper-model", default="")
    parser.add_argument("--enhancer-model", default="")
    parser.add_argument("--batch", type=int, default=16, help="the larger batch (default 16)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--stages", default="detector,embedder,swapper,enhancer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            "detector": args.detector_model,
            "embedder": args.embedder_model,
            "swapper": args.swapper_model,
            "enhancer": args.enhancer_model,
        }
        if not (models["swapper"] and models["enhancer"]):
            from facestage.fixtures import write_contract_fixtures

            fixtures = write_contract_fixtures(Path(tmp))
            models["swapper"] = models["swapper"] or str(fixtures["inswapper"])
            models["enhancer"] = models["enhancer"] or str(fixtures["gfpgan"])
        print(
            f"{'stage':<9} {'model':<32} {'batch 1':>10} {f'batch {args.batch}':>10} "
            f"{f'{args.concurrency}x1 conc':>12}  (items/s)"
        )
        for stage in args.stages.split(","):
            process = start_stage(
                stage,  # type: ignore[arg-type]
                models[stage],
                extra_args=["--providers", "cpu", "--max-batch-size", str(max(args.batch, 16))],
                log_dir=Path(tmp),
            )
            try:
                process.wait_serving(120)
                one = sequential_rate(process.address, stage, 1, args.seconds)
                many = sequential_rate(process.address, stage, args.batch, args.seconds)
                conc = asyncio.run(
                    concurrent_rate(process.address, stage, args.concurrency, args.seconds)
                )
            finally:
                process.stop()
            print(
                f"{stage:<9} {Path(models[stage]).name:<32} {one:>10.1f} {many:>10.1f} "
                f"{conc:>12.1f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
