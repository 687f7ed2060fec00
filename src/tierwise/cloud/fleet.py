"""The fleet list (`/fleet/v1`), a route table of the cloud's control plane: the server
sites of the cloud's config, for clients that know only the cloud (`registry.fleet`).

  GET /fleet/v1/sites    every published site: name, kind, URL,    fleet:read
                         region, prices; an ETag, and 304 for a
                         matching If-None-Match

A site is published with `tiers.<site>.url`, else http(s)://host:port when its port is set
(a site with port 0 has no address to publish), and whether it requires a bearer token.
The list is built and checked once, when the cloud starts: an address no device could use
is a ConfigError then, not a list every device refuses. Wire format:
`tierwise.protocol.fleet`.
"""

from __future__ import annotations

import hashlib

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tierwise.cloud.auth import scoped
from tierwise.config import Config, ConfigError
from tierwise.protocol.fleet import FleetError, FleetSite, check_site_url, encode_fleet

PREFIX = "/fleet/v1"


def published_sites(config: Config) -> list[FleetSite]:
    """The sites `config` publishes, in its order, each with its own prices (None: the
    client's price book for the kind). ConfigError naming `tiers.<site>.url` for an
    address no device could use (a malformed URL, a wildcard host such as 0.0.0.0)."""
    sites = []
    for name in config.sites():
        tier = config.tier(name)
        host = f"[{tier.host}]" if ":" in tier.host else tier.host  # IPv6, RFC 3986
        url = tier.url or (f"{'https' if config.tls.cert else 'http'}://{host}:{tier.port}"
                           if tier.port else "")
        if not url:
            continue
        try:
            check_site_url(url, f"tiers.{name}.url")
        except FleetError as error:
            raise ConfigError(f"{error} (set tiers.{name}.url to the address devices "
                              "reach it at)") from None
        link = config.links.get(name)
        sources = [source for source in (tier.price_source, link.price_source if link else "")
                   if source]
        sites.append(FleetSite(
            name=name, kind=config.kind(name), url=url.rstrip("/"), region=tier.region,
            usd_per_hour=tier.usd_per_hour,
            usd_per_gb_up=link.usd_per_gb_up if link else None,
            usd_per_gb_down=link.usd_per_gb_down if link else None,
            price_source="; ".join(sources), require_auth=tier.require_auth))
    return sites


def fleet_routes(config: Config) -> list[BaseRoute]:
    body = encode_fleet(published_sites(config))
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'

    @scoped("fleet:read")
    async def sites(request: Request) -> Response:
        """The published edge and cloud sites, from the cloud's config: name, kind, URL,
        region, prices and whether each requires a token; an ETag, 304 for a matching
        If-None-Match (scope fleet:read)."""
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"etag": etag})
        return Response(body, media_type="application/json", headers={"etag": etag})

    return [Route(f"{PREFIX}/sites", sites, methods=["GET"])]
