"""Whether other work shared this process's CPU cores while ops replayed: races hide then.

A CPU race (``index_put_(accumulate=True)``: two threads adding into one row)
shows only when the replay's intra-op threads really run side by side; with
the cores busy with other processes they take turns, and every replay can agree.
:class:`CpuWatch` measures, over the time it is entered, how much of the cores
this process may run on (``os.sched_getaffinity``) other processes used: from
Linux's per-core counters (``/proc/stat``) less the CPU time of this process and
its children (an ``--isolate`` worker replays for it), else
from the load average less this process's threads. When fewer cores were free
than the replay uses threads (``torch.get_num_threads()``), a ``stable`` verdict
is weak evidence, and the audit says so.
"""

from __future__ import annotations

import os
import time
from typing import Any


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _busy_ticks(cpus: list[int]) -> int | None:
    """Clock ticks the given cores spent busy (not idle, not waiting for I/O), from ``/proc/stat``."""
    want = {f"cpu{c}" for c in cpus}
    total, found = 0, 0
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                name, _, rest = line.partition(" ")
                if name not in want:
                    continue
                values = [int(v) for v in rest.split()]
                # user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
                total += sum(values[:8]) - values[3] - values[4]
                found += 1
    except (OSError, ValueError, IndexError):
        return None
    return total if found == len(want) else None


def _stat(pid: int | str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def _own_ticks() -> int | None:
    """Clock ticks this process and its children (an ``--isolate`` worker) spent on a CPU.

    Its own threads' time, its reaped children's, and the time of the children
    still running (found by their parent id): a worker that replays is this
    process's work, not another's.
    """
    me = _stat("self")
    if me is None:
        return None
    try:
        # utime, stime, cutime, cstime: fields 14 to 17 of /proc/PID/stat (the 12th to 15th after the name).
        total = sum(int(v) for v in me[11:15])
        pid = str(os.getpid())
        for entry in os.listdir("/proc"):
            if entry.isdigit() and entry != pid:
                child = _stat(entry)
                if child is not None and child[1] == pid:
                    total += sum(int(v) for v in child[11:15])
    except (OSError, ValueError, IndexError):
        return None
    return total


class CpuWatch:
    """Measures the cores other processes took from this one while entered (see the module)."""

    def __init__(self) -> None:
        self.cpus = _cpus()
        self.others: float | None = None
        """Cores' worth of CPU time other processes used on this process's cores, on average."""
        self._start: tuple[float, int | None, int | None] | None = None

    def __enter__(self) -> CpuWatch:
        self._start = (time.monotonic(), _busy_ticks(self.cpus), _own_ticks())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._start is None:
            return
        t0, busy0, own0 = self._start
        wall = time.monotonic() - t0
        busy1, own1 = _busy_ticks(self.cpus), _own_ticks()
        if wall <= 0.05:
            return
        if None not in (busy0, busy1, own0, own1):
            tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
            self.others = max(0.0, ((busy1 - busy0) - (own1 - own0)) / tick / wall)  # type: ignore[operator]
            return
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            return
        self.others = max(0.0, load - 1.0)  # the load average counts this process's running thread too

    def free_cores(self) -> float | None:
        """Cores left to this process, on average, while entered; ``None`` if it could not be measured."""
        if self.others is None:
            return None
        return max(0.0, len(self.cpus) - self.others)

    def contended(self, threads: int) -> str | None:
        """One line when fewer cores were free than ``threads`` (the replay's intra-op threads), else ``None``."""
        free = self.free_cores()
        if free is None or threads < 2 or round(free, 1) >= threads:
            return None
        return (f"the CPU was contended while ops replayed: other processes kept about {self.others:.1f} of this "
                f"process's {len(self.cpus)} core(s) busy, leaving about {free:.1f} for the replay's {threads} "
                "threads: thread races (index_put_(accumulate=True), scatter_add_...) show only when the threads "
                "run side by side, so a stable verdict here is weak evidence; audit again on a quieter machine")
