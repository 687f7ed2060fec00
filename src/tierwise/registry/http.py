"""The registry's HTTP API, served by the cloud tier server beside OIP v2.

Every endpoint needs `Authorization: Bearer <token>`:
  GET /registry/v1/models                          every model's rollout state
  GET /registry/v1/deployments/{channel}?device=D  what device D runs now, with signed manifests;
                                                   an ETag, and 304 for a matching If-None-Match
  GET /registry/v1/blobs/sha256/{digest}           an artifact; `Range: bytes=N-` resumes (206)

Other paths go to the tier server it wraps.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any
from urllib.parse import parse_qs

import orjson

from tierwise.protocol.oip import encode_error
from tierwise.registry.credentials import Credentials, Principal, as_http_errors, bearer
from tierwise.registry.store import CHANNELS, Registry, RegistryError
from tierwise.registry.subscriber import check_device_id
from tierwise.server.app import HTTPError, Receive, Scope, Send, send_response

PREFIX = "/registry/v1/"
log = logging.getLogger("tierwise.registry")
CHUNK_BYTES = 1 << 20
_JSON = (b"content-type", b"application/json")


class RegistryApp:
    """ASGI: the registry API under /registry/v1/, everything else to `app`."""

    def __init__(self, registry: Registry, token: str | None, app: Any,
                 credentials: Credentials | None = None) -> None:
        """`token`: the operator's (registry keygen); `credentials`: every enrolled device's
        and edge server's, scoped (default: those in the registry's index)."""
        self.registry = registry
        self._token = token
        self.credentials = credentials or Credentials(registry.index_path, token)
        self.app = app

    def __getattr__(self, name: str) -> Any:  # the wrapped tier server's API (install, ...)
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/registry/"):
            await self.app(scope, receive, send)
            return
        try:
            await self._handle(scope, send)
        except HTTPError as error:
            await send_response(send, error.status, encode_error(error.message),
                                [_JSON, *error.headers])
        except RegistryError as error:
            await send_response(send, 404, encode_error(str(error)), [_JSON])
        except Exception as error:  # e.g. the index locked or damaged: say so, keep serving
            log.exception("registry %s failed", scope["path"])
            await send_response(send, 500, encode_error(
                f"registry error: {type(error).__name__}: {error}"), [_JSON])

    async def _handle(self, scope: Scope, send: Send) -> None:
        headers = dict(scope["headers"])
        if self._token is None or not self.registry.index_path.is_file():
            raise HTTPError(503, f"no registry at {self.registry.root} yet: run `tierwise "
                                 "registry keygen` and `tierwise registry push` there")
        with as_http_errors():
            principal = await asyncio.to_thread(self.credentials.authenticate, bearer(scope))
        if scope["method"] not in ("GET", "HEAD"):
            raise HTTPError(405, f"{scope['path']}: use GET", [(b"allow", b"GET")])
        path = scope["path"]
        if not path.startswith(PREFIX):
            raise HTTPError(404, f"no such endpoint: {path}")
        parts = path[len(PREFIX):].split("/")
        if parts == ["models"]:
            with as_http_errors():
                principal.require("operator")
            rollouts = await asyncio.to_thread(self.registry.rollouts)
            body = orjson.dumps([r.__dict__ for r in rollouts])
            await send_response(send, 200, body, [_JSON])
        elif len(parts) == 2 and parts[0] == "deployments":
            await self._deployment(parts[1], scope, headers, send, principal)
        elif len(parts) == 3 and parts[:2] == ["blobs", "sha256"]:
            await self._blob(parts[2], headers, send, head=scope["method"] == "HEAD")
        else:
            raise HTTPError(404, f"no such endpoint: {path}")

    async def _deployment(self, channel: str, scope: Scope, headers: dict[bytes, bytes],
                          send: Send, principal: Principal) -> None:
        if channel not in CHANNELS:
            raise HTTPError(404, f"no channel {channel!r}; channels: {list(CHANNELS)}")
        query = parse_qs(scope.get("query_string", b"").decode())
        device = (query.get("device") or [""])[0]
        if not device:
            raise HTTPError(400, "deployments: the query needs ?device=<id> (it picks the "
                                 "canary cohort)")
        try:  # the client's own rule: an id is stored and printed, so it stays plain
            check_device_id(device)
        except ValueError as error:
            raise HTTPError(400, f"deployments: ?device: {error}") from None
        with as_http_errors():  # a device or an edge server reads only its own
            principal.require_self(device, "deployments")
        document = await asyncio.to_thread(self.registry.deployment, channel, device)
        body = orjson.dumps(document)
        etag = b'"%s"' % hashlib.sha256(body).hexdigest()[:32].encode()
        if headers.get(b"if-none-match") == etag:
            await send({"type": "http.response.start", "status": 304,
                        "headers": [(b"etag", etag)]})
            await send({"type": "http.response.body", "body": b""})
            return
        await send_response(send, 200, body, [_JSON, (b"etag", etag)])

    async def _blob(self, digest: str, headers: dict[bytes, bytes], send: Send,
                    head: bool) -> None:
        path = self.registry.blob_path(digest)  # RegistryError (404) for a malformed digest
        if not path.is_file():
            raise HTTPError(404, f"no blob sha256:{digest}")
        size = path.stat().st_size
        start = 0
        status = 200
        extra = [(b"etag", b'"%s"' % digest.encode()), (b"accept-ranges", b"bytes")]
        wanted = headers.get(b"range")
        if wanted is not None:
            start = _range_start(wanted, size)
            status = 206
            extra.append((b"content-range", b"bytes %d-%d/%d" % (start, size - 1, size)))
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", b"%d" % (size - start)), *extra]})
        if head:
            await send({"type": "http.response.body", "body": b""})
            return
        with open(path, "rb") as stream:
            stream.seek(start)
            while True:
                chunk = await asyncio.to_thread(stream.read, CHUNK_BYTES)
                more = len(chunk) == CHUNK_BYTES
                await send({"type": "http.response.body", "body": chunk, "more_body": more})
                if not more:
                    return


def _range_start(value: bytes, size: int) -> int:
    """The first byte of `Range: bytes=N-` (the one form a resuming download sends)."""
    text = value.decode("latin-1").strip()
    if not text.startswith("bytes=") or not text.endswith("-"):
        raise HTTPError(416, f"Range: only 'bytes=<start>-' is supported, got {text!r}",
                        [(b"content-range", b"bytes */%d" % size)])
    try:
        start = int(text[len("bytes="):-1])
    except ValueError:
        raise HTTPError(416, f"Range: not a byte offset: {text!r}") from None
    if not 0 <= start < size:
        raise HTTPError(416, f"Range: start {start} is outside the blob's {size} bytes",
                        [(b"content-range", b"bytes */%d" % size)])
    return start
