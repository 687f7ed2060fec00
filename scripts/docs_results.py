"""Copy benchmark results into the documentation (`make docs-results`).

    python scripts/docs_results.py                    # every run listed in RUNS, if present
    python scripts/docs_results.py bench-active demo  # only these

A benchmark writes into its `--out` directory under reports/ (git-ignored). The benchmark
pages (docs/benchmarks/*.md) read their numbers, command, date and machine from the copies
under docs/benchmarks/results/<run>/ (committed): results.json, table.md and the PNG plots,
nothing else (logs and per-request records stay in reports/). A run that is not in
reports/ keeps the copy it has, and the script says so.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"
RESULTS = ROOT / "docs" / "benchmarks" / "results"

# the reports/ directory each benchmark page shows, and the command that writes it
RUNS = {
    "demo": "tierwise demo",
    "demo-camera": "tierwise demo --workload camera",
    "bench-serve": "tierwise bench serve",
    "bench-serve-camera": "tierwise bench serve --workload camera",
    "bench-serve-ray": "tierwise bench serve --engine ray",
    "bench-serve-ray-scaled": "tierwise bench serve --engine ray --compute-scale 100 "
                              "--max-batch-size 1 --concurrency 1,8,32 "
                              "--out reports/bench-serve-ray-scaled",
    "bench-routing": "tierwise bench routing",
    "bench-bandwidth-fashion-mnist": "tierwise bench bandwidth",
    "bench-bandwidth-camera": "tierwise bench bandwidth --workload camera",
    "bench-trace": "tierwise bench trace",
    "bench-fleet": "tierwise bench fleet",
    "bench-rollout": "tierwise bench rollout",
    "bench-drift": "tierwise bench drift",
    "bench-decide": "tierwise bench decide",
    "bench-durability": "tierwise bench durability",
    "fl-bench": "tierwise fl bench",
    "bench-active": "tierwise bench active",
    "learn-loop": "tierwise learn loop",
    "optimize": "tierwise optimize report; tierwise optimize bottleneck --workload camera",
}
KEEP = ("*.json", "*.md", "*.png")  # results, tables, plots
MAX_FILE_BYTES = 2_000_000


def copy_run(name: str) -> list[str]:
    """Copy reports/<name>'s results into docs; the names of the files copied."""
    source = REPORTS / name
    target = RESULTS / name
    files = sorted({path for pattern in KEEP for path in source.glob(pattern)
                    if path.is_file() and path.stat().st_size <= MAX_FILE_BYTES})
    if not any(path.name.endswith(".json") for path in files):
        raise FileNotFoundError(f"{source}: no results (run `{RUNS.get(name, name)}`)")
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for path in files:
        shutil.copy2(path, target / path.name)
    return [path.name for path in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help=f"of {', '.join(RUNS)} (default all found)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.runs if name not in RUNS]
    if unknown:
        parser.error(f"unknown runs {', '.join(unknown)}; expected some of {', '.join(RUNS)}")
    for name in args.runs or list(RUNS):
        try:
            copied = copy_run(name)
        except FileNotFoundError as error:
            kept = "keeping the copy in docs" if (RESULTS / name).exists() else "none in docs"
            print(f"skipped {name}: {error}; {kept}")
            continue
        print(f"copied {name}: {', '.join(copied)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
