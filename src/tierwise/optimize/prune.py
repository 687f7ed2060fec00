"""`tierwise optimize prune`: structured channel pruning that really removes channels.

Filters are ranked by the L1 norm of their weights, taken over each dependency group (a
conv's output channels, its batch norm, and the input channels of whatever consumes them,
the classifier's flattened features included), and the weakest `ratio` of every group is cut
out of the tensors (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017; groups by
DepGraph, Fang et al., CVPR 2023, through the Torch-Pruning library). The result is a smaller
dense network — fewer parameters, fewer multiply-accumulates, smaller activations — not a
masked one. It is fine-tuned with the zoo's training loop, exported to ONNX, and registered as
`<model>.pruned-<percent>` if it is within the accuracy budget.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch_pruning
from rich.progress import Progress
from torch import nn

from tierwise.config import TrainConfig
from tierwise.data import Splits
from tierwise.optimize.variants import VariantOutcome, register_module
from tierwise.zoo.architectures import parameter_count
from tierwise.zoo.build import load_trained
from tierwise.zoo.train import train_model


def multiply_accumulates(model: nn.Module, example: torch.Tensor) -> int:
    macs, _ = torch_pruning.utils.count_ops_and_params(model, example)
    return int(macs)


def conv_widths(model: nn.Module) -> list[int]:
    return [module.out_channels for module in model.modules() if isinstance(module, nn.Conv2d)]


def prune_channels(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    """Remove `ratio` of the channels of every prunable group of `model`, in place; the final
    classifier keeps its 10 outputs."""
    classifier = [module for module in model.modules() if isinstance(module, nn.Linear)][-1]
    pruner = torch_pruning.pruner.MetaPruner(
        model, example, importance=torch_pruning.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=ratio, ignored_layers=[classifier])
    pruner.step()
    return model


def prune_model(
    models_dir: Path, model: str, splits: Splits, ratio: float, finetune: TrainConfig, *,
    accuracy_budget: float = 0.01, seed: int = 0, progress: Progress | None = None,
) -> VariantOutcome:
    """Prune `ratio` of `model`'s channels, fine-tune, and register `<model>.pruned-<pct>`."""
    if not 0 < ratio < 1:
        raise ValueError(f"ratio: expected a fraction in (0, 1), got {ratio}")
    network, parent = load_trained(models_dir, model)
    example = torch.from_numpy(splits.val_x[:2].copy())
    before = {"parameters": parameter_count(network),
              "macs": multiply_accumulates(network, example), "widths": conv_widths(network)}
    prune_channels(network, example, ratio)
    variant = f"pruned-{round(ratio * 100)}"
    result = train_model(parent.training_record().architecture, splits.train_x,
                         splits.train_y, finetune,
                         seed=seed, progress=progress, model=network,
                         description=f"fine-tune {model}.{variant}")
    outcome = register_module(
        models_dir, parent, variant, result.model, splits, accuracy_budget,
        training={"epochs": result.epochs, "seconds": result.seconds, "ratio": ratio})
    outcome.details = {
        "parameters_before": before["parameters"], "macs_before": before["macs"],
        "macs": multiply_accumulates(result.model.eval(), example),
        "conv_widths_before": before["widths"], "conv_widths": conv_widths(result.model),
        "finetune_seconds": result.seconds}
    return outcome
