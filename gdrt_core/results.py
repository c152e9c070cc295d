"""Pooling finished results over seeds: mean ± sample std per model label, as a Markdown table and a plot.

Used by `gdrt sweep` (results.md of a sweep) and benchmarks/results_table.py (`gdrt run` directories).
A row is a dict of metric values (the report's keys: hr@5, ndcg@10, mgu@5, ..., aux_share) plus
train_s_per_epoch; rows of the same label are pooled.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

COLUMNS = (("HR@5", "hr@5"), ("HR@10", "hr@10"), ("NDCG@5", "ndcg@5"), ("NDCG@10", "ndcg@10"),
           ("MGU@5", "mgu@5"), ("DGU@5", "dgu@5"), ("cov@10", "coverage@10"), ("aux share", "aux_share"),
           ("s/epoch", "train_s_per_epoch"))


def train_s_per_epoch(model_dir: str | Path) -> float | None:
    """`train_runtime / epoch` from a trained Model artifact's train_metrics.json (None when missing)."""
    path = Path(model_dir) / "train_metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text(encoding="utf-8"))
    runtime = metrics.get("train_runtime")
    return runtime / (metrics.get("epoch") or 1.0) if runtime else None


def summarize(values: list) -> tuple[float | None, float | None, int]:
    """(mean, sample std or None when n < 2, n) over the values that are numbers."""
    present = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not present:
        return None, None, 0
    std = statistics.stdev(present) if len(present) > 1 else None
    return statistics.fmean(present), std, len(present)


def _cell(values: list, key: str) -> str:
    mean, std, _ = summarize(values)
    digits = 0 if key == "train_s_per_epoch" else 4
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(pooled: dict[str, list[dict]], columns=COLUMNS) -> str:
    """One row per label: n and mean ± std per column (4 decimals; seconds as integers)."""
    lines = ["| model | n | " + " | ".join(h for h, _ in columns) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    for label, rows in pooled.items():
        cells = [_cell([r.get(key) for r in rows], key) for _, key in columns]
        lines.append(f"| {label} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PLOT_PANELS = (("NDCG@10 (higher is better)", "ndcg@10"), ("MGU@5 (lower is better)", "mgu@5"),
               ("auxiliary share (attribution)", "aux_share"))


def plot(pooled: dict[str, list[dict]], path: str | Path, panels=PLOT_PANELS) -> None:
    """One bar panel per metric, one bar per label (error bars = std when n > 1), written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(pooled)
    panels = [(title, key) for title, key in panels  # a metric nobody has (e.g. no attribution yet) is left out
              if any(summarize([r.get(key) for r in rows])[0] is not None for rows in pooled.values())] or panels[:1]
    width = max(3.5 * len(panels), 0.55 * len(labels) * len(panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 3.6), squeeze=False)
    axes = axes[0]
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
               "#ccb974", "#64b5cd"]
    for ax, (title, key) in zip(axes, panels, strict=True):
        stats = [summarize([r.get(key) for r in pooled[label]]) for label in labels]
        means = [s[0] or 0.0 for s in stats]
        errors = [s[1] or 0.0 for s in stats]
        ax.bar(range(len(labels)), means, yerr=errors, capsize=3,
               color=[palette[i % len(palette)] for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=35 if len(labels) > 3 else 0, ha="right"
                      if len(labels) > 3 else "center", fontsize=8)
        for i, (mean, _, n) in enumerate(stats):
            if mean is not None:
                ax.annotate(f"{mean:.3f}\nn={n}", (i, mean), ha="center", va="bottom", fontsize=7,
                            xytext=(0, 2), textcoords="offset points")
        ax.set_title(title, fontsize=9)
        ax.margins(y=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
