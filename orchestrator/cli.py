"""``facestage swap``, ``facestage serve`` and ``facestage up``.

``swap`` is a client of the public API: it starts (or reuses) the four stage services,
runs an orchestrator in-process on a loopback port, and calls ``SwapImage`` or
``SwapVideo`` through the generated stub, so the command line exercises exactly what
other backends call. Output files are written beside the destination and renamed into
place only when complete.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from facestage.errors import FacestageError, InvalidArgumentError, ModelFileError
from facestage.imaging import sniff_format
from facestage.types import Stage

if TYPE_CHECKING:
    from orchestrator.settings import OrchestratorSettings

DEFAULT_MODELS: dict[Stage, str] = {
    "detector": "det_10g",
    "embedder": "w600k_r50",
    "swapper": "inswapper_128",
    "enhancer": "gfpgan_1.4",
}
UPLOAD_CHUNK_BYTES = 1 << 20
_SELECTOR_MODES = ("many", "one", "reference")
_ORDERS = (
    "large-small",
    "small-large",
    "left-right",
    "right-left",
    "top-bottom",
    "bottom-top",
    "best-worst",
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def _add_stage_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "stages",
        "By default the four stage services start locally on free loopback ports with "
        "models from the cache of `facestage models pull`. Give HOST:PORT (or "
        "dns:///NAME:PORT) to use running services instead.",
    )
    for stage, model in DEFAULT_MODELS.items():
        group.add_argument(f"--{stage}", metavar="TARGET", help=f"running {stage} service")
        group.add_argument(
            f"--{stage}-model",
            metavar="PATH|NAME",
            default=model,
            help=f"{stage} model file or manifest name (default {model})",
        )
    group.add_argument(
        "--model-dir", type=Path, default=None, help="model cache (default $FACESTAGE_MODEL_DIR)"
    )
    group.add_argument(
        "--stage-start-timeout-s",
        type=float,
        default=180.0,
        help="how long to wait for local stages to report SERVING (default 180)",
    )


def _add_swap_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("face selection and blending (FaceFusion's semantics)")
    group.add_argument(
        "--selector",
        choices=_SELECTOR_MODES,
        default="many",
        help="which target faces to swap (default many)",
    )
    group.add_argument(
        "--order",
        choices=_ORDERS,
        default="large-small",
        help="face order for --selector one (default large-small)",
    )
    group.add_argument(
        "--position",
        type=int,
        default=0,
        help="--selector one: index of the face in --order (default 0)",
    )
    group.add_argument(
        "--reference", type=Path, help="--selector reference: image of the face to replace"
    )
    group.add_argument(
        "--reference-distance",
        type=float,
        default=0.3,
        help="--selector reference: largest identity distance 0..1 (default 0.3)",
    )
    group.add_argument(
        "--score-threshold",
        type=float,
        default=0.5,
        help="minimum detector score of a target face (default 0.5)",
    )
    group.add_argument(
        "--mask-blur",
        type=float,
        default=0.3,
        help="feathering of the face mask, 0..1 (default 0.3)",
    )
    group.add_argument(
        "--mask-padding",
        default="0,0,0,0",
        metavar="T,R,B,L",
        help="mask padding in percent per side (default 0,0,0,0)",
    )
    group.add_argument("--enhance", action="store_true", help="run the enhancer after swapping")
    group.add_argument(
        "--enhancer-blend",
        type=float,
        default=0.8,
        help="share of the enhanced face, 0..1 (default 0.8)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--quality",
        type=int,
        default=80,
        help="video quality 0..100, mapped to CRF (default 80 = CRF 18)",
    )
    out.add_argument("--fps", type=float, help="output frame rate (default: the target's)")
    out.add_argument("--width", type=int, help="output width in pixels (default: the target's)")
    out.add_argument("--height", type=int, help="output height (default: the target's)")
    out.add_argument("--codec", default="libx264", help="video encoder (default libx264)")
    out.add_argument("--container", default="", help="container (default from the extension)")
    out.add_argument("--no-audio", action="store_true", help="drop the target's audio")
    out.add_argument("--batch-size", type=int, default=8, help="frames per batch (default 8)")


def register_commands(subparsers: Any) -> None:
    """Adds ``swap``, ``serve`` and ``up`` to the ``facestage`` command."""
    swap = subparsers.add_parser(
        "swap",
        help="swap a source face into a target image or video",
        description="Swap the face of --source into --target and write --output. Starts the "
        "stage services locally unless their addresses are given.",
    )
    swap.add_argument(
        "--source",
        type=Path,
        action="append",
        required=True,
        help="photo of the source face (repeat to average several photos)",
    )
    swap.add_argument("--target", type=Path, required=True, help="target image or video")
    swap.add_argument("--output", type=Path, required=True, help="output file")
    swap.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_stage_flags(swap)
    _add_swap_options(swap)
    swap.set_defaults(handler=cmd_swap)

    serve = subparsers.add_parser(
        "serve",
        help="run the public API server (FaceSwapService) in front of running stages",
        description="All flags are the orchestrator's settings; `facestage serve --help` "
        "lists them (env FACESTAGE_ORCHESTRATOR_*).",
        add_help=False,
        prefix_chars="+",  # every -flag is the orchestrator settings' own, --help included
    )
    serve.set_defaults(handler=cmd_serve, pass_through=True, settings=[])

    up = subparsers.add_parser(
        "up",
        help="run the whole suite on this machine (four stages + orchestrator)",
        description="Starts the four stage services and the public API server and keeps "
        "them up until interrupted (Ctrl-C), printing their addresses.",
    )
    up.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=50050, help="public API port (default 50050)")
    up.add_argument(
        "--metrics-port",
        type=int,
        default=9100,
        help="orchestrator metrics port (default 9100; stages get free ports)",
    )
    up.add_argument("--no-enhancer", action="store_true", help="do not start the enhancer")
    _add_stage_flags(up)
    up.set_defaults(handler=cmd_up)


# --- shared --------------------------------------------------------------------------


def _err(message: str) -> None:
    print(f"facestage: error: {message}", file=sys.stderr, flush=True)


def _missing_models(models: dict[Stage, str], model_dir: Path | None) -> list[tuple[Stage, str]]:
    from facestage.model_store import resolve_verified_model

    missing = []
    for stage, model in models.items():
        try:
            resolve_verified_model(model, model_dir)
        except ModelFileError:
            missing.append((stage, model))
    return missing


def _check_models(models: dict[Stage, str], model_dir: Path | None) -> None:
    """One clear message for every model that is missing, naming the command to run."""
    missing = _missing_models(models, model_dir)
    if missing:
        names = " ".join(model for _, model in missing)
        listing = ", ".join(f"{stage}: {model}" for stage, model in missing)
        raise ModelFileError(
            listing,
            "not found in the model cache",
            f"fetch them with: facestage models pull {names} "
            "(or pass --<stage>-model PATH, or --<stage> HOST:PORT for running services)",
        )


@contextlib.contextmanager
def _stages(args: argparse.Namespace, needed: tuple[Stage, ...]) -> Iterator[dict[Stage, str]]:
    """Targets for the needed stages: given addresses, or local processes started now."""
    from facestage.local_suite import local_stages

    targets: dict[Stage, str] = {}
    to_start: dict[Stage, str] = {}
    for stage in needed:
        given = getattr(args, stage)
        if given:
            targets[stage] = given
        else:
            to_start[stage] = getattr(args, f"{stage}_model")
    if not to_start:
        yield targets
        return
    _check_models(to_start, args.model_dir)
    extra: dict[Stage, list[str]] = {
        stage: (["--model-dir", str(args.model_dir)] if args.model_dir else [])
        for stage in to_start
    }
    print(f"starting {', '.join(to_start)} on loopback ...", file=sys.stderr, flush=True)
    with local_stages(to_start, extra_args=extra, timeout_s=args.stage_start_timeout_s) as procs:
        yield {**targets, **{stage: proc.address for stage, proc in procs.items()}}


@contextlib.asynccontextmanager
async def _orchestrator(
    targets: dict[Stage, str], **overrides: Any
) -> AsyncIterator[tuple[Any, int]]:
    """An in-process orchestrator on a free loopback port; yields (server, port)."""
    from orchestrator.api import build_orchestrator
    from orchestrator.settings import OrchestratorSettings

    settings = OrchestratorSettings.model_validate(
        {
            "host": "127.0.0.1",
            "port": 0,
            "metrics_port": -1,
            "detector": targets["detector"],
            "embedder": targets["embedder"],
            "swapper": targets["swapper"],
            "enhancer": targets.get("enhancer", ""),
            **overrides,
        }
    )
    server, _clients = await build_orchestrator(settings)
    port = await server.start()
    await server.warm_up()
    try:
        yield server, port
    finally:
        await server.drain(0)


def _read_image(path: Path, field: str) -> Any:
    from facestage.common.v1 import common_pb2

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(field, f"cannot read {path}: {exc.strerror}") from exc
    return common_pb2.Image(encoded=data)


def _swap_options(args: argparse.Namespace) -> Any:
    from facestage.swap.v1 import swap_pb2

    try:
        top, right, bottom, left = (int(v) for v in args.mask_padding.split(","))
    except ValueError as exc:
        raise InvalidArgumentError("--mask-padding", "expected four integers T,R,B,L") from exc
    options = swap_pb2.SwapOptions(
        face_selector_mode=swap_pb2.FaceSelectorMode.Value(
            f"FACE_SELECTOR_MODE_{args.selector.upper()}"
        ),
        face_selector_order=swap_pb2.FaceSelectorOrder.Value(
            "FACE_SELECTOR_ORDER_" + args.order.upper().replace("-", "_")
        ),
        face_position=args.position,
        reference_face_distance=args.reference_distance,
        enhance=args.enhance,
        enhancer_blend=args.enhancer_blend,
        mask_blur=args.mask_blur,
        mask_padding=swap_pb2.MaskPadding(
            top_percent=top, right_percent=right, bottom_percent=bottom, left_percent=left
        ),
        detection_score_threshold=args.score_threshold,
    )
    if args.reference is not None:
        options.reference_face_image.CopyFrom(_read_image(args.reference, "--reference"))
    elif args.selector == "reference":
        raise InvalidArgumentError("--reference", "--selector reference needs --reference IMAGE")
    return options


def _is_image(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as fh:
            return sniff_format(fh.read(16)) is not None
    except OSError:
        return False


# --- swap ------------------------------------------------------------------------------


async def _swap_image(args: argparse.Namespace, stub: Any, options: Any) -> None:
    from facestage.common.v1 import common_pb2
    from facestage.swap.v1 import swap_pb2
    from orchestrator.tempfiles import atomic_output

    formats = {
        ".jpg": common_pb2.IMAGE_FORMAT_JPEG,
        ".jpeg": common_pb2.IMAGE_FORMAT_JPEG,
        ".webp": common_pb2.IMAGE_FORMAT_WEBP,
    }
    request = swap_pb2.SwapImageRequest(
        source_images=[_read_image(p, f"--source {p}") for p in args.source],
        target_image=_read_image(args.target, "--target"),
        options=options,
        output_format=formats.get(args.output.suffix.lower(), common_pb2.IMAGE_FORMAT_PNG),
    )
    reply = await stub.SwapImage(request)
    with atomic_output(args.output) as out:
        out.temp_path.write_bytes(reply.image.encoded)
    print(
        f"{args.output}: {len(reply.swapped_face_indices)} of {len(reply.target_faces)} "
        "faces swapped",
        file=sys.stderr,
    )


async def _upload(args: argparse.Namespace, options: Any, output: Any) -> AsyncIterator[Any]:
    from facestage.swap.v1 import swap_pb2

    size = args.target.stat().st_size
    yield swap_pb2.SwapVideoRequest(
        config=swap_pb2.SwapVideoConfig(
            source_images=[_read_image(p, f"--source {p}") for p in args.source],
            options=options,
            output=output,
            target_size_bytes=size,
        )
    )
    with args.target.open("rb") as fh:
        while chunk := await asyncio.to_thread(fh.read, UPLOAD_CHUNK_BYTES):
            yield swap_pb2.SwapVideoRequest(chunk=chunk)


async def _swap_video(args: argparse.Namespace, stub: Any, options: Any) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from facestage.swap.v1 import swap_pb2
    from orchestrator.tempfiles import atomic_output

    output = swap_pb2.VideoOutputOptions(
        quality=args.quality,
        video_codec=args.codec,
        container=args.container or args.output.suffix.lstrip(".").lower() or "mp4",
        keep_audio=not args.no_audio,
    )
    if args.fps:
        output.fps = args.fps
    if args.width:
        output.width_px = args.width
    if args.height:
        output.height_px = args.height
    progress = Progress(
        TextColumn("[bold]swapping"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("frames {task.fields[fps]:.1f} fps"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=args.no_progress or not sys.stderr.isatty(),
        transient=False,
    )
    task = progress.add_task("swap", total=None, fps=0.0)
    result = None
    with progress, atomic_output(args.output) as out, out.temp_path.open("wb") as fh:
        async for reply in stub.SwapVideo(_upload(args, options, output)):
            kind = reply.WhichOneof("message")
            if kind == "progress":
                p = reply.progress
                progress.update(
                    task, completed=p.frames_done, total=p.frames_total, fps=p.frames_per_second
                )
            elif kind == "result":
                result = reply.result
            elif kind == "chunk":
                fh.write(reply.chunk)
        if result is None:
            raise FacestageError("the server ended the job without a result")
    print(
        f"{args.output}: {result.frames_total} frames, {result.faces_swapped} faces swapped "
        f"in {result.frames_with_swaps} frames",
        file=sys.stderr,
    )


async def _run_swap(args: argparse.Namespace, targets: dict[Stage, str]) -> None:
    import grpc

    from facestage.swap.v1 import swap_pb2_grpc

    options = _swap_options(args)
    async with _orchestrator(targets, batch_size=args.batch_size) as (_, port):
        limit = 256 * 1024 * 1024
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}",
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
        ) as channel:
            stub = swap_pb2_grpc.FaceSwapServiceStub(channel)
            try:
                if _is_image(args.target):
                    await _swap_image(args, stub, options)
                else:
                    await _swap_video(args, stub, options)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name if exc.code() else "UNKNOWN"
                raise FacestageError(f"{code}: {exc.details()}") from None


def cmd_swap(args: argparse.Namespace) -> int:
    """``facestage swap``: one job, with local stages unless addresses are given."""
    if not args.target.is_file():
        _err(f"--target {args.target}: no such file")
        return 2
    for source in args.source:
        if not source.is_file():
            _err(f"--source {source}: no such file")
            return 2
    needed: tuple[Stage, ...] = ("detector", "embedder", "swapper")
    if args.enhance:
        needed += ("enhancer",)
    try:
        with _stages(args, needed) as targets:
            asyncio.run(_run_swap(args, targets))
    except FacestageError as exc:
        _err(str(exc))
        return 1
    return 0


# --- serve and up ----------------------------------------------------------------------


async def _serve(settings: OrchestratorSettings) -> None:
    from orchestrator.api import build_orchestrator

    server, _clients = await build_orchestrator(settings)
    await server.serve_forever()


def cmd_serve(args: argparse.Namespace) -> int:
    """``facestage serve``: the public API server until SIGTERM."""
    from facestage.server import configure_logging
    from facestage.settings import parse_settings
    from orchestrator.settings import OrchestratorSettings

    settings = parse_settings(OrchestratorSettings, list(args.settings))
    configure_logging(settings.log_level)
    try:
        asyncio.run(_serve(settings))
    except FacestageError as exc:
        _err(str(exc))
        return 1
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """``facestage up``: four stages + orchestrator on this machine until interrupted."""
    from facestage.server import configure_logging
    from orchestrator.settings import OrchestratorSettings

    configure_logging("INFO")
    needed: tuple[Stage, ...] = ("detector", "embedder", "swapper")
    if not args.no_enhancer:
        needed += ("enhancer",)
    try:
        with _stages(args, needed) as targets:
            settings = OrchestratorSettings.model_validate(
                {
                    "host": args.host,
                    "port": args.port,
                    "metrics_port": args.metrics_port,
                    "metrics_host": args.host,
                    **{stage: targets.get(stage, "") for stage in DEFAULT_MODELS},
                }
            )
            for stage, target in targets.items():
                print(f"{stage:<9} {target}", flush=True)
            print(
                f"{'api':<9} {args.host}:{args.port}  (facestage.swap.v1.FaceSwapService)",
                flush=True,
            )
            print(f"{'metrics':<9} http://{args.host}:{args.metrics_port}/metrics", flush=True)
            print("press Ctrl-C to stop", flush=True)
            # The stage processes ignore the terminal's Ctrl-C (own session); we drain them.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(_serve(settings))
    except FacestageError as exc:
        _err(str(exc))
        return 1
    return 0
