"""Markdown for every document, for pasting into a review or an issue (GitHub-flavoured)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opaudit.cli.formats import batch_invariance, distributed
from opaudit.cli.formats.common import (
    COMPILED_HEAD,
    COMPILED_NOTE,
    FINDING_HEADERS,
    compiled_text,
    crash_rows,
    finding_row,
    grouped_predictions,
    md_table,
    not_crashes_line,
    notable,
    remedy_rows,
    run_check_lines,
    summary_line,
    target_name,
)
from opaudit.cli.formats.escape import Markdown, md_code, md_text
from opaudit.data.verdict import Verdict

if TYPE_CHECKING:
    from opaudit.data.catalog import Catalog, CatalogEntry
    from opaudit.data.diff import Change, Diff
    from opaudit.data.prediction import Prediction
    from opaudit.data.report import Report


def report(report: "Report") -> str:
    """The report as GitHub-flavoured Markdown."""
    env = report.environment
    out = ["# opaudit report", ""]
    if not report.complete:
        out += ["> **Incomplete**: the audit was interrupted; this lists what was classified so far.", ""]
    device = env.get("gpu") or env.get("cpu")
    if report.batch_invariance is not None and not report.all_findings:
        # A batch-invariance check replays nothing: its section is the whole report.
        out += [md_text(f"torch {env.get('torch')} on {device}, {env.get('threads')} threads."), ""]
        out += batch_invariance.markdown(report.batch_invariance)
        out += (["## Environment", ""] + [f"- {md_text(w)}" for w in report.env_warnings] + [""]
                if report.env_warnings else [])
        return "\n".join(out)
    out += [md_text(f"torch {env.get('torch')} on {device}, {env.get('threads')} threads; "
                    f"{report.settings.get('reps')} replays per mode."), "", md_text(summary_line(report)), ""]
    counts = report.summary
    out += [md_table(("verdict", "signatures", "meaning"),
                   [[v.value, counts[v.value], Markdown(v.meaning)] for v in Verdict]), ""]
    crashes = crash_rows(report)
    out += ["## Will deterministic mode crash this run?", ""]
    if crashes:
        out += ["Yes. Every op that raises under `torch.use_deterministic_algorithms(True)`, in execution order:", "",
                md_table(("#", "op", "where", "phase", "error"), [_op_code(r, 1) for r in crashes]), ""]
    else:
        out += ["No op raises under `torch.use_deterministic_algorithms(True)`.", ""]
    note = not_crashes_line(report)
    if note:
        out += [note, ""]
    if report.compiled:
        out += [f"## {md_text(COMPILED_HEAD)}", ""] + [f"- {md_text(compiled_text(c))}" for c in report.compiled]
        out += ["", md_text(COMPILED_NOTE[0].upper() + COMPILED_NOTE[1:] + "."), ""]
    if report.run_checks:
        out += ["## Whole-step reproducibility", ""]
        for r in report.run_checks:
            lines = run_check_lines(r)
            out += [f"- **{md_text(lines[0])}**"] + [f"  - {md_text(line.strip())}" for line in lines[1:]]
        out.append("")
    if report.distributed:
        out += distributed.markdown(report)
    rows = [_op_code(finding_row(f), 1) for f in notable(report)]
    out += ["## Findings", ""]
    out += [md_table(FINDING_HEADERS, rows) if rows else "Every replayed op was stable.", ""]
    remedies = remedy_rows(report)
    if remedies:
        out += ["## What to do", "", md_table(("op", "verdict", "remedy"), [_op_code(r, 0) for r in remedies]), ""]
    if report.batch_invariance is not None:
        out += batch_invariance.markdown(report.batch_invariance)
    if report.env_warnings:
        out += ["## Environment", ""] + [f"- {md_text(w)}" for w in report.env_warnings] + [""]
    return "\n".join(out)


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




def _op_code(row: list, i: int) -> list:
    """``row`` with its op name (column ``i``) as inline code, as every Markdown export shows ops."""
    return [*row[:i], md_code(row[i]), *row[i + 1:]]


def _cell(text: str, limit: int = 90) -> Markdown:
    """A long message cut to ``limit`` characters, then escaped (never cut inside an escape)."""
    text = " ".join(text.splitlines())
    return md_text(text if len(text) <= limit else text[: limit - 1] + "…", line_start=False)


def _op_list(entries: "list[CatalogEntry]") -> str:
    return ", ".join(md_code(e.op) + md_text(f" {e.dtype}" + (f" ({e.variant})" if e.variant else ""),
                                             line_start=False) for e in entries) or "None."


def _kind(e: "CatalogEntry") -> str:
    if e.input_kind == "stress" and e.opinfo is not None and e.opinfo is not e.verdict:
        return f"stress only (OpInfo samples: {e.opinfo.value})"
    return e.input_kind


def _environment(catalog: "Catalog") -> list[str]:
    env = catalog.environment
    keys = ("gpu", "compute_capability", "sm_count", "driver", "cuda", "cudnn", "cublas", "torch", "cpu",
            "threads", "platform", "python")
    rows = [[k, str(env[k])] for k in keys if env.get(k) not in (None, "")]
    return [md_table(("", "value"), rows)]


def catalog(catalog: "Catalog") -> str:
    """The catalog as GitHub-flavoured Markdown."""
    env, st = catalog.environment, catalog.settings
    device = env.get("gpu") or env.get("cpu") or st.get("device")
    counts = catalog.summary
    out = [f"# Determinism catalog: {md_text(device, line_start=False)}, "
           f"torch {md_text(env.get('torch'), line_start=False)}", ""]
    if not catalog.complete:
        out += ["> **Incomplete**: this sweep was interrupted; resume it with `--resume`.", ""]
    selected = catalog.selection
    inputs = ("PyTorch's own test inputs and on **stress** inputs (about "
              f"{int(st.get('stress_elements') or 0):,} elements, indices with many repeats)"
              if st.get("stress") else "PyTorch's own test inputs (no stress inputs)")
    out += [
        f"**Swept**: {md_text(selected[0].upper() + selected[1:], line_start=False)}, on "
        f"{md_code(st.get('device'))}, forward and backward, on {inputs}. Each op was then re-run "
        f"{st.get('reps')} times with and without `torch.use_deterministic_algorithms(True)`"
        + (f" ({st.get('index_reps')} times for stress inputs that take an index)" if st.get("index_reps") else "")
        + " and its outputs compared bit for bit. An op or dtype outside that selection is not in this catalog.",
        "",
        f"**{counts['entries']} entries** ({counts['ops']} distinct ops; an entry is one op, dtype and "
        f"argument variant) from {counts['swept']} swept OpInfo entries and modules.",
        "",
        md_table(("verdict", "entries", "what it means"),
               [[v.value, counts[v.value], Markdown(_PLAIN[v])] for v in Verdict]),
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
            rows.append([md_code(e.op), e.dtype, e.variant or "", e.phase, _kind(e), e.source, _cell(evidence)])
        out += [md_table(("op", "dtype", "variant", "phase", "shown by", "OpInfo entry", "message"), rows), ""]
    for v in (Verdict.RANDOM, Verdict.UNINITIALIZED):
        entries = catalog.entries_with(v)
        out += [f"## {v.value} ({len(entries)})", "", _PLAIN[v], ""]
        out += [_op_list(entries), ""]
    skipped = catalog.entries_with(Verdict.SKIPPED)
    out += [f"## skipped ({len(skipped)})", "", _PLAIN[Verdict.SKIPPED], ""]
    if skipped:
        out += [md_table(("op", "dtype", "variant", "reason"),
                       [[md_code(e.op), e.dtype, e.variant, _cell(e.error)] for e in skipped]), ""]
    not_swept = [s for s in catalog.swept if s.status not in ("ok", "partial")]
    out += [f"## Not swept ({len(not_swept)})", "",
            "OpInfo entries or modules whose samples could not run at all on this device (no op from them is in "
            "the catalog unless another entry ran it).", ""]
    if not_swept:
        out += [md_table(("entry", "dtype", "status", "reason"),
                       [[s.source, s.dtype, s.status, _cell(s.reason)] for s in not_swept]), ""]
    if catalog.batch_invariance:
        out += batch_invariance.catalog_markdown(catalog.batch_invariance, st)
    stable = catalog.entries_with(Verdict.STABLE)
    out += [f"## stable ({len(stable)})", "", _PLAIN[Verdict.STABLE], "", "<details><summary>Show the list</summary>",
            "", _op_list(stable), "", "</details>", ""]
    return "\n".join(out)


def _diff_rows(changes: "tuple[Change, ...]") -> list[list[Any]]:
    return [[f"{c.before} → {c.after}", md_code(c.op), c.detail, c.where] for c in changes]


def diff(diff: "Diff") -> str:
    """The diff as GitHub-flavoured Markdown."""
    s = diff.summary
    detail = "dtype / variant" if diff.kind == "catalog" else "signature"
    where = "OpInfo entry" if diff.kind == "catalog" else "where"
    out = [f"# opaudit {md_text(diff.kind, line_start=False)} diff", "", f"- **A**: {md_code(diff.a)}",
           f"- **B**: {md_code(diff.b)}", "",
           f"{s['changed']} ops changed verdict, {s['only_a']} are only in A, {s['only_b']} only in B, "
           f"{s['unchanged']} are unchanged.", ""]
    transitions = diff.transitions()
    if transitions:
        out += [md_table(("A → B", "ops"), [[t.replace("->", " → "), n] for t, n in transitions.items()]), ""]
    for title, changes in (("Verdict changed", diff.changes), ("Only in A", diff.only_a), ("Only in B", diff.only_b)):
        out += [f"## {title} ({len(changes)})", ""]
        out += [md_table(("A → B", "op", detail, where), _diff_rows(changes)) if changes else "None.", ""]
    fields = [("environment", f) for f in diff.environment] + [("settings", f) for f in diff.settings]
    out += ["## What differs between the two setups", ""]
    if fields:
        out += [md_table(("", "field", "A", "B"),
                       [[k, f.name, "-" if f.before is None else md_code(f.before),
                         "-" if f.after is None else md_code(f.after)] for k, f in fields]), ""]
    else:
        out += ["Nothing: same environment fingerprint and settings.", ""]
    return "\n".join(out)


def prediction(prediction: "Prediction") -> str:
    """The prediction as GitHub-flavoured Markdown."""
    s = prediction.summary
    out = [f"# opaudit prediction: {md_text(target_name(prediction), line_start=False)}", "",
           md_text(f"Recorded here on {prediction.here.get('gpu') or prediction.here.get('cpu')} "
                   f"(torch {prediction.here.get('torch')}); verdicts looked up in ")
           + f"{md_code(prediction.catalog)}. "
           "`unknown` means the catalog did not measure that op, dtype and variant: it is not a promise "
           "of stability.", ""]
    if not prediction.complete:
        out += ["> **Incomplete**: the audit was interrupted.", ""]
    out += [md_table(("predicted", "signatures"), [[k, v] for k, v in s.items() if k not in ("signatures", "changed")]),
            ""]
    rows = [[r.predicted, r.here.value, Markdown(md_code(r.op) + (f" (x{n})" if n > 1 else "")),
             f"{r.dtype} {r.variant}".strip(), locs, r.note]
            for r, locs, n in grouped_predictions(prediction, 3) if r.predicted != "stable"]
    out += ["## Ops that are not predicted stable", ""]
    out += [md_table(("predicted", "here", "op", "dtype / variant", "where", "note"), rows) if rows
            else "None: every recorded op is stable in the catalog.", ""]
    return "\n".join(out)
