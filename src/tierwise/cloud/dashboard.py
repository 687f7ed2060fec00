"""The live dashboard (`/dashboard`), a route table of the control plane: the report's
views, refreshed from the collector.

  GET  /dashboard/login            a sign-in page (an operator token, once)
  POST /dashboard/login            token=T: sets the session cookie, 303 to the page
  POST /dashboard/logout           ends the session
  GET  /dashboard                  the page (it refreshes itself every few seconds)  dashboard:read
  GET  /dashboard/data             the summary as JSON                                dashboard:read
  GET  /dashboard/plot/<view>.png  latency, tier_mix, cost, drift                     dashboard:read

Signing in once gives a session (`tierwise.cloud.auth.Sessions`): a random id in an
HttpOnly, SameSite=Strict cookie scoped to /dashboard (Secure over TLS), kept for
`session_s` and only while the token that signed in still works. No credential is ever in
a URL, the page or its image links, so none lands in a proxy's log, the browser's history
or a Referer. The sign-in page also takes the token in the URL's fragment (`#token=T`,
never sent to a server) and removes it from the history at once, for scripts and links
made by `tierwise demo`. Views are computed at most every `refresh_s` and shared by the
requests in between (a page load fires five at once), so a trace stored `refresh_s` ago is
always on the page.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qs

import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from tierwise.cloud.auth import SESSION_COOKIE, Sessions, scoped
from tierwise.cloud.http import read_body
from tierwise.monitor.report import PLOTS, STYLE, Views, summary_html
from tierwise.server.app import HTTPError

PREFIX = "/dashboard"
LOGIN = f"{PREFIX}/login"
NO_STORE = {"cache-control": "no-store"}
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


class Dashboard:
    """The dashboard's routes: `views()` computes the report's views (from the collector);
    `sessions` holds who signed in."""

    def __init__(self, views: Callable[[], Views], sessions: Sessions,
                 refresh_s: float = 2.0) -> None:
        self._compute = views
        self.sessions = sessions
        self.refresh_s = refresh_s
        self._cached: tuple[float, Views] | None = None
        self._plots: dict[str, tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    @property
    def routes(self) -> list[BaseRoute]:
        return [Route(LOGIN, self.login_page, methods=["GET"]),
                Route(LOGIN, self.login, methods=["POST"]),
                Route(f"{PREFIX}/logout", self.logout, methods=["POST"]),
                Route(PREFIX, self.page, methods=["GET"]),
                Route(f"{PREFIX}/", self.page, methods=["GET"]),
                Route(f"{PREFIX}/data", self.data, methods=["GET"]),
                Route(f"{PREFIX}/plot/{{view}}.png", self.plot, methods=["GET"])]

    async def login_page(self, request: Request) -> Response:
        """The sign-in page, an HTML form for an operator token (no credential needed)."""
        return HTMLResponse(_LOGIN_PAGE, headers=NO_STORE)

    async def login(self, request: Request) -> Response:
        """Sign in with the form's `token=T` (an operator's): sets the session cookie and
        answers 303 to the dashboard (no credential needed; 401 for a token that is not an
        operator's, 413 over 4 KiB)."""
        body = await read_body(request, 4096, "a sign-in form")
        token = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0]
        session = await asyncio.to_thread(self.sessions.start, token)
        if session is None:
            raise HTTPError(401, "that is not an operator's token (registry.token, or one "
                                 "enrolled with the operator role)")
        answer = RedirectResponse(f"{PREFIX}/", status_code=303, headers=NO_STORE)
        answer.set_cookie(SESSION_COOKIE, session, max_age=int(self.sessions.session_s),
                          path=PREFIX, secure=request.url.scheme == "https", httponly=True,
                          samesite="strict")
        return answer

    async def logout(self, request: Request) -> Response:
        """End the session of the cookie sent, if any, and answer 303 to the sign-in page (no
        credential needed)."""
        self.sessions.end(request.cookies.get(SESSION_COOKIE, ""))
        answer = RedirectResponse(LOGIN, status_code=303)
        answer.delete_cookie(SESSION_COOKIE, path=PREFIX, httponly=True, samesite="strict")
        return answer

    @scoped("dashboard:read", sign_in=LOGIN)
    async def page(self, request: Request) -> Response:
        """The dashboard's HTML page, which refreshes its summary and plots every 2 s (scope
        dashboard:read: an operator; without a credential, 303 to the sign-in page)."""
        return HTMLResponse(self._page(), headers=NO_STORE)

    @scoped("dashboard:read")
    async def data(self, request: Request) -> Response:
        """The summary of the traces of the last telemetry.dashboard_window_s seconds as JSON,
        with what was emulated and the summary as HTML (scope dashboard:read)."""
        views = await asyncio.to_thread(self._views)
        body = orjson.dumps({**views.summary(), "emulated": views.emulated,
                             "summary_html": summary_html(views.summary(), views.emulated)})
        return Response(body, media_type="application/json", headers=NO_STORE)

    @scoped("dashboard:read")
    async def plot(self, request: Request) -> Response:
        """One view as a PNG: latency, tier_mix, cost or drift (scope dashboard:read; 404 for
        another view)."""
        name = request.path_params["view"]
        if name not in PLOTS:
            raise HTTPError(404, f"no view {name!r}; views: {sorted(PLOTS)}")
        png = await asyncio.to_thread(self._plot, name)
        return Response(png, media_type="image/png", headers=NO_STORE)

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
