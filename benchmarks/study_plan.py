"""The ResNet-18 study's grid that accumulates across GPU windows (issue 20): the run
specification, the priority plan, the deadline and run-time estimates that decide which run
may still start, the records file every finished run is merged into (atomically, under a
lock), and the comparison with the paper claim by claim (mean paired per-seed difference
and its 95% t-interval).

Used by ``benchmarks/study.py`` (``run --plan paper --deadline ...``, ``report``, ``status``);
see ``docs/study.md``.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import hashlib
import json
import math
import os
import statistics
import subprocess
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lightning_ggr.callbacks.summary import write_json

REPO = Path(__file__).resolve().parent.parent

#: The paper's Table 1 on CIFAR-100 (full data set, 100 epochs), for comparison.
PAPER_RESNET18 = {
    "dense": 76.27,
    (0.9, "erk"): {"set": 74.18, "rigl": 74.03, "dsr": 73.89, "ggr": 73.34},
    (0.9, "uniform"): {"set": 71.64, "rigl": 72.15, "dsr": 73.47, "ggr": 72.83},
    (0.97, "erk"): {"set": 70.13, "rigl": 70.65, "dsr": 70.99, "ggr": 70.28},
    (0.97, "uniform"): {"set": 66.64, "rigl": 68.31, "dsr": 70.17, "ggr": 70.71},
    (0.99, "erk"): {"set": 63.45, "rigl": 65.48, "dsr": 64.12, "ggr": 65.12},
    (0.99, "uniform"): {"set": 57.78, "rigl": 60.81, "dsr": 63.77, "ggr": 64.41},
}
PAPER_MOBILENET_V2 = {
    "dense": 69.15,
    (0.9, "erk"): {"set": 66.34, "rigl": 67.02, "dsr": 68.26, "ggr": 66.79},
    (0.9, "uniform"): {"set": 55.31, "rigl": 58.13, "dsr": 65.85, "ggr": 64.55},
    (0.97, "erk"): {"set": 56.13, "rigl": 58.96, "dsr": 61.11, "ggr": 60.57},
    (0.99, "erk"): {"set": 25.75, "rigl": 43.79, "dsr": 37.38, "ggr": 46.49},
}
#: The paper's Table 3 (averaged over its four models and data sets) at 99% uniform.
PAPER_TABLE3_099_UNIFORM = {"set": 51.56, "ggr_set": 58.70, "ggr_rigl": 59.44, "ggr": 58.36}

LABELS = {"dense": "Dense", "set": "SET", "rigl": "RigL", "dsr": "DSR", "ggr": "GGR",
          "set_rigl": "SET+RigL", "ggr_set": "GGR-SET", "ggr_rigl": "GGR-RigL"}
DIST_LABELS = {"erk": "ERK", "uniform": "uni"}
#: The study's main network; a run of another network names it in its key.
MAIN_NETWORK = "resnet18"
NETWORK_LABELS = {"resnet18": "ResNet-18", "mobilenet_v2": "MobileNetV2"}


@dataclass(frozen=True)
class RunSpec:
    method: str  # "dense" or one of the package's methods
    sparsity: float
    distribution: str
    seed: int
    #: ``None``: the grid's own network (the recipe's); else a zoo name, part of the key.
    network: str | None = None

    @property
    def key(self) -> str:
        prefix = f"{self.network}-" if self.network else ""
        if self.method == "dense":
            return f"{prefix}dense-seed{self.seed}"
        return f"{prefix}{self.method}-{self.distribution}-s{self.sparsity}-seed{self.seed}"


# ------------------------------------------------------------------------------ the plan
#: The priority groups of issue 20, in order: what each holds.
PLAN_GROUPS = {
    "a": "99% uniform: dense, GGR, DSR, RigL, SET; seeds 0-4",
    "b": "97% uniform and 99% ERK: GGR, DSR, RigL, SET; seeds 0-2",
    "c": "Table-3 ablations at 99% uniform: GGR-SET, GGR-RigL, SET+RigL; seeds 0-2",
    "d": "90% ERK and uniform: GGR, DSR, RigL, SET; seeds 0-2",
    "e": "MobileNetV2 at 99% ERK: dense, GGR, DSR, RigL, SET; seeds 0-2",
}
MAIN_ORDER = ("ggr", "dsr", "rigl", "set")  # GGR first: a cut-short seed compares it first


def paper_plan() -> list[tuple[str, RunSpec]]:
    """Every run of the plan as ``(group, spec)``, in the order they start: group by group
    (a to e), within a group seed by seed, so that a window cut short leaves whole seeds
    (every method of a seed) for the paired differences."""
    plan: list[tuple[str, RunSpec]] = []
    for seed in range(5):
        plan.append(("a", RunSpec("dense", 0.0, "erk", seed)))
        plan += [("a", RunSpec(m, 0.99, "uniform", seed)) for m in MAIN_ORDER]
    for seed in range(3):
        for sparsity, distribution in ((0.97, "uniform"), (0.99, "erk")):
            plan += [("b", RunSpec(m, sparsity, distribution, seed)) for m in MAIN_ORDER]
    for seed in range(3):
        plan += [("c", RunSpec(m, 0.99, "uniform", seed))
                 for m in ("ggr_set", "ggr_rigl", "set_rigl")]
    for seed in range(3):
        for distribution in ("erk", "uniform"):
            plan += [("d", RunSpec(m, 0.9, distribution, seed)) for m in MAIN_ORDER]
    for seed in range(3):
        plan.append(("e", RunSpec("dense", 0.0, "erk", seed, "mobilenet_v2")))
        plan += [("e", RunSpec(m, 0.99, "erk", seed, "mobilenet_v2")) for m in MAIN_ORDER]
    return plan


# ------------------------------------------------------------------------- the deadline
def parse_deadline(text: str, now: float | None = None) -> float:
    """``--deadline``: seconds from now (``540``, ``540s``, ``9m``, ``1h``) or a local wall-
    clock time (``14:30``, ``14:30:15``, ``2026-12-07T14:30``); returns a Unix time."""
    now = time.time() if now is None else now
    value = text.strip()
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (value[:-1], units[value[-1]]) if value[-1:] in units else (value, 1)
    try:
        seconds = float(number) * unit
    except ValueError:
        seconds = None
    if seconds is not None:
        if not math.isfinite(seconds) or seconds <= 0:
            raise argparse.ArgumentTypeError(
                f"expected a deadline in the future, got {text!r} ({seconds} s from now)")
        return now + seconds
    try:
        if "T" in value or "-" in value:
            moment = datetime.datetime.fromisoformat(value)
        else:
            clock = datetime.time.fromisoformat(value)
            moment = datetime.datetime.combine(datetime.date.fromtimestamp(now), clock)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a deadline as seconds from now (540, 540s, 9m, 1h) or a local time "
            f"(14:30, 14:30:15, 2026-12-07T14:30); got {text!r}") from None
    deadline = moment.timestamp()
    if deadline <= now:
        raise argparse.ArgumentTypeError(
            f"the deadline {text!r} ({moment.isoformat(sep=' ')}) is already past")
    return deadline


def concurrency(record: dict) -> int:
    """How many runs shared the device when this one ran (``workers``; 0 or 1: one)."""
    return max(1, int(record.get("workers") or 1))


def network_of(record: dict) -> str:
    recipe = record.get("recipe") or {}
    return record.get("network") or recipe.get("network") or MAIN_NETWORK


#: Expected run time of a network without any record, relative to ResNet-18's at the same
#: concurrency: MobileNetV2 has 52 convolutions to ResNet-18's 20 and its steps are bound by
#: launching kernels, not by arithmetic. Replaced by measured times as soon as there are any.
RELATIVE_RUN_TIME = {"resnet18": 1.0, "mobilenet_v2": 2.5}


def run_seconds(record: dict, epochs: int) -> float:
    """How long ``record``'s run would take at ``epochs`` epochs: its time outside the
    epochs plus ``epochs`` times its slowest epoch after the first (``epoch_s``, recorded
    since issue 20); for older records the wall time scaled by the epoch count."""
    seconds = record.get("epoch_s") or []
    if seconds:
        steady = seconds[1:] or seconds
        return record["wall_s"] - sum(seconds) + epochs * max(steady)
    recorded = (record.get("recipe") or {}).get("epochs") or epochs
    return record["wall_s"] * epochs / recorded


def expected_seconds(network: str, history: Iterable[dict], workers: int, epochs: int,
                     margin: float = 1.25, fallback_s: float = 300.0) -> float:
    """A run's expected wall time at ``epochs`` epochs with ``workers`` runs sharing the
    device, times the safety ``margin``, from finished runs (records with status ok; see
    :func:`run_seconds`): the slowest of the same network at the same concurrency (a short
    probe at that concurrency counts); else the slowest at another concurrency, scaled as if
    runs sharing the device gained nothing (x the concurrency ratio: the pessimistic case);
    else another network's, scaled by ``RELATIVE_RUN_TIME``; else ``fallback_s`` x workers."""
    done = [r for r in history if r.get("status") == "ok" and r.get("wall_s")]
    workers = max(1, workers)

    def slowest(name: str) -> float | None:
        same = [run_seconds(r, epochs) for r in done
                if network_of(r) == name and concurrency(r) == workers]
        if same:
            return max(same)
        other = [run_seconds(r, epochs) * max(1.0, workers / concurrency(r)) for r in done
                 if network_of(r) == name]
        return max(other) if other else None

    own = slowest(network)
    if own is not None:
        return margin * own
    for name, factor in RELATIVE_RUN_TIME.items():
        base = slowest(name)
        if base is not None:
            return margin * base * RELATIVE_RUN_TIME.get(network, 3.0) / factor
    return margin * fallback_s * workers


# --------------------------------------------------------------------- the records file
@contextmanager
def _locked(lock: Path):
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_records(path: Path | None) -> dict[str, dict]:
    """The records of a raw-records file (``{"timing": ..., "runs": [...]}``) by key."""
    if path is None or not Path(path).is_file():
        return {}
    with open(path) as file:
        return {r["key"]: r for r in json.load(file)["runs"]}


def merge_record(path: Path, record: dict, lock: Path) -> None:
    """Add (or replace) one run's record in the records file, under an exclusive lock held
    by every writer of ``path`` (the parallel runs of a study), written atomically: a reader
    or a killed writer never leaves half a file, and no finished record is lost."""
    with _locked(lock):
        records = read_records(path)
        payload = {"timing": {}, "runs": []}
        if Path(path).is_file():
            with open(path) as file:
                payload = json.load(file)
        records[record["key"]] = record
        payload["runs"] = [records[k] for k in sorted(records)]
        write_json(path, payload)


def code_commit() -> str | None:
    """The commit of the code that runs: ``$LIGHTNING_GGR_COMMIT`` when set (a copy without
    ``.git``, e.g. on a lent GPU machine), else ``git rev-parse HEAD`` (with ``-dirty`` when
    tracked files differ from it), else ``None``."""
    named = os.environ.get("LIGHTNING_GGR_COMMIT", "").strip()
    if named:
        return named
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                "--untracked-files=no"], check=True, capture_output=True,
                               text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def data_identity(path: Path) -> dict:
    """The data file a run read: its name, size and SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"name": Path(path).name, "bytes": Path(path).stat().st_size,
            "sha256": digest.hexdigest()}


# --------------------------------------------------------------------------- statistics
#: Two-sided 95% quantiles of Student's t by degrees of freedom (1-30), then the normal's.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_interval(values: list[float]) -> tuple[float, float, float] | None:
    """Mean and two-sided 95% t-interval of ``values`` (``None`` below two values)."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    t = _T975[len(values) - 2] if len(values) - 1 <= len(_T975) else 1.960
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Claim:
    """One claim of the paper as a paired difference ``first - second`` (accuracy points,
    per seed) that the paper says is positive: its own difference is ``paper``."""

    group: str
    text: str
    network: str
    first: tuple[str, float, str]  # (method, sparsity, distribution)
    second: tuple[str, float, str]
    paper: float
    #: A second pair subtracted per seed (the loss from ERK to uniform), or ``None``.
    minus: tuple[tuple[str, float, str], tuple[str, float, str]] | None = None
    source: str = "Table 1"


def _ahead(group: str, network: str, sparsity: float, distribution: str, first: str,
           second: str, table: dict) -> Claim:
    paper = table[(sparsity, distribution)]
    where = f"{round(100 * sparsity)}% {DIST_LABELS[distribution]}"
    net = "" if network == MAIN_NETWORK else f"{NETWORK_LABELS[network]}, "
    return Claim(group, f"{net}{where}: {LABELS[first]} ahead of {LABELS[second]}", network,
                 (first, sparsity, distribution), (second, sparsity, distribution),
                 round(paper[first] - paper[second], 2))


def paper_claims() -> list[Claim]:
    """The claims the plan can test, each with the paper's own difference: Table 1's order
    for ResNet-18 (and MobileNetV2 at 99% ERK, "GGR by far the best"), the text's "less
    sensitive to unbalanced layer densities" as the loss from ERK to uniform at 99%, and
    Table 3's ablations (the paper gives only averages over its four models there)."""
    r18, table = MAIN_NETWORK, PAPER_RESNET18
    claims = [_ahead("a", r18, 0.99, "uniform", "ggr", m, table) for m in ("dsr", "rigl", "set")]
    claims += [_ahead("a", r18, 0.99, "uniform", "dsr", "rigl", table),
               _ahead("a", r18, 0.99, "uniform", "rigl", "set", table)]
    claims += [_ahead("b", r18, 0.97, "uniform", "ggr", m, table) for m in ("dsr", "rigl", "set")]
    claims += [_ahead("b", r18, 0.99, "erk", "rigl", "ggr", table)]
    claims += [_ahead("b", r18, 0.99, "erk", "ggr", m, table) for m in ("dsr", "set")]
    for other in ("rigl", "set"):
        loss = {m: table[(0.99, "uniform")][m] - table[(0.99, "erk")][m] for m in ("ggr", other)}
        claims.append(Claim(
            "b", f"99%: GGR loses less than {LABELS[other]} from ERK to uniform", r18,
            ("ggr", 0.99, "uniform"), ("ggr", 0.99, "erk"),
            round(loss["ggr"] - loss[other], 2),
            minus=((other, 0.99, "uniform"), (other, 0.99, "erk")), source="Table 1, text"))
    t3 = PAPER_TABLE3_099_UNIFORM
    for single in ("ggr_rigl", "ggr_set"):
        claims.append(Claim("c", f"99% uni: {LABELS[single]} ahead of GGR", r18,
                            (single, 0.99, "uniform"), ("ggr", 0.99, "uniform"),
                            round(t3[single] - t3["ggr"], 2), source="Table 3, average"))
    claims += [_ahead("d", r18, 0.9, "erk", m, "ggr", table) for m in ("set", "rigl", "dsr")]
    claims += [_ahead("d", r18, 0.9, "uniform", "dsr", "ggr", table)]
    claims += [_ahead("d", r18, 0.9, "uniform", "ggr", m, table) for m in ("rigl", "set")]
    claims += [_ahead("e", "mobilenet_v2", 0.99, "erk", "ggr", m, PAPER_MOBILENET_V2)
               for m in ("rigl", "dsr", "set")]
    return claims


def _accuracy(records: dict[str, dict], network: str, cell: tuple[str, float, str],
              seed: int) -> float | None:
    method, sparsity, distribution = cell
    spec = RunSpec(method, 0.0 if method == "dense" else sparsity,
                   "erk" if method == "dense" else distribution, seed,
                   None if network == MAIN_NETWORK else network)
    record = records.get(spec.key)
    if record is None or record.get("status") != "ok" or record.get("test_acc") is None:
        return None
    return 100 * record["test_acc"]


def paired_differences(records: dict[str, dict], claim: Claim) -> dict[int, float]:
    """The claim's difference per seed, for the seeds where every run it needs finished."""
    seeds = sorted({r["seed"] for r in records.values()})
    out = {}
    for seed in seeds:
        cells = [claim.first, claim.second] + (list(claim.minus) if claim.minus else [])
        values = [_accuracy(records, claim.network, cell, seed) for cell in cells]
        if any(v is None for v in values):
            continue
        difference = values[0] - values[1]
        if claim.minus:
            difference -= values[2] - values[3]
        out[seed] = difference
    return out


def verdict(paper: float, interval: tuple[float, float, float] | None, n: int) -> str:
    """``holds`` (the 95% interval lies on the paper's side of 0), ``does not hold`` (on the
    other side), or why the data cannot decide."""
    if n == 0:
        return "no data yet"
    if interval is None:
        return "cannot decide (one seed: no interval)"
    _, low, high = interval
    if (paper > 0 and low > 0) or (paper < 0 and high < 0):
        return "holds"
    if (paper > 0 and high < 0) or (paper < 0 and low > 0):
        return "does not hold (the opposite, with 95% confidence)"
    return "cannot decide (the interval includes 0)" + (
        "; 2 seeds give a wide interval (t = 12.7)" if n == 2 else "")


def claims_table(records: dict[str, dict]) -> tuple[str, dict[str, list[str]]]:
    """The claim-by-claim table (Markdown) and the claims by verdict."""
    lines = ["| # | plan | claim | paper | n | per seed (seed: points) | mean | 95% interval "
             "| verdict |", "|---|---|---|---|---|---|---|---|---|"]
    by_verdict: dict[str, list[str]] = {"holds": [], "does not hold": [], "cannot decide": [],
                                        "no data yet": []}
    for number, claim in enumerate(paper_claims(), 1):
        per_seed = paired_differences(records, claim)
        values = list(per_seed.values())
        interval = t_interval(values)
        said = verdict(claim.paper, interval, len(values))
        mean = f"{statistics.fmean(values):+.2f}" if values else "-"
        span = f"[{interval[1]:+.2f}, {interval[2]:+.2f}]" if interval else "-"
        seeds = ", ".join(f"{s}: {v:+.2f}" for s, v in per_seed.items()) or "-"
        small = "; below 1 point" if abs(claim.paper) < 1 else ""
        lines.append(f"| {number} | ({claim.group}) | {claim.text} | {claim.paper:+.2f} "
                     f"({claim.source}{small}) | {len(values)} | {seeds} | {mean} | {span} | "
                     f"{said} |")
        key = next(k for k in by_verdict if said.startswith(k))
        by_verdict[key].append(f"{number} ({claim.text})" if key != "no data yet"
                               else str(number))
    return "\n".join(lines), by_verdict


def claims_section(records: dict[str, dict]) -> str:
    """The results page's section: every claim, its paired differences, interval and
    verdict, then plainly which claims hold, which do not and which the data cannot decide."""
    table, by_verdict = claims_table(records)
    ok = [r for r in records.values() if r.get("status") == "ok"]
    seeds = sorted({r["seed"] for r in ok})

    def listed(key: str) -> str:
        return "; ".join(by_verdict[key]) or "none"

    return (
        "Generated by `python benchmarks/study.py report --network resnet18 --plan paper` "
        f"from [`runs_resnet18.json`](runs_resnet18.json) ({len(ok)} finished runs; seeds "
        f"{', '.join(map(str, seeds)) or 'none'}). Each claim is a difference of top-1 "
        "accuracy (points) that the paper's own numbers make positive (column *paper*: its "
        "difference, single runs on the full CIFAR-100 at 100 epochs). Here it is taken per "
        "seed (runs of one seed share the initial weights, mask draw and batch order), "
        "then its mean and the 95% t-interval over the paired seeds (n - 1 degrees of "
        "freedom). A claim *holds* when the interval lies above 0, *does not hold* when it "
        "lies below 0, and the data *cannot decide* when it includes 0. Two seeds give "
        "t = 12.7, an interval about nine times the two differences' spread: with n = 2 "
        "only a difference that is large and steady across both seeds can be decided. "
        "Levels differ from the paper's (11% of its data, 40% of its epochs); the claims "
        "are about order.\n\n" + table + "\n\n"
        f"- **Hold**: {listed('holds')}.\n"
        f"- **Do not hold**: {listed('does not hold')}.\n"
        f"- **Cannot decide** (too few seeds or too small a difference): "
        f"{listed('cannot decide')}.\n"
        f"- **No runs yet**: {listed('no data yet')}.\n\n"
        "A paper difference below 1 point is one run against one run in the paper too: "
        "such a claim is the paper's order, not a margin it shows to be real.\n")


# ------------------------------------------------------------------- cells and windows
def paper_value(network: str, method: str, sparsity: float, distribution: str) -> str:
    """The paper's accuracy for a cell (Table 1; ablations: Table 3's average), or ``-``."""
    table = PAPER_MOBILENET_V2 if network == "mobilenet_v2" else PAPER_RESNET18
    if method == "dense":
        return f"{table['dense']:.2f}"
    value = table.get((sparsity, distribution), {}).get(method)
    if value is not None:
        return f"{value:.2f}"
    if network == MAIN_NETWORK and (sparsity, distribution) == (0.99, "uniform") and (
            method in PAPER_TABLE3_099_UNIFORM):
        return f"{PAPER_TABLE3_099_UNIFORM[method]:.2f} (Table 3 average)"
    return "-"


def cells_table(records: dict[str, dict], plan: list[tuple[str, RunSpec]]) -> str:
    """Every cell of the plan (group, network, setting, method) with its n: runs finished
    of those planned, mean ± std and each seed's accuracy (``-``: not run yet)."""
    cells: dict[tuple, list[RunSpec]] = {}
    for group, spec in plan:
        cells.setdefault((group, spec.network or MAIN_NETWORK, spec.sparsity,
                          spec.distribution, spec.method), []).append(spec)
    lines = ["| plan | network | setting | method | n (of planned) | top-1 % mean ± std | "
             "per seed | failed | paper |", "|---|---|---|---|---|---|---|---|---|"]
    for (group, network, sparsity, distribution, method), specs in cells.items():
        got, failed = [], 0
        for spec in specs:
            record = records.get(spec.key)
            if record is not None and record.get("status") == "ok":
                got.append(100 * record["test_acc"])
            elif record is not None:
                failed += 1
        mean = "-" if not got else (f"{statistics.fmean(got):.2f}" + (
            f" ± {statistics.stdev(got):.2f}" if len(got) > 1 else ""))
        per_seed = " / ".join(
            f"{100 * records[s.key]['test_acc']:.2f}" if records.get(s.key, {}).get("status")
            == "ok" else "-" for s in specs)
        setting = "dense" if method == "dense" else (
            f"{round(100 * sparsity)}% {DIST_LABELS[distribution]}")
        lines.append(f"| ({group}) | {NETWORK_LABELS.get(network, network)} | {setting} | "
                     f"{LABELS[method]} | {len(got)} of {len(specs)} | {mean} | {per_seed} | "
                     f"{failed or ''} | {paper_value(network, method, sparsity, distribution)} |")
    return "\n".join(lines)


def throughput_rows(records: dict[str, dict], baselines: list[dict]) -> str:
    """Runs per GPU-hour: each same-window baseline (one run of the code before issue 20,
    alone), each ``run`` session of the records (finished runs over the session's time,
    from its start to its last finished run: start-up included), and the records without a
    session (one at a time: 3600 s over their mean run time)."""
    lines = ["| what | device | runs at a time | runs | seconds | runs per GPU-hour |",
             "|---|---|---|---|---|---|"]
    for base in baselines:
        lines.append(f"| baseline: {base['what']} ({base.get('commit') or '?'}) | "
                     f"{base.get('device')} | 1 | 1 | {base['wall_s']:.1f} | "
                     f"{3600 / base['wall_s']:.0f} |")
    sessions: dict[str, list[dict]] = {}
    for record in records.values():
        if record.get("status") == "ok":
            session = (record.get("session") or {}).get("id") or ""
            sessions.setdefault(session, []).append(record)
    for session, runs in sorted(sessions.items(), key=lambda kv: min(
            r.get("started_at") or 0 for r in kv[1])):
        device = ", ".join(sorted({str(r.get("device")) for r in runs}))
        if not session:
            mean = statistics.fmean(r["wall_s"] for r in runs)
            lines.append(f"| records without a session (one at a time) | {device} | 1 | "
                         f"{len(runs)} | {mean:.1f} per run | {3600 / mean:.0f} |")
            continue
        info = runs[0]["session"]
        span = max(r["finished_at"] for r in runs) - info["started_at"]
        mps = " + MPS" if info.get("mps") else ""
        lines.append(f"| session {session} | {device} | {info['workers']}{mps} | {len(runs)} | "
                     f"{span:.0f} | {3600 * len(runs) / span:.0f} |")
    return "\n".join(lines)
