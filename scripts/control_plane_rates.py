"""How fast the control plane's shared state goes, for docs/scale.md's arithmetic: signed
deployment documents per second (a device's poll: a new device is written down, a known
one read) and traces stored per second, on SQLite and on PostgreSQL (a throwaway server
on loopback, as the tests start one). Run after `make demo` (it pushes the zoo):

    .venv/bin/python scripts/control_plane_rates.py [--devices 2000] [--traces 20000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from postgres import new_database, postgres_server
from tierwise.client.trace import StageTrace, Trace
from tierwise.config import load_config
from tierwise.monitor.collector import Collector
from tierwise.protocol.traces import parse_batch
from tierwise.registry.signing import PRIVATE_KEY_FILE, keygen, load_private_key
from tierwise.registry.store import Registry


def measure(location: str, scratch: Path, devices: int, traces: int) -> dict[str, float]:
    config = load_config(None)
    registry = Registry(scratch / "registry", location)
    keygen(registry.keys_dir)
    key = load_private_key(registry.keys_dir / PRIVATE_KEY_FILE)
    for model in ("fmnist-device", "fmnist-edge", "fmnist-cloud"):
        registry.push(config, config.models_dir, model, key)
    started = time.perf_counter()
    for i in range(devices):
        registry.deployment("stable", f"device-{i}")
    new_per_s = devices / (time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(devices):
        registry.deployment("stable", f"device-{i}")
    known_per_s = devices / (time.perf_counter() - started)
    collector = Collector(location)
    stage = StageTrace("local", "device", "m", "1", 1.0, 1.0)
    batches = [parse_batch(orjson.dumps({"device": f"d{b}", "traces": [
        Trace(plan="local(m)", total_ms=1.0, stages=[stage]).to_dict() for _ in range(500)]}))
        for b in range(traces // 500)]
    started = time.perf_counter()
    for batch in batches:
        collector.store(batch)
    traces_per_s = traces / (time.perf_counter() - started)
    return {"deployments_new_device_per_s": new_per_s,
            "deployments_known_device_per_s": known_per_s, "traces_per_s": traces_per_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--traces", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        sqlite = measure(str(Path(scratch) / "sqlite" / "index.db"), Path(scratch) / "s",
                         args.devices, args.traces)
        with postgres_server() as server:
            postgres = measure(new_database(server), Path(scratch) / "p", args.devices,
                               args.traces)
    for name, rates in (("sqlite", sqlite), ("postgresql", postgres)):
        print(name, {key: round(value) for key, value in rates.items()})


if __name__ == "__main__":
    main()
