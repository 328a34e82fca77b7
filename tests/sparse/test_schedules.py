import math

import pytest

from lightning_ggr.sparse.schedules import RewiringSchedule, cosine_drop_fraction


def test_cosine_drop_fraction_endpoints_and_midpoint():
    assert cosine_drop_fraction(0.1, 0, 100) == pytest.approx(0.1)
    assert cosine_drop_fraction(0.1, 50, 100) == pytest.approx(0.05)
    assert cosine_drop_fraction(0.1, 100, 100) == 0.0
    assert cosine_drop_fraction(0.1, 25, 100) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))


def test_step_schedule_rewires_every_interval_until_stop():
    schedule = RewiringSchedule("step", 10, stop_step=45, drop_fraction=0.1)
    last, due = 0, []
    for step in range(60):
        if schedule.is_due(step, epoch=0, last_slot=last):
            due.append(step)
            last = schedule.slot(step, 0)
    assert due == [10, 20, 30, 40]


def test_epoch_schedule_rewires_at_the_first_step_of_every_epoch_but_the_first():
    steps_per_epoch = 7
    schedule = RewiringSchedule("epoch", 1, stop_step=5 * steps_per_epoch, drop_fraction=0.1)
    last, due = 0, []
    for step in range(10 * steps_per_epoch):
        epoch = step // steps_per_epoch
        if schedule.is_due(step, epoch, last):
            due.append(step)
            last = schedule.slot(step, epoch)
    assert due == [7, 14, 21, 28]


def test_a_postponed_rewiring_is_retried_within_the_same_slot():
    schedule = RewiringSchedule("step", 10, stop_step=100, drop_fraction=0.1)
    assert schedule.is_due(10, 0, last_slot=0)
    # Step 10 was skipped (last_slot unchanged): step 11 is still due, step 20 too.
    assert schedule.is_due(11, 0, last_slot=0)
    assert not schedule.is_due(11, 0, last_slot=1)
