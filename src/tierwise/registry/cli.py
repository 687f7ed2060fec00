"""`tierwise registry keygen | push | ls | show | promote | pause | rollback` and `tierwise
devices enroll | rotate | revoke | ls`: run at the cloud tier, on the registry's directory
(`registry.root`, default <data_dir>/registry)."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tierwise.config import load_config
from tierwise.registry.credentials import DEFAULT_OVERLAP_S, ROLES, Credentials
from tierwise.registry.signing import PRIVATE_KEY_FILE, keygen, load_private_key, rotate_token
from tierwise.registry.store import CHANNELS, PushResult, Registry, Rollout, registry_of


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    registry = commands.add_parser("registry", help="signed model versions and their rollout")
    steps = registry.add_subparsers(dest="registry_command", required=True)
    keygen_parser = steps.add_parser("keygen", help="an Ed25519 signing key pair and API token")
    keygen_parser.add_argument("--force", action="store_true", help="replace the signing "
                               "key pair (the API token stays)")
    keygen_parser.add_argument("--rotate-token", action="store_true", help="replace only the "
                               "operator's API token (the signing key stays)")
    push = steps.add_parser("push", help="store models as new signed versions and roll them out")
    push.add_argument("names", nargs="*", help="models (their heads and tails go with them)")
    push.add_argument("--all", action="store_true", help="every model in --models")
    push.add_argument("--models", help="models directory (default: <data_dir>/models)")
    push.add_argument("--channel", choices=CHANNELS,
                      help="default canary (a model's first version always goes to stable)")
    push.add_argument("--share", type=float, help="canary share, 0..1 (default "
                      "registry.canary_share)")
    push.add_argument("--tiers", help="comma-separated tiers that run it (default: those whose "
                      "tiers.*.models list it)")
    steps.add_parser("ls", help="every model: stable, canary, share")
    show = steps.add_parser("show", help="a model's versions, lineage, history and devices")
    show.add_argument("model", help="the model's name in the registry")
    promote = steps.add_parser("promote", help="raise the canary's share, or make it stable")
    promote.add_argument("model", help="the model whose canary is promoted")
    promote.add_argument("--share", type=float, help="the new share (default: all: stable)")
    for name, text in (("pause", "hold the canary: no more devices get it"),
                       ("rollback", "drop the canary, or return to the previous stable")):
        steps.add_parser(name, help=text).add_argument(
            "model", help="the model's name in the registry")
    for parser in steps.choices.values():
        parser.set_defaults(run=run)

    devices = commands.add_parser("devices", help="per-device credentials at the cloud: "
                                  "enroll, rotate, revoke, list")
    device_steps = devices.add_subparsers(dest="devices_command", required=True)
    enroll = device_steps.add_parser("enroll", help="a new bearer token for a device or an "
                                     "edge server (shown once; stored as a hash)")
    enroll.add_argument("id", help="the device's or server's id (letters, digits, '.', '_', "
                        "'@', '-'), as it sends it (registry.device_id)")
    enroll.add_argument("--role", choices=ROLES, default="device", help="what the token may "
                        "do: device, edge (also introspects device tokens), or operator "
                        "(everything)")
    rotate = device_steps.add_parser("rotate", help="a new token; the old ones keep working "
                                     "for --overlap-s")
    rotate.add_argument("id", help="the enrolled id whose token is replaced")
    rotate.add_argument("--overlap-s", type=float, default=DEFAULT_OVERLAP_S,
                        help="how long the old tokens stay valid (default a day)")
    device_steps.add_parser("revoke", help="end every token of an id now").add_argument(
        "id", help="the enrolled id whose tokens end")
    device_steps.add_parser("ls", help="every credential: id, role, created, expiry, revoked")
    for parser in device_steps.choices.values():
        parser.set_defaults(run=run_devices)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    registry = registry_of(config)
    console = Console()
    command = args.registry_command
    if command == "keygen" and args.rotate_token:
        console.print(f"new operator API token in {rotate_token(registry.keys_dir)}; the "
                      "signing key is unchanged")
    elif command == "keygen":
        private, public, token = keygen(registry.keys_dir, overwrite=args.force)
        console.print(f"signing key {private} (keep it here), public key {public} (give it to "
                      f"every edge server and device: registry.public_key), API token {token}")
    elif command == "push":
        models_dir = Path(args.models) if args.models else config.models_dir
        if not args.names and not args.all:
            raise SystemExit("registry push: name the models to push, or pass --all")
        key = load_private_key(registry.keys_dir / PRIVATE_KEY_FILE)
        results = registry.push_all(
            config, models_dir, key, names=None if args.all else list(args.names),
            channel=args.channel, canary_share=args.share,
            tiers=args.tiers.split(",") if args.tiers else None)
        for result in results:
            console.print(describe_push(result))
    elif command == "ls":
        console.print(_rollout_table(registry.rollouts()))
    elif command == "show":
        _show(console, registry, args.model)
    else:
        action = {"promote": lambda m: registry.promote(m, args.share),
                  "pause": registry.pause, "rollback": registry.rollback}[command]
        console.print(_rollout_table([action(args.model)]))
    return 0


def run_devices(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    credentials = Credentials(registry_of(config).index_location)
    console = Console()
    command = args.devices_command
    try:
        if command == "enroll":
            token = credentials.enroll(args.id, args.role)
            console.print(f"{_plain(args.id)} enrolled as {args.role}; its token (shown once: "
                          f"give it to that {args.role} as registry.token):\n{token}")
        elif command == "rotate":
            token = credentials.rotate(args.id, args.overlap_s)
            console.print(f"{_plain(args.id)}: new token (the old ones work for "
                          f"{args.overlap_s:g} s more):\n{token}")
        elif command == "revoke":
            count = credentials.revoke(args.id)
            console.print(f"{_plain(args.id)}: {count} token(s) revoked")
        else:
            table = Table("id", "role", "created", "expires", "revoked")
            for row in credentials.list():
                table.add_row(_plain(row["id"]), row["role"], _time(row["created_at"]),
                              _time(row["expires_at"]) if row["expires_at"] else "-",
                              _time(row["revoked_at"]) if row["revoked_at"] else "-")
            console.print(table)
    except ValueError as error:
        raise SystemExit(f"tierwise devices {command}: {error}") from None
    return 0


def describe_push(result: PushResult) -> str:
    where = {"stable": "stable", "canary": f"canary at {result.canary_share:.0%}"}.get(
        result.channel, "on no channel (a dropped canary; --channel puts it on one)")
    verb = "pushed" if result.new else "unchanged, already"
    return (f"{result.model}: {verb} version {result.version} ({result.files} files, "
            f"{result.bytes / 1024:,.0f} KiB), {where}")


def _rollout_table(rollouts: list[Rollout]) -> Table:
    table = Table("model", "stable", "canary", "share", "state")
    for r in rollouts:
        state = "paused" if r.paused else ("rolling out" if r.canary else "")
        table.add_row(_plain(r.model), str(r.stable or "-"), str(r.canary or "-"),
                      f"{r.canary_share:.0%}" if r.canary else "-", state)
    return table


def _show(console: Console, registry: Registry, model: str) -> None:
    rollout = registry.require(model)
    console.print(_rollout_table([rollout]))
    versions = Table("version", "created", "step", "from", "runs on", "files", "KiB",
                     "test accuracy", title=f"{model}: versions")
    for v in registry.versions(model):
        lineage = v["lineage"]
        origin = f"{lineage['parent']} v{lineage['parent_version']}" if lineage["parent"] \
            else (f"v{lineage['previous_version']}" if lineage["previous_version"] else "-")
        versions.add_row(*map(_plain, (v["version"], v["created_at"], lineage["step"], origin,
                                       ",".join(v["runs_on"]))),
                         str(v["files"]), f"{v['bytes'] / 1024:,.0f}",
                         "-" if v["test_accuracy"] is None else f"{v['test_accuracy']:.2%}")
    console.print(versions)
    history = Table("at", "action", "version", "detail", title="history")
    for event in registry.events(model):
        history.add_row(_time(event["at"]), _plain(event["action"]),
                        _plain(str(event["version"])), _plain(event["detail"]))
    console.print(history)
    devices = Table("device", "channel", "version", "last poll", title="subscribers")
    for device in registry.devices(model):
        devices.add_row(_plain(device["device"]), _plain(device["channel"]),
                        _plain(str(device["version"])), _time(device["seen_at"]))
    console.print(devices)


def _plain(stored: object) -> str:
    """Stored text as it is to be printed: rich markup escaped, control characters (ESC
    sequences) shown as escapes, never interpreted by the terminal."""
    text = str(stored)
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return escape(text)


def _time(epoch_s: float) -> str:
    return datetime.datetime.fromtimestamp(epoch_s).strftime("%Y-%m-%d %H:%M:%S")
