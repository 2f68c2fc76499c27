"""Prints facestage's runtime requirements from pyproject.toml, one per line.

Used by the image builds (deploy/docker/Dockerfile*): the GPU image must not install
the CPU `onnxruntime` wheel next to `onnxruntime-gpu` (both own the `onnxruntime`
import package; whichever installs last wins), so the builder installs the project's
dependencies from this list with onnxruntime swapped, and the project itself with
--no-deps.

    python3 runtime-requirements.py pyproject.toml --onnxruntime onnxruntime-gpu
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from typing import Any

FORBIDDEN = {"opencv-python", "opencv-contrib-python"}  # the images ship only the headless build


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def runtime_requirements(pyproject: dict[str, Any], onnxruntime: str) -> list[str]:
    out: list[str] = []
    for requirement in pyproject["project"]["dependencies"]:
        name = requirement_name(requirement)
        if name in FORBIDDEN:
            raise SystemExit(f"{requirement!r}: the images ship only opencv-python-headless")
        if name == "onnxruntime":
            # Keep the version bound, swap the distribution.
            requirement = onnxruntime + requirement.strip()[len("onnxruntime") :]
        out.append(requirement.strip())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument(
        "--onnxruntime",
        default="onnxruntime",
        help="distribution that provides the onnxruntime module (onnxruntime-gpu for CUDA)",
    )
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as f:
        pyproject = tomllib.load(f)
    sys.stdout.write("\n".join(runtime_requirements(pyproject, args.onnxruntime)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
