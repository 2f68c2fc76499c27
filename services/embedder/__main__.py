"""Runs the embedder service: `python -m services.embedder` or `facestage-embedder` (see --help)."""

from __future__ import annotations

from facestage.stage import run_stage
from services.embedder.service import EmbedderSettings, build


def main(argv: list[str] | None = None) -> int:
    """Starts the embedder service; returns the exit code (2 for a missing or bad model)."""
    return run_stage("embedder", EmbedderSettings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
