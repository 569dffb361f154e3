"""The capsule manifest: what ``opaudit capture`` wrote, as frozen records, and its strict dict form.

A capsule (``step.opcap``) is a zip archive: ``manifest.json`` (this model) and one
member of raw bytes per stored array (``b/0``, ``b/1``...: :class:`Blob`). The
manifest says, for each unique op signature of the recorded window, how to rebuild
the arguments of its captured calls (dtypes, shapes, strides, storage offsets,
which arguments share a buffer) and what the source machine computed: the outputs
in default and in deterministic mode, as bytes (or, past the budget and with
``--digests-only``, as digests).

Reading is strict and happens before anything is allocated: every field is
type-checked, every tensor's span must fit in the bytes its buffer declares, every
output's bytes must match its dtype and shape, and the total the capsule declares
must fit in the limit the caller gives. Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from opaudit.data.errors import OpauditError
from opaudit.data.fields import Types, choice, ints, mapping, need, opt, strings
from opaudit.data.files import check_environment, check_header, check_settings
from opaudit.data.site import Site, parse_site

FORMAT = "opaudit-capsule"
VERSION = 2
"""Version 2 gives an output whose bytes are stored no digest (the bytes say more, and hashing them cost a
capture a fifth of its own time); version 1 gave every output one."""
READABLE = (1, 2)
"""The versions this opaudit reads: a version 1 capsule is a version 2 one whose stored outputs also have digests."""

MODES = ("default", "deterministic")
"""The determinism settings the source's outputs were computed under."""

DTYPE_SIZES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
    "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
}
"""Element size of every dtype a capsule may hold (by ``torch.<name>``); any other is refused."""

MAX_DIMS = 64
MAX_GENERATOR_BYTES = 2**20
"""An RNG state is a few KiB (CPU: 5056 bytes); anything bigger is not one."""
MAX_TEXT = 1 << 16
"""Longest string field accepted (error texts, signatures)."""

_BLOB_NAME = re.compile(r"b/[0-9]{1,9}")
_DEVICE = re.compile(r"[a-z][a-z0-9_]{0,15}(:[0-9]{1,4})?")
_DIGEST = re.compile(r"[0-9a-f]{32}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
VALUE_TAGS = ("tensor", "list", "tuple", "dtype", "device", "layout", "memory_format", "float", "complex")
"""The one-key objects an argument's JSON form may hold (see :mod:`opaudit.aten.portable`)."""


class CapsuleError(OpauditError):
    """A capsule file that cannot be read: not a capsule, truncated, corrupt, of another version, or too big."""


@dataclass(frozen=True)
class Blob:
    """One zip member of raw bytes."""

    name: str
    nbytes: int


@dataclass(frozen=True)
class Buffer:
    """The bytes of one input storage, over the span its tensors touch."""

    blob: Blob
    base: int
    """Byte offset, in the original storage, at which the stored span starts (a multiple of 16, so
    that each tensor keeps its alignment)."""
    device: str


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument: a view of one :class:`Buffer`, or its form only (``buffer`` ``None``)."""

    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    device: str
    buffer: int | None = None
    """Index into :attr:`Capture.buffers`; ``None``: rebuilt uninitialized (its values never matter)."""
    offset: int = 0
    """Storage offset in elements, in the original storage."""
    written: bool = False
    """The op writes this argument (compared as an output)."""

    @property
    def numel(self) -> int:
        """Element count."""
        return math.prod(self.shape)

    @property
    def span_bytes(self) -> int:
        """Bytes from its first element to its last: what rebuilding it allocates (strides included)."""
        if self.numel == 0:
            return 0
        return (sum((s - 1) * st for s, st in zip(self.shape, self.stride)) + 1) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class GeneratorArg:
    """An explicit ``generator=`` argument, as its state when the call was captured."""

    device: str
    state: Blob


@dataclass(frozen=True)
class Output:
    """One output (or mutated input) as the source computed it."""

    name: str
    """``output``, ``output 1``, ``input self``..."""
    digest: str | None
    """Digest of its bits (:func:`opaudit.aten.portable.content_digest`), for an output whose bytes are not
    stored (a number, ``--digests-only``, past the budget); ``None`` when :attr:`blob` holds them."""
    dtype: str = ""
    """Empty for a non-tensor output (a Python number)."""
    shape: tuple[int, ...] = ()
    blob: Blob | None = None
    """Its bytes, contiguous; ``None`` with ``--digests-only`` or when the budget left them out."""
    value: Any = None
    """A non-tensor output's value (JSON form)."""


@dataclass(frozen=True)
class ModeOutputs:
    """What one run of the op gave in one mode where it was captured."""

    outputs: tuple[Output, ...] = ()
    error: str = ""
    """Why the source could not run it in this mode (then there are no outputs)."""


@dataclass(frozen=True)
class Capture:
    """One captured call of a signature: its arguments and the source's outputs."""

    call: int
    """1-based, in the signature's own order of calls."""
    args: Any
    """Positional arguments in JSON form, tensors as ``{"tensor": i}`` (see :mod:`opaudit.aten.portable`)."""
    kwargs: Mapping[str, Any]
    buffers: tuple[Buffer, ...]
    tensors: tuple[TensorArg | GeneratorArg, ...]
    outputs: Mapping[str, ModeOutputs] = field(default_factory=dict)
    """Mode (``default``, ``deterministic``) → outputs; empty for an op whose outputs mean nothing
    (uninitialized memory)."""


@dataclass(frozen=True)
class CapsuleEntry:
    """One unique op signature of the recorded window."""

    id: str
    op: str
    kind: str
    """The source's :class:`~opaudit.aten.ops.OpKind` value."""
    signature: str
    device: str
    calls: int
    first_call: int
    phases: tuple[str, ...] = ()
    sites: tuple[Site, ...] = ()
    sites_dropped: int = 0
    recorded_in: tuple[str, ...] = ()
    skip_reason: str = ""
    """Why nothing was captured (side effects, capture budget, not portable...)."""
    rng: bool = False
    """The op drew from the global generator where it was captured: replays restore :attr:`Manifest.rng`."""
    captures: tuple[Capture, ...] = ()


@dataclass(frozen=True)
class LeftOut:
    """Something the byte budget (``--capture-budget``) kept out of the capsule."""

    id: str
    op: str
    what: str
    """``inputs`` (the signature cannot be replayed) or ``outputs`` (kept as digests only)."""
    nbytes: int
    """Bytes it would have taken."""


@dataclass(frozen=True)
class Manifest:
    """Everything in ``manifest.json``."""

    environment: Mapping[str, Any]
    settings: Mapping[str, Any]
    entries: tuple[CapsuleEntry, ...]
    rng: Mapping[str, Blob] = field(default_factory=dict)
    """Device (``cpu``, ``cuda:0``) → the generator state every replay of a random op starts from."""
    left_out: tuple[LeftOut, ...] = ()
    total_calls: int = 0
    view_calls: Mapping[str, int] = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION

    def blobs(self) -> Iterator[Blob]:
        """Every blob the manifest names (a blob shared by several captures, once per use)."""
        yield from self.rng.values()
        for e in self.entries:
            for c in e.captures:
                yield from (b.blob for b in c.buffers)
                yield from (t.state for t in c.tensors if isinstance(t, GeneratorArg))
                for m in c.outputs.values():
                    yield from (o.blob for o in m.outputs if o.blob is not None)

    def unbacked_bytes(self) -> int:
        """Bytes of the tensors rebuilt without stored values (their form only): allocated on replay."""
        total = 0
        for e in self.entries:
            for c in e.captures:
                total += sum(t.span_bytes for t in c.tensors if isinstance(t, TensorArg) and t.buffer is None)
        return total

    def largest_tensor(self) -> tuple[int, str]:
        """The bytes of the largest tensor a replay handles, argument or output, as if dense, and what it is.

        An argument expanded from a few stored bytes (stride 0) is cheap to rebuild, but
        the op computes a dense output of its size: that is what bounds a replay.
        """
        best, what = 0, ""
        for e in self.entries:
            for c in e.captures:
                sized = [(t.dtype, t.shape, "argument") for t in c.tensors if isinstance(t, TensorArg)]
                sized += [(o.dtype, o.shape, o.name) for m in c.outputs.values() for o in m.outputs if o.dtype]
                for dtype, shape, name in sized:
                    n = math.prod(shape) * DTYPE_SIZES[dtype]
                    if n > best:
                        best, what = n, f"{e.op}: a {dtype}{list(shape)} {name}"
        return best, what

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``manifest.json``)."""
        return {
            "format": self.format, "version": self.version,
            "environment": dict(sorted(self.environment.items())),
            "settings": dict(sorted(self.settings.items())),
            "total_calls": self.total_calls,
            "view_calls": dict(sorted(self.view_calls.items())),
            "rng": {d: _blob_dict(b) for d, b in sorted(self.rng.items())},
            "left_out": [{"id": x.id, "op": x.op, "what": x.what, "nbytes": x.nbytes} for x in self.left_out],
            "signatures": [_entry_dict(e) for e in self.entries],
        }


def _blob_dict(b: Blob) -> dict[str, Any]:
    return {"blob": b.name, "nbytes": b.nbytes}


def _entry_dict(e: CapsuleEntry) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": e.id, "op": e.op, "kind": e.kind, "signature": e.signature, "device": e.device, "calls": e.calls,
        "first_call": e.first_call, "phases": list(e.phases), "sites": [s.to_dict() for s in e.sites],
    }
    if e.sites_dropped:
        d["sites_dropped"] = e.sites_dropped
    if e.recorded_in:
        d["recorded_in"] = list(e.recorded_in)
    if e.skip_reason:
        d["skip_reason"] = e.skip_reason
    if e.rng:
        d["rng"] = True
    d["captures"] = [_capture_dict(c) for c in e.captures]
    return d


def _capture_dict(c: Capture) -> dict[str, Any]:
    return {
        "call": c.call, "args": c.args, "kwargs": dict(c.kwargs),
        "buffers": [{**_blob_dict(b.blob), "base": b.base, "device": b.device} for b in c.buffers],
        "tensors": [_tensor_dict(t) for t in c.tensors],
        "outputs": {mode: _mode_dict(m) for mode, m in c.outputs.items()},
    }


def _tensor_dict(t: TensorArg | GeneratorArg) -> dict[str, Any]:
    if isinstance(t, GeneratorArg):
        return {"generator": t.device, **_blob_dict(t.state)}
    d: dict[str, Any] = {"dtype": t.dtype, "shape": list(t.shape), "stride": list(t.stride), "device": t.device}
    if t.buffer is not None:
        d.update(buffer=t.buffer, offset=t.offset)
    if t.written:
        d["written"] = True
    return d


def _mode_dict(m: ModeOutputs) -> dict[str, Any]:
    if m.error:
        return {"error": m.error}
    out = []
    for o in m.outputs:
        d: dict[str, Any] = {"name": o.name}
        if o.digest is not None:
            d["digest"] = o.digest
        if o.dtype:
            d.update(dtype=o.dtype, shape=list(o.shape))
        else:
            d["value"] = o.value
        if o.blob is not None:
            d.update(_blob_dict(o.blob))
        out.append(d)
    return {"outputs": out}


# -- strict parsing (through data.fields, as every document is read) --------
def _fail(where: str, what: str) -> CapsuleError:
    return CapsuleError(f"{where}: {what}")


def _need(d: Any, key: str, types: Types, where: str) -> Any:
    return need(mapping(d, where), key, types, where)


def _opt(d: Any, key: str, types: Types, where: str, default: Any = None) -> Any:
    return opt(mapping(d, where), key, types, where, default)


def _count(d: Any, key: str, where: str, default: int | None = None, minimum: int = 0) -> int:
    v = _need(d, key, int, where) if default is None else _opt(d, key, int, where, default)
    if v < minimum:
        raise _fail(where, f"field {key!r} must be at least {minimum}, got {v}")
    return v


def _dims(d: Any, key: str, where: str) -> tuple[int, ...]:
    items = ints(mapping(d, where), key, where, minimum=0)
    if len(items) > MAX_DIMS:
        raise _fail(where, f"{key} has more than {MAX_DIMS} dimensions")
    return items


def _device(d: Any, key: str, where: str) -> str:
    v = _need(d, key, str, where)
    if not _DEVICE.fullmatch(v):
        raise _fail(where, f"{v!r} is not a device name")
    return v


def _dtype(d: Any, key: str, where: str) -> str:
    return choice(mapping(d, where), key, DTYPE_SIZES, where)


def _blob(d: Any, where: str, limit: int | None = None) -> Blob:
    name = _need(d, "blob", str, where)
    if not _BLOB_NAME.fullmatch(name):
        raise _fail(where, f"{name!r} is not a blob name")
    n = _count(d, "nbytes", where)
    if limit is not None and n > limit:
        raise _fail(where, f"{n} bytes is too large for what it holds")
    return Blob(name, n)


def _digest(d: Any, where: str) -> str | None:
    if "blob" in d and "digest" not in d:
        return None  # the bytes are stored: they are what a replay compares
    v = _need(d, "digest", str, where)
    if not _DIGEST.fullmatch(v):
        raise _fail(where, "digest must be 32 hex digits")
    return v


def check_value(v: Any, where: str, tensors: int, depth: int = 0) -> None:
    """Refuse an argument's JSON form that holds anything but plain values and the tags of :data:`VALUE_TAGS`.

    ``tensors`` is how many tensor arguments the capture declares: a ``{"tensor": i}`` must name one.
    """
    if depth > 16:
        raise _fail(where, "arguments nested too deeply")
    if v is None or isinstance(v, (bool, int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            raise _fail(where, "a non-finite number outside a 'float' tag")
        return
    if isinstance(v, str):
        if len(v) > MAX_TEXT:
            raise _fail(where, "a string argument is too long")
        return
    if isinstance(v, list):
        raise _fail(where, "a bare list (lists are tagged 'list' or 'tuple')")
    if not isinstance(v, Mapping) or len(v) != 1:
        raise _fail(where, "an argument must be a plain value or a one-key tag")
    (tag, x), = v.items()
    if tag not in VALUE_TAGS:
        raise _fail(where, f"unknown argument tag {tag!r}")
    if tag == "tensor":
        if type(x) is not int or not 0 <= x < tensors:  # bool is no index
            raise _fail(where, f"tensor index {x!r} out of range")
    elif tag in ("list", "tuple"):
        if not isinstance(x, list) or len(x) > 1 << 20:
            raise _fail(where, f"'{tag}' must hold a list")
        for y in x:
            check_value(y, where, tensors, depth + 1)
    elif tag == "float":
        if x not in ("nan", "inf", "-inf"):
            raise _fail(where, "'float' holds nan, inf or -inf")
    elif tag == "complex":
        if not (isinstance(x, list) and len(x) == 2 and all(isinstance(p, (int, float, str)) for p in x)):
            raise _fail(where, "'complex' holds two parts")
    elif tag == "device":
        if not isinstance(x, str) or not _DEVICE.fullmatch(x):
            raise _fail(where, f"{x!r} is not a device name")
    elif tag == "dtype":
        if x not in DTYPE_SIZES:
            raise _fail(where, f"unknown dtype {x!r}")
    elif not isinstance(x, str) or not _NAME.fullmatch(x):
        raise _fail(where, f"'{tag}' holds a name")


def _tensor_arg(d: Any, where: str, buffers: tuple[Buffer, ...]) -> TensorArg | GeneratorArg:
    if isinstance(d, Mapping) and "generator" in d:
        return GeneratorArg(_device(d, "generator", where), _blob(d, where, MAX_GENERATOR_BYTES))
    t = TensorArg(dtype=_dtype(d, "dtype", where), shape=_dims(d, "shape", where), stride=_dims(d, "stride", where),
                  device=_device(d, "device", where), buffer=_opt(d, "buffer", int, where, None),
                  offset=_count(d, "offset", where, 0), written=_opt(d, "written", bool, where, False))
    if len(t.shape) != len(t.stride):
        raise _fail(where, "shape and stride differ in length")
    if t.buffer is not None:
        if not 0 <= t.buffer < len(buffers):
            raise _fail(where, f"buffer {t.buffer} out of range")
        _check_span(t, buffers[t.buffer], where)
    return t


def _check_span(t: TensorArg, b: Buffer, where: str) -> None:
    """The tensor's elements must all lie inside the bytes its buffer holds (checked before any allocation)."""
    es = DTYPE_SIZES[t.dtype]
    if t.numel == 0:
        return
    start = t.offset * es
    end = (t.offset + sum((s - 1) * st for s, st in zip(t.shape, t.stride)) + 1) * es
    if start < b.base or end > b.base + b.blob.nbytes:
        raise _fail(where, f"a {t.dtype}{list(t.shape)} tensor reaches past its buffer "
                           f"(bytes {start}-{end} of a buffer holding {b.base}-{b.base + b.blob.nbytes})")


def _output(d: Any, where: str) -> Output:
    name = _need(d, "name", str, where)
    digest = _digest(d, where)
    if "dtype" not in d:
        value = d.get("value")
        check_value(value, where, 0)
        return Output(name, digest, value=value)
    dtype, shape = _dtype(d, "dtype", where), _dims(d, "shape", where)
    blob = None
    if "blob" in d:
        blob = _blob(d, where)
        need = math.prod(shape) * DTYPE_SIZES[dtype]
        if blob.nbytes != need:
            raise _fail(where, f"a {dtype}{list(shape)} output takes {need} bytes, its blob declares {blob.nbytes}")
    return Output(name, digest, dtype, shape, blob)


def _mode(d: Any, where: str) -> ModeOutputs:
    error = _opt(d, "error", str, where, "")
    if error:
        return ModeOutputs(error=error)
    return ModeOutputs(tuple(_output(o, f"{where}.outputs[{i}]") for i, o in enumerate(_need(d, "outputs", list, where))))


def _capture(d: Any, where: str) -> Capture:
    buffers = []
    for i, b in enumerate(_need(d, "buffers", list, where)):
        w = f"{where}.buffers[{i}]"
        buffer = Buffer(_blob(b, w), _count(b, "base", w), _device(b, "device", w))
        if buffer.base % 16:
            raise _fail(w, "a buffer's base must be a multiple of 16 bytes")
        buffers.append(buffer)
    bufs = tuple(buffers)
    tensors = tuple(_tensor_arg(t, f"{where}.tensors[{i}]", bufs) for i, t in enumerate(_need(d, "tensors", list, where)))
    args = _need(d, "args", list, where)
    kwargs = _need(d, "kwargs", Mapping, where)
    for a in args:
        check_value(a, f"{where}.args", len(tensors))
    for k, v in kwargs.items():
        if not _NAME.fullmatch(k):
            raise _fail(where, f"{k!r} is not an argument name")
        check_value(v, f"{where}.kwargs", len(tensors))
    outputs = {}
    for mode, m in _opt(d, "outputs", Mapping, where, {}).items():
        if mode not in MODES:
            raise _fail(where, f"unknown mode {mode!r}")
        outputs[mode] = _mode(m, f"{where}.outputs.{mode}")
    return Capture(_count(d, "call", where, minimum=1), args, kwargs, bufs, tensors, outputs)


def _entry(d: Any, where: str) -> CapsuleEntry:
    return CapsuleEntry(
        id=_need(d, "id", str, where), op=_need(d, "op", str, where), kind=_need(d, "kind", str, where),
        signature=_need(d, "signature", str, where), device=_device(d, "device", where),
        calls=_count(d, "calls", where), first_call=_count(d, "first_call", where),
        phases=strings(mapping(d, where), "phases", where),
        sites=tuple(parse_site(s, f"{where}.sites[{i}]") for i, s in enumerate(_opt(d, "sites", list, where, []))),
        sites_dropped=_count(d, "sites_dropped", where, 0), recorded_in=strings(mapping(d, where), "recorded_in", where),
        skip_reason=_opt(d, "skip_reason", str, where, ""), rng=_opt(d, "rng", bool, where, False),
        captures=tuple(_capture(c, f"{where}.captures[{i}]") for i, c in enumerate(_need(d, "captures", list, where))),
    )


def from_dict(data: Any, path: str) -> Manifest:
    """A :class:`Manifest` from ``manifest.json``'s content; :class:`CapsuleError` on anything unexpected."""
    try:
        return _manifest(data, path)
    except CapsuleError:
        raise
    except OpauditError as e:
        # The shared field reader's ReportError: the same one line, as the capsule's own error.
        raise CapsuleError(str(e)) from None


def _manifest(data: Any, path: str) -> Manifest:
    data = check_header(data, FORMAT, READABLE, path)
    environment = check_environment(_need(data, "environment", Mapping, path), path)
    settings = check_settings(_need(data, "settings", Mapping, path), path)
    view_calls = _opt(data, "view_calls", Mapping, path, {})
    if not all(isinstance(k, str) and type(v) is int for k, v in view_calls.items()):
        raise _fail(path, "view_calls must map op names to counts")
    left = []
    for i, x in enumerate(_opt(data, "left_out", list, path, [])):
        w = f"{path}: left_out[{i}]"
        left.append(LeftOut(_need(x, "id", str, w), _need(x, "op", str, w), _need(x, "what", str, w),
                            _count(x, "nbytes", w)))
    rng = {}
    for device, b in _opt(data, "rng", Mapping, path, {}).items():
        if not isinstance(device, str) or not _DEVICE.fullmatch(device):
            raise _fail(path, f"rng: {device!r} is not a device name")
        rng[device] = _blob(b, f"{path}: rng.{device}", MAX_GENERATOR_BYTES)
    return Manifest(
        environment=environment, settings=settings,
        entries=tuple(_entry(e, f"{path}: signatures[{i}]") for i, e in enumerate(_need(data, "signatures", list, path))),
        rng=rng, left_out=tuple(left), total_calls=_count(data, "total_calls", path, 0), view_calls=view_calls,
    )
