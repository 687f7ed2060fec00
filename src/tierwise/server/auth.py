"""Who a request to a tier server is from, when the server requires credentials
(`tiers.<tier>.require_auth`): bearer tokens checked through a `TokenVerifier`, whose
lookup is the cloud's credential table (`tierwise.registry.credentials`) or, at an edge
server, the cloud itself (`Introspection`, OAuth 2.0 Token Introspection, RFC 7662).
The control plane (`tierwise.cloud`) uses the same `Principal` and `CredentialError`."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CACHE_S = 2.0  # a revocation takes effect within this long on a running server


class CredentialError(ValueError):
    """A request that credentials cannot allow: `status` 401 (who are you) or 403 (not
    yours)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Principal:
    """Who a request is from."""

    id: str
    role: str

    def require_operator(self) -> None:
        """CredentialError 403 unless this is an operator's credential."""
        if self.role != "operator":
            raise CredentialError(403, f"{self.role} {self.id!r} may not do this (an "
                                       "operator's credential only)")

    def require_self(self, device_id: str, what: str) -> None:
        """CredentialError 403 unless `device_id` is this principal's own (operator: any)."""
        if self.role != "operator" and device_id != self.id:
            raise CredentialError(403, f"{what}: {self.role} {self.id!r} may only act as "
                                       f"itself, not as {device_id!r}")


def token_hash(token: str | bytes) -> str:
    """The SHA-256 (hex) a token is stored and compared as (a str as UTF-8: the tokens made
    here are ASCII, so any other is simply nobody's)."""
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).hexdigest()



class TokenVerifier:
    """Bearer tokens for a tier server that requires them (`tiers.<t>.require_auth`):
    `lookup(token)` says whose a token is (None: nobody's), and its answers, either way,
    are kept `cache_s` so that an inference pays a dictionary lookup, not a query.

    At the cloud, `lookup` reads the credential table (`local_lookup`); at an edge server it
    asks the cloud (`Introspection`, RFC 7662). A lookup that fails (the cloud unreachable)
    raises CredentialError 503 and is not cached."""

    def __init__(self, lookup: Callable[[str], Principal | None],
                 cache_s: float = CACHE_S, max_cached: int = 10_000) -> None:
        self.lookup = lookup
        self.cache_s = cache_s
        self.max_cached = max_cached
        # kept apart, so made-up tokens can never crowd out the ones that work
        self._known: dict[str, tuple[float, Principal]] = {}
        self._unknown: dict[str, float] = {}

    def cached(self, authorization: bytes | None) -> Principal | None:
        """The principal from the cache, without I/O (for the event loop); None when the
        answer is not cached, or is "nobody" (`authenticate` then says which)."""
        token = bearer_token(authorization)
        if not token:
            return None
        kept = self._known.get(token_hash(token))
        return kept[1] if kept is not None and kept[0] > time.monotonic() else None

    def authenticate(self, authorization: bytes | None) -> Principal:
        """The principal of an `Authorization: Bearer <token>` header; CredentialError 401
        for none or a token nobody has, 503 when it cannot be checked now. Blocking: call it
        off the event loop."""
        token = bearer_token(authorization)
        if not token:
            raise CredentialError(401, "this server requires Authorization: Bearer <token> "
                                       "(the device's own token; tiers.<tier>.require_auth)")
        digest = token_hash(token)
        now = time.monotonic()
        kept = self._known.get(digest)
        if kept is not None and kept[0] > now:
            return kept[1]
        if self._unknown.get(digest, 0.0) > now:
            raise CredentialError(401, "unknown, expired or revoked token")
        principal = self.lookup(token.decode("latin-1"))
        if principal is None:
            if len(self._unknown) >= self.max_cached:
                self._unknown.clear()
            self._unknown[digest] = now + self.cache_s
            raise CredentialError(401, "unknown, expired or revoked token")
        if len(self._known) >= self.max_cached:
            self._known.clear()
        self._known[digest] = (now + self.cache_s, principal)
        return principal

    def close(self) -> None:
        """Close the lookup's connections, if it holds any (`Introspection`)."""
        close = getattr(self.lookup, "close", None)
        if close is not None:
            close()


def bearer_token(authorization: bytes | None) -> bytes:
    """The token of `Authorization: Bearer <token>` (RFC 6750: the scheme in any case), or
    b"" for none."""
    if not authorization or authorization[:7].lower() != b"bearer ":
        return b""
    return authorization[7:].strip()


class Introspection:
    """A `TokenVerifier` lookup that asks the cloud: OAuth 2.0 Token Introspection (RFC 7662),
    `POST <cloud>/devices/v1/introspect` with `token=<token>`, authenticated with this
    server's own credential (role edge or operator). `verify`: the TLS context for an https
    cloud (`tierwise.net.tls.client_context`)."""

    def __init__(self, cloud_url: str, own_token: str, verify: Any = True,
                 timeout_s: float = 5.0) -> None:
        import httpx

        self.url = cloud_url.rstrip("/") + "/devices/v1/introspect"
        self._http = httpx.Client(headers={"authorization": f"Bearer {own_token}"},
                                  verify=verify, timeout=timeout_s, trust_env=False)

    def __call__(self, token: str) -> Principal | None:
        import httpx

        try:
            answer = self._http.post(self.url, data={"token": token})
        except httpx.HTTPError as error:
            raise CredentialError(503, f"cannot check the token now: the cloud at {self.url} "
                                       f"did not answer ({type(error).__name__})") from None
        if answer.status_code != 200:
            raise CredentialError(503, f"cannot check the token now: the cloud answered "
                                       f"{answer.status_code} to this server's introspection "
                                       "(is registry.token an edge or operator credential?)")
        document = answer.json()
        if not document.get("active"):
            return None
        return Principal(str(document["sub"]), str(document["role"]))

    def close(self) -> None:
        self._http.close()
