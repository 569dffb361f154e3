"""What deterministic mode really runs: a light recording that notes each call's op and site.

PyTorch's Python code, and the user's, can take other paths when
``torch.are_deterministic_algorithms_enabled()`` (``nn.functional`` switches
``max_pool3d``, ``pad(mode="replicate")`` and bilinear ``interpolate`` to
decompositions on CUDA). An audit records its window once in default mode,
capturing inputs (:class:`~opaudit.engine.record.Recorder`), and then records
deterministic mode with a :class:`PathRecorder`: a call whose op the default
recording also called from the same site costs a dict lookup and captures
nothing; a call the default recording never made (another op, or the same op
from another line) is recorded in full, its first call's inputs captured within
the budget, so that an op only deterministic mode runs is replayed too.

Matching by op and site rather than by signature is what lets the two
recordings be made over different steps of one run: the next batch may have
other shapes, but it goes through the same lines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opaudit.data.site import Site
from opaudit.engine.optraits import OpTraits
from opaudit.engine.record import Recorder


class PathRecorder(Recorder):
    """Records which ops, called from where, a run makes; in full only the calls ``default`` never made.

    ``default`` is the default-mode recording of the same window (finished
    before this one starts). ``same_run`` says whether this recording continues
    that run over its next steps (``True``) or is a run of its own over the same
    window (``False``): see :meth:`judges`.
    """

    def __init__(self, default: Recorder, *, same_run: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.default = default
        self.same_run = same_run
        self._known: set[tuple[str, Site | None]] | None = None
        self._seen: dict[tuple[Any, int], bool] = {}
        """``(op traits, site id)`` → whether ``default`` made that call (then nothing more is recorded)."""
        self._shipped: set[tuple[str, Site]] = set()
        """``(op, site)`` pairs that forked children (DataLoader workers) called."""

    def __enter__(self) -> PathRecorder:
        if self._known is None:
            self._known = self.default.op_sites()
        super().__enter__()
        return self

    def _account(self, info: OpTraits, args: tuple, kwargs: dict | None, phase: int, site: int) -> Callable[..., Any]:
        """A call the default recording also made from this site is only noted; any other is recorded in full."""
        key = (info, site)
        known = self._seen.get(key)
        if known is None:
            known = self._seen[key] = self._made_by_default(info.name, site)
        if known:
            return info.call
        return super()._account(info, args, kwargs, phase, site)

    def _made_by_default(self, op: str, site_id: int) -> bool:
        known = self._known or set()
        return (op, self.sites.site(site_id)) in known or (op, None) in known

    def called(self) -> set[tuple[str, Site]]:
        """Every ``(op, site)`` this recording called (children's included)."""
        return {(info.name, self.sites.site(i)) for info, i in self._seen} | self._shipped

    def judges(self, since_mark: set[str]) -> Callable[[Any], bool]:
        """Whether this recording can tell if deterministic mode skips a default-mode signature.

        A run of its own over the same window (``same_run=False``) judges every
        signature. Steps after the window judge only what the default recording's
        last step called (``since_mark``, the ids :meth:`Recorder.since_mark` gave),
        and never a signature only model construction called: construction, the
        first step's lazy initialisation (optimizer state) and anything else that
        happens once come before the steps this recording saw.
        """
        if not self.same_run:
            return lambda sig: True
        return lambda sig: sig.id in since_mark and tuple(sig.phases) != ("setup",)

    # -- child processes: what they called, besides what they recorded in full --
    def forget_for_child(self) -> None:
        """In a forked child: drop what the parent recorded (the known calls stay known)."""
        super().forget_for_child()
        self._seen = {}

    def shipment(self) -> dict[str, Any]:
        """What this (child) recorder recorded, with the ``(op, site)`` pairs it called."""
        out = super().shipment()
        out["called"] = sorted(self.called(), key=repr)
        return out

    def merge(self, shipment: dict[str, Any]) -> None:
        """Add what a child process recorded, and the ``(op, site)`` pairs it called."""
        super().merge(shipment)
        self._shipped.update(tuple(pair) for pair in shipment.get("called", ()))
