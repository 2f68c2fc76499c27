"""Typed settings of every facestage process: environment variables and command-line flags.

Each stage reads ``FACESTAGE_<STAGE>_<FIELD>`` from the environment and ``--<field>``
flags from the command line (flags win). ``facestage-<stage> --help`` lists every
setting with its default; docs/services.md documents them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, CliApp, NoDecode, SettingsConfigDict

from facestage.imaging import DEFAULT_MAX_PIXELS
from facestage.types import EXECUTION_PROVIDERS, ExecutionProvider, Stage

DEFAULT_GRPC_PORT = 50051
DEFAULT_METRICS_PORT = 9100
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MODEL_DIR = Path.home() / ".cache" / "facestage" / "models"


def default_model_dir() -> Path:
    """The model cache: ``$FACESTAGE_MODEL_DIR``, else ``~/.cache/facestage/models``."""
    return Path(os.environ.get("FACESTAGE_MODEL_DIR", str(DEFAULT_MODEL_DIR))).expanduser()


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def split_csv(value: Any) -> Any:
    """Lets list settings be written as ``cuda,cpu`` in flags and environment variables."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class ServerSettings(BaseSettings):
    """Settings every gRPC process of facestage shares (stages and orchestrator)."""

    model_config = SettingsConfigDict(
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_avoid_json=True,
        extra="ignore",
    )

    host: str = Field("0.0.0.0", description="Address the gRPC server binds to.")
    port: int = Field(DEFAULT_GRPC_PORT, ge=0, le=65535, description="gRPC port (0: any free).")
    metrics_port: int = Field(
        DEFAULT_METRICS_PORT,
        ge=-1,
        le=65535,
        description="Prometheus /metrics HTTP port (-1: no metrics server).",
    )
    metrics_host: str = Field("0.0.0.0", description="Address the metrics server binds to.")
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES,
        gt=0,
        description="Largest gRPC message accepted or sent, in bytes; larger is "
        "RESOURCE_EXHAUSTED.",
    )
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, gt=0, description="Largest image accepted, in pixels (width*height)."
    )
    max_connection_age_s: float = Field(
        300.0,
        ge=0,
        description="Close client connections after this many seconds so clients "
        "re-resolve DNS and find new replicas (0: never).",
    )
    drain_grace_s: float = Field(
        20.0,
        ge=0,
        description="On SIGTERM, report NOT_SERVING and let in-flight calls finish for "
        "up to this many seconds before stopping.",
    )
    drain_notice_s: float = Field(
        1.0,
        ge=0,
        description="On SIGTERM, report NOT_SERVING for this long (within the grace) before "
        "refusing new calls, so load balancers and clients stop picking this replica.",
    )
    log_level: str = Field("INFO", description="Python logging level.")

    STAGE: ClassVar[str] = "server"


class StageSettings(ServerSettings):
    """Settings of a model stage service (detector, embedder, swapper, enhancer)."""

    model: str = Field(
        "", description="Model file path, or a manifest name looked up in the model cache."
    )
    model_dir: Path = Field(
        default_factory=default_model_dir,
        description="Model cache directory used for manifest names (default: "
        "$FACESTAGE_MODEL_DIR, else ~/.cache/facestage/models).",
    )
    providers: Annotated[list[ExecutionProvider], NoDecode] = Field(
        default_factory=lambda: list(EXECUTION_PROVIDERS),
        description="ONNX Runtime execution providers in order of preference, e.g. cuda,cpu. "
        "Unavailable ones are skipped with a warning; CPU is always the last resort.",
    )
    device_id: int = Field(0, ge=0, description="GPU index for CUDA and TensorRT.")
    intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime intra-op threads (0: ONNX Runtime's default)."
    )
    max_batch_size: int = Field(
        16, ge=1, le=1024, description="Most items in one call and in one inference batch."
    )
    batch_window_ms: float = Field(
        2.0,
        ge=0,
        description="How long the dynamic batcher waits for more requests to merge "
        "into one inference batch (like Triton's max_queue_delay).",
    )
    max_queue_items: int = Field(
        1024,
        ge=1,
        description="Most items waiting for the model; beyond, calls get RESOURCE_EXHAUSTED.",
    )
    inference_threads: int = Field(
        1,
        ge=1,
        description="Batches run concurrently on the model (more than 1 helps only when "
        "the device has spare capacity).",
    )

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: Any) -> Any:
        return split_csv(value)


def stage_settings_class(stage: Stage, default_model: str) -> type[StageSettings]:
    """A StageSettings subclass reading ``FACESTAGE_<STAGE>_*`` with a default model."""
    prefix = f"FACESTAGE_{stage.upper()}_"

    class _Settings(StageSettings):
        model_config = SettingsConfigDict(env_prefix=prefix, cli_prog_name=f"facestage-{stage}")
        model: str = Field(
            default_model,
            description="Model file path, or a manifest name looked up in the model cache.",
        )
        STAGE: ClassVar[str] = stage

    _Settings.__name__ = f"{stage.capitalize()}Settings"
    _Settings.__qualname__ = _Settings.__name__
    return _Settings


def parse_settings(cls: type[SettingsT], argv: list[str] | None) -> SettingsT:
    """Reads settings from the environment, then ``argv`` flags (``--help`` prints them)."""
    return CliApp.run(cls, cli_args=argv if argv is not None else [])
