"""``facestage models ...`` through ``main``: output, files and exit codes a user sees."""

from __future__ import annotations

import argparse
import importlib.machinery
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from facestage import cli, manifest
from facestage.manifest import ModelSpec
from tests.unit.test_model_store import PAYLOAD, FileServer, Route, file_server, make_spec

__all__ = ["file_server"]  # the fixture, imported for use here


@pytest.fixture
def tiny(file_server: FileServer, monkeypatch: pytest.MonkeyPatch) -> ModelSpec:
    """A one-model manifest whose only source is the loopback server."""
    spec = replace(make_spec(), urls=(file_server.url("/tiny.onnx"),))
    file_server.routes["/tiny.onnx"] = Route(PAYLOAD)
    monkeypatch.setattr(manifest, "MANIFEST", {"tiny": spec})
    return spec


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def row_of(table: str, name: str) -> list[str]:
    """The cells of the table row that starts with ``name``."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row for {name} in:\n{table}")


def test_list_shows_every_model_with_pin_and_cache_state(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pinned = make_spec(name="present_one")
    loose = make_spec(name="loose_one", pinned=False)
    monkeypatch.setattr(manifest, "MANIFEST", {"present_one": pinned, "loose_one": loose})
    (tmp_path / "present_one.onnx").write_bytes(PAYLOAD)

    code, out, _ = run(capsys, "models", "list", "--cache-dir", str(tmp_path))

    assert code == 0
    assert row_of(out, "present_one")[1:] == [
        "detector",
        "scrfd",
        "307.2 kB",
        "test only",
        "yes",
        "yes",
    ]
    assert row_of(out, "loose_one")[-2:] == ["no", "no"]


def test_list_of_the_real_manifest_names_every_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "models", "list", "--cache-dir", str(tmp_path))
    assert code == 0
    for name in manifest.model_names():
        assert row_of(out, name)[-1] == "no"


def test_pull_downloads_into_the_cache_dir(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny: ModelSpec
) -> None:
    code, out, _ = run(
        capsys, "models", "pull", "tiny", "--no-progress", "--cache-dir", str(tmp_path)
    )

    assert code == 0
    assert (tmp_path / "tiny.onnx").read_bytes() == PAYLOAD
    assert f"tiny: downloaded, sha256 verified -> {tmp_path / 'tiny.onnx'}" in out

    code, out, _ = run(capsys, "models", "pull", "--all", "--cache-dir", str(tmp_path))
    assert code == 0
    assert "tiny: already present, sha256 verified" in out


def test_pull_uses_the_cache_dir_from_the_environment(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny: ModelSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FACESTAGE_MODEL_DIR", str(tmp_path / "env-cache"))
    code, _, _ = run(capsys, "models", "pull", "tiny", "--no-progress")
    assert code == 0
    assert (tmp_path / "env-cache" / "tiny.onnx").is_file()


def test_pull_with_a_bad_checksum_fails_cleanly(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny: ModelSpec,
    file_server: FileServer,
) -> None:
    file_server.routes["/tiny.onnx"] = Route(PAYLOAD[::-1])

    code, _, err = run(capsys, "models", "pull", "tiny", "--cache-dir", str(tmp_path))

    assert code == 1
    assert "Traceback" not in err
    assert f"error: could not download tiny: {tiny.urls[0]}: sha256 mismatch" in err
    assert list(tmp_path.iterdir()) == []


def test_pull_of_an_unknown_model_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny: ModelSpec
) -> None:
    code, _, err = run(capsys, "models", "pull", "tiny", "nope", "--cache-dir", str(tmp_path))
    assert code == 2
    assert err.strip() == "facestage: error: unknown model 'nope' (known: tiny)"
    assert not (tmp_path / "tiny.onnx").exists()


def test_pull_without_names_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "models", "pull")
    assert code == 2
    assert "--all" in err


def test_unpinned_pull_needs_allow_unpinned_and_warns(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny: ModelSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(manifest.MANIFEST, "tiny", replace(tiny, sha256=None))
    args = ("models", "pull", "tiny", "--no-progress", "--cache-dir", str(tmp_path))

    code, _, err = run(capsys, *args)
    assert code == 1
    assert "--allow-unpinned" in err
    assert not (tmp_path / "tiny.onnx").exists()

    code, out, err = run(capsys, *args, "--allow-unpinned")
    assert code == 0
    assert (tmp_path / "tiny.onnx").read_bytes() == PAYLOAD
    assert "warning: tiny has no pinned sha256" in err
    assert "NOT verified" in err
    assert "verified ->" not in out


def test_path_prints_the_cache_location(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "models", "path", "inswapper_128", "--cache-dir", str(tmp_path))
    assert code == 0
    assert out == f"{tmp_path / 'inswapper_128.onnx'}\n"


def test_fixtures_writes_through_the_fixture_module(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def write_contract_fixtures(out_dir: Path) -> dict[str, Path]:
        calls.append(out_dir)
        return {"swapper": out_dir / "swapper.onnx", "detector": out_dir / "detector.onnx"}

    fake = types.ModuleType("facestage.fixtures")
    fake.write_contract_fixtures = write_contract_fixtures  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "facestage.fixtures", fake)

    code, out, _ = run(capsys, "models", "fixtures", "--output", str(tmp_path))

    assert code == 0
    assert calls == [tmp_path]
    assert out.splitlines() == [
        f"detector: {tmp_path / 'detector.onnx'}",
        f"swapper: {tmp_path / 'swapper.onnx'}",
    ]


def test_usage_errors_exit_2_and_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run(
            capsys,
        )[0]
        == 2
    )
    assert run(capsys, "models", "fetch")[0] == 2
    code, out, _ = run(capsys, "models", "--help")
    assert code == 0
    assert "pull" in out and "fixtures" in out


def test_plugin_modules_add_commands(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def register_commands(subparsers: cli.Subparsers) -> None:
        hello = subparsers.add_parser("hello")
        hello.add_argument("--code", type=int, default=0)

        def handler(args: argparse.Namespace) -> int:
            print("hello from the orchestrator")
            return int(args.code)

        hello.set_defaults(handler=handler)

    plugin = types.ModuleType("fake_orchestrator_cli")
    plugin.__spec__ = importlib.machinery.ModuleSpec("fake_orchestrator_cli", None)
    plugin.register_commands = register_commands  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_orchestrator_cli", plugin)
    monkeypatch.setattr(cli, "PLUGIN_MODULES", ("fake_orchestrator_cli", "absent_pkg.cli"))

    code, out, _ = run(capsys, "hello", "--code", "3")

    assert code == 3
    assert out == "hello from the orchestrator\n"
    assert run(capsys, "models", "path", "yunet")[0] == 0
