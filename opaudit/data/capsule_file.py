"""The capsule file: a zip archive of ``manifest.json`` and raw byte members, written atomically, read warily.

Why a zip of JSON and raw bytes rather than ``torch.save``: loading it runs no
code at all (no unpickler, restricted or not), every size is known from the
manifest and the zip's directory before a byte is allocated, and any language can
read it. Members are deflated when a sample of them shows that it pays (masks,
indices, zeros); float noise, which deflate barely shrinks, is stored as it is.

Reading refuses, with one line each: a file that is not a regular file, is empty,
is not a zip archive, has a zip directory longer than :data:`MAX_DIRECTORY_BYTES`
(before it is parsed), is truncated or corrupt (the zip's CRCs), holds members the manifest does not name or lacks ones it names, declares members of another size
than the manifest, is of another format version, or declares more bytes than the
caller's limit.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from collections.abc import Iterable
from typing import Any, BinaryIO

from opaudit.data.capsule import Blob, CapsuleError, Manifest, from_dict
from opaudit.data.fileio import open_regular, write_with

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 256 * 2**20
"""Largest ``manifest.json`` read (a capsule of thousands of signatures has a few MB)."""
MAX_MEMBERS = 1 << 18
"""Most members a capsule holds (the manifest and its arrays; a capture of thousands of signatures writes
tens of thousands): capture refuses to write more."""
MAX_DIRECTORY_BYTES = 24 * 2**20
"""Largest zip directory read: :data:`MAX_MEMBERS` entries of a capsule's names take less. Checked before
the directory is parsed (zipfile makes a Python object of every entry, and a small file can list millions:
the directory's size, not its entry count, which zipfile does not trust either, is what bounds them)."""
_LOCAL_HEADER = 30
"""Bytes of a zip local file header before its name."""
_MAX_DEFLATE = 1032
"""Deflate's largest expansion: one 258-byte match per two bits at best."""
_EPOCH = (1980, 1, 1, 0, 0, 0)
"""Every member's timestamp: two captures of the same step write the same bytes."""
_SAMPLE = 1 << 12


def _worth_compressing(data: memoryview) -> bool:
    """Whether deflate shrinks samples of ``data`` to a quarter or less (zeros, masks, small integers: fast to
    deflate, and big savings); float data, which it shrinks by a third at best and slowly, is stored as it
    is (a capture's time matters more than those bytes)."""
    n = len(data)
    if n < 256:
        return False
    picks = [bytes(data[i:i + _SAMPLE]) for i in sorted({0, max(0, n // 2 - _SAMPLE // 2), max(0, n - _SAMPLE)})]
    sample = b"".join(picks)
    return len(zlib.compress(sample, 1)) < 0.25 * len(sample)


def write_capsule(path: str, manifest: Manifest, blobs: Iterable[tuple[str, memoryview]]) -> int:
    """Write the capsule to ``path`` (atomically for a regular file); return its size in bytes.

    ``blobs`` yields ``(name, bytes)`` for every blob the manifest names, each once.
    """
    text = json.dumps(manifest.to_dict(), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    written = [0]

    def fill(fd: int) -> None:
        with os.fdopen(os.dup(fd), "wb") as f:
            with zipfile.ZipFile(f, "w", allowZip64=True) as zf:
                _member(zf, MANIFEST, memoryview(text.encode("utf-8")), True)
                for count, (name, data) in enumerate(blobs, 2):
                    if count > MAX_MEMBERS:
                        raise CapsuleError(f"{path}: more than {MAX_MEMBERS - 1} arrays, more than a capsule holds "
                                           "(a smaller --capture-budget, or --digests-only, stores fewer)")
                    _member(zf, name, data, _worth_compressing(data))
            written[0] = f.tell()

    write_with(path, fill)
    return written[0]


def _member(zf: zipfile.ZipFile, name: str, data: memoryview, compress: bool) -> None:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data, compresslevel=1 if compress else None)


class CapsuleFile:
    """An open capsule: its checked :attr:`manifest`, and its blobs read on demand into the caller's buffers.

    >>> with CapsuleFile.open("step.opcap", limit=8 * 2**30) as cap:
    ...     cap.read_into(blob, buffer)

    ``limit`` bounds the bytes the capsule declares (stored tensors plus those rebuilt
    from their form only): a capsule past it is refused before anything is allocated.
    """

    def __init__(self, path: str, f: BinaryIO, zf: zipfile.ZipFile, manifest: Manifest, size: int) -> None:
        self.path = path
        self.manifest = manifest
        self.size = size
        """The file's size in bytes."""
        self._f = f
        self._zf = zf

    @classmethod
    def open(cls, path: str, limit: int) -> "CapsuleFile":
        """Open and check ``path``; :class:`CapsuleError` with a one-line reason otherwise."""
        f = open_regular(path, limit + MAX_MANIFEST_BYTES, "capsules (--max-memory)")
        try:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise CapsuleError(f"{path}: empty file, not a capsule")
            zf = _zip(f, path)
            manifest = _manifest(zf, path)
            _check_members(zf, manifest, path, limit)
        except BaseException:
            f.close()
            raise
        return cls(path, f, zf, manifest, size)

    def read_into(self, blob: Blob, buffer: Any) -> None:
        """Fill ``buffer`` (writable, exactly ``blob.nbytes`` long) with the blob's bytes, CRC checked."""
        view = memoryview(buffer).cast("B")
        if len(view) != blob.nbytes:
            raise ValueError(f"buffer of {len(view)} bytes for a blob of {blob.nbytes}")
        try:
            with self._zf.open(blob.name) as member:
                done = 0
                while done < len(view):
                    n = member.readinto(view[done:])
                    if not n:
                        break
                    done += n
                if done != len(view) or member.read(1):
                    raise CapsuleError(f"{self.path}: {blob.name} holds another size than its directory says")
        except CapsuleError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError, NotImplementedError) as e:
            raise CapsuleError(f"{self.path}: corrupt capsule ({blob.name}: {_first(e)})") from None

    def close(self) -> None:
        """Close the file."""
        self._zf.close()
        self._f.close()

    def __enter__(self) -> "CapsuleFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _zip(f: BinaryIO, path: str) -> zipfile.ZipFile:
    try:
        # The end record says how long the directory is: read before zipfile parses every entry of it.
        end = zipfile._EndRecData(f)  # type: ignore[attr-defined]
        directory = end[zipfile._ECD_SIZE] if end is not None else 0  # type: ignore[attr-defined]
        if directory > MAX_DIRECTORY_BYTES:
            raise CapsuleError(f"{path}: its zip directory takes {_size(directory)}, more than a capsule's "
                               f"({_size(MAX_DIRECTORY_BYTES)} at most: {MAX_MEMBERS} members)")
        return zipfile.ZipFile(f)
    except zipfile.BadZipFile as e:
        raise CapsuleError(f"{path}: not an opaudit capsule, or truncated ({_first(e)})") from None
    except (OSError, ValueError, EOFError, OverflowError, NotImplementedError, RuntimeError) as e:
        raise CapsuleError(f"{path}: corrupt capsule ({_first(e)})") from None


def _manifest(zf: zipfile.ZipFile, path: str) -> Manifest:
    try:
        info = zf.getinfo(MANIFEST)
    except KeyError:
        raise CapsuleError(f"{path}: not an opaudit capsule (no {MANIFEST} in the archive)") from None
    if info.file_size > MAX_MANIFEST_BYTES:
        raise CapsuleError(f"{path}: {MANIFEST} declares {_size(info.file_size)}, more than a manifest holds")
    try:
        raw = zf.read(info)
        data = json.loads(raw.decode("utf-8"))
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as e:
        raise CapsuleError(f"{path}: corrupt capsule ({MANIFEST}: {_first(e)})") from None
    except UnicodeDecodeError:
        raise CapsuleError(f"{path}: {MANIFEST} is not UTF-8 text") from None
    except RecursionError:
        raise CapsuleError(f"{path}: {MANIFEST} is nested too deeply") from None
    except ValueError as e:
        raise CapsuleError(f"{path}: {MANIFEST} is not valid JSON ({_first(e)})") from None
    try:
        return from_dict(data, path)
    except RecursionError:
        raise CapsuleError(f"{path}: {MANIFEST} is nested too deeply") from None


def _check_members(zf: zipfile.ZipFile, manifest: Manifest, path: str, limit: int) -> None:
    """Every member is the manifest or a blob it names, each blob's size is what the manifest says, and the
    total fits in ``limit``: all before a byte of tensor data is read."""
    infos = {}
    for info in zf.infolist():
        if info.filename in infos:
            raise CapsuleError(f"{path}: member {info.filename!r} appears twice")
        infos[info.filename] = info
    declared: dict[str, int] = {}
    for blob in manifest.blobs():
        if declared.setdefault(blob.name, blob.nbytes) != blob.nbytes:
            raise CapsuleError(f"{path}: {blob.name} is declared with two sizes")
    for name in infos:
        if name != MANIFEST and name not in declared:
            raise CapsuleError(f"{path}: unexpected member {name!r} (a capsule holds only {MANIFEST} and the "
                               "blobs it names)")
    for name, n in declared.items():
        info = infos.get(name)
        if info is None:
            raise CapsuleError(f"{path}: {name} is missing (truncated or hand-edited?)")
        if info.file_size != n:
            raise CapsuleError(f"{path}: {name} holds {info.file_size} bytes, the manifest says {n}")
        if info.flag_bits & 0x1:
            raise CapsuleError(f"{path}: {name} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CapsuleError(f"{path}: {name} uses an unsupported compression")
        _check_in_file(zf, info, path)
    total = sum(declared.values()) + manifest.unbacked_bytes()
    if total > limit:
        raise CapsuleError(f"{path}: declares {_size(total)} of tensor data, more than the limit here "
                           f"({_size(limit)}: --max-memory)")
    largest, what = manifest.largest_tensor()
    if largest > limit:
        raise CapsuleError(f"{path}: {what} takes {_size(largest)}, more than the limit here "
                           f"({_size(limit)}: --max-memory)")


def _check_in_file(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> None:
    """The member's bytes lie inside the file, and its size is one they can hold: a zip directory that claims
    gigabytes for a small file is refused here, not after a buffer of that size was allocated for it."""
    end = info.header_offset + _LOCAL_HEADER + len(info.orig_filename.encode("utf-8")) + info.compress_size
    if end > zf.start_dir:
        raise CapsuleError(f"{path}: {info.filename} reaches past the end of its data ({_size(info.compress_size)} "
                           f"declared at byte {info.header_offset} of a file whose data ends at byte {zf.start_dir}: "
                           "truncated or hand-edited?)")
    most = info.compress_size if info.compress_type == zipfile.ZIP_STORED else _MAX_DEFLATE * info.compress_size + 1024
    if info.file_size > most:
        raise CapsuleError(f"{path}: {info.filename} declares {_size(info.file_size)} stored in "
                           f"{_size(info.compress_size)}, more than those bytes can hold")


def _first(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _size(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
