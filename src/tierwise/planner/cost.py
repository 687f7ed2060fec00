"""What a stage costs, from the price book (shared/DESIGN.md, "How a plan is scored"):
compute-seconds × the tier's price, bytes × the link's price, device energy × electricity."""

from __future__ import annotations

from tierwise.config import PriceBook

BYTES_PER_GB = 1e9
JOULES_PER_KWH = 3.6e6


def compute_cost_usd(prices: PriceBook, tier: str, compute_ms: float) -> float:
    """A server's compute: its hourly price for the compute time this request used."""
    return compute_ms / 1e3 * prices.usd_per_hour(tier) / 3600.0


def transfer_cost_usd(prices: PriceBook, tier: str, bytes_up: int, bytes_down: int) -> float:
    up, down = prices.link_usd_per_gb(tier)
    return bytes_up / BYTES_PER_GB * up + bytes_down / BYTES_PER_GB * down


def device_energy_cost_usd(prices: PriceBook, compute_ms: float) -> float:
    """The device's energy for `compute_ms` of compute at its rated power."""
    joules = prices.device_power_w * compute_ms / 1e3
    return joules / JOULES_PER_KWH * prices.electricity_usd_per_kwh
