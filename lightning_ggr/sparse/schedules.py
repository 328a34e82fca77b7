"""When to rewire and how many weights to move (paper section 3.2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_ggr.sparse.checks import check_choice, check_fraction, check_int

#: Units of ``update_interval``.
INTERVALS = ("step", "epoch")


def cosine_drop_fraction(initial: float, step: int, stop_step: int) -> float:
    """Drop fraction ``f_t = f_0 * (1 + cos(pi * t / T)) / 2``, and 0 from ``T`` on.

    The cosine decay RigL introduced and the paper uses: ``f_0`` at step 0, 0 at the stop.
    """
    if stop_step <= 0 or step >= stop_step:
        return 0.0
    return initial * (1.0 + math.cos(math.pi * max(step, 0) / stop_step)) / 2.0


@dataclass(frozen=True)
class RewiringSchedule:
    """Which optimizer steps rewire the network.

    Training is cut into *slots*: ``update_interval`` optimizer steps (``interval="step"``)
    or epochs (``interval="epoch"``). The first step of every slot but the first, before
    ``stop_step``, rewires: with ``interval="epoch", update_interval=1`` that is the start
    of every epoch but the first, as in the paper. ``is_due`` stays true for the rest of a
    slot until a rewiring is recorded; ``SparseEngine`` also keeps a rewiring it had to
    postpone (non-finite gradients) pending past the slot and past ``stop_step``.

    Args:
        interval: ``"step"`` or ``"epoch"``.
        update_interval: slot length in steps or epochs, ``>= 1``.
        stop_step: no rewiring at or after this optimizer step, ``>= 0`` (0: never rewire).
        drop_fraction: initial drop fraction ``f_0`` in ``(0, 1]``, decayed by
            :func:`cosine_drop_fraction`.

    Raises:
        ValueError, TypeError: an argument outside the ranges above.
    """

    interval: str
    update_interval: int
    stop_step: int
    drop_fraction: float

    def __post_init__(self) -> None:
        # Frozen: store the checked values (canonical Python types) through object.__setattr__.
        checked = {
            "interval": check_choice("interval", self.interval, INTERVALS),
            "update_interval": check_int("update_interval", self.update_interval, 1),
            "stop_step": check_int("stop_step", self.stop_step, 0),
            "drop_fraction": check_fraction("drop_fraction", self.drop_fraction,
                                            closed_low=False),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def slot(self, step: int, epoch: int) -> int:
        """Index of the slot that optimizer step ``step`` (in epoch ``epoch``) belongs to."""
        unit = step if self.interval == "step" else epoch
        return unit // self.update_interval

    def is_due(self, step: int, epoch: int, last_slot: int) -> bool:
        """Whether ``step`` should rewire, given the slot of the last rewiring."""
        current = self.slot(step, epoch)
        return current >= 1 and current > last_slot and step < self.stop_step

    def drop_fraction_at(self, step: int) -> float:
        return cosine_drop_fraction(self.drop_fraction, step, self.stop_step)
