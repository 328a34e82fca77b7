"""Training dynamics nobody here wrote (issue 17): optimizer state beyond momentum, layers
frozen mid-fit, code that writes into masked weights, a step the grad scaler skips, manual
optimization that clips."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ggr import DynamicSparsityCallback
from tests.helpers import record_rewiring_gradients

pytestmark = pytest.mark.usefixtures("single_thread")


def loader(samples: int = 32, batch: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(samples, 8, generator=g),
                         torch.randint(0, 4, (samples,), generator=g))
    return DataLoader(data, batch_size=batch, shuffle=False)  # 8 batches per epoch


class MLP(pl.LightningModule):
    """``Linear(8, 16) -> ReLU -> Linear(16, 4)``, with a chosen torch optimizer."""

    def __init__(self, optimizer: str = "sgd", **settings) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.settings = settings
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return getattr(torch.optim, self.optimizer_name)(self.parameters(), **self.settings)


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 2)
    return pl.Trainer(default_root_dir=tmp_path, callbacks=callbacks, accelerator="cpu",
                      devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def sparse(**kwargs) -> DynamicSparsityCallback:
    settings = {"method": "set", "sparsity": 0.75, "interval": "step", "update_interval": 3,
                "stop_step": 12, "drop_fraction": 0.5, "log_figures": False,
                "selection_summary": False}
    return DynamicSparsityCallback(**{**settings, **kwargs})


# ------------------------------------------------------------- 1. fresh optimizer state
class GrownState(pl.Callback):
    """After each rewiring (placed after the sparse callback): the state of ``key`` at the
    positions that became active."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.previous: dict[str, torch.Tensor] = {}
        self.grown_values: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module):
        self.previous = {n: m.clone() for n, m in trainer.callbacks[0].masks.items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        callback = trainer.callbacks[0]
        params = callback.engine.params
        for name, mask in callback.masks.items():
            grown = mask & ~self.previous[name]
            if grown.any():
                self.grown_values.append(optimizer.state[params[name]][self.key][grown].clone())
            self.previous[name] = mask.clone()


@pytest.mark.parametrize(("optimizer", "settings", "key", "start"), [
    ("Rprop", {"lr": 0.01}, "step_size", 0.01),  # was 1e-6 after 50 steps: barely moved
    ("Adagrad", {"lr": 0.05, "initial_accumulator_value": 0.5}, "sum", 0.5),  # was 0
])
def test_grown_weights_start_their_optimizer_state_where_a_fresh_parameter_does(
        tmp_path, optimizer, settings, key, start):
    recorder = GrownState(key)
    trainer(tmp_path, [sparse(), recorder]).fit(MLP(optimizer, **settings), loader())
    assert len(recorder.grown_values) == 2 * 3  # two layers, steps 3, 6, 9
    for values in recorder.grown_values:
        assert torch.equal(values, torch.full_like(values, start))


class FlatMomentum(torch.optim.SGD):
    """SGD that also keeps a flattened copy of its momentum: one value per weight in another
    layout than the weight's."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["flat"] = torch.zeros(p.numel())
        return loss


class FlatMLP(MLP):
    def configure_optimizers(self):
        return FlatMomentum(self.parameters(), lr=0.1, momentum=0.9)


def test_optimizer_state_in_another_layout_is_refused_before_training(tmp_path):
    model = FlatMLP()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"FlatMomentum keeps 'flat' of shape \(6,\)"):
        trainer(tmp_path, [sparse()]).fit(model, loader())
    # Refused before any optimizer step: only the masks touched the weights.
    assert all(torch.equal(p.detach()[p.detach() != 0], b[p.detach() != 0])
               for p, b in zip(model.parameters(), before, strict=True))


# ----------------------------------------------------------- 2. layers frozen mid-fit
class MLP3(MLP):
    """Three sparse Linear layers, so that GGR's global budget has something to share."""

    def __init__(self, only_trainable: bool = False) -> None:
        super().__init__()
        self.only_trainable = only_trainable
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                 nn.Linear(16, 4))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad or not self.only_trainable]
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)


class FreezeFirstLayer(BaseFinetuning):
    """Progressive freezing with Lightning's own callback: the first layer is frozen at
    ``freeze_at`` and trained again at ``unfreeze_at``."""

    def __init__(self, freeze_at: int, unfreeze_at: int) -> None:
        super().__init__()
        self.freeze_at, self.unfreeze_at = freeze_at, unfreeze_at

    def freeze_before_training(self, pl_module):
        pass

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == self.freeze_at:
            self.freeze(pl_module.net[0])
        elif epoch == self.unfreeze_at:
            self.make_trainable(pl_module.net[0])


class FirstLayerLog(pl.Callback):
    """Per optimizer step (after the sparse callback): the rewiring count, the first
    layer's mask and weight, every layer's active count."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        sparse = trainer.callbacks[0]
        self.steps.append({
            "epoch": trainer.current_epoch, "rewirings": sparse.engine.rewirings,
            "mask": sparse.masks["net.0.weight"].clone(),
            "weight": pl_module.net[0].weight.detach().clone(),
            "active": sparse.engine.active_counts(),
        })


def test_a_sparse_layer_frozen_mid_fit_keeps_its_mask_and_weights_and_is_rewired_again(
        tmp_path):
    """GGR with the first layer frozen in epochs 1-2 (Lightning's BaseFinetuning): its mask,
    weights and active count stay as they were, the other layers share the budget among
    themselves; trained again in epoch 3, it is rewired again. It used to be rewired with no
    gradient: weights dropped, none grown back."""
    log = FirstLayerLog()
    sparse = DynamicSparsityCallback(method="ggr", sparsity=0.75, interval="step",
                                     update_interval=2, stop_step=32, drop_fraction=0.5,
                                     log_figures=False, selection_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [sparse, FreezeFirstLayer(1, 3), log], max_epochs=4).fit(
            MLP3(), loader())
    frozen = [s for s in log.steps if s["epoch"] in (1, 2)]
    start = log.steps[7]  # the last step of epoch 0 (after the rewiring of step 6)
    assert frozen[-1]["rewirings"] - start["rewirings"] == 8  # steps 8, 10, ..., 22
    for state in frozen:
        assert torch.equal(state["mask"], start["mask"])
        assert torch.equal(state["weight"], frozen[0]["weight"])  # step 7's update included
        assert state["active"]["net.0.weight"] == start["active"]["net.0.weight"]
    # The others moved weights between themselves (GGR), their total unchanged.
    others = [sum(v for k, v in s["active"].items() if k != "net.0.weight") for s in frozen]
    assert len(set(others)) == 1
    assert len({s["active"]["net.2.weight"] for s in frozen}) > 1
    # Trained again: rewired again.
    assert not torch.equal(log.steps[-1]["mask"], start["mask"])
    said = [str(w.message) for w in caught if "is frozen" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("net.0.weight is frozen")


class UnfreezeLater(BaseFinetuning):
    """Lightning's documented use: the first layer frozen before training, unfrozen and
    added to the optimizer at epoch 1."""

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer, lr=0.01)


def test_a_layer_dense_because_frozen_at_fit_start_says_it_stays_dense_when_unfrozen(
        tmp_path):
    sparse = DynamicSparsityCallback(method="set", sparsity=0.75, interval="step",
                                     update_interval=2, stop_step=24, log_figures=False,
                                     selection_summary=False)
    model = MLP3(only_trainable=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [sparse, UnfreezeLater()], max_epochs=3).fit(model, loader())
    assert sparse.selection.dense["net.0.weight"] == "frozen (requires_grad=False)"
    assert set(sparse.masks) == {"net.2.weight", "net.4.weight"}
    said = [str(w.message) for w in caught if "stays dense" in str(w.message)]
    assert len(said) == 1
    assert said[0].startswith("net.0.weight was frozen (requires_grad=False) at fit start")
    assert (model.net[0].weight.detach() != 0).all()  # trained dense, as said


# -------------------------------------------------- 3. code that writes into the weights
class NoisyMLP(MLP):
    """A weight-noise regulariser in the module's own ``on_train_batch_start`` (it runs after
    every callback's): noise everywhere, masked positions included."""

    def __init__(self, noise_until_epoch: int = 99) -> None:
        super().__init__()
        self.noise_until_epoch = noise_until_epoch
        self.nonzero_in_forward: list[int] = []  # masked weights not 0 when forward ran

    def on_train_batch_start(self, batch, batch_idx):
        if self.current_epoch < self.noise_until_epoch:
            with torch.no_grad():
                for module in (self.net[0], self.net[2]):
                    module.weight.add_(torch.randn_like(module.weight) * 1e-3)

    def forward(self, x):
        masks = self.trainer.callbacks[0].masks
        if self.training:
            self.nonzero_in_forward.append(sum(
                int((self.net[i].weight.detach()[~masks[f"net.{i}.weight"]] != 0).sum())
                for i in (0, 2)))
        return self.net(x)


def test_writes_into_masked_weights_are_found_at_rewirings_and_epoch_ends(tmp_path):
    """With SGD (it keeps masked weights at 0 by itself, so nothing re-zeroes them per step)
    the noise used to keep every masked weight non-zero for the whole fit, zeroed only at
    fit end: the model trained dense. Now each rewiring and each epoch end (after the stop
    too) finds them, says which layers and how many, and zeroes them."""
    model = NoisyMLP(noise_until_epoch=3)
    sparse_cb = sparse(stop_step=10)  # epochs 2 and 3 are after the stop
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [sparse_cb], max_epochs=4).fit(model, loader())
    masked = {n: int((~m).sum()) for n, m in sparse_cb.masks.items()}
    said = [str(w.message) for w in caught if "masked weights were not 0" in str(w.message)]
    # Found at the first due step (3): every masked weight of both layers had noise.
    assert said == [f"{sum(masked.values())} masked weights were not 0 at step 3 "
                    f"(net.0.weight: {masked['net.0.weight']}, net.2.weight: "
                    f"{masked['net.2.weight']}): something else writes into them (weight "
                    "noise, a re-initialisation, an EMA copy written back), so they took part "
                    "in the forward pass since they were last zeroed; zeroed again now (and at "
                    "each rewiring and epoch end). To keep them 0 at every step, pass "
                    "enforce_masks_every_step=True"]
    # Zeroed at steps 3, 6, 9 (rewirings) and at the ends of epochs 0-2 (the last after the
    # stop); epoch 3 has no noise, so it ends with nothing to zero.
    counts = sparse_cb.engine.stray_weights_zeroed
    assert set(counts) == {"net.0.weight", "net.2.weight"}
    assert counts["net.0.weight"] >= 6 * masked["net.0.weight"] * 0.9
    assert model.net[0].weight.detach()[~sparse_cb.masks["net.0.weight"]].eq(0).all()
    # Epoch 3 starts from zeroed masked weights and nothing writes: 0 in every forward.
    assert model.nonzero_in_forward[-8:] == [0] * 8


class WritesAt(MLP):
    """Writes 0.5 into the first three masked weights of ``net.0.weight`` in its own
    ``on_train_batch_start`` at the given steps (a re-initialisation, say)."""

    def __init__(self, steps, optimizer: str = "sgd", **settings) -> None:
        super().__init__(optimizer, **settings)
        self.steps = set(steps)

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step in self.steps:
            masked = (~self.trainer.callbacks[0].masks["net.0.weight"]).nonzero()[:3]
            with torch.no_grad():
                self.net[0].weight[masked[:, 0], masked[:, 1]] = 0.5


@pytest.mark.parametrize(("optimizer", "settings"), [
    ("Adamax", {"lr": 0.01}), ("Rprop", {"lr": 0.01}), ("Adafactor", {"lr": 0.01}),
    ("ASGD", {"lr": 0.01}),
])
def test_writes_are_found_with_optimizers_whose_steps_are_followed_by_a_zeroing_pass(
        tmp_path, optimizer, settings):
    """Optimizers outside the zero-preserving list get masked weights zeroed after every
    step. Writes made at steps that were not due (1 and 4; due: 3, 6, 9) were zeroed by that
    pass unseen, though they took part in the step's forward pass: no warning, nothing in
    the account. They are counted before the step now (on the device, read at the next
    check) and said like the others."""
    model = WritesAt((1, 4, 14), optimizer, **settings)  # 14: after the stop (12)
    sparse_cb = sparse()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [sparse_cb]).fit(model, loader())
    said = [str(w.message) for w in caught if "masked weights were not 0" in str(w.message)]
    assert said == ["3 masked weights were not 0 at step 3 (net.0.weight: 3): something else "
                    "writes into them (weight noise, a re-initialisation, an EMA copy written "
                    "back), so they took part in the forward pass since they were last zeroed; "
                    "zeroed again now (and at each rewiring and epoch end). To keep them 0 at "
                    "every step, pass enforce_masks_every_step=True"]
    assert sparse_cb.engine.stray_weights_zeroed == {"net.0.weight": 9}


@pytest.mark.parametrize("optimizer", ["Adamax", "Rprop"])
def test_nothing_is_said_when_nothing_writes_into_masked_weights(tmp_path, optimizer):
    sparse_cb = sparse()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [sparse_cb]).fit(MLP(optimizer, lr=0.01), loader())
    assert not [w for w in caught if "masked weights were not 0" in str(w.message)]
    assert sparse_cb.engine.stray_weights_zeroed == {}


def test_enforce_masks_every_step_keeps_masked_weights_zero_in_every_forward(tmp_path):
    model = NoisyMLP()
    sparse_cb = sparse(enforce_masks_every_step=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [sparse_cb]).fit(model, loader())
    assert len(model.nonzero_in_forward) == 16
    assert model.nonzero_in_forward == [0] * 16  # the noise came right before each forward
    assert not [w for w in caught if "masked weights were not 0" in str(w.message)]
    assert sparse_cb.engine.stray_weights_zeroed == {}
    assert sparse_cb.run_config()["enforce_masks_every_step"] is True


class NoiseInAPreHook(NoisyMLP):
    """Weight noise as a forward pre-hook on the layers themselves (registered when the
    model is built, before the callback's), masked positions included."""

    def __init__(self) -> None:
        super().__init__(noise_until_epoch=0)
        for module in (self.net[0], self.net[2]):
            module.register_forward_pre_hook(self._noise)
        self.nonzero_in_layer: list[int] = []

    def _noise(self, module, args) -> None:
        if self.training:
            with torch.no_grad():
                module.weight.add_(torch.randn_like(module.weight) * 1e-3)

    def forward(self, x):
        hidden = self.net[0](x)
        masks = self.trainer.callbacks[0].masks
        if self.training:  # what the layer's forward used: its hooks have run
            self.nonzero_in_layer.append(int(
                (self.net[0].weight.detach()[~masks["net.0.weight"]] != 0).sum()))
        return self.net[2](self.net[1](hidden))


def test_enforce_masks_every_step_runs_after_the_layers_own_pre_hooks(tmp_path):
    """Regression: only the step's first pre-hook applied the masks, so weight noise in a
    layer's own pre-hook (registered when the model is built) reached that layer's forward
    pass. Each layer's pre-hook now re-masks a layer written since."""
    model = NoiseInAPreHook()
    sparse_cb = sparse(enforce_masks_every_step=True)
    trainer(tmp_path, [sparse_cb]).fit(model, loader())
    assert model.nonzero_in_layer == [0] * 16


class NoiseThroughData(NoiseInAPreHook):
    """The same noise written the common way, through ``.data`` (no version counter moves)."""

    def _noise(self, module, args) -> None:
        if self.training:
            module.weight.data.add_(torch.randn_like(module.weight) * 1e-3)


class NoiseOnALayerInEvalMode(NoiseInAPreHook):
    """A sparse layer kept in eval mode while the model trains (a user freezing its dropout
    or normalisation the usual way): its own pre-hook's noise is not tied to its mode."""

    def _noise(self, module, args) -> None:
        if self.trainer.training:
            with torch.no_grad():
                module.weight.add_(torch.randn_like(module.weight) * 1e-3)

    def on_train_batch_start(self, batch, batch_idx):
        self.net[0].eval()

    def forward(self, x):
        hidden = self.net[0](x)
        masks = self.trainer.callbacks[0].masks
        if self.trainer.training:
            self.nonzero_in_layer.append(int(
                (self.net[0].weight.detach()[~masks["net.0.weight"]] != 0).sum()))
        return self.net[2](self.net[1](hidden))


@pytest.mark.parametrize("model_class", [NoiseThroughData, NoiseOnALayerInEvalMode])
def test_enforce_masks_every_step_masks_a_layer_whatever_its_pre_hook_writes(
        tmp_path, model_class):
    """Regression: a layer's pre-hook re-masked it only when its version counter moved and
    the layer was in training mode, so noise written through ``.data`` (no counter moves),
    or into a layer kept in eval mode while training, reached that layer's forward pass."""
    model = model_class()
    sparse_cb = sparse(enforce_masks_every_step=True)
    trainer(tmp_path, [sparse_cb]).fit(model, loader())
    assert model.nonzero_in_layer == [0] * 16


class NoiseHookedLater(pl.Callback):
    """Weight noise as a forward pre-hook that a callback listed after the sparsity callback
    registers in its own ``on_fit_start``, so after the sparsity callback's hook."""

    def on_fit_start(self, trainer, pl_module):
        for module in (pl_module.net[0], pl_module.net[2]):
            module.register_forward_pre_hook(pl_module._noise)


class NoiseFromALaterCallback(NoiseInAPreHook):
    def __init__(self) -> None:
        super(NoiseInAPreHook, self).__init__(noise_until_epoch=0)
        self.nonzero_in_layer = []


def test_enforce_masks_every_step_masks_after_pre_hooks_registered_after_its_own(tmp_path):
    """Regression: the callback's pre-hooks were registered in on_fit_start, so a weight-noise
    pre-hook registered later (another callback's on_fit_start) ran after them and its noise
    reached the layer's forward pass. They are moved behind such hooks at each batch start."""
    model = NoiseFromALaterCallback()
    sparse_cb = sparse(enforce_masks_every_step=True)
    trainer(tmp_path, [sparse_cb, NoiseHookedLater()]).fit(model, loader())
    assert model.nonzero_in_layer == [0] * 16


class WritesAfterTheStep(pl.Callback):
    """An EMA-like copy written back after the optimizer step (on_train_batch_end)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with torch.no_grad():
            pl_module.net[2].weight.add_(1e-3)


def test_enforce_masks_every_step_also_catches_writes_after_the_step(tmp_path):
    model = NoisyMLP(noise_until_epoch=0)  # only the callback writes
    sparse_cb = sparse(enforce_masks_every_step=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [sparse_cb, WritesAfterTheStep()]).fit(model, loader())
    assert model.nonzero_in_forward == [0] * 16
    # Zeroed before every forward anyway: nothing to say.
    assert not [w for w in caught if "masked weights were not 0" in str(w.message)]
    # Written at each batch end, zeroed before the next forward: the epoch ends see them.
    assert set(sparse_cb.engine.stray_weights_zeroed) == {"net.2.weight"}


# ------------------------------------- 5. manual optimization that clips its gradients
class ClippingByHand(MLP):
    """Lightning's documented manual pattern: manual_backward -> clip_gradients -> step.
    Records, at each clipping, how many masked gradients the clipping saw non-zero."""

    def __init__(self, algorithm: str, backwards: int = 1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.algorithm, self.backwards = algorithm, backwards
        self.masked_at_clipping: list[int] = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        for part in range(self.backwards):
            chunk = slice(part, None, self.backwards)
            self.manual_backward(nn.functional.cross_entropy(self(x[chunk]), y[chunk]))
        masks = next(c for c in self.trainer.callbacks
                     if isinstance(c, DynamicSparsityCallback)).masks
        self.masked_at_clipping.append(sum(
            int((self.net[i].weight.grad[~masks[f"net.{i}.weight"]] != 0).sum()) for i in (0, 2)))
        self.clip_gradients(opt, gradient_clip_val=1e-4, gradient_clip_algorithm=self.algorithm)
        opt.step()


class RawGradients(pl.Callback):
    """Placed before the sparse callback: the gradients as the backward left them."""

    def __init__(self) -> None:
        self.raw: list[dict[str, torch.Tensor]] = []

    def on_after_backward(self, trainer, pl_module):
        self.raw.append({f"net.{i}.weight": pl_module.net[i].weight.grad.clone() for i in (0, 2)})


@pytest.mark.parametrize("algorithm", ["value", "norm"])
def test_manual_clipping_sees_no_masked_gradient_and_growth_reads_unclipped_ones(
        tmp_path, algorithm, monkeypatch):
    seen = record_rewiring_gradients(monkeypatch)
    raw = RawGradients()
    model = ClippingByHand(algorithm)
    sparse_cb = sparse(method="rigl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [raw, sparse_cb]).fit(model, loader())
    assert model.masked_at_clipping == [0] * 16  # not in the clipping norm
    assert len(seen) == 3  # steps 3, 6, 9
    for gradients, step in zip(seen, (3, 6, 9), strict=True):
        for name, gradient in gradients.items():
            # The backward's own gradient, far above the clip value 1e-4 (was: every entry
            # tied at the clip value, or scaled down with the masked ones in the norm).
            assert torch.equal(gradient, raw.raw[step][name])
            assert gradient.abs().max() > 1e-2
    assert not [w for w in caught if "several backward passes" in str(w.message)]


def test_manual_accumulation_says_growth_reads_the_first_backward(tmp_path):
    model = ClippingByHand("norm", backwards=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [sparse(method="rigl")]).fit(model, loader())
    assert model.masked_at_clipping == [0] * 16
    said = [str(w.message) for w in caught if "several backward passes" in str(w.message)]
    assert len(said) == 1


# ---------------------------------------- 10. optimizer state masked when training starts
class ReusedOptimizer(MLP):
    """An optimizer built once and returned by every fit (reused across fits)."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def configure_optimizers(self):
        return self.optimizer


class FirstStep(pl.Callback):
    """After the sparse callback's hooks of this fit's first step: non-zero momentum at
    masked positions before the optimizer step, non-zero masked weights after it."""

    def __init__(self) -> None:
        self.momentum_before = self.weights_after = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.momentum_before is None:
            sparse_cb = trainer.callbacks[0]
            self.momentum_before = sum(
                int((optimizer.state[p]["momentum_buffer"][~sparse_cb.masks[n]] != 0).sum())
                for n, p in sparse_cb.engine.params.items())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.weights_after is None:
            sparse_cb = trainer.callbacks[0]
            self.weights_after = sum(int((p.detach()[~sparse_cb.masks[n]] != 0).sum())
                                     for n, p in sparse_cb.engine.params.items())


def test_an_optimizer_reused_across_fits_has_its_state_masked_at_train_start(tmp_path):
    model = ReusedOptimizer()
    trainer(tmp_path, [], max_epochs=1).fit(model, loader())  # dense: momentum everywhere
    first = FirstStep()
    trainer(tmp_path, [sparse(), first], max_epochs=1).fit(model, loader())
    assert first.momentum_before == 0
    assert first.weights_after == 0  # momentum would have moved masked weights off 0


def test_a_checkpoint_of_a_dense_run_has_its_optimizer_state_masked_at_train_start(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    dense = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu",
                       logger=False, enable_progress_bar=False, enable_model_summary=False,
                       callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="dense")])
    dense.fit(MLP(), loader())
    first = FirstStep()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")  # "holds no DynamicSparsityCallback state"
        # Resumed at step 8, no rewiring due before step 10: only train start can mask.
        trainer(tmp_path, [sparse(update_interval=10, stop_step=11), first], max_epochs=2).fit(
            MLP(), loader(), ckpt_path=str(tmp_path / "dense.ckpt"))
    assert first.momentum_before == 0  # the checkpoint's dense momentum, masked
    assert first.weights_after == 0


@pytest.mark.parametrize(("swa_epoch_start", "stop_step", "refused"), [
    (3, 16, False),  # averages once epoch 2 begins, after 16 steps: at the stop, allowed
    (3, 17, True),  # 16 steps < 17: the step-16 rewiring comes after its first average
    (2, 9, True),
    (2, 8, False),
])
def test_weight_averaging_start_against_the_stop_point_exactly(swa_epoch_start, stop_step,
                                                               refused):
    """Epochs of 8 steps: ``StochasticWeightAveraging(swa_epoch_start=e)`` first averages
    when 0-based epoch ``e - 1`` begins, after ``8 (e - 1)`` steps; refused when that is
    before the stop step."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import StochasticWeightAveraging

    from lightning_ggr.callbacks.compatibility import check_weight_averaging

    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=swa_epoch_start)
    fake = SimpleNamespace(callbacks=[swa], num_training_batches=8, accumulate_grad_batches=1)
    if refused:
        with pytest.raises(ValueError, match="averages from epoch"):
            check_weight_averaging(fake, stop_step)
    else:
        check_weight_averaging(fake, stop_step)


def test_the_fit_end_account_counts_the_masked_weights_written_by_other_code(tmp_path, caplog):
    import logging

    model = NoisyMLP(noise_until_epoch=1)
    sparse_cb = sparse(stop_step=10, fit_end_summary=True)
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [sparse_cb], max_epochs=2).fit(model, loader())
    counts = sparse_cb.engine.stray_weights_zeroed
    total = sum(counts.values())
    assert total > 0 and set(counts) == {"net.0.weight", "net.2.weight"}
    line = (f"masked weights written by other code and zeroed again: {total:,} (net.0.weight: "
            f"{counts['net.0.weight']:,}, net.2.weight: {counts['net.2.weight']:,})")
    assert any(line in record.getMessage() for record in caplog.records)
