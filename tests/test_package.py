"""The package's shape: the engine without Lightning, and the old module paths still working."""

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import lightning_ggr
from lightning_ggr._moved import MOVED_MODULES

#: Runs first in a fresh interpreter: importing any of BLOCKED fails, as if not installed.
BLOCK_TEMPLATE = textwrap.dedent(
    """
    import importlib.machinery
    import sys
    BLOCKED = BLOCKED_NAMES

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return importlib.machinery.ModuleSpec(name, self)
            return None

        def create_module(self, spec):
            raise ImportError(f"{spec.name} is blocked for this test")

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Block())
    """
)


def blocking(names: set[str]) -> str:
    """Code that makes importing any of ``names`` fail in the interpreter that runs it."""
    return BLOCK_TEMPLATE.replace("BLOCKED_NAMES", repr(sorted(names)))


BLOCK_FRAMEWORKS = blocking({
    "lightning", "pytorch_lightning", "lightning_fabric", "torchvision", "torchmetrics",
    "matplotlib", "tensorboard", "sklearn", "jsonargparse", "transformers", "safetensors"})


def test_engine_and_export_work_where_lightning_cannot_be_imported(tmp_path):
    code = BLOCK_FRAMEWORKS + textwrap.dedent(
        f"""
        import torch
        from torch import nn
        import lightning_ggr
        from lightning_ggr import (RewiringSchedule, SparseEngine, compact_sequential,
                                   load_sparse_model, save_sparse_model,
                                   select_sparse_parameters, to_inference)

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        engine = SparseEngine(select_sparse_parameters(model), sparsity=0.8, method="ggr",
                              schedule=RewiringSchedule("step", 2, 8, 0.3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
        for step in range(8):
            nn.functional.cross_entropy(model(x), y).backward()
            engine.before_optimizer_step(step, 0, [optimizer])
            optimizer.step()
            optimizer.zero_grad()
        assert engine.rewirings == 3, engine.rewirings
        path = {str(tmp_path / "model.pt")!r}
        save_sparse_model(model, engine.masks, path)
        masks = load_sparse_model(model, path)
        compact = compact_sequential(model, masks)
        assert torch.allclose(compact(x), model.eval()(x), atol=1e-5)
        fast = to_inference(model, masks, x[:1])
        assert torch.allclose(fast(x), model.eval()(x), atol=1e-5)
        try:
            lightning_ggr.DynamicSparsityCallback
        except ImportError as error:
            assert "needs Lightning" in str(error), error
        else:
            raise AssertionError("the callback imported without Lightning")
        blocked = {{m.split(".")[0] for m in sys.modules}} & {{"lightning", "torchvision",
                                                              "matplotlib"}}
        assert not blocked, blocked
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow
def test_the_quick_start_needs_no_scikit_learn(tmp_path):
    """The digits ship with the package: the quick-start's command runs (one batch of each
    loop, fast_dev_run) where scikit-learn cannot be imported (issue 17, item 9). (SciPy,
    which scikit-learn brought, is not blocked: torchmetrics imports it when its metadata
    says it is installed; the package itself never imports it.)"""
    config = Path(__file__).resolve().parents[1] / "examples/configs/digits_quickstart.yaml"
    code = blocking({"sklearn"}) + textwrap.dedent(
        f"""
        from lightning_ggr.zoo.cli import main
        main(["fit", "--config", {str(config)!r}, "--trainer.fast_dev_run", "true"])
        assert "sklearn" not in {{m.split(".")[0] for m in sys.modules}}
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Final metrics:" in result.stdout and "test/acc" in result.stdout


@pytest.mark.parametrize(("old", "new"), sorted(MOVED_MODULES.items()))
def test_a_moved_module_keeps_its_old_import_path(old, new):
    import importlib

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message)
               for w in caught)


def test_old_names_still_resolve_to_the_same_objects():
    from lightning_ggr.callback import DynamicSparsityCallback
    from lightning_ggr.summary import SUMMARY_FILENAME

    from lightning_ggr.callbacks import DynamicSparsityCallback as moved

    assert DynamicSparsityCallback is moved is lightning_ggr.DynamicSparsityCallback
    assert SUMMARY_FILENAME == "lightning_ggr_summary.json"
    # The zoo's names, public at the top level before they moved under lightning_ggr.zoo.
    from lightning_ggr import ImageClassifier
    from lightning_ggr.zoo import ImageClassifier as zoo_classifier

    assert ImageClassifier is zoo_classifier


def test_python_dash_m_runs_a_moved_module():
    result = subprocess.run([sys.executable, "-W", "ignore", "-m", "lightning_ggr.report",
                             "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_the_version_is_defined_once():
    from importlib.metadata import version

    assert version("lightning-ggr") == lightning_ggr.__version__


ROOT = Path(__file__).resolve().parents[1]


def _names_in_docs() -> set[str]:
    """Every identifier written as code (between backticks) in README.md and docs/*.md."""
    import re

    text = "\n".join(path.read_text() for path in [ROOT / "README.md",
                                                  *sorted((ROOT / "docs").glob("*.md"))])
    return {word for span in re.findall(r"`([^`\n]+)`", text)
            for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span)}


@pytest.mark.parametrize("module", ["lightning_ggr", "lightning_ggr.sparse"])
def test_every_public_name_imports_and_is_documented(module):
    """The public names are a contract: each name of ``__all__`` resolves (the lazy
    callback too) and is named as code in the README or docs/."""
    import importlib

    namespace = importlib.import_module(module)
    assert len(set(namespace.__all__)) == len(namespace.__all__)
    for name in namespace.__all__:
        getattr(namespace, name)
    documented = _names_in_docs()
    assert sorted(set(namespace.__all__) - documented) == []


def test_the_front_doors_engine_names_are_the_engines_objects():
    """``to_inference`` and the other engine names of ``lightning_ggr`` are exported from
    both modules and are the same objects."""
    import lightning_ggr.sparse

    engine_names = set(lightning_ggr.__all__) - {"DynamicSparsityCallback", "__version__"}
    assert "to_inference" in engine_names and "to_inference" in lightning_ggr.sparse.__all__
    assert engine_names <= set(lightning_ggr.sparse.__all__)
    for name in engine_names:
        assert getattr(lightning_ggr, name) is getattr(lightning_ggr.sparse, name), name
