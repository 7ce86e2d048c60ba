"""The projection runner's poll sizing rule (shared/poll_sizing.py): pure, no clock."""

from __future__ import annotations

import pytest

from shared.poll_sizing import PollSizer


def batch_seconds(records: int, fixed_s: float = 0.010, per_record_s: float = 0.001) -> float:
    """A batch's time on a linear cost model: a fixed part (transaction, loads, commit)
    and a part per record."""
    return fixed_s + records * per_record_s


def test_without_a_budget_every_poll_may_take_the_ceiling() -> None:
    sizer = PollSizer(None, ceiling=5000)
    sizer.observe(5000, 30.0)  # however slow
    assert sizer.limit(0) == 5000
    assert sizer.limit(10**6) == 5000


def test_a_batch_slower_than_half_the_budget_shrinks_the_limit_to_what_its_pace_fits() -> None:
    sizer = PollSizer(0.100, ceiling=5000)
    sizer.observe(400, 0.200)  # 0.5 ms per record, 4x the 50 ms target
    assert sizer.fits == 100
    assert sizer.limit(waiting=40) == 100


def test_catching_up_lifts_the_limit_to_the_ceiling() -> None:
    """More records wait than a budget-sized batch holds: the newest miss the budget
    anyway, and the largest batches drain them fastest."""
    sizer = PollSizer(0.100, ceiling=5000)
    sizer.observe(400, 0.200)
    assert sizer.limit(waiting=100) == 100
    assert sizer.limit(waiting=101) == 5000


def test_full_batches_on_a_linear_cost_converge_on_the_size_that_fits_the_target() -> None:
    """Fixed 10 ms + 1 ms per record, 100 ms budget: 40 records take the 50 ms target."""
    sizer = PollSizer(0.100, ceiling=5000)
    sizes = []
    for _ in range(30):
        n = sizer.limit(waiting=0)
        sizes.append(n)
        sizer.observe(n, batch_seconds(n))
    assert sizes[0] == 5000  # the first batch measures the pace
    assert sizes[-5:] == [40] * 5, sizes
    assert batch_seconds(sizes[-1]) <= 0.050


def test_full_fast_batches_grow_the_limit_at_most_twofold_and_never_past_the_ceiling() -> None:
    sizer = PollSizer(1.0, ceiling=300)
    sizer.observe(100, 1.0)  # 10 ms per record: 50 fit in the 500 ms target
    assert sizer.fits == 50
    sizer.observe(50, 0.005)  # full and far faster: doubles, not more
    assert sizer.fits == 100
    sizer.observe(100, 0.010)
    sizer.observe(200, 0.020)
    assert sizer.fits == 300


def test_a_fast_batch_below_the_limit_says_nothing_about_larger_ones() -> None:
    sizer = PollSizer(0.100, ceiling=5000)
    sizer.observe(400, 0.200)
    sizer.observe(3, 0.001)
    assert sizer.fits == 100


def test_a_fixed_cost_above_the_target_leaves_the_floor() -> None:
    sizer = PollSizer(0.020, ceiling=5000, floor=4)
    for _ in range(5):
        n = sizer.limit(waiting=0)
        sizer.observe(n, batch_seconds(n, fixed_s=0.050))
    assert sizer.fits == 4


@pytest.mark.parametrize(
    ("budget", "ceiling", "floor"), [(0.0, 10, 1), (-1.0, 10, 1), (None, 0, 1), (None, 10, 11)]
)
def test_nonsense_is_refused(budget: float | None, ceiling: int, floor: int) -> None:
    with pytest.raises(ValueError, match=r"budget|floor"):
        PollSizer(budget, ceiling=ceiling, floor=floor)
