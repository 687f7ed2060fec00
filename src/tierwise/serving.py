"""What `tierwise serve` runs: a tier's app (`TierApp`), on one of two engines.

- `process`: one process, uvicorn with uvloop and httptools (`tierwise.server.app.run`).
- `ray`: Ray Serve (`tierwise.server.ray_serve`): one application per tier, whose ingress
  deployment's replicas each build the same app, autoscaled by Ray Serve on ongoing
  requests per replica, behind Ray Serve's HTTP proxy.

Either way a replica or the process serves the same OIP v2 routes, headers, binary
extension and `/metrics`, from a models directory or from what the registry deploys (a
subscriber per replica, so a new version reaches every replica as it reaches one process);
a cloud-kind site also hosts the control plane. `TierApp` is plain data, so Ray can ship it
to replicas on other nodes, where it is built again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierwise.config import Config, TierConfig
from tierwise.server.app import TierServer


@dataclass(frozen=True)
class TierApp:
    """Everything needed to build tier `tier_name`'s ASGI app, in this process or a replica.

    `models_dir`: serve the models under it; else `registry_url`: serve what that registry
    deploys to the tier on `channel` (a subscriber named `device_id`, suffixed with the
    replica on Ray). `threads`: ONNX Runtime intra-op threads per model."""

    tier_name: str
    tier: TierConfig
    config: Config
    models_dir: Path | None = None
    registry_url: str = ""
    threads: int = 1
    channel: str | None = None
    device_id: str = ""

    def build(self, replica: str = "") -> tuple[Any, str]:
        """The app (the tier server, behind the control plane for a cloud-kind site; each
        engine puts `RequestLimits` in front) and a line describing it. Raises
        FileNotFoundError for a models directory with nothing to serve, ConfigError for a
        setting that cannot work."""
        from tierwise.cloud import cloud_credentials, hosted, token_verifier

        in_cloud = self.config.kind(self.tier_name) == "cloud"
        # the cloud's control plane and its tier server check tokens against one table
        credentials = cloud_credentials(self.config) if in_cloud else None
        verifier = token_verifier(self.tier_name, self.tier, self.config,
                                  cloud_url=self.registry_url or None, credentials=credentials)
        if self.registry_url:
            app, describe = self._from_registry(verifier, replica)
        else:
            app, describe = self._from_directory(verifier)
        wrapped: Any = hosted(app, self.config, credentials) if in_cloud else app
        return wrapped, describe

    def _from_directory(self, verifier: Any) -> tuple[TierServer, str]:
        from tierwise.runtime.session import load_repository
        from tierwise.server.app import create_app

        models_dir = self.models_dir or self.config.models_dir
        models, unavailable = load_repository(Path(models_dir), threads=self.threads)
        if not models and not unavailable:
            raise FileNotFoundError(f"{models_dir}: no models to serve (expected "
                                    "<name>/model.onnx, with or without metadata.json, or "
                                    "<name>.onnx; `tierwise models add`, `tierwise zoo train`)")
        app = create_app(self.tier_name, self.tier, models, unavailable, verifier)
        return app, f"tier {self.tier_name}, models {sorted(models)}"

    def _from_registry(self, verifier: Any, replica: str) -> tuple[TierServer, str]:
        from tierwise.registry.serving import ServerSync
        from tierwise.registry.subscriber import subscriber_for

        app = TierServer(self.tier_name, self.tier, {}, verifier=verifier)
        device_id = "-".join(part for part in (self.device_id, replica) if part)
        subscriber = subscriber_for(self.config, self.tier_name, self.registry_url,
                                    channel=self.channel, device_id=device_id)
        subscriber.on_change = ServerSync(app, self.tier_name, self.threads,
                                          self.config.registry.retire_grace_s)
        app.on_startup.append(subscriber.start)
        app.on_shutdown.append(subscriber.stop)
        return app, (f"tier {self.tier_name}, models from the registry {self.registry_url} "
                     f"channel {subscriber.channel} (device id {subscriber.device_id})")


def serve(spec: TierApp, host: str, port: int) -> None:
    """Serve `spec` at host:port on its tier's engine (`tiers.<tier>.engine`) until
    interrupted (SIGINT or SIGTERM)."""
    if spec.tier.engine == "ray":
        from tierwise.server.ray_serve import serve_on_ray

        serve_on_ray(spec, host, port)
        return
    from tierwise.server.app import run

    app, describe = spec.build()
    run(app, host, port, f"tierwise serve: {describe}", spec.config.tls)
