"""The Flower app of `tierwise fl run`: a ServerApp and a ClientApp, plus our compression.

What Flower gives us and we use as is: the SuperLink / SuperNode deployment engine, the
Message API, and its FedAvg and FedProx strategies (sampling, weighted averaging, FedProx's
`proximal-mu`). What we add, as small pieces that plug into Flower's own extension points:

- `CompressionMod`, a ClientApp mod: it decodes a compressed global model on the way in, and
  on the way out replaces the trained weights with the compressed *update* (new - global),
  keeping the error-feedback residual in the node's `Context.state`, which Flower keeps on
  the device across rounds. The server tells it which compressor to use (message config).
- `CompressedStrategy`, a wrapper around any Flower `Strategy`: it adds the compressor to
  each round's config, optionally sends the global model 8-bit quantized, and decodes every
  reply (global + update) before the wrapped strategy aggregates, so FedAvg and FedProx
  aggregate plain weights.
- The round loop in `main`: Flower's `Strategy.start` waits for all sampled nodes up to one
  timeout and blocks while too few nodes are connected; edge clients vanish and straggle, so
  ours closes a round at its deadline with whoever answered (if at least `min_fraction` did),
  does not send new work to a node still busy with an old round, and takes in nodes that
  join late. Each round is appended to a JSON-lines progress file the orchestrator follows.

Raw samples never leave a client: a reply carries only the (compressed) update and metrics.
"""

from __future__ import annotations

import functools
import json
import math
import queue
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from tierwise.data.fashion_mnist import load_fashion_mnist, load_splits
from tierwise.learn.compression import SPEC_KEY, make_compressor, payload_shapes, payload_spec
from tierwise.learn.partition import partition

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
POLL_S = 0.5  # each outstanding reply is polled this often (every poll costs the SuperLink)


# ---------------------------------------------------------------- compression, both ends
def to_record(payload: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in payload.items()})


def is_compressed(record: ArrayRecord) -> bool:
    return SPEC_KEY in record  # a compressor's payload names its compressor


def _scalar(config: ConfigRecord, key: str,
            default: float | None = None) -> bool | int | float | str | bytes:
    """`config[key]`, or `default` when it is absent and one is given (else KeyError);
    ValueError when it is a list or an array rather than one value."""
    value = config[key] if default is None else config.get(key, default)
    if isinstance(value, list | Array):
        raise ValueError(f"config {key!r}: expected one value, got {value!r}")
    return value


def _int(config: ConfigRecord, key: str, default: int | None = None) -> int:
    return int(_scalar(config, key, default))


def _float(config: ConfigRecord, key: str, default: float | None = None) -> float:
    return float(_scalar(config, key, default))


def from_record(record: ArrayRecord, shapes: list[tuple[int, ...]] | None = None
                ) -> list[np.ndarray]:
    """The float32 arrays a record stands for, compressed or not; with `shapes`, a record of
    other shapes raises ValueError before anything is decoded."""
    if not is_compressed(record):
        arrays = record.to_numpy_ndarrays()
        claimed = [a.shape for a in arrays]
    else:
        payload = {k: v.numpy() for k, v in record.items()}
        claimed = payload_shapes(payload)
    if shapes is not None and claimed != shapes:
        raise ValueError(f"expected tensors of shapes {shapes}, got {claimed}")
    if not is_compressed(record):
        return arrays
    return make_compressor(payload_spec(payload)).decode(payload)


class CompressionMod:
    """ClientApp mod: compressed model in, compressed update out (see the module docstring)."""

    RESIDUAL = "tierwise.residual"

    def __call__(self, msg: Message, context: Context, call_next: Any) -> Message:
        if msg.metadata.message_type != "train" or not msg.has_content():
            return call_next(msg, context)
        config = msg.content.config_records[CONFIG]
        spec = str(config.get("compressor", "none"))
        compressor = make_compressor(spec)
        global_weights = from_record(msg.content.array_records[ARRAYS])
        msg.content[ARRAYS] = ArrayRecord([w.copy() for w in global_weights])
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        new_weights = reply.content.array_records[ARRAYS].to_numpy_ndarrays()
        update = [n - g for n, g in zip(new_weights, global_weights, strict=True)]
        residual = None
        if compressor.error_feedback and self.RESIDUAL in context.state:
            residual = context.state.array_records[self.RESIDUAL].to_numpy_ndarrays()
        seed = _int(config, "seed", 0) * 1_000_003 + _int(config, "server-round", 0)
        rng = np.random.default_rng([seed, msg.metadata.dst_node_id])
        payload, residual = compressor.encode(update, residual, rng)
        if residual is not None:
            context.state[self.RESIDUAL] = ArrayRecord(residual)
        reply.content[ARRAYS] = to_record(payload)
        return reply


class CompressedStrategy(Strategy):
    """Wraps a Flower strategy: compressor in the config, decode before aggregating."""

    def __init__(self, base: Strategy, compressor: str = "none", downlink: str = "none",
                 seed: int = 0) -> None:
        make_compressor(compressor)  # fail early on a bad spec
        self.base, self.compressor, self.downlink, self.seed = base, compressor, downlink, seed
        self._global: list[np.ndarray] | None = None
        self.rejected: list[dict[str, Any]] = []  # replies of the last round that did not decode

    def summary(self) -> None:
        self.base.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays.to_numpy_ndarrays()
        config["compressor"] = self.compressor
        config["seed"] = self.seed
        if self.downlink != "none":
            payload, _ = make_compressor(self.downlink).encode(
                self._global, None, np.random.default_rng([self.seed, server_round]))
            arrays = to_record(payload)
        return self.base.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global is None:
            raise RuntimeError("aggregate_train before configure_train")
        shapes = [g.shape for g in self._global]
        decoded, self.rejected = [], []
        for reply in replies:
            if not reply.has_error():
                try:  # one client's bad update is dropped, never the round
                    update = from_record(reply.content.array_records[ARRAYS], shapes)
                except (KeyError, ValueError) as error:
                    self.rejected.append({"node": reply.metadata.src_node_id,
                                          "reason": f"{type(error).__name__}: {error}"})
                    continue
                reply.content[ARRAYS] = ArrayRecord(
                    [g + u for g, u in zip(self._global, update, strict=True)])
            decoded.append(reply)
        return self.base.aggregate_train(server_round, decoded)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return None


# ---------------------------------------------------------------- the ClientApp
@functools.lru_cache(maxsize=2)
def client_data(data_dir: str, validation_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training images clients split among themselves: Fashion-MNIST's training set less
    the validation images the server keeps (`tierwise.data.load_splits`) to calibrate the
    exported model. Cached: the warm SuperExec loads it once, before it forks."""
    splits = load_splits(data_dir or None, validation_size, seed)
    return splits.train_x, splits.train_y


client_app = ClientApp(mods=[CompressionMod()])


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    import torch

    from tierwise.learn.model import get_weights, local_train, model_from

    received = time.time()
    torch.set_num_threads(1)
    config = msg.content.config_records[CONFIG]
    node = context.node_config
    client = int(node["partition-id"])
    images, labels = client_data(str(node["data-dir"]), _int(config, "validation-size"),
                                 _int(config, "data-seed"))
    parts = partition(labels, _int(config, "num-partitions"), str(config["partition"]),
                      seed=_int(config, "seed"), alpha=_float(config, "alpha"),
                      labels_per_client=_int(config, "labels-per-client"))
    mine = parts.parts[client]
    model = model_from(msg.content.array_records[ARRAYS].to_numpy_ndarrays())
    server_round = _int(config, "server-round")
    stats = local_train(
        model, images[mine], labels[mine], steps=_int(config, "local-steps"),
        batch_size=_int(config, "batch-size"), learning_rate=_float(config, "lr"),
        momentum=_float(config, "momentum"), proximal_mu=_float(config, "proximal-mu", 0.0),
        seed=_int(config, "seed") * 7919 + client * 104729 + server_round)
    # emulated device speed: stretch the measured training time by the node's compute_scale
    scale = float(node.get("compute-scale", 1.0))
    if scale > 1.0:
        time.sleep(stats["train_s"] * (scale - 1.0))
    metrics = MetricRecord({"num-examples": len(mine), "train-loss": stats["train_loss"],
                            "train-s": stats["train_s"], "compute-scale": scale,
                            "partition-id": client, "received-at": received,
                            "trained-at": time.time()})
    return Message(RecordDict({ARRAYS: ArrayRecord(get_weights(model)), METRICS: metrics}),
                   reply_to=msg)


# ---------------------------------------------------------------- the ServerApp
server_app = ServerApp()


class Progress:
    """The JSON-lines file the orchestrator follows: one object per event, flushed at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, kind: str, **fields: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"event": kind, "t": time.time(), **fields}) + "\n")


def make_strategy(spec: dict[str, Any]) -> CompressedStrategy:
    common = {"fraction_train": spec["fraction_train"], "fraction_evaluate": 0.0,
              "min_train_nodes": 1, "min_evaluate_nodes": 0, "min_available_nodes": 1}
    if spec["strategy"] == "fedprox":
        base: Strategy = FedProx(proximal_mu=spec["proximal_mu"], **common)
    elif spec["strategy"] == "fedavg":
        base = FedAvg(**common)
    else:
        raise ValueError(f"strategy {spec['strategy']!r}: expected fedavg or fedprox")
    return CompressedStrategy(base, spec["compressor"], spec["downlink"], spec["seed"])


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    spec = json.loads(Path(str(context.run_config["spec"])).read_text())
    progress = Progress(Path(spec["progress"]))
    try:
        run_rounds(grid, spec, progress)
    except Exception as error:
        progress.write("error", message=f"{type(error).__name__}: {error}")
        raise


def run_rounds(grid: Grid, spec: dict[str, Any], progress: Progress) -> None:
    import torch

    from tierwise.learn.model import evaluate, initial_weights, model_from

    torch.set_num_threads(spec.get("eval_threads", 2))
    test_x, test_y = load_fashion_mnist(spec["data_dir"] or None, "test")
    probe = np.random.default_rng(spec["seed"]).permutation(len(test_x))[:spec["eval_images"]]
    strategy = make_strategy(spec)
    weights = initial_weights(spec["seed"])
    train_config = {
        "num-partitions": spec["clients"], "validation-size": spec["validation_size"],
        "data-seed": spec["data_seed"], "partition": spec["partition"],
        "alpha": spec["alpha"], "labels-per-client": spec["labels_per_client"],
        "local-steps": spec["local_steps"], "batch-size": spec["batch_size"],
        "lr": spec["learning_rate"], "momentum": spec["momentum"],
    }
    # the first round waits (up to one deadline) for the clients started with the run
    expected = spec.get("clients_at_start", spec["clients"])
    waited = time.monotonic() + spec["round_deadline_s"]
    while len(list(grid.get_node_ids())) < expected and time.monotonic() < waited:
        time.sleep(0.2)
    initial = evaluate(model_from(weights), test_x[probe], test_y[probe])
    progress.write("start", nodes=sorted(grid.get_node_ids()), accuracy=initial["accuracy"])
    puller = ReplyPuller(grid)
    try:
        weights = _rounds(grid, spec, progress, strategy, puller, weights, train_config,
                          test_x[probe], test_y[probe])
    finally:
        puller.close()
    final = evaluate(model_from(weights), test_x, test_y)
    out = Path(spec["weights"])
    np.savez(out, *weights)
    progress.write("done", accuracy=final["accuracy"], loss=final["loss"], weights=str(out))


def _rounds(grid: Grid, spec: dict[str, Any], progress: Progress, strategy: CompressedStrategy,
            puller: ReplyPuller, weights: list[np.ndarray], train_config: dict[str, Any],
            probe_x: np.ndarray, probe_y: np.ndarray) -> list[np.ndarray]:
    from tierwise.learn.model import evaluate, model_from

    for server_round in range(1, spec["rounds"] + 1):
        started = time.time()
        busy = puller.busy_nodes()
        messages = [m for m in strategy.configure_train(
            server_round, ArrayRecord(weights), ConfigRecord(dict(train_config)), grid)
            if m.metadata.dst_node_id not in busy]
        sent = dict(zip(grid.push_messages(messages),
                        (m.metadata.dst_node_id for m in messages), strict=True))
        for message_id, node in sent.items():
            puller.want(message_id, node, server_round)
        replies, failed, late = puller.collect(server_round, len(sent),
                                               started + spec["round_deadline_s"])
        needed = max(1, math.ceil(spec["min_fraction"] * len(sent)))
        answered = [r for r in replies if not r.has_error()]
        closed = time.time()
        if len(answered) >= needed:
            new, _ = strategy.aggregate_train(server_round, answered)
            failed += strategy.rejected  # replies that did not decode: dropped, reported
            if new is not None:
                weights = new.to_numpy_ndarrays()
        metrics = evaluate(model_from(weights), probe_x, probe_y)
        progress.write(
            "round", round=server_round, started=started, closed=closed,
            round_s=closed - started, sent=sorted(sent.values()),
            answered=sorted(r.metadata.src_node_id for r in answered),
            failed=failed, late=late, aggregated=len(answered) >= needed, needed=needed,
            missed=sorted(puller.busy_nodes()),
            accuracy=metrics["accuracy"], loss=metrics["loss"],
            clients={str(r.metadata.src_node_id): {
                k: float(v) for k, v in r.content[METRICS].items()
                if isinstance(v, int | float)} for r in answered})
    return weights


class ReplyPuller:
    """Pulls each reply in a thread of its own, so a round can close on time.

    Flower's `Grid.pull_messages` returns a reply only once all of its objects are in: while a
    client is still uploading its update over a slow link, the call blocks until the upload
    ends (34 s in one test, for a 6.7 MB update at 250 KB/s). The round loop must not wait on
    that, and one slow upload must not hold back replies that are complete, so every sent
    message gets a thread that pulls just its reply; the round waits on their common queue,
    up to the deadline.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.wanted: dict[str, tuple[int, int]] = {}  # message id -> (node, round)
        self.replies: queue.Queue[tuple[Message, int, int]] = queue.Queue()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def want(self, message_id: str, node: int, server_round: int) -> None:
        with self.lock:
            self.wanted[message_id] = (node, server_round)
        threading.Thread(target=self._pull, args=(message_id,), name=f"pull-{node}",
                         daemon=True).start()

    def busy_nodes(self) -> set[int]:
        """Nodes with work not yet answered: no new work for them."""
        with self.lock:
            return {node for node, _ in self.wanted.values()}

    def _pull(self, message_id: str) -> None:
        while not self.stop.is_set():
            for reply in self.grid.pull_messages([message_id]):
                with self.lock:
                    node, server_round = self.wanted.pop(message_id)
                self.replies.put((reply, node, server_round))
                return
            self.stop.wait(POLL_S)

    def collect(self, server_round: int, expected: int, deadline: float
                ) -> tuple[list[Message], list[dict], list[dict]]:
        """This round's replies, until all `expected` are in or the deadline passes; the
        failures among them; and late replies to earlier rounds (dropped)."""
        replies: list[Message] = []
        failed: list[dict] = []
        late: list[dict] = []
        while len(replies) < expected:
            try:
                reply, node, of_round = self.replies.get(timeout=max(0.0, deadline - time.time()))
            except queue.Empty:
                break
            if of_round != server_round:
                late.append({"node": node, "round": of_round})
                continue
            if reply.has_error():
                failed.append({"node": node, "reason": reply.error.reason})
            replies.append(reply)
        return replies, failed, late

    def close(self) -> None:
        self.stop.set()
