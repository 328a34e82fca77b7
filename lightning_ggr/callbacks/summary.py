"""The run summary: one small JSON file a finished run leaves for ``lightning-ggr report``.

Layout (``format_version`` 1)::

    {
      "format_version": 1, "lightning_ggr_version": "0.1.0", "created": "2025-...Z",
      <every key of config>: ...,          # method, sparsity, distribution, seed, model, ...
      "global_density": 0.03,
      "layers": {name: {"active", "total", "density", "initial_active"}},
      "analysis": {"overall": {...}, "layers": {...}},   # SparsityAnalysis.to_dict()
      "flops": {"sparse": int, "dense": int},            # when a module and input are given
      "metrics": {"test/acc": 0.61, ...},                 # floats; NaN and inf -> null
      "selection": {...}, "rewiring": {...}               # written by the callback
    }

``rewiring`` (the account of the run, from version 0.1.0 on; older summaries lack it):
``planned``, ``done``, ``postponed``, ``postponed_reasons``, ``pending_step``,
``not_reached``, ``steps``, ``stop_step``, ``grown``, ``removed``, ``recorded_rewirings``,
``moved_net`` (see :func:`lightning_ggr.callbacks.account.account_figures`).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from lightning_ggr import __version__
from lightning_ggr.sparse.analysis import SparsityAnalysis, analyze_masks, sparse_flops

#: File name of a run summary inside a run directory.
SUMMARY_FILENAME = "lightning_ggr_summary.json"
#: Version of the summary layout; bumped when a key changes meaning.
FORMAT_VERSION = 1

_RESERVED = frozenset(
    {"format_version", "lightning_ggr_version", "created", "global_density", "layers",
     "analysis", "flops", "metrics", "selection", "rewiring"}
)


def to_plain(value: Any) -> Any:
    """``value`` as JSON-ready Python: tensors and numpy scalars to numbers or lists, paths to
    strings, tuples to lists, non-finite floats to ``None``."""
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        value = value.item() if value.dim() == 0 else value.tolist()
    elif isinstance(value, np.generic | np.ndarray):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def build_run_summary(
    *,
    masks: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    initial_counts: Mapping[str, int],
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    module: nn.Module | None = None,
    example_input: Tensor | None = None,
    analysis: SparsityAnalysis | None = None,
) -> dict[str, Any]:
    """The summary of a finished run as plain JSON-serializable data (layout: module doc).

    Args:
        masks: parameter name -> boolean mask of every sparse layer.
        params: name -> weight (for the mean magnitude of active weights).
        initial_counts: name -> active weights at initialization.
        config: the run's settings, copied to the top level: ``method``, ``sparsity``
            (0 marks the dense reference), ``distribution``, ``seed``, ``model``,
            ``dataset``... ``lightning-ggr report`` groups runs by these.
        metrics: final metrics, e.g. ``{"test/acc": 0.61}``; values become floats.
        module: the model, to read grouped convolutions and count FLOPs.
        example_input: one input batch (a batch of one preferred) for ``flops``; both
            ``module`` and ``example_input`` are needed.
        analysis: the masks' analysis when computed already (a sharded run computes it
            across its shards: :func:`~lightning_ggr.sparse.sharded.analyze_across_shards`).

    Raises:
        ValueError: a config key collides with a key the summary sets itself.
    """
    clashes = sorted(_RESERVED & set(config))
    if clashes:
        raise ValueError(f"config keys {clashes} are reserved by the run summary; rename them")
    if analysis is None:
        analysis = analyze_masks(masks, params, module=module)
    layers = {
        name: {
            "active": layer.active,
            "total": layer.total,
            "density": layer.density,
            "initial_active": int(initial_counts[name]) if name in initial_counts else None,
        }
        for name, layer in analysis.layers.items()
    }
    summary: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "lightning_ggr_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    summary.update(to_plain(dict(config)))
    summary["global_density"] = analysis.density
    summary["layers"] = layers
    summary["analysis"] = analysis.to_dict()
    if module is not None and example_input is not None:
        sparse, dense = sparse_flops(module, masks, example_input)
        summary["flops"] = {"sparse": sparse, "dense": dense}
    summary["metrics"] = {str(k): _metric(v) for k, v in metrics.items()}
    return to_plain(summary)


def _metric(value: Any) -> float | None:
    value = to_plain(value)
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` (made plain by :func:`to_plain`) as indented JSON, atomically: to a
    temporary file in the same folder (created if missing), then ``os.replace``. A reader
    never sees half a file, even if the writer is killed. The file gets the permissions
    ``open()`` would give it (``0o666`` less the umask, as the other logs)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_plain(data), indent=2, sort_keys=False, allow_nan=False)
    temporary = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    # Not tempfile.mkstemp: its files are 0o600 whatever the umask.
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text + "\n")
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def write_run_summary(path: str | os.PathLike[str], summary: Mapping[str, Any]) -> Path:
    """Write ``summary`` as JSON, atomically (:func:`write_json`).

    ``path`` is the file, or a directory to write :data:`SUMMARY_FILENAME` into (created
    if missing). Returns the file written.
    """
    target = Path(path)
    if target.is_dir() or target.suffix != ".json":
        target = target / SUMMARY_FILENAME
    return write_json(target, dict(summary))


def read_run_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a run summary: the file, or the :data:`SUMMARY_FILENAME` inside a directory.

    Raises:
        FileNotFoundError: no summary there.
        ValueError: the file is not a JSON object.
    """
    target = Path(path)
    if target.is_dir():
        target = target / SUMMARY_FILENAME
    with open(target, encoding="utf-8") as file:
        try:
            summary = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{target} is not valid JSON: {error}") from error
    if not isinstance(summary, dict):
        raise ValueError(f"{target} holds {type(summary).__name__}, expected a JSON object")
    return summary
