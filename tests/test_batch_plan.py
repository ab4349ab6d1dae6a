"""How a dynamic batch of ragged items is split into padded forwards."""
from __future__ import annotations

from vocos_triton.serving.base import Item, plan_batches


def plan(costs, max_padded_frames=12_000, overhead=64):
    batches = plan_batches([Item(0, i, c, {}) for i, c in enumerate(costs)], max_padded_frames, overhead)
    return [[item.cost for item in batch] for batch in batches]


def test_equal_lengths_run_as_one_forward():
    assert plan([94] * 8) == [[94] * 8]


def test_a_long_item_does_not_pad_the_short_ones():
    assert plan([94, 1400, 94, 94]) == [[94, 94, 94], [1400]]


def test_every_item_is_planned_once_in_length_order():
    costs = [94, 1400, 200, 94, 300, 94, 1000, 150, 7, 5626]
    batches = plan(costs)
    assert sorted(c for b in batches for c in b) == sorted(costs)
    flat = [c for b in batches for c in b]
    assert flat == sorted(flat)


def test_padded_frames_are_bounded_unless_one_item_is_larger():
    assert plan([5000, 5000, 5000]) == [[5000, 5000], [5000]]
    assert plan([20_000], max_padded_frames=12_000) == [[20_000]]
    assert all(len(b) * max(b) <= 12_000 for b in plan([3000] * 8))


def test_empty():
    assert plan([]) == []
