"""Run summaries and the results tables built from them."""

from __future__ import annotations

import csv
import io
import json
import math
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
    Cell,
    accuracies,
    collect_runs,
    main,
    table1,
    table2,
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
    rows = {r["method"]: r for r in table2(runs)}
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
    assert main([str(tmp_path / "runs"), "--format", "csv", "--tables", "table2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# table2\nmethod,")


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
    assert main([str(tmp_path), "--tables", "table1", "table2", "table4"]) == 0
    captured = capsys.readouterr()
    assert ("1 run(s) have no accuracy ('test/acc' or 'val/acc'): left out of Tables 1 and 2, "
            "listed in Table 4 without accuracy") in captured.err
    table1, table2, table4 = captured.out.split("## Table ")[1:]
    assert "netA" in table1 and "netB" not in table1
    assert next(line for line in table2.splitlines() if "ggr" in line) == "| ggr | 50.00 |"
    row = next(line for line in table4.splitlines() if "netB" in line)
    assert row.split("|")[6].strip() == ""  # the accuracy cell
