"""The federated model and its local training (torch; the `fl` and `train` extras).

The model is the CNN of the FedAvg paper (McMahan et al., "Communication-Efficient Learning of
Deep Networks from Decentralized Data", 2017): two 5x5 convolutions (32, 64 channels) with 2x2
max pooling, a 512-unit dense layer and a linear classifier, 1,663,370 parameters (6.7 MB as
float32). It is the usual yardstick for update compression, and large enough that on the
default 250 KB/s uplink an uncompressed update takes ~27 s: a round's wall time is then
dominated by the link, as on real devices. Its first layer takes the raw uint8 image and
normalises it (`tierwise.zoo.architectures.Normalize`), so the exported ONNX file is a device
model like every other in the zoo.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from tierwise.zoo.architectures import Normalize


def fedavg_cnn() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        normalize=Normalize(),
        conv1=nn.Conv2d(1, 32, 5, padding=2), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),  # 32x14x14
        conv2=nn.Conv2d(32, 64, 5, padding=2), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),  # 64x7x7
        flatten=nn.Flatten(),
        fc1=nn.Linear(64 * 7 * 7, 512), relu3=nn.ReLU(),
        fc2=nn.Linear(512, 10),
    ))


def initial_weights(seed: int) -> list[np.ndarray]:
    torch.manual_seed(seed)
    return get_weights(fedavg_cnn())


def get_weights(model: nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy().astype(np.float32, copy=True)
            for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: Sequence[np.ndarray]) -> None:
    keys = list(model.state_dict())
    if len(keys) != len(weights):
        raise ValueError(f"expected {len(keys)} arrays, got {len(weights)}")
    model.load_state_dict(OrderedDict(
        (k, torch.from_numpy(np.array(w, dtype=np.float32))) for k, w in zip(keys, weights,
                                                                             strict=True)))


def model_from(weights: Sequence[np.ndarray]) -> nn.Sequential:
    model = fedavg_cnn()
    set_weights(model, weights)
    return model


def local_train(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, steps: int,
                batch_size: int, learning_rate: float, momentum: float = 0.0,
                proximal_mu: float = 0.0, seed: int = 0) -> dict[str, float]:
    """`steps` SGD steps on minibatches drawn without replacement (reshuffled each pass).

    With `proximal_mu` > 0 this is FedProx's local objective: the loss plus
    mu/2 * ||w - w_global||^2, w_global being the weights the model starts from.
    Returns the mean training loss, the samples seen and the seconds spent.
    """
    started = time.perf_counter()
    model.train()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    order, position, total, seen = rng.permutation(len(images)), 0, 0.0, 0
    for _ in range(steps):
        if position + batch_size > len(order):
            order, position = rng.permutation(len(images)), 0
        batch = order[position:position + batch_size]
        position += batch_size
        x = torch.from_numpy(np.ascontiguousarray(images[batch]))
        y = torch.from_numpy(np.ascontiguousarray(labels[batch]))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if anchor is not None:
            loss = loss + proximal_mu / 2 * sum(
                torch.sum((p - a) ** 2) for p, a in zip(model.parameters(), anchor, strict=True))
        loss.backward()
        optimizer.step()
        total += float(loss) * len(batch)
        seen += len(batch)
    return {"train_loss": total / max(seen, 1), "samples": float(seen),
            "train_s": time.perf_counter() - started}


@torch.inference_mode()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 1000) -> dict[str, float]:
    model.eval()
    correct, loss = 0, 0.0
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        y = torch.from_numpy(np.ascontiguousarray(labels[start:start + batch_size]))
        logits = model(x)
        loss += float(loss_fn(logits, y))
        correct += int((logits.argmax(1) == y).sum())
    return {"accuracy": correct / len(images), "loss": loss / len(images)}
