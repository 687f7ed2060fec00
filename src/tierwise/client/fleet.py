"""The fleet watcher: a client's sites kept in step with the fleet list the cloud publishes
(`GET /fleet/v1/sites`, `tierwise.cloud.fleet`), polled like registry deployments (an ETag,
304 when nothing changed, every `registry.poll_s`).

What a list brings is handed to `Client.apply_fleet`: new sites are planned like those of
the config, a site that left the list is no longer planned. A list that cannot be had or
read (the cloud unreachable, a refusal, a malformed or empty list) changes nothing: the
client keeps the sites it has, and the device model answers whatever they cannot; the
reason is kept in `last_error` (naming the setting) and logged once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import httpx

from tierwise.protocol.fleet import FleetError, FleetSite, parse_fleet

log = logging.getLogger(__name__)
PATH = "/fleet/v1/sites"
MAX_BODY = 16 * 1024 * 1024


class FleetWatcher:
    """Polls `url`'s fleet list with `token` every `poll_s` and calls `on_sites` with each
    new list. `verify`: the TLS context an https cloud is verified with."""

    def __init__(self, url: str, token: str, on_sites: Callable[[list[FleetSite]], None], *,
                 poll_s: float = 5.0, verify: object = True, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/") + PATH
        self.on_sites = on_sites
        self.poll_s = poll_s
        self.sites: list[FleetSite] | None = None  # the last list taken
        self.last_error = ""
        self._etag = ""
        self._http = httpx.Client(headers={"authorization": f"Bearer {token}"},
                                  timeout=timeout_s, verify=verify, trust_env=False)  # type: ignore[arg-type]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> bool:
        """Ask once; True when a new list was taken."""
        try:
            fetched = self._fetch()
        except Exception as error:  # FleetError, and anything unforeseen: never the thread
            reason = str(error) if isinstance(error, FleetError) else \
                f"{type(error).__name__}: {error}"
            message = f"registry.fleet: {reason}; keeping the sites known"
            if message != self.last_error:
                log.warning("%s", message)
            self.last_error = message
            return False
        self.last_error = ""
        if fetched is None:  # 304: unchanged
            return False
        sites, etag = fetched
        try:
            self.on_sites(sites)
        except Exception as error:  # not taken: asked in full again at the next poll
            log.exception("registry.fleet: the fleet list could not be applied")
            self.last_error = f"registry.fleet: could not apply the list: {error}"
            return False
        self.sites, self._etag = sites, etag  # only a list taken is acknowledged
        return True

    def _fetch(self) -> tuple[list[FleetSite], str] | None:
        """The new list and its ETag, or None when it is unchanged; FleetError saying why
        none can be taken."""
        try:
            response = self._http.get(self.url, headers={"if-none-match": self._etag}
                                      if self._etag else None)
        except httpx.HTTPError as error:
            raise FleetError(f"the cloud at {self.url} did not answer "
                             f"({type(error).__name__}: {error})") from None
        if response.status_code == 304:
            return None
        if response.status_code != 200:
            raise FleetError(f"{self.url} answered {response.status_code} "
                             f"({response.text[:200]}); the token needs the fleet:read scope "
                             "(a device or edge credential)")
        if len(response.content) > MAX_BODY:
            raise FleetError(f"the fleet list from {self.url} is over {MAX_BODY:,} bytes")
        try:
            sites = parse_fleet(response.content)
        except FleetError as error:
            raise FleetError(f"the fleet list from {self.url} is malformed: {error}") from None
        if not sites:
            raise FleetError(f"the cloud at {self.url} publishes no sites (tiers.<site>.url "
                             "or port in its config)")
        return sites, response.headers.get("etag", "")

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tierwise-fleet",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._http.close()
