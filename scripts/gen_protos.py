"""Regenerate the Python stubs under facestage/ from protos/ (never edit them by hand).

Run: python scripts/gen_protos.py           (writes the stubs)
     python scripts/gen_protos.py --check   (exits 1 if the committed stubs drift)
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
BIN = Path(sys.executable).parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Runs grpcio-tools' protoc into out_dir and returns the generated files."""
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    subprocess.run(args, check=True, cwd=PROTO_ROOT)
    files = sorted(p for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))
    for directory in {f.parent for f in files}:
        # Each generated folder is a package: facestage.<area>.v1.
        while directory != out_dir / "facestage" and directory != out_dir:
            (directory / "__init__.py").touch()
            directory = directory.parent
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if stubs differ")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generated = generate(out)
        drift = []
        for path in generated:
            rel = path.relative_to(out)
            target = ROOT / rel
            if args.check:
                if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                    drift.append(str(rel))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        if args.check:
            expected = {str(p.relative_to(out)) for p in generated}
            for area in (ROOT / "facestage").glob("*/v1"):
                for p in area.iterdir():
                    rel = str(p.relative_to(ROOT))
                    if p.name.endswith(GENERATED_SUFFIXES) and rel not in expected:
                        drift.append(rel + " (stale)")
            if drift:
                print("generated stubs drift from protos/:", *drift, sep="\n  ")
                print("run: python scripts/gen_protos.py")
                return 1
            print(f"stubs match protos/ ({len(generated)} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
