"""Results tables of finished runs, as the paper prints them (Tables 1, 2 and 4).

Every run leaves a summary (:data:`~lightning_ggr.callbacks.summary.SUMMARY_FILENAME`, written
by the callback at the end of training); this module finds them, groups them and prints::

    lightning-ggr report RUN_DIRS... [--format markdown|csv] [--output DIR]
    python -m lightning_ggr.zoo.report RUN_DIRS...

Rules (the paper's, section 5):

- A *setting* is ``(dataset, model, method, sparsity, distribution)``; its seeds are
  averaged and shown as ``mean ± std (n=seeds)``, ``std`` the sample standard deviation.
- Runs with ``sparsity == 0`` (or ``method == "dense"``) are the dense reference, column
  ``s=0``, whatever their method and distribution.
- A setting whose mean accuracy is below 5% failed to fit the data: it is not reported
  (``-``). Its Table 4 structure numbers are still shown, as the paper does.
- Table 2 averages each method over the (dataset, model) *scenarios*: by default the
  paper's four (:data:`PAPER_SCENARIOS`), so runs of any other scenario are left out and
  named in the notes under the table (``scenarios=None``, ``--table2-scenarios all``:
  every scenario found). Scenarios where every method failed are left out of the average
  for that column; a method that failed where another method worked gets ``-`` for that
  column.
- A run with no accuracy (neither ``--metric`` nor its fallback) is left out of Tables 1 and
  2 and listed in Table 4 with an empty accuracy cell; the printed note says so.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_ggr.callbacks.summary import SUMMARY_FILENAME, read_run_summary
from lightning_ggr.sparse.densities import DISTRIBUTIONS
from lightning_ggr.sparse.methods import METHODS

#: The method name of the dense reference.
DENSE = "dense"
#: Row order of methods; others follow alphabetically.
METHOD_ORDER = (DENSE, *METHODS)
#: Column order of initial distributions; others follow alphabetically.
DISTRIBUTION_ORDER = DISTRIBUTIONS
#: Mean accuracy (percent) below which a setting counts as failed (the paper: 5%).
FAILED_BELOW = 5.0
#: The metric read as accuracy when the requested one is missing.
FALLBACK_METRIC = "val/acc"
#: Key under which :func:`collect_runs` stores where a run was read from.
PATH_KEY = "_path"
#: The (dataset, model) scenarios of the paper's Table 1, the four its Tables 2 and 3
#: average: MobileNetV2 and ResNet-18 on CIFAR-100, MobileNetV2 and VGG16 on Tiny-ImageNet.
PAPER_SCENARIOS: tuple[tuple[str, str], ...] = (
    ("cifar100", "mobilenet_v2"), ("cifar100", "resnet18"),
    ("tinyimagenet", "mobilenet_v2"), ("tinyimagenet", "vgg16"),
)
#: The paper's data sets; a zoo model on one of them outside :data:`PAPER_SCENARIOS` is an
#: extra (the zoo's ``cifar100_vgg16`` and ``tinyimagenet_resnet18`` configs).
PAPER_DATASETS: tuple[str, ...] = ("cifar100", "tinyimagenet")

Scenario = tuple[str, str]

Row = dict[str, Any]


@dataclass(frozen=True)
class Cell:
    """A table entry: mean of ``n`` values, their sample std (``None`` for one value or for
    averages of averages), and whether the setting failed (printed ``-``)."""

    mean: float
    std: float | None
    n: int
    failed: bool = False

    @classmethod
    def of(cls, values: Sequence[float], failed_below: float | None = None) -> Cell:
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else None
        failed = failed_below is not None and mean < failed_below
        return cls(mean, std, len(values), failed)

    def text(self, digits: int = 2) -> str:
        """``-`` if failed, else ``mean``, ``mean ± std (n=N)`` or ``mean (n=N)``."""
        if self.failed:
            return "-"
        mean = f"{self.mean:.{digits}f}"
        if self.std is not None:
            return f"{mean} ± {self.std:.{digits}f} (n={self.n})"
        return mean if self.n == 1 else f"{mean} (n={self.n})"


# ---------------------------------------------------------------------------- collecting


def collect_runs(paths: Sequence[str | Path], *,
                 latest_only: bool = True) -> list[dict[str, Any]]:
    """Every run summary under ``paths`` (searched recursively; a summary file is taken as
    is), in path order; each dict gets its file under ``"_path"``. ``latest_only``: one
    summary per run (:func:`latest_of_each_run`), not one per fit of a resumed run.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        files.extend([path] if path.is_file() else sorted(path.rglob(SUMMARY_FILENAME)))
    runs, seen = [], set()
    for file in files:
        resolved = file.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        run = read_run_summary(file)
        run[PATH_KEY] = str(file)
        runs.append(run)
    return latest_of_each_run(runs) if latest_only else runs


def latest_of_each_run(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per run: a resumed run writes a summary per fit under one ``run_id``
    (kept in the checkpoint); the latest (``created``, then path order) stands for it, so a
    run is never counted as two seeds. Summaries without ``run_id`` are each their own run."""
    latest: dict[str, int] = {}
    for index, run in enumerate(runs):
        run_id = run.get("run_id")
        if run_id is None:
            continue
        kept = latest.get(str(run_id))
        if kept is None or str(run.get("created", "")) >= str(runs[kept].get("created", "")):
            latest[str(run_id)] = index
    return [run for index, run in enumerate(runs)
            if run.get("run_id") is None or latest[str(run["run_id"])] == index]


def _order(value: str, order: Sequence[str]) -> tuple[int, str]:
    return (order.index(value), "") if value in order else (len(order), value)


def is_dense(run: Mapping[str, Any]) -> bool:
    """A dense reference run: ``sparsity == 0`` or ``method == "dense"``."""
    return str(run.get("method", "")).lower() == DENSE or float(run.get("sparsity", 0) or 0) == 0


#: How a run that names no dataset (or model) is shown: its summary holds ``null`` (a
#: LightningModule with its own dataloaders and no ``dataset_name``) or lacks the key.
UNNAMED = "?"


def _name(run: Mapping[str, Any], key: str) -> str:
    """The run's ``dataset`` or ``model`` as shown, :data:`UNNAMED` when it names none."""
    value = run.get(key)
    return UNNAMED if value is None or value == "" else str(value)


def unnamed_notes(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """A note for the runs that name no dataset or model (shown as ``?``), and how to name
    them."""
    notes = []
    for key, how in (("dataset", "a `dataset_name` attribute on the LightningModule or "
                                 "DataModule"),
                     ("model", "a `model_name` attribute on the LightningModule")):
        count = sum(1 for run in runs if _name(run, key) == UNNAMED)
        if count:
            notes.append(f"{count} run(s) name no {key} (shown as {UNNAMED!r}): give them "
                         f"{how}")
    return notes


def _method(run: Mapping[str, Any]) -> str:
    return DENSE if is_dense(run) else str(run.get("method", "?")).lower()


def _sparsity(run: Mapping[str, Any]) -> float:
    return 0.0 if is_dense(run) else round(float(run.get("sparsity", 0) or 0), 6)


def _distribution(run: Mapping[str, Any]) -> str:
    return "" if is_dense(run) else str(run.get("distribution", "?")).lower()


def column_name(sparsity: float, distribution: str) -> str:
    """``s=0`` for the dense reference, else ``s=<sparsity> <distribution>``."""
    return "s=0" if sparsity == 0 else f"s={sparsity:g} {distribution}"


def accuracies(
    runs: Sequence[Mapping[str, Any]],
    metric: str = "test/acc",
    *,
    fallback: str | None = FALLBACK_METRIC,
    scale: str = "auto",
) -> tuple[list[float | None], list[str]]:
    """Each run's accuracy in percent (``None`` when it has none), and notes for the user.

    A run without ``metric`` uses ``fallback`` (noted). ``scale``: ``"fraction"`` (values in
    ``[0, 1]``, multiplied by 100), ``"percent"``, or ``"auto"``: fraction when every value
    is at most 1.
    """
    if scale not in ("auto", "fraction", "percent"):
        raise ValueError(f"scale must be 'auto', 'fraction' or 'percent', got {scale!r}")
    raw: list[float | None] = []
    fell_back, missing = [], []
    for run in runs:
        metrics = run.get("metrics") or {}
        value = metrics.get(metric)
        if value is None and fallback is not None and fallback != metric:
            value = metrics.get(fallback)
            if value is not None:
                fell_back.append(run.get(PATH_KEY, "?"))
        if value is None:
            missing.append(run.get(PATH_KEY, "?"))
        raw.append(None if value is None else float(value))
    notes = []
    if fell_back:
        notes.append(f"{len(fell_back)} run(s) have no {metric!r}; used {fallback!r} instead: "
                     + ", ".join(map(str, fell_back)))
    if missing:
        notes.append(f"{len(missing)} run(s) have no accuracy ({metric!r}"
                     + (f" or {fallback!r}" if fallback else "") + "): left out of Tables 1 "
                     "and 2, listed in Table 4 without accuracy: " + ", ".join(map(str, missing)))
    present = [v for v in raw if v is not None]
    fraction = scale == "fraction" or (scale == "auto" and bool(present)
                                       and all(v <= 1.0 for v in present))
    if fraction:
        if scale == "auto":
            notes.append("accuracies are fractions (all <= 1): shown in percent")
        raw = [None if v is None else 100.0 * v for v in raw]
    return raw, notes


def _settings(
    runs: Sequence[Mapping[str, Any]], metric: str, scale: str, *, without_accuracy: bool = False
) -> dict[tuple[str, str, str, float, str], list[tuple[Mapping[str, Any], float | None]]]:
    """(dataset, model, method, sparsity, distribution) -> [(run, accuracy)]; runs without
    accuracy only if ``without_accuracy`` (Table 4's structure figures need none)."""
    values, _ = accuracies(runs, metric, scale=scale)
    groups: dict[tuple[str, str, str, float, str], list] = defaultdict(list)
    for run, value in zip(runs, values, strict=True):
        if value is None and not without_accuracy:
            continue
        key = (_name(run, "dataset"), _name(run, "model"), _method(run), _sparsity(run),
               _distribution(run))
        groups[key].append((run, value))
    return groups


def _columns(keys: Iterable[tuple[float, str]]) -> list[tuple[float, str]]:
    return sorted(set(keys), key=lambda k: (k[0], _order(k[1], DISTRIBUTION_ORDER)))


def _accuracy_cell(values: Sequence[float | None], failed_below: float) -> Cell | None:
    present = [v for v in values if v is not None]
    return Cell.of(present, failed_below) if present else None


# ---------------------------------------------------------------------------------- tables


def table1(
    runs: Sequence[Mapping[str, Any]],
    *,
    metric: str = "test/acc",
    failed_below: float = FAILED_BELOW,
    scale: str = "auto",
) -> list[Row]:
    """Table 1: top-1 accuracy (%) by dataset, model and method (rows) and sparsity x
    distribution (columns); the dense reference in column ``s=0``. Cells are :class:`Cell`
    (mean ± std over seeds) or ``""``."""
    groups = _settings(runs, metric, scale)
    columns = _columns((key[3], key[4]) for key in groups)
    rows_keys = sorted({key[:3] for key in groups},
                       key=lambda k: (k[0], k[1], _order(k[2], METHOD_ORDER)))
    rows = []
    for dataset, model, method in rows_keys:
        row: Row = {"dataset": dataset, "model": model, "method": method}
        for sparsity, distribution in columns:
            members = groups.get((dataset, model, method, sparsity, distribution), [])
            cell = _accuracy_cell([v for _, v in members], failed_below)
            row[column_name(sparsity, distribution)] = "" if cell is None else cell
        rows.append(row)
    return rows


def _scenario_text(scenarios: Iterable[Scenario]) -> str:
    return ", ".join(f"{dataset}/{model}" for dataset, model in scenarios)


def _check_scenarios(scenarios: Sequence[Scenario] | None) -> list[Scenario] | None:
    if scenarios is None:
        return None
    if isinstance(scenarios, str) or not all(
        isinstance(s, tuple | list) and len(s) == 2 and all(isinstance(p, str) for p in s)
        for s in scenarios
    ):
        raise TypeError("scenarios must be None or a sequence of (dataset, model) string pairs, "
                        f"e.g. PAPER_SCENARIOS; got {scenarios!r}")
    return [tuple(s) for s in scenarios]  # type: ignore[misc]


def _table2_columns(
    runs: Sequence[Mapping[str, Any]], scenarios: Sequence[Scenario] | None, metric: str,
    failed_below: float, scale: str,
) -> dict[tuple[float, str], dict[str, dict[Scenario, Cell]]]:
    """column -> method -> scenario -> per-scenario Cell, for the scenarios averaged."""
    wanted = _check_scenarios(scenarios)
    groups = _settings(runs, metric, scale)
    by_column: dict[tuple[float, str], dict[str, dict[Scenario, Cell]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for (dataset, model, method, sparsity, distribution), members in groups.items():
        if wanted is not None and (dataset, model) not in wanted:
            continue
        cell = _accuracy_cell([v for _, v in members], failed_below)
        if cell is not None:
            by_column[(sparsity, distribution)][method][(dataset, model)] = cell
    return by_column


def table2(
    runs: Sequence[Mapping[str, Any]],
    *,
    scenarios: Sequence[Scenario] | None = PAPER_SCENARIOS,
    metric: str = "test/acc",
    failed_below: float = FAILED_BELOW,
    scale: str = "auto",
) -> list[Row]:
    """Table 2: each method's accuracy (%) averaged over (dataset, model) scenarios.

    Only runs of ``scenarios`` count (default: the paper's four, :data:`PAPER_SCENARIOS`;
    ``None``: every scenario found); :func:`table2_notes` says which were averaged and which
    left out. Per column (sparsity x distribution): a scenario where every method failed is
    left out; a method that failed in a scenario where another worked gets ``-``; otherwise
    its cell is the mean over the scenarios it ran of its per-scenario mean over seeds,
    ``n`` = number of scenarios (fewer than the others' means missing runs).
    """
    by_column = _table2_columns(runs, scenarios, metric, failed_below, scale)
    columns = _columns(by_column)
    methods = sorted({m for column in by_column.values() for m in column},
                     key=lambda m: _order(m, METHOD_ORDER))
    rows = []
    for method in methods:
        row: Row = {"method": method}
        for column in columns:
            per_method = by_column[column]
            working = {s for cells in per_method.values() for s, c in cells.items()
                       if not c.failed}
            cells = per_method.get(method, {})
            value: Cell | str = ""
            if any(c.failed for s, c in cells.items() if s in working):
                value = Cell(math.nan, None, 0, failed=True)
            elif cells:
                used = [c.mean for s, c in cells.items() if s in working]
                value = (Cell(statistics.fmean(used), None, len(used)) if used
                         else Cell(math.nan, None, 0, failed=True))
            row[column_name(*column)] = value
        rows.append(row)
    return rows


def table2_notes(
    runs: Sequence[Mapping[str, Any]],
    *,
    scenarios: Sequence[Scenario] | None = PAPER_SCENARIOS,
    metric: str = "test/acc",
    failed_below: float = FAILED_BELOW,
    scale: str = "auto",
) -> list[str]:
    """What :func:`table2` averaged: the scenarios used, those left out as not in the paper
    (with ``scenarios`` given), and per column those left out because every method failed
    or that have no run there."""
    wanted = _check_scenarios(scenarios)
    # Runs with an accuracy, per scenario (the others are in no table average).
    counts: Counter[Scenario] = Counter()
    for (dataset, model, *_), members in _settings(runs, metric, scale).items():
        counts[(dataset, model)] += len(members)
    found = sorted(counts)
    if wanted is None:
        used = found
        notes = [f"Averaged over every scenario found: {_scenario_text(used) or 'none'}."]
    else:
        used = [s for s in wanted if s in counts]
        absent = [s for s in wanted if s not in counts]
        left = [s for s in found if s not in wanted]
        paper = wanted == list(PAPER_SCENARIOS)
        notes = [f"Averaged over {_scenario_text(used) or 'no scenario'}"
                 + (" (the paper's Table 2 scenarios)" if paper else "") + "."]
        if absent:
            notes.append(f"No runs of {_scenario_text(absent)}.")
        if left:
            notes.append(("Not in the paper's Table 2, left out: " if paper else "Left out: ")
                         + ", ".join(f"{d}/{m} ({counts[(d, m)]} runs)" for d, m in left)
                         + " (--table2-scenarios all averages every scenario).")
    by_column = _table2_columns(runs, wanted, metric, failed_below, scale)
    for column in _columns(by_column):
        per_method = by_column[column]
        ran = {s for cells in per_method.values() for s in cells}
        working = {s for cells in per_method.values() for s, c in cells.items() if not c.failed}
        failed = [s for s in used if s in ran and s not in working]
        not_run = [s for s in used if s not in ran]
        parts = []
        if failed:
            parts.append(f"{_scenario_text(failed)} left out (every method failed)")
        if not_run:
            parts.append(f"no runs of {_scenario_text(not_run)}")
        if parts:
            notes.append(f"{column_name(*column)}: " + "; ".join(parts) + ".")
    return notes


def extra_scenarios(runs: Sequence[Mapping[str, Any]]) -> list[Scenario]:
    """The (dataset, model) scenarios of ``runs`` on the paper's data sets that its Table 1
    does not have, such as the zoo's VGG16 on CIFAR-100 and ResNet-18 on Tiny-ImageNet:
    extras, not in the paper's grid."""
    found = {(_name(r, "dataset"), _name(r, "model")) for r in runs}
    return sorted(s for s in found if s[0] in PAPER_DATASETS and s not in PAPER_SCENARIOS)


def table1_notes(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Which rows of :func:`table1` are extras, not in the paper's Table 1."""
    extras = extra_scenarios(runs)
    if not extras:
        return []
    return [f"Not in the paper's Table 1 (extras): {_scenario_text(extras)}."]


def _mean_of(members: Sequence[Mapping[str, Any]], *path: str, factor: float = 1.0) -> Cell | str:
    values = []
    for run in members:
        value: Any = run
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            values.append(float(value) * factor)
    return Cell.of(values) if values else ""


def table4(
    runs: Sequence[Mapping[str, Any]],
    *,
    metric: str = "test/acc",
    failed_below: float = FAILED_BELOW,
    scale: str = "auto",
) -> list[Row]:
    """Table 4: structure of the trained sparse networks, one row per sparse setting.

    Columns: accuracy (``-`` if failed), empty neurons and empty inputs in percent of all
    neurons / inputs of the sparse layers, Params* in millions (dense parameters left after
    removing empty neurons and inputs) and sparse inference MFLOPs (multiply-adds) when the
    run recorded them. Dense reference runs are not listed.
    """
    groups = _settings(runs, metric, scale, without_accuracy=True)
    keys = sorted((k for k in groups if k[2] != DENSE),
                  key=lambda k: (k[0], k[1], k[3], _order(k[2], METHOD_ORDER),
                                 _order(k[4], DISTRIBUTION_ORDER)))
    rows = []
    for key in keys:
        dataset, model, method, sparsity, distribution = key
        members = [run for run, _ in groups[key]]
        accuracy = _accuracy_cell([v for _, v in groups[key]], failed_below)
        rows.append({
            "dataset": dataset,
            "model": model,
            "method": method,
            "sparsity": f"{sparsity:g}",
            "init": distribution,
            "top-1 acc": "" if accuracy is None else accuracy,
            "empty neurons %": _mean_of(members, "analysis", "overall", "empty_neurons_pct"),
            "empty inputs %": _mean_of(members, "analysis", "overall", "empty_inputs_pct"),
            "Params* [M]": _mean_of(members, "analysis", "overall", "params_star", factor=1e-6),
            "MFLOPs": _mean_of(members, "flops", "sparse", factor=1e-6),
        })
    return rows


# -------------------------------------------------------------------------------- printing


def _header(rows: Sequence[Row]) -> list[str]:
    header: list[str] = []
    for row in rows:
        header.extend(k for k in row if k not in header)
    return header


def _text(value: Any, digits: int) -> str:
    if isinstance(value, Cell):
        return value.text(digits)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def to_markdown(rows: Sequence[Row], digits: int = 2) -> str:
    """A GitHub-flavoured Markdown table; :class:`Cell` as ``mean ± std (n=N)`` or ``-``."""
    header = _header(rows)
    if not header:
        return "(no runs)\n"

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line(header), "|" + "|".join(" --- " for _ in header) + "|"]
    lines += [line(_text(row.get(k, ""), digits) for k in header) for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Row], digits: int = 4) -> str:
    """CSV; a :class:`Cell` column ``c`` becomes ``c`` (mean, ``-`` if failed), ``c std``
    and ``c n``; an empty entry is a setting with no run."""
    header = _header(rows)
    cell_columns = {k for row in rows for k, v in row.items() if isinstance(v, Cell)}
    names: list[str] = []
    for key in header:
        names += [key, f"{key} std", f"{key} n"] if key in cell_columns else [key]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        out: list[str] = []
        for key in header:
            value = row.get(key, "")
            if key not in cell_columns:
                out.append(_text(value, digits))
            elif isinstance(value, Cell):
                out += [
                    "-" if value.failed else f"{value.mean:.{digits}f}",
                    "" if value.failed or value.std is None else f"{value.std:.{digits}f}",
                    str(value.n),
                ]
            else:
                out += ["", "", ""]
        writer.writerow(out)
    return buffer.getvalue()


TABLES = {
    "table1": ("Table 1: top-1 accuracy (%), mean ± std over seeds", table1),
    "table2": ("Table 2: top-1 accuracy (%) averaged over dataset/model scenarios "
               "(n = scenarios)", table2),
    "table4": ("Table 4: empty neurons and inputs (% of all sparse-layer neurons / inputs), "
               "Params*, sparse MFLOPs", table4),
}
#: ``--table2-scenarios``: which (dataset, model) scenarios Table 2 averages.
TABLE2_SCENARIOS: dict[str, tuple[Scenario, ...] | None] = {"paper": PAPER_SCENARIOS,
                                                             "all": None}


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-ggr report RUN_DIRS...``: print Tables 1, 2 and 4 of the runs found."""
    parser = argparse.ArgumentParser(
        prog="lightning-ggr report",
        description="Collect finished runs (every " + SUMMARY_FILENAME + " under RUN_DIRS) "
        "and print the paper's Tables 1, 2 and 4.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="directories searched recursively, or summary files")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown",
                        help="what to print (default: markdown)")
    parser.add_argument("--output", metavar="DIR", default=None,
                        help="also write table1.md, table1.csv, ... into DIR")
    parser.add_argument("--metric", default="test/acc",
                        help=f"metric holding the accuracy (default: test/acc; runs without "
                        f"it fall back to {FALLBACK_METRIC})")
    parser.add_argument("--accuracy-scale", choices=("auto", "fraction", "percent"),
                        default="auto", help="fraction: multiply by 100; auto: fraction when "
                        "every value is at most 1 (default)")
    parser.add_argument("--failed-below", type=float, default=FAILED_BELOW,
                        help="mean accuracy (%%) below which a setting is reported '-' "
                        "(default: 5, as the paper)")
    parser.add_argument("--tables", nargs="+", choices=tuple(TABLES), default=list(TABLES),
                        help="which tables (default: all)")
    parser.add_argument("--table2-scenarios", choices=tuple(TABLE2_SCENARIOS),
                        default="paper",
                        help="paper: Table 2 averages the paper's four (dataset, model) "
                        "scenarios, other runs are left out and listed (default); all: every "
                        "scenario found")
    args = parser.parse_args(argv)
    try:
        summaries = collect_runs(args.run_dirs, latest_only=False)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not summaries:
        print(f"error: no {SUMMARY_FILENAME} found under {' '.join(args.run_dirs)}",
              file=sys.stderr)
        return 1
    runs = latest_of_each_run(summaries)
    _, notes = accuracies(runs, args.metric, scale=args.accuracy_scale)
    notes += unnamed_notes(runs)
    if len(runs) < len(summaries):
        notes.insert(0, f"{len(summaries) - len(runs)} summary file(s) are earlier fits of a "
                     "resumed run (same run_id): each run counts once, with its latest summary")
    print(f"{len(runs)} run(s) found.", file=sys.stderr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    output = Path(args.output) if args.output else None
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
    options = {"metric": args.metric, "failed_below": args.failed_below,
               "scale": args.accuracy_scale}
    scenarios = TABLE2_SCENARIOS[args.table2_scenarios]
    blocks = []
    for name in args.tables:
        title, build = TABLES[name]
        if name == "table2":
            rows = table2(runs, scenarios=scenarios, **options)
            table_notes = table2_notes(runs, scenarios=scenarios, **options)
            if not rows and scenarios is not None:
                table_notes.append("No run of these scenarios: Table 2 is empty "
                                   "(--table2-scenarios all averages every scenario found).")
        else:
            rows = build(runs, **options)
            table_notes = table1_notes(runs) if name == "table1" else []
        markdown, comma_separated = to_markdown(rows), to_csv(rows)
        if table_notes:
            markdown += "\n" + "\n".join(table_notes) + "\n"
        if output is not None:
            (output / f"{name}.md").write_text(f"## {title}\n\n{markdown}", encoding="utf-8")
            (output / f"{name}.csv").write_text(comma_separated, encoding="utf-8")
        if args.format == "markdown":
            blocks.append(f"## {title}\n\n{markdown}")
        else:
            blocks.append(f"# {name}\n{comma_separated}")
            for note in table_notes:
                print(f"note: {name}: {note}", file=sys.stderr)
    sys.stdout.write("\n".join(blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
