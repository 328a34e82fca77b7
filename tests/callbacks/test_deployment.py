"""After a real Lightning fit: the inner network saved, reloaded and converted for inference
with the callback's masks, whose names carry the LightningModule's attribute prefix."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ggr import (
    DynamicSparsityCallback,
    load_sparse_model,
    save_sparse_model,
    to_inference,
)
from lightning_ggr.sparse.inference import SparseLinear
from tests.helpers.models import make_trainer

pytestmark = pytest.mark.usefixtures("single_thread")

VOCABULARY, WIDTH, LENGTH = 40, 16, 6


class TinyLM(nn.Module):
    """A GPT-like toy: token embedding tied to the output layer, one MLP block."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCABULARY, WIDTH)
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCABULARY, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, tokens):
        h = self.tok(tokens)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h)


class LanguageModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = TinyLM()

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        logits = self.net(tokens)
        return nn.functional.cross_entropy(logits.reshape(-1, VOCABULARY), targets.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_the_inner_network_saves_loads_and_converts_with_the_callbacks_masks(tmp_path):
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCABULARY, (32, LENGTH))
    loader = DataLoader(TensorDataset(tokens, tokens.roll(-1, dims=1)), batch_size=8)
    callback = DynamicSparsityCallback(method="ggr", sparsity=0.8, interval="step",
                                       update_interval=2, log_figures=False)
    module = LanguageModule()
    make_trainer(tmp_path, [callback], max_epochs=2).fit(module, loader)
    assert callback.engine.rewirings > 0
    assert set(callback.masks) == {"net.tok.weight", "net.up.weight", "net.down.weight"}

    save_sparse_model(module.net, callback.masks, tmp_path / "lm.pt")  # prefix 'net.'
    fresh = TinyLM()
    masks = load_sparse_model(fresh, tmp_path / "lm.pt")
    assert fresh.head.weight is fresh.tok.weight
    for name, tensor in module.net.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    assert all(torch.equal(masks[name.removeprefix("net.")], mask)
               for name, mask in callback.masks.items())

    example = tokens[:4]
    for masks_given in (callback.masks, masks):  # the callback's names, and the file's
        converted = to_inference(module.net, masks_given, example)
        with torch.inference_mode():
            torch.testing.assert_close(converted(example), module.net.eval()(example),
                                       rtol=1e-5, atol=1e-5)
        assert {c.module for c in converted.inference_report.layers} == {
            "tok", "up", "down", "head"}
    assert isinstance(module.net.up, nn.Linear)  # the trained network is untouched
    converted_types = {type(m) for m in converted.modules()}
    assert nn.Embedding in converted_types
    assert SparseLinear in converted_types or not converted.inference_report.kept_sparse
