"""The cloud tier's extras, in front of its tier server: the registry API and the telemetry
collector. Both need the cloud API token (`registry.token`, else the registry's keys/token)."""

from __future__ import annotations

from typing import Any

from tierwise.config import Config
from tierwise.monitor.collector import Collector, TelemetryApp
from tierwise.registry.http import RegistryApp
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
    """`app` with the registry API and the telemetry collector in front of it. Until there is
    a token, their endpoints answer 503 saying how to make one."""
    token = cloud_token(config)
    collector = Collector(config.telemetry.collector_path(config.data_dir))
    return RegistryApp(Registry(config.registry_dir), token,
                       TelemetryApp(collector, token, app))
