"""Dataset loaders. Images stay uint8 [N, 1, 28, 28]; models normalise them themselves."""

from tierwise.data.fashion_mnist import (
    CLASS_NAMES,
    DatasetMissingError,
    Splits,
    find_fashion_mnist,
    load_fashion_mnist,
    load_splits,
)

__all__ = [
    "CLASS_NAMES",
    "DatasetMissingError",
    "Splits",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "load_splits",
]
