"""The device's sample queue: on disk across restarts, released within a count and byte
budget per sliding window, highest score first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tierwise.active.queue import SampleBudget, SampleQueue
from tierwise.active.samplers import Feedback, Observation

DAY = 86_400.0


def _offer(queue: SampleQueue, name: str, score: float, now: float,
           size: int = 784) -> bool:
    image = np.full(size, int(score * 100) % 256, dtype=np.uint8)
    return queue.offer(Observation(name, confidence=1 - score, device_label=3, classes=10,
                                   feedback=Feedback(False, 5)), image, "entropy", score,
                       now=now)


def test_the_budget_bounds_every_window_and_the_best_go_first(tmp_path: Path) -> None:
    queue = SampleQueue(tmp_path / "samples.db", SampleBudget(3, 10_000, DAY))
    for i, score in enumerate([0.2, 0.9, 0.5, 0.9, 0.7]):
        assert _offer(queue, f"t{i}", score, now=1000.0 + i)
    assert not _offer(queue, "t1", 0.9, now=2000.0)  # queued once
    due = queue.due(now=5000.0)
    assert [s.trace_id for s in due] == ["t1", "t3", "t4"]  # by score, then age
    assert due[0].observation["feedback"] == {"correct": False, "label": 5}
    assert due[0].array().shape == (784,) and due[0].array().dtype == np.uint8
    queue.mark_sent(due, now=5000.0)
    assert queue.due(now=5001.0) == []  # the window's three are spent
    assert queue.sent(since=0) == (3, 3 * due[0].size) and queue.backlog() == 2
    assert not _offer(queue, "t1", 0.9, now=5002.0)  # sent: never queued again
    # a day after the sends, the window has room again
    assert [s.trace_id for s in queue.due(now=5000.0 + DAY + 1)] == ["t2", "t0"]


def test_the_byte_budget_skips_what_does_not_fit_and_takes_what_does(tmp_path: Path) -> None:
    queue = SampleQueue(tmp_path / "samples.db", SampleBudget(10, 2_000, 3600.0))
    _offer(queue, "big", 0.9, now=0.0, size=3_000)    # never fits this budget
    _offer(queue, "mid", 0.8, now=0.0, size=1_500)
    _offer(queue, "small", 0.1, now=0.0, size=200)  # with the .npy header: 328 bytes
    due = queue.due(now=1.0)
    assert [s.trace_id for s in due] == ["mid", "small"]
    assert sum(s.size for s in due) <= 2_000


def test_the_queue_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "samples.db"
    queue = SampleQueue(path, SampleBudget(1, 10_000, DAY))
    for i in range(3):
        _offer(queue, f"t{i}", 0.5 + i / 10, now=float(i))
    queue.mark_sent(queue.due(now=10.0), now=10.0)
    again = SampleQueue(path, SampleBudget(1, 10_000, DAY))  # the device restarted
    assert again.backlog() == 2
    assert again.due(now=20.0) == []  # the budget spent before the restart still counts
    assert [s.trace_id for s in again.due(now=10.0 + DAY + 1)] == ["t1"]


def test_a_bad_budget_is_named() -> None:
    with pytest.raises(ValueError, match="max_samples: expected a count ≥ 0, got -1"):
        SampleBudget(-1, 100)
    with pytest.raises(ValueError, match="period_s: expected seconds > 0"):
        SampleBudget(1, 100, 0.0)
