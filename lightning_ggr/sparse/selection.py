"""Which parameters are sparse: the default selection and ``include``/``exclude`` patterns."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

#: Convolution types (their weight is ``(out, in / groups, *kernel)``, transposed:
#: ``(in, out / groups, *kernel)``).
CONV_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

#: Module types whose ``weight`` is sparse by default.
DEFAULT_SPARSE_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, *CONV_MODULES)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def select_sparse_parameters(
    module: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, nn.Parameter]:
    """The parameters to train sparse, keyed by their ``named_parameters()`` names.

    By default the ``weight`` of every linear and (transposed) convolution layer; biases,
    normalization and embedding parameters stay dense. ``include`` replaces the default
    with the parameters whose name matches any of its shell-style patterns (``fnmatch``,
    e.g. ``"features.*.weight"``); ``exclude`` then removes matches.

    Raises:
        ValueError: a pattern matches no parameter, nothing is selected, or a selected
            parameter is shared by several modules (its mask would be ambiguous).
    """
    named = dict(module.named_parameters())
    if include is not None:
        for pattern in include:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in named):
                raise ValueError(f"include pattern {pattern!r} matches no parameter of the model")
        selected = [n for n in named if _matches(n, include)]
    else:
        selected = []
        for module_name, child in module.named_modules():
            if isinstance(child, DEFAULT_SPARSE_MODULES) and isinstance(
                getattr(child, "weight", None), nn.Parameter
            ):
                name = f"{module_name}.weight" if module_name else "weight"
                if name in named:
                    selected.append(name)
    if exclude is not None:
        for pattern in exclude:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in selected):
                raise ValueError(
                    f"exclude pattern {pattern!r} matches no selected sparse parameter"
                )
        selected = [n for n in selected if not _matches(n, exclude)]
    if not selected:
        raise ValueError(
            "the model has no sparse parameter: no Linear/Conv weight was found and none "
            "was named by `include`"
        )
    for name in selected:
        if named[name].is_meta or isinstance(named[name], nn.parameter.UninitializedParameter):
            raise ValueError(f"parameter {name!r} is not materialized; run a forward pass first")
    _refuse_shared(module, set(selected), named)
    return {name: named[name] for name in selected}


def _refuse_shared(module: nn.Module, selected: set[str], named: Mapping[str, Tensor]) -> None:
    by_id = {id(named[n]): n for n in selected}
    owners: dict[str, list[str]] = {n: [] for n in selected}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in by_id:
            owners[by_id[id(param)]].append(name)
    shared = {n: names for n, names in owners.items() if len(names) > 1}
    if shared:
        name, names = next(iter(shared.items()))
        raise ValueError(
            f"sparse parameter {name!r} is shared by {names}: a shared weight cannot have one "
            "mask per layer; exclude it with `exclude`"
        )
