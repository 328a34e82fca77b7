"""The study script (``benchmarks/study.py``): the ResNet-18 study at a tiny CPU setting, and
every report regenerated from raw records alone. Fake data only: the tests never read
``../shared``."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_thread")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCHMARKS))  # study.py imports study_data from there
    spec = importlib.util.spec_from_file_location("study", BENCHMARKS / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("study", None)
    sys.path.remove(str(BENCHMARKS))


def fake_cifar(path: Path, per_class: int = 12, test_per_class: int = 1) -> Path:
    """A stand-in for cifar100_subset.npz: random images, 100 classes (never the real data)."""
    rng = np.random.default_rng(0)
    n, m = 100 * per_class, 100 * test_per_class
    np.savez(path, x_train=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
             y_train=np.repeat(np.arange(100), per_class),
             x_test=rng.integers(0, 256, (m, 32, 32, 3), dtype=np.uint8),
             y_test=np.repeat(np.arange(100), test_per_class))
    return path


def outputs(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.suffix != ".png"}


@pytest.mark.slow
def test_resnet18_study_tiny_cpu(study, tmp_path, capsys):
    """The GPU study's command at a tiny CPU setting: zoo ResNet-18, epoch rewiring, bf16,
    records and tables; then the same tables again from the raw records alone."""
    data = fake_cifar(tmp_path / "fake.npz")
    common = ["--network", "resnet18", "--data", str(data), "--out", str(tmp_path / "runs"),
              "--results", str(tmp_path / "results"), "--seeds", "1", "--epochs", "4",
              "--batch-size", "4", "--limit-batches", "1", "--precision", "bf16-mixed"]
    study.main(["run", "--workers", "0", "--device", "cpu", *common])
    study.main(["report", *common])

    results = study.load_results(tmp_path / "runs")
    assert sorted(results) == sorted(s.key for s in study.resnet18_grid(1))
    assert {r["status"] for r in results.values()} == {"ok"}
    ggr = results["ggr-uniform-s0.99-seed0"]
    recipe = ggr["recipe"]
    assert (recipe["network"], recipe["interval"], recipe["precision"]) == (
        "resnet18", "epoch", "bf16-mixed")
    assert recipe["milestones"] == [1, 2, 3] and recipe["warmup_epochs"] == 1
    assert ggr["rewirings"] == 1  # at the start of epoch 1 (of 4), before half of training
    assert len(ggr["layer_densities"]) == 21  # 20 convs + fc of ResNet-18
    assert ggr["device"].startswith("cpu") and ggr["versions"]["torch"] == torch.__version__
    dsr = results["dsr-uniform-s0.99-seed0"]
    assert dsr["layer_densities"] != results["set-uniform-s0.99-seed0"]["layer_densities"]

    records = json.loads((tmp_path / "results" / "runs_resnet18.json").read_text())
    assert len(records["runs"]) == 5
    for record in records["runs"]:
        active = sum(v["active"] for v in record["layers"].values())
        total = sum(v["total"] for v in record["layers"].values())
        expected = total if record["method"] == "dense" else round(0.01 * total)
        assert active == expected  # the raw records recompute the global density
        assert record["structure"]["total"] == total == 11_210_432
        assert record["workers"] == 0 and record["torch_threads"] == 1
    table = (tmp_path / "results" / "resnet18_table.md").read_text()
    assert "| 0.99 uni | GGR |" in table and "64.41" in table  # the paper's number beside ours
    assert "the paper GGR 64.41 > DSR 63.77 > RigL 60.81 > SET 57.78" in table
    assert (tmp_path / "results" / "resnet18_figure2_ggr.png").is_file()
    assert "5 finished runs, 0 failed" in capsys.readouterr().out

    # No run directories: the same tables and records from runs_resnet18.json alone.
    shutil.rmtree(tmp_path / "runs")
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(tmp_path / "results" / "runs_resnet18.json", again)
    study.main(["report", "--network", "resnet18", "--out", str(tmp_path / "runs"),
                "--results", str(again), "--seeds", "1"])
    assert outputs(again) == outputs(tmp_path / "results")
    assert (again / "resnet18_figure2_ggr.png").is_file()


def test_augment_batch_keeps_each_image_a_shifted_or_flipped_crop(study):
    from study_data import augment_batch

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    out = augment_batch(x, torch.Generator().manual_seed(0), padding=1)
    assert out.shape == x.shape and out.device == x.device
    # Every output image is a shifted (and maybe flipped) crop of its own zero-padded input.
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):
        crops = [padded[i, :, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)]
        crops += [c.flip(-1) for c in crops]
        assert any(torch.equal(out[i], c) for c in crops)


def test_data_module_serves_whole_batches_as_a_per_image_loader_would(study, tmp_path):
    """Evaluation batches are sliced whole (the ResNet-18 study keeps the images on the GPU,
    where one gather per image would be slow) and hold the same images, in the same order,
    as per-image loading; training batches come out whole, on the images' device."""
    from study_data import CifarSubsetDataModule
    from torch.utils.data import DataLoader

    data = CifarSubsetDataModule(fake_cifar(tmp_path / "fake.npz", per_class=3), val_size=100,
                                 batch_size=32, eval_batch_size=64)
    data.setup()
    per_image = list(DataLoader(data.val_set, batch_size=64, shuffle=False))
    batches = list(data.val_dataloader())
    assert [len(y) for _, y in batches] == [64, 36]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(per_image, batches, strict=True))
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and y.shape == (32,) and x.device == y.device


# ------------------------------------------------------------- reports from raw records
LAYERS = {"model.0.weight": 432, "model.4.weight": 4608, "model.13.weight": 16384}


def _record(key: str, method: str, sparsity: float, distribution: str, seed: int,
            acc: float, active: dict[str, int] | None = None) -> dict:
    """A raw record as ``report`` writes it (status ok, with per-layer data)."""
    initial = {n: (t if method == "dense" else max(1, round((1 - sparsity) * t)))
               for n, t in LAYERS.items()}
    active = active or initial
    return {
        "key": key, "method": method, "sparsity": sparsity, "distribution": distribution,
        "seed": seed, "status": "ok", "test_acc": acc, "val_acc": acc, "wall_s": 50.0 + seed,
        "fit_s": 45.0, "rewirings": 10, "workers": 1, "torch_threads": 1,
        "device": "cpu (test)", "versions": {"torch": "t", "lightning": "l", "python": "p"},
        "recipe": {"epochs": 6}, "error": None,
        "layer_densities": {n: active[n] / t for n, t in LAYERS.items()},
        "dataset": "cifar100_subset", "model": "ImageClassifier",
        "flops": {"sparse": 1000, "dense": 9000},
        "layers": {n: {"total": t, "initial_active": initial[n], "active": active[n]}
                   for n, t in LAYERS.items()},
        "structure": {"total": sum(LAYERS.values()), "empty_neurons_pct": 10.0 + seed,
                      "empty_inputs_pct": 5.0, "params_star": 1000 * (seed + 1)},
    }


def _records(study, sparsity: float, accuracies: dict[str, tuple[float, ...]]) -> list[dict]:
    runs = []
    for method, values in accuracies.items():
        for seed, acc in enumerate(values):
            distributions = ("erk",) if method == "dense" else ("uniform", "erk")
            for distribution in distributions:
                spec = study.RunSpec(method, 0.0 if method == "dense" else sparsity,
                                     distribution, seed)
                moved = ({"model.0.weight": 200, "model.4.weight": 1000, "model.13.weight": 54}
                         if method == "ggr" else None)
                runs.append(_record(spec.key, method, spec.sparsity, distribution, seed, acc,
                                    moved))
    return runs


def test_report_regenerates_every_table_from_raw_records(study, tmp_path, capsys):
    """``report`` with no run directory reads ``runs.json`` and rewrites every table, the
    per-seed margins beside the paired means, and the same ``runs.json``."""
    results = tmp_path / "results"
    results.mkdir()
    records = _records(study, 0.99, {"dense": (0.25, 0.26), "ggr": (0.0475, 0.05),
                                     "set": (0.0350, 0.0125), "rigl": (0.02, 0.0325)})
    records += _records(study, 0.97, {"ggr": (0.10, 0.12), "set": (0.09, 0.10)})
    records.append({"key": "dsr-uniform-s0.99-seed0", "method": "dsr", "sparsity": 0.99,
                    "distribution": "uniform", "seed": 0, "status": "failed",
                    "test_acc": None, "error": "RuntimeError: boom"})
    payload = {"timing": {}, "runs": sorted(records, key=lambda r: r["key"])}
    (results / "runs.json").write_text(json.dumps(payload))
    common = ["--out", str(tmp_path / "no_runs"), "--results", str(results)]
    study.main(["report", *common])
    captured = capsys.readouterr()
    assert "tables from the raw records" in captured.err
    written = outputs(results)
    assert set(written) == {"runs.json", "table1.md", "paired_099.md", "final_densities.md",
                            "table4.md", "figure2_ggr_uniform_099.md"}
    assert (results / "figure2_ggr_uniform_099.png").is_file()
    paired = written["paired_099.md"]
    # GGR - SET: +1.25 and +3.75 per seed, beside their mean 2.50 ± 1.77.
    assert "| SET | 2.50 ± 1.77 (GGR ahead 2/2) | +1.25 / +3.75 |" in paired
    assert "| RigL | 2.25 ± 0.71 (GGR ahead 2/2) | +2.75 / +1.75 |" in paired
    # conv1 at 99% uniform: 4 of 432 weights at first; SET and RigL keep them, GGR has 200.
    assert "| `model.0.weight` (432) | 0.0093 | 0.0093 | 0.0093 | - | 0.4630 |" in written[
        "final_densities.md"]
    assert "| GGR |" in written["table4.md"] and "10.5 ± 0.7" in written["table4.md"]
    assert "1 failed (dsr-uniform-s0.99-seed0)" in written["table1.md"]
    assert "lightning_ggr.zoo.report.table1" in written["table1.md"]  # the cross-check
    rewritten = json.loads(written["runs.json"])
    assert rewritten["runs"] == payload["runs"]  # the records survive a report unchanged
    assert rewritten["timing"]["failed"] == ["dsr-uniform-s0.99-seed0"]

    # A second report from the rewritten records gives the very same files.
    study.main(["report", *common])
    assert outputs(results) == written

    # --records reads a file even where run directories would be.
    other = tmp_path / "other"
    study.main(["report", "--records", str(results / "runs.json"), "--results", str(other)])
    assert outputs(other) == written


def test_wide_report_from_raw_records(study, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    records = _records(study, 0.99, {"dense": (0.25, 0.26, 0.27),
                                     "ggr": (0.0995, 0.0955, 0.0990),
                                     "rigl": (0.0505, 0.0415, 0.0355),
                                     "set": (0.021, 0.021, 0.030),
                                     "dsr": (0.0295, 0.030, 0.024)})
    (results / "runs_wide.json").write_text(json.dumps({"timing": {}, "runs": records}))
    study.main(["report", "--network", "wide", "--out", str(tmp_path / "none"),
                "--results", str(results)])
    table = (results / "wide_table.md").read_text()
    assert "| RigL | 5.55 ± 0.74 (GGR ahead 3/3) | +4.90 / +5.40 / +6.35 |" in table
    assert "Settings below the 5% line: SET ERK, SET uni, RigL ERK, RigL uni, DSR ERK, " \
           "DSR uni." in table
    assert "one run at a time, 1 thread each, on cpu (test); torch t, lightning l, " \
           "python p" in table
    assert (results / "wide_figure2_ggr_uniform_099.png").is_file()
    assert json.loads((results / "runs_wide.json").read_text())["runs"] == sorted(
        records, key=lambda r: r["key"])
    capsys.readouterr()


def test_report_without_runs_or_records_says_what_to_do(study, tmp_path):
    with pytest.raises(SystemExit, match=r"no finished run under .* and no raw records at"):
        study.main(["report", "--out", str(tmp_path / "none"),
                    "--results", str(tmp_path / "empty")])


def test_records_without_layer_data_leave_those_tables_alone(study, tmp_path, capsys):
    """The records committed before they held per-layer data: Table 1 and the paired table
    are rewritten, the density and structure tables are not overwritten with blanks."""
    results = tmp_path / "results"
    results.mkdir()
    old = [{k: r[k] for k in ("key", "method", "sparsity", "distribution", "seed", "status",
                               "test_acc", "val_acc", "wall_s", "rewirings", "error")}
           for r in _records(study, 0.99, {"dense": (0.2,), "ggr": (0.05,), "set": (0.03,)})]
    (results / "runs.json").write_text(json.dumps({"timing": {}, "runs": old}))
    (results / "table4.md").write_text("kept")
    study.main(["report", "--out", str(tmp_path / "none"), "--results", str(results)])
    assert "hold no per-layer data" in capsys.readouterr().err
    assert (results / "table4.md").read_text() == "kept"
    assert not (results / "final_densities.md").exists()
    assert "| SET | 2.00 (GGR ahead 1/1) | +2.00 |" in (results / "paired_099.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--settings", "0.99:uniformm"], "expected SPARSITY:DIST"),
    (["--seeds", "0"], "expected an integer >= 1"),
    (["--workers", "-1"], "expected an integer >= 0"),
])
def test_bad_study_arguments_are_refused(study, capsys, argv, message):
    with pytest.raises(SystemExit):
        study.main(["status", "--network", "resnet18", *argv])
    assert message in capsys.readouterr().err
