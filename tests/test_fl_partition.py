"""Partitions of the real Fashion-MNIST training labels across federated clients."""

from __future__ import annotations

import numpy as np
import pytest

from tierwise.learn.flower_app import client_data
from tierwise.learn.partition import partition


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return client_data("", 5000, 0)[1]


def _disjoint_cover(parts: tuple[np.ndarray, ...], n: int) -> None:
    merged = np.concatenate(parts)
    assert len(merged) == n and len(np.unique(merged)) == n


def test_iid_is_equal_shares_of_every_class(labels):
    p = partition(labels, 10, "iid", seed=1)
    _disjoint_cover(p.parts, len(labels))
    assert max(len(x) for x in p.parts) - min(len(x) for x in p.parts) <= 1
    shares = p.histogram(labels) / p.histogram(labels).sum(1, keepdims=True)
    assert np.abs(shares - 0.1).max() < 0.03


def test_dirichlet_is_seeded_skewed_by_alpha_and_reported(labels):
    a = partition(labels, 10, "dirichlet", seed=3, alpha=0.5)
    b = partition(labels, 10, "dirichlet", seed=3, alpha=0.5)
    c = partition(labels, 10, "dirichlet", seed=4, alpha=0.5)
    _disjoint_cover(a.parts, len(labels))
    assert all(np.array_equal(x, y) for x, y in zip(a.parts, b.parts, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.parts, c.parts, strict=True))
    assert min(len(x) for x in a.parts) >= 10

    def skew(alpha: float) -> float:  # mean share of a client's most common class
        h = partition(labels, 10, "dirichlet", seed=3, alpha=alpha).histogram(labels)
        return float((h.max(1) / h.sum(1)).mean())

    assert skew(0.1) > skew(0.5) > skew(100.0)
    assert skew(100.0) < 0.15  # large alpha: close to IID

    report = a.report(labels)
    assert report["scheme"] == "dirichlet" and report["alpha"] == 0.5
    assert [r["samples"] for r in report["clients"]] == [len(x) for x in a.parts]
    assert sum(sum(r["label_histogram"]) for r in report["clients"]) == len(labels)


def test_k_labels_gives_each_client_exactly_k_classes_and_covers_all(labels):
    p = partition(labels, 10, "labels", seed=0, labels_per_client=2)
    _disjoint_cover(p.parts, len(labels))
    held = (p.histogram(labels) > 0).sum(1)
    assert held.tolist() == [2] * 10


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"scheme": "zipf"}, "expected one of"),
    ({"scheme": "dirichlet", "alpha": 0.0}, "alpha"),
    ({"scheme": "labels", "labels_per_client": 11}, "labels_per_client"),
    ({"scheme": "iid", "clients": 0}, "clients"),
])
def test_bad_partition_arguments_say_what_is_wrong(labels, kwargs, message):
    args = {"clients": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        partition(labels, args.pop("clients"), args.pop("scheme"), **args)
