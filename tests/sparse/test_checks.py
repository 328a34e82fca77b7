"""One message style for every argument check, and each class validating its own arguments."""

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ggr.sparse import RewiringSchedule, SparseEngine, initial_densities
from lightning_ggr.sparse.checks import (
    check_choice,
    check_fraction,
    check_int,
    check_patterns,
    check_sparsity,
)
from lightning_ggr.sparse.methods import MethodSpec


def test_real_numbers_and_integers_are_accepted_whatever_their_numpy_type():
    for value in (0.9, np.float64(0.9), np.float32(0.9), np.float16(0.9)):
        assert check_sparsity(value) == pytest.approx(0.9, abs=1e-3)
        assert type(check_sparsity(value)) is float
    for value in (2, np.int64(2), np.int32(2), np.uint8(2)):
        assert check_int("update_interval", value, 1) == 2
        assert type(check_int("update_interval", value, 1)) is int


def test_narrow_numpy_floats_are_stored_as_the_decimal_they_print():
    """float(np.float32(0.9)) is 0.8999999761581421: a run summary would then group the run
    apart from the ones at 0.9."""
    assert check_sparsity(np.float32(0.9)) == 0.9
    assert check_fraction("drop_fraction", np.float16(0.3)) == 0.3


@pytest.mark.parametrize("value", [True, np.bool_(True), "0.9", None, [0.9], torch.tensor(0.9)])
def test_what_is_not_a_real_number_is_a_type_error(value):
    with pytest.raises(TypeError, match=r"^sparsity must be a real number in \[0, 1\), got "):
        check_sparsity(value)


def test_a_percentage_gets_a_hint_and_a_slightly_too_large_fraction_does_not():
    with pytest.raises(ValueError, match=r"got 90 \(a fraction, not a percentage: did you "
                                         r"mean 0\.9\?\)"):
        check_sparsity(90)
    with pytest.raises(ValueError, match=r"got 97\.5 .*did you mean 0\.975\?"):
        check_sparsity(97.5)
    with pytest.raises(ValueError, match=r"got 1\.5$"):
        check_fraction("drop_fraction", 1.5, closed_low=False)


def test_messages_name_the_argument_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"^seed must be an int in \[0, 2\*\*64\), got -1$"):
        check_int("seed", -1, 0, 2**64, "2**64")
    with pytest.raises(TypeError, match=r"^update_interval must be an int >= 1, got 2\.0$"):
        check_int("update_interval", 2.0, 1)
    with pytest.raises(ValueError, match=r"^interval must be one of 'step', 'epoch'; got 'batch'"):
        check_choice("interval", "batch", ("step", "epoch"))
    with pytest.raises(TypeError, match=r"^include must be a list of name patterns"):
        check_patterns("include", "net.0.weight")
    assert check_patterns("include", ("a", "b")) == ["a", "b"]


BAD_SCHEDULES = [
    ({"interval": "steps"}, ValueError, r"interval must be one of 'step', 'epoch'; got 'steps'"),
    ({"update_interval": 0}, ValueError, r"update_interval must be an int >= 1, got 0"),
    ({"update_interval": 1.5}, TypeError, r"update_interval must be an int >= 1, got 1\.5"),
    ({"drop_fraction": 7.0}, ValueError, r"drop_fraction must be a real number in \(0, 1\]"),
    ({"drop_fraction": 0.0}, ValueError, r"drop_fraction must be a real number in \(0, 1\]"),
    ({"stop_step": -1}, ValueError, r"stop_step must be an int >= 0, got -1"),
]


@pytest.mark.parametrize(("change", "error", "match"), BAD_SCHEDULES)
def test_rewiring_schedule_rejects_bad_arguments_itself(change, error, match):
    arguments = {"interval": "step", "update_interval": 10, "stop_step": 100,
                 "drop_fraction": 0.1, **change}
    with pytest.raises(error, match=match):
        RewiringSchedule(**arguments)


def test_rewiring_schedule_stores_canonical_python_types():
    schedule = RewiringSchedule("step", np.int64(10), np.int64(100), np.float32(0.5))
    assert type(schedule.update_interval) is int and type(schedule.stop_step) is int
    assert type(schedule.drop_fraction) is float
    assert schedule.slot(25, 0) == 2


def linear_params():
    return {"weight": nn.Parameter(torch.randn(8, 8))}


BAD_ENGINES = [
    ({"sparsity": 1.0}, ValueError, r"sparsity must be a real number in \[0, 1\)"),
    ({"sparsity": "high"}, TypeError, r"sparsity must be a real number"),
    ({"method": "rigl2"}, ValueError, r"method must be one of 'set', 'rigl'"),
    ({"distribution": "normal"}, ValueError, r"distribution must be one of 'erk', 'uniform'"),
    ({"gradient_ratio": 2.0}, ValueError, r"gradient_ratio must be a real number in \[0, 1\]"),
    ({"init_value": float("nan")}, ValueError, r"init_value must be a finite real number"),
    ({"dsr_tolerance": 1.0}, ValueError, r"dsr_tolerance must be a real number in \(0, 1\)"),
    ({"seed": -3}, ValueError, r"seed must be an int in \[0, 2\*\*64\)"),
    ({"schedule": "step"}, TypeError, r"schedule must be a RewiringSchedule or None"),
    ({"update_grown_weights": None}, TypeError, r"update_grown_weights must be a bool"),
    ({"reinit_regrown": "yes"}, TypeError, r"reinit_regrown must be a bool"),
    ({"dsr_initial_threshold": 0}, ValueError,
     r"dsr_initial_threshold must be a finite real number > 0, or None, got 0"),
    ({"dsr_initial_threshold": True}, TypeError, r"dsr_initial_threshold must be"),
]


@pytest.mark.parametrize(("change", "error", "match"), BAD_ENGINES)
def test_sparse_engine_rejects_bad_arguments_itself(change, error, match):
    with pytest.raises(error, match=match):
        SparseEngine(linear_params(), **{"sparsity": 0.5, **change})


def test_the_densities_accept_what_the_engine_accepts():
    densities = initial_densities({"a": (4, 4)}, np.float32(0.5), "uniform")
    assert densities == {"a": 0.5}
    engine = SparseEngine(linear_params(), sparsity=np.float32(0.75), seed=np.int64(1))
    assert engine.sparsity == 0.75 and engine.total_active == 16


def test_method_spec_rejects_unknown_axes():
    with pytest.raises(ValueError, match=r"insertion must be one of 'gradient', 'random', "
                                         r"'mixed'; got 'sideways'"):
        MethodSpec("magnitude", "keep", "sideways")
