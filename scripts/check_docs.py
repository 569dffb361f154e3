#!/usr/bin/env python
"""Check the docs: the commands they show, and a catalog against PyTorch's own list.

    python scripts/check_docs.py                                              # commands and links
    python scripts/check_docs.py catalogs/cpu-x86_64-torch2.13.0.yaml [--markdown]

Without a catalog, every command shown in README.md and docs/*.md is parsed by
opaudit's own parser and every file it reads must exist, and every relative link
must resolve (:mod:`doc_commands` beside this file says how; exit 1 on a problem).

With a catalog, it is compared with the list in ``torch.use_deterministic_algorithms.__doc__``.

The docstring lists, per torch version, the ops that deterministic mode makes
deterministic and those it makes raise, each with the device it concerns. This
script parses that list from the *installed* torch, keeps the items for the
catalog's device, maps each to the aten ops a catalog files it under (the one
hand-written table here), and names every difference:

* ``agrees``: documented raises and the catalog says ``raises``; documented
  deterministic-when-enabled and the catalog says ``diverges`` (seen, and fixed by
  the mode);
* ``agrees (race not seen)``: documented deterministic-when-enabled, catalog says
  ``stable``: the mode holds, but the sweep's inputs never caught the race;
* ``differs``: anything else, e.g. documented raises but the op ran;
* ``not in catalog`` / ``unmapped``: the catalog lacks the op, or this script has no
  mapping for a new doc item (add it to ``MAPPING``);
* ``undocumented``: the catalog says ``raises``, ``warns`` or ``diverges*`` for an op
  the docs do not list for this device.

Exit status: 0 when nothing differs (``agrees`` and ``race not seen`` only), 1
otherwise, 2 on a bad catalog file. The torch version must match the catalog's.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass

DETERMINISTIC, RAISES = "deterministic", "raises"

# Doc callable (and a regex its item text must match) -> the (op, variant) keys a catalog
# files it under. ``None`` as variant: every variant of that op and dtype.
MAPPING: list[tuple[str, str | None, list[tuple[str, str | None]]]] = [
    *[(f"torch.nn.Conv{d}", None, [("aten.convolution_backward.default", None), ("aten.convolution.default", None)])
      for d in ("1d", "2d", "3d")],
    *[(f"torch.nn.ConvTranspose{d}", None, [("aten.convolution_backward.default", None),
                                             ("aten.convolution.default", None)]) for d in ("1d", "2d", "3d")],
    *[(f"torch.nn.ReplicationPad{d}", None, [(f"aten.replication_pad{d}_backward.default", None)])
      for d in ("1d", "2d", "3d")],
    ("torch.bmm", None, [("aten.bmm.default", None)]),
    ("torch.Tensor.__getitem__", None, [("aten.index_put.default", "accumulate=True"),
                                        ("aten.index_put_.default", "accumulate=True")]),
    ("torch.Tensor.index_put", r"accumulate=False", [("aten.index_put.default", ""), ("aten.index_put_.default", "")]),
    ("torch.Tensor.index_put", r"accumulate=True", [("aten.index_put.default", "accumulate=True"),
                                                    ("aten.index_put_.default", "accumulate=True")]),
    ("torch.Tensor.put_", r"accumulate=True", [("aten.put.default", "accumulate=True"),
                                               ("aten.put_.default", "accumulate=True")]),
    ("torch.Tensor.put_", r"accumulate=False", [("aten.put.default", ""), ("aten.put_.default", "")]),
    ("torch.Tensor.scatter_add_", None, [("aten.scatter_add.default", None), ("aten.scatter_add_.default", None)]),
    ("torch.gather", None, [("aten.scatter_add.default", None), ("aten.gather.default", None)]),
    ("torch.index_add", None, [("aten.index_add.default", None), ("aten.index_add_.default", None)]),
    ("torch.index_select", None, [("aten.index_add.default", None), ("aten.index_select_backward.default", None)]),
    ("torch.repeat_interleave", None, [("aten.index_add.default", None), ("aten.repeat_interleave.Tensor", None)]),
    ("torch.Tensor.index_copy", None, [("aten.index_copy.default", None), ("aten.index_copy_.default", None)]),
    ("torch.Tensor.scatter", None, [("aten.scatter.src", None), ("aten.scatter_.src", None)]),
    ("torch.Tensor.scatter_reduce", r"'sum'", [("aten.scatter_reduce.two", "reduce='sum'"),
                                              ("aten.scatter_reduce.two", "reduce='sum',include_self=False")]),
    ("torch.Tensor.scatter_reduce", r"'mean'", [("aten.scatter_reduce.two", "reduce='mean'"),
                                               ("aten.scatter_reduce.two", "reduce='mean',include_self=False")]),
    ("torch.Tensor.scatter_reduce", r"'prod'", [("aten.scatter_reduce.two", "reduce='prod'"),
                                               ("aten.scatter_reduce.two", "reduce='prod',include_self=False")]),
    ("torch.nn.MaxPool3d", None, [("aten.max_pool3d_with_indices_backward.default", None)]),
    ("torch.nn.AvgPool3d", None, [("aten.avg_pool3d_backward.default", None)]),
    ("torch.nn.AdaptiveAvgPool2d", None, [("aten._adaptive_avg_pool2d_backward.default", None)]),
    ("torch.nn.AdaptiveAvgPool3d", None, [("aten._adaptive_avg_pool3d_backward.default", None)]),
    ("torch.nn.AdaptiveMaxPool2d", None, [("aten.adaptive_max_pool2d_backward.default", None)]),
    ("torch.nn.FractionalMaxPool2d", None, [("aten.fractional_max_pool2d_backward.default", None)]),
    ("torch.nn.FractionalMaxPool3d", None, [("aten.fractional_max_pool3d_backward.default", None)]),
    ("torch.nn.MaxUnpool1d", None, [("aten.max_unpool2d.default", None)]),  # 1d runs the 2d kernel
    ("torch.nn.MaxUnpool2d", None, [("aten.max_unpool2d.default", None)]),
    ("torch.nn.MaxUnpool3d", None, [("aten.max_unpool3d.default", None)]),
    ("torch.nn.functional.interpolate", None, [("aten.upsample_linear1d_backward.default", None),
                                               ("aten.upsample_bilinear2d_backward.default", None),
                                               ("aten.upsample_bicubic2d_backward.default", None),
                                               ("aten.upsample_trilinear3d_backward.default", None)]),
    *[(f"torch.nn.ReflectionPad{d}", None, [(f"aten.reflection_pad{d}_backward.default", None)])
      for d in ("1d", "2d", "3d")],
    ("torch.nn.NLLLoss", None, [("aten.nll_loss2d_forward.default", None)]),
    ("torch.nn.CTCLoss", None, [("aten._ctc_loss_backward.default", None)]),
    ("torch.nn.EmbeddingBag", None, [("aten._embedding_bag_dense_backward.default", None),
                                     ("aten._embedding_bag_per_sample_weights_backward.default", None)]),
    ("torch.histc", None, [("aten.histc.default", None)]),
    ("torch.bincount", None, [("aten.bincount.default", None)]),
    ("torch.median", None, [("aten.median.dim", None)]),
    ("torch.nn.functional.grid_sample", None, [("aten.grid_sampler_2d_backward.default", None),
                                               ("aten.grid_sampler_3d_backward.default", None)]),
    ("torch.cumsum", None, [("aten.cumsum.default", None)]),
    ("torch.Tensor.resize_", None, [("aten.resize_.default", None)]),
]

_NOT_CHECKABLE = {
    "torch.Tensor.resize_": "quantized tensors are not swept",
    "torch.bmm": "sparse inputs are not swept",
}

_FAILING = ("raises", "diverges", "diverges_deterministic", "warns")


@dataclass(frozen=True)
class DocItem:
    """One bullet of the docstring's lists."""

    text: str
    callable: str
    expected: str
    """``deterministic`` or ``raises``."""
    devices: frozenset[str]
    """``cpu`` and/or ``cuda``."""


@dataclass(frozen=True)
class Row:
    """The check of one doc item, or one undocumented catalog entry."""

    item: str
    expected: str
    catalog: str
    status: str


def parse_doc(doc: str) -> list[DocItem]:
    """The two bullet lists of ``torch.use_deterministic_algorithms.__doc__``."""
    m_det = re.search(r"will\s+act\s+deterministically", doc)
    # The first paragraph also says "will throw a RuntimeError"; the list comes after.
    m_raises = re.compile(r"will\s+throw\s+a\s+:class:`RuntimeError`").search(doc, m_det.end()) if m_det else None
    if m_det is None or m_raises is None:
        raise ValueError("this torch's use_deterministic_algorithms docstring has no recognisable op lists")
    det, raises = m_det.start(), m_raises.start()
    end = doc.find("In addition", raises)
    items = []
    for expected, block in ((DETERMINISTIC, doc[det:raises]), (RAISES, doc[raises:end if end > 0 else None])):
        for bullet in re.split(r"\n\s*\* ", block)[1:]:
            text = " ".join(bullet.split())
            m = re.search(r":(?:class|func|meth):`([^`]+)`", text)
            if not m:
                continue
            devices = _devices(text)
            items.append(DocItem(text, m.group(1), expected, devices))
    return items


def _devices(text: str) -> frozenset[str]:
    has_cpu, has_cuda = "CPU" in text, "CUDA" in text
    if has_cpu and not has_cuda:
        return frozenset({"cpu"})
    if has_cuda and not has_cpu:
        return frozenset({"cuda"})
    return frozenset({"cpu", "cuda"})


def _keys(item: DocItem) -> list[tuple[str, str | None]] | None:
    out: list[tuple[str, str | None]] = []
    found = False
    for name, cond, keys in MAPPING:
        if name == item.callable and (cond is None or re.search(cond, item.text)):
            found = True
            out += keys
    return out if found else None


def check(catalog, doc: str | None = None) -> list[Row]:
    """Every doc item for the catalog's device, then every undocumented failing entry."""
    import torch

    doc = doc if doc is not None else torch.use_deterministic_algorithms.__doc__ or ""
    device = str(catalog.settings.get("device", "cpu")).split(":")[0]
    dtypes = catalog.settings.get("dtypes") or sorted({e.dtype for e in catalog.entries})
    rows: list[Row] = []
    covered: set[tuple[str, str, str]] = set()
    for item in parse_doc(doc):
        if device not in item.devices:
            continue
        short = item.text if len(item.text) <= 110 else item.text[:109] + "…"
        if item.callable in _NOT_CHECKABLE:
            rows.append(Row(short, item.expected, "-", f"not checkable ({_NOT_CHECKABLE[item.callable]})"))
            continue
        keys = _keys(item)
        if keys is None:
            rows.append(Row(short, item.expected, "-", "unmapped (add it to MAPPING in scripts/check_docs.py)"))
            continue
        entries = [e for e in catalog.entries for op, variant in keys
                   if e.op == op and e.dtype in dtypes and (variant is None or e.variant == variant)]
        covered.update(e.key for e in entries)
        if not entries:
            rows.append(Row(short, item.expected, "-", "not in catalog"))
            continue
        verdicts = sorted({e.verdict.value for e in entries})
        shown = "; ".join(f"{e.op} {e.dtype}{' ' + e.variant if e.variant else ''}: {e.verdict.value}"
                          for e in entries)
        rows.append(Row(short, item.expected, shown, _status(item.expected, verdicts)))
    for e in catalog.entries:
        if e.key not in covered and e.verdict.value in _FAILING:
            rows.append(Row(f"{e.op} {e.dtype} {e.variant}".strip(), "not documented for " + device,
                            f"{e.verdict.value} ({e.input_kind}, {e.source})", "undocumented"))
    return rows


def _status(expected: str, verdicts: list[str]) -> str:
    if expected == RAISES:
        return "agrees" if verdicts == ["raises"] else "differs"
    if set(verdicts) <= {"diverges", "stable", "skipped"}:
        return "agrees" if "diverges" in verdicts else "agrees (race not seen)"
    return "differs"


def differences(rows: list[Row]) -> list[Row]:
    """Rows that are not agreement."""
    return [r for r in rows if not r.status.startswith("agrees")]


def main(argv: list[str] | None = None) -> int:
    """Print the check; exit 0 when nothing differs, 1 otherwise, 2 on a bad file."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("catalog", nargs="?", help="a catalog to compare; without it, check the docs' commands and links")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = p.parse_args(argv)
    if args.catalog is None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import doc_commands

        return doc_commands.main()
    import torch
    from tabulate import tabulate

    from opaudit.data.files import ReportError
    from opaudit.flows.catalog import load_catalog

    try:
        catalog = load_catalog(args.catalog)
    except ReportError as e:
        sys.stderr.write(f"check_docs: error: {e}\n")
        return 2
    if catalog.environment.get("torch") != torch.__version__:
        sys.stderr.write(f"check_docs: error: the catalog was built with torch {catalog.environment.get('torch')}, "
                         f"this is torch {torch.__version__}: its docstring lists another version's ops\n")
        return 2
    rows = check(catalog)
    table = [[r.item, r.expected, r.catalog, r.status] for r in rows]
    fmt = "github" if args.markdown else "simple"
    print(tabulate(table, headers=("documented", "expected", "catalog", "status"), tablefmt=fmt,
                   maxcolwidths=None if args.markdown else [60, 14, 60, 30]))
    diff = differences(rows)
    print(f"\n{len(rows) - len(diff)} agree, {len(diff)} differ "
          f"(torch {torch.__version__}, device {catalog.settings.get('device')})")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
