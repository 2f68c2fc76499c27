"""Settings of the orchestrator (the public ``FaceSwapService``): stage targets, batching,
concurrency and upload limits.

Read from ``FACESTAGE_ORCHESTRATOR_<FIELD>`` environment variables and ``--<field>``
flags (flags win), like every stage; ``facestage serve --help`` lists them with defaults.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from facestage.settings import ServerSettings
from orchestrator.clients import (
    DEFAULT_CALL_TIMEOUT_S,
    DEFAULT_CONNECT_TIMEOUT_S,
    ClientSettings,
    StageTargets,
)
from orchestrator.pipeline import PipelineSettings

DEFAULT_ORCHESTRATOR_PORT = 50050
DEFAULT_MAX_UPLOAD_BYTES = 4 * 1024**3
DEFAULT_CHUNK_BYTES = 1024**2
DEFAULT_MAX_CONCURRENT_JOBS = 4
DEFAULT_PROGRESS_INTERVAL_S = 0.5

_TARGET_HELP = "host:port of one replica, or dns:///name:port for a headless Service"


class OrchestratorSettings(ServerSettings):
    """Settings of the orchestrator process that serves ``facestage.swap.v1``."""

    model_config = SettingsConfigDict(
        env_prefix="FACESTAGE_ORCHESTRATOR_", cli_prog_name="facestage serve"
    )

    port: int = Field(
        DEFAULT_ORCHESTRATOR_PORT, ge=0, le=65535, description="gRPC port (0: any free)."
    )
    max_connection_age_s: float = Field(
        0.0,
        ge=0,
        description="Close client connections after this many seconds (0: never). Off by "
        "default here: gRPC ends calls still running drain_grace_s after the age, which "
        "would cut SwapVideo jobs longer than that; balance callers with an L7 proxy.",
    )
    detector: str = Field(min_length=1, description=f"Detector stage (required): {_TARGET_HELP}.")
    embedder: str = Field(min_length=1, description=f"Embedder stage (required): {_TARGET_HELP}.")
    swapper: str = Field(min_length=1, description=f"Swapper stage (required): {_TARGET_HELP}.")
    enhancer: str = Field(
        "",
        description=f"Enhancer stage: {_TARGET_HELP}; empty: no enhancer, and requests "
        "with enhance=true get FAILED_PRECONDITION.",
    )
    call_timeout_s: float = Field(
        DEFAULT_CALL_TIMEOUT_S, gt=0, description="Deadline of each stage call, retries included."
    )
    connect_timeout_s: float = Field(
        DEFAULT_CONNECT_TIMEOUT_S,
        gt=0,
        description="How long start-up waits for each stage's GetModelInfo answer.",
    )
    batch_size: int = Field(8, ge=1, le=256, description="Frames per batch sent through stages.")
    detect_in_flight: int = Field(2, ge=1, description="Batches being detected at once per job.")
    swap_in_flight: int = Field(2, ge=1, description="Batches being swapped at once per job.")
    enhance_in_flight: int = Field(2, ge=1, description="Batches being enhanced at once per job.")
    max_batches_in_flight: int = Field(
        8,
        ge=1,
        description="Batches between decoding and encoding per job; bounds a job's memory "
        "to this times batch_size decoded frames.",
    )
    max_upload_bytes: int = Field(
        DEFAULT_MAX_UPLOAD_BYTES,
        gt=0,
        description="Largest SwapVideo upload in bytes; larger is RESOURCE_EXHAUSTED (checked "
        "against config.target_size_bytes first, then while the bytes arrive).",
    )
    spool_dir: Path = Field(
        default_factory=lambda: Path(tempfile.gettempdir()),
        description="Directory for uploaded and rendered videos while a job runs (each job "
        "gets its own subdirectory, deleted when the job ends); needs room for the "
        "input and output of max_concurrent_jobs jobs.",
    )
    chunk_bytes: int = Field(
        DEFAULT_CHUNK_BYTES, gt=0, description="Size of the output chunks SwapVideo streams back."
    )
    max_concurrent_jobs: int = Field(
        DEFAULT_MAX_CONCURRENT_JOBS,
        ge=1,
        description="SwapImage and SwapVideo jobs running at once; beyond, calls get "
        "RESOURCE_EXHAUSTED (retry later or on another replica).",
    )
    progress_interval_s: float = Field(
        DEFAULT_PROGRESS_INTERVAL_S,
        gt=0,
        description="Shortest time between two SwapVideo progress messages.",
    )

    STAGE: ClassVar[str] = "orchestrator"

    @model_validator(mode="after")
    def _chunks_fit_messages(self) -> OrchestratorSettings:
        # A chunk travels in one SwapVideoResponse; the message also has a few bytes of
        # framing, which the 1 KiB margin covers.
        if self.chunk_bytes > self.max_message_bytes - 1024:
            raise ValueError(
                f"chunk_bytes ({self.chunk_bytes}) must be at least 1 KiB below "
                f"max_message_bytes ({self.max_message_bytes})"
            )
        return self

    def targets(self) -> StageTargets:
        """The stage targets; an empty enhancer means none is deployed."""
        return StageTargets(
            detector=self.detector,
            embedder=self.embedder,
            swapper=self.swapper,
            enhancer=self.enhancer or None,
        )

    def to_client_settings(self) -> ClientSettings:
        """How the stage clients call the stages."""
        return ClientSettings(
            call_timeout_s=self.call_timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            max_message_bytes=self.max_message_bytes,
        )

    def to_pipeline_settings(self) -> PipelineSettings:
        """Batching and per-step concurrency of each job's pipeline."""
        return PipelineSettings(
            batch_size=self.batch_size,
            detect_in_flight=self.detect_in_flight,
            swap_in_flight=self.swap_in_flight,
            enhance_in_flight=self.enhance_in_flight,
            max_batches_in_flight=self.max_batches_in_flight,
        )
