"""Which parameters are sparse, and why every other one stays dense.

One inventory serves both the masks and the summary a user reads: :func:`plan_selection`
returns a :class:`Selection` holding every parameter tensor of a module once, marked sparse
(with the role that made it a layer weight) or dense (with the reason).

The default rule. A tensor is sparse when it is a linear map the optimizer trains:

- the ``weight`` of every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``
  (subclasses included: ``LazyLinear`` once materialized, MultiheadAttention's ``out_proj``);
- the ``weight`` of Hugging Face transformers' ``Conv1D`` (GPT-2's attention and MLP): a
  linear map stored ``(in, out)`` (:func:`is_transposed_linear`), recognised without
  importing transformers;
- the projections of ``nn.MultiheadAttention``: ``in_proj_weight`` (Q, K and V stacked, shape
  ``(3E, E)``: **one** sparse layer, one mask, one ERK score of its own shape, so its ERK
  density is 2/3 that of an ``(E, E)`` projection), or ``q_proj_weight``, ``k_proj_weight``,
  ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``;
- behind a parametrization: ``spectral_norm``'s ``parametrizations.weight.original`` and
  ``weight_norm(dim=None)``'s ``original1`` (a zero there is a zero of the weight);

and it requires grad and, when the trained tensors are given (``trained``), an optimizer
holds it. Everything else is dense: biases, normalization layers, embeddings, other 1-D or
≥2-D tensors that are not such a weight (a ViT's class token), frozen tensors, tensors no
optimizer holds, ``weight_norm(dim=0)``'s ``v`` (a row of ``v`` with no active weight would
make that row of the weight ``0 / 0 = NaN``) and its magnitude ``g``.

A tensor shared by several modules (tied input embedding and output projection) is one
tensor with one mask, under the name ``named_parameters()`` gives it (the first owner in
registration order; the others are its aliases). It is sparse when any owner makes it a
layer weight, whatever the registration order, and ``include``/``exclude`` patterns match any
of its names.

``include`` replaces the default candidates by the tensors one of whose names matches one of
its shell-style patterns (``fnmatch``); ``exclude`` then removes matches. A 1-D (or 0-D)
tensor is sparse only when ``include`` names it exactly: a wildcard reaching biases or norm
scales is an error, since moving weights into or out of them is rarely meant.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

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

def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear map whose ``weight`` is stored ``(in, out)``: Hugging Face
    transformers' ``Conv1D`` (GPT-2's attention and MLP), ``y = x @ weight + bias``.

    Recognised by type name and module without importing transformers (it may not be
    installed); the one home of this rule for selection, analysis, export and inference.
    """
    kind = type(module)
    return (
        kind.__name__ == "Conv1D"
        and kind.__module__.split(".")[0] == "transformers"
        and isinstance(getattr(module, "weight", None), Tensor)
        and module.weight.dim() == 2
    )


#: Module types whose ``weight`` is sparse by default.
DEFAULT_SPARSE_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, *CONV_MODULES)

#: ``nn.MultiheadAttention``'s projection weights, sparse by default (raw Parameters, not
#: ``Linear`` modules). ``out_proj`` is a ``Linear`` and needs no entry.
ATTENTION_WEIGHTS: tuple[str, ...] = ("in_proj_weight", "q_proj_weight", "k_proj_weight",
                                      "v_proj_weight")

#: Normalization layers: their parameters are dense (reason ``norm``).
NORM_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

#: Embedding layers: their weight is dense (reason ``embedding``) unless tied to a layer weight.
EMBEDDING_MODULES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)

#: The role of transformers' ``Conv1D`` weight in the selection summary.
TRANSPOSED_LINEAR_ROLE = "Conv1D (transformers, linear stored in x out)"

#: The reason a selected tensor is left dense because no optimizer holds it.
NOT_IN_OPTIMIZER = "not in the optimizer"
#: The reason a frozen tensor is left dense.
FROZEN = "frozen (requires_grad=False)"
#: The reason a tensor matched by ``exclude`` is left dense.
EXCLUDED = "excluded"


@dataclass
class ParameterEntry:
    """One parameter tensor of a module and the decision about it.

    Attributes:
        name: the name ``named_parameters()`` gives the tensor (the engine's key).
        tensor: the parameter itself.
        sparse: whether it is trained sparse.
        reason: for a sparse tensor, the role that made it a layer weight (``"Linear"``,
            ``"MultiheadAttention in_proj (Q,K,V stacked)"``, ...); for a dense one, why it is
            dense (``"bias"``, ``"norm (LayerNorm)"``, ``"frozen (requires_grad=False)"``,
            ``"not in the optimizer"``, ``"excluded"``, ...).
        aliases: the tensor's other names (tied weights, shared modules).
        owners: ``"<name> (<module type>)"`` for every name, the first being ``name``.
    """

    name: str
    tensor: Tensor
    sparse: bool = False
    reason: str = ""
    aliases: tuple[str, ...] = ()
    owners: tuple[str, ...] = ()
    # Internal: the role if some owner makes it a layer weight, the sparse-gradient flag.
    role: str | None = field(default=None, repr=False)
    sparse_gradient: bool = field(default=False, repr=False)

    @property
    def names(self) -> tuple[str, ...]:
        """``name`` and every alias."""
        return (self.name, *self.aliases)

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The tensor's shape (``None`` while a lazy parameter is not materialized)."""
        return None if _uninitialized(self.tensor) else tuple(self.tensor.shape)

    @property
    def numel(self) -> int:
        return 0 if _uninitialized(self.tensor) else self.tensor.numel()

    @property
    def tied(self) -> bool:
        return bool(self.aliases)


@dataclass
class Selection:
    """Every parameter tensor of a module, once, each sparse or dense with its reason."""

    entries: list[ParameterEntry]

    @property
    def params(self) -> dict[str, Tensor]:
        """Name -> tensor of the sparse parameters (what :class:`SparseEngine` takes)."""
        return {e.name: e.tensor for e in self.entries if e.sparse}

    @property
    def dense(self) -> dict[str, str]:
        """Name -> why it is dense, for every other parameter tensor."""
        return {e.name: e.reason for e in self.entries if not e.sparse}

    @property
    def total_params(self) -> int:
        """Parameters of the module, each tensor once."""
        return sum(e.numel for e in self.entries)

    @property
    def sparse_params(self) -> int:
        """Parameters in the sparse tensors."""
        return sum(e.numel for e in self.entries if e.sparse)

    @property
    def coverage(self) -> float:
        """Share of all parameters in the sparse tensors: sparsity ``s`` zeroes ``s *
        coverage`` of the model."""
        total = self.total_params
        return self.sparse_params / total if total else 0.0

    def __getitem__(self, name: str) -> ParameterEntry:
        for entry in self.entries:
            if name in entry.names:
                return entry
        raise KeyError(name)


# ------------------------------------------------------------------------------- the rule
def _uninitialized(tensor: Tensor) -> bool:
    return isinstance(tensor, nn.parameter.UninitializedParameter) or tensor.is_meta


def _base_name(module: nn.Module, bases: tuple[type[nn.Module], ...]) -> str:
    """``Linear`` for ``NonDynamicallyQuantizableLinear`` or ``ParametrizedLinear``."""
    return next(c.__name__ for c in type(module).__mro__ if c in bases)


def _parametrized_role(parent: nn.Module, tensor_name: str, attr: str) -> tuple[str | None, str]:
    """(role, dense reason) of ``parent.parametrizations.<tensor_name>.<attr>``."""
    chain = list(parent.parametrizations[tensor_name])
    kinds = ", ".join(type(p).__name__.lstrip("_") for p in chain)
    if not isinstance(parent, DEFAULT_SPARSE_MODULES) or tensor_name != "weight":
        return None, f"parametrized ({kinds})"
    base = _base_name(parent, DEFAULT_SPARSE_MODULES)
    names = [type(p).__name__ for p in chain]
    if names == ["_SpectralNorm"] and attr == "original":
        # weight = original / sigma, sigma a scalar: a zero of original is a zero of weight.
        return f"spectral_norm({base})", ""
    if names == ["_WeightNorm"]:
        if attr == "original0":
            return None, "weight_norm magnitude g"
        if getattr(chain[0], "dim", 0) == -1:  # dim=None: one norm over the whole tensor
            return f"weight_norm({base}, dim=None) v", ""
        return None, (f"weight_norm v (dim={chain[0].dim}): a row with no active weight would "
                      "be 0/0 = NaN")
    return None, f"parametrized ({kinds}): a zero of its input is not a zero of the weight"


def _role(owner: nn.Module, module_name: str, attr: str, tensor: Tensor,
          modules: dict[str, nn.Module]) -> tuple[str | None, str]:
    """(role if this owner makes ``tensor`` a sparse layer weight, else None; dense reason)."""
    if isinstance(owner, parametrize.ParametrizationList):
        parent_name, _, tensor_name = module_name.rpartition(".parametrizations.")
        if not parent_name and module_name.startswith("parametrizations."):
            parent_name, tensor_name = "", module_name.split(".", 1)[1]
        return _parametrized_role(modules[parent_name], tensor_name, attr)
    kind = type(owner).__name__
    if isinstance(owner, nn.MultiheadAttention) and attr in ATTENTION_WEIGHTS:
        what = "Q,K,V stacked" if attr == "in_proj_weight" else attr[0].upper()
        return f"MultiheadAttention {attr.removesuffix('_weight')} ({what})", ""
    if attr == "bias" or attr.endswith("_bias") or attr.startswith("bias_"):
        return None, "bias"
    if isinstance(owner, NORM_MODULES):
        return None, f"norm ({kind})"
    if isinstance(owner, EMBEDDING_MODULES):
        return None, f"embedding ({kind})"
    if isinstance(owner, DEFAULT_SPARSE_MODULES) and attr == "weight":
        base = _base_name(owner, DEFAULT_SPARSE_MODULES)
        parent_name, _, child = module_name.rpartition(".")
        if child == "out_proj" and isinstance(modules.get(parent_name), nn.MultiheadAttention):
            return f"MultiheadAttention out_proj ({base})", ""
        return (base if kind == base else f"{kind} ({base})"), ""
    if attr == "weight" and is_transposed_linear(owner):
        return TRANSPOSED_LINEAR_ROLE, ""
    if isinstance(owner, DEFAULT_SPARSE_MODULES) and attr == "weight_g":
        return None, "weight_norm magnitude g (hook-based weight_norm)"
    if isinstance(owner, DEFAULT_SPARSE_MODULES) and attr == "weight_v":
        return None, "weight_norm v (hook-based): a row with no active weight would be 0/0 = NaN"
    if isinstance(owner, DEFAULT_SPARSE_MODULES) and attr == "weight_orig":
        return None, "reparametrized by a hook (weight_orig): name it in include to mask it"
    if isinstance(owner, nn.RNNBase):
        return None, f"recurrent weight ({kind}): not selected by default, name it in include"
    if not _uninitialized(tensor) and tensor.dim() <= 1:
        return None, "1-D" if tensor.dim() == 1 else "scalar"
    return None, f"not a Linear/Conv/attention weight ({kind}.{attr})"


def _inventory(module: nn.Module) -> list[ParameterEntry]:
    """Every parameter tensor once (``named_parameters()`` order), with its owners, aliases,
    role (if some owner makes it a layer weight) and default dense reason."""
    entries: dict[int, ParameterEntry] = {
        id(p): ParameterEntry(name, p) for name, p in module.named_parameters()
    }
    modules = dict(module.named_modules(remove_duplicate=False))
    aliases: dict[int, list[str]] = {key: [] for key in entries}
    owners: dict[int, list[str]] = {key: [] for key in entries}
    seen: set[str] = set()
    for module_name, owner in module.named_modules(remove_duplicate=False):
        for attr, tensor in owner.named_parameters(recurse=False, remove_duplicate=False):
            entry = entries[id(tensor)]
            full = f"{module_name}.{attr}" if module_name else attr
            if full in seen:
                continue
            seen.add(full)
            if full != entry.name:
                aliases[id(tensor)].append(full)
            owners[id(tensor)].append(f"{full} ({type(owner).__name__})")
            role, reason = _role(owner, module_name, attr, tensor, modules)
            if role is not None and entry.role is None:
                entry.role = role
            if not entry.reason:
                entry.reason = reason
            if isinstance(owner, EMBEDDING_MODULES) and getattr(owner, "sparse", False):
                entry.sparse_gradient = True
    for key, entry in entries.items():
        entry.aliases = tuple(aliases[key])
        # The canonical name first (named_modules may reach an alias before it).
        first = [o for o in owners[key] if o.startswith(entry.name + " (")]
        entry.owners = tuple(first + [o for o in owners[key] if o not in first])
    return list(entries.values())


def _matches(entry: ParameterEntry, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in entry.names for p in patterns)


def _named_exactly(entry: ParameterEntry, include: Sequence[str] | None) -> bool:
    return include is not None and any(n in include for n in entry.names)


def _trained_ids(trained: Iterable[Tensor | torch.optim.Optimizer] | None) -> set[int] | None:
    if trained is None:
        return None
    ids: set[int] = set()
    for item in trained:
        if isinstance(item, torch.optim.Optimizer):
            ids.update(id(p) for group in item.param_groups for p in group["params"])
        elif isinstance(item, Tensor):
            ids.add(id(item))
        else:
            raise TypeError(f"trained must hold optimizers or tensors, got {item!r}")
    return ids


def _candidates(entries: list[ParameterEntry], include: Sequence[str] | None,
                exclude: Sequence[str] | None) -> list[ParameterEntry]:
    """Mark the candidates (default role or ``include``) minus ``exclude``; check patterns."""
    if include is not None:
        for pattern in include:
            if not any(fnmatch.fnmatchcase(n, pattern) for e in entries for n in e.names):
                raise ValueError(f"include pattern {pattern!r} matches no parameter of the model")
    for entry in entries:
        if include is None:
            entry.sparse = entry.role is not None
        else:
            entry.sparse = _matches(entry, include)
            if not entry.sparse and entry.role is not None:
                entry.reason = "not matched by include"
    candidates = [e for e in entries if e.sparse]
    if exclude is not None:
        for pattern in exclude:
            if not any(fnmatch.fnmatchcase(n, pattern) for e in candidates for n in e.names):
                raise ValueError(
                    f"exclude pattern {pattern!r} matches no selected sparse parameter (names "
                    "of tied weights included)"
                )
        for entry in candidates:
            if _matches(entry, exclude):
                entry.sparse, entry.reason = False, EXCLUDED
    if include is not None:
        wildcard_1d = [e.name for e in entries if e.sparse and not _uninitialized(e.tensor)
                       and e.tensor.dim() <= 1 and not _named_exactly(e, include)]
        if wildcard_1d:
            raise ValueError(
                f"include={list(include)} matches the 1-D parameters {wildcard_1d} (biases, "
                "norm scales): a 1-D parameter is sparse only when include names it exactly; "
                "narrow the patterns (e.g. '*conv*.weight'), exclude them, or list them by name"
            )
    for entry in entries:
        if entry.sparse and entry.sparse_gradient and _named_exactly(entry, include):
            raise _sparse_gradient_error(entry)
        if entry.sparse and entry.reason.startswith("weight_norm v"):
            raise ValueError(f"include matches {entry.name!r}, which cannot be masked: "
                             f"{entry.reason}; use weight_norm(dim=None) or spectral_norm")
    return candidates


def _sparse_gradient_error(entry: ParameterEntry) -> ValueError:
    return ValueError(
        f"parameter {entry.name!r} gets sparse gradients (nn.Embedding/EmbeddingBag with "
        "sparse=True): masks need dense gradients; use sparse=False or exclude it"
    )


def check_selection_patterns(
    module: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> None:
    """Fail early when a pattern cannot work, before trainability and shapes are known.

    Checks that every ``include`` pattern matches some parameter name, that every ``exclude``
    pattern matches a name of a sparse candidate, that no wildcard of ``include`` reaches a
    1-D tensor and that ``include`` names no sparse-gradient embedding. Lazy (not yet
    materialized) parameters pass; :func:`plan_selection` checks them once they exist.

    Raises:
        ValueError: a pattern problem as above.
    """
    _candidates(_inventory(module), include, exclude)


def plan_selection(
    module: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    trained: Iterable[Tensor | torch.optim.Optimizer] | None = None,
) -> Selection:
    """Every parameter tensor of ``module``, sparse or dense, with the reason (module doc).

    Args:
        module: the model.
        include: shell-style patterns replacing the default candidates (see module doc).
        exclude: patterns removed from the candidates.
        trained: the optimizers (or the tensors) the training updates; a candidate they do
            not hold stays dense (``"not in the optimizer"``). ``None`` skips this check;
            frozen tensors (``requires_grad=False``) are dense either way.

    Raises:
        ValueError: a pattern matches nothing, ``include`` reaches a 1-D tensor by a wildcard
            or names a frozen or untrained tensor exactly, a selected tensor gets sparse
            gradients or is not materialized (lazy module), or nothing is left to be sparse.
    """
    entries = _inventory(module)
    candidates = _candidates(entries, include, exclude)
    trained_ids = _trained_ids(trained)
    for entry in candidates:
        if not entry.sparse:
            continue
        why = None
        if not entry.tensor.requires_grad:
            why = FROZEN
        elif trained_ids is not None and id(entry.tensor) not in trained_ids:
            why = NOT_IN_OPTIMIZER
        if why is not None:
            if _named_exactly(entry, include):
                raise ValueError(
                    f"include names {entry.name!r}, which is {why}: a weight the training does "
                    "not update cannot be trained sparse; unfreeze it or remove it from include"
                )
            entry.sparse, entry.reason = False, why
    chosen = [e for e in entries if e.sparse]
    if not chosen:
        raise _nothing_selected(candidates, include, exclude)
    for entry in chosen:
        if entry.sparse_gradient:
            raise _sparse_gradient_error(entry)
    lazy = [e.name for e in chosen if _uninitialized(e.tensor)]
    if lazy:
        raise ValueError(
            f"parameters {lazy} are not materialized (lazy modules): run one forward pass "
            "first (DynamicSparsityCallback does it at fit start from the LightningModule's "
            "example_input_array)"
        )
    _finish(entries)
    return Selection(entries)


def selection_from_names(
    module: nn.Module,
    names: Collection[str],
) -> Selection:
    """The selection whose sparse tensors are exactly ``names`` (resuming saved masks).

    Every other tensor is dense with its usual reason, or ``"not in the saved masks"`` when
    the default rule would make it sparse.

    Raises:
        ValueError: a name is not a parameter name (or alias) of ``module``.
    """
    entries = _inventory(module)
    known = {n for e in entries for n in e.names}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"saved masks name parameters the model does not have: {unknown}")
    for entry in entries:
        entry.sparse = any(n in names for n in entry.names)
        if entry.sparse and entry.role is None:
            entry.role = "in the saved masks"
        elif not entry.sparse and entry.role is not None:
            entry.reason = "not in the saved masks"
    _finish(entries)
    return Selection(entries)


def _finish(entries: list[ParameterEntry]) -> None:
    """Sparse entries get their role as reason; tied ones say who shares them."""
    for entry in entries:
        if entry.sparse:
            entry.reason = entry.role or "matched by include"
        if entry.tied:
            tied = "tied: " + " = ".join(entry.owners)
            entry.reason = tied if entry.sparse else f"{entry.reason}; {tied}"


def _nothing_selected(candidates: list[ParameterEntry], include: Sequence[str] | None,
                      exclude: Sequence[str] | None) -> ValueError:
    what = "Linear/Conv/attention weights" if include is None else "tensors matched by include"
    if not candidates:
        return ValueError(
            "the model has no sparse parameter: no Linear/Conv/attention weight was found and "
            "none was named by `include`"
        )
    reasons = sorted({e.reason for e in candidates})
    if reasons == [EXCLUDED]:
        return ValueError(
            f"exclude={list(exclude or [])} removed every sparse candidate ({len(candidates)} "
            f"{what}): nothing is left to train sparse"
        )
    return ValueError(
        f"the model has no sparse parameter: its {len(candidates)} {what} are all "
        + " or ".join(reasons)
        + " (only tensors that require grad and an optimizer holds are trained sparse)"
    )


def select_sparse_parameters(
    module: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    trained: Iterable[Tensor | torch.optim.Optimizer] | None = None,
) -> dict[str, Tensor]:
    """The parameters to train sparse, keyed by their ``named_parameters()`` names.

    By default every trainable linear map: the ``weight`` of each linear and (transposed)
    convolution layer, of transformers' ``Conv1D`` (GPT-2) and MultiheadAttention's
    projections; a tied weight once. Biases,
    normalization layers, embeddings and frozen tensors stay dense (the module docstring of
    :mod:`lightning_ggr.sparse.selection` has the whole rule; :func:`plan_selection` gives
    the reason for each dense tensor). ``include`` replaces the default with the parameters
    one of whose names matches one of its shell-style patterns (``fnmatch``, e.g.
    ``"features.*.weight"``); ``exclude`` then removes matches. ``trained`` (the optimizers,
    or the tensors, the training updates) leaves out every tensor they do not hold.

    Raises:
        ValueError: see :func:`plan_selection`.
    """
    return plan_selection(module, include, exclude, trained=trained).params
