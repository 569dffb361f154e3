"""Traces across processes and machines: ``opaudit trace`` writes one, ``opaudit compare`` names where two part.

:mod:`~opaudit.flows.trace.record` runs a script once under the tracer
(:mod:`opaudit.engine.tracer`) and streams every call to a trace file
(:mod:`opaudit.engine.tracefile`); :mod:`~opaudit.flows.trace.compare` reads two traces
side by side and builds the comparison record (:mod:`opaudit.data.comparison`);
:mod:`~opaudit.flows.trace.fresh` runs the whole-step check over separate processes
through traces (``--run-check --fresh-processes K``).
"""

from opaudit.flows.trace.compare import NotComparable, compare_traces
from opaudit.flows.trace.record import trace_target

__all__ = ["NotComparable", "compare_traces", "trace_target"]
