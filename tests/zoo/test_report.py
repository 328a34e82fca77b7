"""Run summaries and the results tables built from them."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ggr.callbacks.summary import (
    SUMMARY_FILENAME,
    build_run_summary,
    read_run_summary,
    write_run_summary,
)
from lightning_ggr.zoo.report import (
    PAPER_SCENARIOS,
    Cell,
    accuracies,
    collect_runs,
    extra_scenarios,
    main,
    table1,
    table1_notes,
    table2,
    table2_notes,
    table4,
    to_csv,
    to_markdown,
)

# ----------------------------------------------------------------------------- summaries


def _tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    masks = {"0.weight": torch.rand(4, 2, 3, 3) < 0.5, "3.weight": torch.rand(3, 64) < 0.2}
    masks["0.weight"][1] = False
    return model, masks


def test_build_run_summary_layout():
    model, masks = _tiny_model()
    params = dict(model.named_parameters())
    config = {"method": "ggr", "sparsity": 0.7, "distribution": "erk", "seed": 3,
              "model": "tiny", "dataset": "digits", "drop_fraction": 0.1}
    summary = build_run_summary(
        masks=masks, params=params, initial_counts={"0.weight": 30, "3.weight": 40},
        config=config, metrics={"test/acc": torch.tensor(0.5), "val/loss": float("nan")},
        module=model, example_input=torch.randn(1, 2, 4, 4),
    )
    json.dumps(summary, allow_nan=False)
    assert {k: summary[k] for k in config} == config
    active = sum(int(m.sum()) for m in masks.values())
    assert summary["global_density"] == pytest.approx(active / (72 + 192))
    assert summary["layers"]["0.weight"] == {
        "active": int(masks["0.weight"].sum()), "total": 72,
        "density": pytest.approx(int(masks["0.weight"].sum()) / 72), "initial_active": 30,
    }
    assert summary["analysis"]["overall"]["empty_neurons"] >= 1
    assert summary["analysis"]["layers"]["0.weight"]["empty_neurons"] >= 1
    assert summary["flops"] == {
        "sparse": int(masks["0.weight"].sum()) * 16 + int(masks["3.weight"].sum()),
        "dense": 72 * 16 + 192,
    }
    assert summary["metrics"] == {"test/acc": 0.5, "val/loss": None}
    assert summary["format_version"] == 1


def test_build_run_summary_without_module_and_reserved_keys():
    _, masks = _tiny_model()
    summary = build_run_summary(masks=masks, params={}, initial_counts={}, config={},
                                metrics={})
    assert "flops" not in summary
    assert summary["layers"]["3.weight"]["initial_active"] is None
    with pytest.raises(ValueError, match="reserved"):
        build_run_summary(masks=masks, params={}, initial_counts={},
                          config={"metrics": 1}, metrics={})


def test_write_and_read_run_summary(tmp_path):
    summary = {"method": "set", "sparsity": 0.9, "metrics": {"test/acc": 0.4},
               "path": Path("/x"), "shape": (1, 2)}
    written = write_run_summary(tmp_path / "run", summary)
    assert written == tmp_path / "run" / SUMMARY_FILENAME
    assert [p.name for p in written.parent.iterdir()] == [SUMMARY_FILENAME]  # no temp file
    back = read_run_summary(tmp_path / "run")
    assert back == {"method": "set", "sparsity": 0.9, "metrics": {"test/acc": 0.4},
                    "path": "/x", "shape": [1, 2]}
    explicit = write_run_summary(tmp_path / "named.json", {"a": 1})
    assert read_run_summary(explicit) == {"a": 1}
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_run_summary(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_run_summary(tmp_path / "broken.json")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_the_run_summary_gets_the_permissions_of_the_other_logs(tmp_path, umask):
    """It was written 0o600 (tempfile.mkstemp) while the logger's files were 0o644: now
    0o666 less the umask, as open() gives (issue 17, item 9)."""
    previous = os.umask(umask)
    try:
        written = write_run_summary(tmp_path / "run", {"a": 1})
        other = tmp_path / "run" / "events.log"
        other.write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(other.stat().st_mode)


# -------------------------------------------------------------------------------- tables


def _run(model, dataset, method, sparsity, distribution, seed, acc, **extra):
    run = {"model": model, "dataset": dataset, "method": method, "sparsity": sparsity,
           "distribution": distribution, "seed": seed, "metrics": {"test/acc": acc}}
    run.update(extra)
    return run


def _grid(root: Path) -> None:
    """Two scenarios; at s=0.99 uniform everyone fails on B, and rigl fails on A too."""
    runs = [
        _run("vgg", "A", "dense", 0.0, "erk", 0, 0.70),
        _run("vgg", "A", "set", 0.9, "erk", 0, 0.60),
        _run("vgg", "A", "set", 0.9, "erk", 1, 0.62),
        _run("vgg", "A", "ggr", 0.9, "erk", 0, 0.64),
        _run("vgg", "A", "set", 0.99, "uniform", 0, 0.30),
        _run("vgg", "A", "rigl", 0.99, "uniform", 0, 0.02),
        _run("vgg", "A", "ggr", 0.99, "uniform", 0, 0.40),
        _run("mnv2", "B", "dense", 0.0, "uniform", 0, 0.50),
        _run("mnv2", "B", "set", 0.9, "erk", 0, 0.40),
        _run("mnv2", "B", "ggr", 0.9, "erk", 0, 0.46),
        _run("mnv2", "B", "set", 0.99, "uniform", 0, 0.01),
        _run("mnv2", "B", "rigl", 0.99, "uniform", 0, 0.01),
        _run("mnv2", "B", "ggr", 0.99, "uniform", 0, 0.01),
    ]
    for index, run in enumerate(runs):
        run["analysis"] = {"overall": {"empty_neurons_pct": 10.0 + index,
                                       "empty_inputs_pct": 5.0, "params_star": 2_000_000}}
        run["flops"] = {"sparse": 3_000_000, "dense": 9_000_000}
        write_run_summary(root / run["dataset"] / f"run{index}", run)


@pytest.fixture
def runs(tmp_path):
    _grid(tmp_path)
    return collect_runs([tmp_path])


def test_collect_runs_finds_nested_and_dedups(tmp_path):
    _grid(tmp_path)
    found = collect_runs([tmp_path, tmp_path / "A"])
    assert len(found) == 13
    assert all(Path(r["_path"]).name == SUMMARY_FILENAME for r in found)
    single = collect_runs([tmp_path / "A" / "run0" / SUMMARY_FILENAME])
    assert single[0]["method"] == "dense"
    with pytest.raises(FileNotFoundError):
        collect_runs([tmp_path / "missing"])


def test_accuracies_scale_and_fallback():
    runs = [{"metrics": {"test/acc": 0.5}}, {"metrics": {"val/acc": 0.25}}, {"metrics": {}}]
    values, notes = accuracies(runs)
    assert values == [50.0, 25.0, None]
    assert any("used 'val/acc'" in n for n in notes)
    assert any("left out" in n for n in notes)
    assert accuracies([{"metrics": {"test/acc": 55.0}}])[0] == [55.0]
    assert accuracies([{"metrics": {"test/acc": 0.5}}], scale="percent")[0] == [0.5]
    with pytest.raises(ValueError, match="scale"):
        accuracies(runs, scale="odd")


def test_table1(runs):
    rows = table1(runs)
    assert [(r["dataset"], r["model"], r["method"]) for r in rows] == [
        ("A", "vgg", "dense"), ("A", "vgg", "set"), ("A", "vgg", "rigl"), ("A", "vgg", "ggr"),
        ("B", "mnv2", "dense"), ("B", "mnv2", "set"), ("B", "mnv2", "rigl"),
        ("B", "mnv2", "ggr"),
    ]
    assert list(rows[0])[3:] == ["s=0", "s=0.9 erk", "s=0.99 uniform"]
    set_a = rows[1]["s=0.9 erk"]
    assert isinstance(set_a, Cell)
    assert set_a.mean == pytest.approx(61.0)
    assert set_a.std == pytest.approx(math.sqrt(2.0))
    assert set_a.n == 2
    assert rows[0]["s=0"].mean == pytest.approx(70.0)
    assert rows[0]["s=0.9 erk"] == ""
    assert rows[2]["s=0.99 uniform"].failed  # rigl, 2% < 5%
    assert not rows[1]["s=0.99 uniform"].failed
    assert rows[2]["s=0.9 erk"] == ""  # rigl has no run there


def test_table2_paper_rule(runs):
    rows = {r["method"]: r for r in table2(runs, scenarios=None)}  # A, B: not the paper's
    # s=0.9 erk: average over both scenarios
    assert rows["set"]["s=0.9 erk"].mean == pytest.approx((61.0 + 40.0) / 2)
    assert rows["set"]["s=0.9 erk"].n == 2
    assert rows["ggr"]["s=0.9 erk"].mean == pytest.approx((64.0 + 46.0) / 2)
    # s=0.99 uniform: everyone failed on B -> left out; rigl failed on A where others worked
    assert rows["set"]["s=0.99 uniform"].mean == pytest.approx(30.0)
    assert rows["set"]["s=0.99 uniform"].n == 1
    assert rows["ggr"]["s=0.99 uniform"].mean == pytest.approx(40.0)
    assert rows["rigl"]["s=0.99 uniform"].failed
    assert rows["dense"]["s=0"].mean == pytest.approx(60.0)


# The paper's Table 1 (top-1 %, test set): dense, then per method the columns
# 0.9 ERK, 0.9 uni, 0.97 ERK, 0.97 uni, 0.99 ERK, 0.99 uni; None = below 5%, not reported.
PAPER_TABLE1 = {
    ("cifar100", "mobilenet_v2"): (69.15, {
        "set": (66.34, 55.31, 56.13, None, 25.75, None),
        "rigl": (67.02, 58.13, 58.96, None, 43.79, None),
        "dsr": (68.26, 65.85, 61.11, None, 37.38, None),
        "ggr": (66.79, 64.55, 60.57, None, 46.49, None)}),
    ("cifar100", "resnet18"): (76.27, {
        "set": (74.18, 71.64, 70.13, 66.64, 63.45, 57.78),
        "rigl": (74.03, 72.15, 70.65, 68.31, 65.48, 60.81),
        "dsr": (73.89, 73.47, 70.99, 70.17, 64.12, 63.77),
        "ggr": (73.34, 72.83, 70.28, 70.71, 65.12, 64.41)}),
    ("tinyimagenet", "mobilenet_v2"): (55.77, {
        "set": (53.35, 47.73, 43.00, None, None, None),
        "rigl": (55.08, 49.85, 48.23, None, None, None),
        "dsr": (54.48, 38.80, 45.06, None, None, None),
        "ggr": (55.31, 52.43, 48.16, None, None, None)}),
    ("tinyimagenet", "vgg16"): (60.88, {
        "set": (61.04, 57.44, 57.04, 52.40, 53.14, 45.34),
        "rigl": (60.31, 58.31, 55.82, 52.40, 51.28, None),
        "dsr": (59.94, 60.04, 57.13, 56.42, 53.47, None),
        "ggr": (59.04, 58.65, 57.60, 56.95, 52.89, 52.30)}),
}
# The paper's Table 2 (same columns; None = "-").
PAPER_TABLE2 = {
    "set": (63.73, 58.03, 56.58, 59.52, 47.45, 51.56),
    "rigl": (64.11, 59.61, 58.42, 60.36, 53.52, None),
    "dsr": (64.14, 59.64, 58.57, 63.30, 51.66, None),
    "ggr": (63.62, 62.11, 59.15, 63.83, 54.83, 58.36),
}
PAPER_COLUMNS = ("s=0.9 erk", "s=0.9 uniform", "s=0.97 erk", "s=0.97 uniform", "s=0.99 erk",
                 "s=0.99 uniform")


def _paper_runs() -> list[dict]:
    """The paper's Table 1 as run summaries (a failed cell: one run at 1%), plus an extra
    scenario the paper never trains (VGG16 on CIFAR-100), which Table 2 must leave out."""
    runs = []
    for (dataset, model), (dense, methods) in PAPER_TABLE1.items():
        runs.append(_run(model, dataset, "dense", 0.0, "erk", 0, dense))
        for method, values in methods.items():
            for column, value in zip(PAPER_COLUMNS, values, strict=True):
                sparsity, distribution = column[2:].split()
                runs.append(_run(model, dataset, method, float(sparsity), distribution, 0,
                                 1.0 if value is None else value))
    for method in ("dense", "set", "rigl", "dsr", "ggr"):  # far off the paper's averages
        runs.append(_run("vgg16", "cifar100", method, 0.0 if method == "dense" else 0.9, "erk",
                         0, 10.0))
    return runs


def test_table2_reproduces_the_papers_table2_from_its_table1():
    runs = _paper_runs()
    rows = {r["method"]: r for r in table2(runs)}
    # Dense: (69.15 + 76.27 + 55.77 + 60.88) / 4 = 65.5175, the paper's 65.52.
    assert rows["dense"]["s=0"].mean == pytest.approx(65.52, abs=0.006)
    assert rows["dense"]["s=0"].n == 4
    for method, expected in PAPER_TABLE2.items():
        for column, value in zip(PAPER_COLUMNS, expected, strict=True):
            cell = rows[method][column]
            if value is None:  # RigL and DSR failed VGG16 at 99% uniform where SET, GGR worked
                assert cell.failed, (method, column)
            elif (method, column) == ("dsr", "s=0.9 uniform"):
                # The paper's own inconsistency: its Table 1 gives
                # (65.85 + 73.47 + 38.80 + 60.04) / 4 = 59.54, its Table 2 prints 59.64.
                assert cell.mean == pytest.approx(59.54, abs=1e-9)
            else:  # 0.006: the paper rounds half-way values up (58.415 -> 58.42, 58.355 -> 58.36)
                assert cell.mean == pytest.approx(value, abs=0.006), (method, column, cell.mean)
    # Both MobileNetV2 scenarios failed for every method at 97% uniform: 2 scenarios averaged.
    assert rows["ggr"]["s=0.97 uniform"].n == 2 and rows["ggr"]["s=0.99 erk"].n == 3
    notes = table2_notes(runs)
    assert notes[0] == ("Averaged over cifar100/mobilenet_v2, cifar100/resnet18, "
                        "tinyimagenet/mobilenet_v2, tinyimagenet/vgg16 (the paper's Table 2 "
                        "scenarios).")
    assert ("Not in the paper's Table 2, left out: cifar100/vgg16 (5 runs) "
            "(--table2-scenarios all averages every scenario).") in notes
    assert ("s=0.97 uniform: cifar100/mobilenet_v2, tinyimagenet/mobilenet_v2 left out "
            "(every method failed).") in notes
    assert "s=0.99 erk: tinyimagenet/mobilenet_v2 left out (every method failed)." in notes
    # With every scenario, the extra pulls the 0.9 ERK averages down.
    everything = {r["method"]: r for r in table2(runs, scenarios=None)}
    assert everything["ggr"]["s=0.9 erk"].n == 5
    assert everything["ggr"]["s=0.9 erk"].mean < rows["ggr"]["s=0.9 erk"].mean - 10
    assert extra_scenarios(runs) == [("cifar100", "vgg16")]
    assert table1_notes(runs) == ["Not in the paper's Table 1 (extras): cifar100/vgg16."]
    assert len(PAPER_SCENARIOS) == 4 and set(PAPER_SCENARIOS) == set(PAPER_TABLE1)
    with pytest.raises(TypeError, match="scenarios must be None or a sequence"):
        table2(runs, scenarios="paper")


def test_table4(runs):
    rows = table4(runs)
    assert all(r["method"] != "dense" for r in rows)
    first = rows[0]
    assert list(first) == ["dataset", "model", "method", "sparsity", "init", "top-1 acc",
                           "empty neurons %", "empty inputs %", "Params* [M]", "MFLOPs"]
    assert (first["dataset"], first["method"], first["sparsity"]) == ("A", "set", "0.9")
    assert first["top-1 acc"].mean == pytest.approx(61.0)
    assert first["empty neurons %"].mean == pytest.approx(11.5)  # runs 1 and 2
    assert first["Params* [M]"].mean == pytest.approx(2.0)
    assert first["MFLOPs"].mean == pytest.approx(3.0)
    failed = next(r for r in rows if r["method"] == "rigl" and r["dataset"] == "A")
    assert failed["top-1 acc"].failed and not failed["empty neurons %"].failed


def test_markdown_and_csv_formats(runs):
    rows = table1(runs)
    markdown = to_markdown(rows)
    lines = markdown.splitlines()
    assert lines[0] == "| dataset | model | method | s=0 | s=0.9 erk | s=0.99 uniform |"
    assert "| A | vgg | set |  | 61.00 ± 1.41 (n=2) | 30.00 |" in lines
    assert "| A | vgg | rigl |  |  | - |" in lines
    table = list(csv.reader(io.StringIO(to_csv(rows))))
    assert table[0][:6] == ["dataset", "model", "method", "s=0", "s=0 std", "s=0 n"]
    set_row = next(r for r in table if r[:3] == ["A", "vgg", "set"])
    assert set_row[6:9] == ["61.0000", "1.4142", "2"]
    rigl_row = next(r for r in table if r[:3] == ["A", "vgg", "rigl"])
    assert rigl_row[9:12] == ["-", "", "1"]
    assert to_markdown([]) == "(no runs)\n"
    assert Cell(12.0, None, 3).text() == "12.00 (n=3)"


def test_main_prints_and_writes(tmp_path, capsys):
    _grid(tmp_path / "runs")
    assert main([str(tmp_path / "runs"), "--output", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "## Table 1" in captured.out and "## Table 2" in captured.out
    assert "## Table 4" in captured.out
    assert "13 run(s) found" in captured.err
    assert "fractions" in captured.err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["table1.csv", "table1.md", "table2.csv", "table2.md", "table4.csv",
                     "table4.md"]
    # Scenarios A/vgg and B/mnv2 are not the paper's: Table 2 is empty by default, and says so.
    assert "No run of these scenarios: Table 2 is empty" in captured.out
    assert "Not in the paper's Table 2, left out: A/vgg (7 runs), B/mnv2 (6 runs)" in (
        tmp_path / "out" / "table2.md").read_text()
    assert main([str(tmp_path / "runs"), "--format", "csv", "--tables", "table2",
                 "--table2-scenarios", "all"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("# table2\nmethod,")
    assert "note: table2: Averaged over every scenario found: A/vgg, B/mnv2." in captured.err


def test_main_metric_fallback_and_errors(tmp_path, capsys):
    write_run_summary(tmp_path / "r", _run("m", "d", "ggr", 0.9, "erk", 0, None)
                      | {"metrics": {"val/acc": 0.5}})
    assert main([str(tmp_path)]) == 0
    assert "used 'val/acc'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    assert "no lightning_ggr_summary.json found" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 1


def test_python_dash_m_entry_point(tmp_path):
    _grid(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "lightning_ggr.zoo.report", str(tmp_path), "--tables", "table1"],
        capture_output=True, text=True, check=False, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "## Table 1" in result.stdout


def test_a_run_without_accuracy_is_where_the_note_says(tmp_path, capsys):
    """On main the note said "left out", yet Table 1 listed the run with an empty cell."""
    write_run_summary(tmp_path / "with", _run("netA", "d", "ggr", 0.9, "erk", 0, 0.5))
    write_run_summary(tmp_path / "without", _run("netB", "d", "ggr", 0.9, "erk", 0, None)
                      | {"metrics": {"train/loss": 1.0}})
    assert main([str(tmp_path), "--tables", "table1", "table2", "table4",
                 "--table2-scenarios", "all"]) == 0  # d/netA is not one of the paper's
    captured = capsys.readouterr()
    assert ("1 run(s) have no accuracy ('test/acc' or 'val/acc'): left out of Tables 1 and 2, "
            "listed in Table 4 without accuracy") in captured.err
    table1, table2, table4 = captured.out.split("## Table ")[1:]
    assert "netA" in table1 and "netB" not in table1
    assert next(line for line in table2.splitlines() if "ggr" in line) == "| ggr | 50.00 |"
    assert "Averaged over every scenario found: d/netA." in table2  # netB has no accuracy
    row = next(line for line in table4.splitlines() if "netB" in line)
    assert row.split("|")[6].strip() == ""  # the accuracy cell


# ------------------------------------------------------------------ a resumed run counts once


def test_report_counts_a_resumed_run_once(tmp_path, capsys, single_thread):
    """A run resumed for more epochs writes one summary per fit (a new logger version each);
    both carry the run_id kept in the checkpoint, and the report counts the run once, with
    its latest summary (not as two seeds, n=2), and says so."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lightning_ggr import DynamicSparsityCallback
    from tests.helpers.setups import MLP, loader

    class WithAccuracy(MLP):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    for epochs, ckpt in [(2, None), (4, tmp_path / "ckpt" / "last.ckpt")]:
        torch.manual_seed(0)
        trainer = pl.Trainer(
            default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=epochs,
            callbacks=[DynamicSparsityCallback(sparsity=0.8, log_figures=False,
                                               selection_summary=False),
                       ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
            logger=CSVLogger(tmp_path / "runs"), enable_progress_bar=False,
            enable_model_summary=False)
        with pytest.warns(UserWarning):
            trainer.fit(WithAccuracy(), loader(), loader(), ckpt_path=ckpt)
    summaries = collect_runs([tmp_path / "runs"], latest_only=False)
    assert len(summaries) == 2 and summaries[0]["run_id"] == summaries[1]["run_id"]
    runs = collect_runs([tmp_path / "runs"])
    assert [run["_path"] for run in runs] == [summaries[1]["_path"]]  # the latest fit's
    capsys.readouterr()
    assert main([str(tmp_path / "runs"), "--tables", "table1"]) == 0
    out, err = capsys.readouterr()
    assert "(n=2)" not in out
    assert "1 summary file(s) are earlier fits of a resumed run" in err


# ------------------------------------------------- a user's own module names no dataset
def test_a_run_of_a_users_own_module_shows_no_literal_none(tmp_path, capsys, single_thread):
    """A LightningModule fitted on dataloaders passed to fit (no DataModule, no
    dataset_name): its summary's dataset is null, and the tables printed a literal 'None'
    (issue 17, item 9). Now '?', with a note saying how to name it."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from lightning_ggr import DynamicSparsityCallback
    from tests.helpers.setups import MLP, loader

    class WithAccuracy(MLP):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    torch.manual_seed(0)
    pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=2,
               callbacks=[DynamicSparsityCallback(sparsity=0.8, log_figures=False,
                                                  selection_summary=False,
                                                  fit_end_summary=False)],
               logger=CSVLogger(tmp_path / "runs"), enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False,
               ).fit(WithAccuracy(), loader(), loader())
    (run,) = collect_runs([tmp_path / "runs"])
    assert run["dataset"] is None and run["model"] == "WithAccuracy"
    capsys.readouterr()
    assert main([str(tmp_path / "runs")]) == 0
    out, err = capsys.readouterr()
    assert "None" not in out
    assert "| ? | WithAccuracy | ggr |" in out
    assert ("1 run(s) name no dataset (shown as '?'): give them a `dataset_name` attribute "
            "on the LightningModule or DataModule") in err
