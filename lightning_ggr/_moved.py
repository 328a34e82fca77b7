"""Import aliases for modules that moved into the package's rooms.

``import lightning_ggr.callback`` (and ``cli``, ``export``, ``plots``, ``summary``,
``report``) keeps working: the old name is bound to the new module itself, so classes and
functions are the very same objects, and ``python -m lightning_ggr.report`` still runs.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import CodeType, ModuleType

#: Old module path -> where it lives now.
MOVED_MODULES = {
    "lightning_ggr.callback": "lightning_ggr.callbacks.sparsity",
    "lightning_ggr.plots": "lightning_ggr.callbacks.plots",
    "lightning_ggr.summary": "lightning_ggr.callbacks.summary",
    "lightning_ggr.export": "lightning_ggr.sparse.export",
    "lightning_ggr.cli": "lightning_ggr.zoo.cli",
    "lightning_ggr.report": "lightning_ggr.zoo.report",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module at its new path."""

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED_MODULES[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there (the old path keeps "
                      "working)", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was imported under its new name."""

    def get_code(self, fullname: str) -> CodeType | None:
        """The new module's code, so that ``python -m <old path>`` runs it."""
        spec = importlib.util.find_spec(MOVED_MODULES[fullname])
        assert spec is not None and spec.loader is not None
        return spec.loader.get_code(spec.name)  # type: ignore[attr-defined]


def install() -> None:
    """Add the finder once (idempotent)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
