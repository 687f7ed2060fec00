"""Fashion-MNIST (Xiao et al., 2017) from its gzip'd IDX files.

Looked up, in order: an explicit directory (config `data.path` or $TIERWISE_DATA), then where
Debian's `dataset-fashion-mnist` package put them (`dpkg -L dataset-fashion-mnist`).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DEBIAN_PACKAGE = "dataset-fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_UBYTE = 0x08


class DatasetMissingError(FileNotFoundError):
    """The dataset is not installed; the message says how to install it."""


def _install_hint() -> str:
    how = f"apt-get update && apt-get install -y {DEBIAN_PACKAGE}"
    if os.geteuid() != 0:
        how = f"sudo sh -c '{how}'"
    return (
        f"Fashion-MNIST is not installed. Install it with:\n    {how}\n"
        "or point TIERWISE_DATA (or `data.path` in tierwise.toml) at a directory holding "
        + ", ".join(name for pair in _FILES.values() for name in pair)
    )


def _has_files(directory: Path) -> bool:
    return all((directory / name).is_file() for pair in _FILES.values() for name in pair)


def _debian_dir() -> Path | None:
    if shutil.which("dpkg") is None:
        return None
    listing = subprocess.run(
        ["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, check=False
    )
    for line in listing.stdout.splitlines():
        if line.endswith(_FILES["train"][0]):
            return Path(line).parent
    return None


def find_fashion_mnist(directory: str | Path | None = None) -> Path:
    """The directory holding the four IDX files, or DatasetMissingError saying how to get them."""
    if directory is not None:
        path = Path(directory)
        if not _has_files(path):
            raise DatasetMissingError(
                f"{path}: no Fashion-MNIST IDX files here.\n{_install_hint()}"
            )
        return path
    found = _debian_dir()
    if found is None or not _has_files(found):
        raise DatasetMissingError(_install_hint())
    return found


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    with gzip.open(path, "rb") as stream:
        raw = stream.read()
    if len(raw) < 4 or raw[:4] != bytes([0, 0, _IDX_UBYTE, expected_dims]):
        raise ValueError(f"{path}: not an IDX file of {expected_dims}-d unsigned bytes")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(expected_dims)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * expected_dims)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, file holds {data.size} bytes")
    return data.reshape(dims)


@lru_cache(maxsize=4)
def load_fashion_mnist(
    directory: str | None = None, kind: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) of the 'train' or 'test' part."""
    if kind not in _FILES:
        raise ValueError(f"kind: expected 'train' or 'test', got {kind!r}")
    root = find_fashion_mnist(directory)
    images_file, labels_file = _FILES[kind]
    images = _read_idx(root / images_file, 3)
    labels = _read_idx(root / labels_file, 1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels")
    images = images.reshape(-1, 1, 28, 28)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


@dataclass(frozen=True)
class Splits:
    """Train / validation / test, fixed by a seed. Validation is carved out of the train part."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def load_splits(
    directory: str | None = None, validation_size: int = 5000, seed: int = 0
) -> Splits:
    train_x, train_y = load_fashion_mnist(directory, "train")
    test_x, test_y = load_fashion_mnist(directory, "test")
    order = np.random.default_rng(seed).permutation(len(train_x))
    val, train = order[:validation_size], order[validation_size:]
    return Splits(train_x[train], train_y[train], train_x[val], train_y[val], test_x, test_y)
