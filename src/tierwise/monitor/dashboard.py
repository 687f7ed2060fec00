"""The live dashboard on the cloud server: the report's views, refreshed from the collector.

  GET  /dashboard/login            a sign-in page (the operator's token, once)
  POST /dashboard/login            token=T: sets the session cookie, 303 to the page
  POST /dashboard/logout           ends the session
  GET  /dashboard                  the page (it refreshes itself every few seconds)
  GET  /dashboard/data             the summary as JSON
  GET  /dashboard/plot/<view>.png  latency, tier_mix, cost, drift

Signing in once gives a session: a random id in an HttpOnly, SameSite=Strict cookie scoped
to /dashboard (Secure over TLS), kept for `session_s`. No credential is ever in a URL, the
page or its image links, so none lands in a proxy's log, the browser's history or a
Referer. The sign-in page also takes the token in the URL's fragment (`#token=T`, never
sent to a server) and removes it from the history at once, for scripts and links made by
`tierwise demo`. Views are computed at most every `refresh_s` and shared by the requests in
between (a page load fires five at once), so a trace stored `refresh_s` ago is always on the
page.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import orjson

from tierwise.monitor.report import PLOTS, STYLE, Views, summary_html
from tierwise.protocol.oip import encode_error
from tierwise.registry.credentials import CredentialError, Credentials
from tierwise.server.app import HTTPError, Receive, Scope, Send, send_response

PREFIX = "/dashboard"
COOKIE = "tierwise_session"
SESSION_S = 12 * 3600.0
MAX_SESSIONS = 1000
_JSON = (b"content-type", b"application/json")
_HTML = [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-store")]
_LOGIN_PAGE = (
    "<!doctype html><html><head><meta charset='utf-8'><title>tierwise dashboard: sign in"
    f"</title><style>{STYLE}</style></head><body><h1>tierwise dashboard</h1>"
    f"<form id='login' method='post' action='{PREFIX}/login'>"
    "<input type='text' name='username' value='operator' autocomplete='username' hidden>"
    "<label>Operator token (registry.token) <input type='password' name='token' "
    "autocomplete='current-password' required></label> <button>Sign in</button></form>"
    "<script>\n"
    "const given = new URLSearchParams(location.hash.slice(1)).get('token');\n"
    "if (given) {\n"
    "  history.replaceState(null, '', location.pathname);  // out of the history at once\n"
    "  const form = document.getElementById('login');\n"
    "  form.elements.token.value = given;\n"
    "  form.submit();\n"
    "}\n"
    "</script></body></html>\n").encode()


def _cookie(scope: Scope) -> str | None:
    """The session id in the request's Cookie header, if any."""
    for key, value in scope["headers"]:
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                name, _, content = part.strip().partition("=")
                if name == COOKIE:
                    return content
    return None


def _clear_cookie() -> tuple[bytes, bytes]:
    return (b"set-cookie", f"{COOKIE}=; Path={PREFIX}; HttpOnly; SameSite=Strict; "
                           "Max-Age=0".encode())


class DashboardApp:
    """ASGI: the dashboard under /dashboard, everything else to `app`."""

    def __init__(self, views: Callable[[], Views], token: str | None, app: Any,
                 credentials: Credentials, refresh_s: float = 2.0,
                 session_s: float = SESSION_S) -> None:
        """`token`: the operator's (None: not made yet, 503); `credentials`: who may sign
        in (any operator-role credential, the operator's token as it is now)."""
        self._compute = views
        self._token = token
        self.credentials = credentials
        self.app = app
        self.refresh_s = refresh_s
        self.session_s = session_s
        self._sessions: dict[str, float] = {}  # session id -> time.monotonic() it ends
        self._cached: tuple[float, Views] | None = None
        self._plots: dict[str, tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        try:
            await self._handle(scope, receive, send)
        except HTTPError as error:
            await send_response(send, error.status, encode_error(error.message),
                                [_JSON, *error.headers])

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._token is None:
            raise HTTPError(503, "no cloud API token yet: run `tierwise registry keygen`")
        path, method = scope["path"], scope["method"]
        if path == PREFIX + "/login":
            if method == "POST":
                await self._login(scope, receive, send)
            else:
                await send_response(send, 200, _LOGIN_PAGE, _HTML)
            return
        if path == PREFIX + "/logout" and method == "POST":
            session = _cookie(scope)
            with self._lock:
                self._sessions.pop(session or "", None)
            await send_response(send, 303, b"", [(b"location", f"{PREFIX}/login".encode()),
                                                 _clear_cookie()])
            return
        if not self._signed_in(scope):
            if path in (PREFIX, PREFIX + "/"):  # a person: to the sign-in page
                await send_response(send, 303, b"", [(b"location", f"{PREFIX}/login".encode())])
                return
            raise HTTPError(401, f"sign in first: {PREFIX}/login (a session cookie; tokens "
                                 "in URLs are not taken)")
        if path in (PREFIX, PREFIX + "/"):
            await send_response(send, 200, self._page().encode(), _HTML)
        elif path == PREFIX + "/data":
            views = await asyncio.to_thread(self._views)
            body = orjson.dumps({**views.summary(), "emulated": views.emulated,
                                 "summary_html": summary_html(views.summary(),
                                                              views.emulated)})
            await send_response(send, 200, body, [_JSON, (b"cache-control", b"no-store")])
        elif path.startswith(PREFIX + "/plot/") and path.endswith(".png"):
            name = path[len(PREFIX + "/plot/"):-len(".png")]
            if name not in PLOTS:
                raise HTTPError(404, f"no view {name!r}; views: {sorted(PLOTS)}")
            png = await asyncio.to_thread(self._plot, name)
            await send_response(send, 200, png, [(b"content-type", b"image/png"),
                                                 (b"cache-control", b"no-store")])
        else:
            raise HTTPError(404, f"no such endpoint: {path}")

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > 4096:
                raise HTTPError(413, "a sign-in form is at most 4096 bytes")
            if not message.get("more_body"):
                break
        token = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0]
        if not await asyncio.to_thread(self._is_operator, token):
            raise HTTPError(401, "that is not the operator's token (registry.token)")
        session = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._sessions = {sid: end for sid, end in self._sessions.items() if end > now}
            if len(self._sessions) >= MAX_SESSIONS:  # the oldest make room
                for sid in sorted(self._sessions, key=self._sessions.__getitem__)[:100]:
                    del self._sessions[sid]
            self._sessions[session] = now + self.session_s
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        cookie = (f"{COOKIE}={session}; Path={PREFIX}; HttpOnly; SameSite=Strict; "
                  f"Max-Age={int(self.session_s)}{secure}")
        await send_response(send, 303, b"", [(b"location", f"{PREFIX}/".encode()),
                                             (b"set-cookie", cookie.encode()),
                                             (b"cache-control", b"no-store")])

    def _is_operator(self, token: str) -> bool:
        try:
            principal = self.credentials.authenticate(b"Bearer " + token.encode())
        except CredentialError:
            return False
        return principal.role == "operator"

    def _signed_in(self, scope: Scope) -> bool:
        session = _cookie(scope)
        if not session:
            return False
        with self._lock:
            end = self._sessions.get(session)
        return end is not None and end > time.monotonic()

    def _views(self) -> Views:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self.refresh_s:
                self._cached = (now, self._compute())
            return self._cached[1]

    def _plot(self, name: str) -> bytes:
        views = self._views()
        with self._lock:
            made = self._plots.get(name)
            stamp = self._cached[0] if self._cached else 0.0
            if made is None or made[0] != stamp:
                made = (stamp, PLOTS[name](views))
                self._plots[name] = made
            return made[1]

    def _page(self) -> str:
        images = "".join(f"<figure><img id='plot-{name}' alt='{name}' "
                         f"src='{PREFIX}/plot/{name}.png'></figure>" for name in PLOTS)
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>tierwise dashboard"
            f"</title><style>{STYLE}</style></head><body><h1>tierwise dashboard</h1>"
            "<p>Live from the telemetry collector; refreshed every "
            f"{self.refresh_s:g} s. <span id='updated'></span></p>"
            "<div id='summary'>loading…</div>"
            f"<div class='plots'>{images}</div>"
            "<script>\n"
            f"const views = {orjson.dumps(sorted(PLOTS)).decode()};\n"
            "async function refresh() {\n"
            f"  const answer = await fetch('{PREFIX}/data', {{cache: 'no-store'}});\n"
            "  if (!answer.ok) { document.getElementById('updated').textContent = "
            "'collector answered ' + answer.status; return; }\n"
            "  const data = await answer.json();\n"
            "  document.getElementById('summary').innerHTML = data.summary_html;\n"
            "  document.getElementById('updated').textContent = 'Updated ' + "
            "new Date().toLocaleTimeString() + ': ' + data.requests + ' requests.';\n"
            "  for (const view of views) {\n"
            "    document.getElementById('plot-' + view).src = "
            f"'{PREFIX}/plot/' + view + '.png?t=' + Date.now();\n"
            "  }\n"
            "}\n"
            f"refresh(); setInterval(refresh, {int(self.refresh_s * 1000)});\n"
            "</script></body></html>\n")
