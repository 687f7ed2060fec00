from pathlib import Path

import numpy as np
import pytest

from tierwise.data import CLASS_NAMES, DatasetMissingError, find_fashion_mnist, load_splits


def test_fashion_mnist_is_the_real_dataset() -> None:
    splits = load_splits(validation_size=5000, seed=0)
    assert splits.train_x.shape == (55000, 1, 28, 28) and splits.train_x.dtype == np.uint8
    assert splits.val_x.shape == (5000, 1, 28, 28)
    assert splits.test_x.shape == (10000, 1, 28, 28)
    assert sorted(np.unique(splits.test_y)) == list(range(len(CLASS_NAMES)))
    assert np.bincount(splits.test_y).tolist() == [1000] * 10  # the published balanced test set


def test_splits_are_fixed_by_the_seed() -> None:
    a, b = load_splits(seed=3), load_splits(seed=3)
    c = load_splits(seed=4)
    assert np.array_equal(a.val_y, b.val_y) and np.array_equal(a.train_x[:50], b.train_x[:50])
    assert not np.array_equal(a.val_y, c.val_y)


def test_missing_dataset_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError) as error:
        find_fashion_mnist(tmp_path)
    assert "apt-get install" in str(error.value) and "dataset-fashion-mnist" in str(error.value)
    assert "TIERWISE_DATA" in str(error.value)


def test_directory_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tierwise.config import load_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIERWISE_DATA", str(find_fashion_mnist()))
    assert load_config().data.path == str(find_fashion_mnist())
