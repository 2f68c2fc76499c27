"""Atomic output files: write next to the destination, rename into place only on success.

A job that fails or is cancelled must never leave a half-written file under the name the
user asked for, because a partial MP4 often still opens and looks like a short result.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMP_SUFFIX = ".partial"
"""Suffix of in-progress files, so an operator can recognise and clean up leftovers."""


class AtomicOutput:
    """A temporary sibling of ``destination`` that becomes it on :meth:`commit`.

    The temporary file lives in the destination's directory so that the final
    :func:`os.replace` is a rename on one file system (atomic on POSIX), never a copy.
    """

    def __init__(self, destination: str | os.PathLike[str]) -> None:
        self.destination = Path(destination)
        directory = self.destination.parent
        if not directory.is_dir():
            raise FileNotFoundError(f"output directory does not exist: {directory}")
        # mkstemp creates the file with O_EXCL, so two jobs writing the same name never
        # share a temporary file; the leading dot keeps it out of casual listings.
        fd, name = tempfile.mkstemp(
            prefix=f".{self.destination.name}.", suffix=TEMP_SUFFIX, dir=directory
        )
        os.close(fd)
        self.temp_path = Path(name)
        self._done = False

    @property
    def done(self) -> bool:
        """True once committed or discarded."""
        return self._done

    def commit(self) -> Path:
        """Rename the temporary file onto the destination and return the destination."""
        if self._done:
            raise RuntimeError(f"{self.destination}: output already committed or discarded")
        self._done = True
        try:
            os.replace(self.temp_path, self.destination)
        except BaseException:
            self._remove_temp()
            raise
        return self.destination

    def discard(self) -> None:
        """Delete the temporary file; the destination is left untouched. Idempotent."""
        self._done = True
        self._remove_temp()

    def _remove_temp(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.temp_path.unlink()


@contextlib.contextmanager
def atomic_output(destination: str | os.PathLike[str]) -> Iterator[AtomicOutput]:
    """Yield an :class:`AtomicOutput`; commit on a clean exit, discard on any exception.

    ``BaseException`` is caught on purpose: ``asyncio.CancelledError`` and
    ``KeyboardInterrupt`` are how jobs are cancelled, and they must not leave files behind.
    """
    output = AtomicOutput(destination)
    try:
        yield output
    except BaseException:
        output.discard()
        raise
    if not output.done:
        output.commit()
