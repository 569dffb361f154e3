"""Markdown catalog, for a design review: grouped by verdict, with counts, in plain words."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opaudit.cli.formats import batch_invariance
from opaudit.data.verdict import Verdict

if TYPE_CHECKING:
    from opaudit.flows.catalog import Catalog, CatalogEntry

# What each verdict means for someone deciding whether a training run is reproducible.
_PLAIN = {
    Verdict.RAISES: "Crashes a run that sets `torch.use_deterministic_algorithms(True)`: PyTorch has no "
                    "deterministic version of this op here. Avoid the op, or run without deterministic mode "
                    "and accept run-to-run differences.",
    Verdict.DIVERGES_DETERMINISTIC: "Gives different results from run to run even with deterministic mode on, "
                                    "and PyTorch does not warn. Deterministic mode does not make it safe.",
    Verdict.DIVERGES: "Gives different results from run to run by default; deterministic mode makes them "
                      "identical. Turn deterministic mode on if you need reproducible runs.",
    Verdict.WARNS: "Warns under deterministic mode (`warn_only=True`) without crashing strict mode.",
    Verdict.RANDOM: "Draws random numbers: identical from run to run once the random seed is fixed.",
    Verdict.UNINITIALIZED: "Returns memory that was never written (e.g. `torch.empty`); its contents mean "
                           "nothing until overwritten.",
    Verdict.SKIPPED: "Could not be measured; the reason is given.",
    Verdict.STABLE: "Bit-for-bit identical in every run, with and without deterministic mode.",
}

_DETAILED = (Verdict.RAISES, Verdict.DIVERGES_DETERMINISTIC, Verdict.DIVERGES, Verdict.WARNS)


def _table(headers: Any, rows: Any) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github")


def _cell(text: str, limit: int = 90) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _kind(e: "CatalogEntry") -> str:
    if e.input_kind == "stress" and e.opinfo is not None and e.opinfo is not e.verdict:
        return f"stress only (OpInfo samples: {e.opinfo.value})"
    return e.input_kind


def _environment(catalog: "Catalog") -> list[str]:
    env = catalog.environment
    keys = ("gpu", "compute_capability", "sm_count", "driver", "cuda", "cudnn", "cublas", "torch", "cpu",
            "threads", "platform", "python")
    rows = [[k, str(env[k])] for k in keys if env.get(k) not in (None, "")]
    return [_table(("", "value"), rows)]


def render(catalog: "Catalog") -> str:
    """The catalog as GitHub-flavoured Markdown."""
    env, st = catalog.environment, catalog.settings
    device = env.get("gpu") or env.get("cpu") or st.get("device")
    counts = catalog.summary
    out = [f"# Determinism catalog: {device}, torch {env.get('torch')}", ""]
    if not catalog.complete:
        out += ["> **Incomplete**: this sweep was interrupted; resume it with `--resume`.", ""]
    out += [
        f"Every op in PyTorch's OpInfo test database (plus the `torch.nn` modules it does not cover) was run on "
        f"`{st.get('device')}` for {', '.join(st.get('dtypes', []))}, forward and backward, on PyTorch's own "
        f"test inputs and on **stress** inputs (about {int(st.get('stress_elements') or 0):,} elements, indices "
        f"with many repeats). Each op was then re-run {st.get('reps')} times with and without "
        "`torch.use_deterministic_algorithms(True)`"
        + (f" ({st.get('index_reps')} times for stress inputs that take an index)" if st.get("index_reps") else "")
        + " and its outputs compared bit for bit.",
        "",
        f"**{counts['entries']} entries** ({counts['ops']} distinct ops; an entry is one op, dtype and "
        f"argument variant) from {counts['swept']} swept OpInfo entries and modules.",
        "",
        _table(("verdict", "entries", "what it means"),
               [[v.value, counts[v.value], _PLAIN[v]] for v in Verdict]),
        "",
        "## Environment",
        "",
        *_environment(catalog),
        "",
    ]
    for v in _DETAILED:
        entries = catalog.entries_with(v)
        out += [f"## {v.value} ({len(entries)})", "", _PLAIN[v], ""]
        if not entries:
            out += ["None.", ""]
            continue
        rows = []
        for e in entries:
            evidence = e.error if v is Verdict.RAISES else (e.warning if v is Verdict.WARNS else "")
            rows.append([f"`{e.op}`", e.dtype, e.variant or "", e.phase, _kind(e), e.source, _cell(evidence)])
        out += [_table(("op", "dtype", "variant", "phase", "shown by", "OpInfo entry", "message"), rows), ""]
    for v in (Verdict.RANDOM, Verdict.UNINITIALIZED):
        entries = catalog.entries_with(v)
        out += [f"## {v.value} ({len(entries)})", "", _PLAIN[v], ""]
        out += [", ".join(f"`{e.op}` {e.dtype}" + (f" ({e.variant})" if e.variant else "") for e in entries)
                or "None.", ""]
    skipped = catalog.entries_with(Verdict.SKIPPED)
    out += [f"## skipped ({len(skipped)})", "", _PLAIN[Verdict.SKIPPED], ""]
    if skipped:
        out += [_table(("op", "dtype", "variant", "reason"),
                       [[f"`{e.op}`", e.dtype, e.variant, _cell(e.error)] for e in skipped]), ""]
    not_swept = [s for s in catalog.swept if s.status not in ("ok", "partial")]
    out += [f"## Not swept ({len(not_swept)})", "",
            "OpInfo entries or modules whose samples could not run at all on this device (no op from them is in "
            "the catalog unless another entry ran it).", ""]
    if not_swept:
        out += [_table(("entry", "dtype", "status", "reason"),
                       [[s.source, s.dtype, s.status, _cell(s.reason)] for s in not_swept]), ""]
    if catalog.batch_invariance:
        out += batch_invariance.catalog_markdown(catalog.batch_invariance, st)
    stable = catalog.entries_with(Verdict.STABLE)
    out += [f"## stable ({len(stable)})", "", _PLAIN[Verdict.STABLE], "", "<details><summary>Show the list</summary>",
            "", ", ".join(f"`{e.op}` {e.dtype}" + (f" ({e.variant})" if e.variant else "") for e in stable)
            or "None.", "", "</details>", ""]
    return "\n".join(out)
