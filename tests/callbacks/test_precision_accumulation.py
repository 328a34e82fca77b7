"""fp16 with GradScaler, gradient accumulation and manual optimization (CPU)."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from lightning_ggr import DynamicSparsityCallback
from lightning_ggr.sparse.engine import SKIP_OPTIMIZER_NONFINITE
from lightning_ggr.sparse.rewiring import Rewiring
from tests.helpers import TinyModule, make_trainer, record_rewiring_gradients, tiny_dataloader


def step_callback(**kwargs) -> DynamicSparsityCallback:
    kwargs = {"method": "ggr", "sparsity": 0.8, "interval": "step", "update_interval": 3,
              "drop_fraction": 0.3, "log_figures": False, **kwargs}
    return DynamicSparsityCallback(**kwargs)


class Watch(pl.Callback):
    """After the sparse callback's hooks: records each step's decision and checks invariants.

    Placed after ``DynamicSparsityCallback`` in ``callbacks``, so its
    ``on_before_optimizer_step`` sees the step's outcome (rewired, postponed or nothing).
    """

    def __init__(self) -> None:
        self.rewiring_steps: list[int] = []
        self.postponed_steps: list[int] = []
        self.changed_at: list[int] = []
        self.steps = 0
        self._previous: dict[str, torch.Tensor] | None = None

    @staticmethod
    def sparse(trainer: pl.Trainer) -> DynamicSparsityCallback:
        return next(c for c in trainer.callbacks if isinstance(c, DynamicSparsityCallback))

    def on_train_start(self, trainer, pl_module) -> None:
        self._previous = {n: m.clone() for n, m in self.sparse(trainer).masks.items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        sparse = self.sparse(trainer)
        step = trainer.global_step
        if sparse.engine.rewirings > len(self.rewiring_steps):
            self.rewiring_steps.append(step)
        if sparse.engine.skipped_rewirings > len(self.postponed_steps):
            self.postponed_steps.append(step)
        masks = sparse.masks
        if any(not torch.equal(masks[n], self._previous[n]) for n in masks):
            self.changed_at.append(step)
        self._previous = {n: m.clone() for n, m in masks.items()}
        params = dict(pl_module.named_parameters())
        for name, mask in masks.items():
            assert mask.dtype == torch.bool
            assert int(mask.sum()) >= 1, f"{name} lost every active weight"
            assert (params[name][~mask] == 0).all(), f"{name}: masked weight not zero"
            assert torch.isfinite(params[name]).all(), f"{name}: non-finite weight"
            grad = params[name].grad
            if grad is not None and torch.isfinite(grad).all():
                assert (grad[~mask] == 0).all(), f"{name}: masked gradient reaches the step"
        total = sum(int(m.sum()) for m in masks.values())
        assert total == sum(sparse.initial_counts.values()), "total active count drifted"
        self.steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        params = dict(pl_module.named_parameters())
        for name, mask in self.sparse(trainer).masks.items():
            assert torch.isfinite(params[name]).all()
            assert (params[name][~mask] == 0).all()


def fp16() -> list:
    return [MixedPrecision("16-mixed", "cpu")]


# ------------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize(
    ("nonfinite_steps", "expected_rewirings", "expected_postponed"),
    [
        # inf on the due step 6: postponed to step 7, the next step of the same slot.
        ((6,), [3, 7, 9, 12], [6]),
        # inf over a whole slot (6, 7, 8): the slot's rewiring and the next one's coincide
        # at step 9: one rewiring, never two back to back.
        ((6, 7, 8), [3, 9, 12], [6, 7, 8]),
        # inf on a step that is not due changes nothing.
        ((4,), [3, 6, 9, 12], []),
    ],
    ids=["inf-on-a-due-step", "inf-over-a-whole-slot", "inf-on-a-step-not-due"],
)
def test_fp16_inf_on_a_rewiring_step_postpones_it(tmp_path, nonfinite_steps, expected_rewirings,
                                                 expected_postponed):
    sparse = step_callback(stop_step=14)
    watch = Watch()
    scales = []

    class Scale(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            scales.append(trainer.precision_plugin.scaler.get_scale())

    model = TinyModule(nonfinite_steps=nonfinite_steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [sparse, watch, Scale()], max_epochs=2, plugins=fp16()).fit(
            model, tiny_dataloader())
    said = [str(w.message).split(":")[0] for w in caught if "postponed" in str(w.message)]
    # the log says so, once per due step and reason (the account counts every postponement)
    assert said == [f"step {step}" for step in expected_postponed[:1]]
    assert watch.steps == 16
    assert watch.rewiring_steps == expected_rewirings
    assert watch.postponed_steps == expected_postponed
    # Masks change only when a rewiring runs (a late one may move nothing: small drop fraction).
    assert set(watch.changed_at) <= set(expected_rewirings) and len(watch.changed_at) >= 2
    assert sparse.engine.skipped_rewirings == len(expected_postponed)
    # GradScaler skipped the optimizer step on every inf step (its scale halves once per inf).
    assert scales[-1] == 65536.0 / 2 ** len(nonfinite_steps)


class InfBiasGradient(TinyModule):
    """Only a dense bias's gradient is non-finite on ``steps`` (the sparse ones stay finite):
    GradScaler still skips the whole optimizer step."""

    def __init__(self, steps: tuple[int, ...], value: float) -> None:
        super().__init__()
        self.steps, self.value = steps, value

    def on_after_backward(self) -> None:
        if self.global_step in self.steps:
            self.net[0].bias.grad[0] = self.value


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
def test_fp16_a_step_the_scaler_skips_for_a_dense_gradient_postpones_the_rewiring(tmp_path,
                                                                                 value):
    """A due step whose only non-finite gradient is a dense bias's: GradScaler skips the
    optimizer step, so the rewiring is postponed too (it used to run on that step)."""
    sparse = step_callback(stop_step=14)
    watch = Watch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, [sparse, watch], max_epochs=2, plugins=fp16())
        trainer.fit(InfBiasGradient((6,), value), tiny_dataloader())
    assert watch.rewiring_steps == [3, 7, 9, 12]
    assert watch.postponed_steps == [6]
    assert sparse.engine.skip_reasons == {SKIP_OPTIMIZER_NONFINITE: 1}
    said = [str(w.message) for w in caught if "postponed" in str(w.message)]
    assert said == [f"step 6: {SKIP_OPTIMIZER_NONFINITE}: the rewiring due at step 6 is "
                    "postponed to the next step with usable gradients (further postponements "
                    "of it for this reason are counted in the fit-end account, not repeated)"]
    assert trainer.precision_plugin.scaler.get_scale() == 65536.0 / 2  # the step was skipped


def test_fp16_rewiring_grows_from_the_unscaled_gradient(tmp_path, monkeypatch):
    """Growth sees the gradient after GradScaler.unscale_, not the loss-scaled one."""
    seen = record_rewiring_gradients(monkeypatch)
    model = TinyModule()
    fp32 = {}

    class Reference(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 3:  # the first rewiring step: fp32 gradient, same weights
                pl_module.zero_grad()
                pl_module.loss(batch).backward()
                fp32.update({n: p.grad.clone() for n, p in pl_module.named_parameters()})
                pl_module.zero_grad()

    make_trainer(tmp_path, [step_callback(stop_step=5), Reference()], max_steps=4,
                 plugins=fp16()).fit(model, tiny_dataloader())
    assert len(seen) == 1
    for name, gradient in seen[0].items():
        assert torch.isfinite(gradient).all()
        ratio = gradient.norm() / fp32[name].norm()
        assert 0.9 < ratio < 1.1, f"{name}: gradient norm is {ratio:.3g} x the fp32 one"


# ------------------------------------------------------------------- gradient accumulation
def test_accumulation_rewires_per_optimizer_step_on_the_accumulated_gradient(tmp_path,
                                                                             monkeypatch):
    accumulate = 3  # 8 batches per epoch: windows of 3, 3 and 2 micro-batches
    model = TinyModule()
    boundaries = [0]  # index in model.seen_batches where each optimizer step's window ends
    checked = []
    rewire = Rewiring.__call__

    def spy(self, weights, masks, gradients, *args, **kwargs):
        window = model.seen_batches[boundaries[-1]:]
        assert 1 <= len(window) <= accumulate
        # Lightning divides each micro-batch loss by accumulate_grad_batches.
        params = dict(model.named_parameters())
        names = list(gradients)
        expected = [torch.zeros_like(params[n]) for n in names]
        last = None
        with torch.enable_grad():
            for batch in window:
                last = torch.autograd.grad(model.loss(batch) / accumulate,
                                           [params[n] for n in names])
                expected = [e + g for e, g in zip(expected, last, strict=True)]
        for name, want, only_last in zip(names, expected, last, strict=True):
            torch.testing.assert_close(gradients[name], want, rtol=1e-5, atol=1e-7)
            if len(window) > 1:  # the check can tell the accumulated from the last gradient
                assert not torch.allclose(gradients[name], only_last)
        checked.append(len(window))
        return rewire(self, weights, masks, gradients, *args, **kwargs)

    monkeypatch.setattr(Rewiring, "__call__", spy)

    class Window(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            boundaries.append(len(model.seen_batches))

    sparse = step_callback(update_interval=2, stop_step=9)
    watch = Watch()
    make_trainer(tmp_path, [sparse, watch, Window()], max_epochs=3,
                 accumulate_grad_batches=accumulate).fit(model, tiny_dataloader())
    assert len(model.seen_batches) == 24
    assert watch.steps == 9  # 3 optimizer steps per epoch
    assert watch.rewiring_steps == [2, 4, 6, 8]  # per optimizer step, not per micro-batch
    assert sparse.engine.rewirings == 4
    assert checked == [2, 3, 3, 2]  # steps 2 and 8 end an epoch: windows of 2 micro-batches


# --------------------------------------------------------------------- manual optimization
@pytest.mark.parametrize("method", ["ggr", "set"])
def test_manual_optimization_is_supported_through_the_same_hooks(tmp_path, method):
    sparse = step_callback(method=method, stop_step=14)
    watch = Watch()
    model = TinyModule(manual=True)
    make_trainer(tmp_path, [sparse, watch], max_epochs=2).fit(model, tiny_dataloader())
    assert watch.steps == 16
    assert watch.rewiring_steps == [3, 6, 9, 12]
    assert set(watch.changed_at) <= {3, 6, 9, 12} and len(watch.changed_at) >= 2
    assert sparse.engine.rewirings == 4
