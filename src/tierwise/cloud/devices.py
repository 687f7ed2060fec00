"""Device enrolment over HTTP (`/devices/v1`), a route table of the control plane: what
`tierwise devices enroll | rotate | revoke | ls` does at the registry's own machine, for an
operator elsewhere. Every route but introspection needs the scope devices:admin (an
operator).

  GET    /devices/v1                   every credential (never a token)
  POST   /devices/v1/{id}              {"role": "device"|"edge"|"operator"} -> 201
                                       {"id", "role", "token"}; 409 if it has one
  POST   /devices/v1/{id}/rotate       {"overlap_s": s} (optional) -> {"id", "token"}; the
                                       old tokens keep working `overlap_s` (default a day)
  DELETE /devices/v1/{id}              every token of id ends now -> {"id", "revoked"}
  POST   /devices/v1/introspect        token=T (a form): whose T is now, RFC 7662 ->
                                       {"active": true, "sub": id, "role"} or
                                       {"active": false}; scope tokens:introspect (an edge
                                       server that requires device tokens, or an operator)

A token is shown once, in the answer that made it (`cache-control: no-store`).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tierwise.cloud.auth import scoped
from tierwise.cloud.http import read_body
from tierwise.registry.credentials import (
    DEFAULT_OVERLAP_S,
    ROLES,
    AlreadyEnrolled,
    Credentials,
    token_hash,
)
from tierwise.server.app import HTTPError

PREFIX = "/devices/v1"
_SECRET = {"cache-control": "no-store"}


def _json(document: Any, status: int = 200, headers: dict[str, str] | None = None
          ) -> Response:
    return Response(orjson.dumps(document), status, headers, media_type="application/json")


async def _options(request: Request, allowed: dict[str, tuple[type, ...]]
                   ) -> dict[str, Any]:
    """The JSON object body (empty: {}), each field of a type `allowed` names."""
    body = await read_body(request, 4096, "a devices request")
    if not body.strip():
        return {}
    try:
        options = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise HTTPError(400, f"the body is not JSON: {error}") from None
    if not isinstance(options, dict):
        raise HTTPError(400, f"the body: expected a JSON object, got {type(options).__name__}")
    for name, value in options.items():
        kinds = allowed.get(name)
        if kinds is None:
            raise HTTPError(400, f"{name}: unknown field; expected {sorted(allowed)}")
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise HTTPError(400, f"{name}: expected {' or '.join(k.__name__ for k in kinds)}"
                                 f", got {value!r}")
    return options


def devices_routes(credentials: Credentials) -> list[BaseRoute]:
    """Enrolment over `credentials` (the registry index's table)."""

    @scoped("devices:admin")
    async def listed(request: Request) -> Response:
        """Every credential as JSON, never a token: id, role, created, expiry and revocation
        times, epoch seconds (scope devices:admin: an operator)."""
        return _json(await asyncio.to_thread(credentials.list))

    @scoped("devices:admin")
    async def enroll(request: Request) -> Response:
        """Enrol `{id}`: body `{"role": "device"|"edge"|"operator"}` (default device); 201
        with `{"id", "role", "token"}`, the token shown this once (scope devices:admin; 400
        for a bad id, role or body, 409 if the id has a live credential, 413 over 4 KiB)."""
        device = request.path_params["id"]
        role = (await _options(request, {"role": (str,)})).get("role", "device")
        if role not in ROLES:
            raise HTTPError(400, f"role: expected one of {list(ROLES)}, got {role!r}")
        try:
            token = await asyncio.to_thread(credentials.enroll, device, role)
        except AlreadyEnrolled as error:
            raise HTTPError(409, str(error)) from None
        except ValueError as error:
            raise HTTPError(400, f"{device!r}: {error}") from None
        return _json({"id": device, "role": role, "token": token}, 201, _SECRET)

    @scoped("devices:admin")
    async def rotate(request: Request) -> Response:
        """A new token for `{id}`, `{"id", "token"}`; its old tokens keep working for the
        body's `overlap_s` seconds (default a day) (scope devices:admin; 400 for a bad body,
        404 when the id has no live credential)."""
        device = request.path_params["id"]
        options = await _options(request, {"overlap_s": (int, float)})
        overlap_s = options.get("overlap_s", DEFAULT_OVERLAP_S)
        if overlap_s < 0:
            raise HTTPError(400, f"overlap_s: expected seconds >= 0, got {overlap_s!r}")
        try:
            token = await asyncio.to_thread(credentials.rotate, device, float(overlap_s))
        except ValueError as error:
            raise HTTPError(404, str(error)) from None
        return _json({"id": device, "token": token}, 200, _SECRET)

    @scoped("devices:admin")
    async def revoke(request: Request) -> Response:
        """End every token of `{id}` now: `{"id", "revoked"}`, how many were (scope
        devices:admin; 404 when the id has none to revoke)."""
        device = request.path_params["id"]
        try:
            revoked = await asyncio.to_thread(credentials.revoke, device)
        except ValueError as error:
            raise HTTPError(404, str(error)) from None
        return _json({"id": device, "revoked": revoked})

    @scoped("tokens:introspect")
    async def introspect(request: Request) -> Response:
        """Whose the form's `token=T` is now (RFC 7662): `{"active": true, "sub": id,
        "role"}` or `{"active": false}` (scope tokens:introspect: an edge server or an
        operator; 400 without a token, 413 over 4 KiB)."""
        body = await read_body(request, 4096, "an introspection request")
        token = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0]
        if not token:
            raise HTTPError(400, "token: the form needs token=<the token to check> (RFC 7662)")
        found = await asyncio.to_thread(credentials.principal_of, token_hash(token))
        document = {"active": True, "sub": found.id, "role": found.role} if found else \
            {"active": False}
        return _json(document, 200, _SECRET)

    return [Route(f"{PREFIX}/introspect", introspect, methods=["POST"]),
            Route(PREFIX, listed, methods=["GET"]),
            Route(f"{PREFIX}/{{id}}", enroll, methods=["POST"]),
            Route(f"{PREFIX}/{{id}}", revoke, methods=["DELETE"]),
            Route(f"{PREFIX}/{{id}}/rotate", rotate, methods=["POST"])]
