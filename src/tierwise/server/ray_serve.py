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

import contextlib
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

        try:  # the rank is reused by the replica that replaces one: its cache too
            context = serve.get_replica_context()
            rank = getattr(context, "rank", None)
            replica = f"r{rank.rank}" if rank is not None else context.replica_tag
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
    options: dict[str, Any] = {"host": host, "port": port}
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
    an address nothing answers at, a port of 0, a cluster whose Ray Serve already answers
    elsewhere or serves another application, or replicas no node has the CPUs for."""
    settings = spec.tier.ray
    tier = spec.tier_name
    if port == 0:
        raise ConfigError(f"tiers.{tier}.port: Ray Serve's proxy needs a fixed port (--port)")
    check_address(tier, settings.address)  # before Ray's retries
    import ray
    from ray import serve

    http_options = _http_options(spec, host, port)
    started = time.monotonic()
    try:  # "local": a new instance even where $RAY_ADDRESS names a shared cluster
        ray.init(address=settings.address or "local", include_dashboard=False,
                 logging_level=logging.WARNING, configure_logging=True)
    except Exception as error:  # Ray raises ConnectionError, RuntimeError, ValueError...
        raise ConfigError(f"tiers.{tier}.ray.address: could not join Ray at "
                          f"{settings.address or 'a local instance'}: {error}") from None
    where = f"the Ray cluster at {settings.address}" if settings.address else \
        "a local Ray instance"
    name = application_name(tier)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _check_capacity(spec, ray.cluster_resources())
        serve.start(proxy_location=settings.proxy_location, http_options=http_options,
                    logging_config={"log_level": "WARNING"})
        _check_serve_instance(spec, host, port, where)
        deployment = serve.deployment(**deployment_options(spec))(
            serve.ingress(replica_builder(spec))())
        serve.run(deployment.bind(), name=name, route_prefix="/",
                  logging_config={"log_level": "WARNING"})
        scheme = "https" if spec.config.tls.cert else "http"
        print(f"tierwise serve: tier {tier} on Ray Serve ({where}), application "
              f"{name}, replicas {settings.min_replicas}..{settings.max_replicas} "
              f"target_ongoing_requests {settings.target_ongoing_requests:g} "
              f"max_batch_size {spec.tier.max_batch_size} compute_scale "
              f"{spec.tier.compute_scale:g} on {scheme}://{host}:{port} "
              f"(ready in {time.monotonic() - started:.1f} s)", flush=True)
        _report_replicas(tier, time.monotonic())
    except KeyboardInterrupt:
        pass
    finally:
        _leave(name, own_instance=not settings.address)


def _check_capacity(spec: TierApp, resources: dict[str, float]) -> None:
    """ConfigError when the cluster has not the CPUs for the first replicas: Ray Serve
    would wait for them for ever."""
    ray = spec.tier.ray
    needed = ray.num_cpus * max(ray.min_replicas, 1)
    have = resources.get("CPU", 0.0)
    if have < needed:
        raise ConfigError(f"tiers.{spec.tier_name}.ray.num_cpus: {max(ray.min_replicas, 1)} "
                          f"replica(s) of {ray.num_cpus:g} CPUs need {needed:g}; the cluster "
                          f"has {have:g}")


def _check_serve_instance(spec: TierApp, host: str, port: int, where: str) -> None:
    """ConfigError when Ray Serve already ran on the cluster with its proxy elsewhere (it
    keeps its first HTTP settings), or serves another application at "/"."""
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client()  # raises, rather than gives None, when Serve is not up
    assert client is not None
    config = client.http_config
    if (config.host, config.port) != (host, port):
        raise ConfigError(
            f"tiers.{spec.tier_name}.port: Ray Serve on {where} already answers at "
            f"{config.host}:{config.port}, and keeps that for as long as it runs; serve "
            f"this tier with --host {config.host} --port {config.port}, or on a cluster of "
            "its own")
    others = [app for app in serve.status().applications
              if app != application_name(spec.tier_name)]
    if others:
        raise ConfigError(f"tiers.{spec.tier_name}.ray.address: Ray Serve on {where} "
                          f"already serves {others} at its one HTTP address; one tier per "
                          "cluster")


def _leave(name: str, own_instance: bool) -> None:
    """Delete the application; stop Ray Serve where nothing else runs on it (its proxy,
    so that the next server may take another port), and disconnect. Errors here must not
    hide the one that ended the server."""
    from ray import serve

    try:
        with contextlib.suppress(Exception):
            serve.delete(name)
        with contextlib.suppress(Exception):
            if own_instance or not serve.status().applications:
                serve.shutdown()
    finally:
        import ray

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
