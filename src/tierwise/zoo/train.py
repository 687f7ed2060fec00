"""Training a zoo model with torch (install extra `train`), with rich progress bars."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from tierwise.config import TrainConfig
from tierwise.zoo.architectures import build


@dataclass
class TrainResult:
    model: nn.Sequential
    seconds: float
    epochs: float
    images_seen: int


class Objective(Protocol):
    """A training loss: (student logits, the uint8 batch as augmented, labels) -> loss."""

    def __call__(self, logits: torch.Tensor, images: torch.Tensor,
                 labels: torch.Tensor, /) -> torch.Tensor: ...


class LabelLoss:
    """Cross-entropy on the labels, smoothed by 0.05 (Szegedy et al., 2016)."""

    def __init__(self, smoothing: float = 0.05) -> None:
        self.cross_entropy = nn.CrossEntropyLoss(label_smoothing=smoothing)

    def __call__(self, logits: torch.Tensor, images: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        return self.cross_entropy(logits, labels)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), transient=False,
    )


def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.array(images[start:start + batch_size]))
            out.append(model(batch.contiguous(memory_format=torch.channels_last)).numpy())
    return np.concatenate(out)


def train_model(
    architecture: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    settings: TrainConfig,
    seed: int = 0,
    progress: Progress | None = None,
    *,
    model: nn.Sequential | None = None,
    objective: Objective | None = None,
    description: str | None = None,
    augment: bool = True,
) -> TrainResult:
    """Train `architecture` with AdamW and a one-cycle schedule (Smith & Topin, 2017), random
    horizontal flips, and label smoothing 0.05. `settings.epochs` may be fractional.

    `model` fine-tunes an existing module (a pruned one) instead of a fresh `architecture`;
    `objective` replaces the loss (distillation: `tierwise.optimize.distill`); `augment=False`
    trains on the inputs as given (features rather than images: no flips)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if settings.train_subset is not None and settings.train_subset < len(train_x):
        keep = rng.choice(len(train_x), settings.train_subset, replace=False)
        train_x, train_y = train_x[keep], train_y[keep]
    # channels_last runs the convolutions about 1.5x faster on this kind of CPU. Module.to
    # works in place; torch's stubs lack the overload of its documented to(memory_format=).
    model = model or build(architecture)
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    steps_per_epoch = max(1, len(train_x) // settings.batch_size)
    total_steps = max(1, round(settings.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.learning_rate, total_steps=total_steps, pct_start=0.25
    )
    objective = objective or LabelLoss()
    images = torch.from_numpy(np.ascontiguousarray(train_x))
    labels = torch.from_numpy(np.ascontiguousarray(train_y))
    owns_progress = progress is None
    progress = progress or _progress()
    started = time.perf_counter()
    with progress if owns_progress else _null():
        task = progress.add_task(description or f"train {architecture}", total=total_steps,
                                 loss=float("nan"))
        model.train()
        step = 0
        while step < total_steps:
            order = torch.from_numpy(rng.permutation(len(images)))
            for start in range(0, len(order) - settings.batch_size + 1, settings.batch_size):
                if step >= total_steps:
                    break
                index = order[start:start + settings.batch_size]
                batch, target = images[index], labels[index]
                if augment:
                    flip = torch.from_numpy(rng.random(len(batch)) < 0.5)
                    batch[flip] = batch[flip].flip(-1)
                batch = batch.contiguous(memory_format=torch.channels_last)
                loss = objective(model(batch), batch, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                if step % 20 == 0 or step == total_steps:
                    progress.update(task, completed=step, loss=loss.item())
    model.eval()
    return TrainResult(model, time.perf_counter() - started, settings.epochs,
                       total_steps * settings.batch_size)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
