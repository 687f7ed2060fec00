"""Who a control-plane request is from, and what it may do.

Starlette's `AuthenticationMiddleware` runs `CredentialBackend` once per request: an
`Authorization: Bearer <token>` header is looked up in the cloud's credentials
(`tierwise.registry.credentials`); without one, the dashboard's session cookie names a
server-side session (`Sessions`). Each route then declares the one scope it needs with
`@scoped(...)`, so the rule "which role may do what" lives in `ROLE_SCOPES` alone:

  no credential                   401 with `WWW-Authenticate: Bearer` (or, for a page,
                                  a redirect to the sign-in page)
  an unknown, expired or revoked  401
  token
  a role without the scope        403
  a device acting as another      403 (`Principal.require_self`, in the route)

Scopes follow OAuth 2.0's `resource:action` convention (RFC 6749 §3.3).
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    BaseUser,
)
from starlette.requests import HTTPConnection, Request
from starlette.responses import RedirectResponse, Response

from tierwise.registry.credentials import CredentialError, Credentials, Principal, token_hash

DEVICE_SCOPES = frozenset({"deployments:read", "blobs:read", "traces:write", "fleet:read",
                           "samples:write"})
# an edge server reports its own traces too, and asks whose a device's token is when it
# requires one (tokens:introspect, RFC 7662)
EDGE_SCOPES = DEVICE_SCOPES | {"tokens:introspect"}
ROLE_SCOPES: dict[str, frozenset[str]] = {
    "device": DEVICE_SCOPES,
    "edge": EDGE_SCOPES,
    "operator": EDGE_SCOPES | {"models:read", "telemetry:read", "dashboard:read",
                               "devices:admin"},
}
SESSION_COOKIE = "tierwise_session"
SESSION_S = 12 * 3600.0
MAX_SESSIONS = 1000


class CredentialFailure(AuthenticationError):
    """Why a credential was not taken, with its status: 401 (no one's), 503 (the store of
    credentials cannot answer now)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class User(BaseUser):
    """Starlette's user for an authenticated principal."""

    principal: Principal

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.principal.id

    @property
    def identity(self) -> str:
        return self.principal.id


class Sessions:
    """The dashboard's sessions, in this server's memory: a random id (the cookie) -> the
    SHA-256 of the token that signed in and when the session ends. The token is checked
    again on every request (`Credentials.principal_of`, cached for 2 s), so revoking or
    rotating it away ends its sessions; a restart ends them all."""

    def __init__(self, credentials: Credentials, session_s: float = SESSION_S) -> None:
        self.credentials = credentials
        self.session_s = session_s
        self._sessions: dict[str, tuple[float, str]] = {}  # id -> (monotonic end, hash)
        self._lock = threading.Lock()

    def start(self, token: str) -> str | None:
        """A new session id for an operator's `token`; None when it is not one."""
        digest = token_hash(token)
        principal = self.credentials.principal_of(digest)
        if principal is None or principal.role != "operator":
            return None
        session = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._sessions = {sid: kept for sid, kept in self._sessions.items()
                              if kept[0] > now}
            if len(self._sessions) >= MAX_SESSIONS:  # the oldest make room
                for sid in sorted(self._sessions, key=self._sessions.__getitem__)[:100]:
                    del self._sessions[sid]
            self._sessions[session] = (now + self.session_s, digest)
        return session

    def principal(self, session: str) -> Principal | None:
        """Who holds `session` now: None when it ended or its token no longer works."""
        with self._lock:
            kept = self._sessions.get(session)
        if kept is None or kept[0] <= time.monotonic():
            return None
        principal = self.credentials.principal_of(kept[1])
        if principal is None or principal.role != "operator":
            self.end(session)
            return None
        return principal

    def end(self, session: str) -> None:
        with self._lock:
            self._sessions.pop(session, None)


class CredentialBackend(AuthenticationBackend):
    """A bearer token, else the dashboard's session cookie (only under /dashboard, where the
    cookie is scoped), as a `User` with its role's scopes; no credential: anonymous."""

    def __init__(self, credentials: Credentials, sessions: Sessions) -> None:
        self.credentials = credentials
        self.sessions = sessions

    async def authenticate(self, conn: HTTPConnection
                           ) -> tuple[AuthCredentials, BaseUser] | None:
        header = conn.headers.get("authorization")
        if header is not None:
            try:  # SQLite, off the event loop
                principal = await asyncio.to_thread(self.credentials.authenticate,
                                                    header.encode("latin-1"))
            except CredentialError as error:
                raise CredentialFailure(error.status, str(error)) from None
        else:
            session = conn.cookies.get(SESSION_COOKIE)
            if not session or not conn.url.path.startswith("/dashboard"):
                return None
            try:
                found = await asyncio.to_thread(self.sessions.principal, session)
            except CredentialError as error:
                raise CredentialFailure(error.status, str(error)) from None
            if found is None:
                return None
            principal = found
        return AuthCredentials(sorted(ROLE_SCOPES[principal.role])), User(principal)


Endpoint = Callable[..., Awaitable[Response]]  # (request) or (self, request)


def scoped(scope: str, sign_in: str | None = None) -> Callable[[Endpoint], Endpoint]:
    """A route that needs `scope`: CredentialError 401 without a credential (or, with
    `sign_in`, a 303 to that page, for a person's browser), 403 when the role lacks it.
    (Starlette's own `requires` answers 403 to both.)"""
    if not any(scope in scopes for scopes in ROLE_SCOPES.values()):
        raise ValueError(f"scope: no role has {scope!r}")

    def decorate(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def checked(*args: Any) -> Response:
            request: Request = args[-1]
            user = request.user
            if not user.is_authenticated:
                if sign_in is not None:
                    return RedirectResponse(sign_in, status_code=303)
                raise CredentialError(401, "this endpoint needs Authorization: Bearer <token> "
                                           "(a device's own token, or the operator's "
                                           "registry.token)")
            if scope not in request.auth.scopes:
                principal = user.principal
                raise CredentialError(403, f"{principal.role} {principal.id!r} may not do "
                                           f"this (needs the scope {scope!r})")
            return await endpoint(*args)
        return checked
    return decorate


def principal(request: Request) -> Principal:
    """The authenticated principal of a request that passed `scoped`."""
    user = request.user
    assert isinstance(user, User), "principal() of a route without @scoped"
    return user.principal
