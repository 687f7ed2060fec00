"""Plots of federated runs: accuracy against round, against bytes sent up, and against wall
time. One figure serves a single `tierwise fl run` and the comparison of `tierwise fl bench`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PANELS = (("round", "round", 1.0),
          ("cumulative_bytes_up", "MB sent up (all clients, on the wire)", 1e-6),
          ("wall_s", "wall time (s)", 1.0))


def plot_runs(runs: dict[str, dict[str, Any]], path: Path, title: str,
              reference: float | None = None) -> Path:
    """`runs`: label -> a summary of `tierwise.learn.federation.summarize`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(15, 4.4), sharey=True)
    for ax, (key, label, scale) in zip(axes, PANELS, strict=True):
        for name, run in runs.items():
            xs = [r[key] * scale for r in run["rounds"]]
            ys = [r["accuracy"] for r in run["rounds"]]
            if key != "cumulative_bytes_up":  # the untrained model, at 0 (not on a log axis)
                xs, ys = [0.0, *xs], [run["initial_accuracy"], *ys]
            ax.plot(xs, ys, marker=".", label=name)
        if reference is not None:
            ax.axhline(reference, color="grey", linestyle=":", linewidth=1,
                       label=f"NIID-Bench reference {reference:.1%}")
        if key == "cumulative_bytes_up":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (global model)")
    axes[0].legend(fontsize=8)
    any_run = next(iter(runs.values()))
    fig.suptitle(f"{title}\nEMULATED: {any_run['links']}; compute scales "
                 f"{sorted(set(any_run['compute_scales']))}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
