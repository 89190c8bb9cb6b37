"""Progress events of long operations (loading a model, converting a checkpoint).

A callback passed as ``progress=`` receives one ``Progress`` per step. The CLI draws its bars from
the same events, so an app embedding zlocal sees exactly what a terminal user sees. An exception
raised by the callback propagates and stops the operation (how an app cancels a load or a conversion);
nothing is left half-written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """One step of an operation: ``done`` of ``total`` ``unit`` in ``stage``.

    Stages of a load: ``"read"`` (checkpoint tensors read and placed, bytes), ``"map"`` (a prepared
    form mapped, bytes), ``"prepare"`` (layers fused for the kernels), ``"warm-up"`` (one token
    through every layer), ``"save"`` (the prepared form written to the cache, bytes), ``"ready"``.
    Conversion: ``"convert"`` (source tensors written, bytes) and ``"quality"``.
    """

    stage: str
    done: int
    total: int
    unit: str = "bytes"
    message: str = ""

    @property
    def fraction(self) -> float:
        """``done / total`` in 0..1 (1.0 when the total is unknown or zero)."""
        return min(1.0, self.done / self.total) if self.total > 0 else 1.0


ProgressCallback = Callable[[Progress], None]


def report(
    callback: ProgressCallback | None,
    stage: str,
    done: int,
    total: int,
    unit: str = "bytes",
    message: str = "",
) -> None:
    """Send one event to ``callback`` (nothing when it is None)."""
    if callback is not None:
        callback(Progress(stage, int(done), int(total), unit, message))
