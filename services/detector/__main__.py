"""Runs the detector service: `python -m services.detector` or `facestage-detector` (see --help)."""

from __future__ import annotations

from facestage.stage import run_stage
from services.detector.service import DetectorSettings, build


def main(argv: list[str] | None = None) -> int:
    """Starts the detector service; returns the exit code (2 for a missing or bad model)."""
    return run_stage("detector", DetectorSettings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
