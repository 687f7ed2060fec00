"""`tierwise fl bench`: uncompressed FedAvg against each update compressor, side by side.

Every run is a real federation (`tierwise.learn.federation`): a SuperLink, one SuperNode per
client, each client behind its own shaping proxy at the configured (emulated) rates, the same
seeded Dirichlet partition. The baseline sends float32 both ways; the compressed runs
compress the update (uplink) and send the global model 8-bit (downlink, `--downlink`).

Targets (issue 7): a compressed strategy ends within 1 point of FedAvg's final accuracy with
at least 10x fewer bytes up and at least 3x less wall time. FedAvg's accuracy is set beside
the NIID-Bench reference for this setting (Flower's reproduction: 88.1% on Fashion-MNIST,
10 clients, Dirichlet 0.5, a small CNN, 50 rounds of 10 local epochs each); our run is far
shorter, and the table says how far it gets.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from tierwise.bench.harness import run_record
from tierwise.config import Config, load_config
from tierwise.learn.compression import COMPRESSORS

NIID_BENCH_REFERENCE = 0.881
BASELINE = "none"
TARGETS = {"accuracy_within": 0.01, "bytes_up_ratio": 10.0, "wall_ratio": 3.0}


def add_command(fl_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = fl_commands.add_parser(
        "bench", help="FedAvg uncompressed vs each compressor, 10 clients, Dirichlet 0.5, "
        "shaped links: JSON and plots (accuracy vs round, bytes, wall time)")
    bench.add_argument("--compressors", default=",".join(COMPRESSORS),
                       help="comma-separated; 'none' is the uncompressed FedAvg baseline")
    bench.add_argument("--rounds", type=int, default=10,
                       help="rounds per run (default 10: the bench stays under 30 min here)")
    bench.add_argument("--clients", type=int, default=10,
                       help="SuperNodes, one per emulated device")
    bench.add_argument("--alpha", type=float, default=0.5,
                       help="Dirichlet concentration of the partition (smaller: less IID)")
    bench.add_argument("--downlink", choices=("none", "q8"), default="q8",
                       help="how compressed runs send the global model (the baseline: float32)")
    bench.add_argument("--out", default="reports/fl-bench", help="results folder "
                       "(results.json, accuracy.png, a folder per compressor)")
    bench.set_defaults(run=run)


def comparison(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run against the uncompressed baseline, with the targets checked."""
    base = runs[BASELINE]
    rows = []
    for name, run in runs.items():
        row = {"compressor": name, "final_accuracy": run["final_accuracy"],
               "accuracy_delta": run["final_accuracy"] - base["final_accuracy"],
               "bytes_up": run["bytes_up"], "bytes_down": run["bytes_down"],
               "wall_s": run["wall_s"],
               "bytes_up_ratio": base["bytes_up"] / max(run["bytes_up"], 1),
               "bytes_down_ratio": base["bytes_down"] / max(run["bytes_down"], 1),
               "wall_ratio": base["wall_s"] / max(run["wall_s"], 1e-9)}
        row["meets_targets"] = name != BASELINE and (
            row["accuracy_delta"] >= -TARGETS["accuracy_within"]
            and row["bytes_up_ratio"] >= TARGETS["bytes_up_ratio"]
            and row["wall_ratio"] >= TARGETS["wall_ratio"])
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> Table:
    out = Table(title="fl bench (links and device compute EMULATED): each compressor vs "
                      "uncompressed FedAvg")
    for column in ("compressor", "final acc", "Δ acc", "MB up", "up ×", "MB down", "down ×",
                   "wall s", "wall ×", "targets"):
        out.add_column(column, justify="right")
    for r in rows:
        out.add_row(r["compressor"], f"{r['final_accuracy']:.2%}",
                    f"{100 * r['accuracy_delta']:+.2f} pt", f"{r['bytes_up'] / 1e6:.2f}",
                    f"{r['bytes_up_ratio']:.1f}", f"{r['bytes_down'] / 1e6:.2f}",
                    f"{r['bytes_down_ratio']:.1f}", f"{r['wall_s']:.0f}",
                    f"{r['wall_ratio']:.2f}",
                    "baseline" if r["compressor"] == BASELINE else
                    ("met" if r["meets_targets"] else "missed"))
    return out


def run(args: argparse.Namespace) -> int:
    from tierwise.learn.cli import exit_on_sigterm, federated_run, wide_console, with_fl
    from tierwise.learn.report import plot_runs

    exit_on_sigterm()
    base_config = load_config(args.config)
    compressors = [c.strip() for c in args.compressors.split(",") if c.strip()]
    if BASELINE not in compressors:
        compressors.insert(0, BASELINE)
    out = Path(args.out)
    console = wide_console()
    started = time.monotonic()
    runs: dict[str, dict[str, Any]] = {}
    for compressor in compressors:
        config: Config = with_fl(
            base_config, clients=args.clients, rounds=args.rounds, partition="dirichlet",
            alpha=args.alpha, strategy="fedavg", compressor=compressor,
            downlink="none" if compressor == BASELINE else args.downlink)
        runs[compressor] = federated_run(config, out / compressor.replace(":", "-"), console,
                                         f"fedavg {compressor}")
    rows = comparison(runs)
    console.print(table(rows))
    baseline = runs[BASELINE]
    result = {
        "emulated": True, "links": baseline["links"],
        "compute_scales": baseline["compute_scales"],
        "setting": {"clients": args.clients, "partition": "dirichlet", "alpha": args.alpha,
                    "rounds": baseline["config"]["rounds"],
                    "local_steps": baseline["config"]["local_steps"],
                    "batch_size": baseline["config"]["batch_size"],
                    "compressed_downlink": args.downlink},
        "targets": TARGETS, "comparison": rows,
        "reference": {"niid_bench_fedavg_accuracy": NIID_BENCH_REFERENCE,
                      "setting": "NIID-Bench (Flower baseline): FMNIST, 10 clients, Dirichlet "
                                 "0.5, simple CNN, 50 rounds x 10 local epochs",
                      "ours": baseline["final_accuracy"],
                      "gap_points": 100 * (NIID_BENCH_REFERENCE - baseline["final_accuracy"])},
        "bench_s": time.monotonic() - started,
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps({**run_record(), **result}, indent=2))
    plot = plot_runs({f"fedavg {name}": r for name, r in runs.items()}, out / "accuracy.png",
                     f"tierwise fl bench: {args.clients} clients, Dirichlet {args.alpha}",
                     reference=NIID_BENCH_REFERENCE)
    console.print(f"FedAvg {baseline['final_accuracy']:.2%} after "
                  f"{baseline['config']['rounds']} rounds (NIID-Bench reference "
                  f"{NIID_BENCH_REFERENCE:.1%} after 50 rounds of 10 local epochs). Bench took "
                  f"{result['bench_s'] / 60:.1f} min. Results {out / 'results.json'}, plot {plot}")
    return 0
