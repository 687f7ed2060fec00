"""The registry's HTTP API (`/registry/v1`), a route table of the cloud's control plane.

  GET /registry/v1/models                    every model's rollout state     models:read
  GET /registry/v1/deployments/{channel}     what ?device=D runs now, with   deployments:read
                                             signed manifests; an ETag, and  (D: its own)
                                             304 for a matching If-None-Match
  GET /registry/v1/blobs/sha256/{digest}     an artifact; HTTP range         blobs:read
                                             requests resume it (206, RFC 9110 §14)
"""

from __future__ import annotations

import asyncio
import hashlib

import orjson
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from tierwise.cloud.auth import principal, scoped
from tierwise.registry.store import CHANNELS, Registry
from tierwise.registry.subscriber import check_device_id
from tierwise.server.app import HTTPError

PREFIX = "/registry/v1"


class _BlobResponse(FileResponse):
    """A blob, whole or by byte ranges; a Range of another unit is ignored (the whole blob,
    200), as RFC 9110 §14.2 asks of a server that does not know the unit."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ranged = Headers(scope=scope).get("range")
        if ranged is not None and not ranged.strip().lower().startswith("bytes="):
            scope = {**scope, "headers": [(name, value) for name, value in scope["headers"]
                                          if name != b"range"]}
        await super().__call__(scope, receive, send)


def registry_routes(registry: Registry) -> list[BaseRoute]:
    """The registry API over `registry` (its paths start with `PREFIX`)."""

    @scoped("models:read")
    async def models(request: Request) -> Response:
        """Every model's rollout state as JSON: its stable and canary versions, the canary's
        share and whether it is paused (scope models:read: an operator)."""
        rollouts = await asyncio.to_thread(registry.rollouts)
        return Response(orjson.dumps([r.__dict__ for r in rollouts]),
                        media_type="application/json")

    @scoped("deployments:read")
    async def deployment(request: Request) -> Response:
        """What device `?device=ID` on `{channel}` (stable or canary) runs now, per model with
        the signed manifests of every active version, in one signed document; an ETag, 304
        for a matching If-None-Match (scope deployments:read; a device or edge server only
        for its own id, else 403; 400 without a plain ?device, 404 for another channel)."""
        channel = request.path_params["channel"]
        if channel not in CHANNELS:
            raise HTTPError(404, f"no channel {channel!r}; channels: {list(CHANNELS)}")
        device = request.query_params.get("device", "")
        if not device:
            raise HTTPError(400, "deployments: the query needs ?device=<id> (it picks the "
                                 "canary cohort)")
        try:  # the client's own rule: an id is stored and printed, so it stays plain
            check_device_id(device)
        except ValueError as error:
            raise HTTPError(400, f"deployments: ?device: {error}") from None
        principal(request).require_self(device, "deployments")  # its own, unless operator
        document = await asyncio.to_thread(registry.deployment, channel, device)
        body = orjson.dumps(document)
        etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"etag": etag})
        return Response(body, media_type="application/json", headers={"etag": etag})

    @scoped("blobs:read")
    async def blob(request: Request) -> Response:
        """The artifact whose SHA-256 is `{digest}`, as application/octet-stream; HTTP range
        requests resume it (206) (scope blobs:read; 404 for a malformed or unknown
        digest)."""
        digest = request.path_params["digest"]
        path = registry.blob_path(digest)  # RegistryError (404) for a malformed digest
        if not path.is_file():
            raise HTTPError(404, f"no blob sha256:{digest}")
        return _BlobResponse(path, media_type="application/octet-stream",
                             headers={"etag": f'"{digest}"'})

    return [Route(f"{PREFIX}/models", models, methods=["GET"]),
            Route(f"{PREFIX}/deployments/{{channel}}", deployment, methods=["GET"]),
            Route(f"{PREFIX}/blobs/sha256/{{digest}}", blob, methods=["GET"])]
