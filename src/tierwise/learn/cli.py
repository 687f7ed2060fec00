"""`tierwise fl run | partition`: federated learning on Flower (the `fl` install extra)."""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tierwise.config import Config, config_from_dict, load_config

# command-line flag -> fl config field
OVERRIDES = {"clients": "clients", "rounds": "rounds", "partition": "partition",
             "alpha": "alpha", "labels_per_client": "labels_per_client", "seed": "seed",
             "strategy": "strategy", "compressor": "compressor", "downlink": "downlink",
             "local_steps": "local_steps", "deadline": "round_deadline_s",
             "min_fraction": "min_fraction"}


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]
                 ) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    fl = commands.add_parser("fl", help="federated learning on Flower (SuperLink, SuperNodes) "
                             "over emulated device links")
    steps = fl.add_subparsers(dest="fl_command", required=True)
    run_parser = steps.add_parser(
        "run", help="one federated run: real Flower processes on loopback, shaped links; "
        "exports the global model to ONNX and pushes it to the registry if there is one")
    add_run_options(run_parser)
    run_parser.add_argument("--kill", action="append", default=[], metavar="CLIENT@ROUND",
                            help="kill a client (no goodbye) during a round, e.g. 2@3")
    run_parser.add_argument("--join", action="append", default=[], metavar="CLIENT@ROUND",
                            help="start a client late, before a round, e.g. 4@2")
    run_parser.add_argument("--out", help="results folder (default: <fl.report_dir>/run)")
    run_parser.add_argument("--no-export", action="store_true",
                            help="skip the ONNX export and registry push")
    run_parser.set_defaults(run=run)
    partition_parser = steps.add_parser("partition", help="how the training set would be split: "
                                        "samples and label histogram per client")
    add_run_options(partition_parser, partition_only=True)
    partition_parser.set_defaults(run=partition_command)
    return steps


def add_run_options(parser: argparse.ArgumentParser, partition_only: bool = False) -> None:
    """The `fl` settings a run takes from the command line; with `partition_only`, those
    that decide the partition (`tierwise fl partition`)."""
    parser.add_argument("--clients", type=int, help="SuperNodes, one per emulated device "
                        "(default: fl.clients)")
    if not partition_only:
        parser.add_argument("--rounds", type=int, help="federated rounds (default: fl.rounds)")
    parser.add_argument("--partition", choices=("iid", "dirichlet", "labels"),
                        help="how the training set is split across clients (default: "
                        "fl.partition)")
    parser.add_argument("--alpha", type=float, help="Dirichlet concentration")
    parser.add_argument("--labels-per-client", type=int, help="classes each client holds, "
                        "with --partition labels (default: fl.labels_per_client)")
    parser.add_argument("--seed", type=int, help="seeds the partition, initial weights, local "
                        "batches and stochastic compression (default: fl.seed)")
    if partition_only:
        return
    parser.add_argument("--strategy", choices=("fedavg", "fedprox"),
                        help="server aggregation (default: fl.strategy)")
    parser.add_argument("--compressor", help="none, q8, q4, topk:F, topk:F+q8, topk:F+q4")
    parser.add_argument("--downlink", choices=("none", "q8"), help="the global model as "
                        "sent to clients: float32, or 8-bit (default: fl.downlink)")
    parser.add_argument("--local-steps", type=int, help="SGD steps per client per round "
                        "(default: fl.local_steps)")
    parser.add_argument("--deadline", type=float, help="round deadline, seconds")
    parser.add_argument("--min-fraction", type=float, help="fewest clients, as a share "
                        "0..1 of those sampled, whose updates make a round (default: "
                        "fl.min_fraction)")


def with_fl(config: Config, **overrides: Any) -> Config:
    """`config` with `fl` fields replaced, validated as a config file would be."""
    raw = config.model_dump(mode="json", exclude_none=True)
    raw["fl"] = {**raw["fl"], **{k: v for k, v in overrides.items() if v is not None}}
    return config_from_dict(raw, "command line")


def configured(args: argparse.Namespace) -> Config:
    return with_fl(load_config(args.config),
                   **{field: getattr(args, flag, None) for flag, field in OVERRIDES.items()})


def _schedule(items: list[str], what: str) -> dict[int, int]:
    schedule = {}
    for item in items:
        try:
            client, round_ = (int(part) for part in item.split("@"))
        except ValueError:
            raise SystemExit(f"--{what} {item!r}: expected CLIENT@ROUND, e.g. 2@3") from None
        schedule[client] = round_
    return schedule


def partition_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"label histogram per client; partition {report['scheme']}"
                  + (f", alpha {report['alpha']}" if report["alpha"] else "")
                  + (f", {report['labels_per_client']} labels per client"
                     if report["labels_per_client"] else "") + f", seed {report['seed']}")
    table.add_column("client", justify="right")
    table.add_column("samples", justify="right")
    for label in range(len(report["clients"][0]["label_histogram"])):
        table.add_column(str(label), justify="right")
    for row in report["clients"]:
        table.add_row(str(row["client"]), str(row["samples"]),
                      *(str(n) for n in row["label_histogram"]))
    return table


def partition_command(args: argparse.Namespace) -> int:
    from tierwise.learn.flower_app import client_data
    from tierwise.learn.partition import partition

    config = configured(args)
    fl = config.fl
    _, labels = client_data(config.data.path or "", config.data.validation_size,
                            config.data.seed)
    report = partition(labels, fl.clients, fl.partition, seed=fl.seed, alpha=fl.alpha,
                       labels_per_client=fl.labels_per_client).report(labels)
    wide_console().print(partition_table(report))
    return 0


def wide_console() -> Console:
    """A console whose tables fit when the output is a file or a pipe (default 80 columns)."""
    console = Console()
    return console if console.is_terminal else Console(width=140)


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the federation's processes are stopped on the way out."""
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def round_progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total} rounds"),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console)


def federated_run(config: Config, out: Path, console: Console, label: str,
                  kill: dict[int, int] | None = None, join: dict[int, int] | None = None
                  ) -> dict[str, Any]:
    """One run with a progress bar; the summary (also written to out/results.json)."""
    from tierwise.learn.federation import Schedule, run_federation

    with round_progress(console) as bar:
        task = bar.add_task(label, total=config.fl.rounds, status="starting Flower")

        def on_round(event: dict[str, Any]) -> None:
            bar.update(task, completed=event["round"],
                       status=f"acc {event['accuracy']:.1%}, {len(event['answered'])}/"
                              f"{len(event['sent'])} answered, {event['round_s']:.1f} s")

        summary = run_federation(config, out / "work", Schedule(kill or {}, join or {}),
                                 on_round)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def run(args: argparse.Namespace) -> int:
    from tierwise.learn.federation import MODEL_NAME, emulation
    from tierwise.learn.publish import export_global, push_global
    from tierwise.learn.report import plot_runs

    exit_on_sigterm()
    config = configured(args)
    kill, join = _schedule(args.kill, "kill"), _schedule(args.join, "join")
    out = Path(args.out) if args.out else Path(config.fl.report_dir) / "run"
    console = wide_console()
    fl = config.fl
    console.print(f"[bold]tierwise fl run[/]: {fl.clients} clients, {fl.rounds} rounds, "
                  f"{fl.strategy}, compressor {fl.compressor}, downlink {fl.downlink}; "
                  f"EMULATED {emulation(config)['links']}")
    started = time.monotonic()
    summary = federated_run(config, out, console, f"{fl.strategy}+{fl.compressor}", kill, join)
    console.print(partition_table(summary["partition"]))
    console.print(rounds_table(summary))
    plot = plot_runs({f"{fl.strategy} {fl.compressor}": summary}, out / "accuracy.png",
                     f"tierwise fl run: {fl.clients} clients, {fl.partition}")
    if not args.no_export:
        info = export_global(config, Path(summary["weights"]), config.models_dir, MODEL_NAME,
                             {"rounds": float(fl.rounds), "clients": float(fl.clients),
                              "bytes_up": float(summary["bytes_up"]),
                              "bytes_down": float(summary["bytes_down"])})
        test_accuracy = info.training_record().test_accuracy
        summary["exported"] = {"model": info.name, "test_accuracy": test_accuracy,
                               "path": str(config.models_dir / info.name)}
        summary["registry"] = push_global(config, config.models_dir, MODEL_NAME)
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        console.print(f"exported {info.name} (test accuracy {test_accuracy:.2%}) to "
                      f"{config.models_dir / info.name}; registry: "
                      + (f"version {summary['registry']['version']}" if summary["registry"]
                         else "none here (tierwise registry keygen makes one)"))
    console.print(f"final accuracy {summary['final_accuracy']:.2%}; {summary['bytes_up'] / 1e6:.2f}"
                  f" MB up, {summary['bytes_down'] / 1e6:.2f} MB down on the wire; rounds took "
                  f"{summary['wall_s']:.1f} s ({time.monotonic() - started:.0f} s with start-up)."
                  f" Results {out / 'results.json'}, plot {plot}")
    return 0


def rounds_table(summary: dict[str, Any]) -> Table:
    table = Table(title="rounds (links and compute EMULATED)")
    for column in ("round", "answered", "accuracy", "round s", "up KB", "down KB", "notes"):
        table.add_column(column, justify="right")
    for r in summary["rounds"]:
        notes = []
        if not r["aggregated"]:
            notes.append("too few: model kept")
        if r["missed"]:
            notes.append(f"busy/missing nodes {len(r['missed'])}")
        if r["late"]:
            notes.append(f"{len(r['late'])} late replies dropped")
        table.add_row(str(r["round"]), f"{r['answered']}/{r['sent']}", f"{r['accuracy']:.2%}",
                      f"{r['round_s']:.1f}", f"{r['bytes_up'] / 1e3:.0f}",
                      f"{r['bytes_down'] / 1e3:.0f}", ", ".join(notes))
    return table
