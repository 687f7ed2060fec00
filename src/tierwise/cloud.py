"""The cloud tier's extras, in front of its tier server: the registry API, the telemetry
collector and the dashboard. All need the cloud API token (`registry.token`, else the
registry's keys/token)."""

from __future__ import annotations

import time
from typing import Any

from tierwise.config import Config
from tierwise.monitor.collector import Collector, TelemetryApp
from tierwise.monitor.dashboard import DashboardApp
from tierwise.monitor.report import Views, views_for
from tierwise.registry.credentials import Credentials
from tierwise.registry.http import RegistryApp
from tierwise.registry.signing import TOKEN_FILE
from tierwise.registry.store import Registry
from tierwise.registry.subscriber import registry_token
from tierwise.server.app import TierServer


def cloud_token(config: Config) -> str | None:
    """The cloud API token, or None before `tierwise registry keygen` made one."""
    try:
        return registry_token(config.registry.token, config.registry_dir)
    except FileNotFoundError:
        return None


def hosted(app: TierServer, config: Config) -> Any:
    """`app` with the registry API, the telemetry collector and the live dashboard in front
    of it. Until there is a token, their endpoints answer 503 saying how to make one."""
    token = cloud_token(config)
    collector = Collector(config.telemetry.collector_path(config.data_dir))
    window_s = config.telemetry.dashboard_window_s

    def views() -> Views:
        return views_for(config, since=time.time() - window_s)

    registry = Registry(config.registry_dir)
    # one credential table for every route: the registry's index; the operator's token
    # from the config, else from its file, read again when it is rotated
    credentials = Credentials(
        registry.index_path, config.registry.token or None,
        None if config.registry.token else registry.keys_dir / TOKEN_FILE)
    return RegistryApp(registry, token, TelemetryApp(
        collector, token, DashboardApp(views, token, app, credentials),
        credentials), credentials)
