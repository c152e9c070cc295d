"""`gdrt group` and `gdrt attribute` end to end on CPU: the embedded tiny model, a slice of Office, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from gdrt_core.cli import main
from gdrt_core.dataset import Dataset
from gdrt_core.prompts import render
from gdrt_core.tokenization import TARGET, tokenize_example

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, office_slice):
    out = tmp_path_factory.mktemp("tiny") / "model"
    assert main(["init-model", "--dataset", str(office_slice), "--out", str(out), "--size", "tiny"]) == 0
    return out


@pytest.fixture(scope="module")
def groups_dir(tmp_path_factory, office_slice, tiny_model):
    import os

    out = tmp_path_factory.mktemp("groups") / "groups"
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "GDRT_TRACKING")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    os.environ["GDRT_TRACKING"] = "on"
    try:
        rc = main(
            [
                "group",
                "--dataset",
                str(office_slice),
                "--reference",
                str(tiny_model),
                "--out",
                str(out),
                "--num-groups",
                "3",
                "--set",
                "limit=30",
                "--set",
                "part_size=16",
                "--set",
                "progress=false",
            ]
        )
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert rc == 0
    return out, db


def test_group_cli_writes_the_groups_artifact(groups_dir, office_slice, tiny_model):
    from gdrt_core.artifacts import read_manifest
    from gdrt_core.models import load_tokenizer

    out, _ = groups_dir
    manifest = read_manifest(out, "groups")
    assert manifest["config"]["num_groups"] == 3 and "reference" in manifest["inputs"]
    info = json.loads((out / "groups.json").read_text())
    table = pq.read_table(out / "token_groups.parquet")
    assert set(table.column_names) == {"example_id", "position", "token_id", "relevance", "group", "split"}
    assert len(info["edges"]) == 2 and sorted(info["sizes"]) == ["train", "valid"]
    assert not (out.parent / "groups.parts").exists()
    assert (out / "plots" / "relevance_histogram.png").stat().st_size > 0
    # ids align with the embedded tokenizer's full examples (BOS-prefixed, drop mode)
    tok = load_tokenizer(tiny_model)
    ds = Dataset(office_slice)
    rows = [r for r in table.to_pylist() if r["split"] == "valid"]
    for e in ds.examples("valid", 30):
        ex = tokenize_example(tok, render(ds.domain, list(e.history_titles), e.target_title))
        targets = [t for t, role in zip(ex.input_ids, ex.role, strict=True) if role == TARGET]
        got = sorted((r["position"], r["token_id"]) for r in rows if r["example_id"] == e.example_id)
        assert [t for _, t in got] == targets
    rel = table.column("relevance").to_numpy()
    assert np.isfinite(rel).all() and (rel <= 0).all()


def test_group_logs_to_mlflow(groups_dir):
    from mlflow.tracking import MlflowClient

    _, db = groups_dir
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (exp,) = [e for e in client.search_experiments() if e.name == "gdrt"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["num_groups"] == "3"
    assert "edge_0" in run.data.metrics and run.info.status == "FINISHED"


def test_attribute_cli_with_groups_histogram(tmp_path, groups_dir, office_slice, tiny_model, monkeypatch):
    monkeypatch.setenv("GDRT_TRACKING", "off")
    out = tmp_path / "attr"
    rc = main(
        [
            "attribute",
            "--dataset",
            str(office_slice),
            "--model",
            str(tiny_model),
            "--out",
            str(out),
            "--limit",
            "4",
            "--groups",
            str(groups_dir[0]),
            "--set",
            "num_negatives=3",
            "--set",
            "progress=false",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_examples"] == 4 and 0 <= summary["aux_share"] <= 1
    assert set(summary["counterfactual"]["drop"]) == {"history_removed", "history_shuffled"}
    assert {p.name for p in (out / "plots").iterdir()} == {
        "share_by_segment.png",
        "profile_by_position.png",
        "relevance_histogram.png",
    }
    table = pq.read_table(out / "attributions.parquet")
    assert table.num_rows > 0 and set(table.column("example_id").to_pylist()) <= {
        e.example_id for e in Dataset(office_slice).examples("test", 4)
    }


def test_attribute_grad_x_input_and_attention_baseline(tmp_path, office_slice, tiny_model, monkeypatch):
    monkeypatch.setenv("GDRT_TRACKING", "off")
    for name, extra in (("gxi", ["--set", "method=grad_x_input"]), ("att", ["--set", "baseline=attention"])):
        rc = main(
            [
                "attribute",
                "--dataset",
                str(office_slice),
                "--model",
                str(tiny_model),
                "--out",
                str(tmp_path / name),
                "--limit",
                "3",
                "--set",
                "counterfactual=false",
                "--set",
                "progress=false",
                *extra,
            ]
        )
        assert rc == 0
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["method"] == ("grad_x_input" if name == "gxi" else "ablation")
        assert "counterfactual" not in summary


def test_bad_inputs_exit_2_without_output(tmp_path, office_slice, tiny_model, monkeypatch, capsys):
    monkeypatch.setenv("GDRT_TRACKING", "off")
    out = tmp_path / "g"
    rc = main(
        ["group", "--dataset", str(tmp_path / "missing"), "--reference", str(tiny_model), "--out", str(out)]
    )
    assert rc == 2 and not out.exists()
    assert "missing" in capsys.readouterr().err
    rc = main(
        [
            "attribute",
            "--dataset",
            str(office_slice),
            "--model",
            str(tiny_model),
            "--out",
            str(out),
            "--set",
            "baseline=zeros",
        ]
    )
    assert rc == 2 and not out.exists()


def test_attribute_reads_the_groups_before_its_work(tmp_path, groups_dir, office_slice, tiny_model, monkeypatch,
                                                    capsys):
    """A Groups artifact with group ids outside 0..G-1 failed only when the histogram was drawn, after the
    whole attribution; it is now read in full before any example is attributed."""
    import shutil

    import pyarrow as pa

    from gdrt_core.artifacts import write_manifest

    monkeypatch.setenv("GDRT_TRACKING", "off")
    monkeypatch.setattr("gdrt_core.attribution._attribute_split", lambda *a: pytest.fail("attributed"))
    bad = tmp_path / "bad-groups"
    shutil.copytree(groups_dir[0], bad)
    table = pq.read_table(bad / "token_groups.parquet")
    table = table.set_column(table.schema.get_field_index("group"), "group", pa.array([9] * table.num_rows, pa.int8()))
    pq.write_table(table, bad / "token_groups.parquet")
    write_manifest(bad, "groups", config={})
    out = tmp_path / "a"
    assert main(["attribute", "--dataset", str(office_slice), "--model", str(tiny_model), "--groups", str(bad),
                 "--out", str(out), "--limit", "2"]) == 2
    assert "group ids run from 9 to 9, outside 0..2" in capsys.readouterr().err and not out.exists()
