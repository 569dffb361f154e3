"""What to do about a finding: PyTorch's own documentation plus a curated knowledge base.

Two sources, kept apart:

* what the *installed* torch documents in ``torch.use_deterministic_algorithms.__doc__``
  (which APIs become deterministic when the mode is on, and which raise), parsed
  at run time so it follows the torch version;
* ``catalogs/remedies.yaml`` (shipped as ``opaudit.catalogs``): which aten ops
  each documented API runs, and the remedy for each verdict.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from opaudit.aten.signature import mode_values
from opaudit.data.errors import OpauditError
from opaudit.data.verdict import Verdict

if TYPE_CHECKING:
    from opaudit.data.report import Finding

FORMAT = "opaudit-remedies"
VERSION = 1


class KnowledgeBaseError(OpauditError):
    """The remedies file is missing or malformed."""


@dataclass(frozen=True)
class DocumentedOp:
    """One bullet of ``torch.use_deterministic_algorithms.__doc__``."""

    api: str
    """``torch.Tensor.index_put``, ``torch.nn.MaxUnpool2d``..."""
    text: str
    """The bullet without reST markup."""
    behaviour: str
    """``deterministic`` (made deterministic by the mode) or ``raises`` (throws under the mode)."""
    devices: tuple[str, ...]
    """``cpu``/``cuda`` the bullet is about; ``()`` when it names no device (all)."""
    backward_only: bool
    """The bullet is about differentiating (the op's backward)."""

    def applies_to(self, device: str) -> bool:
        """True when the bullet covers ``device`` (``cuda:0`` counts as ``cuda``)."""
        return not self.devices or device.split(":", 1)[0] in self.devices


_ROLE = re.compile(r":(?:class|func|meth|attr):`~?([^`]+)`")


def _clean(text: str) -> str:
    text = _ROLE.sub(r"\1", text)
    text = text.replace("``", "").replace("`", "")
    return " ".join(text.split())


_SECTIONS = (
    ("deterministic", re.compile(r"will\s+act\s+deterministically\s+when\s+``mode=True``:")),
    ("raises", re.compile(r"will\s+throw\s+a\s+:class:`RuntimeError`\s+when\s+``mode=True``:")),
)


def _bullets(block: str) -> list[str]:
    """Top-level ``*`` bullets of a reST block, continuation and ``-`` sub-items joined."""
    items: list[str] = []
    for line in block.splitlines():
        s = line.strip()
        if s.startswith("* "):
            items.append(s[2:])
        elif s.startswith("- ") and items:
            items[-1] += " " + s[2:] + ","
        elif s and items and line.startswith(" " * 10):
            items[-1] += " " + s
        elif s and items:
            break
    return [i.rstrip(",") for i in items]


def parse_determinism_doc(doc: str | None) -> tuple[DocumentedOp, ...]:
    """The bullets of ``torch.use_deterministic_algorithms.__doc__``, by section."""
    if not doc:
        return ()
    out: list[DocumentedOp] = []
    for behaviour, pattern in _SECTIONS:
        m = pattern.search(doc)
        if m is None:
            continue
        for raw in _bullets(doc[m.end():]):
            role = _ROLE.search(raw)
            text = _clean(raw)
            api = role.group(1) if role else text.split()[0]
            low = text.lower()
            devices = tuple(d for d in ("cpu", "cuda") if re.search(rf"\b{d}\b", low))
            out.append(DocumentedOp(api, text, behaviour, devices, "differentiate" in low))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def documented_ops() -> tuple[DocumentedOp, ...]:
    """The installed torch's documented list."""
    import torch

    return parse_determinism_doc(torch.use_deterministic_algorithms.__doc__)


@dataclass(frozen=True)
class Entry:
    """One curated entry: documented APIs, the aten ops they run, remedies by verdict."""

    apis: tuple[str, ...]
    ops: tuple[str, ...]
    remedies: tuple[tuple[str, str], ...]

    def matches(self, op: str) -> bool:
        """True when ``op`` (``aten.index_put_.default``) is one of this entry's ops."""
        return any(fnmatch.fnmatchcase(op, p) for p in self.ops)

    def remedy(self, key: str) -> str | None:
        """The remedy text for ``key`` (a verdict name, or ``cublas``)."""
        return dict(self.remedies).get(key)


_REMEDY_KEYS = ("raises", "diverges", "diverges_deterministic", "warns", "cublas", "batch_variant",
                "batch_variant_cuda", "forward", "backward")
"""Remedy texts by verdict; ``forward`` / ``backward`` are context added to a ``diverges`` remedy
when the op ran in only that phase (a direct call, before the first forward too, or the backward of another op)."""


class KnowledgeBase:
    """Curated entries plus the installed torch's documented list."""

    def __init__(self, entries: tuple[Entry, ...], documented: tuple[DocumentedOp, ...]) -> None:
        self.entries = entries
        self.documented = documented

    @classmethod
    def from_data(cls, data: Any, where: str = "remedies") -> "KnowledgeBase":
        """Validate parsed YAML; :class:`KnowledgeBaseError` on any problem."""
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            raise KnowledgeBaseError(f"{where}: not an {FORMAT} version {VERSION} file")
        entries = []
        for i, e in enumerate(data.get("entries") or []):
            if not isinstance(e, dict) or not isinstance(e.get("ops"), list):
                raise KnowledgeBaseError(f"{where}: entries[{i}] needs an 'ops' list")
            rem = tuple((k, " ".join(str(e[k]).split())) for k in _REMEDY_KEYS if isinstance(e.get(k), str))
            entries.append(Entry(tuple(map(str, e.get("apis") or [])), tuple(map(str, e["ops"])), rem))
        return cls(tuple(entries), documented_ops())

    @classmethod
    @functools.lru_cache(maxsize=1)
    def load_default(cls) -> "KnowledgeBase":
        """The shipped ``catalogs/remedies.yaml``."""
        try:
            text = resources.files("opaudit.catalogs").joinpath("remedies.yaml").read_text(encoding="utf-8")
        except (FileNotFoundError, ModuleNotFoundError) as e:
            raise KnowledgeBaseError(f"shipped remedies.yaml not found ({e})") from None
        return cls.from_text(text, "catalogs/remedies.yaml")

    @classmethod
    def from_text(cls, text: str, where: str = "remedies") -> "KnowledgeBase":
        """Parse a remedies file with ``yaml.safe_load``'s rules (:func:`opaudit.data.files.safe_load`: libyaml's
        parser where present, duplicate keys and aliases refused): a Python tag or broken YAML is a
        :class:`KnowledgeBaseError`, never executed and never a raw ``yaml`` traceback."""
        import yaml

        from opaudit.data.files import safe_load

        try:
            data = safe_load(text)
        except yaml.YAMLError as e:
            problem = "unsafe or unknown YAML tag" if isinstance(e, yaml.constructor.ConstructorError) else "invalid YAML"
            raise KnowledgeBaseError(f"{where}: {problem} ({' '.join(str(e).split())[:120]})") from None
        return cls.from_data(data, where)

    def entries_for(self, op: str) -> list[Entry]:
        """Curated entries whose ops match ``op``."""
        return [e for e in self.entries if e.matches(op)]

    def documentation(self, op: str, device: str = "cpu", verdict: Verdict | None = None,
                      signature: str | None = None) -> list[DocumentedOp]:
        """What the installed torch documents about ``op`` on ``device``.

        With ``verdict``, only the bullets of the matching section (``raises`` for
        raises and warns, ``deterministic`` for diverges). With ``signature``, not the
        bullets whose argument condition the call does not meet (``put_ when
        accumulate=False`` for a call with ``accumulate=True``). Among several
        documented APIs of one entry, the ones named like the op (``MaxUnpool3d`` for
        ``aten.max_unpool3d``) are preferred.
        """
        apis = {a for e in self.entries_for(op) for a in e.apis}
        found = [d for d in self.documented if d.api in apis and d.applies_to(device)]
        want = _SECTION_OF.get(verdict) if verdict is not None else None
        if want is not None:
            found = [d for d in found if d.behaviour == want]
        if signature is not None:
            values = mode_values(op, signature)
            found = [d for d in found if all(values.get(k, v) == v for k, v in _CONDITION.findall(d.text))]
        own = [d for d in found if _api_key(d.api) == _op_key(op)]
        return own or found

    def remedy(self, f: "Finding") -> str:
        """The advice for one finding, with its measured cost and PyTorch's own words where they exist."""
        text = self._advice(f)
        if text and f.verdict in (Verdict.RAISES, Verdict.DIVERGES, Verdict.DIVERGES_DETERMINISTIC, Verdict.WARNS):
            found = self.documentation(f.op, f.device, f.verdict, f.signature)
            # Prefer the bullets that name this device over the device-less ones.
            named = [d for d in found if d.devices]
            docs = [d.text for d in (named or found)]
            if docs:
                text += " PyTorch documents: " + "; ".join(docs[:2]) + "."
        return text

    def batch_remedy(self, op: str, device: str = "cpu") -> str:
        """What to do about ``op`` giving a row other bits when the batch has another size, on ``device``."""
        keys = ("batch_variant_cuda", "batch_variant") if device.startswith("cuda") else ("batch_variant",)
        for key in keys:
            for e in self.entries_for(op):
                text = e.remedy(key)
                if text:
                    return text
        return ("its result for a row depends on how many rows share the call (the kernel's blocking or "
                "reduction split follows the batch size): pad every batch to one fixed row count, or use a "
                "batch-invariant kernel for this op")

    def _advice(self, f: "Finding") -> str:
        entries = self.entries_for(f.op)

        def curated(key: str) -> str | None:
            for e in entries:
                text = e.remedy(key)
                if text:
                    return text
            return None

        v = f.verdict
        if v is Verdict.RAISES:
            if f.alert_kind == "cublas_workspace":
                return curated("cublas") or ("set CUBLAS_WORKSPACE_CONFIG=:4096:8 before the process starts "
                                             "(cuBLAS reads it once)")
            return curated("raises") or ("no deterministic implementation: wrap this op in "
                                         "torch.use_deterministic_algorithms(False) locally, accept it with "
                                         "warn_only=True, or reformulate it")
        if v is Verdict.DIVERGES:
            cost = f.det_cost
            measured = f" Measured cost here: {cost:.2f}x this op's default time." if cost is not None else ""
            cudnn = _cudnn_advice(f)
            text = cudnn or curated("diverges") or "torch.use_deterministic_algorithms(True) makes it deterministic."
            # Called directly by the user's code (before the first forward too), or only as another op's backward.
            context = ("backward" if tuple(f.phases) == ("backward",)
                       else "forward" if f.phases and set(f.phases) <= {"setup", "forward"} else None)
            extra = curated(context) if context and not cudnn else None
            return text + (f" {extra}" if extra else "") + measured
        if v is Verdict.DIVERGES_DETERMINISTIC:
            cudnn = _cudnn_advice(f)
            return cudnn or curated("diverges_deterministic") or (
                "silent nondeterminism: deterministic mode does not fix it and raises no alert. Compute it in "
                "float64 or on CPU, or reformulate the reduction (sort + segment sum instead of atomics); "
                "worth a PyTorch issue")
        if v is Verdict.WARNS:
            return curated("warns") or curated("raises") or (
                "warn_only reports it: it runs a nondeterministic kernel under deterministic mode")
        if v is Verdict.RANDOM:
            return ("draws from the RNG: seed it (torch.manual_seed(seed); on GPU also "
                    "torch.cuda.manual_seed_all) before the step; replays with the same RNG state were identical")
        if v is Verdict.UNINITIALIZED and f.reason:
            return (f"part of its result is memory the kernel never writes ({f.reason}): it differs run to run "
                    "and means nothing, and deterministic mode fills it with NaN; every other element was "
                    "bitwise identical in every run. Nothing to fix unless your code reads that part")
        if v is Verdict.UNINITIALIZED:
            return ("its output is uninitialized memory: harmless if always overwritten; deterministic mode "
                    "fills it (torch.utils.deterministic.fill_uninitialized_memory)")
        return ""


def _cudnn_advice(f: "Finding") -> str | None:
    if not f.cudnn:
        return None
    stable = [name for name, ratio in f.cudnn if ratio.startswith("0/")]
    if not stable:
        return "unstable under every cudnn.deterministic / cudnn.benchmark setting tried"
    return f"stable with {' or '.join(stable)}: set torch.backends.cudnn.deterministic=True, benchmark=False."


_SECTION_OF = {
    Verdict.RAISES: "raises", Verdict.WARNS: "raises",
    Verdict.DIVERGES: "deterministic", Verdict.DIVERGES_DETERMINISTIC: "deterministic",
}
"""The section of the documented list that speaks to a verdict."""

_CONDITION = re.compile(r"\b([a-z_]+)=(True|False)\b")
"""``accumulate=False`` in a bullet: the bullet is about calls with that argument value."""


def _api_key(api: str) -> str:
    """``maxunpool3d`` for ``torch.nn.MaxUnpool3d``, ``put`` for ``torch.Tensor.put_``."""
    return api.rsplit(".", 1)[-1].lower().replace("_", "")


def _op_key(op: str) -> str:
    """``maxunpool3d`` for ``aten.max_unpool3d.default``, ``put`` for ``aten.put_.default``."""
    parts = op.split(".")
    return (parts[1] if len(parts) >= 2 else op).lower().replace("_", "")
