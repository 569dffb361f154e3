"""The trace file (``.optrace``): every op call of one run, streamed as it happens, compressed and versioned.

``opaudit trace`` writes one; ``opaudit compare`` reads two, side by side, in one
pass each. Neither side ever holds more than one block of calls and the tables of
names (ops, sites, tensor shapes), so memory does not grow with the length of a run.

The layout (little endian)::

    b"OPAUDIT-TRACE\\n"  u16 version
    frame*            kind (1 byte)  u32 raw length  u32 compressed length  zlib data
      H  header: JSON (format, version, target, window, settings, environment, rank)
      B  block: records, back to back
      E  end: JSON (calls, steps, how the run ended, digests of its final tensors)
    record:
      D  table (u8: 0 ops, 1 sites, 2 metas)  id (u32)  length (u32)  UTF-8 text: defines a name once
      V  op (u32): a view or metadata call (counted, not digested)
      C  op (u32)  site (u32)  phase bits (u8)  flags (u8)  step (u32)  inputs (u16)  outputs (u16)
         written (u16), then one digest per input and per output: meta (u32) h1 (u32) h2 (u32)

A digest's meta names what was digested (``torch.float32[8,128]``, with the strides
of a tensor read in memory order; ``int``, ``float``... for other arguments); h1 and
h2 are :func:`opaudit.aten.bitwise.digest`'s two sums (a hash of its text for a
non-tensor). The last ``written`` outputs are inputs the op wrote and did not return.

Trace files are read as hostile input: the magic, the version, every frame's
lengths (bounded before anything is allocated, so a decompression bomb is refused
by its header), every table reference and record length are checked, and a file
without its end frame is truncated. Every failure is a :class:`TraceError`: one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO, NamedTuple

from opaudit.data.errors import OpauditError
from opaudit.data.fileio import FileError, open_regular
from opaudit.data.site import Site, parse_site

FORMAT = "opaudit-trace"
VERSION = 1
MAGIC = b"OPAUDIT-TRACE\n"
SUFFIX = ".optrace"

OPS, SITES, METAS = 0, 1, 2
"""The name tables a ``D`` record defines an entry of."""
NO_SITE = 0xFFFFFFFF

FLAG_LOSS = 1
"""The call is ``backward()``'s gradient seed: its input is the loss."""
FLAG_COLLECTIVE = 2
"""The call is a collective (``c10d``, functional collectives)."""
FLAG_UNINITIALIZED = 4
"""The call returns uninitialized memory (``empty``): its outputs are not digested."""

BLOCK_BYTES = 1 << 20
"""Raw bytes a writer gathers before it compresses and writes a block."""
MAX_FRAME_BYTES = 16 << 20
"""Largest raw (decompressed) frame a reader accepts: a bomb is refused by its header."""
MAX_TABLE = 1 << 20
"""Most entries a name table may hold (each entry is at most :data:`MAX_NAME_BYTES`)."""
MAX_NAME_BYTES = 1 << 16
MAX_TRACE_BYTES = 64 << 30
"""Largest trace file read (a 1,000,000-call trace is tens of MB)."""

_PREAMBLE = struct.Struct("<H")
_FRAME = struct.Struct("<cII")
_DEF = struct.Struct("<BII")
_VIEW = struct.Struct("<I")
_CALL = struct.Struct("<IIBBIHHH")
_DIGEST = struct.Struct("<III")
_M32 = 0xFFFFFFFF


class TraceError(OpauditError):
    """A trace file that cannot be read: not a trace, truncated, corrupt, too large, another version."""


# -- writing ---------------------------------------------------------------------
def _meta_text(d: tuple) -> str:
    """The meta of a tracer digest: what was digested, without its bits."""
    if len(d) >= 4 and isinstance(d[0], str) and isinstance(d[1], tuple):
        dt = d[0][6:] if d[0].startswith("torch.") else d[0]
        text = f"{dt}[{','.join(map(str, d[1]))}]"
        return text + f"@{','.join(map(str, d[4]))}" if len(d) == 5 else text
    return "|".join(map(str, d))  # ("uninitialized",), ("undigestable", ...)


class TraceWriter:
    """Streams calls to ``path``: written to a temp file beside it and renamed into place by :meth:`close`.

    The file is whole or absent: :meth:`abort` (or an exception inside ``with``)
    removes the temp file and leaves ``path`` as it was.
    """

    def __init__(self, path: str, header: Mapping[str, Any]) -> None:
        self.path = os.path.abspath(path)
        self.calls = 0
        """Calls written so far, views included: the 1-based index of the last one."""
        self._buf = bytearray()
        self._tables: tuple[dict[Any, int], dict[Any, int], dict[Any, int]] = ({}, {}, {})
        self._file, self._tmp = _open_output(self.path)
        self._file.write(MAGIC + _PREAMBLE.pack(VERSION))
        self._frame(b"H", json.dumps({"format": FORMAT, "version": VERSION, **header}, sort_keys=True).encode())

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()

    def _frame(self, kind: bytes, raw: bytes) -> None:
        data = zlib.compress(raw, 1)
        self._file.write(_FRAME.pack(kind, len(raw), len(data)))
        self._file.write(data)

    def _id(self, table: int, key: Any, text: Any) -> int:
        ids = self._tables[table]
        i = ids.get(key)
        if i is None:
            i = ids[key] = len(ids)
            raw = (text() if callable(text) else text).encode("utf-8")
            self._buf += b"D" + _DEF.pack(table, i, len(raw))
            self._buf += raw
        return i

    def op_id(self, op: Any) -> int:
        """The id of op overload ``op`` (its ``str``), defined in the file the first time."""
        return self._id(OPS, op, lambda: str(op))

    def site_id(self, key: Any, site: Site) -> int:
        """The id of ``site``, cached under ``key`` (the site tracker's own id)."""
        return self._id(SITES, key, lambda: json.dumps(site.to_dict(), sort_keys=True))

    def _digests(self, ds: tuple) -> bytes:
        out = bytearray()
        for d in ds:
            if type(d) is tuple and len(d) >= 4 and type(d[2]) is int:
                key = (d[0], d[1], d[4]) if len(d) == 5 else (d[0], d[1])
                out += _DIGEST.pack(self._id(METAS, key, lambda d=d: _meta_text(d)), d[2] & _M32, d[3] & _M32)
            elif type(d) is tuple:
                out += _DIGEST.pack(self._id(METAS, d, lambda d=d: _meta_text(d)), 0, 0)
            else:  # a non-tensor argument (the tracer's value key): its type, and a hash of its text
                h = hashlib.blake2b(repr(d).encode(), digest_size=8).digest()
                meta = self._id(METAS, type(d).__name__, type(d).__name__)
                out += _DIGEST.pack(meta, *struct.unpack("<II", h))
        return bytes(out)

    def encode(self, d: Any) -> list[Any]:
        """A digest as ``[meta, h1, h2]`` (JSON), as :meth:`TraceReader.digests` reads them back."""
        return [_meta_text(d) if type(d) is tuple else type(d).__name__, *_DIGEST.unpack(self._digests((d,)))[1:]]

    def view(self, op: Any) -> None:
        """Count a view or metadata call (nothing of it is digested)."""
        i = self.op_id(op)
        self._buf += b"V" + _VIEW.pack(i)
        self.calls += 1
        self._maybe_flush()

    def call(self, op: Any, site: int | None, phase: int, flags: int, step: int, ins: tuple,
             outs: tuple | None, written: int = 0) -> None:
        """Write one call: ``site`` from :meth:`site_id`, the tracer's digests of its inputs and outputs."""
        i = self.op_id(op)
        if outs is None:
            flags |= FLAG_UNINITIALIZED
            outs = ()
        body = self._digests(ins) + self._digests(outs)
        self._buf += b"C" + _CALL.pack(i, NO_SITE if site is None else site, phase, flags, step, len(ins), len(outs),
                                       written)
        self._buf += body
        self.calls += 1
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self._buf) >= BLOCK_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._frame(b"B", bytes(self._buf))
            self._buf.clear()

    def close(self, end: Mapping[str, Any]) -> None:
        """Write the last block and the end frame, then put the file in place."""
        self._flush()
        self._frame(b"E", json.dumps({"calls": self.calls, **end}, sort_keys=True).encode())
        f, self._file = self._file, None
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            if self._tmp is not None:
                os.replace(self._tmp, self.path)
                self._tmp = None
        except OSError as e:
            self.abort()
            raise TraceError(f"cannot write {self.path}: {e.strerror or e}") from None

    def abort(self) -> None:
        """Drop what was written: ``path`` is left as it was."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
            self._tmp = None


def _open_output(path: str) -> tuple[BinaryIO, str | None]:
    """A temp file beside ``path`` (a regular file or a new one), with the mode a plain ``open`` would give;
    a device such as ``/dev/null`` is written straight through."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise TraceError(f"cannot write {path}: {e.strerror or e}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise TraceError(f"cannot write {path}: it is a directory")
    try:
        if st is not None and not stat.S_ISREG(st.st_mode):
            return open(path, "wb"), None  # closed by the writer
        fd, tmp = tempfile.mkstemp(prefix=".opaudit-", suffix=".tmp", dir=os.path.dirname(path))
        os.fchmod(fd, st.st_mode & 0o7777 if st is not None else 0o666 & ~_umask())
        return os.fdopen(fd, "wb"), tmp
    except OSError as e:
        raise TraceError(f"cannot write {path}: {e.strerror or e}") from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -- reading ---------------------------------------------------------------------
class Call(NamedTuple):
    """One call read back (views are counted in ``index`` but not yielded); a tuple: millions are read."""

    index: int
    """1-based position among every call of the run, views included (the audit's ``first_call``)."""
    op: int
    site: int
    """Index into :attr:`TraceReader.sites`; :data:`NO_SITE` for none."""
    phase: int
    flags: int
    step: int
    ins: bytes
    """The input digests, packed: equal bytes mean bitwise equal inputs."""
    outs: bytes
    n_out: int
    written: int


class TraceReader:
    """One trace file, read as a stream: :attr:`header` at once, :meth:`calls` in order, then :attr:`end`."""

    def __init__(self, path: str, label: str | None = None) -> None:
        self.path = path
        self.label = label or path
        self.ops: list[str] = []
        self.sites: list[Site] = []
        self.metas: list[str] = []
        self.end: dict[str, Any] | None = None
        self._f = _open_input(path, self.label)
        try:
            head = self._f.read(len(MAGIC) + _PREAMBLE.size)
            if not head:
                raise TraceError(f"{self.label}: empty, not a trace")
            if head[:len(MAGIC)] != MAGIC:
                raise TraceError(f"{self.label}: not an opaudit trace (no {FORMAT} header)")
            if len(head) < len(MAGIC) + _PREAMBLE.size:
                raise TraceError(f"{self.label}: truncated (the file ends inside its header)")
            (version,) = _PREAMBLE.unpack_from(head, len(MAGIC))
            if version != VERSION:
                raise TraceError(f"{self.label}: {FORMAT} version {version} is not supported "
                                 f"(this opaudit reads version {VERSION})")
            kind, raw = self._next_frame()
            if kind != b"H":
                raise TraceError(f"{self.label}: corrupt (the first frame is not the header)")
            self.header = _check_header(_json(raw, self.label, "header"), self.label)
        except BaseException:
            self._f.close()
            raise

    def close(self) -> None:
        """Close the file (also done when :meth:`calls` is exhausted)."""
        self._f.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _next_frame(self) -> tuple[bytes, bytes]:
        head = self._f.read(_FRAME.size)
        if len(head) < _FRAME.size:
            raise TraceError(f"{self.label}: truncated (the file ends before its end record: the run that wrote it "
                             "did not finish)")
        kind, raw_len, comp_len = _FRAME.unpack(head)
        if kind not in (b"H", b"B", b"E"):
            raise TraceError(f"{self.label}: corrupt (unknown frame {kind!r})")
        if raw_len > MAX_FRAME_BYTES or comp_len > raw_len + raw_len // 100 + 1024:
            raise TraceError(f"{self.label}: corrupt (a frame claims {raw_len} bytes from {comp_len}; at most "
                             f"{MAX_FRAME_BYTES} are read)")
        data = self._f.read(comp_len)
        if len(data) < comp_len:
            raise TraceError(f"{self.label}: truncated (the file ends inside a frame)")
        d = zlib.decompressobj()
        try:
            raw = d.decompress(data, raw_len + 1)
        except zlib.error:
            raise TraceError(f"{self.label}: corrupt (a frame does not decompress)") from None
        if len(raw) != raw_len or not d.eof or d.unused_data or d.unconsumed_tail:
            raise TraceError(f"{self.label}: corrupt (a frame's length does not match its data)")
        return kind, raw

    def calls(self) -> Iterator[Call]:
        """Every call that is not a view, in order; sets :attr:`end` once the end frame is read."""
        index = 0
        try:
            while True:
                kind, raw = self._next_frame()
                if kind == b"E":
                    self.end = _check_end(_json(raw, self.label, "end record"), self.label)
                    if self._f.read(1):
                        raise TraceError(f"{self.label}: corrupt (data after the end record)")
                    if self.end["calls"] != index:
                        raise TraceError(f"{self.label}: corrupt (the end record counts {self.end['calls']} calls, "
                                         f"the file holds {index})")
                    return
                if kind != b"B":
                    raise TraceError(f"{self.label}: corrupt (a second header)")
                for call in self._records(raw, index):
                    if call is None:
                        index += 1
                        continue
                    index = call.index
                    yield call
        finally:
            self._f.close()

    def _records(self, raw: bytes, index: int) -> Iterator[Call | None]:
        """The block's calls (``None`` for a view); definitions go to the tables."""
        pos, n = 0, len(raw)
        tables = (self.ops, self.sites, self.metas)
        call_size, dig = _CALL.size, _DIGEST.size
        try:
            while pos < n:
                tag = raw[pos]
                pos += 1
                if tag == 0x43:  # C
                    op, site, phase, flags, step, n_in, n_out, written = _CALL.unpack_from(raw, pos)
                    pos += call_size
                    a = pos + n_in * dig
                    b = a + n_out * dig
                    if b > n or op >= len(self.ops) or (site != NO_SITE and site >= len(self.sites)) \
                            or written > n_out:
                        raise TraceError(f"{self.label}: corrupt (a call record is cut or names what the file "
                                         "never defined)")
                    index += 1
                    yield Call(index, op, site, phase, flags, step, raw[pos:a], raw[a:b], n_out, written)
                    pos = b
                elif tag == 0x56:  # V
                    (op,) = _VIEW.unpack_from(raw, pos)
                    pos += _VIEW.size
                    if op >= len(self.ops):
                        raise TraceError(f"{self.label}: corrupt (a call names an op the file never defined)")
                    index += 1
                    yield None
                elif tag == 0x44:  # D
                    table, i, length = _DEF.unpack_from(raw, pos)
                    pos += _DEF.size
                    if table > METAS or length > MAX_NAME_BYTES or pos + length > n:
                        raise TraceError(f"{self.label}: corrupt (a name definition is cut or too long)")
                    if i != len(tables[table]):
                        raise TraceError(f"{self.label}: corrupt (names defined out of order)")
                    if i >= MAX_TABLE:
                        raise TraceError(f"{self.label}: too many distinct names (more than {MAX_TABLE})")
                    text = raw[pos:pos + length].decode("utf-8")
                    pos += length
                    tables[table].append(self._site(text) if table == SITES else text)
                else:
                    raise TraceError(f"{self.label}: corrupt (unknown record {tag:#04x})")
        except (struct.error, UnicodeDecodeError):
            raise TraceError(f"{self.label}: corrupt (a record is cut short)") from None

    def _site(self, text: str) -> Site:
        from opaudit.data.fields import ReportError

        try:
            return parse_site(json.loads(text), "site")
        except (ValueError, ReportError) as e:
            raise TraceError(f"{self.label}: corrupt (a site: {e})") from None

    def digests(self, packed: bytes) -> list[tuple[str, int, int]]:
        """``(meta, h1, h2)`` of each digest in ``packed`` (a call's ``ins`` or ``outs``)."""
        out = []
        for k in range(0, len(packed), _DIGEST.size):
            meta, h1, h2 = _DIGEST.unpack_from(packed, k)
            if meta >= len(self.metas):
                raise TraceError(f"{self.label}: corrupt (a digest names what the file never defined)")
            out.append((self.metas[meta], h1, h2))
        return out


def _open_input(path: str, label: str) -> BinaryIO:
    """``path`` open for reading: a regular file of at most :data:`MAX_TRACE_BYTES`; :class:`TraceError` otherwise."""
    try:
        return open_regular(path, MAX_TRACE_BYTES, "traces", label)
    except FileError as e:
        raise TraceError(str(e)) from None


def _json(raw: bytes, label: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise TraceError(f"{label}: corrupt ({what} is not JSON)") from None
    if not isinstance(data, dict):
        raise TraceError(f"{label}: corrupt ({what} is not a mapping)")
    return data


_HEADER_FIELDS: dict[str, type | tuple[type, ...]] = {
    "target": dict, "window": dict, "settings": dict, "environment": dict, "variables": dict}


def _check_header(data: dict[str, Any], label: str) -> dict[str, Any]:
    if data.get("format") != FORMAT:
        raise TraceError(f"{label}: format is {data.get('format')!r}, expected {FORMAT!r}")
    v = data.get("version")
    if type(v) is not int or v != VERSION:
        raise TraceError(f"{label}: {FORMAT} version {v!r} is not supported (this opaudit reads version {VERSION})")
    for key, types in _HEADER_FIELDS.items():
        if not isinstance(data.get(key), types):
            raise TraceError(f"{label}: corrupt (header field {key!r} missing or of the wrong type)")
    target = data["target"]
    if not isinstance(target.get("script"), str) or not isinstance(target.get("sha256"), str):
        raise TraceError(f"{label}: corrupt (the header names no script)")
    rank = data.get("rank")
    if rank is not None and not (isinstance(rank, dict) and all(
            type(rank.get(k)) is int and rank[k] >= 0 for k in ("rank", "world_size"))
            and rank["rank"] < rank["world_size"]):
        raise TraceError(f"{label}: corrupt (header field 'rank')")
    return data


def _check_end(data: dict[str, Any], label: str) -> dict[str, Any]:
    if type(data.get("calls")) is not int or not isinstance(data.get("final", {}), dict):
        raise TraceError(f"{label}: corrupt (the end record)")
    return data
