"""Several DynamicSparsityCallbacks in one Trainer: one per network of a GAN (issue 10)."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from tests.helpers.models import make_trainer
from tests.helpers.setups import TwoOptimizers, loader, sparse

pytestmark = pytest.mark.usefixtures("single_thread")


def pair():
    """One callback per network, each with its own optimizer."""
    return (sparse(include=["gen.weight"], interval="step", update_interval=2, stop_step=30,
                   seed=1),
            sparse(include=["disc.weight"], interval="step", update_interval=2, stop_step=30,
                   seed=2))


def test_two_callbacks_with_disjoint_selections_coexist_and_resume(tmp_path):
    """Lightning refused them: two stateful callbacks with the same state_key."""
    gen, disc = pair()
    assert gen.state_key != disc.state_key
    trainer = make_trainer(tmp_path, [gen, disc], max_epochs=None, max_steps=16)
    trainer.fit(TwoOptimizers(), loader())
    # Each counts its own optimizer's steps (8 each; global_step is 16): rewires at 2, 4, 6.
    assert gen.engine.rewirings == disc.engine.rewirings == 3
    saved = {n: m.clone() for n, m in {**gen.masks, **disc.masks}.items()}
    trainer.save_checkpoint(tmp_path / "pair.ckpt")

    gen, disc = pair()
    trainer = make_trainer(tmp_path, [gen, disc], max_epochs=None, max_steps=32)
    trainer.fit(TwoOptimizers(), loader(), ckpt_path=tmp_path / "pair.ckpt")
    assert set(gen.masks) == {"gen.weight"} and set(disc.masks) == {"disc.weight"}
    assert gen.engine.rewirings == disc.engine.rewirings == 7  # 2, 4, ..., 14
    assert gen.state_dict()["optimizer_steps"] == 16
    # ... from the masks each saved (resumed, not drawn again).
    gen, disc = pair()
    trainer = make_trainer(tmp_path, [gen, disc], max_epochs=None, max_steps=16)
    trainer.fit(TwoOptimizers(), loader(), ckpt_path=tmp_path / "pair.ckpt")  # restores only
    for name, mask in {**gen.masks, **disc.masks}.items():
        assert torch.equal(mask, saved[name]), f"{name}: not restored by its own callback"


def test_overlapping_selections_are_refused_before_training(tmp_path):
    model = TwoOptimizers()
    both = sparse(include=["gen.weight"]), sparse(include=["gen.weight", "disc.weight"])
    with pytest.raises(ValueError, match=r"\['gen\.weight'\] are selected by two "
                                         r"DynamicSparsityCallbacks.*one owner"):
        make_trainer(tmp_path, list(both), max_steps=2).fit(model, loader())


def test_each_callback_logs_and_summarizes_apart(tmp_path):
    """Both wrote density/global, rewiring/* and the same run summary (the last one won)."""
    gen, disc = pair()
    logger = CSVLogger(tmp_path, name="run")
    make_trainer(tmp_path, [gen, disc], max_epochs=None, max_steps=8, logger=logger).fit(
        TwoOptimizers(), loader())
    header = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    columns = set(header.split(","))
    assert {"density/global", "density_1/global", "rewiring/count", "rewiring_1/count",
            "density/gen.weight", "density_1/disc.weight"} <= columns
    first = json.loads((tmp_path / "run" / "version_0" / "lightning_ggr_summary.json")
                       .read_text())
    second = json.loads((tmp_path / "run" / "version_0" / "lightning_ggr_summary_1.json")
                        .read_text())
    assert set(first["layers"]) == {"gen.weight"} and set(second["layers"]) == {"disc.weight"}
