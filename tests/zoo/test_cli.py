"""The lightning-ggr command line: every example config parses, composes and runs one batch."""

import contextlib
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_ggr.zoo.cli import LightningGGRCLI, format_density_table, main

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
BASES = ["cifar100_resnet18", "cifar100_mobilenet_v2", "cifar100_vgg16",
         "tinyimagenet_resnet18", "tinyimagenet_mobilenet_v2", "tinyimagenet_vgg16"]
METHODS = ["dense", "set", "rigl", "dsr", "ggr", "set_rigl", "ggr_set", "ggr_rigl"]
QUICKSTART = CONFIGS / "digits_quickstart.yaml"

# The quick-start config's num_threads changes a process-wide setting: the fixture restores it.
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """LightningCLI warns when given args while sys.argv holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["lightning-ggr"])


def config_args(base: str, method: str | None = None) -> list[str]:
    args = ["--config", str(CONFIGS / f"{base}.yaml")]
    if method is not None:
        args += ["--config", str(CONFIGS / "methods" / f"{method}.yaml")]
    return args


def print_config(*args: str) -> dict:
    """The configuration the CLI parses, as ``--print_config`` prints it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        LightningGGRCLI(args=["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def test_config_files_are_all_tested():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted([*BASES, "digits_quickstart"])
    assert sorted(p.stem for p in (CONFIGS / "methods").glob("*.yaml")) == sorted(METHODS)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("method", METHODS)
def test_base_and_method_compose(base, method):
    config = print_config(*config_args(base, method))
    dataset, model = base.split("_", 1)
    init = config["model"]["init_args"]
    assert config["model"]["class_path"].endswith("ImageClassifier")
    assert (init["model"], init["num_classes"], init["input_size"]) == (
        model, {"cifar100": 100, "tinyimagenet": 200}[dataset],
        {"cifar100": 32, "tinyimagenet": 64}[dataset])
    assert init["milestones"] == {"cifar100": [30, 60, 80], "tinyimagenet": [60, 120, 160]}[
        dataset]
    assert config["trainer"]["max_epochs"] == {"cifar100": 100, "tinyimagenet": 200}[dataset]
    assert config["data"]["init_args"]["batch_size"] == 128
    (callback,) = config["trainer"]["callbacks"]
    assert callback["class_path"].endswith("DynamicSparsityCallback")
    if method == "dense":
        assert callback["init_args"]["sparsity"] == 0.0
    else:
        assert callback["init_args"]["method"] == method
        assert callback["init_args"]["sparsity"] == 0.9
        assert callback["init_args"]["distribution"] == "erk"
    assert config["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger")
    assert config["test_after_fit"] is True


def test_command_line_overrides_the_overlay():
    # The documented composition: the last --config wins, then command-line flags.
    config = print_config(*config_args("cifar100_resnet18", "ggr"),
                          "--trainer.callbacks.init_args.sparsity", "0.97",
                          "--trainer.callbacks.init_args.distribution", "uniform")
    (callback,) = config["trainer"]["callbacks"]
    assert callback["init_args"]["sparsity"] == 0.97
    assert callback["init_args"]["distribution"] == "uniform"
    assert callback["init_args"]["method"] == "ggr"


def test_second_overlay_replaces_the_first():
    config = print_config(*config_args("cifar100_resnet18", "ggr"),
                          "--config", str(CONFIGS / "methods" / "rigl.yaml"))
    assert [c["init_args"]["method"] for c in config["trainer"]["callbacks"]] == ["rigl"]


def test_short_class_paths_resolve(tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"class_path": "ImageClassifier", "init_args": {"model": "small_cnn"}},
        "data": {"class_path": "TinyImageNetDataModule"},
        "trainer": {"callbacks": [{"class_path": "DynamicSparsityCallback"}]},
    }))
    config = print_config("--config", str(path))
    assert config["model"]["class_path"] in ("lightning_ggr.ImageClassifier",
                                             "lightning_ggr.zoo.ImageClassifier")
    assert config["data"]["class_path"].rsplit(".", 1)[1] == "TinyImageNetDataModule"
    assert config["trainer"]["callbacks"][0]["class_path"].rsplit(".", 1)[1] == (
        "DynamicSparsityCallback")


def test_bad_value_is_refused_before_training():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        LightningGGRCLI(args=["fit", *config_args("cifar100_resnet18", "ggr"),
                              "--trainer.callbacks.init_args.method", "rigl2"])
    assert exit_info.value.code != 0
    assert "rigl2" in err.getvalue()


def smoke_args(tmp_path: Path) -> list[str]:
    return ["--trainer.fast_dev_run", "true", "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false", "--data.init_args.fake_data", "true",
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
            "--data.init_args.data_dir", str(tmp_path / "data")]


# Every base config and every method overlay runs at least once; VGG16 is the heavy one.
SMOKE = [
    ("cifar100_resnet18", "dense"), ("cifar100_mobilenet_v2", "set"),
    ("tinyimagenet_resnet18", "dsr"), ("tinyimagenet_mobilenet_v2", "ggr"),
    ("cifar100_resnet18", "ggr_set"), ("tinyimagenet_mobilenet_v2", "ggr_rigl"),
    pytest.param("cifar100_vgg16", "rigl", marks=pytest.mark.slow),
    pytest.param("tinyimagenet_vgg16", "set_rigl", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("base", "method"), SMOKE)
def test_fast_dev_run_on_fake_data(tmp_path, monkeypatch, capsys, caplog, base, method):
    monkeypatch.chdir(tmp_path)  # fast_dev_run logs nothing; nothing may land in the repo
    with caplog.at_level(logging.INFO):
        cli = LightningGGRCLI(args=["fit", *config_args(base, method), *smoke_args(tmp_path)])
    trainer = cli.trainer
    assert trainer.global_step == 1
    assert trainer.datamodule.fake_data and not (tmp_path / "data").exists()
    assert {"train/loss", "val/acc", "val/acc_top5", "test/acc", "test/acc_top5"} <= set(
        cli.final_metrics)  # test_after_fit ran the test loop too
    (callback,) = [c for c in trainer.callbacks if type(c).__name__ == "DynamicSparsityCallback"]
    assert callback.method == method or (method == "dense" and callback.sparsity == 0.0)
    out = capsys.readouterr().out
    assert "Final metrics: " in out and "test/acc" in out
    # The callback's fit-end account gives the final densities; the CLI does not repeat them.
    assert "Per-layer density" not in out
    (account,) = [r.getMessage() for r in caplog.records
                  if "DynamicSparsityCallback at fit end" in r.getMessage()]
    total_row = next(line for line in account.splitlines() if "all sparse layers" in line)
    expected = 1.0 if method == "dense" else 0.1
    assert float(total_row.split("|")[-1]) == pytest.approx(expected, abs=1e-3)


@pytest.mark.slow
def test_quickstart_trains_and_reports(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        cli = LightningGGRCLI(args=["fit", "--config", str(QUICKSTART), "--trainer.max_epochs",
                                    "3", "--trainer.enable_progress_bar", "false"])
    assert cli.final_metrics["test/acc"] > 0.7  # 3 of the 10 epochs already learn the digits
    out = capsys.readouterr().out
    assert f"test/acc {cli.final_metrics['test/acc']:.4f}" in out
    assert "Per-layer density" not in out  # the callback's account has them, printed once
    (account,) = [r.getMessage() for r in caplog.records
                  if "DynamicSparsityCallback at fit end" in r.getMessage()]
    table = account.splitlines()
    assert any(line.split("|")[1].strip() == "model.features.0.weight" for line in table
               if "|" in line)
    total_row = next(line for line in table if "all sparse layers" in line)
    assert float(total_row.split("|")[-1]) == pytest.approx(0.1, abs=1e-3)
    log_dir = tmp_path / "runs" / "digits_quickstart" / "version_0"
    assert "TensorBoard logs: runs/digits_quickstart/version_0" in out
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert (log_dir / "config.yaml").exists()
    summary = json.loads((log_dir / "lightning_ggr_summary.json").read_text())
    assert summary["metrics"]["test/acc"] == pytest.approx(cli.final_metrics["test/acc"])


def test_rerun_into_the_same_log_folder(tmp_path, monkeypatch):
    # The grid names its run folders; re-running a failed run must not stop at config.yaml.
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(QUICKSTART), "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.logger.init_args.version", "fixed", "--test_after_fit", "false",
            "--trainer.callbacks.init_args.log_figures", "false",
            "--trainer.enable_progress_bar", "false"]
    for _ in range(2):
        cli = LightningGGRCLI(args=args)
        assert cli.trainer.global_step == 2
    assert (tmp_path / "runs" / "digits_quickstart" / "fixed" / "config.yaml").exists()


def test_validate_and_test_subcommands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for subcommand in ("validate", "test"):
        cli = LightningGGRCLI(args=[subcommand, "--config", str(QUICKSTART),
                                    "--trainer.fast_dev_run", "true",
                                    "--trainer.enable_progress_bar", "false"])
        stage = "val" if subcommand == "validate" else "test"
        assert f"{stage}/acc" in cli.trainer.callback_metrics


def test_num_threads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["validate", "--config", str(QUICKSTART), "--trainer.fast_dev_run", "true",
            "--trainer.enable_progress_bar", "false"]
    torch.set_num_threads(2)
    LightningGGRCLI(args=args)
    assert torch.get_num_threads() == 1  # from the quick-start config
    with pytest.raises(ValueError, match="num_threads must be >= 1, got 0"):
        LightningGGRCLI(args=[*args, "--num_threads", "0"])


def test_density_table_format():
    from torch import nn

    module = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 2))
    with torch.no_grad():
        module[0].weight[:, 5:] = 0
    table = format_density_table({"0.weight": 0.5, "1.weight": 1.0}, module)
    lines = table.splitlines()
    assert lines[1].split() == ["0.weight", "20x10", "100", "200", "0.5000"]
    assert lines[2].split() == ["1.weight", "2x20", "40", "40", "1.0000"]
    assert lines[3].split() == ["global", "140", "240", "0.5833"]


def test_report_subcommand_is_dispatched(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 1
    assert "no lightning_ggr_summary.json found" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script(tmp_path):
    script = Path(sys.executable).parent / "lightning-ggr"
    if not script.exists():
        pytest.skip("console script not installed (pip install -e .)")
    result = subprocess.run([str(script), "fit", "--help"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "--test_after_fit" in result.stdout and "--trainer.callbacks" in result.stdout


def _vectors():
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 8, generator=generator),
                                    torch.randint(0, 3, (16,), generator=generator)),
                      batch_size=8)


def _own_module_class():
    import lightning.pytorch as pl
    from torch import nn

    class OwnModule(pl.LightningModule):
        """A user's module: metric names without '/', its own dataloaders, no datamodule."""

        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

        def training_step(self, batch, batch_idx):
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.log("loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def train_dataloader(self):
            return _vectors()

        def val_dataloader(self):
            return _vectors()

    return OwnModule


OwnModule = _own_module_class()


def test_fit_of_a_users_own_module_prints_its_metrics_and_needs_no_data(tmp_path, capsys):
    """On main: `--data` was required, and `Final metrics:` was printed empty for metric
    names without a '/' prefix."""
    main(["fit", "--model", f"{__name__}.OwnModule", "--trainer.max_steps", "4",
          "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
          "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
          "--trainer.default_root_dir", str(tmp_path),
          "--trainer.callbacks", "DynamicSparsityCallback",
          "--trainer.callbacks.init_args.interval", "step",
          "--trainer.callbacks.init_args.stop_step", "3",
          "--trainer.callbacks.init_args.log_figures", "false"])
    line = next(ln for ln in capsys.readouterr().out.splitlines()
                if ln.startswith("Final metrics:"))
    shown = dict(item.rsplit(" ", 1) for item in line.removeprefix("Final metrics: ").split(", "))
    assert {"loss", "val_loss", "density"} <= set(shown)


@pytest.mark.parametrize("account", [True, False])
def test_the_cli_prints_layer_densities_once(tmp_path, capsys, caplog, account):
    """The callback's fit-end account holds each layer's final density: the CLI prints its
    own density table only when the account is turned off."""
    with caplog.at_level(logging.INFO):
        main(["fit", "--model", f"{__name__}.OwnModule", "--trainer.max_steps", "4",
              "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
              "false", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
              "--trainer.default_root_dir", str(tmp_path),
              "--trainer.callbacks", "DynamicSparsityCallback",
              "--trainer.callbacks.init_args.interval", "step",
              "--trainer.callbacks.init_args.stop_step", "3",
              "--trainer.callbacks.init_args.log_figures", "false",
              "--trainer.callbacks.init_args.fit_end_summary", str(account).lower()])
    printed_account = [r for r in caplog.records
                       if "DynamicSparsityCallback at fit end" in r.getMessage()]
    assert len(printed_account) == (1 if account else 0)
    out = capsys.readouterr().out
    assert ("Per-layer density" in out) is not account
    final = next(line for line in out.splitlines() if line.startswith("Final metrics:"))
    assert ("rewiring/count" in final) is not account  # nor the account's counts


def test_no_metric_at_all_is_said_so():
    from lightning_ggr.zoo.cli import format_metrics

    assert format_metrics({}) == "(none logged)"
    assert format_metrics({"b": 2.0, "a/x": 1.0}) == "a/x 1.0000, b 2.0000"


def _fit_quickstart_with_a_checkpoint(tmp_path, monkeypatch, *extra: str) -> LightningGGRCLI:
    monkeypatch.chdir(tmp_path)
    return LightningGGRCLI(args=[
        "fit", "--config", str(QUICKSTART), "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--trainer.enable_checkpointing", "true", "--test_after_fit", "false",
        "--trainer.callbacks.init_args.log_figures", "false",
        "--trainer.callbacks.init_args.interval", "step",
        "--trainer.callbacks.init_args.update_interval", "1",
        "--trainer.callbacks.init_args.stop_fraction", "1.0", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", *extra])


@pytest.mark.slow
def test_export_writes_the_runs_sparse_network_and_prints_its_size(tmp_path, monkeypatch,
                                                                    capsys):
    from lightning_ggr import load_sparse_model
    from lightning_ggr.zoo import build_model

    cli = _fit_quickstart_with_a_checkpoint(tmp_path, monkeypatch)
    (callback,) = [c for c in cli.trainer.callbacks if type(c).__name__ ==
                   "DynamicSparsityCallback"]
    assert callback.engine.rewirings == 2  # masks of a run that rewired
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "runs", "--output", "net.pt"])  # a run folder: its checkpoint
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "epoch=0-step=3.ckpt -> net.pt" in out
    assert "model = lightning_ggr.zoo.build_model('small_cnn', 10, 8, 1)" in out
    size = (tmp_path / "net.pt").stat().st_size
    assert f"sparse file {size / 1e6:.2f} MB" in out
    network = build_model("small_cnn", 10, 8, 1)
    masks = load_sparse_model(network, tmp_path / "net.pt")
    assert masks.keys() == {name.removeprefix("model.") for name in callback.masks}
    for name, mask in callback.masks.items():
        assert torch.equal(masks[name.removeprefix("model.")], mask.cpu())
    for name, tensor in cli.model.model.state_dict().items():
        assert torch.equal(network.state_dict()[name], tensor), name
    raw = torch.load(tmp_path / "net.pt", weights_only=True)
    assert raw["metadata"]["model"] == "small_cnn" and raw["metadata"]["sparsity"] == 0.9
    # the default output: next to the checkpoint
    with pytest.raises(SystemExit):
        main(["export", str(next(tmp_path.rglob("*.ckpt")))])
    assert len(list(tmp_path.rglob("epoch=0-step=3.sparse.pt"))) == 1


def test_export_says_what_it_cannot_export(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path)])
    assert exit_info.value.code == 1
    assert "no *.ckpt under" in capsys.readouterr().err
    torch.save({"hyper_parameters": {"lr": 0.1}, "state_dict": {}}, tmp_path / "user.ckpt")
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "user.ckpt")])
    assert "not a checkpoint of ImageClassifier with a zoo network" in capsys.readouterr().err
    torch.save({"hyper_parameters": {"model": "small_cnn", "num_classes": 10,
                                     "input_size": 8, "in_channels": 1},
                "state_dict": {}, "callbacks": {}}, tmp_path / "dense.ckpt")
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "dense.ckpt")])
    assert "no DynamicSparsityCallback state with masks" in capsys.readouterr().err
    torch.save({"hyper_parameters": {"model": "small_cnn", "num_classes": 10,
                                     "input_size": 8, "in_channels": 1},
                "state_dict": {}, "callbacks": {"DynamicSparsityCallback": {"masks": {}}}},
               tmp_path / "empty.ckpt")
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "empty.ckpt")])
    assert "do not fit the network its hyper-parameters name" in capsys.readouterr().err
