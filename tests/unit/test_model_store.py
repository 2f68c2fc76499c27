"""Model downloads against a real HTTP server on loopback, and start-up checks of model files."""

from __future__ import annotations

import hashlib
import io
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rich.console import Console

from facestage import manifest, model_store
from facestage.errors import DownloadError, ModelFileError
from facestage.manifest import ModelSpec

PAYLOAD = bytes(range(256)) * 1200  # 300 KiB: several chunks once chunks are made small


@dataclass
class Route:
    """What the test server answers for one path."""

    body: bytes
    status: int = 200
    declared_length: int | None = None


@dataclass
class FileServer:
    """A loopback HTTP server serving ``routes``; ``hits`` counts requests per path."""

    base_url: str
    routes: dict[str, Route] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        files = self.server.files
        files.hits[self.path] += 1
        route = files.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        self.send_response(route.status)
        self.send_header("Content-Length", str(route.declared_length or len(route.body)))
        self.end_headers()
        # With a declared length above the body, the connection closes early: a
        # download cut off mid-way.
        self.wfile.write(route.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    files: FileServer


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    server = _Server(("127.0.0.1", 0), _Handler)
    host, port = server.server_address[:2]
    server.files = FileServer(base_url=f"http://{host!s}:{port}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield server.files
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def refused_url() -> str:
    """A loopback URL nothing listens on (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/model.onnx"


def make_spec(payload: bytes = PAYLOAD, *, pinned: bool = True, name: str = "tiny") -> ModelSpec:
    """A manifest entry for ``payload`` (its real sha256 unless unpinned)."""
    return ModelSpec(
        name=name,
        file_name=f"{name}.onnx",
        stage="detector",
        family="scrfd",
        sha256=hashlib.sha256(payload).hexdigest() if pinned else None,
        size_bytes=len(payload),
        urls=(f"https://models.invalid/{name}.onnx",),
        licence="test only",
        inputs="x",
        outputs="y",
        checksum_source="computed by the test",
    )


def quiet_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=200), buffer


def cache_listing(cache_dir: Path) -> list[str]:
    """Every name in the cache, hidden partial files included."""
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_store, "_CHUNK_BYTES", 64 * 1024)


def test_pull_downloads_verifies_and_stores(file_server: FileServer, tmp_path: Path) -> None:
    spec = make_spec()
    file_server.routes["/tiny.onnx"] = Route(PAYLOAD)
    console, _ = quiet_console()

    result = model_store.pull(
        spec, tmp_path, progress=False, urls=[file_server.url("/tiny.onnx")], console=console
    )

    assert result.downloaded and result.verified
    assert result.path == tmp_path / "tiny.onnx"
    assert result.path.read_bytes() == PAYLOAD
    assert result.sha256 == spec.sha256
    assert cache_listing(tmp_path) == ["tiny.onnx"]


def test_pull_skips_a_verified_copy(file_server: FileServer, tmp_path: Path) -> None:
    spec = make_spec()
    file_server.routes["/tiny.onnx"] = Route(PAYLOAD)
    urls = [file_server.url("/tiny.onnx")]
    console, _ = quiet_console()
    model_store.pull(spec, tmp_path, progress=False, urls=urls, console=console)

    again = model_store.pull(spec, tmp_path, progress=False, urls=urls, console=console)

    assert not again.downloaded and again.verified
    assert file_server.hits["/tiny.onnx"] == 1


def test_pull_replaces_a_corrupt_cached_copy(file_server: FileServer, tmp_path: Path) -> None:
    spec = make_spec()
    (tmp_path / "tiny.onnx").write_bytes(PAYLOAD[:-1] + b"\x00")
    file_server.routes["/tiny.onnx"] = Route(PAYLOAD)
    console, _ = quiet_console()

    result = model_store.pull(
        spec, tmp_path, progress=False, urls=[file_server.url("/tiny.onnx")], console=console
    )

    assert result.downloaded
    assert (tmp_path / "tiny.onnx").read_bytes() == PAYLOAD


def test_checksum_mismatch_is_rejected_and_leaves_nothing(
    file_server: FileServer, tmp_path: Path
) -> None:
    spec = make_spec()
    tampered = PAYLOAD[:1000] + b"!" + PAYLOAD[1001:]
    file_server.routes["/tiny.onnx"] = Route(tampered)
    console, _ = quiet_console()

    with pytest.raises(DownloadError) as caught:
        model_store.pull(
            spec, tmp_path, progress=False, urls=[file_server.url("/tiny.onnx")], console=console
        )

    message = str(caught.value)
    assert f"expected {spec.sha256}" in message
    assert f"got {hashlib.sha256(tampered).hexdigest()}" in message
    assert cache_listing(tmp_path) == []


def test_download_cut_off_mid_way_leaves_nothing(
    file_server: FileServer, tmp_path: Path, small_chunks: None
) -> None:
    spec = make_spec()
    half = PAYLOAD[: len(PAYLOAD) // 2]
    file_server.routes["/tiny.onnx"] = Route(half, declared_length=len(PAYLOAD))
    console, _ = quiet_console()

    with pytest.raises(DownloadError, match=rf"incomplete download: got {len(half)} of"):
        model_store.pull(
            spec, tmp_path, progress=False, urls=[file_server.url("/tiny.onnx")], console=console
        )

    assert cache_listing(tmp_path) == []


def test_keyboard_interrupt_removes_the_partial_file(
    file_server: FileServer,
    tmp_path: Path,
    small_chunks: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = make_spec()
    file_server.routes["/tiny.onnx"] = Route(PAYLOAD)
    reads: list[list[str]] = []
    real_read = model_store._read_chunk

    def read_then_interrupt(response: object) -> bytes:
        # The partial file exists and has data before the user presses Ctrl-C.
        reads.append(cache_listing(tmp_path))
        if len(reads) == 3:
            raise KeyboardInterrupt
        return real_read(response)  # type: ignore[arg-type]

    monkeypatch.setattr(model_store, "_read_chunk", read_then_interrupt)
    console, _ = quiet_console()

    with pytest.raises(KeyboardInterrupt):
        model_store.pull(
            spec, tmp_path, progress=False, urls=[file_server.url("/tiny.onnx")], console=console
        )

    assert reads[-1][0].startswith(".tiny.onnx.partial-")
    assert cache_listing(tmp_path) == []


def test_a_failing_source_falls_back_to_the_mirror(file_server: FileServer, tmp_path: Path) -> None:
    spec = make_spec()
    file_server.routes["/mirror/tiny.onnx"] = Route(PAYLOAD)
    missing = file_server.url("/official/tiny.onnx")
    mirror = file_server.url("/mirror/tiny.onnx")
    console, output = quiet_console()

    result = model_store.pull(
        spec, tmp_path, progress=False, urls=[missing, mirror], console=console
    )

    assert result.url == mirror
    assert result.path.read_bytes() == PAYLOAD
    assert f"{missing}: HTTP 404" in output.getvalue()


def test_every_source_unreachable_gives_one_clean_error(tmp_path: Path) -> None:
    spec = make_spec()
    urls = [refused_url(), refused_url()]
    console, _ = quiet_console()

    with pytest.raises(DownloadError) as caught:
        model_store.pull(spec, tmp_path, progress=False, urls=urls, console=console)

    message = str(caught.value)
    assert message.startswith("could not download tiny:")
    assert all(f"{url}: cannot connect" in message for url in urls)
    assert cache_listing(tmp_path) == []


def test_unpinned_model_is_refused_without_allow_unpinned(
    file_server: FileServer, tmp_path: Path
) -> None:
    spec = make_spec(pinned=False)
    file_server.routes["/tiny.onnx"] = Route(PAYLOAD)

    with pytest.raises(DownloadError, match="--allow-unpinned"):
        model_store.pull(spec, tmp_path, progress=False, urls=[file_server.url("/tiny.onnx")])

    assert file_server.hits["/tiny.onnx"] == 0


def test_unpinned_model_with_allow_unpinned_is_not_marked_verified(
    file_server: FileServer, tmp_path: Path
) -> None:
    spec = make_spec(pinned=False)
    file_server.routes["/tiny.onnx"] = Route(PAYLOAD)
    file_server.routes["/short.onnx"] = Route(PAYLOAD[:-10])
    console, _ = quiet_console()

    with pytest.raises(DownloadError, match=r"size mismatch"):
        model_store.pull(
            spec,
            tmp_path,
            progress=False,
            urls=[file_server.url("/short.onnx")],
            allow_unpinned=True,
            console=console,
        )
    result = model_store.pull(
        spec,
        tmp_path,
        progress=False,
        urls=[file_server.url("/tiny.onnx")],
        allow_unpinned=True,
        console=console,
    )

    assert result.downloaded and not result.verified
    assert result.path.read_bytes() == PAYLOAD


def test_default_cache_dir_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FACESTAGE_MODEL_DIR", str(tmp_path / "models"))
    assert model_store.default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("FACESTAGE_MODEL_DIR")
    assert model_store.default_cache_dir() == Path.home() / ".cache/facestage/models"


def test_resolve_model_uses_an_existing_path_as_is(tmp_path: Path) -> None:
    own = tmp_path / "my_detector.onnx"
    own.write_bytes(b"onnx")
    assert model_store.resolve_model(str(own), tmp_path / "cache") == own


def test_resolve_model_maps_a_manifest_name_to_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifest, "MANIFEST", {"tiny": make_spec()})
    assert model_store.resolve_model("tiny", tmp_path) == tmp_path / "tiny.onnx"
    assert model_store.resolve_model("tiny.onnx", tmp_path) == tmp_path / "tiny.onnx"


def test_resolve_model_rejects_an_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="facestage models list") as caught:
        model_store.resolve_model("no_such_model", tmp_path)
    assert "no_such_model" in str(caught.value)


def test_verify_names_the_file_and_pull_command_when_missing(tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    with pytest.raises(ModelFileError) as caught:
        model_store.verify_model_file(path, make_spec())
    assert str(caught.value) == (
        f"model file {path}: not found; fetch it with: facestage models pull tiny"
    )


def test_verify_rejects_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    path.touch()
    with pytest.raises(ModelFileError, match=r"is empty \(0 bytes\).*models pull tiny") as caught:
        model_store.verify_model_file(path, make_spec())
    assert caught.value.path == str(path)


def test_verify_rejects_a_corrupt_file(tmp_path: Path) -> None:
    spec = make_spec()
    path = tmp_path / "tiny.onnx"
    path.write_bytes(PAYLOAD[:500] + bytes([PAYLOAD[500] ^ 0xFF]) + PAYLOAD[501:])
    with pytest.raises(ModelFileError) as caught:
        model_store.verify_model_file(path, spec)
    message = str(caught.value)
    assert str(path) in message
    assert f"sha256 mismatch for tiny: expected {spec.sha256}" in message
    assert message.endswith("facestage models pull tiny")


def test_verify_accepts_the_pinned_file_and_other_known_builds(tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    path.write_bytes(PAYLOAD)
    spec = make_spec()
    assert model_store.verify_model_file(path, spec) == spec.sha256

    other_build = make_spec(b"same weights, other export")
    widened = replace(other_build, also_accepted_sha256=(spec.sha256 or "",))
    assert model_store.verify_model_file(path, widened) == spec.sha256


def test_resolve_verified_model_checks_a_named_model(
    file_server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = make_spec()
    monkeypatch.setattr(manifest, "MANIFEST", {"tiny": spec})
    with pytest.raises(ModelFileError, match="not found; fetch it with: facestage models pull"):
        model_store.resolve_verified_model("tiny", tmp_path)

    file_server.routes["/tiny.onnx"] = Route(PAYLOAD)
    console, _ = quiet_console()
    model_store.pull(
        spec, tmp_path, progress=False, urls=[file_server.url("/tiny.onnx")], console=console
    )
    assert model_store.resolve_verified_model("tiny", tmp_path) == tmp_path / "tiny.onnx"
