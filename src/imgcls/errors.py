"""User-facing errors: one clear line, a distinct exit code, never a library traceback."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class ImgclsError(Exception):
    """An error caused by the user's input or environment, shown as one line."""

    exit_code = 2


class OptionError(ImgclsError, ValueError):
    """An option value the library cannot use (unknown model, strategy, precision...). Also a
    ValueError, so Python callers can catch it as the bad value it is."""

    exit_code = 2


class DataError(ImgclsError):
    """The dataset is malformed: names the file and, where it applies, the row or column."""

    exit_code = 3


class RunFolderError(ImgclsError):
    """A run folder cannot be used as asked (holds a different run, is incomplete, ...)."""

    exit_code = 4


class WeightsError(ImgclsError):
    """Pretrained or saved weights could not be found or loaded."""

    exit_code = 5


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be: the same checkpoint and resume hint."""

    exit_code = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM (kill, systemd, Kubernetes, CI) interrupts like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; an embedding program keeps its own
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def where(path, row: int | None = None, column: str | None = None) -> str:
    """Format a location as 'path row N column C' for error messages."""
    text = str(path)
    if row is not None:
        text += f" row {row}"
    if column is not None:
        text += f" column {column!r}"
    return text


class OutputError(ImgclsError):
    """An output file cannot be written: read-only folder, full disk, a folder or file in the way."""

    exit_code = 7
