"""The study's grid that accumulates across GPU windows (issue 20): the priority plan, the
deadline, the records file (atomic, locked, never losing a finished run), runs in a pool
worker training exactly as in a fresh process, the claims with their intervals, and the
prepared GPU script. CPU only, fake images; never ``../shared``."""

import argparse
import datetime
import importlib.util
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_study import BENCHMARKS, fake_cifar

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = BENCHMARKS.parent


@pytest.fixture(scope="module")
def plan():
    sys.path.insert(0, str(BENCHMARKS))
    import study_plan

    yield study_plan
    sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCHMARKS))  # study.py imports study_data, study_plan from there
    spec = importlib.util.spec_from_file_location("study", BENCHMARKS / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module  # its dataclasses look their module up (and pickle by it)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("study", None)
    sys.path.remove(str(BENCHMARKS))


def tiny_args(data: Path) -> list[str]:
    """The tiny network's grid at a few steps per run (about a second a run)."""
    return ["--data", str(data), "--epochs", "2", "--limit-batches", "7", "--batch-size", "8"]


# ------------------------------------------------------------------------------ the plan
def test_the_paper_plan_is_the_issues_priority_order(plan):
    runs = plan.paper_plan()
    groups = [g for g, _ in runs]
    assert [groups.count(g) for g in "abcde"] == [25, 24, 9, 24, 15]
    assert groups == sorted(groups)  # (a) before (b) before ... (e)
    keys = [s.key for _, s in runs]
    assert len(set(keys)) == len(keys) == 97
    # (a) first, seed by seed, with the committed records' keys for seeds 0 and 1.
    assert keys[:6] == ["dense-seed0", "ggr-uniform-s0.99-seed0", "dsr-uniform-s0.99-seed0",
                        "rigl-uniform-s0.99-seed0", "set-uniform-s0.99-seed0", "dense-seed1"]
    assert {s.seed for g, s in runs if g == "a"} == set(range(5))
    assert {(s.sparsity, s.distribution) for g, s in runs if g == "b"} == {
        (0.97, "uniform"), (0.99, "erk")}
    assert {s.method for g, s in runs if g == "c"} == {"ggr_set", "ggr_rigl", "set_rigl"}
    assert {(s.sparsity, s.distribution) for g, s in runs if g == "d"} == {
        (0.9, "erk"), (0.9, "uniform")}
    mobile = [s for g, s in runs if g == "e"]
    assert {s.network for s in mobile} == {"mobilenet_v2"}
    assert mobile[1].key == "mobilenet_v2-ggr-erk-s0.99-seed0"
    assert all(max(s.seed for g2, s in runs if g2 == g) == 2 for g in "bcde")


def test_deadlines_as_seconds_or_wall_clock(plan):
    now = datetime.datetime(2026, 12, 7, 14, 0, 0).timestamp()
    assert plan.parse_deadline("540", now) == now + 540
    assert plan.parse_deadline("540s", now) == now + 540
    assert plan.parse_deadline("9m", now) == now + 540
    assert plan.parse_deadline("1h", now) == now + 3600
    assert plan.parse_deadline("14:30", now) == now + 1800
    assert plan.parse_deadline("14:09:30", now) == now + 570
    assert plan.parse_deadline("2026-12-07T15:00", now) == now + 3600
    for text, message in (("13:59", "already past"), ("0", "in the future"),
                          ("-5", "in the future"), ("soon", "expected a deadline")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            plan.parse_deadline(text, now)


def record(wall: float, workers: int = 1, epoch_s=None, network="resnet18", epochs=40,
           status="ok") -> dict:
    return {"status": status, "wall_s": wall, "workers": workers, "epoch_s": epoch_s,
            "recipe": {"network": network, "epochs": epochs}}


def test_expected_run_time_from_measured_runs(plan):
    expect = plan.expected_seconds
    # Old records (no epoch times): the slowest wall time, times the margin.
    history = [record(40.0, 0), record(45.0, 0), record(900.0, status="failed")]
    assert expect("resnet18", history, 1, 40, margin=1.0) == 45.0
    assert expect("resnet18", history, 1, 40, margin=1.25) == 56.25
    # Another concurrency, not measured: as if runs sharing the device gained nothing.
    assert expect("resnet18", history, 8, 40, margin=1.0) == 360.0
    # A 3-epoch probe at 8: time outside the epochs + 40 x its slowest epoch after the first.
    probe = record(14.0, 8, epoch_s=[5.0, 2.0, 2.5], epochs=3)
    assert expect("resnet18", [*history, probe], 8, 40, margin=1.0) == 14.0 - 9.5 + 100.0
    # An unmeasured network: ResNet-18's time scaled by its relative cost, else a fallback.
    assert expect("mobilenet_v2", history, 1, 40, margin=1.0) == 45.0 * 2.5
    assert expect("resnet18", [], 2, 40, margin=1.0, fallback_s=100.0) == 200.0


# ---------------------------------------------------------------------- runs and records
def test_a_deadline_starts_only_runs_expected_to_finish(study, tmp_path, capsys):
    data = fake_cifar(tmp_path / "fake.npz")
    records = tmp_path / "records.json"
    slow = tmp_path / "slow.json"  # a measured run of this grid that took 500 s
    slow.write_text(json.dumps({"runs": [{**record(500.0, 1, epochs=2), "key": "x",
                                          "recipe": {"network": "tiny_vgg", "epochs": 2}}]}))
    study.main(["run", "--workers", "0", "--out", str(tmp_path / "runs"), "--records-out",
                str(records), "--deadline", "60", "--history", str(slow), *tiny_args(data)])
    out = capsys.readouterr().out
    assert "not started, expected to end after the deadline: 73 run(s)" in out
    assert not records.exists() and not (tmp_path / "runs").exists()

    # With time enough, the first runs of the grid start; each finished run is in the file.
    study.main(["run", "--workers", "0", "--out", str(tmp_path / "runs"), "--records-out",
                str(records), "--deadline", "10m", "--max-runs", "2", *tiny_args(data)])
    runs = json.loads(records.read_text())["runs"]
    assert [r["key"] for r in runs] == sorted(s.key for s in study.grid()[:2])
    for r in runs:
        assert r["status"] == "ok" and r["layers"] and r["epoch_s"] and len(r["epoch_s"]) == 2
        assert r["data"]["name"] == "fake.npz" and len(r["data"]["sha256"]) == 64
        assert r["commit"] and r["session"]["workers"] == 0 and r["session"]["mps"] is False
        assert r["started_at"] < r["finished_at"]
    # A later session skips what the records file holds, even without the run folders.
    for path in (tmp_path / "runs").glob("*/result.json"):
        path.unlink()
    capsys.readouterr()
    study.main(["run", "--workers", "0", "--out", str(tmp_path / "runs"), "--records-out",
                str(records), "--max-runs", "1", *tiny_args(data)])
    assert "73 runs in the grid, 2 finished, 71 to go" in capsys.readouterr().out
    assert len(json.loads(records.read_text())["runs"]) == 3


def _merge_many(args) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    from study_plan import merge_record

    path, lock, writer = args
    for i in range(10):
        merge_record(Path(path), {"key": f"w{writer}-{i}", "status": "ok"}, Path(lock))


def test_records_merged_by_parallel_writers_are_all_kept(plan, tmp_path):
    path, lock = tmp_path / "records.json", tmp_path / ".lock"
    path.write_text(json.dumps({"timing": {"kept": 1}, "runs": [{"key": "old"}]}))
    with mp.get_context("fork").Pool(4) as pool:
        pool.map(_merge_many, [(str(path), str(lock), w) for w in range(4)])
    data = json.loads(path.read_text())
    assert len(data["runs"]) == 41 and data["timing"] == {"kept": 1}
    assert [r["key"] for r in data["runs"]] == sorted(r["key"] for r in data["runs"])


def test_a_writer_killed_while_writing_leaves_the_old_records(plan, tmp_path, monkeypatch):
    path = tmp_path / "records.json"
    plan.merge_record(path, {"key": "a", "status": "ok"}, tmp_path / ".lock")
    before = path.read_text()

    def killed(*args):
        raise KeyboardInterrupt  # as if the process died between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        plan.merge_record(path, {"key": "b", "status": "ok"}, tmp_path / ".lock")
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()
                                           if p.suffix == ".tmp"] == []


@pytest.mark.slow
def test_a_killed_study_loses_no_finished_run_and_leaves_no_half_record(tmp_path):
    data = fake_cifar(tmp_path / "fake.npz")
    records, out = tmp_path / "records.json", tmp_path / "runs"
    command = [sys.executable, str(BENCHMARKS / "study.py"), "run", "--workers", "0",
               "--out", str(out), "--records-out", str(records), "--max-runs", "3",
               "--data", str(data), "--epochs", "3", "--limit-batches", "5",
               "--batch-size", "8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
                records.exists() and len(json.loads(records.read_text())["runs"]) >= 1):
            time.sleep(0.05)
        time.sleep(0.3)  # into the next run
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    finished = json.loads(records.read_text())["runs"]
    assert 1 <= len(finished) < 3 and {r["status"] for r in finished} == {"ok"}
    results = sorted(p.parent.name for p in out.glob("*/result.json"))
    assert results == sorted(r["key"] for r in finished)  # the killed run wrote nothing
    rest = [*command[:command.index("--max-runs") + 1], str(3 - len(finished)),
            *command[command.index("--max-runs") + 2:]]
    subprocess.run(rest, env=env, check=True, capture_output=True)  # the rest, once each
    again = {r["key"]: r for r in json.loads(records.read_text())["runs"]}
    assert len(again) == 3 and {r["status"] for r in again.values()} == {"ok"}
    assert all(again[r["key"]] == r for r in finished)  # the finished ones untouched


@pytest.mark.slow
def test_a_pool_workers_later_runs_train_exactly_as_a_fresh_process(study, tmp_path):
    """Pairing: runs in a worker process after other runs (``--workers 1``) give the same
    loss at every step, the same accuracy and the same final masks as in the caller."""
    data = fake_cifar(tmp_path / "fake.npz")
    common = ["--trace-losses", "--max-runs", "3", *tiny_args(data)]
    study.main(["run", "--workers", "0", "--out", str(tmp_path / "here"), *common])
    study.main(["run", "--workers", "1", "--out", str(tmp_path / "pool"), *common])
    here, pool = (study.load_results(tmp_path / w) for w in ("here", "pool"))
    assert sorted(here) == sorted(pool) and len(here) == 3
    for key in here:
        assert len(here[key]["train_losses"]) == 14
        assert here[key]["train_losses"] == pool[key]["train_losses"], key
        assert here[key]["test_acc"] == pool[key]["test_acc"]
        assert here[key]["layer_densities"] == pool[key]["layer_densities"]


# ------------------------------------------------------------------------------ claims
def test_t_intervals_and_verdicts(plan):
    mean, low, high = plan.t_interval([5.40, 5.00])
    assert (round(mean, 2), round(low, 2), round(high, 2)) == (5.20, 2.66, 7.74)
    assert plan.t_interval([1.0]) is None
    mean, low, high = plan.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert round(high - mean, 3) == round(2.776 * (2.5 ** 0.5) / 5 ** 0.5, 3)
    assert plan.verdict(3.6, (5.2, 2.66, 7.74), 2) == "holds"
    assert plan.verdict(3.0, (-1.15, -8.77, 6.47), 2).startswith(
        "cannot decide (the interval includes 0); 2 seeds")
    assert plan.verdict(3.0, (-2.0, -3.0, -1.0), 3).startswith("does not hold")
    assert plan.verdict(3.0, None, 1) == "cannot decide (one seed: no interval)"
    assert plan.verdict(3.0, None, 0) == "no data yet"


def acc_record(key: str, method: str, sparsity: float, distribution: str, seed: int,
               acc: float, **extra) -> dict:
    return {"key": key, "method": method, "sparsity": sparsity, "distribution": distribution,
            "seed": seed, "status": "ok", "test_acc": acc / 100, "wall_s": 40.0,
            "recipe": {"network": "resnet18", "epochs": 40}, **extra}


def synthetic(study, accuracies: dict[tuple, list[float]], **extra) -> dict[str, dict]:
    records = {}
    for (method, sparsity, distribution), values in accuracies.items():
        for seed, acc in enumerate(values):
            key = study.RunSpec(method, sparsity, distribution, seed).key
            records[key] = acc_record(key, method, sparsity, distribution, seed, acc, **extra)
    return records


def test_claims_are_paired_by_seed(plan, study):
    records = synthetic(study, {
        ("ggr", 0.99, "uniform"): [36.10, 34.60, 35.00],
        ("rigl", 0.99, "uniform"): [30.70, 29.60, 30.10],
        ("set", 0.99, "uniform"): [40.00, 41.00, 40.50],
        ("ggr", 0.99, "erk"): [37.0, 36.0],
        ("rigl", 0.99, "erk"): [39.0, 38.0],
    })
    table, verdicts = plan.claims_table(records)
    rows = {line.split(" | ")[2]: line for line in table.splitlines()[2:]}
    assert "| 3 | 0: +5.40, 1: +5.00, 2: +4.90 | +5.10 |" in rows[
        "99% uni: GGR ahead of RigL"] and rows["99% uni: GGR ahead of RigL"].endswith("holds |")
    assert rows["99% uni: GGR ahead of SET"].endswith(
        "does not hold (the opposite, with 95% confidence) |")
    # The loss from ERK to uniform, per seed: (GGR uni - GGR ERK) - (RigL uni - RigL ERK).
    assert "| 2 | 0: +7.40, 1: +7.00 | +7.20 | [+4.66, +9.74] | holds |" in rows[
        "99%: GGR loses less than RigL from ERK to uniform"]
    assert rows["99% uni: GGR ahead of DSR"].endswith("no data yet |")
    assert verdicts["holds"][0].startswith("2 (99% uni: GGR ahead of RigL)")


def test_report_writes_every_cell_the_claims_and_runs_per_hour(study, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    session = {"id": "gpu-1", "started_at": 1000.0, "workers": 8, "device": "cuda",
               "mps": True}
    records = synthetic(study, {("dense", 0.0, "erk"): [48.1, 47.9],
                                ("ggr", 0.99, "uniform"): [36.1, 34.6],
                                ("dsr", 0.99, "uniform"): [34.05, 33.75]})
    records.update(synthetic(study, {("ggr_set", 0.99, "uniform"): [35.0]}, device="H100",
                             session=session, started_at=1010.0, finished_at=1090.0))
    mobile = study.RunSpec("ggr", 0.99, "erk", 0, "mobilenet_v2").key
    records[mobile] = acc_record(mobile, "ggr", 0.99, "erk", 0, 20.0, network="mobilenet_v2",
                                 device="H100", session=session, started_at=1000.0,
                                 finished_at=1100.0)
    (results / "runs_resnet18.json").write_text(json.dumps({"timing": {}, "runs": list(
        records.values())}))
    (results / "throughput_baselines.json").write_text(json.dumps({"baselines": [
        {"what": "code before issue 20, one run alone", "commit": "bf36ea5",
         "device": "H100", "wall_s": 45.0}]}))
    study_results = study.CLAIMS_BEGIN + "\nold\n" + study.CLAIMS_END
    (results / "README.md").write_text(f"# Results\n\n{study_results}\n\nkept by hand\n")
    study.main(["report", "--network", "resnet18", "--plan", "paper", "--out",
                str(tmp_path / "none"), "--results", str(results)])
    capsys.readouterr()
    table = (results / "resnet18_table.md").read_text()
    assert "| (a) | ResNet-18 | 99% uni | GGR | 2 of 5 | 35.35 ± 1.06 | 36.10 / 34.60 / - / - " \
           "/ - |  | 64.41 |" in table
    assert "| (c) | ResNet-18 | 99% uni | GGR-SET | 1 of 3 | 35.00 | 35.00 / - / - |  | 58.70 " \
           "(Table 3 average) |" in table
    assert "| (e) | MobileNetV2 | 99% ERK | GGR | 1 of 3 | 20.00 | 20.00 / - / - |  | 46.49 |" \
           in table
    assert "| 0.99 uni | GGR-SET | 35.00 |" in table  # the ablation beside the methods
    assert "| baseline: code before issue 20, one run alone (bf36ea5) | H100 | 1 | 1 | 45.0 " \
           "| 80 |" in table
    assert "| session gpu-1 | H100 | 8 + MPS | 2 | 100 | 72 |" in table
    readme = (results / "README.md").read_text()
    assert readme.startswith("# Results\n\n" + study.CLAIMS_BEGIN + "\nGenerated by")
    assert readme.endswith(study.CLAIMS_END + "\n\nkept by hand\n") and "\nold\n" not in readme
    assert "| 1 | (a) | 99% uni: GGR ahead of DSR | +0.64 (Table 1; below 1 point) | 2 | " \
           "0: +2.05, 1: +0.85 | +1.45 | [-6.17, +9.07] | cannot decide" in readme


def test_status_prints_every_cell_with_its_n(study, tmp_path, capsys):
    records = synthetic(study, {("ggr", 0.99, "uniform"): [36.1, 34.6]})
    path = tmp_path / "records.json"
    path.write_text(json.dumps({"timing": {}, "runs": list(records.values())}))
    study.main(["status", "--network", "resnet18", "--plan", "paper", "--out",
                str(tmp_path / "none"), "--records-out", str(path)])
    out = capsys.readouterr().out
    assert "| (a) | ResNet-18 | 99% uni | GGR | 2 of 5 |" in out
    assert "| (e) | MobileNetV2 | 99% ERK | SET | 0 of 3 |" in out
    assert "2/97 finished" in out


# ------------------------------------------------------------------ the GPU window script
def window(tmp_path: Path, mode: str, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "GPU_WINDOW_DRY": mode, "OUT": str(tmp_path / "out"),
                   "RUNS_DIR": str(tmp_path / "runs"), "PYTHON": sys.executable,
                   "BASELINE_ROOT": str(ROOT), "LIGHTNING_GGR_COMMIT": "test",
                   "PYTHONPATH": "", **env}
    return subprocess.run(["bash", str(BENCHMARKS / "gpu_window.sh")], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=900)


def test_the_gpu_window_script_runs_its_steps_in_order(tmp_path):
    """``GPU_WINDOW_DRY=print``: the commands of a real window, in order, with the grid's
    deadline leaving time for the tables and the copy back. (``GPU_WINDOW_DRY=1`` runs them
    on the CPU at a tiny setting, about three minutes here: run by hand, see docs/study.md.)"""
    done = window(tmp_path, "print", WINDOW_S="540", WORKERS="8")
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [line.split("] ", 1)[1] for line in done.stdout.splitlines()
             if line.startswith("=== [")]
    assert [s.split(":")[0].split(" (")[0] for s in steps[:4]] == [
        "device", "CUDA tests", "rewiring", "runs per GPU-hour, today's way"]
    assert steps[-1] == "tables" and "=== done at" in done.stdout
    commands = [line for line in done.stdout.splitlines() if line.startswith("+ timeout")]
    assert "tests/sparse/test_cuda.py tests/zoo/test_zoo_cuda.py" in (
        tmp_path / "out" / "cuda_tests.log").read_text()
    probe = next(c for c in commands if "--max-runs" in c)
    grid = next(c for c in commands if "--deadline" in c)
    assert commands.index(probe) < commands.index(grid)
    assert "--sections rewiring" in next(c for c in commands if "overhead.py" in c)
    assert "--workers 8 --max-runs 8" in probe and "--epochs 3" in probe
    assert "--plan paper" in grid and "--deadline " in grid and "--history" in grid
    assert f"--records-out {tmp_path / 'out' / 'runs_resnet18.json'}" in grid
    deadline = int(grid.split("--deadline ")[1].split()[0])
    assert 400 <= deadline <= 540 - 45  # leaves REPORT_S for the tables and the copy back
