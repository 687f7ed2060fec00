"""What every benchmark (and the demo) writes, in one shape: `BenchReport`.

A benchmark's directory holds `results.json` (its document, with `benchmark`, `emulated`,
`command` and `written_at` added), `table.md` (its rows, then what was emulated and notes)
and PNG plots, each with the same footer naming what was emulated. `emulated` is always a
list of sentences; an empty list is printed as `NOTHING_EMULATED`, never left out.

    report = BenchReport("bandwidth", out_dir, emulated=labels)
    report.table(rows, COLUMNS, notes=["..."])
    with report.figure("sweep.png", ncols=3) as (figure, axes):
        ...
    report.write({"rows": rows, ...})
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

NOTHING_EMULATED = "nothing emulated: real sockets on loopback, this host's compute"


@dataclass(frozen=True)
class Column:
    """One column of a table: the row's `key`, its `title`, and how a value prints
    (`fmt`: a format string, or a callable)."""

    key: str
    title: str
    fmt: str | Callable[[Any], str] = "{}"
    left: bool = False

    def cell(self, row: dict[str, Any]) -> str:
        value = row.get(self.key)
        if value is None:
            return "–"
        return self.fmt(value) if callable(self.fmt) else self.fmt.format(value)


def machine() -> dict[str, Any]:
    """The machine a result was measured on: CPU model, cores, memory (GiB), OS, Python and
    ONNX Runtime versions."""
    import platform

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024**2, 1)
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib,
            "os": platform.platform(terse=True),
            "python": platform.python_version(), "onnxruntime": ort_version}


def run_record() -> dict[str, Any]:
    """What every results file starts with: the command line that produced it, when (UTC)
    and on what machine. The documentation's benchmark pages print these beside the
    numbers."""
    return {"command": " ".join(["tierwise", *sys.argv[1:]]) if sys.argv else "",
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine()}


class BenchReport:
    """The outputs of one benchmark run in `out_dir`."""

    def __init__(self, benchmark: str, out_dir: str | Path, emulated: Sequence[str],
                 console: Console | None = None) -> None:
        self.benchmark = benchmark
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.emulated = list(emulated)
        self.console = console or Console()
        self.written: list[Path] = []

    @property
    def footer(self) -> str:
        return "; ".join(self.emulated) if self.emulated else NOTHING_EMULATED

    def write(self, document: dict[str, Any], name: str = "results.json") -> Path:
        """`document` as JSON, with the benchmark's name, what was emulated, the command
        line, the time and the machine added (`run_record`)."""
        path = self.out_dir / name
        path.write_text(json.dumps({
            "benchmark": self.benchmark, "emulated": self.emulated or [NOTHING_EMULATED],
            **run_record(), **document}, indent=1, default=_jsonable) + "\n")
        self.written.append(path)
        return path

    def table(self, rows: Sequence[dict[str, Any]], columns: Sequence[Column], *,
              title: str, notes: Sequence[str] = (), name: str = "table.md",
              show: bool = True) -> Path:
        """Print the rows (rich) and write them as Markdown, with the emulation labels and
        `notes` below."""
        if show:
            table = Table(title=escape(title), caption=escape(self.footer))
            for column in columns:
                table.add_column(column.title, justify="left" if column.left else "right")
            for row in rows:
                table.add_row(*(escape(column.cell(row)) for column in columns))
            self.console.print(table)
        lines = [f"**{title}**", "",
                 "| " + " | ".join(column.title for column in columns) + " |",
                 "|" + "|".join(":---" if column.left else "---:" for column in columns) + "|"]
        lines += ["| " + " | ".join(column.cell(row) for column in columns) + " |"
                  for row in rows]
        lines += ["", "Emulated (the numbers depend on these):",
                  *[f"- {label}" for label in (self.emulated or [NOTHING_EMULATED])]]
        if notes:
            lines += ["", *notes]
        path = self.out_dir / name
        path.write_text("\n".join(lines) + "\n")
        self.written.append(path)
        return path

    @contextlib.contextmanager
    def figure(self, name: str, *, ncols: int = 1, nrows: int = 1,
               size: tuple[float, float] | None = None, title: str = "") -> Iterator[Any]:
        """A matplotlib figure (and its axes) saved to `name` with the emulation footer
        when the block ends."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(nrows, ncols, figsize=size or (7 * ncols, 4.5 * nrows),
                                    squeeze=False)
        try:
            yield figure, (axes[0, 0] if ncols == nrows == 1 else axes.ravel())
            if title:
                figure.suptitle(title, fontsize=10)
            figure.text(0.01, 0.005, "Emulated: " + self.footer, fontsize=6, wrap=True)
            figure.tight_layout(rect=(0, 0.04, 1, 1))
            path = self.out_dir / name
            figure.savefig(path, dpi=110)
            self.written.append(path)
        finally:
            plt.close(figure)

    def say_written(self) -> None:
        self.console.print(f"written to {self.out_dir}: "
                           + ", ".join(path.name for path in self.written))


def latency_cdf(axis: Any, series: dict[str, Sequence[float]], *,
                deadline_ms: float | None = None, styles: dict[str, dict[str, Any]] | None = None
                ) -> None:
    """Latency CDFs on `axis`, one line per named series (ms, log x), the deadline dotted."""
    for name, latencies in series.items():
        if not len(latencies):
            continue
        ordered = np.sort(np.asarray(latencies, dtype=float))
        axis.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=name,
                  **(styles or {}).get(name, {}))
    if deadline_ms is not None:
        axis.axvline(deadline_ms, color="red", linestyle=":", linewidth=1, label="deadline")
    axis.set_xscale("log")
    axis.set_xlabel("latency per request (ms, log)")
    axis.set_ylabel("share of requests")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (Wilson, JASA 1927): (low, high), 95% by
    default; (0, 1) for n = 0. Used where a table's share rests on few requests."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
