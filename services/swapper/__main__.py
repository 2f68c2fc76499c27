"""Runs the swapper service: `python -m services.swapper` or `facestage-swapper` (see --help)."""

from __future__ import annotations

from facestage.stage import run_stage
from services.swapper.service import SwapperSettings, build


def main(argv: list[str] | None = None) -> int:
    """Starts the swapper service; returns the exit code (2 for a missing or bad model)."""
    return run_stage("swapper", SwapperSettings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
