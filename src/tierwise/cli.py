"""`tierwise ...`: the command line. Each command imports only what it needs, so `serve` and
the device side never import torch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from tierwise.bench.workload import WORKLOADS as WORKLOAD_CHOICES
from tierwise.config import DEVICE_TIER, Config, ConfigError, load_config
from tierwise.data.images import EvalDataError
from tierwise.database import DatabaseError
from tierwise.learn.federation import FederationError
from tierwise.models.importer import ModelImportError
from tierwise.models.inputs import InputError
from tierwise.models.preprocess import PreprocessError
from tierwise.registry import RegistryError
from tierwise.tasks import TaskError

# Bad input a user can give: each names the file, field or argument and what was expected.
TierwiseInputError = (EvalDataError, ModelImportError, InputError, PreprocessError, TaskError)


def _config_show(args: argparse.Namespace) -> int:
    import tomllib

    import tomli_w

    config = load_config(args.config)
    effective = config.model_dump(mode="json", exclude_none=True)
    sources = effective["prices"].pop("sources")
    text = tomli_w.dumps(effective)
    tomllib.loads(text)  # what we print must load back
    print(text.rstrip())
    print("\n# price book sources")
    for field, source in sources.items():
        print(f"#   {field}: {source}")
    for section in ("tiers", "links"):  # each site's own prices
        for name, settings in getattr(config, section).items():
            if settings.price_source:
                print(f"#   {section}.{name}: {settings.price_source}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from tierwise.data import find_fashion_mnist, load_splits

    config = load_config(args.config)
    where = find_fashion_mnist(config.data.path)
    splits = load_splits(config.data.path, config.data.validation_size, config.data.seed)
    print(f"Fashion-MNIST at {where}: train {len(splits.train_x)}, validation "
          f"{len(splits.val_x)}, test {len(splits.test_x)} (seed {config.data.seed})")
    return 0


def _zoo_train(args: argparse.Namespace) -> int:
    from tierwise.zoo.build import ensure_zoo

    config = load_config(args.config)
    only = tuple(args.only.split(",")) if args.only else ("device", "edge", "cloud")
    ensure_zoo(config, only, retrain=args.retrain)
    return 0


def _profile(args: argparse.Namespace) -> int:
    from tierwise.models.store import list_models
    from tierwise.profile.profiler import ensure_profiles

    config = load_config(args.config)
    if not list_models(config.models_dir):  # an empty store: the reference workload
        from tierwise.zoo.build import ensure_zoo

        ensure_zoo(config)
    only = args.only.split(",") if args.only else None
    done = ensure_profiles(config, only=only, force=args.force or bool(only))
    if not done:
        print("every profile is current (use --force to measure again)")
    return 0


def _optimize(args: argparse.Namespace) -> int:
    """`tierwise optimize <step>`: make variants, register them, profile them for the planner;
    write what was measured to <out>/<step>.json."""
    import json

    from rich.console import Console
    from rich.progress import Progress

    from tierwise.data import load_splits
    from tierwise.profile.profiler import ensure_profiles
    from tierwise.zoo.build import ensure_zoo

    config = load_config(args.config)
    if args.workload == "camera":
        return _optimize_camera(args, config)
    settings = config.optimize
    console = Console()
    out_dir = Path(args.out)
    ensure_zoo(config, console=console)
    if args.step == "report":
        from tierwise.optimize.report import build_report

        ensure_profiles(config, console=console)
        build_report(config, out_dir, test_images=args.test_images, console=console)
        console.print(f"[green]wrote[/] {out_dir}/optimize_report.json, rate_accuracy.png, "
                      f"latency_accuracy.png")
        return 0
    splits = load_splits(config.data.path, config.data.validation_size, config.data.seed)
    # only quantize, prune and split take --models
    models = args.models.split(",") if getattr(args, "models", None) else settings.models
    results: list[dict[str, object]] = []
    with Progress(console=console, transient=True) as progress:
        if args.step == "quantize":
            from tierwise.optimize.quantize import quantize_model
            from tierwise.optimize.variants import parent_info
            from tierwise.profile.evaluation import eval_set_for

            for model in models:
                info = parent_info(config.models_dir, model)
                if info.trained is None and not info.eval_data:
                    raise ConfigError(f"--models {model}: an imported model is measured on its "
                                      "own evaluation data; import it with --eval DATA")
                data = splits if info.trained is not None else eval_set_for(
                    info, config.profile.eval_limit)
                results += [o.to_dict() for o in quantize_model(
                    config.models_dir, model, data,
                    calibration_images=settings.quantize.calibration_images,
                    accuracy_budget=settings.accuracy_budget)]
        elif args.step == "prune":
            from tierwise.optimize.prune import prune_model

            for model in models:
                for ratio in settings.prune.ratios:
                    results.append(prune_model(
                        config.models_dir, model, splits, ratio, settings.prune.finetune,
                        accuracy_budget=settings.accuracy_budget, progress=progress).to_dict())
        elif args.step == "distill":
            from tierwise.optimize.distill import distill

            results.append(distill(config.models_dir, settings.distill, splits,
                                   accuracy_budget=settings.accuracy_budget,
                                   progress=progress).to_dict())
        elif args.step == "bottleneck":
            from tierwise.optimize.bottleneck import train_bottlenecks

            results += [o.to_dict() for o in train_bottlenecks(
                config.models_dir, settings.bottleneck, splits, progress=progress)]
        else:  # split
            from tierwise.optimize.split import export_all_splits

            for model in models:
                points = export_all_splits(config.models_dir, model, splits.val_x[:32])
                results.append({"model": model, "split_points": points,
                                "checked": "tail(head(x)) == model(x) within 1e-4"})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.step}.json").write_text(json.dumps(results, indent=1) + "\n")
    for row in results:
        console.print(row)
    ensure_profiles(config, console=console)
    console.print(f"[green]wrote[/] {out_dir / (args.step + '.json')}")
    return 0


def _optimize_camera(args: argparse.Namespace, base: Config) -> int:
    """`tierwise optimize bottleneck --workload camera`: learned bottlenecks for the camera's
    device model (EfficientNet-Lite0) distilled from Lite2 on the training frames, judged on
    the profile frames (validation) and the test frames; the rate–fidelity report beside."""
    from rich.console import Console
    from rich.progress import Progress

    from tierwise.bench.workload import WorkloadError, frames_dir, load_workload
    from tierwise.data.images import load_frames
    from tierwise.models.store import list_models
    from tierwise.optimize.bottleneck import train_imported_bottlenecks
    from tierwise.optimize.report import bottleneck_report
    from tierwise.profile.evaluation import eval_set_for
    from tierwise.profile.profiler import ensure_profiles

    if args.step != "bottleneck":
        raise ConfigError(f"tierwise optimize {args.step} --workload camera: only "
                          "`bottleneck` takes the camera workload (its INT8 variants are "
                          "made when it is installed; prune and distill need a model "
                          "trained here)")
    console = Console()
    try:
        config = load_workload("camera", base, console).config  # camera_config(base)
    except WorkloadError as error:
        raise ConfigError(f"--workload camera: {error}") from None
    settings = config.optimize.bottleneck
    info, _ = list_models(config.models_dir)[settings.model]
    test = eval_set_for(info.model_copy(update={"eval_data": str(frames_dir(config) / "test")}))
    train = load_frames(frames_dir(config) / "train").images
    try:
        with Progress(console=console, transient=True) as progress:
            outcomes = train_imported_bottlenecks(
                config.models_dir, settings, train, test=test,
                validation_limit=config.profile.eval_limit, progress=progress)
    except ValueError as error:  # a setting the model cannot take: the message names it
        if not str(error).startswith("optimize.bottleneck"):
            raise
        raise ConfigError(str(error)) from None
    ensure_profiles(config, console=console)
    bottleneck_report(config, outcomes, Path(args.out), test=test, console=console)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from tierwise.config import config_from_dict
    from tierwise.serving import TierApp, serve

    config = load_config(args.config)
    if config.kind(args.tier) == DEVICE_TIER:  # ConfigError for a tier not configured
        raise ConfigError(f"--tier: the device tier runs inside the app; serve one of "
                          f"{config.sites()}")
    overrides = {
        "max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.max_queue_delay_ms,
        "compute_scale": args.compute_scale, "max_body_bytes": args.max_body_bytes,
        "require_auth": True if args.require_auth else None, "engine": args.engine,
    }
    tier_settings = {**config.tier(args.tier).model_dump(),
                     **{k: v for k, v in overrides.items() if v is not None}}
    if args.ray_address is not None:
        tier_settings["ray"] = {**tier_settings["ray"], "address": args.ray_address}
    # validated like a config file, so a bad flag is named: tiers.edge.max_batch_size: ...
    # (with the site's link: a named site must have one)
    section: dict[str, object] = {"tiers": {args.tier: tier_settings}}
    if args.tier in config.links:
        section["links"] = {args.tier: config.links[args.tier].model_dump()}
    tier = config_from_dict(section, "command line").tiers[args.tier]
    registry_url = args.registry_url or (config.registry.url if not args.models else "")
    host = args.host or tier.host
    port = args.port if args.port is not None else tier.port
    spec = TierApp(args.tier, tier, config,
                   # absolute: a Ray replica builds it in another working directory
                   models_dir=Path(args.models).resolve() if args.models else None,
                   registry_url=registry_url, threads=args.threads, channel=args.channel,
                   device_id=args.device_id or f"{args.tier}-{host}-{port}")
    serve(spec, host, port)
    return 0


def _certs_init(args: argparse.Namespace) -> int:
    from tierwise.net.tls import init_certs

    config = load_config(args.config)
    directory = Path(args.dir) if args.dir else Path(config.data_dir) / "certs"
    hosts = [host.strip() for host in args.hosts.split(",") if host.strip()]
    devices = [device.strip() for device in args.devices.split(",") if device.strip()]
    try:
        issued = init_certs(directory, hosts, devices, overwrite=args.force)
    except ValueError as error:
        raise ConfigError(f"tierwise certs init: {error}") from None
    print(f"CA {issued.ca}; server certificate {issued.server_cert} for {', '.join(hosts)}")
    for device, (cert, key) in issued.devices.items():
        print(f"device {device}: {cert}, {key}")
    print("\nServers (tierwise.toml):\n[tls]\n"
          f'cert = "{issued.server_cert}"\nkey = "{issued.server_key}"\n'
          f'client_ca = "{issued.ca}"   # optional: require device certificates\n'
          "\nDevices and other clients:\n[tls]\n"
          f'ca = "{issued.ca}"'
          + ("".join(f'\nclient_cert = "{cert}"\nclient_key = "{key}"'
                     for cert, key in list(issued.devices.values())[:1])))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tierwise.bench.demo import run_demo
    from tierwise.bench.workload import WorkloadError

    config = load_config(args.config)
    try:
        run_demo(config, report_dir=Path(args.report_dir) if args.report_dir else None,
                 workload=args.workload, images=args.images)
    except WorkloadError as error:
        raise SystemExit(f"tierwise demo --workload {args.workload}: {error}") from None
    return 0


def _bench_fleet(args: argparse.Namespace) -> int:
    from tierwise.bench.fleet import STRATEGIES, FleetSettings, run_bench_fleet

    strategies = tuple(name.strip() for name in (args.strategies or ",".join(STRATEGIES))
                       .split(",") if name.strip())
    if not strategies or any(name not in STRATEGIES for name in strategies):
        raise ConfigError(f"--strategies: expected some of {', '.join(STRATEGIES)}, "
                          f"got {args.strategies!r}")
    settings = FleetSettings(duration_s=args.duration_s, rate=args.rate,
                             deadline_ms=args.deadline_ms, compute_scale=args.compute_scale,
                             flood=args.flood, strategies=strategies)
    run_bench_fleet(load_config(args.config), settings, Path(args.out))
    return 0


def _bench_rollout(args: argparse.Namespace) -> int:
    from tierwise.bench.rollout import run_bench_rollout

    config = load_config(args.config)
    run_bench_rollout(config, Path(args.out), duration_s=args.duration_s,
                      swap_every_s=args.swap_every_s, poll_s=args.poll_s,
                      concurrency=args.concurrency)
    return 0


def _bench_durability(args: argparse.Namespace) -> int:
    from tierwise.bench.durability import run_bench_durability

    run_bench_durability(load_config(args.config), Path(args.out), args.requests)
    return 0


def _bench_decide(args: argparse.Namespace) -> int:
    from tierwise.bench.decide import run_bench_decide

    try:
        counts = [int(part) for part in args.candidates.split(",")]
    except ValueError:
        counts = []
    if not counts or any(count < 1 for count in counts):
        raise ConfigError(f"--candidates: expected positive counts like 50,200, got "
                          f"{args.candidates!r}")
    run_bench_decide(load_config(args.config), Path(args.out), counts, args.repeats)
    return 0


def _bench_drift(args: argparse.Namespace) -> int:
    from tierwise.bench.drift import run_bench_drift
    from tierwise.zoo.build import ensure_zoo

    config = load_config(args.config)
    ensure_zoo(config, ("device",))
    run_bench_drift(config, Path(args.out), clean=args.clean, shifted=args.shifted,
                    window=args.window, step=args.step)
    return 0


def _bench_active(args: argparse.Namespace) -> int:
    from tierwise.bench.active import run_bench_active
    from tierwise.zoo.build import ensure_zoo

    config = load_config(args.config)
    ensure_zoo(config, ("device", "cloud"))
    samplers = tuple(name.strip() for name in args.samplers.split(",") if name.strip())
    try:
        run_bench_active(config, Path(args.out), devices=args.devices, rounds=args.rounds,
                         stream=args.stream, budget=args.budget, seeds=args.seeds,
                         test_size=args.test_size, samplers=samplers)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return 0


def _report(args: argparse.Namespace) -> int:
    import time

    from tierwise.monitor.report import views_for, write_report

    config = load_config(args.config)
    since = time.time() - args.last_s if args.last_s else 0.0
    views = views_for(config, since)
    path = write_report(views, Path(args.out))
    print(f"report of {len(views.records):,} requests: {path}")
    return 0


def _bench_routing(args: argparse.Namespace) -> int:
    from tierwise.bench.routing import run_bench_routing

    run_bench_routing(load_config(args.config), args)
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.engine == "ray":
        from tierwise.bench.engines import run_bench_engines

        if args.url or args.workload != "fashion-mnist":
            raise ConfigError("bench serve --engine ray starts both servers itself on "
                              "Fashion-MNIST: drop --url and --workload")
        args.concurrency = args.concurrency or "1,8,32,128"
        run_bench_engines(config, args)
        return 0
    from tierwise.bench.serve import run_bench_serve

    args.concurrency = args.concurrency or "1,8,32"
    run_bench_serve(config, args)
    return 0


def _bench_bandwidth(args: argparse.Namespace) -> int:
    from tierwise.bench.bandwidth import SweepSettings, log_levels, run_bench_bandwidth
    from tierwise.config import parse_rate

    config = load_config(args.config)
    try:
        low, high = (parse_rate(rate) for rate in args.range.split(".."))
    except ValueError as error:
        raise ConfigError(f"--range: expected LOW..HIGH rates like '1KB/s..10MB/s', got "
                          f"{args.range!r} ({error})") from None
    if args.levels < 2 or not low < high:
        raise ConfigError(f"--range/--levels: need low < high and at least 2 levels, got "
                          f"{args.range!r} with {args.levels}")
    settings = SweepSettings(levels=log_levels(low, high, args.levels), images=args.images,
                             deadline_ms=args.deadline_ms, min_accuracy=args.min_accuracy,
                             oracle_images=args.oracle_images)
    run_bench_bandwidth(config, Path(args.out or f"reports/bench-bandwidth-{args.workload}"),
                        settings, link_mode=args.link, workload=args.workload)
    return 0


def _bench_trace(args: argparse.Namespace) -> int:
    from tierwise.bench.trace import TraceSettings, run_bench_trace
    from tierwise.bench.workload import WorkloadError

    config = load_config(args.config)
    settings = TraceSettings(rate_per_s=args.rate, deadline_ms=args.deadline_ms,
                             min_accuracy=args.min_accuracy, speed=args.speed)
    try:
        run_bench_trace(config, Path(args.trace), Path(args.out), settings,
                        link_mode=args.link, workload=args.workload)
    except WorkloadError as error:
        raise SystemExit(f"tierwise bench trace --workload {args.workload}: {error}") from None
    return 0


def _positive(kind: type) -> Callable[[str], object]:
    def parse(text: str) -> object:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return parse


def _add_slo_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deadline-ms", type=_positive(float),
                        help="every request's deadline (default: the workload's; "
                        "fashion-mnist 100, camera 1000)")
    parser.add_argument("--min-accuracy", type=float,
                        help="every request's quality floor, a fraction (default: the "
                        "workload's; fashion-mnist 0.93 accuracy, camera 0.95 fidelity)")
    parser.add_argument("--link", choices=["emulated", "tc"], default="emulated",
                        help="emulated: paced in the client transport; tc: servers in network "
                        "namespaces, bandwidth enforced by the kernel (root only)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierwise", description=__doc__)
    parser.add_argument("--config", help="tierwise.toml (default: $TIERWISE_CONFIG, ./tierwise.toml"
                        ", else built-in defaults)")
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="the effective configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_commands.add_parser("show", help="print the effective config as TOML").set_defaults(
        run=_config_show)

    data = commands.add_parser("data", help="the dataset")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    data_commands.add_parser("check", help="find Fashion-MNIST, or say how to install it"
                             ).set_defaults(run=_data_check)

    zoo = commands.add_parser("zoo", help="the default model zoo")
    zoo_commands = zoo.add_subparsers(dest="zoo_command", required=True)
    train = zoo_commands.add_parser("train", help="train, calibrate and export what is missing")
    train.add_argument("--retrain", action="store_true", help="train even if cached")
    train.add_argument("--only", help="comma-separated architectures (device,edge,cloud)")
    train.set_defaults(run=_zoo_train)

    profile = commands.add_parser("profile", help="measure models for the planner (compute per "
                                  "block, bytes and accuracy per split point and codec, "
                                  "cascade curves); stored as profile.json beside each model")
    profile.add_argument("--only", help="comma-separated model names (measured again)")
    profile.add_argument("--force", action="store_true", help="measure even if current")
    profile.set_defaults(run=_profile)

    optimize = commands.add_parser(
        "optimize", help="make smaller, faster variants and split codecs; measure them")
    optimize_commands = optimize.add_subparsers(dest="step", required=True)
    for step, text in (
            ("quantize", "INT8 variants (ONNX Runtime: dynamic, static QDQ per-channel)"),
            ("prune", "structured channel pruning, fine-tuned (optimize.prune.ratios)"),
            ("distill", "a device student taught by the cloud model, beside a label-only one"),
            ("bottleneck", "learned bottlenecks at a split (optimize.bottleneck)"),
            ("split", "export a head and a tail at every block boundary, checked"),
            ("report", "rate–accuracy and latency–accuracy of everything, on test data")):
        step_parser = optimize_commands.add_parser(step, help=text)
        step_parser.add_argument("--out", default="reports/optimize", help="where results go")
        step_parser.add_argument("--workload", choices=WORKLOAD_CHOICES,
                                 default="fashion-mnist",
                                 help="fashion-mnist: the zoo trained here; camera: "
                                 "EfficientNet-Lite0 on street-camera frames, judged by its "
                                 "fidelity to Lite2 (bottleneck only)")
        if step in ("quantize", "prune", "split"):
            step_parser.add_argument("--models", help="comma-separated models (default: "
                                "optimize.models)")
        if step == "report":
            step_parser.add_argument("--test-images", type=int, default=10000,
                                     help="Fashion-MNIST test images (the first N) accuracy "
                                     "is measured on")
        step_parser.set_defaults(run=_optimize)

    certs = commands.add_parser("certs", help="TLS: a local CA, server and device "
                                "certificates")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True)
    certs_init = certs_commands.add_parser(
        "init", help="a CA (kept if there is one), a server certificate for --hosts and a "
        "client certificate per --devices id; prints the [tls] settings that use them")
    certs_init.add_argument("--dir", help="default <data_dir>/certs")
    certs_init.add_argument("--hosts", default="127.0.0.1,localhost",
                            help="comma-separated names and addresses the servers answer on")
    certs_init.add_argument("--devices", default="", help="comma-separated device ids")
    certs_init.add_argument("--force", action="store_true", help="make a new CA even if one "
                            "exists (every certificate it signed stops verifying)")
    certs_init.set_defaults(run=_certs_init)

    serve = commands.add_parser("serve", help="run a tier server (OIP v2 over HTTP)")
    serve.add_argument("--tier", required=True, help="which configured server tier (site) "
                       "this is: edge, cloud, or a site of the config's [tiers] by its name")
    serve.add_argument("--host", help="address to listen on (default: tiers.<tier>.host)")
    serve.add_argument("--port", type=int, help="port to listen on (default: "
                       "tiers.<tier>.port)")
    serve.add_argument("--models", help="directory of models (default: <data_dir>/models)")
    serve.add_argument("--max-batch-size", type=int, help="most rows per batched model call "
                       "(default: tiers.<tier>.max_batch_size)")
    serve.add_argument("--max-queue-delay-ms", type=float, help="ms a batch that is not full "
                       "waits for more requests (default: tiers.<tier>.max_queue_delay_ms)")
    serve.add_argument("--compute-scale", type=float, help="emulate a slower server")
    serve.add_argument("--max-body-bytes", type=int, help="larger requests get 413")
    serve.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    serve.add_argument("--registry-url", help="serve what this registry deploys (default "
                       "registry.url; none: serve --models)")
    serve.add_argument("--channel", choices=["stable", "canary"], help="default registry.channel")
    serve.add_argument("--device-id", help="this server's id for canary cohorts")
    serve.add_argument("--require-auth", action="store_true", help="inference and /metrics "
                       "need a bearer token (tiers.<tier>.require_auth; see "
                       "docs/how-to/tls-and-credentials.md)")
    serve.add_argument("--engine", choices=["process", "ray"], help="one process, or Ray "
                       "Serve deployments with autoscaling (default tiers.<tier>.engine)")
    serve.add_argument("--ray-address", help="with --engine ray: an existing Ray cluster "
                       "(default tiers.<tier>.ray.address; empty: a local Ray instance)")
    serve.set_defaults(run=_serve)

    from tierwise.models.cli import add_commands as add_models_commands
    from tierwise.registry.cli import add_commands as add_registry_commands

    add_models_commands(commands)
    add_registry_commands(commands)

    from tierwise.bench.fl import add_command as add_fl_bench
    from tierwise.learn.cli import add_commands as add_fl_commands

    add_fl_bench(add_fl_commands(commands))

    from tierwise.active.cli import add_commands as add_labels_commands
    from tierwise.active.cli import add_learn_commands

    add_labels_commands(commands)
    add_learn_commands(commands)

    report = commands.add_parser("report", help="one HTML file with plots of what the "
                                 "telemetry collector stored (latency, tier mix, cost, drift)")
    report.add_argument("--out", default="reports/report.html", help="the HTML file written")
    report.add_argument("--last-s", type=_positive(float), help="only the last N seconds")
    report.set_defaults(run=_report)

    demo = commands.add_parser("demo", help="the end-to-end demo (what `make demo` runs)")
    demo.add_argument("--workload", choices=WORKLOAD_CHOICES, default="fashion-mnist",
                      help="fashion-mnist: the zoo trained here; camera: pretrained "
                      "EfficientNet-Lite0/1/2 on street-camera frames (needs opencv-doc)")
    demo.add_argument("--images", type=int, help="requests per strategy (default: "
                      "demo.images, 2000; the camera's: 200 frames)")
    demo.add_argument("--report-dir", help="where the table and plots go (default "
                      "reports/demo, reports/demo-camera)")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="benchmarks; results are written to files")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    bench_serve = bench_commands.add_parser(
        "serve", help="closed-loop OIP v2 load against a tier server")
    bench_serve.add_argument("--url", help="a running server (default: start a batch-1 and "
                             "a dynamic-batching server on loopback)")
    bench_serve.add_argument("--workload", choices=WORKLOAD_CHOICES, default="fashion-mnist",
                             help="fashion-mnist: Fashion-MNIST images to fmnist-edge; camera: "
                             "street-camera frames to efficientnet-lite0 (needs opencv-doc)")
    bench_serve.add_argument("--model", help="default: fmnist-edge, efficientnet-lite0")
    bench_serve.add_argument("--engine", choices=["process", "ray"], default="process",
                             help="ray: the single-process server and Ray Serve (1 replica, "
                             "then autoscaled to 2) side by side, with start-up, memory and "
                             "time to scale up (reports/bench-serve-ray)")
    bench_serve.add_argument("--compute-scale", type=float, default=1.0, help="--engine "
                             "ray: emulate slower compute in both servers (a replica then "
                             "holds each request longer, so replicas rather than the CPU limit "
                             "throughput)")
    bench_serve.add_argument("--concurrency", help="comma-separated client counts (default "
                             "1,8,32; --engine ray: 1,8,32,128)")
    bench_serve.add_argument("--duration-s", type=float, default=5.0, help="seconds of "
                             "measured load per server, payload and client count (after a "
                             "warm-up of a fifth of it, at most 1 s)")
    bench_serve.add_argument("--out", help="default reports/bench-serve (camera: "
                             "reports/bench-serve-camera)")
    bench_serve.add_argument("--models", help="models directory of the servers started here "
                             "and of in-process ONNX Runtime (default: the workload's)")
    bench_serve.add_argument("--payloads", help="comma-separated: json (JSON tensors), binary "
                             "(binary tensors); default json,binary (camera: binary)")
    bench_serve.add_argument("--threads", type=int, default=1,
                             help="ONNX Runtime intra-op threads of the servers started here "
                             "and of in-process ONNX Runtime")
    bench_serve.add_argument("--max-batch-size", default="auto", help="the batching "
                             "server's: a number, or auto (default): the batch size of the most "
                             "in-process throughput, up to tiers.edge.max_batch_size")
    bench_serve.add_argument("--max-queue-delay-ms", type=float, help="the batching server's "
                             "(default: a quarter of one request's in-process compute)")
    bench_serve.set_defaults(run=_bench_serve)

    routing = bench_commands.add_parser(
        "routing", help="OIP inference through the hand-written ASGI vs through Starlette, "
        "side by side")
    routing.add_argument("--model", default="fmnist-edge", help="the model inferred on, with "
                         "Fashion-MNIST images")
    routing.add_argument("--models", help="default <data_dir>/models")
    routing.add_argument("--concurrency", default="1,8", help="comma-separated client counts")
    routing.add_argument("--rounds", type=_positive(int), default=3, help="interleaved rounds "
                         "per routing and concurrency; the median is reported")
    routing.add_argument("--duration-s", type=_positive(float), default=5.0,
                         help="seconds of measured load per run")
    routing.add_argument("--warmup-s", type=float, default=1.0,
                         help="seconds of unmeasured load before each run")
    routing.add_argument("--out", default="reports/bench-routing",
                         help="results folder (results.json, table.md, routing.png)")
    routing.set_defaults(run=_bench_routing)

    bandwidth = bench_commands.add_parser(
        "bandwidth", help="every strategy across a sweep of uplink bandwidth, with an oracle")
    bandwidth.add_argument("--workload", choices=WORKLOAD_CHOICES, default="fashion-mnist",
                           help="fashion-mnist: the zoo trained here; camera: pretrained "
                           "EfficientNet-Lite0/1/2 on street-camera frames (needs opencv-doc)")
    bandwidth.add_argument("--range", default="1KB/s..10MB/s", help="low..high uplink rates")
    bandwidth.add_argument("--levels", type=int, default=9, help="log-spaced levels (default 9)")
    bandwidth.add_argument("--images", type=_positive(int), default=200,
                           help="requests per strategy and level, the same for every one "
                           "(default 200)")
    bandwidth.add_argument("--oracle-images", type=_positive(int), default=60,
                           help="requests per candidate plan when the oracle screens them")
    bandwidth.add_argument("--out", help="default reports/bench-bandwidth-<workload>")
    _add_slo_flags(bandwidth)
    bandwidth.set_defaults(run=_bench_bandwidth)

    drift = bench_commands.add_parser(
        "drift", help="detection delay and false alarms of each drift detector per shift")
    drift.add_argument("--clean", type=_positive(int), default=1000,
                       help="clean images before the shift (false alarms are counted here)")
    drift.add_argument("--shifted", type=_positive(int), default=1000,
                       help="shifted images after the shift, per shift (the detection delay "
                       "is counted here)")
    drift.add_argument("--window", type=_positive(int), default=200,
                       help="images in each detector's sliding window (against a 500-image "
                       "reference)")
    drift.add_argument("--step", type=_positive(int), default=25,
                       help="the detectors score every this many images")
    drift.add_argument("--out", default="reports/bench-drift",
                       help="results folder (results.json, drift.png)")
    drift.set_defaults(run=_bench_drift)

    from tierwise.bench.active import SAMPLERS

    active = bench_commands.add_parser(
        "active", help="active learning: accuracy on a shifted stream against labels spent, "
        "per sampler, beside random and labelling everything; bytes per device")
    active.add_argument("--devices", type=_positive(int), default=4,
                        help="emulated devices, each seeing --stream images per round")
    active.add_argument("--rounds", type=_positive(int), default=12,
                        help="rounds of select, label and retrain")
    active.add_argument("--stream", type=_positive(int), default=500,
                        help="images each device sees per round")
    active.add_argument("--budget", type=_positive(int), default=40,
                        help="labels per round, all devices together")
    active.add_argument("--seeds", type=_positive(int), default=3,
                        help="repeats of each run on other streams, averaged")
    active.add_argument("--test-size", type=_positive(int), default=2000,
                        help="held-out shifted test images every model is measured on")
    active.add_argument("--samplers", default=",".join(SAMPLERS),
                        help=f"comma-separated, of {', '.join(SAMPLERS)}")
    active.add_argument("--out", default="reports/bench-active",
                        help="results folder (results.json, label-efficiency.png)")
    active.set_defaults(run=_bench_active)

    decide = bench_commands.add_parser(
        "decide", help="the planner's decision time against the number of candidate plans")
    decide.add_argument("--candidates", default="50,100,200,400",
                        help="comma-separated candidate counts (default 50,100,200,400)")
    decide.add_argument("--repeats", type=_positive(int), default=5000,
                        help="decisions timed per candidate count")
    decide.add_argument("--out", default="reports/bench-decide",
                        help="results folder (results.json)")
    decide.set_defaults(run=_bench_decide)

    durability = bench_commands.add_parser(
        "durability", help="per-inference latency with durable telemetry on and off")
    durability.add_argument("--requests", type=_positive(int), default=2000,
                            help="inferences per mode (default 2000)")
    durability.add_argument("--out", default="reports/bench-durability",
                            help="results folder (results.json, table.md)")
    durability.set_defaults(run=_bench_durability)

    rollout = bench_commands.add_parser(
        "rollout", help="edge-server latency while registry versions roll, beside steady")
    rollout.add_argument("--duration-s", type=_positive(float), default=20.0,
                         help="length of each phase (default 20)")
    rollout.add_argument("--swap-every-s", type=_positive(float), default=2.0,
                         help="a promote or rollback this often while rolling (default 2)")
    rollout.add_argument("--poll-s", type=_positive(float), default=0.5,
                         help="the subscribers' poll period (default 0.5)")
    rollout.add_argument("--concurrency", type=_positive(int), default=4,
                         help="closed-loop clients sending to the edge server")
    rollout.add_argument("--out", default="reports/bench-rollout",
                         help="results folder (results.json, rollout.png)")
    rollout.set_defaults(run=_bench_rollout)

    fleet = bench_commands.add_parser(
        "fleet", help="edge sites on loopback, one overloaded and one killed mid-run: "
        "tierwise against nearest-only, round-robin and least-RTT routing")
    fleet.add_argument("--duration-s", type=_positive(float), default=30.0,
                       help="length of each strategy's run (default 30)")
    fleet.add_argument("--rate", type=_positive(float), default=30.0,
                       help="Poisson arrivals per second (default 30)")
    fleet.add_argument("--deadline-ms", type=_positive(float), default=40.0,
                       help="every request's deadline, ms (misses are counted against it)")
    fleet.add_argument("--compute-scale", type=_positive(float), default=20.0,
                       help="the sites' emulated compute, × this host's (default 20)")
    fleet.add_argument("--flood", type=_positive(int), default=16,
                       help="clients overloading the nearest site (default 16)")
    fleet.add_argument("--strategies", help="comma-separated, of tierwise, nearest-only, "
                       "round-robin, least-RTT (default all)")
    fleet.add_argument("--out", default="reports/bench-fleet",
                       help="results folder (results.json, table.md, bench-fleet.png)")
    fleet.set_defaults(run=_bench_fleet)

    trace = bench_commands.add_parser(
        "trace", help="replay a bandwidth trace (CSV) while streaming requests")
    trace.add_argument("--trace", default="traces/commute.csv",
                       help="CSV: t_s,bandwidth_up_bytes_per_s,bandwidth_down_bytes_per_s,rtt_ms")
    trace.add_argument("--rate", type=_positive(float), default=20.0,
                       help="requests per second, per strategy (default 20)")
    trace.add_argument("--speed", type=_positive(float), default=1.0,
                       help="replay the trace this many times faster (default 1)")
    trace.add_argument("--workload", choices=WORKLOAD_CHOICES, default="fashion-mnist",
                       help="fashion-mnist: the zoo trained here; camera: pretrained "
                       "EfficientNet-Lite0/1/2 on street-camera frames (needs opencv-doc)")
    trace.add_argument("--out", default="reports/bench-trace", help="results folder "
                       "(results.json, table.md, requests.jsonl, trace.png)")
    _add_slo_flags(trace)
    trace.set_defaults(run=_bench_trace)
    return parser


def _reported_errors() -> tuple[type[Exception], ...]:
    """The errors `main` reports in one line, with exit status 2."""
    from tierwise.active.cli import errors as active_errors

    return (ConfigError, RegistryError, FederationError, DatabaseError, FileNotFoundError,
            FileExistsError, *TierwiseInputError, *active_errors())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except _reported_errors() as error:
        # bad config, traces or registry input; DatasetMissingError; a federation that
        # could not start or failed (its message says which log to read); a database that
        # does not connect or is of another schema version
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
