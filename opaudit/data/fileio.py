"""Bytes in and out of the files opaudit is pointed at: outputs written safely, inputs read within bounds.

Writing (:func:`write_output`) depends on what the path is:

* a regular file, or a path that does not exist yet: written to a temp file in
  the same folder and renamed over it, so a reader never sees half a file. A new
  file gets the mode an ordinary ``open()`` would give it (``0666`` less the
  umask; the audited script's own umask is undone when it ends); a file that is overwritten keeps its mode (and, where the process may
  set it, its owner).
* a symlink: the file it points to is replaced that way; the link stays a link.
* a character or block device (``/dev/null``), a FIFO or a socket, and the
  process's own descriptors (``/dev/stdout``, ``/dev/fd/N``,
  ``/proc/self/fd/N``, or a symlink to one of them): written straight through.
  A rename would replace the device node or the shell's redirection target with
  a new file.

Reading (:func:`read_input`, :func:`read_bytes`) accepts regular files only
(``/dev/zero`` or a FIFO would be read forever) and at most :data:`MAX_INPUT_BYTES`
(:data:`MAX_SCRIPT_BYTES` for the audited script).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable
from typing import BinaryIO

from opaudit.data.errors import OpauditError

MAX_INPUT_BYTES = 64 * 2**20
"""Largest report, catalog or diff input opaudit reads (a full GPU catalog is a few MB)."""
MAX_SCRIPT_BYTES = 16 * 2**20
"""Largest script opaudit runs: far past any hand-written or generated training script."""

_FD_PATH = re.compile(r"^/(?:dev/fd|proc/self/fd|proc/(\d+)/fd)/(\d+)$")
_STD_STREAMS = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}


class FileError(OpauditError):
    """A file cannot be written or read; the message names it and says why, in one line."""


def shown_path(path: str) -> str:
    """How a document names a file the user gave (a capsule, the two sides of a diff, a catalog): a relative
    path as given (normalized); an absolute one relative to the working directory when it lies inside it, else
    by its base name. Never an absolute path, which would make the bytes depend on where the files sit."""
    if not os.path.isabs(path):
        return os.path.normpath(path)
    try:
        rel = os.path.relpath(path)
    except (ValueError, OSError):  # another drive (Windows), or the working directory is gone
        return os.path.basename(path) or path
    return rel if rel != os.pardir and not rel.startswith(os.pardir + os.sep) else (os.path.basename(path) or path)


def _own_fd(path: str) -> int | None:
    """The descriptor of this process that ``path`` (or a symlink chain from it) names, if any."""
    seen = 0
    while True:
        if path in _STD_STREAMS:
            return _STD_STREAMS[path]
        m = _FD_PATH.match(path)
        if m and (m.group(1) is None or int(m.group(1)) == os.getpid()):
            return int(m.group(2))
        if seen > 40 or not os.path.islink(path):
            return None
        target = os.readlink(path)
        path = os.path.normpath(os.path.join(os.path.dirname(path), target))
        seen += 1


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fail(path: str, e: OSError) -> FileError:
    return FileError(f"cannot write {path}: {e.strerror or e}")


def write_output(path: str, text: str) -> None:
    """Write ``text`` to ``path`` as the module docstring says; :class:`FileError` names the file on failure."""
    data = text.encode("utf-8")
    write_with(path, lambda fd: _write_all(fd, data))


def write_with(path: str, fill: Callable[[int], None]) -> None:
    """Write to ``path`` as :func:`write_output` does, the bytes written by ``fill(fd)``.

    For output that is streamed rather than held in memory (a capsule's tensors):
    ``fill`` writes everything to the descriptor it is given; when it raises, a
    regular file is left untouched.
    """
    fd = _own_fd(path)
    if fd is not None:
        _write_fd(path, fd, fill)
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _fail(path, e) from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            raise FileError(f"cannot write {path}: it is a directory")
        _write_through(path, fill)
        return
    _replace(os.path.realpath(path), path, fill, st)


def write_stdout(text: str) -> None:
    """Write ``text`` to ``sys.stdout`` in full, or raise :class:`FileError`.

    A process's own stdout is written at the descriptor level, in a loop: through
    ``sys.stdout``, a write cut short (a full disk, ``ulimit -f``) is lost without
    an error when Python's stdout is unbuffered (``PYTHONUNBUFFERED``), and is only
    seen at exit otherwise.
    """
    stream = sys.stdout
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        fd = None
    try:
        if fd is None:  # a stream that is not a file (a test's capture)
            stream.write(text)
            stream.flush()
        else:
            stream.flush()
            _write_all(fd, text.encode("utf-8"))
    except OSError as e:
        if e.errno == errno.EBADF:
            raise FileError("stdout is closed") from None
        raise FileError(f"cannot write stdout: {e.strerror or e}") from None


def hold_closed_std_fds() -> None:
    """Put ``/dev/null``, read-only, on each of descriptors 0, 1 and 2 that is closed.

    A process started with ``2>&-`` would otherwise hand descriptor 2 to the next
    file it opens, and ``-o /dev/stderr`` would write the report into that file;
    held, a write there fails (``EBADF``) as on a closed descriptor.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        held = os.open(os.devnull, os.O_RDONLY)  # the lowest free number: fd itself, as 0..fd-1 are open
        if held != fd:
            os.dup2(held, fd, inheritable=False)
            os.close(held)


def same_file(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are one existing regular file (the same path, a symlink or a hard link)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(sa.st_mode) and (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _write_fd(path: str, fd: int, fill: Callable[[int], None]) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None and stream.fileno() == fd:
                stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    try:
        fill(fd)
    except OSError as e:
        raise _fail(path, e) from None


def _write_through(path: str, fill: Callable[[int], None]) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _fail(path, e) from None
    try:
        fill(fd)
    except OSError as e:
        raise _fail(path, e) from None
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _replace(real: str, shown: str, fill: Callable[[int], None], st: os.stat_result | None) -> None:
    """Temp file beside ``real``, mode and owner set, fsync, rename: ``real`` is whole or untouched."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".opaudit-", suffix=".tmp", dir=os.path.dirname(real))
    except OSError as e:
        raise _fail(shown, e) from None
    try:
        if st is None:
            os.fchmod(fd, 0o666 & ~_umask())
        else:
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                try:
                    os.fchown(fd, st.st_uid, st.st_gid)
                except OSError:
                    pass  # not ours to give away: the mode is still kept
        fill(fd)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, real)
    except BaseException as e:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _fail(shown, e) from None
        raise


def is_replaced(path: str) -> bool:
    """Whether :func:`write_output` writes ``path`` through a temp file and a rename (a regular file)."""
    if _own_fd(path) is not None:
        return False
    real = os.path.realpath(path)
    return not os.path.exists(real) or os.path.isfile(real)


def check_writable(path: str) -> None:
    """Refuse, before any work, an output path that cannot be written; :class:`FileError` says why."""
    if _own_fd(path) is not None:
        return
    if os.path.isdir(path):
        raise FileError(f"cannot write {path}: it is a directory")
    real = os.path.realpath(path)
    if os.path.exists(real) and not os.path.isfile(real):
        if not os.access(real, os.W_OK):
            raise FileError(f"cannot write {path}: permission denied")
        return
    parent = os.path.dirname(real)
    if not os.path.isdir(parent):
        raise FileError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(real) and not os.access(real, os.W_OK)):
        raise FileError(f"cannot write {path}: permission denied")


def read_input(path: str, limit: int = MAX_INPUT_BYTES) -> str:
    """The UTF-8 text of the regular file ``path``, at most ``limit`` bytes; :class:`FileError` otherwise."""
    raw = read_bytes(path, limit)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FileError(f"{path}: not UTF-8 text") from None


def open_regular(path: str, limit: int, what: str = "input files", label: str | None = None) -> BinaryIO:
    """The regular file ``path`` open for reading, checked to be at most ``limit`` bytes; :class:`FileError`
    otherwise (a directory, a device, a FIFO, a larger file: ``what`` names what opaudit reads up to ``limit``).
    ``label`` names the file in the messages (default: ``path``)."""
    name = label or path
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileError(f"{name}: no such file") from None
    except OSError as e:
        raise FileError(f"{name}: cannot read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        # Before fdopen, which refuses a directory with "Is a directory: <fd>".
        if stat.S_ISDIR(st.st_mode):
            raise FileError(f"{name}: is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise FileError(f"{name}: not a regular file (a device, FIFO or socket); opaudit reads files only")
        if st.st_size > limit:
            size = _size_text(st.st_size)
            if round(st.st_size / 2**20) <= limit / 2**20:  # rounded, it would read as no more than the limit
                size = f"{st.st_size} bytes"
            raise FileError(f"{name}: too large ({size}; opaudit reads {what} up to {_size_text(limit)})")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_bytes(path: str, limit: int = MAX_INPUT_BYTES, what: str = "input files") -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` (see :func:`open_regular`)."""
    with open_regular(path, limit, what) as f:
        try:
            raw = f.read(limit + 1)
        except OSError as e:
            raise FileError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > limit:
        raise FileError(f"{path}: too large (over {_size_text(limit)}; opaudit reads {what} up to {_size_text(limit)})")
    return raw


def _size_text(n: int) -> str:
    if n >= 2**30 and n % 2**30 == 0:
        return f"{n >> 30} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"
