"""Method presets: every method is removal x allocation x insertion (see docs/methods.md)."""

from __future__ import annotations

from dataclasses import dataclass

REMOVALS = ("magnitude", "threshold")
ALLOCATIONS = ("keep", "gradient", "proportional")
INSERTIONS = ("gradient", "random", "mixed")


@dataclass(frozen=True)
class MethodSpec:
    """The three independent choices of a dynamic-sparse-training method.

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
        for field, value, allowed in (
            ("removal", self.removal, REMOVALS),
            ("allocation", self.allocation, ALLOCATIONS),
            ("insertion", self.insertion, INSERTIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {value!r}")

    @property
    def needs_gradients(self) -> bool:
        """Whether rewiring reads the dense gradient (RigL- and GGR-style growth)."""
        return self.allocation == "gradient" or self.insertion in ("gradient", "mixed")

    @property
    def moves_between_layers(self) -> bool:
        return self.allocation != "keep"


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


def get_method(name: str) -> MethodSpec:
    """The preset called ``name``; a clear error listing the allowed names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, one of {tuple(METHODS)}; got {name!r}")
    try:
        return METHODS[name]
    except KeyError:
        allowed = ", ".join(repr(m) for m in METHODS)
        raise ValueError(f"method must be one of {allowed}; got {name!r}") from None
