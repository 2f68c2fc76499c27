"""Runs the enhancer service: `python -m services.enhancer` or `facestage-enhancer` (see --help)."""

from __future__ import annotations

from facestage.stage import run_stage
from services.enhancer.service import EnhancerSettings, build


def main(argv: list[str] | None = None) -> int:
    """Starts the enhancer service; returns the exit code (2 for a missing or bad model)."""
    return run_stage("enhancer", EnhancerSettings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
