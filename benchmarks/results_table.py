"""The results table of docs/results.md from finished `gdrt run` output directories.

    python benchmarks/results_table.py runs/office-seed42 [runs/office-seed43 ...] [--plot docs/plots/office.png]

Each directory is one pipeline run (`gdrt run --out DIR`). Its report's comparison.json gives the test
metrics and the attribution auxiliary share per model; the trained models' train_metrics.json give the
train time per epoch. Runs of the same model label (seeds) are pooled: mean ± sample std, or the single
value with n = 1. Reads artifacts only; it never evaluates anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gdrt_core.results import markdown, plot, train_s_per_epoch


def _find_one(run_dir: Path, pattern: str) -> Path | None:
    """The newest file matching pattern under run_dir (a resumed run keeps older KFP roots)."""
    found = sorted(run_dir.rglob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def train_times(run_dir: Path) -> dict[str, float]:
    """{objective: train seconds per epoch} from the run's Model artifacts (manifest objective + train_metrics)."""
    times: dict[str, float] = {}
    for metrics_path in sorted(run_dir.rglob("train_metrics.json"), key=lambda p: p.stat().st_mtime):
        manifest_path = metrics_path.parent / "manifest.json"
        if not manifest_path.is_file():
            continue  # an unfinished training directory
        objective = json.loads(manifest_path.read_text(encoding="utf-8")).get("objective")
        seconds = train_s_per_epoch(metrics_path.parent)
        if objective and seconds:
            times[objective] = seconds
    return times


def collect(run_dirs: list[Path]) -> dict[str, list[dict]]:
    """{model label: [row per run]}; a row holds the report's metrics plus train_s_per_epoch."""
    pooled: dict[str, list[dict]] = {}
    for run_dir in run_dirs:
        comparison_path = _find_one(run_dir, "comparison.json")
        if comparison_path is None:
            print(f"{run_dir}: no report (comparison.json) yet, skipped", file=sys.stderr)
            continue
        comparison = json.loads(comparison_path.read_text(encoding="utf-8"))
        times = train_times(run_dir)
        for row in comparison["rows"]:
            label = row["model"]
            pooled.setdefault(label, []).append({**row, "train_s_per_epoch": times.get(label.lower())})
    return pooled


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="gdrt run output directories")
    parser.add_argument("--plot", type=Path, help="write the NDCG@10 / MGU@5 / auxiliary share plot (PNG)")
    args = parser.parse_args(argv)
    pooled = collect(args.runs)
    if not pooled:
        sys.exit("no finished report in the given run directories")
    print(markdown(pooled))
    if args.plot:
        plot(pooled, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
