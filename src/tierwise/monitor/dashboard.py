"""The live dashboard on the cloud server: the report's views, refreshed from the collector.

  GET /dashboard?token=T               the page (it refreshes itself every few seconds)
  GET /dashboard/data?token=T          the summary as JSON
  GET /dashboard/plot/<view>.png?token=T   latency, tier_mix, cost, drift

The token is the cloud API token, in the query because a browser's <img> cannot send a
header. Views are computed at most every `refresh_s` and shared by the requests in between
(a page load fires five at once), so a trace stored `refresh_s` ago is always on the page.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, quote

import orjson

from tierwise.monitor.report import PLOTS, STYLE, Views, summary_html
from tierwise.protocol.oip import encode_error
from tierwise.server.app import HTTPError, Receive, Scope, Send, send_response

PREFIX = "/dashboard"
_JSON = (b"content-type", b"application/json")


class DashboardApp:
    """ASGI: the dashboard under /dashboard, everything else to `app`."""

    def __init__(self, views: Callable[[], Views], token: str | None, app: Any,
                 refresh_s: float = 2.0) -> None:
        self._compute = views
        self._token = token
        self.app = app
        self.refresh_s = refresh_s
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
            await self._handle(scope, send)
        except HTTPError as error:
            await send_response(send, error.status, encode_error(error.message), [_JSON])

    async def _handle(self, scope: Scope, send: Send) -> None:
        if self._token is None:
            raise HTTPError(503, "no cloud API token yet: run `tierwise registry keygen`")
        query = parse_qs(scope.get("query_string", b"").decode())
        token = (query.get("token") or [""])[0]
        if not hmac.compare_digest(token.encode(), self._token.encode()):
            raise HTTPError(401, "the dashboard needs ?token=<the cloud API token>")
        path = scope["path"]
        if path in (PREFIX, PREFIX + "/"):
            await send_response(send, 200, self._page(token).encode(),
                                [(b"content-type", b"text/html; charset=utf-8")])
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

    def _page(self, token: str) -> str:
        quoted = quote(token)
        images = "".join(f"<figure><img id='plot-{name}' alt='{name}' "
                         f"src='{PREFIX}/plot/{name}.png?token={quoted}'></figure>"
                         for name in PLOTS)
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>tierwise dashboard"
            f"</title><style>{STYLE}</style></head><body><h1>tierwise dashboard</h1>"
            "<p>Live from the telemetry collector; refreshed every "
            f"{self.refresh_s:g} s. <span id='updated'></span></p>"
            "<div id='summary'>loading…</div>"
            f"<div class='plots'>{images}</div>"
            "<script>\n"
            f"const token = {orjson.dumps(token).decode()};\n"
            f"const views = {orjson.dumps(sorted(PLOTS)).decode()};\n"
            "async function refresh() {\n"
            f"  const answer = await fetch('{PREFIX}/data?token=' + "
            "encodeURIComponent(token), {cache: 'no-store'});\n"
            "  if (!answer.ok) { document.getElementById('updated').textContent = "
            "'collector answered ' + answer.status; return; }\n"
            "  const data = await answer.json();\n"
            "  document.getElementById('summary').innerHTML = data.summary_html;\n"
            "  document.getElementById('updated').textContent = 'Updated ' + "
            "new Date().toLocaleTimeString() + ': ' + data.requests + ' requests.';\n"
            "  for (const view of views) {\n"
            "    document.getElementById('plot-' + view).src = "
            f"'{PREFIX}/plot/' + view + '.png?token=' + encodeURIComponent(token) + "
            "'&t=' + Date.now();\n"
            "  }\n"
            "}\n"
            f"refresh(); setInterval(refresh, {int(self.refresh_s * 1000)});\n"
            "</script></body></html>\n")
