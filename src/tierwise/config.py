"""The one config file (`tierwise.toml`): tiers, links, the price book, SLOs, the data directory.

Every field has a built-in default, so no file is needed for a first run. A file is validated
once, here, at the edge of the system; errors name the field and what was expected, e.g.
``links.edge.bandwidth_up: expected a rate like '250KB/s', got '-3'``. Code past this point
trusts its types.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

CONFIG_ENV = "TIERWISE_CONFIG"
DATA_ENV = "TIERWISE_DATA"
DATABASE_ENV = "TIERWISE_DATABASE_URL"  # registry.database and telemetry.collector_db
DEFAULT_CONFIG_FILE = "tierwise.toml"
DEVICE_TIER = "device"  # the tier inside the app; every other tier is a server

_RATE_UNITS_BYTES = {
    "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
    "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
}
_RATE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-z]+)\s*/\s*s\s*$", re.IGNORECASE)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the field and what was expected."""


def parse_rate(value: object) -> float:
    """Parse a link rate into bytes per second: '250KB/s', '1.5MB/s', '8Mbit/s' or a number.

    KB, MB and GB are decimal (1 KB = 1000 bytes), KiB and MiB binary, kbit/Mbit are bits.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a rate like '250KB/s', got {value!r}")
    if isinstance(value, int | float):
        rate = float(value)
    elif isinstance(value, str):
        match = _RATE_RE.match(value)
        unit = match.group(2).lower() if match else ""
        if not match or unit not in _RATE_UNITS_BYTES:
            raise ValueError(f"expected a rate like '250KB/s', got {value!r}")
        rate = float(match.group(1)) * _RATE_UNITS_BYTES[unit]
    else:
        raise ValueError(f"expected a rate like '250KB/s', got {value!r}")
    if not rate > 0:
        raise ValueError(f"expected a positive rate like '250KB/s', got {value!r}")
    return rate


def format_rate(bytes_per_s: float) -> str:
    """The inverse of `parse_rate`, for display: 250000 -> '250KB/s'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if bytes_per_s >= scale:
            return f"{bytes_per_s / scale:g}{unit}/s"
    return f"{bytes_per_s:g}B/s"


Rate = Annotated[float, BeforeValidator(parse_rate)]


def parse_size(value: object) -> int:
    """A number of bytes: '2MB', '512KiB', or a number (the units of `parse_rate`)."""
    if isinstance(value, str) and not value.strip().endswith("/s"):
        try:
            return int(parse_rate(value.strip() + "/s"))
        except ValueError:
            raise ValueError(f"expected a size like '2MB', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"expected a size like '2MB', got {value!r}")
    return int(value)


Size = Annotated[int, BeforeValidator(parse_size)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


KINDS = ("device", "edge", "cloud")


class RayServeConfig(_Section):
    """How `tierwise serve --engine ray` runs a tier on Ray Serve: where, how many replicas,
    and when Ray Serve's autoscaler adds or removes one (on ongoing requests per replica)."""

    address: str = Field(
        "", description="an existing Ray cluster: its GCS address ('host:6379'), 'auto', or "
        "'ray://host:10001'; empty: start a local Ray instance for this server")
    min_replicas: int = Field(1, ge=0, le=1000, description="fewest replicas of the server's "
                              "deployment the autoscaler keeps (0: it may scale to none); it "
                              "starts with at least 1")
    max_replicas: int = Field(1, ge=1, le=1000, description="most replicas of the server's "
                              "deployment the autoscaler runs")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="requests in flight per replica the autoscaler steers to")
    max_ongoing_requests: int = Field(
        256, ge=1, description="requests one replica takes at once (its batcher queues them); "
        "more wait in Ray Serve's proxy, which backs off while every replica is full")
    upscale_delay_s: float = Field(2.0, ge=0, description="how long load must stay above the "
                                   "target before a replica is added")
    downscale_delay_s: float = Field(20.0, ge=0, description="how long load must stay below "
                                     "the target before a replica is removed")
    metrics_interval_s: float = Field(10.0, gt=0, description="how often each replica "
                                      "reports its ongoing requests to the autoscaler")
    look_back_period_s: float = Field(30.0, gt=0, description="the window ongoing requests "
                                      "are averaged over before a decision; longer than "
                                      "metrics_interval_s")
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs each replica reserves")
    proxy_location: Literal["HeadOnly", "EveryNode"] = Field(
        "HeadOnly", description="where Ray Serve's HTTP proxy runs: HeadOnly answers at this "
        "server's host:port; EveryNode on each node of the cluster at the same port")

    @model_validator(mode="after")
    def _replicas_in_order(self) -> RayServeConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas "
                             f"({self.min_replicas})")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(f"look_back_period_s ({self.look_back_period_s:g}) must be longer "
                             f"than metrics_interval_s ({self.metrics_interval_s:g})")
        return self


class TierConfig(_Section):
    """One tier, or site: the device (inside the app), or a server (`tierwise serve`) at an
    edge site or in the cloud. Any number of edge and cloud sites, each by its own name."""

    kind: Literal["device", "edge", "cloud"] | None = Field(
        None, description="device, edge or cloud; default the tier's own name (a tier named "
        "otherwise, e.g. 'edge-paris', must say)")
    region: str = Field("", description="where this site processes data, e.g. 'eu-west'")
    usd_per_hour: float | None = Field(
        None, ge=0, description="what an hour of this site's server costs; default the price "
        "book's for its kind (prices.edge_usd_per_hour, prices.cloud_usd_per_hour)")
    price_source: str = Field("", description="where usd_per_hour comes from (printed by "
                              "`tierwise config show`)")
    host: str = Field("127.0.0.1", description="the address `tierwise serve` listens on, and "
                      "that clients reach this site at when it has no url")
    port: int = Field(0, ge=0, le=65535, description="0: the demo picks a free port")
    url: str = Field("", description="where devices reach this site, as the cloud publishes "
                     "it in the fleet list (GET /fleet/v1/sites); empty: http(s)://host:port, "
                     "and a site with port 0 is not published")
    compute_scale: float = Field(
        1.0, gt=0, description="emulated compute speed: measured compute time is stretched by this"
    )
    max_batch_size: int = Field(32, ge=1, le=4096, description="most rows per batched model "
                                "call; a request with more rows runs alone")
    cores: int = Field(0, ge=0, le=4096, description="the server's cores: at most this many "
                       "batches compute at once, across all its models (with compute_scale, "
                       "an emulated machine of this many cores); a batch waiting for one "
                       "counts as queue time. 0: each model computes whenever it has work")
    max_queue_delay_ms: float = Field(
        0.0, ge=0, le=1000, description="how long a batch waits to fill; 0 batches what is queued"
    )
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request "
                                "body, in bytes (also after gzip/deflate decompression); a "
                                "larger one is answered 413")
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, le=16 * 1024 * 1024, description="the request line and headers "
        "together; a longer request is answered 431")
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="a request body that "
                                  "stops arriving for this long is answered 408")
    body_deadline_s: float = Field(300.0, gt=0, le=86_400, description="a request body not "
                                   "whole this long after its headers is answered 408 (a "
                                   "trickle of a byte now and then)")
    max_rows_per_request: int = Field(
        256, ge=1, le=1_000_000, description="batch rows one infer request may carry; more "
        "are refused with 400 before anything is decoded")
    max_in_flight_per_client: int = Field(
        256, ge=1, le=100_000, description="infer requests one client (its credential's id "
        "with require_auth, else its device id header, else its address) may have in the "
        "server at once; more are answered 429 with Retry-After")
    require_auth: bool = Field(
        False, description="inference, model metadata and /metrics need `Authorization: "
        "Bearer <token>` (/metrics: an operator's); clients send their registry.token to this "
        "tier. The cloud checks its credential table; an edge server asks the cloud at "
        "registry.url (RFC 7662) with its own registry.token. Health checks stay open")
    engine: Literal["process", "ray"] = Field(
        "process", description="what `tierwise serve` runs this tier on: one process "
        "(uvicorn), or Ray Serve deployments (`ray`, settings in `ray`)")
    ray: RayServeConfig = Field(default_factory=RayServeConfig)
    models: list[str] = Field(
        default_factory=list,
        description="the models this tier runs for the planner, besides those whose metadata "
        "names the tier (`tierwise models add --runs-on`); split heads/tails go with their "
        "model; the server itself serves every model in its models directory")
    variants: bool = Field(
        True, description="also plan with the registered variants of these models "
        "(`tierwise optimize`: int8, pruned, distilled)")


class LinkConfig(_Section):
    """The network between the device and one tier, as the device sees it (emulated)."""

    bandwidth_up: Rate = Field(description="device → tier, e.g. '250KB/s'")
    bandwidth_down: Rate = Field(description="tier → device")
    rtt_ms: float = Field(ge=0, le=60_000, description="round-trip time between the device "
                          "and this site, ms (emulated, and the planner's starting estimate)")
    emulate: bool = Field(True, description="enforce the rates in the client's transport")
    usd_per_gb_up: float | None = Field(
        None, ge=0, description="what a GB sent to this site costs; default the price book's "
        "for its kind")
    usd_per_gb_down: float | None = Field(None, ge=0, description="what a GB back costs")
    price_source: str = Field("", description="where the per-GB prices come from")


class PriceBook(_Section):
    """What compute, bytes and energy cost. Defaults are public list prices (see `sources`)."""

    edge_usd_per_hour: float = Field(0.17, ge=0, description="USD per hour of an edge "
                                     "server; a request pays for the compute time it used")
    cloud_usd_per_hour: float = Field(0.526, ge=0, description="USD per hour of a cloud "
                                      "server; a request pays for the compute time it used")
    edge_link_usd_per_gb_up: float = Field(0.0, ge=0, description="USD per GB (10^9 bytes) "
                                           "sent from the device to an edge site")
    edge_link_usd_per_gb_down: float = Field(0.0, ge=0, description="USD per GB (10^9 "
                                             "bytes) sent from an edge site to the device")
    cloud_link_usd_per_gb_up: float = Field(0.0, ge=0, description="USD per GB (10^9 bytes) "
                                            "sent from the device to a cloud site")
    cloud_link_usd_per_gb_down: float = Field(0.09, ge=0, description="USD per GB (10^9 "
                                              "bytes) sent from a cloud site to the device")
    device_power_w: float = Field(6.4, ge=0, description="the device's power draw while it "
                                  "computes, watts (its energy cost, with the electricity "
                                  "price)")
    electricity_usd_per_kwh: float = Field(0.165, ge=0, description="USD per kWh of the "
                                           "device's energy")

    sources: dict[str, str] = Field(
        description="where each default price comes from, by field (printed by `tierwise "
        "config show`)",
        default_factory=lambda: {
            "edge_usd_per_hour": "AWS EC2 on-demand, c5.xlarge (4 vCPU), us-east-1, Linux: $0.17/h",
            "cloud_usd_per_hour": "AWS EC2 on-demand, g4dn.xlarge (1x T4 GPU), us-east-1, Linux: "
            "$0.526/h",
            "edge_link_usd_per_gb": "device and edge server share a LAN: no per-byte charge",
            "cloud_link_usd_per_gb_up": "AWS data transfer IN from the internet: free",
            "cloud_link_usd_per_gb_down": "AWS data transfer OUT to the internet, first 10 "
            "TB/month: $0.09/GB",
            "device_power_w": "Raspberry Pi 4 Model B under full CPU load: ~6.4 W (Raspberry Pi "
            "Ltd power figures)",
            "electricity_usd_per_kwh": "US EIA, average US residential electricity price 2024: "
            "~16.5 cents/kWh",
        }
    )

    def usd_per_hour(self, kind: str) -> float:
        """The default hourly price of a server of `kind` (edge or cloud; a device: 0)."""
        return {"edge": self.edge_usd_per_hour, "cloud": self.cloud_usd_per_hour}.get(kind, 0.0)

    def link_usd_per_gb(self, kind: str) -> tuple[float, float]:
        """The default (up, down) price per GB on the link from the device to a `kind` site."""
        if kind == "edge":
            return self.edge_link_usd_per_gb_up, self.edge_link_usd_per_gb_down
        if kind == "cloud":
            return self.cloud_link_usd_per_gb_up, self.cloud_link_usd_per_gb_down
        return 0.0, 0.0


class SLOConfig(_Section):
    """Default service-level objectives of a client; a request may override them."""

    deadline_ms: float = Field(200.0, gt=0, description="a request's end-to-end latency "
                               "budget, ms: the planner picks the cheapest plan expected to "
                               "meet it")
    min_accuracy: float = Field(0.0, ge=0, le=1, description="the least expected accuracy "
                                "(or fidelity) a plan may have, a fraction 0..1; 0: no floor")
    cascade_accuracy_margin_points: float = Field(
        0.5, ge=0, le=100,
        description="the cascade threshold is chosen to stay within this many accuracy points "
        "of the model it escalates to",
    )


class DataConfig(_Section):
    dataset: str = Field("fashion-mnist", pattern="^fashion-mnist$",
                         description="the dataset of the zoo and benchmarks; only "
                         "fashion-mnist")
    path: str | None = Field(None, description="directory with the IDX files; default: the "
                             "Debian package, or $TIERWISE_DATA")
    seed: int = Field(0, description="seeds which training images are held out for "
                      "validation")
    validation_size: int = Field(5000, ge=100, le=30000, description="training images held "
                                 "out as the validation split; the rest are trained on")


class ProfileConfig(_Section):
    """What `tierwise profile` measures."""

    max_cuts: int = Field(
        8, ge=1, le=256, description="split candidates profiled per model: a graph with more "
        "cut points keeps those on the falling envelope of feature bytes (a later cut is worth "
        "its device compute only if it sends less), evenly spaced down to this many")
    eval_limit: int = Field(500, ge=1, description="images or frames read from eval data "
                            "given as files")


class TrainConfig(_Section):
    epochs: float = Field(gt=0, le=200, description="passes over the training data; may be "
                          "fractional")
    batch_size: int = Field(128, ge=8, le=4096, description="samples per optimizer step")
    learning_rate: float = Field(0.01, gt=0, le=10, description="peak learning rate of AdamW's "
                                 "one-cycle schedule")
    train_subset: int | None = Field(None, ge=256, description="train on this many images only")


class ZooConfig(_Section):
    seed: int = Field(0, description="seeds the zoo's training: initial weights, subsets, "
                      "batch order")
    # Epochs sized so the whole zoo trains in about 10 minutes on 2 CPU cores.
    device: TrainConfig = TrainConfig(epochs=6, learning_rate=0.01)
    edge: TrainConfig = TrainConfig(epochs=5, learning_rate=0.01)
    cloud: TrainConfig = TrainConfig(epochs=5, learning_rate=0.01)


class QuantizeConfig(_Section):
    calibration_images: int = Field(512, ge=16, description="validation images that calibrate "
                                    "static INT8 activation ranges")


class PruneConfig(_Section):
    ratios: list[float] = Field([0.5], min_length=1, description="fractions of each conv's "
                                "channels removed (one variant each)")
    finetune: TrainConfig = TrainConfig(epochs=2, learning_rate=0.003)

    @field_validator("ratios")
    @classmethod
    def _fractions(cls, ratios: list[float]) -> list[float]:
        for ratio in ratios:
            if not 0 < ratio < 1:
                raise ValueError(f"expected fractions in (0, 1); {ratio} is not")
        return ratios


class DistillConfig(_Section):
    teacher: str = Field("fmnist-cloud", description="the model whose logits are the soft labels")
    student: str = Field("device", description="the zoo architecture of the student")
    temperature: float = Field(4.0, gt=0, description="softmax temperature of the soft labels")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the soft-label loss; "
                         "1 - alpha weighs the hard-label loss")
    train: TrainConfig = TrainConfig(epochs=6, learning_rate=0.01)


class BottleneckConfig(_Section):
    model: str = Field("fmnist-cloud", description="the model cut and compressed")
    split_points: list[int] = Field(default_factory=list,
                                    description="cuts to compress; empty: the deepest")
    widths: list[int] = Field([1, 2, 4, 8], min_length=1, description="code channels")
    bits: list[int] = Field([4, 8], min_length=1, description="bits per code value")
    temperature: float = Field(2.0, gt=0, description="of the uncompressed tail's soft labels")
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the soft-label loss")
    train: TrainConfig = TrainConfig(epochs=4, learning_rate=0.003)

    @field_validator("bits")
    @classmethod
    def _bits(cls, bits: list[int]) -> list[int]:
        for value in bits:
            if value not in (4, 8):
                raise ValueError(f"expected 4 or 8 bits per code value; {value} is not")
        return bits

    @field_validator("widths")
    @classmethod
    def _widths(cls, widths: list[int]) -> list[int]:
        for value in widths:
            if value < 1:
                raise ValueError(f"expected positive code widths; {value} is not")
        return widths


class OptimizeConfig(_Section):
    """`tierwise optimize`: what it makes, and the accuracy a variant may give up."""

    models: list[str] = Field(["fmnist-device", "fmnist-edge", "fmnist-cloud"],
                              description="the models quantize and prune work on")
    accuracy_budget: float = Field(
        0.01, ge=0, le=1, description="a variant whose validation accuracy is more than this "
        "below its parent's (0.01 = 1 point) is rejected, not registered")
    quantize: QuantizeConfig = QuantizeConfig()
    prune: PruneConfig = PruneConfig()
    distill: DistillConfig = DistillConfig()
    bottleneck: BottleneckConfig = BottleneckConfig()


class DemoConfig(_Section):
    images: int = Field(2000, ge=10, le=10000, description="requests per strategy in "
                        "`tierwise demo` (the camera workload: 200 frames)")
    report_dir: str = Field("reports/demo", description="where `tierwise demo` writes its "
                            "table and plots (the camera workload: this with '-camera')")


class RegistryConfig(_Section):
    """The model registry (`tierwise registry`): where it lives at the cloud tier, and how
    edge servers and devices subscribe to it."""

    root: str = Field("", description="the registry's directory at the cloud tier (artifacts, "
                      "index, keys); empty: <data_dir>/registry")
    url: str = Field("", description="where subscribers find it, e.g. http://127.0.0.1:8001 "
                     "(the cloud server); empty: serve from a models directory instead")
    channel: str = Field("stable", pattern="^(stable|canary)$",
                         description="stable: the stable version, or the canary for devices in "
                         "its cohort; canary: always the canary where there is one")
    device_id: str = Field("", description="this subscriber's id, hashed into canary cohorts; "
                           "empty: the host name")
    poll_s: float = Field(5.0, gt=0, le=3600, description="how often subscribers poll")
    fleet: bool = Field(False, description="clients also take the edge and cloud sites the "
                        "cloud at `url` publishes (GET /fleet/v1/sites), polled every poll_s: "
                        "sites added and removed while they run")
    canary_share: float = Field(0.1, gt=0, le=1,
                                description="`registry push --channel canary` default share")
    retire_grace_s: float = Field(
        30.0, ge=0, le=3600, description="how long a server keeps serving a version after it "
        "left the channel, for devices that have not polled since")
    database: str = Field("", description="the registry's index (versions, rollouts, "
                          "credentials) at the cloud: empty, <root>/index.db (SQLite); or a "
                          "postgresql:// URL that several cloud servers share (the blobs stay "
                          "under root, which they must then share too)")
    token: str = Field("", description="bearer token of the registry API; empty: "
                       "$TIERWISE_REGISTRY_TOKEN, else <root>/keys/token")
    public_key: str = Field("", description="the Ed25519 public key (PEM file) manifests must be "
                            "signed with; empty: <root>/keys/signing.pub")

    def root_dir(self, data_dir: str) -> Path:
        return Path(self.root) if self.root else Path(data_dir) / "registry"


class TelemetryConfig(_Section):
    """Traces from devices to the collector on the cloud server (`tierwise.monitor`)."""

    url: str = Field("", description="the collector (the cloud server); empty: "
                     "registry.url, else no telemetry")
    flush_s: float = Field(0.5, gt=0, le=3600, description="how often a device sends")
    batch_size: int = Field(500, ge=1, le=100_000, description="most traces per request")
    commit_s: float = Field(0.05, gt=0, le=60, description="durability bound: a trace is in "
                            "the device's outbox on disk within this (plus one commit)")
    collector_db: str = Field("", description="the collector's store at the cloud: an "
                              "SQLite file, or a postgresql:// URL that several cloud servers "
                              "share; empty: <data_dir>/telemetry/collector.db")
    dashboard_window_s: float = Field(3600.0, gt=0, description="the dashboard shows the "
                                      "traces of the last this many seconds")

    def collector_path(self, data_dir: str) -> str | Path:
        """Where the collector's store is: a path, or a postgresql:// URL."""
        if self.collector_db.startswith(("postgresql://", "postgres://")):
            return self.collector_db
        return Path(self.collector_db) if self.collector_db else \
            Path(data_dir) / "telemetry" / "collector.db"


class FederatedConfig(_Section):
    """Federated learning on Flower (`tierwise fl run`): the clients, their data and links,
    and the rounds. Links and compute scales are emulated (a shaping TCP proxy per client
    between its SuperNode and the SuperLink; a sleep that stretches measured training time)."""

    clients: int = Field(10, ge=1, le=100, description="SuperNodes, one per simulated device")
    rounds: int = Field(15, ge=1, le=1000, description="federated rounds")
    partition: str = Field("dirichlet", pattern="^(iid|dirichlet|labels)$",
                           description="how the training set is split across clients")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (partition=dirichlet)")
    labels_per_client: int = Field(2, ge=1, le=10, description="partition=labels")
    seed: int = Field(0, description="seeds the partition, initial weights, local batches "
                      "and stochastic compression")
    strategy: str = Field("fedavg", pattern="^(fedavg|fedprox)$", description="server "
                          "aggregation: fedavg, or fedprox (with proximal_mu)")
    proximal_mu: float = Field(0.01, ge=0, description="FedProx's proximal term")
    compressor: str = Field("none", pattern=r"^(none|q8|q4|topk:(0?\.[0-9]+|1(\.0*)?)(\+q[48])?)$",
                            description="update compression: none, q8, q4, "
                            "topk:F (fraction kept), topk:F+q8, topk:F+q4")
    downlink: str = Field("none", pattern="^(none|q8)$", description="the global model "
                          "as sent to clients: float32, or 8-bit stochastic quantization")
    local_steps: int = Field(20, ge=1, description="SGD steps per client per round")
    batch_size: int = Field(32, ge=1, description="images per local SGD step")
    learning_rate: float = Field(0.1, gt=0, description="clients' SGD learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="clients' SGD momentum")
    uplink: Rate = Field(250_000.0, description="each client's emulated uplink")
    downlink_rate: Rate = Field(500_000.0, description="each client's emulated downlink")
    rtt_ms: float = Field(20.0, ge=0, description="each client's emulated round-trip time")
    compute_scales: list[float] = Field(
        default_factory=lambda: [1.0], description="per-client compute_scale, cycled over the "
        "clients (2.0: a client trains at half the host's speed)")
    round_deadline_s: float = Field(120.0, gt=0, description="a round closes with the clients "
                                    "that answered by then")
    min_fraction: float = Field(0.5, gt=0, le=1, description="fewest clients (share of those "
                                "sampled) whose updates make a round; fewer: the model stays")
    fraction_train: float = Field(1.0, gt=0, le=1, description="share of connected clients "
                                  "sampled each round")
    eval_images: int = Field(2000, ge=100, le=10000, description="test images the server "
                             "scores the global model on after each round (all 10,000 at the end)")
    report_dir: str = Field("reports/fl", description="where `tierwise fl run` writes (its "
                            "run/ folder) when --out is not given")

    @field_validator("compute_scales")
    @classmethod
    def _positive_scales(cls, value: list[float]) -> list[float]:
        if not value or any(not scale >= 1.0 for scale in value):
            raise ValueError("expected a non-empty list of scales >= 1 (1: the host's speed)")
        return value

    def compute_scale(self, client: int) -> float:
        return self.compute_scales[client % len(self.compute_scales)]


PERIODS_S = {"hour": 3600.0, "day": 86_400.0, "week": 7 * 86_400.0}


class RetrainConfig(_Section):
    """`tierwise learn retrain`: fine-tuning the device model on the field's labels."""

    min_labels: int = Field(50, ge=1, description="fewest new labels a retrain starts with")
    replay: int = Field(2000, ge=0, description="samples of the old training data mixed in "
                        "(experience replay: the model keeps what it knew)")
    field_weight: int = Field(4, ge=1, le=100, description="each field label is seen this many "
                              "times per epoch for each time a replay sample is")
    holdout_share: float = Field(0.25, ge=0, lt=1, description="share of the field labels held "
                                 "out (never trained on) to measure the canary with")
    train: TrainConfig = TrainConfig(epochs=4, learning_rate=0.003, batch_size=64)
    margin: float = Field(0.0, ge=0, le=1, description="the canary may be this much less "
                          "accurate than stable on the held-out field labels, and called wrong "
                          "this much more often by its cohort, and still be promoted")
    forgetting_margin: float = Field(0.02, ge=0, le=1, description="the canary may be this "
                                     "much less accurate than stable on the dataset's "
                                     "validation split (what it was trained for before the "
                                     "field shifted) and still be promoted")
    min_feedback: int = Field(20, ge=0, description="verdicts on the canary's answers the "
                              "promotion rule waits for (0: held-out data only)")
    canary_share: float = Field(0.5, gt=0, le=1, description="the retrained canary's cohort")


class ActiveConfig(_Section):
    """Active learning from the field (`tierwise.active`): devices select the inputs worth a
    label and send them within a budget; the cloud queues them for labelling and retrains."""

    enabled: bool = Field(False, description="devices select and send samples")
    samplers: list[str] = Field(["margin"], min_length=1,
                                description="device samplers; an input's score is the best "
                                "of theirs (entropy, margin, disagreement, feedback, random). "
                                "`tierwise bench active` measures each")
    min_score: float = Field(0.5, ge=0, le=1, description="the least score that selects")
    on_drift: bool = Field(False, description="select (but for feedback) only once this "
                           "device's drift detector has raised an alert: bandwidth and labels "
                           "go to the field's shift")
    max_samples: int = Field(200, ge=0, description="samples a device sends per period")
    max_bytes: Size = Field(2_000_000, description="bytes a device sends per period, e.g. '2MB'")
    period: Literal["hour", "day", "week"] = Field("day", description="the budget's window "
                                                   "(sliding)")
    max_queued: int = Field(5000, ge=1, description="samples waiting on a device at most (the "
                            "lowest-scored make room)")
    keep_inputs: int = Field(256, ge=0, description="inputs held in memory for feedback "
                             "that comes after the answer")
    flush_s: float = Field(5.0, gt=0, le=3600, description="how often a device sends")
    batch_size: int = Field(16, ge=1, le=1000, description="most samples per request")
    url: str = Field("", description="the label queue (the cloud server); empty: "
                     "telemetry.url, else registry.url")
    label_dir: str = Field("", description="the label queue's samples at the cloud; empty: "
                           "<data_dir>/labels")
    label_db: str = Field("", description="its index: an SQLite file or a postgresql:// URL; "
                          "empty: <label_dir>/labels.db")
    select: Literal["core-set", "score"] = Field("core-set", description="how the cloud picks "
                                                 "what to label from the candidates")
    retrain: RetrainConfig = RetrainConfig()

    @field_validator("samplers")
    @classmethod
    def _known_samplers(cls, value: list[str]) -> list[str]:
        from tierwise.active.samplers import DEVICE_SAMPLERS

        for name in value:
            if name not in DEVICE_SAMPLERS:
                raise ValueError(f"{name!r}: expected one of {sorted(DEVICE_SAMPLERS)}")
        return value

    @property
    def period_s(self) -> float:
        return PERIODS_S[self.period]

    def label_root(self, data_dir: str) -> Path:
        return Path(self.label_dir) if self.label_dir else Path(data_dir) / "labels"


class TlsConfig(_Section):
    """TLS on every link (`tierwise.net.tls`; `tierwise certs init` makes the files). With
    `ca` empty, links are plain HTTP: the default, fit for loopback only."""

    ca: str = Field("", description="CA bundle (PEM) clients, subscribers and telemetry "
                    "verify servers with; empty: plain HTTP")
    cert: str = Field("", description="this server's certificate (PEM); empty: the server "
                      "speaks plain HTTP")
    key: str = Field("", description="its private key (PEM)")
    client_ca: str = Field("", description="servers: require a client certificate signed by "
                           "this CA (mutual TLS); empty: none asked for")
    client_cert: str = Field("", description="clients: this device's certificate for mutual "
                             "TLS")
    client_key: str = Field("", description="its private key (PEM)")


class Config(_Section):
    data_dir: str = Field("data", description="models, caches and stores live here")
    data: DataConfig = DataConfig()
    zoo: ZooConfig = ZooConfig()
    profile: ProfileConfig = ProfileConfig()
    tiers: dict[str, TierConfig] = Field(
        default_factory=lambda: {
            "device": TierConfig(compute_scale=1.0),
            "edge": TierConfig(max_batch_size=32),
            "cloud": TierConfig(max_batch_size=64),
        }
    )
    links: dict[str, LinkConfig] = Field(
        default_factory=lambda: {
            "edge": LinkConfig(bandwidth_up="2MB/s", bandwidth_down="5MB/s", rtt_ms=4.0),
            "cloud": LinkConfig(bandwidth_up="250KB/s", bandwidth_down="1MB/s", rtt_ms=30.0),
        }
    )
    prices: PriceBook = PriceBook()
    slo: SLOConfig = SLOConfig()
    demo: DemoConfig = DemoConfig()
    optimize: OptimizeConfig = OptimizeConfig()
    registry: RegistryConfig = RegistryConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    fl: FederatedConfig = FederatedConfig()
    active: ActiveConfig = ActiveConfig()
    tls: TlsConfig = TlsConfig()

    @model_validator(mode="after")
    def _kinds(self) -> Config:
        """Every tier knows its kind: its name's, unless it names one itself."""
        for name, tier in self.tiers.items():
            if tier.kind is None:
                if name not in KINDS:
                    raise ValueError(f"tiers.{name}.kind: expected one of {list(KINDS)} (a "
                                     "tier not named after its kind must say which it is)")
                tier.kind = name  # type: ignore[assignment]
            if (tier.kind == DEVICE_TIER) != (name == DEVICE_TIER):
                raise ValueError(f"tiers.{name}.kind: the device tier is the one named "
                                 f"{DEVICE_TIER!r}, and only it has kind {DEVICE_TIER!r}")
            if name != DEVICE_TIER and name not in self.links:
                raise ValueError(f"links.{name}: a site needs its link from the device "
                                 "(bandwidth_up, bandwidth_down, rtt_ms)")
        for name in self.links:
            if name not in self.tiers or name == DEVICE_TIER:
                raise ValueError(f"links.{name}: no such site; sites: "
                                 f"{[t for t in self.tiers if t != DEVICE_TIER]}")
        return self

    def tier(self, name: str) -> TierConfig:
        if name not in self.tiers:
            raise ConfigError(f"tiers.{name}: no such tier; configured: {sorted(self.tiers)}")
        return self.tiers[name]

    def kind(self, tier: str) -> str:
        """device, edge or cloud: what the tier (site) `tier` is."""
        settings = self.tier(tier)
        if settings.kind is not None:
            return settings.kind
        if tier in KINDS:  # a TierConfig put in after validation, under its kind's name
            return tier
        raise ConfigError(f"tiers.{tier}.kind: expected one of {list(KINDS)}")

    def sites(self, kind: str | None = None) -> list[str]:
        """The configured servers' tiers (every one but the device), in the config's order;
        only those of `kind` if given."""
        return [name for name in self.tiers if name != DEVICE_TIER
                and (kind is None or self.kind(name) == kind)]

    def link(self, tier: str) -> LinkConfig:
        if tier not in self.links:
            raise ConfigError(f"links.{tier}: no link to this tier; configured: "
                              f"{sorted(self.links)}")
        return self.links[tier]

    @property
    def models_dir(self) -> Path:
        return Path(self.data_dir) / "models"

    @property
    def registry_dir(self) -> Path:
        return self.registry.root_dir(self.data_dir)


def _merge_tiers_and_links(raw: dict[str, Any]) -> dict[str, Any]:
    """A file that sets one field of `tiers.edge` keeps the defaults of the other tiers."""
    defaults = Config()
    for key in ("tiers", "links"):
        if isinstance(raw.get(key), dict):
            merged: dict[str, Any] = {
                name: value.model_dump() for name, value in getattr(defaults, key).items()
            }
            for name, value in raw[key].items():
                if isinstance(value, dict) and name in merged:
                    merged[name] = {**merged[name], **value}
                else:
                    merged[name] = value
            raw[key] = merged
    return raw


def _explain(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; `tierwise config show` lists them all)"
        elif "input" in item and item["type"] != "missing":
            message = f"{message}, got {item['input']!r}"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(_merge_tiers_and_links(dict(raw)))
    except ValidationError as error:
        raise ConfigError(_explain(error, source)) from None


def write_config(config: Config, path: Path) -> Path:
    """`config` as a TOML file that `load_config` reads back to an equal config (e.g. for
    the server processes a run starts). A relative `data_dir` (relative to where this process
    runs) is written absolute: `load_config` resolves it against the file's directory."""
    import tomli_w

    raw = config.model_dump(mode="json", exclude_none=True)
    raw["data_dir"] = str(Path(config.data_dir).resolve())
    path.write_text(tomli_w.dumps(raw))
    return path


def load_config(path: str | Path | None = None) -> Config:
    """Load `path`, else $TIERWISE_CONFIG, else ./tierwise.toml if present, else the defaults.

    Relative `data_dir` values are resolved against the config file's directory.
    """
    if path is None:
        path = os.environ.get(CONFIG_ENV) or (
            DEFAULT_CONFIG_FILE if Path(DEFAULT_CONFIG_FILE).exists() else None
        )
    if path is None:
        config = Config()
        base = Path.cwd()
    else:
        file = Path(path)
        if not file.exists():
            raise ConfigError(f"{file}: config file not found")
        try:
            raw = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{file}: not valid TOML: {error}") from None
        config = config_from_dict(raw, str(file))
        base = file.resolve().parent
    if not Path(config.data_dir).is_absolute():
        config.data_dir = str((base / config.data_dir).resolve())
    if config.data.path is None and os.environ.get(DATA_ENV):
        config.data.path = os.environ[DATA_ENV]
    # the shared database's URL holds a password: from the environment (a Secret), not the
    # file, for whichever of the two stores the file leaves to the default
    database = os.environ.get(DATABASE_ENV, "")
    if database:
        config.registry.database = config.registry.database or database
        config.telemetry.collector_db = config.telemetry.collector_db or database
    return config
