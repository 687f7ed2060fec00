"""The federated global model as a device model: ONNX, calibrated, and a registry version.

The server keeps Fashion-MNIST's validation split (clients never see it) to fit the softmax
temperature, as every zoo model has one; the model card's test accuracy is on the full test
set. Where a registry exists (`tierwise registry keygen` made its keys), the model is pushed
as a new signed version that runs on the device tier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tierwise.config import DEVICE_TIER, Config
from tierwise.data import load_splits
from tierwise.models.store import ModelInfo

ARCHITECTURE = "fedavg-cnn"


def load_weights(path: Path) -> list[np.ndarray]:
    """The arrays `np.savez(path, *weights)` wrote, in order."""
    with np.load(path) as archive:
        return [archive[f"arr_{i}"] for i in range(len(archive.files))]


def export_global(config: Config, weights_file: Path, models_dir: Path, name: str,
                  training: dict[str, float]) -> ModelInfo:
    """Import the global model (the weights `np.savez` wrote) as the device model `name`,
    through the zoo's path (`register_trained`): calibrated, exported, checked."""
    from tierwise.learn.model import model_from
    from tierwise.zoo.build import register_trained

    splits = load_splits(config.data.path, config.data.validation_size, config.data.seed)
    return register_trained(model_from(load_weights(weights_file)), name, ARCHITECTURE,
                            splits, models_dir, training, runs_on=[DEVICE_TIER])


def push_global(config: Config, models_dir: Path, name: str) -> dict[str, Any] | None:
    """Push `name` to the registry as a device model; None where there is no registry."""
    from tierwise.registry.signing import PRIVATE_KEY_FILE, load_private_key
    from tierwise.registry.store import registry_of

    key_file = config.registry_dir / "keys" / PRIVATE_KEY_FILE
    if not key_file.is_file():
        return None
    result = registry_of(config).push(
        config, models_dir, name, load_private_key(key_file), tiers=[DEVICE_TIER])
    return {"model": result.model, "version": result.version, "channel": result.channel,
            "new": result.new}
