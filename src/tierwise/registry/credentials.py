"""Per-device credentials at the cloud: each device and each edge server its own bearer
token, stored only as a hash, scoped by role, revocable, rotated with an overlap window.

Roles (each route's scope and each role's scopes: `tierwise.cloud.auth.ROLE_SCOPES`):

- `device`: read its own deployments (`?device=` its id) and the blobs, write telemetry
  under its own id;
- `edge`: the same for its own id, and ask whose a device's token is (introspection, for
  an edge server that requires tokens);
- `operator`: everything, including the model list, the collector's summary, enrolment and
  the dashboard. The registry's API token (`registry keygen`, `keys/token`) is an operator
  credential.

A token is 32 random bytes (`secrets.token_urlsafe`), shown once at enrolment and stored as
its SHA-256 (a stolen index holds no usable token; a high-entropy token needs no slow hash).
`rotate` gives an id a new token and lets the old one work for `overlap_s` more, so a fleet
can move over without a restart; `revoke` ends every token of an id at once. The table lives
in the registry's SQLite index, beside what it protects; the Ed25519 signing key does not
depend on it and is never replaced with it.
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tierwise.database import Connection, Database, DatabaseError
from tierwise.server.auth import (
    CACHE_S,
    CredentialError,
    Principal,
    bearer_token,
    token_hash,
)

ROLES = ("device", "edge", "operator")
OPERATOR_ID = "operator"  # the registry API token's principal
DEFAULT_OVERLAP_S = 24 * 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS credentials (
    token_hash TEXT PRIMARY KEY, id TEXT NOT NULL, role TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION,
    revoked_at DOUBLE PRECISION);
CREATE INDEX IF NOT EXISTS credentials_id ON credentials (id);
"""


class AlreadyEnrolled(ValueError):
    """`enroll` of an id that has a live credential (rotate or revoke it instead)."""


class Credentials:
    """The credential table in the registry's index at `location` (an SQLite path or a
    postgresql:// URL), and the operator token."""

    def __init__(self, location: str | Path, operator_token: str | None = None,
                 operator_token_file: Path | None = None) -> None:
        """`operator_token`: fixed; or `operator_token_file`, read again whenever it changes
        (so `registry keygen --rotate-token` takes effect without a restart)."""
        self.database = Database(location, _SCHEMA, "credentials")
        self._operator = operator_token.encode() if operator_token else None
        self._operator_file = operator_token_file
        self._operator_stamp: float | None = None
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def _db(self) -> contextlib.AbstractContextManager[Connection]:
        return self.database.transaction()

    def enroll(self, device_id: str, role: str = "device") -> str:
        """A new token for `device_id` in `role`, returned once; ValueError naming a bad id
        or role, or an id already enrolled (rotate it instead)."""
        from tierwise.registry.subscriber import check_device_id

        check_device_id(device_id)
        if role not in ROLES or (role == "operator" and device_id == OPERATOR_ID):
            raise ValueError(f"role: expected one of {ROLES}, got {role!r}")
        with self._db() as db:
            if db.execute("SELECT 1 FROM credentials WHERE id = ? AND revoked_at IS NULL",
                          (device_id,)).fetchone():
                raise AlreadyEnrolled(f"{device_id!r} is enrolled already: rotate its token "
                                 "(`tierwise devices rotate`) or revoke it first")
            return self._issue(db, device_id, role)

    def rotate(self, device_id: str, overlap_s: float = DEFAULT_OVERLAP_S) -> str:
        """A new token for `device_id`; its current ones keep working for `overlap_s`."""
        now = time.time()
        with self._db() as db:
            rows = db.execute("SELECT role FROM credentials WHERE id = ? AND revoked_at IS NULL "
                              "AND (expires_at IS NULL OR expires_at > ?)",
                              (device_id, now)).fetchall()
            if not rows:
                raise ValueError(f"{device_id!r}: no credential to rotate (`tierwise devices "
                                 "enroll` it)")
            ends = now + overlap_s  # an earlier expiry stays
            db.execute("UPDATE credentials SET expires_at = CASE WHEN expires_at IS NOT NULL "
                       "AND expires_at < ? THEN expires_at ELSE ? END WHERE id = ? AND "
                       "revoked_at IS NULL", (ends, ends, device_id))
            token = self._issue(db, device_id, rows[0][0])
        self._forget()
        return token

    def revoke(self, device_id: str) -> int:
        """End every token of `device_id` now: how many there were."""
        with self._db() as db:
            changed = db.execute("UPDATE credentials SET revoked_at = ? WHERE id = ? AND "
                                 "revoked_at IS NULL", (time.time(), device_id)).rowcount
        self._forget()
        if not changed:
            raise ValueError(f"{device_id!r}: no credential to revoke")
        return changed

    def list(self) -> list[dict[str, Any]]:
        """Every credential (never its token): id, role, created, expires, revoked."""
        with self._db() as db:
            rows = db.execute("SELECT id, role, created_at, expires_at, revoked_at FROM "
                              "credentials ORDER BY id, created_at").fetchall()
        return [{"id": i, "role": r, "created_at": c, "expires_at": e, "revoked_at": v}
                for i, r, c, e, v in rows]

    def authenticate(self, authorization: bytes | None) -> Principal:
        """The principal of an `Authorization: Bearer <token>` header; CredentialError 401
        for none, an unknown, expired or revoked token."""
        token = bearer_token(authorization)
        if not token:
            raise CredentialError(401, "this endpoint needs Authorization: Bearer <token> (a "
                                       "device's own token, or the operator's registry.token)")
        principal = self.principal_of(token_hash(token))
        if principal is None:
            raise CredentialError(401, "unknown, expired or revoked token")
        return principal

    def principal_of(self, digest: str) -> Principal | None:
        """Whose token has this SHA-256 (hex) now: None for an unknown, expired or revoked
        one. A dashboard session keeps only the hash and asks again on every request, so
        revoking or rotating a token away ends its sessions too."""
        operator = self._operator_token()
        if operator is not None and hmac.compare_digest(digest, token_hash(operator)):
            return Principal(OPERATOR_ID, "operator")
        return self._lookup(digest)

    def is_ready(self) -> bool:
        """Whether there is an operator token yet (`registry keygen`, or `registry.token`)."""
        return self._operator_token() is not None

    # -- internals ------------------------------------------------------------------------

    def _operator_token(self) -> bytes | None:
        if self._operator_file is None:
            return self._operator
        try:
            stamp = self._operator_file.stat().st_mtime_ns
        except OSError:
            return None
        if stamp != self._operator_stamp:
            with self._lock:
                self._operator = self._operator_file.read_bytes().strip() or None
                self._operator_stamp = stamp
        return self._operator

    def _issue(self, db: Connection, device_id: str, role: str) -> str:
        token = secrets.token_urlsafe(32)
        db.execute("INSERT INTO credentials VALUES (?, ?, ?, ?, NULL, NULL)",
                   (token_hash(token), device_id, role, time.time()))
        return token

    def _lookup(self, digest: str) -> Principal | None:
        now = time.time()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        # read-only, no write lock: a flood of made-up tokens must not queue behind pushes
        try:
            with self.database.transaction(write=False) as db:
                row = db.execute(
                    "SELECT id, role FROM credentials WHERE token_hash = ? AND revoked_at IS "
                    "NULL AND (expires_at IS NULL OR expires_at > ?)", (digest, now)).fetchone()
        except DatabaseError as error:
            if self.database.dialect == "sqlite" and (
                    not self.database.exists() or "no such table" in str(error)):
                row = None  # no index or no credentials table yet: nobody enrolled
            else:  # the store is there but cannot answer: say so, never "unknown token"
                raise CredentialError(503, f"cannot check the token now: {error}") from None
        if row is None:
            return None  # unknown tokens are not cached: they cannot crowd out known ones
        principal = Principal(*row)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now + CACHE_S, principal)
        return principal

    def _forget(self) -> None:
        with self._lock:
            self._cache.clear()


def local_lookup(credentials: Credentials) -> Callable[[str], Principal | None]:
    """A `TokenVerifier` lookup in this machine's credential table (the cloud's)."""
    return lambda token: credentials.principal_of(token_hash(token))
