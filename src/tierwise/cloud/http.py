"""What every control-plane route shares: bounded request bodies, and one JSON error shape
(`{"error": "..."}`, as the tier server's) for every way a request can fail."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match

from tierwise.registry.credentials import CredentialError
from tierwise.registry.store import RegistryError
from tierwise.server.app import HTTPError

CHALLENGE = {"www-authenticate": 'Bearer realm="tierwise"'}


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit` bytes (a client that
    lies in Content-Length, or sends none, is cut off all the same)."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"{what} is at most {limit:,} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise HTTPError(400, f"{what}: the client disconnected before sending all of it"
                        ) from None
    return b"".join(chunks)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    return error(exc.status, exc.message,
                 {name.decode(): value.decode() for name, value in exc.headers})


async def _starlette_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # 404 no route, 405 wrong method
    detail, headers = exc.detail, dict(exc.headers or {})
    if exc.status_code == 404:
        detail = f"no such endpoint: {request.url.path}"
    elif exc.status_code == 405:
        # every route of this path, not only the first one Starlette tried
        allowed = sorted({method for route in request.app.router.routes
                          if route.matches(request.scope)[0] != Match.NONE
                          for method in getattr(route, "methods", None) or ()})
        headers = {key: value for key, value in headers.items() if key.lower() != "allow"}
        headers["allow"] = ", ".join(allowed)
        detail = f"{request.url.path}: use {' or '.join(allowed)}, not {request.method}"
    return error(exc.status_code, detail, headers)


async def _credential_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CredentialError)
    return error(exc.status, str(exc), CHALLENGE if exc.status == 401 else None)


async def _registry_error(request: Request, exc: Exception) -> Response:
    return error(404, str(exc))


async def _internal_error(request: Request, exc: Exception) -> Response:
    # e.g. the index locked or damaged: say so and keep serving (Starlette raises it on
    # after this answer, and uvicorn logs it once)
    return error(500, f"internal error: {type(exc).__name__}: {exc}")


def authentication_failed(conn: HTTPConnection, exc: Exception) -> Response:
    """AuthenticationMiddleware's answer to a credential not taken: 401 for a token that is
    no one's, 503 when the credentials cannot be checked now."""
    status = getattr(exc, "status", 401)
    return error(status, str(exc), CHALLENGE if status == 401 else None)


EXCEPTION_HANDLERS = {HTTPError: _http_error, HTTPException: _starlette_error,
                      CredentialError: _credential_error, RegistryError: _registry_error,
                      Exception: _internal_error}
