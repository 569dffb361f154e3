"""Hardware catalogs: every op in PyTorch's OpInfo database, audited on one device.

A sweep takes each OpInfo entry (and each ``torch.nn`` module that OpInfo does
not cover) and, per dtype, records the sample's forward and, where the op
supports autograd, the backward of its output with a non-uniform gradient. The
recorded signatures go through the model audit's own path
(:func:`opaudit.flows.pipeline.build_report`: replay, then classify); no verdict is
decided here.

OpInfo samples are tiny (around 5 elements) and nondeterminism from parallel
accumulation or atomics only shows at scale with colliding indices, so every op
also gets **stress** inputs: the same samples scaled to about 10^6 elements, with
integer index arguments redrawn from a handful of values. Each catalog entry
records which input kind exposed its verdict.

Entries are keyed by op overload, dtype and *variant* (the bool and string
arguments that select a different kernel, e.g. ``accumulate=True``), so that
``put_(accumulate=False)``, which raises, and ``put_(accumulate=True)``, which
only diverges, stay two entries. The same key is computed from a model report's
signature text by :func:`entry_key`, which is what ``--against`` looks up.

Each entry is swept in a worker process with a time limit: an op that hangs or
crashes the interpreter costs one restart and is recorded with status
``timeout`` or ``crashed``. While the sweep runs, a partial file is rewritten
atomically at most every :data:`~opaudit.flows.catalog.build.PARTIAL_EVERY_S`
seconds (and on Ctrl-C), so that an interrupted sweep can be resumed.

One module per job, each importing only those above it in this list:
``config`` (defaults, :class:`SweepConfig`), ``keys`` (signature → key),
``entries`` (entries from findings, merging; the records and their file form are
:mod:`opaudit.data.catalog`), ``select`` (which ops),
``stress`` (scaled inputs), ``cases`` (runnable samples), ``sweep`` (one task),
``runner`` (a worker process or this one), ``build`` (:func:`build_catalog`).
"""

from __future__ import annotations

from opaudit.aten.signature import signature_dtype, signature_variant, split_signature
from opaudit.data.catalog import FORMAT, VERSION, Catalog, CatalogEntry, SweptOp, catalog_from_dict, load_catalog
from opaudit.flows.catalog.build import PARTIAL_EVERY_S, CatalogRequest, SweepProgress, build_catalog, partial_path
from opaudit.flows.catalog.config import (
    DEFAULT_DTYPES,
    DEFAULT_INDEX_REPS,
    DEFAULT_MAX_SAMPLES,
    DEFAULT_OP_TIMEOUT,
    DEFAULT_REPS,
    DEFAULT_STRESS_SAMPLES,
    STRESS_ELEMENTS,
    SweepConfig,
)
from opaudit.flows.catalog.entries import CatalogError, merge_entries
from opaudit.flows.catalog.keys import entry_key
from opaudit.flows.catalog.select import Task, check_device, parse_dtypes, select_tasks

__all__ = [
    "DEFAULT_DTYPES", "DEFAULT_INDEX_REPS", "DEFAULT_MAX_SAMPLES", "DEFAULT_OP_TIMEOUT", "DEFAULT_REPS",
    "DEFAULT_STRESS_SAMPLES", "FORMAT", "PARTIAL_EVERY_S", "STRESS_ELEMENTS", "VERSION", "Catalog", "CatalogEntry",
    "CatalogError", "CatalogRequest", "SweepConfig", "SweepProgress", "SweptOp", "Task", "build_catalog",
    "catalog_from_dict", "check_device", "entry_key", "load_catalog", "merge_entries", "parse_dtypes",
    "partial_path", "select_tasks", "signature_dtype", "signature_variant", "split_signature",
]
