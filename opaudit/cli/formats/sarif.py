"""SARIF 2.1.0 for the audit report, a capsule replay and a trace comparison: what GitHub code scanning (and
other SARIF viewers) show on the lines.

One result per finding that is not ``stable``, at the user's source line as the
report records it (an op of the autograd engine at the forward line that made its
node, an op of the user's own ``backward()`` at its line). Each result's rule is its verdict and op
(``diverges/aten.index_put.default``); the rule's help is the remedy.

Levels, from the verdict:

* ``raises``, ``diverges_deterministic``, ``diverges``: ``error``;
* ``warns``: ``warning``;
* ``random``, ``uninitialized``, ``skipped``: ``note``;
* ``stable``: no result (it is not a finding in any other format either).

A capsule replay (:func:`replay`) gives, at each op's lines, one result for its
``across`` value (``differs`` and ``unsupported``: ``error``; ``differs_default``:
``warning``; ``skipped``: ``note``; ``same``: none) and one for its local verdict,
as above.

A trace comparison (:func:`comparison`) gives, per process, an ``error`` at the
line of its root cause and a ``warning`` at a first difference that came from
outside the ops or where the traces parted.

File URIs are the report's site paths, relative to the directory the audit ran in
(``uriBaseId: %SRCROOT%``), so that a SARIF upload from the repository root places
them. The document is byte-stable: no timestamps, no absolute paths.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import TYPE_CHECKING, Any

from opaudit.cli.formats.common import calls_text, verdict_text
from opaudit.data.verdict import Verdict
from opaudit.data.version import __version__

if TYPE_CHECKING:
    from opaudit.data.across import CapsuleReplay, Crossed
    from opaudit.data.comparison import TraceComparison
    from opaudit.data.findings import Finding
    from opaudit.data.report import Report
    from opaudit.data.site import Site

SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
SRCROOT = "%SRCROOT%"

LEVELS: dict[Verdict, str | None] = {
    Verdict.RAISES: "error",
    Verdict.DIVERGES_DETERMINISTIC: "error",
    Verdict.DIVERGES: "error",
    Verdict.WARNS: "warning",
    Verdict.RANDOM: "note",
    Verdict.UNINITIALIZED: "note",
    Verdict.SKIPPED: "note",
    Verdict.STABLE: None,
}
"""SARIF level of each verdict; ``None``: the verdict gives no result."""


def rule_id(f: "Finding") -> str:
    """``verdict/op``: the rule a finding's result belongs to."""
    return f"{f.verdict.value}/{f.op}"


def _location(site: "Site") -> "Site":
    """The user's own line: for code generated at run time, the line of the user's that led there."""
    return site.caller if site.caller is not None else site


def _physical(site: "Site") -> dict[str, Any] | None:
    """A SARIF physicalLocation, or ``None`` for a file that is not one (``<stdin>``, generated code)."""
    s = _location(site)
    if not s.file or s.file.startswith("<") or s.line < 1:
        return None
    return {"artifactLocation": {"uri": urllib.parse.quote(s.file, safe="/"), "uriBaseId": SRCROOT},
            "region": {"startLine": s.line}}


def _message(f: "Finding") -> str:
    """What the reviewer reads on the line: the verdict and its measurements, where, and what to do."""
    parts = [f"{f.op}: {verdict_text(f)} ({f.verdict.meaning})."]
    facts = []
    if f.phases:
        facts.append(f"phase {'/'.join(f.phases)}")
    if f.modules:
        facts.append(f"module {', '.join(f.modules)}")
    facts.append(f"{f.calls} call{'s' if f.calls != 1 else ''}")
    if f.diverges or f.diverges_deterministic:
        facts.append(f"{f.default_diverged} replays differed by default, {f.deterministic_diverged or '-'} "
                     "with deterministic mode")
        if f.max_abs_diff is not None:
            facts.append(f"max |diff| {f.max_abs_diff:.3g}")
    calls = calls_text(f)
    if calls:
        facts.append(calls)
    if f.det_cost is not None:
        facts.append(f"deterministic mode costs {f.det_cost:.2f}x")
    text = "; ".join(facts)
    parts.append(text[:1].upper() + text[1:] + ".")
    generated = [s for s in f.sites if s.caller is not None]
    if generated:
        parts.append("Via generated code: " + ", ".join(f"{s.file}:{s.line}" for s in generated) + ".")
    if f.strict_error:
        parts.append(f"PyTorch: {f.strict_error.strip()}")
    elif f.warnings:
        parts.append(f"PyTorch warns: {f.warnings[0].strip()}")
    if f.remedy:
        parts.append(f"What to do: {f.remedy}")
    return " ".join(parts)


def _rule(f: "Finding", level: str) -> dict[str, Any]:
    """The rule of ``f``'s verdict and op; its help is the remedy of the first (worst) such finding."""
    meaning = f.verdict.meaning
    rule: dict[str, Any] = {
        "id": rule_id(f),
        "shortDescription": {"text": f"{f.op}: {f.verdict.value}"},
        "fullDescription": {"text": f"{f.op} {meaning}."},
        "defaultConfiguration": {"level": level},
        "properties": {"tags": ["nondeterminism", f.verdict.value]},
    }
    if f.remedy:
        rule["help"] = {"text": f.remedy}
    return rule


def _result(f: "Finding", index: int, level: str) -> dict[str, Any]:
    result: dict[str, Any] = {"ruleId": rule_id(f), "ruleIndex": index, "level": level,
                              "message": {"text": _message(f)}}
    physical = [p for p in (_physical(s) for s in f.sites) if p is not None]
    unique = list({json.dumps(p, sort_keys=True): p for p in physical}.values())
    if unique:
        result["locations"] = [{"physicalLocation": unique[0]}]
    if len(unique) > 1:
        result["relatedLocations"] = [{"id": i, "physicalLocation": p, "message": {"text": f"{f.op} is called here too"}}
                                      for i, p in enumerate(unique[1:], 1)]
    result["partialFingerprints"] = {"opauditSignature/v1": f.id}
    props: dict[str, Any] = {"verdict": f.verdict.value, "op": f.op, "signature": f.signature, "calls": f.calls,
                             "first_call": f.first_call}
    for key in ("phases", "modules", "outputs"):
        if getattr(f, key):
            props[key] = list(getattr(f, key))
    for key in ("reason", "default_diverged", "deterministic_diverged", "strict_error"):
        if getattr(f, key):
            props[key] = getattr(f, key)
    if f.max_abs_diff is not None:
        props["max_abs_diff"] = f.max_abs_diff
    result["properties"] = props
    return result


def report(report: "Report") -> str:
    """The report as a SARIF 2.1.0 log: one run, one result per finding that is not ``stable``."""
    rules: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    results = []
    for f in report.all_findings:
        level = LEVELS[f.verdict]
        if level is None:
            continue
        rid = rule_id(f)
        if rid not in index:
            index[rid] = len(rules)
            rules.append(_rule(f, level))
        results.append(_result(f, index[rid], level))
    run: dict[str, Any] = {
        "tool": {"driver": {
            "name": "opaudit",
            "version": __version__,
            "semanticVersion": __version__,
            "rules": rules,
        }},
        "originalUriBaseIds": {SRCROOT: {"description": {"text": "The directory the audit ran in."}}},
        "invocations": [{"executionSuccessful": bool(report.complete)}],
        "results": results,
        "properties": {"summary": report.summary,
                       "script": str(report.settings.get("script", "")),
                       "complete": bool(report.complete)},
    }
    log = {"$schema": SCHEMA, "version": "2.1.0", "runs": [run]}
    return json.dumps(log, indent=2, ensure_ascii=False) + "\n"


ACROSS_LEVELS: dict[str, str | None] = {
    "unsupported": "error",
    "differs": "error",
    "differs_default": "warning",
    "skipped": "note",
    "same": None,
}
"""SARIF level of each ``across`` value of a capsule replay; ``None``: no result."""


def _across_message(r: "Crossed") -> str:
    """What the reviewer reads on the line: how the op's bits compare with the capsule's source, and how far."""
    f = r.finding
    parts = [f"{f.op}: {r.across.value} on this machine ({r.across.meaning})."]
    facts = []
    if r.modes:
        facts.append(f"in {' and '.join(r.modes)} mode")
    if r.outputs:
        facts.append(f"outputs {', '.join(r.outputs)}")
    if r.max_abs_diff is not None:
        facts.append(f"max |diff| {r.max_abs_diff:.3g}")
    if r.max_ulp is not None:
        facts.append(f"max ULP {r.max_ulp}")
    if r.frac_differing is not None:
        facts.append(f"{r.frac_differing:.1%} of the elements differ")
    facts.append(f"{f.calls} call{'s' if f.calls != 1 else ''}")
    facts.append(f"verdict here: {f.verdict.value}")
    text = "; ".join(facts)
    parts.append(text[:1].upper() + text[1:] + ".")
    if r.reason:
        parts.append(r.reason.strip())
    return " ".join(parts)


def replay(doc: "CapsuleReplay") -> str:
    """A capsule replay as a SARIF 2.1.0 log: at each op's lines, one result for its ``across`` value (unless
    ``same``: rule ``across/<value>/<op>``) and one for its local verdict as an audit report gives it (unless
    ``stable``: rule ``<verdict>/<op>``)."""
    rules: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    results = []

    def add(rid: str, rule: dict[str, Any], result: dict[str, Any]) -> None:
        if rid not in index:
            index[rid] = len(rules)
            rules.append(rule)
        results.append({**result, "ruleIndex": index[rid]})

    for r in doc.rows:
        f = r.finding
        level = ACROSS_LEVELS[r.across.value]
        if level is not None:
            rid = f"across/{r.across.value}/{f.op}"
            rule = {"id": rid, "shortDescription": {"text": f"{f.op}: {r.across.value} across machines"},
                    "fullDescription": {"text": f"{f.op}: {r.across.meaning}."},
                    "defaultConfiguration": {"level": level},
                    "properties": {"tags": ["portability", r.across.value]}}
            result = _result(f, 0, level)
            result.update(ruleId=rid, message={"text": _across_message(r)})
            props = dict(result["properties"], across=r.across.value)
            for key in ("max_abs_diff", "max_ulp", "frac_differing"):
                if getattr(r, key) is not None:
                    props[f"{key}_across"] = getattr(r, key)
            for key in ("outputs", "modes"):
                if getattr(r, key):
                    props[f"{key}_across"] = list(getattr(r, key))
            if r.reason:
                props["reason_across"] = r.reason
            result["properties"] = props
            add(rid, rule, result)
        level = LEVELS[f.verdict]
        if level is not None:
            add(rule_id(f), _rule(f, level), _result(f, 0, level))
    run: dict[str, Any] = {
        "tool": {"driver": {"name": "opaudit", "version": __version__, "semanticVersion": __version__,
                            "rules": rules}},
        "originalUriBaseIds": {SRCROOT: {"description": {"text": "The directory the capture ran in."}}},
        "invocations": [{"executionSuccessful": bool(doc.complete)}],
        "results": results,
        "properties": {"summary": doc.summary, "capsule": doc.capsule, "complete": bool(doc.complete),
                       "environment_difference": [{"field": k, "source": a, "here": b}
                                                  for k, a, b in doc.environment_difference]},
    }
    log = {"$schema": SCHEMA, "version": "2.1.0", "runs": [run]}
    return json.dumps(log, indent=2, ensure_ascii=False) + "\n"


def _call_location(where: str) -> dict[str, Any] | None:
    """A SARIF physicalLocation from a traced call's ``file:line``, or ``None`` (no user line, generated code)."""
    file, _, line = where.rpartition(":")
    if not file or file.startswith("<") or not line.isdigit() or int(line) < 1:
        return None
    return {"artifactLocation": {"uri": urllib.parse.quote(file, safe="/"), "uriBaseId": SRCROOT},
            "region": {"startLine": int(line)}}


COMPARISON_EVENTS: tuple[tuple[str, str, str], ...] = (
    ("root_cause", "error", "its inputs were bitwise equal in both traces and its outputs were not: the difference "
                            "starts here"),
    ("first_difference", "warning", "its outputs differed, and so did its inputs, with no call before it to blame: "
                                    "the difference came from outside the ops (files, Python or NumPy values, "
                                    "other threads)"),
    ("parted", "warning", "from this call on the two traces take other paths and could not be realigned"),
)
"""The calls of a comparison that get a result: (event, level, what it means)."""


def comparison(doc: "TraceComparison") -> str:
    """Two traces compared (``opaudit compare``) as a SARIF 2.1.0 log: one result per process at the line of its
    root cause (``error``, rule ``trace/root_cause/<op>``), of a first difference that came from outside the ops
    and of the call where the traces parted (``warning``); an identical comparison has no result. The run's
    properties hold the verdict and the environment difference."""
    rules: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    results = []
    fields = [*doc.environment, *doc.settings]
    between = "; ".join(f"{f.name}: {f.before} vs {f.after}" for f in fields[:4]) + ("; ..." if len(fields) > 4 else "")
    for r in doc.ranks:
        on = f" on rank {r.rank}" if r.rank is not None else ""
        first = " (the rank that diverged first)" if doc.first_rank is not None and r.rank == doc.first_rank else ""
        for event, level, meaning in COMPARISON_EVENTS:
            call = getattr(r, event)
            if call is None:
                continue
            rid = f"trace/{event}/{call.op}" if event != "parted" else "trace/parted"
            if rid not in index:
                index[rid] = len(rules)
                rules.append({"id": rid, "shortDescription": {"text": f"{call.op}: {event.replace('_', ' ')}"},
                              "fullDescription": {"text": f"A traced call where {meaning}."},
                              "defaultConfiguration": {"level": level},
                              "properties": {"tags": ["reproducibility", event]}})
            facts = [f"{call.phase} phase" if call.phase else "", f"step {call.step}" if call.step else "the import",
                     f"call #{call.index_a} in A, #{call.index_b} in B"]
            text = f"{call.op}{on}{first}: {meaning}. " + "; ".join(f for f in facts if f) + "."
            if call.differs:
                text += " Differs: " + ", ".join(call.differs) + "."
            if event == "root_cause":
                text += f" {r.downstream} later call(s) differed."
            text += f" Traces {doc.a} and {doc.b}" + (f", which differ in {between}." if between else ".")
            result: dict[str, Any] = {"ruleId": rid, "ruleIndex": index[rid], "level": level,
                                      "message": {"text": text}}
            location = _call_location(call.where)
            if location is not None:
                result["locations"] = [{"physicalLocation": location}]
            props: dict[str, Any] = {"event": event, **call.to_dict()}
            if r.rank is not None:
                props["rank"] = r.rank
            result["properties"] = props
            results.append(result)
    run: dict[str, Any] = {
        "tool": {"driver": {"name": "opaudit", "version": __version__, "semanticVersion": __version__,
                            "rules": rules}},
        "originalUriBaseIds": {SRCROOT: {"description": {"text": "The directory the traces ran in."}}},
        "invocations": [{"executionSuccessful": True}],
        "results": results,
        "properties": {"verdict": doc.verdict, "a": doc.a, "b": doc.b, "script": doc.script,
                       "environment_difference": [{"field": f.name, "a": f.before, "b": f.after}
                                                  for f in (*doc.environment, *doc.settings)]},
    }
    log = {"$schema": SCHEMA, "version": "2.1.0", "runs": [run]}
    return json.dumps(log, indent=2, ensure_ascii=False) + "\n"
