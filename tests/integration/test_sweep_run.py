"""`gdrt sweep` end to end on an Office slice with the tiny model: shared stages run once, results are
pooled, MLflow gets the sweep's parent run, the stages and one run per variant; a re-run resumes."""

from __future__ import annotations

import io
import json

import pytest
import yaml

pytestmark = pytest.mark.integration


def test_sweep_runs_variants_once_per_distinct_stage_and_resumes(tmp_path, office_source_slice, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipelines import sweep
    from tests.integration.test_pipeline_local import FAST

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("GDRT_TRACKING", raising=False)
    config = {**FAST, "source": str(office_source_slice), "run_name": "sw"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    spec = {"config": "cfg.yaml", "experiment": "sweep-e2e",
            "variants": {"a": {"pool": "p"}, "t": {"set": {"tau": 100}}}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    out = tmp_path / "out"

    stream = io.StringIO()
    res = sweep.run(str(tmp_path / "sweep.yaml"), out, jobs=2, stream=stream)
    assert "16 to run" in stream.getvalue()  # 22 stages of two pipelines, 6 shared
    trained = sorted(p.name for p in (out / "stages").iterdir() if p.name.startswith("train-") and p.is_dir())
    assert len(trained) == 3 and sum(name.startswith("train-sft") for name in trained) == 1
    for name in ("a", "t"):
        for label in ("sft", "gdrt"):
            row = res[name][label]
            assert 0.0 <= row["ndcg@10"] <= 1.0 and 0.0 <= row["aux_share"] <= 1.0
            assert row["train_s_per_epoch"] > 0
        assert res[name]["gdrt_valid"]["ndcg@10"] >= 0.0
    assert res["a"]["sft"] == res["t"]["sft"]  # the same SFT model
    assert res["t"]["overrides"] == {"tau": 100}
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    md = (out / "results.md").read_text()
    assert "| p SFT | 1 |" in md and "| t GDRT | 1 |" in md and "| t | tau=100 | sft | GDRT |" in md
    assert list((out / "stages").glob("report-a-*/report.md")) and (out / "results.png").is_file()

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-e2e")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {"a", "t", "train sft a", "train gdrt t", "group a"} <= set(children)
    assert children["t"].data.params["tau"] == "100"
    assert children["t"].data.metrics["gdrt_ndcg_at_10"] == pytest.approx(res["t"]["gdrt"]["ndcg@10"])

    stream = io.StringIO()
    again = sweep.run(str(tmp_path / "sweep.yaml"), out, jobs=2, stream=stream)
    assert "16 already done, 0 to run" in stream.getvalue()
    assert again == res
