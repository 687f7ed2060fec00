"""What a stage costs (shared/DESIGN.md, "How a plan is scored"): compute-seconds × the
site's price, bytes × its link's price, device energy × electricity.

`PriceTable` resolves the config into unit prices per site once: a site's own
`tiers.<site>.usd_per_hour` and `links.<site>.usd_per_gb_up|down` where it sets them, else
the price book's default for its kind. The planner predicts with the same table (its
vectors, `Policy`) that the trace bills with (`tierwise.client.stages`) and the ledger sums
with, so predicted and billed cost are one formula.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tierwise.config import DEVICE_TIER, Config

BYTES_PER_GB = 1e9
JOULES_PER_KWH = 3.6e6
MS_PER_HOUR = 3.6e6


@dataclass(frozen=True)
class SitePrice:
    """One site's unit prices, in USD."""

    per_ms: float  # of its server's compute
    per_byte_up: float  # device -> site
    per_byte_down: float  # site -> device


FREE = SitePrice(0.0, 0.0, 0.0)


@dataclass(frozen=True)
class PriceTable:
    """Unit prices per site and the device's energy price, from a config (`of`)."""

    sites: Mapping[str, SitePrice] = field(default_factory=dict)
    device_per_ms: float = 0.0  # the device's energy at its rated power

    @classmethod
    def of(cls, config: Config) -> PriceTable:
        book = config.prices
        sites = {}
        for name in config.sites():
            tier, kind = config.tier(name), config.kind(name)
            per_hour = tier.usd_per_hour if tier.usd_per_hour is not None else \
                book.usd_per_hour(kind)
            up, down = book.link_usd_per_gb(kind)
            link = config.links.get(name)
            if link is not None:
                up = link.usd_per_gb_up if link.usd_per_gb_up is not None else up
                down = link.usd_per_gb_down if link.usd_per_gb_down is not None else down
            sites[name] = SitePrice(per_hour / MS_PER_HOUR, up / BYTES_PER_GB,
                                    down / BYTES_PER_GB)
        device = book.device_power_w / 1e3 / JOULES_PER_KWH * book.electricity_usd_per_kwh
        return cls(sites, device)

    def site(self, tier: str) -> SitePrice:
        """`tier`'s unit prices (the device, or a site not configured: free)."""
        return FREE if tier == DEVICE_TIER else self.sites.get(tier, FREE)

    def compute_usd(self, tier: str, compute_ms: float) -> float:
        """A server's compute: its price for the compute time this request used."""
        return compute_ms * self.site(tier).per_ms

    def transfer_usd(self, tier: str, bytes_up: int, bytes_down: int) -> float:
        price = self.site(tier)
        return bytes_up * price.per_byte_up + bytes_down * price.per_byte_down

    def device_energy_usd(self, compute_ms: float) -> float:
        """The device's energy for `compute_ms` of compute at its rated power."""
        return compute_ms * self.device_per_ms
