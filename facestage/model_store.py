"""The local model cache: download and verify manifest models, find and check them at start.

A download goes to a hidden temporary file next to its destination and is renamed into
place only after its sha256 matched, so the cache never holds a half-written or
unverified file under a model's name, whatever interrupts the download.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from http.client import HTTPException, HTTPResponse
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from facestage import manifest
from facestage.errors import DownloadError, ModelFileError
from facestage.manifest import ModelSpec
from facestage.runtime import file_sha256

log = logging.getLogger(__name__)

MODEL_DIR_ENV = "FACESTAGE_MODEL_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/facestage/models")
DEFAULT_TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 20
_USER_AGENT = "facestage-model-pull/0.1"


def default_cache_dir() -> Path:
    """The cache directory: ``$FACESTAGE_MODEL_DIR``, else ``~/.cache/facestage/models``."""
    configured = os.environ.get(MODEL_DIR_ENV)
    return Path(configured).expanduser() if configured else DEFAULT_CACHE_DIR.expanduser()


def cache_path(spec: ModelSpec, cache_dir: Path | None = None) -> Path:
    """Where the cache keeps ``spec``'s file (whether or not it is there)."""
    return (cache_dir or default_cache_dir()) / spec.file_name


def pull_hint(spec: ModelSpec) -> str:
    """The command that fetches ``spec``, as error messages show it."""
    return f"fetch it with: facestage models pull {spec.name}"


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull` did for one model."""

    spec: ModelSpec
    path: Path
    sha256: str
    downloaded: bool
    """False when a verified copy was already in the cache."""
    verified: bool
    """True only when the file matched a pinned sha256."""
    url: str | None = None


class _SourceFailed(Exception):
    """One URL did not deliver the right file; the next one is tried."""


def _read_chunk(response: HTTPResponse) -> bytes:
    # A seam for tests to interrupt a download between two chunks.
    return response.read(_CHUNK_BYTES)


def _progress_bar(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def _download_one(
    spec: ModelSpec,
    url: str,
    partial: Path,
    progress: Progress,
    timeout_s: float,
) -> str:
    """Streams ``url`` into ``partial`` and returns its sha256, or raises _SourceFailed."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    digest = hashlib.sha256()
    crc = 0
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length")
            expected_bytes = int(declared) if declared and declared.isdigit() else None
            task = progress.add_task(spec.name, total=expected_bytes or spec.size_bytes)
            with partial.open("wb") as out:
                while chunk := _read_chunk(response):
                    out.write(chunk)
                    digest.update(chunk)
                    crc = zlib.crc32(chunk, crc)
                    received += len(chunk)
                    progress.advance(task, len(chunk))
                out.flush()
                os.fsync(out.fileno())
    except urllib.error.HTTPError as exc:
        raise _SourceFailed(f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise _SourceFailed(f"cannot connect ({exc.reason})") from exc
    except (HTTPException, OSError) as exc:
        raise _SourceFailed(f"transfer failed ({exc!r})") from exc
    # http.client returns an empty read when the server closes early instead of raising,
    # so a short body must be caught here.
    if expected_bytes is not None and received != expected_bytes:
        raise _SourceFailed(f"incomplete download: got {received} of {expected_bytes} bytes")
    actual = digest.hexdigest()
    if spec.pinned:
        if not spec.accepts_sha256(actual):
            raise _SourceFailed(f"sha256 mismatch: expected {spec.sha256}, got {actual}")
    else:
        # Without a pinned digest, size and the publisher's CRC32 at least catch a
        # truncated or wrong file.
        if received != spec.size_bytes:
            raise _SourceFailed(f"size mismatch: expected {spec.size_bytes} bytes, got {received}")
        if spec.crc32 is not None and f"{crc:08x}" != spec.crc32:
            raise _SourceFailed(f"crc32 mismatch: expected {spec.crc32}, got {crc:08x}")
    return actual


def _new_partial_file(spec: ModelSpec, cache_dir: Path) -> Path:
    """An empty hidden file beside the destination, so os.replace is an atomic rename."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=cache_dir, prefix=f".{spec.file_name}.partial-")
    except OSError as exc:
        raise DownloadError(f"cannot write to the model cache {cache_dir}: {exc}") from exc
    os.close(handle)
    return Path(name)


def _already_present(spec: ModelSpec, dest: Path) -> str | None:
    """The sha256 of a usable cached copy, or None when it must be (re)downloaded."""
    if not dest.is_file() or dest.stat().st_size == 0:
        return None
    actual = file_sha256(dest)
    if spec.pinned:
        if spec.accepts_sha256(actual):
            return actual
        log.warning("%s in the cache does not match its sha256; downloading it again", dest)
        return None
    return actual if dest.stat().st_size == spec.size_bytes else None


def pull(
    spec: ModelSpec,
    cache_dir: Path | None = None,
    progress: bool = True,
    urls: Sequence[str] | None = None,
    *,
    allow_unpinned: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    console: Console | None = None,
) -> PullResult:
    """Downloads ``spec`` into the cache and verifies it, or skips it if already there.

    ``urls`` replaces the manifest's sources (tests, private mirrors); they are tried in
    order and each failure is reported on ``console`` (stderr by default). The progress
    bar shows only when ``progress`` is set and the console is a terminal.

    Raises :class:`DownloadError` when every source fails, naming each URL and why, and
    when ``spec`` has no pinned sha256 and ``allow_unpinned`` is not set.
    """
    console = console or Console(stderr=True)
    if not spec.pinned and not allow_unpinned:
        raise DownloadError(
            f"{spec.name} has no pinned sha256 in the manifest, so its download cannot be "
            "verified; pass --allow-unpinned to fetch it anyway (checked by size only)"
        )
    cache_dir = cache_dir or default_cache_dir()
    dest = cache_path(spec, cache_dir)
    present = _already_present(spec, dest)
    if present is not None:
        return PullResult(spec, dest, present, downloaded=False, verified=spec.pinned)

    sources = tuple(urls) if urls is not None else spec.urls
    failures: list[str] = []
    show_bar = progress and console.is_terminal
    for url in sources:
        partial = _new_partial_file(spec, cache_dir)
        try:
            with _progress_bar(console, show_bar) as bar:
                actual = _download_one(spec, url, partial, bar, timeout_s)
            try:
                os.replace(partial, dest)
            except OSError as exc:
                raise DownloadError(f"cannot store {spec.name} at {dest}: {exc}") from exc
        except _SourceFailed as exc:
            failures.append(f"{url}: {exc}")
            console.print(
                f"[yellow]source failed[/] {escape(url)}: {escape(str(exc))}",
                highlight=False,
                soft_wrap=True,
            )
            continue
        finally:
            # Covers every way out, KeyboardInterrupt included; after a successful
            # os.replace the partial name no longer exists.
            partial.unlink(missing_ok=True)
        return PullResult(spec, dest, actual, downloaded=True, verified=spec.pinned, url=url)

    tried = "; ".join(failures) if failures else "no download URL"
    raise DownloadError(f"could not download {spec.name}: {tried}")


def verify_model_file(path: Path, spec: ModelSpec | None) -> str:
    """Checks a model file before a service loads it and returns its sha256.

    Raises :class:`ModelFileError` naming the file and the pull command when the file is
    missing, empty, or (for a manifest model) does not match the pinned sha256. Without a
    pinned sha256 only the size is checked.
    """
    hint = pull_hint(spec) if spec else None
    if not path.exists():
        raise ModelFileError(str(path), "not found", hint)
    if not path.is_file():
        raise ModelFileError(str(path), "is not a regular file", hint)
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(str(path), "is empty (0 bytes)", hint)
    actual = file_sha256(path)
    if spec is None:
        return actual
    if spec.pinned:
        if not spec.accepts_sha256(actual):
            raise ModelFileError(
                str(path),
                f"sha256 mismatch for {spec.name}: expected {spec.sha256}, got {actual} "
                "(corrupt, truncated or a different file)",
                hint,
            )
    elif size != spec.size_bytes:
        raise ModelFileError(
            str(path), f"size {size} bytes, expected {spec.size_bytes} for {spec.name}", hint
        )
    return actual


def resolve_model(name_or_path: str | Path, cache_dir: Path | None = None) -> Path:
    """Maps a model name or a path to the file to load.

    A path that exists is used as it is; a manifest name (or file name) maps to its place
    in the cache, whether or not it has been pulled yet, so :func:`verify_model_file`
    can then say how to fetch it. Anything else raises :class:`ModelFileError`.
    """
    candidate = Path(name_or_path).expanduser()
    if candidate.exists():
        return candidate
    spec = manifest.find_spec(str(name_or_path))
    if spec is not None:
        return cache_path(spec, cache_dir)
    looks_like_path = candidate.suffix == ".onnx" or len(candidate.parts) > 1
    if looks_like_path:
        # A missing file named like a manifest model (w600k_r50.onnx) says which to pull.
        known = manifest.find_spec(candidate.name) or manifest.find_spec(candidate.stem)
        raise ModelFileError(
            str(name_or_path),
            "not found",
            pull_hint(known)
            if known is not None
            else "fetch a model with: facestage models pull NAME (names: facestage models list)",
        )
    raise ModelFileError(
        str(name_or_path),
        "not found, and not a model name of the manifest",
        "see the known models with: facestage models list, "
        "then fetch one with: facestage models pull NAME",
    )


def resolve_verified_model(name_or_path: str | Path, cache_dir: Path | None = None) -> Path:
    """:func:`resolve_model` and :func:`verify_model_file` together, for service start.

    A manifest name is checked against its pinned sha256; an explicit path is the
    operator's choice of file and is only checked to exist and be non-empty.
    """
    path = resolve_model(name_or_path, cache_dir)
    by_name = not Path(name_or_path).expanduser().exists()
    spec = manifest.find_spec(str(name_or_path)) if by_name else None
    verify_model_file(path, spec)
    return path
