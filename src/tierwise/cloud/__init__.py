"""The cloud's control plane, in front of its tier server: the registry API, device
enrolment, the telemetry collector, the label queue and the live dashboard, as one Starlette
app.

Starlette brings the routing, the request parsing and the middleware, so each rule lives in
one place: who a request is from (`auth.CredentialBackend`, in `AuthenticationMiddleware`),
what each role may do (`auth.ROLE_SCOPES`, each route's `@scoped`), how a failure is
answered (`http.EXCEPTION_HANDLERS`: JSON `{"error"}` with the status), and the limits on
headers and stalled bodies (`tierwise.server.app.RequestLimits`, outermost, as for every
server). The OIP inference routes stay the tier server's own hand-written ASGI: `tierwise
bench routing` measures the two side by side (through Starlette, an inference of a small
model took 15-24% more server CPU; see the README).
"""

from __future__ import annotations

import os
import time
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tierwise.active.labels import LabelStore
from tierwise.cloud.active import ActiveAPI
from tierwise.cloud.auth import CredentialBackend, Sessions
from tierwise.cloud.dashboard import Dashboard
from tierwise.cloud.devices import devices_routes
from tierwise.cloud.fleet import fleet_routes
from tierwise.cloud.http import EXCEPTION_HANDLERS, authentication_failed, error
from tierwise.cloud.registry import registry_routes
from tierwise.cloud.telemetry import TelemetryAPI
from tierwise.config import Config, ConfigError, TierConfig
from tierwise.monitor.collector import Collector
from tierwise.monitor.report import Views, views_for
from tierwise.net.tls import client_context
from tierwise.registry.credentials import Credentials, local_lookup
from tierwise.registry.signing import TOKEN_FILE
from tierwise.registry.store import Registry, registry_of
from tierwise.registry.subscriber import TOKEN_ENV, registry_token
from tierwise.server.app import TierServer
from tierwise.server.auth import Introspection, TokenVerifier

# the paths the control plane answers; every other one is the tier server's
PREFIXES = ("/registry/", "/telemetry/", "/devices/", "/fleet/", "/active/", "/dashboard")


def token_verifier(tier_name: str, tier: TierConfig, config: Config, *,
                   cloud_url: str | None = None,
                   credentials: Credentials | None = None) -> TokenVerifier | None:
    """What a tier server with `tier.require_auth` checks bearer tokens with (None without
    it): the cloud its own credential table (`credentials`, shared with its control plane
    so that both see a revocation at once); an edge server the cloud at `cloud_url`
    (default `registry.url`; RFC 7662 introspection), with its own token (`registry.token`).
    ConfigError naming the setting that is missing."""
    if not tier.require_auth:
        return None
    if tier.kind == "cloud" or tier_name == "cloud":
        return TokenVerifier(local_lookup(credentials or cloud_credentials(config)))
    cloud_url = cloud_url or config.registry.url
    if not cloud_url:
        raise ConfigError(f"tiers.{tier_name}.require_auth: an edge server asks the cloud whose "
                          "a token is; set registry.url to the cloud server")
    try:
        own = registry_token(config.registry.token, config.registry_dir)
    except FileNotFoundError:
        raise ConfigError(f"tiers.{tier_name}.require_auth: this server needs its own "
                          "credential to ask the cloud: set registry.token to a token "
                          "enrolled with the edge role (`tierwise devices enroll ID --role "
                          "edge`)") from None
    return TokenVerifier(Introspection(cloud_url, own, client_context(config.tls) or True))


def cloud_credentials(config: Config) -> Credentials:
    """Every credential the cloud accepts: those enrolled in the registry's index, and the
    operator's token: `registry.token`, else $TIERWISE_REGISTRY_TOKEN, else the registry's
    keys/token file, read again when it is rotated."""
    registry = registry_of(config)
    fixed = config.registry.token or os.environ.get(TOKEN_ENV, "")
    return Credentials(registry.index_location, fixed or None,
                       None if fixed else registry.keys_dir / TOKEN_FILE)


class _Readiness:
    """503 saying what to run, before anything else, while the cloud has no operator token
    (no `registry keygen` yet) or the registry routes have no index (no `registry push`)."""

    def __init__(self, app: Any, credentials: Credentials, registry: Registry) -> None:
        self.app = app
        self.credentials = credentials
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            answer: Response | None = None
            if not self.credentials.is_ready():
                answer = error(503, "the cloud has no API token yet: run `tierwise registry "
                                    "keygen` (or set registry.token)")
            elif scope["path"].startswith("/registry/") and not self.registry.index.exists():
                answer = error(503, f"no registry at {self.registry.root} yet: run `tierwise "
                                    "registry push` there")
            if answer is not None:
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


def label_store(config: Config) -> LabelStore:
    """The cloud's label queue (`active.label_dir`, `active.label_db`)."""
    return LabelStore(config.active.label_root(config.data_dir), config.active.label_db or None)


def control_plane(config: Config, metrics: Any = None,
                  credentials: Credentials | None = None) -> Starlette:
    """The control plane's Starlette app for `config` (its registry, collector and
    dashboard); `metrics`: the Prometheus registry its counters join."""
    registry = registry_of(config)
    credentials = credentials or cloud_credentials(config)
    sessions = Sessions(credentials)
    collector = Collector(config.telemetry.collector_path(config.data_dir))
    window_s = config.telemetry.dashboard_window_s

    def views() -> Views:
        return views_for(config, since=time.time() - window_s)

    telemetry = TelemetryAPI(collector, metrics)
    active = ActiveAPI(label_store(config), metrics)
    dashboard = Dashboard(views, sessions)
    app = Starlette(
        routes=[*registry_routes(registry), *devices_routes(credentials), *fleet_routes(config),
                *telemetry.routes, *active.routes, *dashboard.routes],
        middleware=[Middleware(_Readiness, credentials=credentials, registry=registry),
                    Middleware(AuthenticationMiddleware,
                               backend=CredentialBackend(credentials, sessions),
                               on_error=authentication_failed)],
        exception_handlers=EXCEPTION_HANDLERS)
    app.state.dashboard = dashboard
    return app


class CloudServer:
    """ASGI: the cloud's server. Paths under `PREFIXES` go to the control plane (Starlette),
    every other one straight to the tier server, which also runs the lifespan (its models'
    batchers, its registry subscriber)."""

    def __init__(self, server: TierServer, control: Starlette) -> None:
        self.server = server
        self.control = control
        self.tier = server.tier  # what `run` and `RequestLimits` read

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PREFIXES):
            await self.control(scope, receive, send)
        else:
            await self.server(scope, receive, send)


def hosted(app: TierServer, config: Config,
           credentials: Credentials | None = None) -> CloudServer:
    """`app` with the control plane in front of it (`credentials`: default the cloud's,
    `cloud_credentials`). Until there is a token, the control plane's endpoints answer 503
    saying how to make one."""
    return CloudServer(app, control_plane(config, app.metrics.registry, credentials))
