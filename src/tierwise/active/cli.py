"""`tierwise labels ...` (the label queue at the cloud) and `tierwise learn retrain | promote
| loop` (retrain and ship)."""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tierwise.active.labels import STATES, LabelError, LabelStore, label_studio_config
from tierwise.config import Config, load_config
from tierwise.learn.cli import wide_console


def _count(text: str) -> int:
    """A whole number ≥ 1, for argparse (which names the flag when this raises)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds ≥ 0, got {text}")
    return value


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    labels = commands.add_parser("labels", help="the label queue at the cloud: the samples "
                                 "devices selected, labelling, Label Studio export and import")
    steps = labels.add_subparsers(dest="labels_command", required=True)
    show = steps.add_parser("list", help="samples in the queue, highest score first")
    show.add_argument("--state", choices=STATES, help="only these (default all)")
    show.add_argument("--model", help="only this model's samples")
    show.add_argument("--limit", type=_count, default=50, help="most samples shown")
    show.set_defaults(run=_list)
    summary = steps.add_parser("summary", help="samples per state, and per device the "
                               "samples and bytes it sent")
    summary.set_defaults(run=_summary)
    select = steps.add_parser("select", help="queue candidates for labelling")
    select.add_argument("--budget", type=_count, required=True, help="how many")
    select.add_argument("--method", choices=("core-set", "score"),
                        help="default active.select")
    select.add_argument("--model", help="default the device model")
    select.set_defaults(run=_select)
    label = steps.add_parser("label", help="label one sample")
    label.add_argument("id", help="the sample's id (8 or more of its first hex digits)")
    label.add_argument("label", help="the class: its index or its name")
    label.set_defaults(run=_label)
    export = steps.add_parser("export", help="Label Studio tasks (JSON) and the labelling "
                              "config (XML) for the samples to label")
    export.add_argument("--out", required=True, help="the tasks file, e.g. tasks.json; the "
                        "labelling config is written beside it")
    export.add_argument("--state", choices=STATES, default="queued",
                        help="export the samples in this state")
    export.add_argument("--model", help="default the device model")
    export.set_defaults(run=_export)
    imported = steps.add_parser("import", help="take the labels in a Label Studio JSON export")
    imported.add_argument("file", help="Label Studio's JSON export (a list of tasks)")
    imported.add_argument("--model", help="whose class names the choices are (default the "
                          "device model)")
    imported.set_defaults(run=_import)
    oracle = steps.add_parser("oracle", help="benchmarks only: label from Fashion-MNIST's "
                              "ground truth")
    oracle.add_argument("--all", action="store_true", help="candidates too, not only queued")
    oracle.set_defaults(run=_oracle)


def add_learn_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    learn = commands.add_parser("learn", help="retrain the device model on the field's labels "
                                "and ship it as a canary (active learning)")
    steps = learn.add_subparsers(dest="learn_command", required=True)
    retrain = steps.add_parser("retrain", help="fine-tune on the labels plus replay, measure "
                               "beside stable, push as a canary, apply the promotion rule")
    retrain.add_argument("--model", help="default the device model")
    retrain.add_argument("--no-push", action="store_true", help="train and measure only")
    retrain.add_argument("--watch-s", type=_seconds, default=0.0, help="then wait this long for "
                         "the cohort's feedback and decide (default: decide once, now)")
    retrain.add_argument("--json", help="write the result here too")
    retrain.set_defaults(run=_retrain)
    loop = steps.add_parser("loop", help="the whole loop in one command, over real processes: "
                            "drift alert, samples selected, labelled, retrained canary, "
                            "promotion (shift, labels and feedback emulated)")
    loop.add_argument("--devices", type=_count, default=3, help="devices (clients with "
                      "active learning on) talking to the cloud server")
    loop.add_argument("--clean", type=_count, default=300,
                      help="clean images per device first")
    loop.add_argument("--labels", type=_count, default=120, help="labels the core-set picks")
    loop.add_argument("--candidates", type=_count, default=200,
                      help="samples in the label queue before labelling starts")
    loop.add_argument("--watch-s", type=_seconds, default=180.0,
                      help="the longest any step may take")
    loop.add_argument("--out", default="reports/learn-loop",
                      help="results folder (results.json, loop.png)")
    loop.add_argument("--keep", action="store_true",
                      help="keep the cloud's registry, label queue and config in OUT/work "
                      "(default: removed); the later `tierwise labels` and `tierwise "
                      "registry` commands take its config with --config")
    loop.set_defaults(run=_loop)
    promote = steps.add_parser("promote", help="apply the promotion rule to the canary now")
    promote.add_argument("--model", help="default the device model")
    promote.set_defaults(run=_promote)


def store_of(config: Config) -> LabelStore:
    from tierwise.cloud import label_store

    return label_store(config)


def _model(config: Config, model: str | None) -> str:
    from tierwise.active.retrain import device_model_name

    return model or device_model_name(config, config.models_dir)


def _class_names(config: Config, model: str) -> list[str]:
    from tierwise.models.store import load_info, model_dir

    names = load_info(model_dir(config.models_dir, model)).labels
    if not names:
        raise LabelError(f"{model}: its metadata names no classes (labels); import it with "
                         "--labels")
    return names


def _list(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    items = store_of(config).items(args.state, args.model, args.limit)
    table = Table(title=f"label queue: {len(items)} shown")
    for column in ("id", "state", "sampler", "score", "model", "version", "device",
                   "answer", "label", "received"):
        table.add_column(column)
    for item in items:
        table.add_row(item.id[:12], item.state, item.sampler, f"{item.score:.3f}", item.model,
                      item.model_version, item.device,
                      "" if item.predicted is None else str(item.predicted),
                      "" if item.label is None else str(item.label),
                      datetime.datetime.fromtimestamp(item.received_at).isoformat(
                          timespec="seconds"))
    wide_console().print(table)
    return 0


def _summary(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    store = store_of(config)
    print(json.dumps({"samples": store.counts(), "uploads": store.uploads()}, indent=2))
    return 0


def _select(args: argparse.Namespace) -> int:
    from tierwise.active.cloud import model_embeddings

    config = load_config(args.config)
    model = _model(config, args.model)
    method = args.method or config.active.select
    embed = model_embeddings(config.models_dir, model) if method == "core-set" else None
    chosen = store_of(config).select(args.budget, model, method, embed)
    print(f"queued {len(chosen)} of {model}'s candidates for labelling ({method})")
    return 0


def _label(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    store = store_of(config)
    item = store.item(args.id)
    label = args.label
    if not label.isdigit():
        names = _class_names(config, item.model)
        if label not in names:
            raise LabelError(f"label: {label!r} is not one of {item.model}'s classes {names}")
        label = names.index(label)
    item = store.label(item.id, int(label))
    print(f"{item.id[:12]}: label {item.label}")
    return 0


def _export(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    model = _model(config, args.model)
    names = _class_names(config, model)
    store = store_of(config)
    tasks = store.export_label_studio(store.items(args.state, model), names)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(tasks))
    view = out.with_name(out.stem + ".label_config.xml")
    view.write_text(label_studio_config(names))
    print(f"{len(tasks)} tasks -> {out}; labelling config -> {view}")
    return 0


def _import(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    model = _model(config, args.model)
    path = Path(args.file)
    try:
        tasks = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LabelError(f"{path}: not a Label Studio JSON export ({error})") from None
    result = store_of(config).import_label_studio(tasks, _class_names(config, model))
    print(f"{path}: {result.describe()}")
    return 0


def _oracle(args: argparse.Namespace) -> int:
    from tierwise.active.cloud import fashion_mnist_oracle

    config = load_config(args.config)
    states = ("candidate", "queued") if args.all else ("queued",)
    labelled, unknown = store_of(config).oracle(fashion_mnist_oracle(config.data.path),
                                                states=states)
    print(f"oracle (Fashion-MNIST ground truth): labelled {labelled}"
          + (f"; {unknown} not in the dataset, left unlabelled" if unknown else ""))
    return 0


def _retrain(args: argparse.Namespace) -> int:
    from tierwise.active.retrain import retrain

    config = load_config(args.config)
    console = Console()
    result = retrain(config, store_of(config), model=args.model, push=not args.no_push)
    stable, candidate = result.stable, result.candidate
    console.print(
        f"retrained {result.model} (from version {result.base_version}) on {result.trained_on} "
        f"field labels + {result.replay} replayed; {result.held_out} held out; "
        f"{result.seconds:.0f} s")
    table = Table(title="held-out accuracy")
    for column in ("", "field labels held out", "validation split"):
        table.add_column(column)
    for name, evaluation in (("stable", stable), ("candidate", candidate)):
        table.add_row(name, "-" if evaluation.field_accuracy is None else
                      f"{evaluation.field_accuracy:.2%} of {evaluation.field_samples}",
                      f"{evaluation.validation_accuracy:.2%} of "
                      f"{evaluation.validation_samples}")
    console.print(table)
    if result.version is None:
        console.print(f"not pushed ({'--no-push' if args.no_push else 'no registry key here'})"
                      f"; the candidate is in {result.candidate_dir}")
    else:
        console.print(f"pushed as canary version {result.version} "
                      f"(share {config.active.retrain.canary_share:g})")
        result.decision = _decide(config, result.model, args.watch_s, console)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
    return 0


def _decide(config: Config, model: str, watch_s: float, console: Console) -> dict[str, object]:
    """The promotion rule, now and then every few seconds for `watch_s` while it waits."""
    from tierwise.active.retrain import apply, decide

    store = store_of(config)
    deadline = time.monotonic() + watch_s
    while True:
        decision = decide(config, store, model)
        if decision.action != "wait" or time.monotonic() >= deadline:
            break
        time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))
    apply(config, decision, model)
    console.print(f"promotion rule: [bold]{decision.action}[/] ({decision.reason})")
    return {"action": decision.action, "reason": decision.reason, "canary": decision.canary}


def _loop(args: argparse.Namespace) -> int:
    from tierwise.active.loop import run_loop
    from tierwise.zoo.build import ensure_zoo

    config = load_config(args.config)
    ensure_zoo(config, ("device", "cloud"))
    run_loop(config, Path(args.out), devices=args.devices, clean=args.clean,
             labels=args.labels, candidates=args.candidates, watch_s=args.watch_s,
             keep=args.keep)
    return 0


def _promote(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    decision = _decide(config, _model(config, args.model), 0.0, Console())
    return 0 if decision["action"] != "none" else 1


def errors() -> tuple[type[Exception], ...]:
    from tierwise.active.loop import LoopError
    from tierwise.active.retrain import RetrainError

    return (LabelError, RetrainError, LoopError)
