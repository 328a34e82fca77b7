"""Method presets: every method is removal x allocation x insertion (see docs/methods.md).

A new method is one entry of :data:`METHODS`; a new way to remove, allocate or insert is a
small class in ``lightning_ggr.sparse.rewiring`` plus one entry in the matching table below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from lightning_ggr.sparse.checks import (
    check_bool,
    check_choice,
    check_finite,
    check_fraction,
    check_positive_or_none,
)
from lightning_ggr.sparse.rewiring import (
    DSR_REFERENCE_THRESHOLD,
    Allocation,
    GradientAllocation,
    GradientInsertion,
    Insertion,
    KeepAllocation,
    MagnitudeRemoval,
    MixedInsertion,
    ProportionalAllocation,
    RandomInsertion,
    Removal,
    Rewiring,
    ThresholdRemoval,
)

#: Removal name -> factory taking the method's settings (see :meth:`MethodSpec.build`).
REMOVALS: dict[str, Callable[..., Removal]] = {
    "magnitude": lambda **settings: MagnitudeRemoval(),
    "threshold": lambda *, dsr_tolerance, dsr_initial_threshold, **settings: ThresholdRemoval(
        dsr_tolerance, initial_threshold=dsr_initial_threshold),
}
#: Allocation name -> factory.
ALLOCATIONS: dict[str, Callable[..., Allocation]] = {
    "keep": lambda **settings: KeepAllocation(),
    "gradient": lambda **settings: GradientAllocation(),
    "proportional": lambda **settings: ProportionalAllocation(),
}
#: Insertion name -> factory.
INSERTIONS: dict[str, Callable[..., Insertion]] = {
    "gradient": lambda **settings: GradientInsertion(),
    "random": lambda **settings: RandomInsertion(),
    "mixed": lambda *, gradient_ratio, **settings: MixedInsertion(gradient_ratio),
}


@dataclass(frozen=True)
class MethodSpec:
    """The three independent choices of a dynamic-sparse-training method, by name.

    Attributes:
        removal: ``"magnitude"``: each layer drops ``round(f * n_l)`` smallest active
            weights; ``"threshold"``: every active weight below DSR's adaptive global
            threshold ``H``.
        allocation: ``"keep"``: a layer regrows what it lost; ``"gradient"`` (GGR): layer
            ``l`` regrows as many as it holds of the global top-K inactive gradient
            magnitudes; ``"proportional"`` (DSR): K split by surviving active counts.
        insertion: ``"gradient"`` (RigL): largest inactive gradients; ``"random"`` (SET):
            uniform random inactive positions; ``"mixed"`` (GGR): ``gradient_ratio`` by
            gradient, the rest at random.
    """

    removal: str
    allocation: str
    insertion: str

    def __post_init__(self) -> None:
        check_choice("removal", self.removal, tuple(REMOVALS))
        check_choice("allocation", self.allocation, tuple(ALLOCATIONS))
        check_choice("insertion", self.insertion, tuple(INSERTIONS))

    @property
    def needs_gradients(self) -> bool:
        """Whether rewiring reads the dense gradient (RigL- and GGR-style growth)."""
        return self.build().needs_gradients

    @property
    def moves_between_layers(self) -> bool:
        """Whether layer densities can change (the allocation is not "keep")."""
        return self.build().allocation.moves_between_layers

    def build(self, *, gradient_ratio: float = 0.5, init_value: float = 1e-10,
              dsr_tolerance: float = 0.1, reinit_regrown: bool = False,
              dsr_initial_threshold: float | None = DSR_REFERENCE_THRESHOLD) -> Rewiring:
        """The :class:`~lightning_ggr.sparse.rewiring.Rewiring` this spec names: the one
        place where settings become objects.

        Args:
            gradient_ratio: share of mixed insertion grown by gradient, ``[0, 1]``.
            init_value: value of a newly grown weight (finite).
            dsr_tolerance: DSR's tolerance around its target removal count, ``(0, 1)``.
            reinit_regrown: restart a weight dropped and regrown in the same rewiring at
                ``init_value`` with fresh state (``False``: it keeps both, as RigL's reference).
            dsr_initial_threshold: DSR's first threshold ``H`` (finite, > 0; its reference:
                1e-3), or ``None`` to start at the ``K``-th smallest active magnitude.
        """
        settings: dict[str, Any] = {
            "gradient_ratio": check_fraction("gradient_ratio", gradient_ratio),
            "dsr_tolerance": check_fraction("dsr_tolerance", dsr_tolerance,
                                            closed_low=False, closed_high=False),
            "dsr_initial_threshold": check_positive_or_none("dsr_initial_threshold",
                                                            dsr_initial_threshold),
        }
        return Rewiring(
            REMOVALS[self.removal](**settings),
            ALLOCATIONS[self.allocation](**settings),
            INSERTIONS[self.insertion](**settings),
            init_value=check_finite("init_value", init_value),
            reinit_regrown=check_bool("reinit_regrown", reinit_regrown),
        )


#: The methods of the paper's Tables 1 and 3, lower case as the literature writes them.
METHODS: dict[str, MethodSpec] = {
    "set": MethodSpec("magnitude", "keep", "random"),
    "rigl": MethodSpec("magnitude", "keep", "gradient"),
    "dsr": MethodSpec("threshold", "proportional", "random"),
    "ggr": MethodSpec("magnitude", "gradient", "mixed"),
    "set_rigl": MethodSpec("magnitude", "keep", "mixed"),
    "ggr_set": MethodSpec("magnitude", "gradient", "random"),
    "ggr_rigl": MethodSpec("magnitude", "gradient", "gradient"),
}

#: The method names as a type (for signatures and LightningCLI's ``--help``).
MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]


def get_method(name: str) -> MethodSpec:
    """The preset called ``name``; a clear error listing the allowed names otherwise."""
    return METHODS[check_choice("method", name, tuple(METHODS))]
