"""The whole pipeline through `gdrt run` (pipelines/local_run.py) on a small Office slice with the tiny
model, logging to a real MLflow server on 127.0.0.1; then `gdrt recommend` and pyfunc from the registered
champion."""

from __future__ import annotations

import json
import re

import pytest

from gdrt_core.errors import GdrtError

pytestmark = pytest.mark.integration

FAST = {
    "source_format": "sliding", "domain": "office", "base_model": "", "tau": 1.0, "num_groups": 2,
    "prior": "uniform", "num_gpus": 1, "deepspeed": "", "eval_split": "test",
    "model_settings": {"size": "tiny", "seed": 0},
    "train_settings": {"epochs": 1, "batch_size": 16, "lr": 0.003, "lora": False, "valid_size": 8,
                       "eval_every": 0, "save_every": 0, "eval_at_start": False, "ndcg_every_epoch": False},
    "group_settings": {"batch_size": 32},
    "eval_settings": {"limit": 8, "plots": False},
    "valid_eval_settings": {"limit": 8, "plots": False},
    "attribute_settings": {"limit": 4},
}


def _runs(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=100)


def test_pipeline_end_to_end_with_mlflow_server(tmp_path, office_source_slice, mlflow_server, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from gdrt_core.cli import main
    from pipelines import local_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    params = {**FAST, "source": str(office_source_slice), "experiment": "e2e", "run_name": "e2e-office"}
    result = local_run.run(params, tmp_path / "run")

    assert [r["model"] for r in result["rows"]] == ["SFT", "GDRT", "popular"]
    for row in result["rows"][:2]:
        assert 0.0 <= row["ndcg@10"] <= 1.0 and row["invalid_rate"] == 0.0
        assert 0.0 <= row["aux_share"] <= 1.0
    # the popularity baseline ranks the same test windows as the models (same split, same limit), untracked
    popular = result["rows"][2]
    models_n = {r["n_examples"] for r in result["rows"][:2]}
    assert models_n == {popular["n_examples"]} and "aux_share" not in popular
    baseline_dir = tmp_path / "run" / "baselines" / "most-popular-valid"
    assert json.loads((baseline_dir / "metrics.json").read_text())["ndcg@10"] == popular["ndcg@10"]
    assert local_run.format_table(result).splitlines()[-1].startswith("popular")
    # GDRT paired with SFT on the same windows (the report's bootstrap intervals)
    assert result["paired"]["GDRT"]["examples"] == popular["n_examples"]
    paired = local_run.format_paired(result).splitlines()
    assert paired[0].startswith(f"GDRT − SFT on the same {popular['n_examples']} windows (95% bootstrap intervals")
    assert paired[1].startswith("  NDCG@10 ") and "windows hit in the top 10 by both" in paired[1]
    assert "report.md" in {p.name for p in (tmp_path / "run").rglob("report.md")}

    client = MlflowClient(mlflow_server)
    runs = _runs(client, "e2e")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    nested = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    for name in ("train sft", "train gdrt", "group", "evaluate sft", "evaluate gdrt", "evaluate gdrt (valid)",
                 "attribute sft", "attribute gdrt", "register"):
        assert name in nested, sorted(nested)
        assert nested[name].info.status == "FINISHED"
    assert "ndcg_at_10" in nested["evaluate gdrt"].data.metrics
    assert "gdrt.decision" in parent.data.tags
    assert any(k.startswith("paired_") and k.endswith("_GDRT_ci_high") for k in parent.data.metrics), parent.data.metrics
    report_files = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.md" in report_files and "report/report.html" in report_files

    version = client.get_model_version_by_alias("gdrt-office", "champion")
    assert float(version.tags["valid_ndcg_at_10"]) >= 0.0

    titles = set(json.loads((office_source_slice / "id2name4Rec.json").read_text()).values())
    capsys.readouterr()
    history = sorted(titles)[:2]
    assert main(["recommend", "--model", "models:/gdrt-office@champion", "--history", *history, "--k", "5"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 5
    for ln in lines:  # "  1.  -55.1309  <title>"
        m = re.match(r"^\s*\d+\.\s+-?\d+\.\d+  (.*)$", ln)
        assert m and m.group(1) in titles, ln

    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model("models:/gdrt-office@champion")
    out = model.predict(pd.DataFrame({"history": [history]}), params={"k": 3})
    assert len(out["recommendations"][0]) == 3 and set(out["recommendations"][0]) <= titles


def test_failing_stage_fails_the_pipeline_and_registers_nothing(tmp_path, office_source_slice, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipelines import local_run

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    bad = office_source_slice / "train.csv"
    bad.write_text(bad.read_text() + '7,"[1, 2, 999999]",1400000000\n')
    params = {**FAST, "source": str(office_source_slice), "experiment": "broken", "run_name": "broken"}
    with pytest.raises(GdrtError) as err:
        local_run.run(params, tmp_path / "run")
    assert "999999" in str(err.value) and "train.csv" in str(err.value)
    client = MlflowClient(store)
    assert client.search_registered_models() == []
    (parent,) = _runs(client, "broken")
    assert parent.info.status == "FAILED"
