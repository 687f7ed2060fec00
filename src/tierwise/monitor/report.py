"""`tierwise report`: what the collector has seen, as one HTML file with plots; the same
views feed the cloud server's live dashboard (`tierwise.cloud.dashboard`).

From the stored traces: the latency distribution per plan kind, the tier mix over time, cost
over time against all-cloud (the ledger), and the confidence and drift scores over time with
the alerts marked (a `DriftMonitor` run over the traces in the order they started, at the
collector; alerts raised on devices are marked too).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from tierwise.config import Config
from tierwise.monitor.drift import DriftMonitor, DriftScore
from tierwise.monitor.ledger import AllCloudBaseline, Ledger, all_cloud_baseline
from tierwise.monitor.metrics import plan_kind
from tierwise.planner.cost import PriceTable
from tierwise.protocol.traces import TraceRecord

TIERS = ("device", "edge", "cloud")


@dataclass
class Views:
    """Everything the report and the dashboard show, computed once from the records."""

    records: list[dict[str, Any]]
    ledger: Ledger | None
    drift: DriftMonitor
    device_alerts: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    emulated: list[str] = field(default_factory=list)  # from the traces
    unreadable: int = 0  # stored records that are not traces (`tierwise.protocol.traces`)

    @property
    def start(self) -> float:
        return self.records[0]["started_at"] if self.records else 0.0

    def summary(self) -> dict[str, Any]:
        records = self.records
        latencies = np.array([r["total_ms"] for r in records]) if records else np.zeros(1)
        summary: dict[str, Any] = {
            "requests": len(records),
            "unreadable_records": self.unreadable,
            "devices": len({r["device"] for r in records}),
            "latency_p50_ms": float(np.percentile(latencies, 50)),
            "latency_p95_ms": float(np.percentile(latencies, 95)),
            "tier_mix": dict(Counter(r["tier"] for r in records)),
            "plans": dict(Counter(plan_kind(r["plan"]) for r in records)),
            "escalated": sum(r["escalated"] for r in records),
            "fallbacks": sum(r["fallback"] for r in records),
            "deadline_missed": sum(r["deadline_missed"] for r in records),
            "drift_alerts": len(self.drift.alerts),
            "device_drift_alerts": len(self.device_alerts),
            "model_versions": dict(Counter(f"{r['model']} v{r['model_version']}"
                                           for r in records)),
        }
        if self.ledger is not None:
            summary["cost"] = self.ledger.summary()
        return summary


def compute_views(records: list[dict[str, Any]], prices: PriceTable,
                  baseline: AllCloudBaseline | None) -> Views:
    ledger = Ledger(prices, baseline) if baseline is not None else None
    drift = DriftMonitor()
    readable = []
    skipped = 0
    for record in records:
        try:  # stored before the collector validated, or written by hand: never fatal
            trace = TraceRecord.model_validate_json(record["record"]).model_dump(mode="json")
        except (ValidationError, TypeError):
            skipped += 1
            continue
        readable.append((record, trace))
    views = Views([record for record, _ in readable], ledger, drift, unreadable=skipped)
    for record, trace in readable:
        record["cost_usd_ledger"] = ledger.add(trace) if ledger is not None else \
            record["cost_usd"]
        scores = drift.update({"input_mean": record["input_mean"],
                               "input_std": record["input_std"],
                               "confidence": record["confidence"],
                               "label": record["label"]})
        record["collector_alerts"] = scores
        for alert in trace.get("drift_alerts") or []:
            views.device_alerts.append((record["started_at"], alert))
        for label in trace.get("emulated") or []:
            if label not in views.emulated:
                views.emulated.append(label)
    return views


def views_for(config: Config, since: float = 0.0) -> Views:
    """The views over what the collector of `config` stored since `since` (epoch s)."""
    from tierwise.monitor.collector import Collector

    records = Collector(config.telemetry.collector_path(config.data_dir)).records(since)
    from tierwise.models.store import list_models, tier_models

    found = list_models(config.models_dir, weights=False)
    cloud = tier_models(config, {name: info for name, (info, _) in found.items()}).get(
        "cloud", [])
    try:
        baseline: AllCloudBaseline | None = all_cloud_baseline(config.models_dir, cloud[0]) \
            if cloud else None
    except FileNotFoundError:
        baseline = None  # no cloud model profile here: costs without savings
    views = compute_views(records, PriceTable.of(config), baseline)
    labels_db = config.active.label_root(config.data_dir) / "labels.db"
    clouds = config.sites("cloud")
    if views.ledger is not None and clouds and (config.active.label_db or labels_db.is_file()):
        from tierwise.cloud import label_store

        views.ledger.add_sample_uploads(label_store(config).uploads(since), clouds[0])
    return views


# -- plots --------------------------------------------------------------------------------


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7.5, 3.6))


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _seconds(views: Views) -> np.ndarray:
    return np.array([r["started_at"] - views.start for r in views.records])


def plot_latency(views: Views) -> bytes:
    fig, ax = _figure()
    by_plan: dict[str, list[float]] = {}
    for record in views.records:
        by_plan.setdefault(plan_kind(record["plan"]), []).append(record["total_ms"])
    for plan, latencies in sorted(by_plan.items()):
        ordered = np.sort(latencies)
        ax.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered),
                label=f"{plan} ({len(ordered)})")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log)")
    ax.set_ylabel("share of requests")
    ax.set_title("Latency distribution per plan kind")
    ax.grid(alpha=0.3)
    if by_plan:
        ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def plot_tier_mix(views: Views, buckets: int = 30) -> bytes:
    fig, ax = _figure()
    seconds = _seconds(views)
    if len(seconds):
        edges = np.linspace(0, max(seconds.max(), 1e-3), buckets + 1)
        tiers = np.array([r["tier"] for r in views.records])
        # the usual three first (stable colours), then every other site that answered
        names = list(dict.fromkeys([*TIERS, *sorted(set(tiers) - {""})]))
        shares = []
        for tier in names:
            counts = np.histogram(seconds[tiers == tier], edges)[0]
            shares.append(counts)
        totals = np.maximum(np.sum(shares, axis=0), 1)
        ax.stackplot(edges[:-1], [s / totals for s in shares], labels=names, step="post",
                     alpha=0.8)
        ax.legend(fontsize=8, loc="upper right")
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel("share answered by")
    ax.set_title("Tier mix over time")
    ax.set_ylim(0, 1)
    return _png(fig)


def plot_cost(views: Views) -> bytes:
    fig, ax = _figure()
    seconds = _seconds(views)
    if len(seconds):
        cost = np.cumsum([r["cost_usd_ledger"] for r in views.records])
        ax.plot(seconds, cost * 1e6, label="tierwise")
        if views.ledger is not None:
            per_request = views.ledger.baseline.cost_usd(views.ledger.prices)
            ax.plot(seconds, np.arange(1, len(seconds) + 1) * per_request * 1e6,
                    label="all in the cloud", linestyle="--")
            saved = views.ledger.summary()
            ax.set_title(f"Cumulative cost: {saved['savings_share']:.0%} saved against "
                         "all-cloud")
        else:
            ax.set_title("Cumulative cost")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel("USD × 10⁻⁶")
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_drift(views: Views) -> bytes:
    fig, ax = _figure()
    seconds = _seconds(views)
    if len(seconds):
        confidence = np.array([r["confidence"] if r["confidence"] is not None else np.nan
                               for r in views.records], dtype=np.float64)
        window = min(50, len(confidence))
        smoothed = np.convolve(np.nan_to_num(confidence), np.ones(window) / window, "valid")
        ax.plot(seconds[window - 1:], smoothed, color="tab:blue",
                label=f"confidence (mean of {window})")
        ax.set_ylabel("confidence")
        ax.set_ylim(0, 1.05)
        twin = ax.twinx()
        at = {i: r["started_at"] - views.start for i, r in enumerate(views.records, start=1)}
        for statistic in ("input_mean", "confidence"):
            series: list[DriftScore] = [s for s in views.drift.scores
                                        if s.detector == "psi" and s.statistic == statistic]
            twin.plot([at[s.sample] for s in series], [s.score for s in series],
                      label=f"PSI {statistic}", linewidth=1)
        alerts = views.drift.alerts
        twin.scatter([at[a.sample] for a in alerts], [a.score for a in alerts], marker="x",
                     color="red", zorder=3, label=f"alerts ({len(alerts)})")
        for started_at, _ in views.device_alerts[:1]:
            ax.axvline(started_at - views.start, color="red", linestyle=":", linewidth=1)
        twin.set_ylabel("drift score (PSI)")
        twin.set_yscale("symlog", linthresh=0.1)
        handles = ax.get_legend_handles_labels()
        extra = twin.get_legend_handles_labels()
        ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7, loc="lower left")
    ax.set_xlabel("seconds since the first request")
    ax.set_title("Confidence and drift (x: collector alerts; dotted: first device alert)")
    return _png(fig)


PLOTS = {"latency": plot_latency, "tier_mix": plot_tier_mix, "cost": plot_cost,
         "drift": plot_drift}


# -- the HTML report ----------------------------------------------------------------------


def summary_html(summary: dict[str, Any], emulated: list[str]) -> str:
    rows = [("requests", f"{summary['requests']:,}"), ("devices", str(summary["devices"])),
            ("latency p50 / p95", f"{summary['latency_p50_ms']:.2f} / "
                                  f"{summary['latency_p95_ms']:.2f} ms"),
            ("answered by", ", ".join(f"{t} {n:,}" for t, n in summary["tier_mix"].items())),
            ("plans", ", ".join(f"{p} {n:,}" for p, n in summary["plans"].items())),
            ("escalated / fell back / missed the deadline",
             f"{summary['escalated']:,} / {summary['fallbacks']:,} / "
             f"{summary['deadline_missed']:,}"),
            ("drift alerts (collector / devices)",
             f"{summary['drift_alerts']} / {summary['device_drift_alerts']}"),
            ("model versions", ", ".join(f"{m} {n:,}"
                                         for m, n in summary["model_versions"].items()))]
    cost = summary.get("cost")
    if cost:
        parts = [f"{tier} compute ${usd:.3g}" for tier, usd in cost["compute_usd"].items()]
        parts += [f"{tier} link ${usd:.3g}" for tier, usd in cost["link_usd"].items()]
        parts.append(f"device energy ${cost['device_energy_usd']:.3g}")
        rows += [("cost", f"${cost['total_usd']:.3g}: " + ", ".join(parts)),
                 ("all in the cloud", f"${cost['all_cloud_usd']:.3g}: saved "
                  f"${cost['savings_usd']:.3g} ({cost['savings_share']:.0%})")]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td id='{html.escape(k.split()[0])}'>"
                   f"{html.escape(v)}</td></tr>" for k, v in rows)
    notes = "".join(f"<li>{html.escape(e)}</li>" for e in emulated)
    return f"<table>{body}</table><p>Emulated:</p><ul>{notes or '<li>nothing</li>'}</ul>"


STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px}th{text-align:left;"
         "padding-right:1em;vertical-align:top}img{max-width:100%;border:1px solid #ddd}"
         ".plots{display:grid;grid-template-columns:1fr 1fr;gap:1em}")


def write_report(views: Views, path: Path, title: str = "tierwise report") -> Path:
    """One self-contained HTML file: the summary table and every plot, inline."""
    images = "".join(
        f"<figure><img alt='{name}' src='data:image/png;base64,"
        f"{base64.b64encode(plot(views)).decode()}'></figure>" for name, plot in PLOTS.items())
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>Generated {generated} from the telemetry collector.</p>"
        f"{summary_html(views.summary(), views.emulated)}<div class='plots'>{images}</div>"
        "</body></html>\n")
    return path
