"""`SparseEngine`: masks, schedule and rewiring of one model, in plain PyTorch.

A training loop drives it with three calls::

    engine = SparseEngine(select_sparse_parameters(model), sparsity=0.9, method="ggr",
                          schedule=RewiringSchedule("step", 100, stop_step=5000, drop_fraction=0.1))
    for step, batch in enumerate(loader):
        loss(model, batch).backward()
        engine.before_optimizer_step(step, epoch, [optimizer])  # maybe rewire; mask grads
        optimizer.step()
        engine.after_optimizer_step()                            # re-zero masked weights
        optimizer.zero_grad()
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_ggr.sparse.checks import check_bool, check_choice, check_int, check_sparsity
from lightning_ggr.sparse.densities import (
    DISTRIBUTIONS,
    active_counts,
    initial_densities,
    layer_budget,
)
from lightning_ggr.sparse.draws import draw_key, key_dtype, layer_key, random_keys
from lightning_ggr.sparse.masks import (
    MaskPass,
    count_active,
    device_scalar,
    mask_optimizer_state_,
    random_mask,
)
from lightning_ggr.sparse.methods import get_method
from lightning_ggr.sparse.optimizer_state import (
    FreshState,
    check_optimizer_state,
    reset_optimizer_state_,
)
from lightning_ggr.sparse.rewiring import (
    DSR_REFERENCE_THRESHOLD,
    RewiringReport,
)
from lightning_ggr.sparse.schedules import RewiringSchedule
from lightning_ggr.sparse.sharded import (
    all_sum,
    differing_replicas,
    is_sharded,
    layout_of,
    like_param,
    local_tensor,
    owned,
    select_across_shards,
)

#: Why a due rewiring is postponed (``RewiringReport.skip_reason``).
SKIP_NONFINITE = "non-finite sparse gradients"
SKIP_NO_GRADIENTS = "no sparse gradients (the method grows by gradient)"
SKIP_OPTIMIZER_NONFINITE = ("non-finite gradients of other parameters of the optimizer "
                            "(under a grad scaler its step is skipped)")
#: The same reasons under the names the fit-end account uses.
NONFINITE_GRADIENTS = SKIP_NONFINITE
MISSING_GRADIENTS = SKIP_NO_GRADIENTS


def _version(param: Tensor) -> tuple[int, int]:
    """The version counters an in-place write into ``param`` moves: its own, and its local
    shard's for a DTensor (an in-place operation on the DTensor moves only the first, one on
    ``to_local()`` only the second)."""
    return param._version, local_tensor(param)._version


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class SparseEngine:
    """Dynamic sparse training state of a set of parameters: masks, rewiring, bookkeeping.

    The masks are drawn at construction, on the parameters' device: layer ``l`` gets exactly
    ``active_counts`` weights at uniformly random positions (from a generator seeded with
    ``seed``, so every process draws the same masks; on accelerators of different models
    the draws could differ, which ``broadcast_topology`` corrects), and the parameters are
    masked in place.

    Per step the engine zeroes masked gradients with one multi-tensor operation per (device,
    dtype) group over 0/1 integer copies of the masks (:class:`~lightning_ggr.sparse.masks.
    MaskPass`): exact over NaN/inf, no allocation, no host synchronisation, at
    ``element_size`` bytes per sparse weight (4 for float32) besides the 1-byte masks. The
    active counts are kept on the host, so reading them never waits for the device; change
    the masks only through the engine (:meth:`load_state_dict`).

    Sharded parameters (DTensors of FSDP2's ``fully_shard``, split along dim 0 over one
    device mesh) are detected (:attr:`layout`): each mask is then a bool DTensor placed like
    its parameter, the per-step pass works on the local shards (no collective), and every
    rewiring selects across the processes with a few collectives on small tensors
    (:mod:`lightning_ggr.sparse.sharded`); every process must make the same calls. The
    masks are the same as one process would draw for the same seed, and a rewiring gives
    the single-process result wherever the scores do not tie at a cut.

    Args:
        params: name -> parameter to train sparse (see ``select_sparse_parameters``).
        sparsity: fraction of zeros over all sparse parameters, in ``[0, 1)``.
        distribution: initial layer densities, ``"erk"`` or ``"uniform"``.
        method: ``"set"``, ``"rigl"``, ``"dsr"``, ``"ggr"``, ``"set_rigl"``, ``"ggr_set"`` or
            ``"ggr_rigl"``.
        schedule: when to rewire; ``None`` until set (then ``before_optimizer_step`` only masks).
        gradient_ratio: share of gradient-based insertion in mixed insertion, ``[0, 1]``.
        init_value: value of a newly grown weight (the paper: ``1e-10``).
        seed: seed of the engine's own generator (masks and random growth).
        dsr_tolerance: DSR's tolerance around the target removal count.
        masks: adopt these masks instead of drawing new ones (resuming a run).
        update_grown_weights: let the optimizer step of the rewiring step update the newly
            grown weights (``-lr * g``). ``False`` (default, RigL's reference applies no
            gradient on mask-update steps): their gradient is zeroed in the rewiring step, so
            they start the next step at ``init_value`` (weight decay aside: the step still
            applies it, e.g. SGD leaves ``init_value * (1 - lr * weight_decay)``).
        reinit_regrown: restart a weight dropped and regrown in the same rewiring at
            ``init_value`` with fresh optimizer state. ``False`` (default, RigL's reference
            ``reinit_when_same=False``): it keeps its value and state, as if never dropped.
        dsr_initial_threshold: DSR's first threshold ``H`` (default 1e-3, DSR's reference);
            ``None`` starts it at the ``K``-th smallest active magnitude.
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        *,
        sparsity: float,
        distribution: str = "erk",
        method: str = "ggr",
        schedule: RewiringSchedule | None = None,
        gradient_ratio: float = 0.5,
        init_value: float = 1e-10,
        seed: int = 0,
        dsr_tolerance: float = 0.1,
        masks: Mapping[str, Tensor] | None = None,
        update_grown_weights: bool = False,
        reinit_regrown: bool = False,
        dsr_initial_threshold: float | None = DSR_REFERENCE_THRESHOLD,
    ) -> None:
        if schedule is not None and not isinstance(schedule, RewiringSchedule):
            raise TypeError(f"schedule must be a RewiringSchedule or None, got {schedule!r}")
        self.method_name = method
        self.method = get_method(method)
        self.sparsity = check_sparsity(sparsity)
        self.distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
        #: removal -> allocation -> insertion; owns DSR's threshold.
        self.rewiring = self.method.build(gradient_ratio=gradient_ratio, init_value=init_value,
                                          dsr_tolerance=dsr_tolerance,
                                          reinit_regrown=reinit_regrown,
                                          dsr_initial_threshold=dsr_initial_threshold)
        self.gradient_ratio = float(gradient_ratio)
        self.init_value = self.rewiring.init_value
        self.dsr_tolerance = float(dsr_tolerance)
        self.update_grown_weights = check_bool("update_grown_weights", update_grown_weights)
        self.reinit_regrown = self.rewiring.reinit_regrown
        self.dsr_initial_threshold = getattr(self.rewiring.removal, "initial_threshold",
                                             dsr_initial_threshold)
        self.schedule = schedule
        self.params: dict[str, Tensor] = dict(params)
        if not self.params:
            raise ValueError("params is empty: there is no sparse parameter")
        shapes = {name: tuple(p.shape) for name, p in self.params.items()}
        self.initial_density = initial_densities(shapes, self.sparsity, distribution)
        self.initial_counts = active_counts(shapes, self.initial_density,
                                            total=layer_budget(shapes, self.sparsity))
        self.generator = torch.Generator().manual_seed(check_int("seed", seed, 0, 2**64, "2**64"))
        #: Where each sparse parameter's shard lies when they are DTensors (FSDP2), else
        #: ``None``: see :mod:`lightning_ggr.sparse.sharded`.
        self.layout = layout_of(self.params)
        if masks is None:
            # On each parameter's device, from one key of the engine's generator mixed with
            # each layer's name: the same masks on every device and every split of a layer.
            self.masks: dict[str, Tensor] = self._draw_masks(draw_key(self.generator))
            self._active = dict(self.initial_counts)
        else:
            self.masks = {n: like_param(torch.ones_like(local_tensor(p), dtype=torch.bool,
                                                        memory_format=torch.contiguous_format),
                                        p)
                          for n, p in self.params.items()}
            self._adopt_masks(masks)
        #: Optimizer step and epoch of the last rewiring (``None`` before the first one): the
        #: schedule position, in units that survive a change of ``interval``/``update_interval``.
        self.last_rewiring_step: int | None = None
        self.last_rewiring_epoch: int | None = None
        #: The step a due rewiring was postponed from (unusable gradients), until it runs.
        self.pending_step: int | None = None
        self._saved_slot = 0  # a checkpoint's slot, for states saved without the epoch
        self.rewirings = 0
        self._warned_no_optimizer = False
        self._warned_no_signal = False
        #: Whether a sharded rewiring found (and warned) that replicated layers differ.
        self._warned_replicas_differ = False
        #: Whether the first step with optimizers checked the engine was built after sharding.
        self._checked_sharding_order = False
        self.skipped_rewirings = 0
        #: Postponements by reason (``SKIP_*``): checkpointed with ``skipped_rewirings``.
        self.skip_reasons: dict[str, int] = {}
        #: Masked weights found non-zero (written by something else) and zeroed again, per
        #: layer, over the run: checkpointed.
        self.stray_weights_zeroed: dict[str, int] = {}
        #: Masked weights found non-zero right before optimizer steps
        #: (:meth:`collect_stray_weights`) and not read yet: name -> int64 device count.
        self._collected: dict[str, Tensor] = {}
        #: Each sparse parameter's version counter after the last zeroing pass: an in-place
        #: write through the parameter since then moves it.
        self._versions: list[tuple[int, int]] | None = None
        #: Where each optimizer starts a fresh parameter's per-weight state (probed, cached).
        self.fresh_state = FreshState()
        self._refresh_lists()
        self.broadcast_topology()
        self.apply_masks()

    def _draw_masks(self, key: int) -> dict[str, Tensor]:
        """Each layer's initial mask: the positions of largest random key for the layer's
        key in the draw ``key`` (:mod:`lightning_ggr.sparse.draws`). A sharded layer's
        mask is a bool DTensor placed like its parameter, each process selecting its rows
        with the others (:func:`~lightning_ggr.sparse.sharded.select_across_shards`: a few
        small collectives, no layer gathered)."""
        layout = self.layout
        masks: dict[str, Tensor] = {}
        sharded: dict[torch.dtype, list[str]] = {}
        for name, param in self.params.items():
            if layout is None or not layout.layers[name].sharded:
                masks[name] = random_mask(param.shape, self.initial_counts[name],
                                          device=param.device, key=layer_key(key, name))
            else:
                sharded.setdefault(key_dtype(param.numel()), []).append(name)
        for dtype, names in sharded.items():
            locals_ = [local_tensor(self.params[name]) for name in names]
            shards = [layout.layers[name] for name in names]
            found = select_across_shards(
                [shard.local for shard in shards], range(len(names)),
                [self.initial_counts[name] for name in names],
                lambda i, out, names=names, shards=shards: random_keys(
                    layer_key(key, names[i]), shards[i].start, shards[i].local,
                    shards[i].numel, out.device, out=out),
                dtype=dtype, largest=True, device=locals_[0].device, layout=layout).indices
            for name, local, index in zip(names, locals_, found, strict=True):
                mask = torch.zeros(local.shape, dtype=torch.bool, device=local.device)
                mask.view(-1).index_fill_(0, index, True)
                masks[name] = like_param(mask, self.params[name])
        return {name: masks[name] for name in self.params}

    # ------------------------------------------------------------------ bookkeeping
    def _refresh_lists(self) -> None:
        """After the masks changed: the per-step pass's integer masks follow them."""
        self._param_list = list(self.params.values())
        self._mask_list = [self.masks[name] for name in self.params]
        # The dense baseline (sparsity 0) masks nothing: skip its per-step passes (and the
        # integer masks' memory).
        self._anything_masked = any(self._active[name] < mask.numel()
                                    for name, mask in self.masks.items())
        if not self._anything_masked:
            self._pass = None
        elif getattr(self, "_pass", None) is None:
            self._pass = MaskPass(self._param_list, self._mask_list)
        else:
            self._pass.refresh()

    def _recount(self) -> None:
        """Read the active counts back from the masks (one transfer per device; summed over
        the shards of sharded layers): only when the masks came from outside (a checkpoint,
        a broadcast)."""
        counts = dict(zip(self.masks, count_active(local_tensor(m) for m in self.masks.values()),
                          strict=True))
        if self.layout is not None:
            sharded = [n for n in counts if self.layout.layers[n].sharded]
            counts.update(zip(sharded, all_sum([counts[n] for n in sharded], self.layout),
                              strict=True))
        self._active = counts

    @property
    def total_active(self) -> int:
        return sum(self._active.values())

    def active_counts(self) -> dict[str, int]:
        """name -> number of active weights (kept on the host: no device read)."""
        return dict(self._active)

    def layer_densities(self) -> dict[str, float]:
        """name -> fraction of active weights."""
        return {name: self._active[name] / mask.numel() for name, mask in self.masks.items()}

    def global_density(self) -> float:
        return self.total_active / sum(mask.numel() for mask in self._mask_list)

    # ---------------------------------------------------------------- per-step work
    def apply_masks(self) -> None:
        """Zero every masked weight (one operation per group, no allocation)."""
        if self._pass is not None:
            self._pass.apply_(enumerate(p.data for p in self._param_list))

    def apply_mask(self, name: str) -> None:
        """Zero the masked weights of one layer (through ``.data``, like :meth:`apply_masks`:
        no version counter moves)."""
        self.params[name].data.mul_(self.masks[name])

    def weight_version(self, name: str) -> tuple[int, int]:
        """The version counters an in-place write into layer ``name`` moves (its own, and
        its local shard's for a DTensor): compare two readings to know, without reading the
        device, whether something wrote into it in between."""
        return _version(self.params[name])

    def mask_gradients(self) -> None:
        """Zero every masked gradient: no update reaches a masked weight. One
        ``torch._foreach_mul_`` per (device, dtype) group, whatever the number of layers; no
        allocation, no host synchronisation; exact over NaN/inf."""
        if self._pass is not None:
            self._pass.gradients_()

    def _stray_count(self, name: str) -> Tensor:
        """How many masked weights of ``name`` are not 0 (something wrote into them), as a
        0-dim device tensor: nothing read. Sharded: this process's part (its rows; a
        replicated layer on rank 0), which :meth:`_agreed` sums."""
        weight, mask = self.params[name].detach(), self.masks[name]
        if self.layout is not None:
            shard = self.layout.layers[name]
            weight, mask = owned(weight, shard), owned(mask, shard)
        zero = device_scalar(0.0, weight.dtype, weight.device)
        return torch.count_nonzero(torch.where(mask, zero, weight))

    def _gradient_checks(self, optimizers: Iterable[torch.optim.Optimizer] = (),
                         strays: bool = False) -> list[tuple[list[str], Tensor]]:
        """Per device, ``[the sparse gradients there are finite, the optimizers' other
        gradients there are finite, a sparse gradient has a nonzero entry]`` as an int64
        tensor, followed (``strays``) by the number of non-zero masked weights of each sparse
        layer there, whose names come with it: an infinity norm per gradient (one
        multi-tensor operation over all of them; NaN propagates through it), nothing read.
        Sharded gradients are checked on this process's shards."""
        optimizers = list(optimizers)
        frozen = set(self.frozen(optimizers))
        by_device: dict[torch.device, tuple[list[Tensor], list[Tensor], list[str]]] = {}
        for name, param in self.params.items():
            lists = by_device.setdefault(local_tensor(param).device, ([], [], []))
            if strays:
                lists[2].append(name)
            if param.grad is not None and name not in frozen:
                grad = local_tensor(param.grad)
                if grad.numel():  # a process may hold no row of a short sharded layer
                    lists[0].append(grad)
        # A frozen sparse layer's stale gradient (taken out of the optimizer) counts nowhere.
        seen = {id(param) for param in self._param_list}
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    grad = param.grad
                    if id(param) in seen or grad is None or grad.is_sparse:
                        continue
                    seen.add(id(param))
                    grad = local_tensor(grad)
                    if grad.numel():
                        by_device.setdefault(grad.device, ([], [], []))[1].append(grad)
        checks = []
        for device, (ours, others, names) in by_device.items():
            if ours or others:
                norms = torch.stack(torch._foreach_norm(ours + others, math.inf))
                finite = torch.isfinite(norms)
                flags = [finite[:len(ours)].all(), finite[len(ours):].all(),
                         (norms[:len(ours)] > 0).any()]
            else:
                flags = [torch.ones((), dtype=torch.bool, device=device)] * 2 + [
                    torch.zeros((), dtype=torch.bool, device=device)]
            values = [flag.to(torch.int64) for flag in flags]
            check = torch.stack(values)
            if names:
                check = torch.cat([check, self._stray_vector(device, names)])
            checks.append((names, check))
        return checks

    def _agreed(self, checks: list[tuple[list[str], Tensor]], present: bool = True
                ) -> tuple[str | None, bool, dict[str, int]]:
        """Why this step's gradients cannot drive a rewiring (``None``: they can), whether
        some sparse gradient is nonzero, and the non-zero masked weights of each layer that
        has any; read back once (per device) and, under ``torch.distributed``, agreed over
        all processes by one all-reduce (gradients present, and finite, everywhere; signal
        somewhere; the most strays of any process)."""
        names = list(self.params)
        if _distributed():
            device = self._distributed_device()
            # MIN over [present, sparse finite, others finite, 1 - signal, -strays...].
            flags = torch.zeros(4 + len(names), dtype=torch.int64, device=device)
            flags[:3].fill_(1)
            flags[0].fill_(int(present))
            # Sharded layers' strays are counted shard by shard: summed, in a second
            # all-reduce (only when strays are counted: the same on every process).
            summed = self.layout is not None and any(layers for layers, _ in checks)
            counts = torch.zeros(len(names), dtype=torch.int64, device=device)
            for layers, check in checks:
                check = check.to(device)
                flags[1:3].bitwise_and_(check[:2])
                flags[3].bitwise_or_(check[2])
                for position, name in enumerate(layers):
                    target = counts[names.index(name)] if summed else flags[4 + names.index(name)]
                    target.sub_(check[3 + position])
            flags[3].neg_().add_(1)  # 1 - signal
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
            if summed:
                torch.distributed.all_reduce(counts, group=self.layout.group)
                flags[4:] = counts
            values = flags.tolist()
            present, finite, others = (bool(v) for v in values[:3])
            signal = not values[3]
            stray = {name: -count for name, count in zip(names, values[4:], strict=True)
                     if count}
        else:
            read = [(layers, check.tolist()) for layers, check in checks]
            finite = all(value[0] for _, value in read)
            others = all(value[1] for _, value in read)
            signal = any(value[2] for _, value in read)
            stray = {name: count for layers, value in read
                     for name, count in zip(layers, value[3:], strict=True) if count}
        if not present:
            reason = SKIP_NO_GRADIENTS
        elif not finite:
            reason = SKIP_NONFINITE
        elif not others:
            reason = SKIP_OPTIMIZER_NONFINITE
        else:
            reason = None
        return reason, signal, stray

    def gradients_finite(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> bool:
        """Whether every sparse parameter's gradient is finite, and every other gradient of
        ``optimizers`` too, agreed over all processes (one read of the device)."""
        return self._agreed(self._gradient_checks(optimizers))[0] is None

    def _due_step_checks(self, optimizers: list[torch.optim.Optimizer]
                         ) -> tuple[str | None, dict[str, int]]:
        """:meth:`gradients_usable`'s reason, and the layers whose masked weights something
        wrote into (counts), in the same read; warns once when a method that grows by
        gradient is about to rewire with sparse gradients that are zero everywhere."""
        needs = self.rewiring.needs_gradients
        present = self._gradients_present(optimizers)
        reason, signal, stray = self._agreed(self._gradient_checks(optimizers, strays=True),
                                             present or not needs)
        taking_part = len(self.frozen(optimizers)) < len(self.params)
        if (reason is None and needs and taking_part and not signal
                and not self._warned_no_signal):
            self._warned_no_signal = True
            warnings.warn(
                "every sparse gradient is zero at this rewiring: growth by gradient has no "
                "signal and puts new weights at arbitrary free positions. Either no backward "
                "ran since the gradients were zeroed (zero_grad(set_to_none=False) without a "
                "backward, a skipped step) or the network is dead (no signal reaches its "
                "sparse layers)", UserWarning, stacklevel=3)
        return reason, stray

    def gradients_usable(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> bool:
        """Whether this step's gradients can drive a rewiring, agreed over all processes.

        Every sparse gradient present must be finite, and a method that grows by gradient
        (RigL, GGR) needs at least one: a step without any (``training_step`` returned
        ``None``) would score every position 0 and grow arbitrarily. Every other gradient of
        ``optimizers`` (a dense bias's) must be finite too: a grad scaler skips such a step
        (``precision="16-mixed"``), and without one the step writes non-finite values.
        Gradients that are all zero (no backward since ``zero_grad(set_to_none=False)``, or a
        dead network) cannot be told apart from a real step: they are usable, with a warning
        at the rewiring. One read of the device (not one per layer) and one all-reduce, only
        on a step where a rewiring is due.
        """
        optimizers = list(optimizers)
        needs = self.rewiring.needs_gradients
        present = self._gradients_present(optimizers)
        return self._agreed(self._gradient_checks(optimizers), present or not needs)[0] is None

    def _gradients_present(self, optimizers: list[torch.optim.Optimizer]) -> bool:
        """Whether a sparse layer that takes part has a gradient (every layer frozen: there
        is nothing to grow, and the rewiring passes its slot moving nothing)."""
        frozen = set(self.frozen(optimizers))
        trained = [p for name, p in self.params.items() if name not in frozen]
        return not trained or any(param.grad is not None for param in trained)

    @property
    def last_slot(self) -> int:
        """Slot of the last rewiring under the current schedule (0: none yet).

        Derived from the step and epoch of the last rewiring, so a run resumed with another
        ``interval`` or ``update_interval`` continues from where it was.
        """
        schedule, step, epoch = self.schedule, self.last_rewiring_step, self.last_rewiring_epoch
        if schedule is None or step is None or (schedule.interval == "epoch" and epoch is None):
            return self._saved_slot
        return schedule.slot(step, 0 if epoch is None else epoch)

    def rewiring_due(self, step: int, epoch: int) -> bool:
        """Whether ``before_optimizer_step(step, epoch)`` would try to rewire: a postponed
        rewiring is pending, or the schedule says so."""
        if self.schedule is None:
            return False
        return self.pending_step is not None or self.schedule.is_due(step, epoch, self.last_slot)

    def before_optimizer_step(
        self, step: int, epoch: int, optimizers: Iterable[torch.optim.Optimizer] = ()
    ) -> RewiringReport | None:
        """Rewire if the schedule says so (on this step's dense gradient), then mask gradients.

        A due rewiring whose gradients are unusable (see :meth:`gradients_usable`: a sparse
        gradient non-finite, or none for a method that grows by gradient, or a non-finite
        gradient of another parameter of ``optimizers``) is postponed: ``pending_step``
        keeps the step it was due at, and the next step with usable gradients runs it, with
        that step's drop fraction, even at or after ``stop_step`` (the stop bounds when
        rewirings are scheduled, not when a postponed one completes).

        Returns the rewiring's report, a report with ``skipped=True`` and its
        ``skip_reason`` when a due rewiring was postponed, or ``None`` when none was due.
        """
        optimizers = list(optimizers)
        if not self._checked_sharding_order:
            self._check_not_built_before_sharding(optimizers)
        report = None
        if self.rewiring_due(step, epoch):
            due_step = step if self.pending_step is None else self.pending_step
            drop_fraction = self.schedule.drop_fraction_at(due_step)
            reason, stray = self._due_step_checks(optimizers)
            if stray:  # written into by something else: zeroed before the rewiring reads them
                self._count_strays(stray)
                self.enforce_masks(optimizers)
            if reason is not None:
                self.skipped_rewirings += 1
                self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1
                self.pending_step = int(due_step)
                report = RewiringReport(drop_fraction, {}, {}, {}, skipped=True,
                                        skip_reason=reason)
            else:
                report = self.rewire(drop_fraction, optimizers)
                self.last_rewiring_step, self.last_rewiring_epoch = int(step), int(epoch)
                self.pending_step = None
            report.stray_weights = stray
        self.mask_gradients()
        return report

    def _check_not_built_before_sharding(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Refuse an engine built before ``fully_shard``: sharding replaces the module's
        parameters with new DTensor ones, so the engine would mask and rewire the old
        tensors, which nothing trains, while the model trained dense, silently. Recognised
        at the first step with optimizers: they hold DTensors and none of the engine's
        (plain) parameters."""
        if not optimizers:
            return
        self._checked_sharding_order = True
        if self.layout is not None:
            return
        held = [p for optimizer in optimizers for group in optimizer.param_groups
                for p in group["params"]]
        ours = {id(p) for p in self.params.values()}
        if any(is_sharded(p) for p in held) and not any(id(p) in ours for p in held):
            raise ValueError(
                "the optimizers hold sharded (DTensor) parameters and none of the engine's: "
                "the engine was built before fully_shard, which replaces the module's "
                "parameters, so it would mask tensors nothing trains while the model trains "
                "dense. Build the SparseEngine (select_sparse_parameters) after fully_shard")

    def zero_stray_weights(self, optimizers: Iterable[torch.optim.Optimizer] = ()
                           ) -> dict[str, int]:
        """Find the masked weights something else wrote into (weight noise, a
        re-initialisation, an EMA copy written back), and zero them again with the
        optimizers' state there.

        Returns name -> how many were not 0, for the layers that had any (counted in
        :attr:`stray_weights_zeroed`). One read of the device (per device); a due rewiring
        does the same within its gradient check, at no extra read.
        """
        found: dict[str, int] = {}
        for layers, values in self._stray_tensors():
            found.update(zip(layers, (int(v) for v in values.tolist()), strict=True))
        if self.layout is not None:  # counted shard by shard (every process calls this)
            found = dict(zip(found, all_sum(list(found.values()), self.layout), strict=True))
        counts = {name: count for name, count in found.items() if count}
        if counts:
            self._count_strays(counts)
            self.enforce_masks(optimizers)
        return counts

    def _stray_tensors(self) -> list[tuple[list[str], Tensor]]:
        return [(names, self._stray_vector(device, names))
                for device, names in self._names_by_device().items()]

    def _names_by_device(self) -> dict[torch.device, list[str]]:
        by_device: dict[torch.device, list[str]] = {}
        for name, param in self.params.items():
            by_device.setdefault(local_tensor(param).device, []).append(name)
        return by_device

    def _stray_vector(self, device: torch.device, names: list[str]) -> Tensor:
        """The non-zero masked weights of the layers ``names`` (all of ``device``'s) now,
        plus those :meth:`collect_stray_weights` found before earlier steps (taken: counted
        once), as an int64 device tensor: nothing read."""
        return torch.stack([self._stray_count(name) + self._collected.pop(name)
                            if name in self._collected else self._stray_count(name)
                            for name in names])

    def collect_stray_weights(self) -> None:
        """Count, on the device, the masked weights something else wrote into since the last
        zeroing pass, and zero them; nothing is read (the counts join the next rewiring's or
        :meth:`zero_stray_weights`' report).

        For loops that zero masked weights after every step (:meth:`after_optimizer_step`,
        needed by optimizers outside ``ZERO_PRESERVING_OPTIMIZERS``): call it right before
        the step, or such writes (weight noise, a re-initialisation) are zeroed after the
        step unseen, though they took part in its forward pass. Only layers written in place
        since that pass are looked at (their version counter moved: ``torch.no_grad()``
        writes, ``copy_``, ``nn.init``, ``load_state_dict``), so a step nothing else wrote
        in costs one comparison per layer. A write through ``.data`` moves no counter: it
        is zeroed after the step unseen, as before (the checks at rewirings and epoch ends
        find only what is still there).
        """
        if self._pass is None:
            return
        versions = [_version(param) for param in self._param_list]
        if self._versions is None:
            changed = list(self.params)
        else:
            changed = [name for name, now, then
                       in zip(self.params, versions, self._versions, strict=True) if now != then]
        for name in changed:
            count = self._stray_count(name)
            self._collected[name] = (count if name not in self._collected
                                     else self._collected[name] + count)
        if changed:
            self.apply_masks()  # through .data: no counter moves
        self._versions = versions

    def _count_strays(self, counts: Mapping[str, int]) -> None:
        for name, count in counts.items():
            self.stray_weights_zeroed[name] = self.stray_weights_zeroed.get(name, 0) + count

    def check_optimizers(self, optimizers: Iterable[torch.optim.Optimizer]) -> list[str]:
        """Check, before training, that each optimizer's state can follow each weight.

        Raises ``ValueError`` for per-weight state laid out otherwise than the parameter
        (see :func:`~lightning_ggr.sparse.optimizer_state.check_optimizer_state`); returns
        the warnings to give (an optimizer whose fresh state could not be probed: grown
        weights then start its per-weight state at 0). Probes each optimizer once, which
        the rewirings then reuse.
        """
        found = []
        for optimizer in optimizers:
            warning = check_optimizer_state(optimizer, self.params, self.fresh_state)
            if warning is not None:
                found.append(warning)
        return found

    def enforce_masks(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Zero masked weights and the optimizers' state there, whatever happened before.

        Call it once when an optimizer's state was loaded from elsewhere (a checkpoint of a
        dense run, an optimizer reused across fits): per-step work relies on that state
        being zero at masked positions.
        """
        if self._pass is None:
            return
        self.apply_masks()
        mask_optimizer_state_(optimizers, self._param_list, self._mask_list, self._pass)

    def after_optimizer_step(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Re-zero masked weights (and the optimizers' state there) after a step.

        Needed only for optimizers outside ``ZERO_PRESERVING_OPTIMIZERS``: for SGD, Adam and
        the like a zero gradient and zero state already leave a masked weight at 0.
        """
        self.enforce_masks(optimizers)
        # The optimizer's own writes are behind us: what moves a version counter from here
        # to the next step is someone else's (see collect_stray_weights).
        self._versions = [_version(param) for param in self._param_list]

    # -------------------------------------------------------------------- rewiring
    def rewire(
        self, drop_fraction: float, optimizers: Iterable[torch.optim.Optimizer] = ()
    ) -> RewiringReport:
        """One rewiring now, with the gradients currently in ``.grad``.

        Masks and weights change in place; the optimizers' per-weight state is zeroed at
        every masked position and set, at every new one, to where that optimizer starts a
        fresh parameter (Rprop's step size ``lr``, Adagrad's ``initial_accumulator_value``,
        0 for momentum and Adam's moments; per-tensor state such as Adam's ``step`` stays
        shared; see :mod:`~lightning_ggr.sparse.optimizer_state`). A weight dropped and
        regrown keeps its value and state unless ``reinit_regrown``. Unless
        ``update_grown_weights``, the gradient of every new weight is zeroed too, so the
        optimizer step that follows leaves it at ``init_value``. Under ``torch.distributed``
        the new topology is broadcast from rank 0. Host reads: one for GGR's allocation or
        DSR's removal counts, none for SET and RigL (and one more for a data-driven DSR
        start).
        """
        optimizers = list(optimizers)
        if not optimizers and not self._warned_no_optimizer:
            self._warned_no_optimizer = True
            warnings.warn(
                "SparseEngine.rewire ran without optimizers: their state (momentum, Adam's "
                "moments) at dropped positions is not zeroed, so it can move masked weights "
                "off 0 at the next step. Pass them: engine.before_optimizer_step(step, epoch, "
                "[optimizer])", UserWarning, stacklevel=3)
        layout = self.layout

        def own(name: str, tensor: Tensor) -> Tensor:  # the part this process decides
            return tensor if layout is None else owned(tensor, layout.layers[name])

        # A layer frozen (or taken out of the optimizer) mid-fit keeps its mask and weights
        # and takes no part: neither removal nor allocation (GGR's global budget) sees it.
        frozen = set(self.frozen(optimizers))
        names = [name for name in self.params if name not in frozen]
        gradients = None
        if self.rewiring.needs_gradients:
            # A layer unused in this step (aux head, conditional branch) has no gradient:
            # it scores 0 everywhere, so it gets weights only where nothing scores higher.
            gradients = {name: None if self.params[name].grad is None
                         else own(name, self.params[name].grad) for name in names}
        # Tensors that follow each weight: zero at dropped positions; at new ones, the
        # optimizer's per-weight state starts where it starts a fresh parameter.
        states = {}
        for name in names:
            param = self.params[name]
            follow: list[tuple[Tensor, Tensor | float]] = [
                pair for optimizer in optimizers
                for pair in self.fresh_state.starts(optimizer, param)]
            if not self.update_grown_weights and param.grad is not None:
                follow.append((param.grad, 0.0))
            states[name] = [(own(name, value), start) for value, start in follow]
        if layout is not None and not self._warned_replicas_differ:
            self._warn_if_replicas_differ()
        if names:
            report = self.rewiring(
                {name: own(name, self.params[name].detach()) for name in names},
                {name: own(name, self.masks[name]) for name in names},
                gradients,
                drop_fraction,
                generator=self.generator,
                active={name: self._active[name] for name in names},
                states=states,
                layout=layout,
            )
        else:  # everything frozen: the slot passes, nothing moves
            report = RewiringReport(drop_fraction, {}, {}, {},
                                    threshold=getattr(self.rewiring.removal, "threshold", None))
        report.removed = {name: report.removed.get(name, 0) for name in self.params}
        report.grown = {name: report.grown.get(name, 0) for name in self.params}
        report.active = {name: report.active.get(name, self._active[name])
                         for name in self.params}
        report.frozen = tuple(name for name in self.params if name in frozen)
        self._active = dict(report.active)
        if layout is not None:
            # Replicated layers of a partly sharded model: rank 0 decided, the others follow.
            self._broadcast_replicated(optimizers)
            self._refresh_lists()
        elif _distributed():
            local = {name: mask.clone() for name, mask in self.masks.items()}
            self.broadcast_topology()
            # Had this rank grown differently, rank 0's new positions start afresh here too.
            for name, mask in self.masks.items():
                reset_optimizer_state_(optimizers, self.params[name], mask & ~local[name],
                                       self.fresh_state)
        else:
            self._refresh_lists()
        # Every masked position's state is zero already (the rewiring zeroed the dropped
        # ones); one multi-tensor pass keeps that true whatever the optimizer did before.
        mask_optimizer_state_(optimizers, self._param_list, self._mask_list, self._pass)
        self.rewirings += 1
        return report

    def frozen(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> list[str]:
        """Sparse parameters no rewiring touches now: frozen (``requires_grad=False``) or,
        when ``optimizers`` are given, held by none of them (progressive freezing,
        ``BaseFinetuning``). Their masks and weights stay as they are and they take no part in
        removal or allocation (GGR's global budget) until they are trained again."""
        optimizers = list(optimizers)
        held = None
        if optimizers:
            held = {id(p) for optimizer in optimizers for group in optimizer.param_groups
                    for p in group["params"]}
        return [name for name, param in self.params.items()
                if not param.requires_grad or (held is not None and id(param) not in held)]

    def _distributed_device(self) -> torch.device:
        backend = torch.distributed.get_backend()
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def broadcast_topology(self, src: int = 0) -> None:
        """Make masks and sparse weights identical on every process (no-op when not distributed).

        Each process draws the same masks from the same seeded generator; broadcasting
        guarantees it even if a process consumed randomness differently. Sharded layers are
        left alone (each process holds its own rows); only replicated ones are broadcast.
        """
        if not _distributed():
            return
        names = [name for name in self.masks
                 if self.layout is None or not self.layout.layers[name].sharded]
        self._broadcast(names, src)
        self._recount()
        self._refresh_lists()

    def _broadcast(self, names: Iterable[str], src: int = 0) -> None:
        """Rank ``src``'s masks and weights of the layers ``names`` on every process."""
        group = None if self.layout is None else self.layout.group
        if group is not None:
            src = torch.distributed.get_global_rank(group, src)
        device = self._distributed_device()
        for name in names:
            mask = self.masks[name]
            buffer = mask.to(device)
            torch.distributed.broadcast(buffer, src=src, group=group)
            mask.copy_(buffer.to(mask.device))
            param = self.params[name].data
            values = param.to(device)
            torch.distributed.broadcast(values, src=src, group=group)
            param.copy_(values.to(param.device))

    def _warn_if_replicas_differ(self) -> None:
        """At a sharded rewiring, until one found it: warn when the replicated layers (plain
        tensors of a partly sharded model) hold different weights on different processes.
        FSDP2 reduces the gradients of the parameters ``fully_shard`` manages only: nothing
        synchronises those of a plain tensor, so each process trains its own copy, and the
        broadcast of rank 0's rewiring hides it at each rewiring."""
        names = [name for name, shard in self.layout.layers.items() if not shard.sharded]
        differing = differing_replicas({name: self.params[name] for name in names}, self.layout)
        if not differing:
            return
        self._warned_replicas_differ = True
        if self.layout.rank == 0:
            warnings.warn(
                f"the sparse parameters {differing} are plain tensors (not sharded by "
                "fully_shard) and hold different weights on different processes: FSDP2 "
                "reduces only the gradients of the parameters fully_shard manages, so each "
                "process trains its own copy of these, and every rewiring resets them to "
                "rank 0's. Shard them too (apply fully_shard to the module that owns them, "
                "or to the root module), or all-reduce their gradients yourself",
                UserWarning, stacklevel=3)

    def _broadcast_replicated(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """After a sharded rewiring: the replicated layers (plain tensors of a partly sharded
        model), which rank 0 rewired alone, take its masks and weights everywhere; the other
        processes give their new positions fresh optimizer state (and no gradient, unless
        ``update_grown_weights``), as rank 0's rewiring did."""
        names = [name for name, shard in self.layout.layers.items() if not shard.sharded]
        if not names:
            return
        before = {name: self.masks[name].clone() for name in names}
        self._broadcast(names)
        for name in names:
            new = self.masks[name] & ~before[name]
            reset_optimizer_state_(optimizers, self.params[name], new, self.fresh_state)
            grad = self.params[name].grad
            if not self.update_grown_weights and grad is not None:
                grad.masked_fill_(new, 0)

    @property
    def threshold(self) -> float | None:
        """DSR's current threshold ``H`` (``None`` for other methods, or before the first
        rewiring)."""
        return getattr(self.rewiring.removal, "threshold", None)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Masks (bool, CPU), schedule and position (step and epoch of the last rewiring, a
        pending one), DSR threshold, generator state, per-layer targets.

        Only tensors and Python primitives: loadable with ``torch.load(weights_only=True)``.
        """
        schedule = self.schedule
        # Strays collected before steps and not read yet count in the saved total (a copy:
        # saving changes nothing in this run, whose next check reads them).
        # (Sharded, each process holds its shards' counts, summed at the next check: not here,
        # where a collective might not pair up; a resume then misses those since the check.)
        stray = dict(self.stray_weights_zeroed)
        for name, count in ({} if self.layout is not None else self._collected).items():
            if int(count):
                stray[name] = stray.get(name, 0) + int(count)
        if self.layout is None:
            masks = {name: mask.detach().cpu().clone() for name, mask in self.masks.items()}
        else:  # the live DTensors: torch.distributed.checkpoint saves and loads them sharded
            masks = dict(self.masks)
        return {
            "masks": masks,
            "last_slot": int(self.last_slot),
            "last_rewiring_step": self.last_rewiring_step,
            "last_rewiring_epoch": self.last_rewiring_epoch,
            "pending_step": self.pending_step,
            "schedule": None if schedule is None else {
                "interval": schedule.interval, "update_interval": schedule.update_interval,
                "stop_step": schedule.stop_step, "drop_fraction": schedule.drop_fraction,
            },
            "rewirings": int(self.rewirings),
            "skipped_rewirings": int(self.skipped_rewirings),
            "skip_reasons": {reason: int(n) for reason, n in self.skip_reasons.items()},
            "stray_weights_zeroed": {name: int(n) for name, n in stray.items()},
            "threshold": self.threshold,
            "generator_state": self.generator.get_state(),
            "initial_counts": dict(self.initial_counts),
            "method": self.method_name,
            "sparsity": float(self.sparsity),
            "distribution": self.distribution,
        }

    def _adopt_masks(self, masks: Mapping[str, Tensor]) -> None:
        missing = set(self.masks) - set(masks)
        unexpected = set(masks) - set(self.masks)
        if missing or unexpected:
            raise ValueError(
                f"saved masks do not match the sparse parameters: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        for name, mask in masks.items():
            if tuple(mask.shape) != tuple(self.masks[name].shape):
                raise ValueError(f"saved mask of {name!r} has shape {tuple(mask.shape)}, "
                                 f"the parameter {tuple(self.masks[name].shape)}")
            target = self.masks[name]
            if mask is target:
                continue  # loaded in place (torch.distributed.checkpoint)
            if is_sharded(target) and not is_sharded(mask):  # a whole mask: take our rows
                shard = self.layout.layers[name]
                rows = mask.detach().reshape(-1)[shard.start:shard.start + shard.local]
                local_tensor(target).view(-1).copy_(rows.to(dtype=torch.bool))
            else:
                target.copy_(mask.to(dtype=torch.bool))
        self._recount()
        if hasattr(self, "_param_list"):
            self._refresh_lists()

    @classmethod
    def from_state_dict(
        cls, params: Mapping[str, Tensor], state: Mapping[str, Any], **settings: Any
    ) -> SparseEngine:
        """An engine over ``params`` that resumes from ``state`` (a :meth:`state_dict`).

        The saved masks are adopted (no masks are drawn) and the bookkeeping restored.
        ``settings`` are the constructor's keyword arguments (``sparsity``, ``method``,
        ``schedule``, ...); ``masks`` comes from ``state``.
        """
        engine = cls(params, masks=state["masks"], **settings)
        engine._load_bookkeeping(state)
        return engine

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Adopt saved masks and bookkeeping; the parameters are masked in place."""
        self._adopt_masks(state["masks"])
        self._load_bookkeeping(state)

    def _load_bookkeeping(self, state: Mapping[str, Any]) -> None:
        if "initial_counts" in state:
            self.initial_counts = {name: int(c) for name, c in state["initial_counts"].items()}
        # States saved before the epoch was stored keep their slot (exact while the interval
        # is unchanged; a step interval derives it from the step anyway).
        self._saved_slot = int(state.get("last_slot", 0))
        step, epoch = state.get("last_rewiring_step"), state.get("last_rewiring_epoch")
        self.last_rewiring_step = None if step is None else int(step)
        self.last_rewiring_epoch = None if epoch is None else int(epoch)
        pending = state.get("pending_step")
        self.pending_step = None if pending is None else int(pending)
        self.rewirings = int(state.get("rewirings", 0))
        self.skipped_rewirings = int(state.get("skipped_rewirings", 0))
        self.skip_reasons = {str(reason): int(n)
                             for reason, n in (state.get("skip_reasons") or {}).items()}
        self.stray_weights_zeroed = {
            str(name): int(n) for name, n in (state.get("stray_weights_zeroed") or {}).items()}
        self.rewiring.load_state_dict({"threshold": state.get("threshold")})
        self.generator.set_state(state["generator_state"])
        self.apply_masks()

