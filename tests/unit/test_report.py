"""The report stage on hand-made Eval / Attribution artifacts."""

import json

from gdrt_core.artifacts import atomic_output_dir, read_manifest, write_json_atomic, write_manifest
from gdrt_core.report import ModelResult, markdown_table, relative_change, run


def _eval_dir(root, name, metrics):
    out = root / name
    with atomic_output_dir(out) as tmp:
        write_json_atomic(tmp / "metrics.json", metrics)
        write_manifest(tmp, "eval")
    return out


def _attr_dir(root, name, share):
    out = root / name
    with atomic_output_dir(out) as tmp:
        write_json_atomic(tmp / "summary.json", {"aux_share": share})
        write_manifest(tmp, "attribution")
    return out


def test_relative_change_and_table():
    """NDCG@10 0.02 -> 0.025 is +25%; a zero baseline has no relative change."""
    rows = [{"model": "sft", "ndcg@10": 0.02, "hr@10": 0.0}, {"model": "gdrt", "ndcg@10": 0.025, "hr@10": 0.1}]
    assert abs(relative_change(rows, "sft", "gdrt", "ndcg@10") - 0.25) < 1e-12
    assert relative_change(rows, "sft", "gdrt", "hr@10") is None
    table = markdown_table(rows, ["ndcg@10"])
    assert "| sft | 0.0200 |" in table and "| gdrt | 0.0250 |" in table


def test_report_artifact(tmp_path):
    sft = _eval_dir(tmp_path, "e1", {"ndcg@5": 0.01, "ndcg@10": 0.02, "hr@5": 0.02, "hr@10": 0.04, "mgu@5": 0.2})
    gdrt = _eval_dir(tmp_path, "e2", {"ndcg@5": 0.02, "ndcg@10": 0.03, "hr@5": 0.03, "hr@10": 0.05, "mgu@5": 0.1})
    a1, a2 = _attr_dir(tmp_path, "a1", 0.8), _attr_dir(tmp_path, "a2", 0.6)
    out = tmp_path / "report"
    comp = run([ModelResult("sft", str(sft), str(a1)), ModelResult("gdrt", str(gdrt), str(a2))], out)
    assert comp["baseline"] == "sft"
    assert abs(comp["relative_change"]["gdrt"]["ndcg@10"] - 0.5) < 1e-12
    assert abs(comp["relative_change"]["gdrt"]["mgu@5"] + 0.5) < 1e-12
    md = (out / "report.md").read_text()
    assert "| gdrt | 0.0200 | 0.0300 |" in md and "aux_share" in md
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    assert (out / "plots" / "comparison.png").stat().st_size > 1000
    read_manifest(out, "report")
    assert json.loads((out / "comparison.json").read_text())["rows"][1]["aux_share"] == 0.6

