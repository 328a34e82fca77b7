"""The optimizer state that follows each weight, and where a new weight's state starts.

A torch optimizer keeps, per parameter, three kinds of state:

- *per weight*: tensors shaped like the parameter (momentum, Adam's moments, Rprop's step
  sizes, Adagrad's sums), or differing from it only by dimensions of size 1 (the same
  values in the same order: Hugging Face's Adafactor keeps a ``1 x n`` weight's column
  moments as ``(n,)``), read through a view shaped like the parameter. A masked weight's
  entries are kept at 0; a weight grown by a rewiring gets, at its position, the value the
  optimizer gives a fresh parameter (Rprop: ``lr``; Adagrad: ``initial_accumulator_value``;
  0 for the moments of Adam and SGD's momentum);
- *shared*: fewer values than the parameter has weights. One value (Adam's ``step``) is
  shared by every weight of the tensor; factored second moments by the weights of a row or
  a column, whether they broadcast against the parameter (torch's Adafactor: ``m x 1`` and
  ``1 x n``) or drop a dimension (Hugging Face's and timm's Adafactor: ``(m,)`` and
  ``(n,)``). Such state cannot be fresh for one weight and is left as it is.

State of any other shape (as many values as weights but in another order, say flattened,
or more values than weights) can be neither masked nor reset per weight:
:func:`check_optimizer_state` refuses it before training starts, and again when training
starts from a restored state.

Where a fresh parameter starts is found without a list of optimizers: a scratch instance
of the optimizer's class (built from its ``defaults``, then given the parameter's group's
hyper-parameters) steps once a small zero parameter whose gradient is zero, and the *first*
value each state entry is given is recorded, before any update changes it (Adamax's
infinity norm becomes ``eps`` in that step; SGD creates its momentum in it). An entry the
constructor fills (Adagrad's) counts as given there. The result is the optimizer's own
initialisation, read from its code path, whatever the optimizer. It is cached per
optimizer, group hyper-parameters, dtype and device: a learning-rate schedule that changes
``lr`` (where Rprop starts its step sizes) is probed again at the next rewiring.

Everything here works on whole state tensors (one operation per tensor, no loop over
elements) and keeps the start values on the device (no host read), so it runs unchanged on
the local shards of a sharded parameter.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

#: The probe's shape for a parameter of each number of dimensions: sizes that differ from
#: each other and from 1, so a state laid out per row, per column or flattened has another
#: shape than the probe.
_PROBE_SIZES = (2, 3, 4, 5, 6, 7, 8)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer, param: Tensor) -> Iterator[Tensor]:
    """State tensors of ``param`` in ``optimizer`` (and in any optimizer it wraps, see
    :func:`state_holders`) that hold one value per weight (momentum, Adam's moments), each
    shaped like ``param`` (a view where the state's shape differs only by dimensions of size
    1: writes into it reach the state)."""
    for holder in state_holders([optimizer]):
        for _, value in _per_weight_entries(holder.state.get(param, {}), param):
            yield value


def state_holders(optimizers: Iterable[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
    """The optimizers whose ``state`` holds the parameters' state: each of ``optimizers`` and
    every optimizer it wraps, found among its attributes (timm's ``Lookahead`` keeps Adam's
    moments and its own slow weights in the wrapped optimizer's state, its own ``state``
    stays empty; other wrappers share one ``state``). Each state dict comes once, with the
    innermost optimizer that holds it (the one whose class can be rebuilt and probed)."""
    found: dict[int, torch.optim.Optimizer] = {}

    def visit(optimizer: torch.optim.Optimizer, depth: int) -> None:
        found[id(optimizer.state)] = optimizer  # an inner one holding the same dict wins
        if depth < 4:
            for value in vars(optimizer).values():
                if isinstance(value, torch.optim.Optimizer) and value is not optimizer:
                    visit(value, depth + 1)

    for optimizer in optimizers:
        visit(optimizer, 0)
    return list(found.values())


def _per_weight_entries(state: Mapping[str, Any], param: Tensor) -> list[tuple[str, Tensor]]:
    """``(key, tensor shaped like param)`` for each per-weight entry of a parameter's state."""
    entries = []
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        if value.shape == param.shape:
            entries.append((key, value))
        elif value.numel() > 1 and _same_layout(tuple(value.shape), tuple(param.shape)):
            # (one value alone, a single weight's ``step``, stays per tensor)
            entries.append((key, value.view(param.shape)))
    return entries


def _same_layout(shape: tuple[int, ...], param_shape: tuple[int, ...]) -> bool:
    """Whether a state of ``shape`` holds one value per weight of a parameter of
    ``param_shape`` in the parameter's order: the two shapes are equal once their dimensions
    of size 1 are dropped (``(n,)`` for a ``1 x n`` weight)."""
    def squeezed(dims: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(size for size in dims if size != 1)
    return squeezed(shape) == squeezed(param_shape)


def _is_shared(shape: tuple[int, ...], param_shape: tuple[int, ...]) -> bool:
    """Whether a state of ``shape`` is shared by several weights of a parameter of
    ``param_shape``: it has fewer values than the parameter has weights (``step``, factored
    per-row and per-column moments, in whatever layout)."""
    return math.prod(shape) < math.prod(param_shape)


def _hyper_parameters_key(group: Mapping[str, Any]) -> tuple:
    """A hashable snapshot of a group's hyper-parameters, read without the device: a tensor
    hyper-parameter (a capturable ``lr``) by identity and version (an in-place change, as a
    scheduler's ``fill_``, bumps the version)."""
    items = []
    for key in sorted(k for k in group if k != "params"):
        value = group[key]
        if isinstance(value, Tensor):
            value = ("tensor", id(value), value._version)
        else:
            try:
                hash(value)
            except TypeError:
                value = repr(value)
        items.append((key, value))
    return tuple(items)


class _FirstValues(dict):
    """A parameter's state dict that keeps a copy of the first value given to each key."""

    def __init__(self, initial: Mapping[str, Any]) -> None:
        super().__init__(initial)
        self.first: dict[str, Any] = {key: _copy(value) for key, value in initial.items()}

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self.first:
            self.first[key] = _copy(value)
        super().__setitem__(key, value)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


def _copy(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, Tensor) else value


class ProbeFailed(RuntimeError):
    """The optimizer's class could not be probed (see :class:`FreshState`)."""


class FreshState:
    """Where each per-weight state entry of an optimizer starts for a fresh parameter,
    probed once per (optimizer, group hyper-parameters, dtype, device, number of dimensions)
    and cached (see the module docstring).

    :meth:`starts` answers with 0-dim tensors on the state's device (no host read).
    """

    def __init__(self) -> None:
        self._cache: weakref.WeakKeyDictionary[torch.optim.Optimizer, dict[tuple, Any]] = (
            weakref.WeakKeyDictionary())

    def probe(self, optimizer: torch.optim.Optimizer, param: Tensor) -> dict[str, Tensor]:
        """``key -> first value`` of every state entry the optimizer gives a fresh parameter
        like ``param`` (same dtype, device and number of dimensions; the shape is the
        probe's, see ``_PROBE_SIZES``). Raises :class:`ProbeFailed` when the class cannot be
        built from its ``defaults`` or its step fails on the probe."""
        group = _group_of(optimizer, param)
        key = (_hyper_parameters_key(group), param.dtype, str(param.device), param.dim())
        cached = self._cache.setdefault(optimizer, {})
        if key not in cached:
            try:
                cached[key] = _probe(optimizer, group, param)
            except ProbeFailed as error:
                cached[key] = error
        found = cached[key]
        if isinstance(found, ProbeFailed):
            raise found
        return found

    def starts(self, optimizer: torch.optim.Optimizer, param: Tensor
               ) -> list[tuple[Tensor, Tensor | float]]:
        """``(state tensor, start)`` for each per-weight state tensor of ``param`` in
        ``optimizer`` and in every optimizer it wraps (:func:`state_holders`), each probed
        as itself."""
        return [pair for holder in state_holders([optimizer])
                for pair in self._starts(holder, param)]

    def _starts(self, optimizer: torch.optim.Optimizer, param: Tensor
                ) -> list[tuple[Tensor, Tensor | float]]:
        """``(state tensor, start)`` for each per-weight state tensor of ``param``: the
        value a fresh parameter starts at, as a 0-dim tensor of the state's dtype and
        device (0.0 where the optimizer could not be probed: see
        :func:`check_optimizer_state`, which says so before training)."""
        tensors = _per_weight_entries(optimizer.state.get(param, {}), param)
        if not tensors:
            return []
        try:
            first = self.probe(optimizer, param)
        except ProbeFailed:
            first = {}
        pairs: list[tuple[Tensor, Tensor | float]] = []
        for key, value in tensors:
            start = first.get(key)
            if isinstance(start, Tensor) and start.numel() >= 1:
                start = start.reshape(-1)[0]
                if start.device != value.device or start.dtype != value.dtype:
                    start = start.to(value.device, value.dtype)  # the probe's: the same, always
            else:
                start = 0.0
            pairs.append((value, start))
        return pairs


def _group_of(optimizer: torch.optim.Optimizer, param: Tensor) -> Mapping[str, Any]:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError(f"the parameter of shape {tuple(param.shape)} is not held by "
                     f"{type(optimizer).__name__}")


def _probe(optimizer: torch.optim.Optimizer, group: Mapping[str, Any],
           param: Tensor) -> dict[str, Tensor]:
    shape = _PROBE_SIZES[:param.dim()]
    probe = torch.zeros(shape, dtype=param.dtype, device=param.device, requires_grad=True)
    cls = type(optimizer)
    name = cls.__name__
    try:
        scratch = cls([probe], **_constructor_arguments(cls, optimizer.defaults))
    except Exception as error:  # any constructor that does not take its defaults back
        raise ProbeFailed(f"{name}(its defaults) could not be built: {error}") from error
    # What the constructor did not take (AdamW's decoupled_weight_decay) and the group's own
    # values (a per-group lr, a scheduler's current lr).
    scratch.defaults.update(optimizer.defaults)
    scratch.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
    record = _FirstValues(scratch.state.get(probe, {}))
    scratch.state[probe] = record
    probe.grad = torch.zeros_like(probe)
    try:
        scratch.step()
    except Exception as error:
        raise ProbeFailed(f"a step of {name} on a zero parameter failed: {error}") from error
    return {key: value for key, value in record.first.items() if isinstance(value, Tensor)}


def _constructor_arguments(cls: type, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``defaults`` that ``cls``'s constructor takes (all of them when it
    takes ``**kwargs``)."""
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return dict(defaults)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(defaults)
    return {key: value for key, value in defaults.items() if key in parameters}


def check_optimizer_state(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor],
                          fresh: FreshState) -> str | None:
    """Refuse an optimizer whose state cannot follow each weight; probe it once.

    Raises ``ValueError`` naming the parameter, the state entry and its shape when a state
    tensor can neither be masked nor reset per weight (as many values as the parameter has
    weights in another order, or more values), in the optimizer's current state (a resumed
    one) or in the state the optimizer gives a fresh parameter. An optimizer that wraps
    another (:func:`state_holders`) is checked with the one it wraps. Returns a warning to
    give once when none of them could be probed (grown weights then start their per-weight
    state at 0), else ``None``: a wrapper that cannot be rebuilt (``Lookahead``) over one
    that can needs none (its own per-weight state, if any, starts at 0).
    """
    holders = state_holders([optimizer])
    failures = [failure for holder in holders
                if (failure := _check_one(holder, params, fresh)) is not None]
    return failures[0] if len(failures) == len(holders) else None


def _check_one(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor],
               fresh: FreshState) -> str | None:
    name = type(optimizer).__name__
    for param_name, param in params.items():
        try:
            _group_of(optimizer, param)
        except ValueError:
            continue
        present = {key: tuple(value.shape) for key, value in optimizer.state.get(param, {}).items()
                   if isinstance(value, Tensor)}
        try:
            first = fresh.probe(optimizer, param)
        except ProbeFailed as error:
            _refuse_layouts(name, param_name, present, tuple(param.shape), "its state")
            return (f"where {name} starts a fresh parameter could not be found ({error}): "
                    "weights grown by a rewiring start their per-weight optimizer state at 0")
        _refuse_layouts(name, param_name, present, tuple(param.shape), "its state")
        probe_shape = _PROBE_SIZES[:param.dim()]
        _refuse_layouts(name, param_name, {key: tuple(value.shape) for key, value in first.items()},
                        probe_shape, f"the state it gives a fresh {len(probe_shape)}-d parameter")
    return None


def _refuse_layouts(name: str, param_name: str, shapes: Mapping[str, tuple[int, ...]],
                    param_shape: tuple[int, ...], where: str) -> None:
    for key, shape in shapes.items():
        if _same_layout(shape, param_shape) or _is_shared(shape, param_shape):
            continue
        what = ("one value per weight in another layout"
                if math.prod(shape) == math.prod(param_shape)
                else "more values than the parameter has weights")
        raise ValueError(
            f"{name} keeps {key!r} of shape {shape} for a parameter of shape {param_shape} "
            f"({where}; {param_name!r}): {what}, which DynamicSparsity can neither mask nor "
            "reset per weight. Use an optimizer whose per-weight state is shaped like the "
            "parameter (SGD, Adam, AdamW, RMSprop, Adafactor, ...), or keep this parameter "
            "dense (exclude)"
        )


@torch.no_grad()
def reset_optimizer_state_(
    optimizers: Iterable[torch.optim.Optimizer], param: Tensor, positions: Tensor,
    fresh: FreshState | None = None,
) -> None:
    """Give ``param``'s per-weight optimizer state at ``positions`` (bool, shaped like it)
    the values a fresh parameter starts at (0 without ``fresh``): a new weight starts afresh.
    One ``torch.where`` per state tensor; the state of optimizers they wrap too
    (:func:`state_holders`)."""
    for optimizer in optimizers:
        if fresh is None:
            pairs = [(value, 0.0) for value in optimizer_state_tensors(optimizer, param)]
        else:
            pairs = fresh.starts(optimizer, param)
        for value, start in pairs:
            if isinstance(start, Tensor):
                torch.where(positions.to(value.device), start, value, out=value)
            else:
                value.masked_fill_(positions.to(value.device), start)
