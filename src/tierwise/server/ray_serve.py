"""`tierwise serve --engine ray`: a tier on Ray Serve.

One Ray Serve application per tier (`tierwise-<tier>`), whose ingress deployment's replicas
each build the tier's app (`tierwise.serving.TierApp`) behind `RequestLimits`: the same OIP
v2 routes, headers, binary extension and `/metrics` as the single-process server, with its
dynamic batcher inside each replica. Ray Serve's HTTP proxy answers at the server's
host:port and routes each request to a replica (power of two choices on queue length); its
autoscaler adds and removes replicas on ongoing requests per replica (`tiers.<tier>.ray`:
min/max replicas, target, delays). A replica serving from the registry runs its own
subscriber, so a new version reaches every replica within a poll, as it reaches one process.

Ray runs a local instance for this server by default (stopped with it), or joins an existing
cluster at `ray.address`, where tierwise must be installed on every node; the application is
deleted from the cluster when the server stops. `/metrics` answers for the replica that took
the request; Ray's own metrics (`ray_serve_*`, per deployment) cover all replicas.

Ray Serve docs: https://docs.ray.io/en/latest/serve/ (autoscaling: serve/autoscaling-guide).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tierwise.config import ConfigError

if TYPE_CHECKING:
    from tierwise.serving import TierApp

DEPLOYMENT = "tier"
STATUS_PERIOD_S = 0.25
CONNECT_TIMEOUT_S = 3.0


def application_name(tier_name: str) -> str:
    return f"tierwise-{tier_name}"


def replica_builder(spec: TierApp) -> Callable[[], Any]:
    """The function Ray Serve calls in each replica as it starts (`serve.ingress` takes a
    plain function): the tier's app, its subscriber named after the replica."""

    def build() -> Any:
        from ray import serve

        from tierwise.server.app import RequestLimits

        try:
            replica = serve.get_replica_context().replica_tag
        except Exception:  # outside a replica (a local test): the process id names it
            replica = f"pid{os.getpid()}"
        app, _ = spec.build(replica=replica)
        return RequestLimits(app)

    return build


def check_address(tier_name: str, address: str) -> None:
    """ConfigError naming `tiers.<tier>.ray.address` when nothing answers at it: a GCS
    address (host:port), or a Ray Client address (ray://host:port). 'auto' is left to Ray."""
    if not address or address == "auto":
        return
    parts = urlsplit(address if "://" in address else f"//{address}")
    if parts.scheme not in ("", "ray") or not parts.hostname:
        raise ConfigError(f"tiers.{tier_name}.ray.address: {address!r} is not a Ray address "
                          "(expected host:port, ray://host:port or auto)")
    try:
        port = parts.port or (10001 if parts.scheme == "ray" else 6379)
    except ValueError:
        raise ConfigError(f"tiers.{tier_name}.ray.address: {address!r} has no valid port") from None
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ConfigError(
            f"tiers.{tier_name}.ray.address: nothing answers at {parts.hostname}:{port} "
            f"({error}); start a cluster there (`ray start --head`) or leave the address "
            "empty for a local Ray instance") from None


def _http_options(spec: TierApp, host: str, port: int) -> dict[str, Any]:
    tls = spec.config.tls
    options: dict[str, Any] = {"host": host, "port": port,
                               "location": spec.tier.ray.proxy_location}
    if tls.client_ca:
        raise ConfigError("tls.client_ca: Ray Serve's HTTP proxy cannot require client "
                          "certificates; serve this tier with --engine process for mutual TLS")
    if tls.cert:
        from tierwise.net.tls import server_options

        options.update(server_options(tls))
    return options


def deployment_options(spec: TierApp) -> dict[str, Any]:
    """`serve.deployment` keyword arguments from `tiers.<tier>.ray`."""
    ray = spec.tier.ray
    return {
        "name": DEPLOYMENT,
        "max_ongoing_requests": ray.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": ray.num_cpus},
        "autoscaling_config": {
            "min_replicas": ray.min_replicas, "max_replicas": ray.max_replicas,
            "initial_replicas": max(ray.min_replicas, 1),
            "target_ongoing_requests": ray.target_ongoing_requests,
            "upscale_delay_s": ray.upscale_delay_s,
            "downscale_delay_s": ray.downscale_delay_s,
            "look_back_period_s": ray.look_back_period_s,
            "metrics_interval_s": ray.metrics_interval_s,
        },
    }


def replica_states(tier_name: str) -> dict[str, int]:
    """State -> replicas of the tier's deployment (RUNNING, STARTING, STOPPING, ...), as Ray
    Serve's controller sees them now; empty when the application is not there."""
    from ray import serve

    application = serve.status().applications.get(application_name(tier_name))
    if application is None or DEPLOYMENT not in application.deployments:
        return {}
    states = application.deployments[DEPLOYMENT].replica_states
    return {str(getattr(state, "value", state)): count for state, count in states.items()}


def serve_on_ray(spec: TierApp, host: str, port: int) -> None:
    """Serve `spec` on Ray Serve at host:port until SIGINT or SIGTERM; prints a line when
    the app answers and each time the number of running replicas changes. ConfigError for
    an address nothing answers at, or settings Ray Serve cannot take."""
    settings = spec.tier.ray
    check_address(spec.tier_name, settings.address)  # before Ray's retries
    import ray
    from ray import serve

    http_options = _http_options(spec, host, port)
    started = time.monotonic()
    try:
        ray.init(address=settings.address or None, include_dashboard=False,
                 logging_level=logging.WARNING, configure_logging=True)
    except Exception as error:  # Ray raises ConnectionError, RuntimeError, ValueError...
        raise ConfigError(f"tiers.{spec.tier_name}.ray.address: could not join Ray at "
                          f"{settings.address or 'a local instance'}: {error}") from None
    where = f"the Ray cluster at {settings.address}" if settings.address else \
        "a local Ray instance"
    name = application_name(spec.tier_name)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options=http_options, logging_config={"log_level": "WARNING"})
        deployment = serve.deployment(**deployment_options(spec))(
            serve.ingress(replica_builder(spec))())
        serve.run(deployment.bind(), name=name, route_prefix="/",
                  logging_config={"log_level": "WARNING"})
        scheme = "https" if spec.config.tls.cert else "http"
        print(f"tierwise serve: tier {spec.tier_name} on Ray Serve ({where}), application "
              f"{name}, replicas {settings.min_replicas}..{settings.max_replicas} "
              f"target_ongoing_requests {settings.target_ongoing_requests:g} "
              f"max_batch_size {spec.tier.max_batch_size} compute_scale "
              f"{spec.tier.compute_scale:g} on {scheme}://{host}:{port} "
              f"(ready in {time.monotonic() - started:.1f} s)", flush=True)
        _report_replicas(spec.tier_name, time.monotonic())
    except KeyboardInterrupt:
        pass
    finally:
        try:
            serve.delete(name)
            if not settings.address:
                serve.shutdown()
        finally:
            ray.shutdown()


def _report_replicas(tier_name: str, ready_at: float) -> None:
    """Print the running replicas each time their number changes (with the seconds since
    the app was ready), until interrupted."""
    running = -1
    while True:
        states = replica_states(tier_name)
        now = states.get("RUNNING", 0)
        if now != running:
            print(f"replicas: {now} running at +{time.monotonic() - ready_at:.1f} s "
                  f"{ {state: n for state, n in states.items() if n} }", flush=True)
            running = now
        time.sleep(STATUS_PERIOD_S)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
