"""The benchmark suite of issue 13 runs on a CPU in seconds and prints every table.

No wall-clock assertion: only that each section ran and reported, and that the GPU suite
refuses to run without a GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "overhead.py"


def run(*args: str, script: Path = SCRIPT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True,
                          text=True, env=env, timeout=600, check=False, cwd=ROOT)


def test_overhead_suite_runs_tiny_on_cpu():
    done = run("--device", "cpu", "--tiny", "--threads", "1", "--sections", "methods",
               "isolated", "loop", "trainer", "pass", "rewiring", "build", "every_step")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.startswith("Device: ")
    for heading in ("| method | step (ms) | ratio to dense", "| dense step (ms) | per-step pass",
                    "| set-up | dense step",
                    "| model | sparse layers | us per pass", "| model | method | one rewiring",
                    "| model | sparse weights", "Goals (issue 13):",
                    "| enforce_masks_every_step=True: weights before the forward"):
        assert heading in out, heading
    for setup in ("plain loop, fp32", "plain loop, bf16", "Lightning Trainer, fp32",
                  "Lightning Trainer, bf16"):
        assert f"| {setup}" in out
    assert "| small_cnn | ggr |" in out and "| small_cnn | set |" in out
    assert "| cudaLaunchKernel calls (CPU: operations) | device time (ms) | topk calls |" in out
    # the per-step pass: one operation, nothing allocated, no host synchronisation
    assert "| aten::_foreach_mul_ x1 | - | 0 | 0 |" in out
    assert "rigl-torch 0.5.2" in out or "rigl-torch: not installed" in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")
def test_the_gpu_suite_needs_a_gpu():
    done = run("--suite", "gpu")
    assert done.returncode == 2 and "--suite gpu needs a CUDA device" in done.stderr


@pytest.mark.slow
def test_inference_benchmark_runs_quick_on_cpu():
    """benchmarks/inference.py --quick: every model, both mask sources, every table."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "inference.py"), "--quick",
                           "--layers"], capture_output=True, text=True, env=env, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.startswith("Device: CPU")
    for heading in ("## Sparse model file against the dense state_dict file",
                    "## End to end: masked dense model against to_inference's model",
                    "## Goals (issue 18", "- MLP 0.99 batch 1 >= 10x: ",
                    "- no model slower than dense beyond 5%"):
        assert heading in out, heading
    for model in ("mlp", "transformer", "vgg16", "resnet18"):
        for source in ("random", "ggr"):
            assert f"| {model} | {source} | 0.99 | 1 | 4 |" in out, (model, source)
    assert "### mlp, random masks, sparsity 0.99, 1 thread(s), batch 1" in out  # --layers
    assert "to_inference on cpu, 1 thread(s)" in out


def test_the_draw_benchmark_runs_tiny():
    done = run("--tiny", "--reps", "1", script=ROOT / "benchmarks" / "draws.py")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| layer | shape | active | time (s) | peak extra memory (MiB) |" in done.stdout
    assert done.stdout.count("| a 64x128 layer, density") == 3


@pytest.mark.ddp
@pytest.mark.slow
def test_the_sharded_benchmark_runs_tiny():
    done = run("--width", "32", "--layers", "1", "--steps", "3", "--rewirings", "1",
               "--no-dense", script=ROOT / "benchmarks" / "sharded.py")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "| strategy | training | training state per rank (MiB, rank 0 / 1) |" in out
    for strategy in ("DDP", "FSDP2"):
        for method in ("set", "rigl", "dsr", "ggr"):
            assert f"| {method} | {strategy} |" in out
