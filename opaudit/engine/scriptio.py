"""The user's script's standard streams while opaudit runs it.

Its stdout goes to stderr (the report may be going to stdout), through stand-ins
that it may close without closing opaudit's streams; :func:`restore_stdout` puts
the descriptors back, libc's buffers flushed first.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Any


def stdout_to_stderr() -> tuple[int | None, int | None]:
    """Point the script's stdout (``sys.stdout`` and descriptor 1) at stderr; the saved descriptors 1 and 2
    (2 too: a script that closes or redirects it must not take opaudit's messages with it)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved_err: int | None = os.dup(2)
    except OSError:
        saved_err = None  # stderr closed
    try:
        saved = os.dup(1)
    except OSError:
        saved = None  # stdout closed: nothing of the report's stream to protect
    else:
        try:
            os.dup2(2, 1)
        except OSError:  # stderr closed: the script's output is dropped rather than mixed in
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
    sys.stdout = sys.stderr
    return saved, saved_err


class ScriptStream(io.TextIOBase):
    """The script's ``sys.stdout`` or ``sys.stderr``: it writes to opaudit's stream, but closing it
    (``sys.stdout.close()``) closes only this stand-in, never the stream opaudit writes to."""

    def __init__(self, target: Any) -> None:
        super().__init__()
        self._target = target

    def write(self, text: str) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        return self._target.write(text)

    def flush(self) -> None:
        if not self.closed:
            self._target.flush()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._target.fileno()

    def isatty(self) -> bool:
        return not self.closed and self._target.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self._target, "errors", None)

    @property
    def buffer(self) -> Any:
        """Bytes written here go to the target's buffer; closing it closes this stand-in only too."""
        return _ScriptBuffer(self._target.buffer, self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class _ScriptBuffer(io.BufferedIOBase):
    """``sys.stdout.buffer`` of a :class:`ScriptStream`."""

    def __init__(self, target: Any, text: ScriptStream) -> None:
        super().__init__()
        self._target = target
        self._text = text

    def write(self, data: Any) -> int:
        if self.closed or self._text.closed:
            raise ValueError("write to closed file")
        return self._target.write(data)

    def flush(self) -> None:
        if not self.closed:
            self._target.flush()

    def close(self) -> None:
        super().close()
        self._text.close()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._target.fileno()

    def isatty(self) -> bool:
        return self._target.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def script_streams() -> tuple[Any, ...]:
    """Stand-ins for ``sys.stdout``/``sys.stderr`` and ``sys.__stdout__``/``sys.__stderr__``, all writing to
    the stream the script's output goes to (see :func:`stdout_to_stderr`)."""
    return tuple(None if s is None else ScriptStream(s)
                 for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__))


def restore_stdout(saved: tuple[int | None, int | None]) -> None:
    """Put descriptors 1 and 2 back as :func:`stdout_to_stderr` saved them."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        # C and C++ code buffers in libc's stdio; flush it while it still goes to stderr.
        import ctypes

        ctypes.CDLL(None).fflush(None)
    for fd, saved_fd in zip((1, 2), saved, strict=True):
        if saved_fd is not None:
            os.dup2(saved_fd, fd)
            os.close(saved_fd)
