"""Batch order and learning rate per step: deterministic, private RNG, the documented shapes."""

import math
import random

import torch

from spo_min.schedule import cosine_lr, step_schedule


def test_step_schedule_is_deterministic_covers_epochs_and_leaves_global_rngs_alone():
    states = random.getstate(), torch.get_rng_state()
    a = list(step_schedule(10, 4, 5, seed=1))
    assert a == list(step_schedule(10, 4, 5, seed=1)) and a != list(step_schedule(10, 4, 5, seed=2))
    assert [len(b) for b in a] == [4] * 5
    flat = [i for b in a for i in b]
    assert sorted(flat[:10]) == list(range(10))  # the first epoch is a permutation
    assert sorted(flat[10:20]) == list(range(10))  # and so is the second
    # A prefix of a longer schedule is the shorter schedule: resuming at step k sees the same batches.
    assert list(step_schedule(10, 4, 12, seed=1))[:5] == a
    assert random.getstate() == states[0] and torch.equal(torch.get_rng_state(), states[1])


def test_cosine_lr_warms_up_then_decays_to_the_floor():
    peak, total = 3e-3, 400
    assert math.isclose(cosine_lr(0, total, peak), peak / 20)  # linear warm-up over 20 steps
    assert math.isclose(cosine_lr(19, total, peak), peak)
    assert math.isclose(cosine_lr(20, total, peak), peak)  # cosine starts at the peak
    assert math.isclose(cosine_lr(total, total, peak), 0.1 * peak)  # and ends at the floor
    middle = 20 + (total - 20) // 2
    assert math.isclose(cosine_lr(middle, total, peak), peak * (0.1 + 0.9 * 0.5))
    lrs = [cosine_lr(s, total, peak) for s in range(20, total + 1)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))  # monotone decay after warm-up


def test_a_batch_larger_than_the_data_is_still_full():
    schedule = step_schedule(3, 8, 4, seed=0)
    assert [len(b) for b in schedule] == [8] * 4
    flat = [i for b in schedule for i in b]
    assert all(sorted(flat[k : k + 3]) == [0, 1, 2] for k in range(0, 30, 3))  # whole epochs, in order


def test_steps_are_drawn_on_demand_and_in_any_order():
    """A schedule holds one epoch, never every step (--steps 10**9 built 200 GB of lists)."""
    schedule = step_schedule(10, 4, 12, seed=3)
    batches = list(schedule)
    assert [schedule[k] for k in (5, 6, 2, 11, 0)] == [batches[k] for k in (5, 6, 2, 11, 0)]
    huge = step_schedule(10, 4, 10**9, seed=3)
    assert len(huge) == 10**9 and huge[11] == batches[11]  # a prefix is the shorter schedule
    for steps, n_items in [(2, 10), (3, 10), (12, 10), (4, 3)]:  # less than an epoch, exactly, more
        s = step_schedule(n_items, 4, steps, seed=1)
        assert s.items_seen() == sorted({i for b in s for i in b})
