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
import statistics
import sys
from pathlib import Path

COLUMNS = (("HR@5", "hr@5"), ("HR@10", "hr@10"), ("NDCG@5", "ndcg@5"), ("NDCG@10", "ndcg@10"),
           ("MGU@5", "mgu@5"), ("DGU@5", "dgu@5"), ("cov@10", "coverage@10"), ("aux share", "aux_share"),
           ("s/epoch", "train_s_per_epoch"))


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
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        epochs = metrics.get("epoch") or 1.0
        if objective and metrics.get("train_runtime"):
            times[objective] = metrics["train_runtime"] / epochs
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


def summarize(values: list) -> tuple[float | None, float | None, int]:
    """(mean, sample std or None when n < 2, n) over the values that exist."""
    present = [float(v) for v in values if isinstance(v, (int, float))]
    if not present:
        return None, None, 0
    std = statistics.stdev(present) if len(present) > 1 else None
    return statistics.fmean(present), std, len(present)


def markdown(pooled: dict[str, list[dict]]) -> str:
    """A Markdown table: one row per model, mean ± std (4 decimals; seconds as integers)."""
    head = "| model | n | " + " | ".join(h for h, _ in COLUMNS) + " |"
    lines = [head, "| --- | ---: | " + " | ".join("---:" for _ in COLUMNS) + " |"]
    for label, rows in pooled.items():
        cells = []
        for _, key in COLUMNS:
            mean, std, n = summarize([r.get(key) for r in rows])
            digits = 0 if key == "train_s_per_epoch" else 4
            if mean is None:
                cells.append("—")
            elif std is None:
                cells.append(f"{mean:.{digits}f}")
            else:
                cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append(f"| {label} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(pooled: dict[str, list[dict]], path: Path) -> None:
    """Three panels: NDCG@10 and MGU@5 per model (error bars = std when n > 1), auxiliary share per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(pooled)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    for ax, (title, key) in zip(axes, (("NDCG@10 (higher is better)", "ndcg@10"),
                                       ("MGU@5 (lower is better)", "mgu@5"),
                                       ("auxiliary share (attribution)", "aux_share")), strict=True):
        stats = [summarize([r.get(key) for r in pooled[label]]) for label in labels]
        means = [s[0] or 0.0 for s in stats]
        errors = [s[1] or 0.0 for s in stats]
        ax.bar(labels, means, yerr=errors, capsize=4, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][:len(labels)])
        for i, (mean, _, n) in enumerate(stats):
            ax.annotate(f"{mean:.4f}\n(n={n})", (i, mean), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
        ax.set_title(title, fontsize=9)
        ax.margins(y=0.25)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
