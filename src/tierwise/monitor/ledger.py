"""The cost ledger: what the traffic cost, per tier and per link, and what it saved.

Each trace's stages are priced from the price table (`planner.cost.PriceTable`, the one the
planner scores plans with): a server's compute time × its hourly price (a batch's compute
shared by its rows), bytes each way × the link's price per GB, and the device's compute ×
its rated power × the electricity price. The savings compare with running every request in
the cloud: the cloud model's profiled compute plus the raw input up and the answer down on
the cloud link (`AllCloudBaseline`). What devices upload for active learning (the samples
their samplers selected) is priced on the link to the cloud, per device
(`add_sample_uploads`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierwise.config import DEVICE_TIER
from tierwise.planner.cost import PriceTable


@dataclass(frozen=True)
class AllCloudBaseline:
    """One request as cloud-only would run it: the cloud model's compute (its profile, batch
    1), the input sent raw and the answer received, in bytes on the wire."""

    compute_ms: float
    bytes_up: int
    bytes_down: int
    site: str = "cloud"  # the cloud site it runs on

    def cost_usd(self, prices: PriceTable) -> float:
        return prices.compute_usd(self.site, self.compute_ms) + \
            prices.transfer_usd(self.site, self.bytes_up, self.bytes_down)


@dataclass
class Ledger:
    """Costs summed from traces (`add`), in USD."""

    prices: PriceTable
    baseline: AllCloudBaseline
    requests: int = 0
    compute_usd: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    link_usd: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    link_bytes: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    device_energy_usd: float = 0.0
    # active learning: per device, [samples, bytes] it uploaded to the label queue, and the
    # link those bytes are priced on
    sample_uploads: dict[str, list[int]] = field(default_factory=dict)
    sample_upload_usd: float = 0.0

    def add_sample_uploads(self, uploads: dict[str, dict[str, int]], site: str) -> float:
        """Price what devices uploaded to the label queue (`LabelStore.uploads`: per device,
        samples and bytes) on the link to `site` (the cloud); its cost."""
        cost = 0.0
        for device, sent in uploads.items():
            counted = self.sample_uploads.setdefault(device, [0, 0])
            counted[0] += sent["samples"]
            counted[1] += sent["bytes"]
            cost += self.prices.transfer_usd(site, sent["bytes"], 0)
        self.sample_upload_usd += cost
        return cost

    def add(self, trace: dict[str, Any]) -> float:
        """Price one trace (a `Trace.to_dict()` or a collector record); its cost."""
        self.requests += 1
        total = 0.0
        for stage in trace["stages"]:
            tier = stage["tier"]
            if tier == DEVICE_TIER:
                cost = self.prices.device_energy_usd(stage["compute_ms"])
                self.device_energy_usd += cost
                total += cost
                continue
            if tier in self.prices.sites:
                billed_ms = stage["compute_ms"] / max(int(stage.get("batch_size") or 1), 1)
                compute = self.prices.compute_usd(tier, billed_ms)
                link = self.prices.transfer_usd(tier, stage["bytes_up"], stage["bytes_down"])
            else:  # a site this config does not price: what the device billed it at
                compute, link = float(stage.get("cost_usd") or 0.0), 0.0
            self.compute_usd[tier] += compute
            self.link_usd[tier] += link
            self.link_bytes[tier][0] += stage["bytes_up"]
            self.link_bytes[tier][1] += stage["bytes_down"]
            total += compute + link
        return total

    @property
    def total_usd(self) -> float:
        return sum(self.compute_usd.values()) + sum(self.link_usd.values()) + \
            self.device_energy_usd + self.sample_upload_usd

    @property
    def all_cloud_usd(self) -> float:
        return self.requests * self.baseline.cost_usd(self.prices)

    def summary(self) -> dict[str, Any]:
        all_cloud = self.all_cloud_usd
        return {
            "requests": self.requests,
            "compute_usd": dict(self.compute_usd),
            "link_usd": dict(self.link_usd),
            "link_bytes": {tier: {"up": up, "down": down}
                           for tier, (up, down) in self.link_bytes.items()},
            "device_energy_usd": self.device_energy_usd,
            "sample_uploads": {device: {"samples": n, "bytes": size}
                               for device, (n, size) in self.sample_uploads.items()},
            "sample_upload_usd": self.sample_upload_usd,
            "total_usd": self.total_usd,
            "all_cloud_usd": all_cloud,
            "savings_usd": all_cloud - self.total_usd,
            "savings_share": (all_cloud - self.total_usd) / all_cloud if all_cloud else 0.0,
        }


def all_cloud_baseline(models_dir: Path, model: str) -> AllCloudBaseline:
    """The all-cloud request for `model`: its profiled cloud compute (batch 1), and the bytes
    of a binary OIP request carrying one raw input (an image at the model's image size) and
    of its answer, encoded by the same encoder the client and server use."""
    import numpy as np

    from tierwise.client.client import HTTP_HEADER_BYTES
    from tierwise.models.inputs import image_size
    from tierwise.models.store import load_info, model_dir
    from tierwise.profile.model_profile import load_profile
    from tierwise.protocol.oip import encode_infer_request, encode_infer_response, numpy_dtype

    info = load_info(model_dir(models_dir, model))
    spec, size = info.inputs[0], image_size(info)
    row = [*size, spec.shape[-1]] if size else [max(dim, 1) for dim in spec.shape[1:]]
    image = np.zeros([1, *row], dtype=numpy_dtype(spec.datatype))
    request, _ = encode_infer_request({info.inputs[0].name: image}, binary=True,
                                      binary_outputs=True)
    logits = np.zeros([1, *(max(dim, 1) for dim in info.outputs[0].shape[1:])],
                      dtype=np.float32)
    answer, _ = encode_infer_response({info.outputs[0].name: logits}, model_name=model,
                                      model_version=info.version, binary_outputs=True)
    return AllCloudBaseline(compute_ms=load_profile(models_dir, model).compute_ms["cloud"],
                            bytes_up=len(request) + HTTP_HEADER_BYTES,
                            bytes_down=len(answer) + HTTP_HEADER_BYTES)
