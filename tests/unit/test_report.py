"""The report stage on hand-made Eval / Attribution artifacts."""

import json

from gdrt_core.artifacts import atomic_output_dir, read_manifest, write_json_atomic, write_manifest
from gdrt_core.report import ModelResult, markdown_table, relative_change, run


def _eval_dir(root, name, metrics, rankings=None):
    """An Eval artifact; with `rankings` ({example id: titles}), its predictions.parquet of the test split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = root / name
    with atomic_output_dir(out) as tmp:
        write_json_atomic(tmp / "metrics.json", metrics)
        if rankings is not None:
            rows = [(eid, rank, title) for eid, titles in rankings.items() for rank, title in enumerate(titles)]
            pq.write_table(pa.table({"example_id": [r[0] for r in rows], "rank": [r[1] for r in rows],
                                     "title": [r[2] for r in rows]}), tmp / "predictions.parquet")
        write_manifest(tmp, "eval", config={"split": "test"})
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


def test_report_pairs_the_models_rankings_on_the_dataset(tmp_path):
    """With the Dataset the models ranked: A hits both test examples (ranks 0 and 1), the baseline only the
    second (rank 0). The report has the paired table (HR@10 1.0 vs 0.5, difference +0.5, interval 0 to 1 over
    the two examples' resamples), the hits each has alone, and comparison.json's `paired`; a model whose
    predictions rank other examples gets a line saying why it is not paired, and the report is still written."""
    from gdrt_core.dataset import write_dataset

    ds = tmp_path / "ds"
    ds.mkdir()
    empty = {"example_id": [], "user_id": [], "history": [], "target": [], "timestamp": []}
    test = {"example_id": [10, 11], "user_id": ["u", "v"], "history": [[1, 2], [4]], "target": [3, 5],
            "timestamp": [1, 2]}
    write_dataset(ds, titles={1: "A", 2: "B", 3: "C", 4: "D", 5: "E"}, domain="office",
                  splits={"train": empty, "valid": empty, "test": test}, popularity={i: i for i in range(1, 6)})
    sft = _eval_dir(tmp_path, "e1", {"ndcg@10": 0.5, "hr@10": 0.5}, {10: ["B", "A"], 11: ["E", "D"]})
    gdrt = _eval_dir(tmp_path, "e2", {"ndcg@10": 0.8, "hr@10": 1.0}, {10: ["C", "A"], 11: ["A", "E"]})
    other = _eval_dir(tmp_path, "e3", {"ndcg@10": 0.0, "hr@10": 0.0}, {12: ["A"]})
    out = tmp_path / "report"
    comp = run([ModelResult("SFT", str(sft)), ModelResult("GDRT", str(gdrt)), ModelResult("X", str(other))], out,
               dataset=ds)
    paired = comp["paired"]["GDRT"]
    assert paired["examples"] == 2 and paired["hits@10"] == {"both": 1, "only_a": 1, "only_b": 0}
    assert paired["difference"]["hr@10"] == {"value": 0.5, "relative": 1.0, "ci95": [0.0, 1.0]}
    md = (out / "report.md").read_text()
    assert "Paired comparison, GDRT − SFT on the same 2 test examples" in md
    assert "| hr@10 | 0.5000 | 1.0000 | +0.5000 | +0.0000 to +1.0000 | +100.0% |" in md
    assert "Hits in the top 10: both 1, only GDRT 1, only SFT 0." in md
    assert "Paired comparison X vs SFT: not possible" in md and "not in the test split" in md
    page = (out / "report.html").read_text()
    assert "<h2>Paired comparison, GDRT − SFT</h2>" in page and "<td>+0.0000 to +1.0000</td>" in page
    assert "2,000 resamples" in md and "Lower is better" in page
    assert read_manifest(out, "report")["inputs"]["dataset"]["path"] == str(ds.absolute())
    assert json.loads((out / "comparison.json").read_text())["paired"]["GDRT"]["hits@10"]["only_a"] == 1

