"""The report stage: one Markdown + HTML page comparing the evaluated models (SFT vs GDRT, ablations).

Inputs are Eval artifacts (metrics.json, predictions.parquet) and optionally Attribution artifacts (summary.json)
per model label, and the Dataset artifact they ranked. Output: a Report artifact with report.md, report.html,
comparison.json and plots/. With the Dataset, each model's rankings are paired with the baseline's on the same
examples (`evaluate.compare_predictions`): the differences come with bootstrap intervals, so a reader sees
whether a difference is larger than the examples' own spread.
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

from gdrt_core.artifacts import atomic_output_dir, read_manifest, write_json_atomic, write_manifest

TABLE_METRICS = ("ndcg@5", "ndcg@10", "hr@5", "hr@10", "mgu@5", "dgu@5", "coverage@10")
PAIRED_RESAMPLES = 2000  # bootstrap resamples of the paired comparisons (gdrt compare-predictions: 10,000)
LOWER_IS_BETTER = {"mgu@5", "dgu@5", "mgu@10", "dgu@10", "aux_share", "invalid_rate"}


@dataclass
class ModelResult:
    label: str
    eval_dir: str
    attribution_dir: str | None = None


def collect(results: list[ModelResult]) -> list[dict]:
    """One row per model: its metrics.json, plus the attribution auxiliary share when given."""
    rows = []
    for r in results:
        read_manifest(r.eval_dir, "eval")
        metrics = json.loads((Path(r.eval_dir) / "metrics.json").read_text())
        row = {"model": r.label, **metrics}
        if r.attribution_dir:
            read_manifest(r.attribution_dir, "attribution")
            summary = json.loads((Path(r.attribution_dir) / "summary.json").read_text())
            row["aux_share"] = summary.get("aux_share")
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("—" if v is None else str(v))

    head = "| model | " + " | ".join(columns) + " |"
    sep = "| --- |" + " ---: |" * len(columns)
    body = ["| " + row["model"] + " | " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join([head, sep, *body])


def relative_change(rows: list[dict], base: str, other: str, metric: str) -> float | None:
    """(other - base) / base for one metric, None when undefined."""
    values = {r["model"]: r.get(metric) for r in rows}
    b, o = values.get(base), values.get(other)
    if b is None or o is None or b == 0:
        return None
    return (o - b) / b


def _bar_plot(rows: list[dict], metrics: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(1.2 * len(metrics) + 3, 3.5))
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(metrics))
    for i, row in enumerate(rows):
        ax.bar(x + i * width, [row.get(m) or 0.0 for m in metrics], width, label=row["model"])
    ax.set_xticks(x + width * (len(rows) - 1) / 2, metrics)
    ax.set_ylabel("value")
    ax.legend()
    ax.set_title("Test metrics by model (fairness: lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def paired_comparisons(results: list[ModelResult], baseline: str, dataset: str | os.PathLike,
                       resamples: int = PAIRED_RESAMPLES) -> dict[str, dict]:
    """Each model's rankings against the baseline's on the same examples (`evaluate.compare_predictions`: A - B
    with paired bootstrap intervals over examples), on the split the baseline's Eval artifact ranked. A pair
    that cannot be compared (other examples, a missing predictions file) gets {"error": message} instead, so
    the report still shows the rest."""
    from gdrt_core.errors import GdrtError
    from gdrt_core.evaluate import compare_predictions

    base = next(r for r in results if r.label == baseline)
    split = read_manifest(base.eval_dir, "eval").get("config", {}).get("split", "test")
    paired = {}
    for r in results:
        if r.label == baseline:
            continue
        try:
            paired[r.label] = compare_predictions(dataset, r.eval_dir, base.eval_dir, split, resamples=resamples)
        except GdrtError as e:
            paired[r.label] = {"error": str(e)}
    return paired


def format_interval(ci: list[float] | None) -> str:
    """A paired comparison's 95% interval as the report writes it ("—" when there is none)."""
    return "—" if ci is None else f"{ci[0]:+.4f} to {ci[1]:+.4f}"


def paired_markdown(paired: dict[str, dict], baseline: str) -> list[str]:
    """The report's lines for `paired_comparisons`: one table per model (metric, both values, the difference,
    its 95% interval, relative change) and the hits each has alone."""
    lines = []
    for label, p in paired.items():
        if "error" in p:
            lines += [f"Paired comparison {label} vs {baseline}: not possible ({p['error']}).", ""]
            continue
        lines += [f"Paired comparison, {label} − {baseline} on the same {p['examples']} {p['split']} examples "
                  f"(95% bootstrap interval over the examples, {p['resamples']:,} resamples; an interval that "
                  "contains 0 is no measured difference):", "",
                  f"| metric | {baseline} | {label} | difference | 95% interval | relative |",
                  "| --- | ---: | ---: | ---: | --- | ---: |"]
        for m, d in p["difference"].items():
            rel = "—" if d["relative"] is None else f"{d['relative']:+.1%}"
            lines.append(f"| {m} | {p['b'][m]:.4f} | {p['a'][m]:.4f} | {d['value']:+.4f} | {format_interval(d['ci95'])} "
                         f"| {rel} |")
        h = p["hits@10"]
        lines += ["", f"Hits in the top 10: both {h['both']}, only {label} {h['only_a']}, only {baseline} "
                      f"{h['only_b']}.", ""]
    return lines


def paired_html(paired: dict[str, dict], baseline: str) -> str:
    """`paired_markdown` as HTML: a heading paragraph and a table per model."""
    out = []
    for label, p in paired.items():
        if "error" in p:
            out.append(f"<p>Paired comparison {html.escape(label)} vs {html.escape(baseline)}: not possible "
                       f"({html.escape(p['error'])}).</p>")
            continue
        out.append(f"<h2>Paired comparison, {html.escape(label)} − {html.escape(baseline)}</h2><p>The same "
                   f"{p['examples']} {html.escape(p['split'])} examples; 95% bootstrap interval over the examples "
                   f"({p['resamples']:,} resamples); an interval that contains 0 is no measured difference.</p>")
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ("metric", baseline, label, "difference", "95% interval",
                                                              "relative"))
        body = ""
        for m, d in p["difference"].items():
            rel = "—" if d["relative"] is None else f"{d['relative']:+.1%}"
            cells = (m, f"{p['b'][m]:.4f}", f"{p['a'][m]:.4f}", f"{d['value']:+.4f}", format_interval(d["ci95"]), rel)
            body += "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        h = p["hits@10"]
        out.append(f"<table><tr>{head}</tr>{body}</table><p>Hits in the top 10: both {h['both']}, only "
                   f"{html.escape(label)} {h['only_a']}, only {html.escape(baseline)} {h['only_b']}.</p>")
    return "".join(out)


def run(results: list[ModelResult], out: str | os.PathLike, *, title: str = "GDRT report",
        baseline: str | None = None, dataset: str | os.PathLike | None = None, tracker=None) -> dict:
    """Write the Report artifact into `out`; returns the comparison (rows and relative changes, and with
    `dataset`, the Dataset artifact the models were evaluated on, the paired comparisons with the baseline)."""
    rows = collect(results)
    columns = [c for c in (*TABLE_METRICS, "aux_share") if any(r.get(c) is not None for r in rows)]
    baseline = baseline or (rows[0]["model"] if rows else None)
    changes = {
        r["model"]: {m: relative_change(rows, baseline, r["model"], m) for m in columns}
        for r in rows if r["model"] != baseline
    }
    comparison = {"rows": rows, "baseline": baseline, "relative_change": changes, "columns": columns}
    paired = paired_comparisons(results, baseline, dataset) if dataset is not None and len(rows) > 1 else {}
    if paired:
        comparison["paired"] = paired
    inputs = {f"{r.label} evaluation": r.eval_dir for r in results}
    inputs.update({f"{r.label} attribution": r.attribution_dir for r in results if r.attribution_dir})
    if dataset is not None:
        inputs["dataset"] = dataset
    with atomic_output_dir(out, kind="report", inputs=inputs) as tmp:
        (tmp / "plots").mkdir()
        _bar_plot(rows, [c for c in columns if c != "coverage@10"], tmp / "plots" / "comparison.png")
        md = [f"# {title}", "", markdown_table(rows, columns), ""]
        for label, ch in changes.items():
            parts = [f"{m} {v:+.1%}" for m, v in ch.items() if v is not None]
            md.append(f"- {label} vs {baseline}: " + ", ".join(parts))
        lower_is_better = "Lower is better for " + ", ".join(sorted(LOWER_IS_BETTER & set(columns))) + "."
        md += ["", lower_is_better, ""]
        md += paired_markdown(paired, baseline)
        md += ["![comparison](plots/comparison.png)", ""]
        (tmp / "report.md").write_text("\n".join(md), encoding="utf-8")
        png = base64.b64encode((tmp / "plots" / "comparison.png").read_bytes()).decode()
        cells = "".join(f"<th>{html.escape(c)}</th>" for c in ["model", *columns])
        trs = "".join(
            "<tr>" + f"<td>{html.escape(r['model'])}</td>"
            + "".join(f"<td>{r[c]:.4f}</td>" if isinstance(r.get(c), float) else "<td>—</td>" for c in columns)
            + "</tr>"
            for r in rows
        )
        page = (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><table><tr>{cells}</tr>{trs}</table>"
            + "".join(f"<p>{html.escape(line.lstrip('- '))}</p>" for line in md if line.startswith("- "))
            + f"<p>{html.escape(lower_is_better)}</p>" + paired_html(paired, baseline)
            + f"<p><img alt='comparison' src='data:image/png;base64,{png}'></p></body></html>"
        )
        (tmp / "report.html").write_text(page, encoding="utf-8")
        write_json_atomic(tmp / "comparison.json", comparison)
        write_manifest(tmp, "report", config={"title": title, "baseline": baseline},
                       inputs={f"eval:{r.label}": r.eval_dir for r in results}
                       | ({"dataset": dataset} if dataset is not None else {}))
    if tracker is not None:
        tracker.log_artifacts(out, "report")
        for label, ch in changes.items():
            tracker.log_metrics({f"rel_{m}_{label}": v for m, v in ch.items() if v is not None})
        for label, p in paired.items():  # the paired differences and their intervals
            logged = {}
            for m, d in p.get("difference", {}).items():
                logged[f"paired_{m}_{label}"] = d["value"]
                if d["ci95"] is not None:
                    logged[f"paired_{m}_{label}_ci_low"], logged[f"paired_{m}_{label}_ci_high"] = d["ci95"]
            tracker.log_metrics(logged)
    return comparison
