"""The fleet list: the server sites the cloud publishes (`GET /fleet/v1/sites`) and clients
take as sites of their own.

    {"sites": [{"name": "edge-paris", "kind": "edge", "url": "https://paris.example:8000",
                "region": "eu-west", "usd_per_hour": 0.17, "usd_per_gb_up": 0.0,
                "usd_per_gb_down": 0.0, "price_source": "...", "require_auth": false},
               ...]}

Prices may be null (the client's price book for the kind then applies). A list is parsed
whole or refused whole: a client keeps the sites it has rather than take half a list.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
KINDS = ("edge", "cloud")
MAX_SITES = 10_000
WILDCARDS = ("0.0.0.0", "::")


class FleetError(ValueError):
    """A fleet list that cannot be taken; the message names the field."""


@dataclass(frozen=True)
class FleetSite:
    name: str
    kind: str
    url: str
    region: str = ""
    usd_per_hour: float | None = None
    usd_per_gb_up: float | None = None
    usd_per_gb_down: float | None = None
    price_source: str = ""
    require_auth: bool = False  # the site wants the device's bearer token

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_fleet(sites: list[FleetSite]) -> bytes:
    return orjson.dumps({"sites": [site.to_dict() for site in sites]})


def parse_fleet(body: bytes) -> list[FleetSite]:
    """The sites of a fleet list. Raises FleetError naming the first bad field: not JSON,
    no `sites` list, a site without a valid name, kind or http(s) URL, a price that is not a
    number ≥ 0, or a name listed twice."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise FleetError(f"not JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("sites"), list):
        raise FleetError("expected an object with a 'sites' list")
    entries = document["sites"]
    if len(entries) > MAX_SITES:
        raise FleetError(f"sites: {len(entries)} sites, at most {MAX_SITES}")
    sites: list[FleetSite] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"sites[{index}]"
        if not isinstance(entry, dict):
            raise FleetError(f"{where}: expected an object")
        name = entry.get("name")
        if not isinstance(name, str) or not SITE_NAME.match(name) or name == "device":
            raise FleetError(f"{where}.name: expected a site name (letters, digits, '_.-', "
                             f"not 'device'), got {name!r}")
        if name in seen:
            raise FleetError(f"{where}.name: {name!r} is listed twice")
        seen.add(name)
        kind = entry.get("kind")
        if kind not in KINDS:
            raise FleetError(f"{where}.kind: expected one of {list(KINDS)}, got {kind!r}")
        url = entry.get("url")
        check_site_url(url, f"{where}.url")
        assert isinstance(url, str)  # check_site_url raised otherwise
        region = entry.get("region", "")
        if not isinstance(region, str):
            raise FleetError(f"{where}.region: expected a string, got {region!r}")
        prices = {}
        for field in ("usd_per_hour", "usd_per_gb_up", "usd_per_gb_down"):
            value = entry.get(field)
            if value is not None and (isinstance(value, bool) or
                                      not isinstance(value, int | float) or not value >= 0):
                raise FleetError(f"{where}.{field}: expected a number ≥ 0 or null, "
                                 f"got {value!r}")
            prices[field] = None if value is None else float(value)
        source = entry.get("price_source", "")
        require_auth = entry.get("require_auth", False)
        if not isinstance(require_auth, bool):
            raise FleetError(f"{where}.require_auth: expected true or false, got "
                             f"{require_auth!r}")
        sites.append(FleetSite(name, kind, url.rstrip("/"), region, **prices,
                               price_source=source if isinstance(source, str) else "",
                               require_auth=require_auth))
    return sites


def check_site_url(url: object, where: str) -> None:
    """FleetError naming `where` unless `url` is an http(s) URL with a host a device can
    reach (not a wildcard bind address) and, if given, a valid port."""
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        port_ok = parts is not None and (parts.port is None or parts.port > 0)
    except ValueError:  # a malformed IPv6 literal, a port that is not a number
        parts, port_ok = None, False
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname \
            or not port_ok:
        raise FleetError(f"{where}: expected an http(s)://host:port URL, got {url!r}")
    if parts.hostname in WILDCARDS:
        raise FleetError(f"{where}: {parts.hostname} is where a server listens, not an "
                         f"address a device can reach, in {url!r}")
