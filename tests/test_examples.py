"""The example scripts: adding the callback to a Trainer, and the Table-1 grid runner."""

import contextlib
import importlib.util
import io
import logging
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from lightning_ggr.zoo.cli import LightningGGRCLI

pytestmark = pytest.mark.usefixtures("single_thread")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_add_to_your_trainer(tmp_path, capsys, caplog):
    example = load_example("add_to_your_trainer")
    with caplog.at_level(logging.INFO):
        densities = example.main(["--epochs", "1", "--root-dir", str(tmp_path)])
    assert set(densities) == {"net.0.weight", "net.4.weight", "net.8.weight", "net.10.weight"}
    out = capsys.readouterr().out
    # 22 steps, stop at step 11: one rewiring at step 10
    assert "val_acc" in out and "rewirings 1 of 1 planned" in out
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("DynamicSparsityCallback schedule: rewiring every 10 steps")
               for m in messages)
    assert any(m.startswith("DynamicSparsityCallback at fit end") and "net.8.weight" in m
               for m in messages)
    assert list(tmp_path.rglob("events.out.tfevents.*"))  # the Trainer's own logger


def dry_run(*args: str) -> list[list[str]]:
    example = load_example("run_table1_grid")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert example.main(["--dry-run", *args]) == 0
    return [shlex.split(line) for line in out.getvalue().splitlines()]


def test_grid_dry_run_prints_table1(capsys):
    commands = dry_run()
    # The paper's 4 pairs x (4 sparse methods x 3 sparsities x 2 distributions + 1 dense run)
    assert len(commands) == 4 * (4 * 3 * 2 + 1) == 100
    assert all(command[:2] == ["lightning-ggr", "fit"] for command in commands)
    versions = [command[command.index("--trainer.logger.init_args.version") + 1]
                for command in commands]
    names = [command[command.index("--trainer.logger.init_args.name") + 1]
             for command in commands]
    assert len(set(zip(names, versions, strict=True))) == 100  # every run has its own folder
    # The default grid is the paper's Table 1: no extra pair, no "not in the paper" note.
    assert sorted(set(names)) == ["table1/cifar100_mobilenet_v2", "table1/cifar100_resnet18",
                                  "table1/tinyimagenet_mobilenet_v2", "table1/tinyimagenet_vgg16"]
    assert "not in the paper" not in capsys.readouterr().err
    assert "ggr_uniform_s0.97_seed0" in versions and "dense_seed0" in versions
    for command in commands:
        configs = [command[i + 1] for i, arg in enumerate(command) if arg == "--config"]
        assert len(configs) == 2
        assert all(Path(config).exists() or (Path.cwd() / config).exists()
                   for config in configs)


def test_grid_options_and_extra_arguments(capsys):
    commands = dry_run("--pairs", "cifar100_vgg16", "--methods", "ggr_set", "--sparsities",
                       "0.99", "--distributions", "uniform", "--seeds", "1", "2", "--",
                       "--trainer.max_epochs", "1")
    assert len(commands) == 2
    assert ("note: cifar100_vgg16 is not in the paper's grid (an extra; report leaves it out "
            "of Table 2)") in capsys.readouterr().err
    assert commands[1][-2:] == ["--trainer.max_epochs", "1"]
    assert commands[1][commands[1].index("--trainer.callbacks.init_args.seed") + 1] == "2"


def test_grid_command_parses_with_its_overrides(monkeypatch):
    command = next(c for c in dry_run("--pairs", "tinyimagenet_resnet18")
                   if "rigl_uniform_s0.99_seed0" in c)
    monkeypatch.setattr(sys, "argv", ["lightning-ggr"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        LightningGGRCLI(args=[*command[1:], "--print_config"])
    config = yaml.safe_load(out.getvalue())
    (callback,) = config["trainer"]["callbacks"]
    wanted = {"method": "rigl", "sparsity": 0.99, "distribution": "uniform", "seed": 0}
    assert {key: callback["init_args"][key] for key in wanted} == wanted
    assert config["trainer"]["logger"]["init_args"]["name"] == "table1/tinyimagenet_resnet18"


def test_grid_skips_finished_runs(tmp_path, monkeypatch, capsys):
    example = load_example("run_table1_grid")
    calls = []
    monkeypatch.setattr(example.subprocess, "run",
                        lambda args, check: calls.append(args) or type("R", (), {"returncode": 0}))
    done = tmp_path / "table1" / "cifar100_resnet18" / "dense_seed0"
    done.mkdir(parents=True)
    (done / "lightning_ggr_summary.json").write_text("{}")
    code = example.main(["--pairs", "cifar100_resnet18", "--methods", "dense", "ggr",
                         "--sparsities", "0.9", "--distributions", "erk", "--skip-existing",
                         "--save-dir", str(tmp_path)])
    assert code == 0
    assert len(calls) == 1 and calls[0][1:4] == ["-m", "lightning_ggr.zoo.cli", "fit"]
    assert "done already" in capsys.readouterr().out


def test_the_plain_pytorch_loop_of_the_usage_guide_runs_as_written():
    """docs/usage.md "Without Lightning": the code block, run as written, keeps one step
    counter over all epochs (a per-epoch batch index would restart the schedule's clock)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    section = text[text.index("## Without Lightning"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[:code.index("```")]
    namespace: dict = {}
    exec(compile(code, "docs/usage.md", "exec"), namespace)
    engine = namespace["engine"]
    assert namespace["step"] == 80
    assert engine.rewirings == 5  # steps 10, 20, ..., 50: before the stop at 60
    for name, param in engine.params.items():
        assert int((param.detach()[~engine.masks[name]] != 0).sum()) == 0, name
