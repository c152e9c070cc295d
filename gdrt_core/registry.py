"""Registering a trained model in the MLflow registry, and the champion decision.

The model is logged as a python model (gdrt_core.pyfunc) with its weights (LoRA merged), tokenizer and
catalogue, registered as `gdrt-<domain>`, and alias `champion` moves to the new version only when its
valid NDCG@10 beats the current champion's (a version tag). The decision and both numbers are logged.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from gdrt_core.artifacts import read_manifest

CHAMPION = "champion"
SCORE_TAG = "valid_ndcg_at_10"


def model_name(domain: str) -> str:
    return f"gdrt-{domain}"


def _merged_model_dir(model_dir: str, tmp: str) -> str:
    """A plain HF model dir: adapters are merged into their base so the logged model stands alone."""
    from gdrt_core.models import is_adapter_dir, load_model, load_tokenizer

    if not is_adapter_dir(model_dir):
        return model_dir
    model = load_model(model_dir, merge_adapter=True, device="cpu")
    out = Path(tmp) / "merged"
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(model_dir).save_pretrained(out)
    return str(out)


def champion_decision(candidate: float, current: float | None) -> bool:
    """Promote when there is no champion yet or the candidate is strictly better on valid NDCG@10."""
    return current is None or candidate > current


def register_model(model_dir: str, dataset_dir: str, valid_eval_dir: str, *, domain: str,
                   parent_run_id: str = "") -> str:
    """Log + register the model; returns the decision text ("champion: version N ..." / "kept ...")."""
    import mlflow

    from gdrt_core.pyfunc import GdrtRecommenderModel
    from gdrt_core.tracking import check_reachable, tracking_uri
    from gdrt_core.tracking import client as tracking_client

    read_manifest(valid_eval_dir, "eval")
    metrics = json.loads((Path(valid_eval_dir) / "metrics.json").read_text(encoding="utf-8"))
    candidate = float(metrics["ndcg@10"])
    uri = tracking_uri()
    check_reachable(uri)
    client = tracking_client(uri, registry=True)
    mlflow.set_tracking_uri(uri)
    name = model_name(domain)
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "gdrt"
    if parent_run_id:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
    else:
        exp = client.get_experiment_by_name(experiment)
        experiment_id = exp.experiment_id if exp else client.create_experiment(experiment)
    tags = {"gdrt.stage": "register"}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(
        experiment_id=experiment_id, run_name="register", tags=tags
    ):
        import pandas as pd
        from mlflow.models import infer_signature

        signature = infer_signature(
            pd.DataFrame({"history": [["title a", "title b"]]}),
            pd.DataFrame({"recommendations": [["title c"]], "scores": [[-1.0]]}),
            params={"k": 10},
        )
        info = mlflow.pyfunc.log_model(
            name="model", python_model=GdrtRecommenderModel(), signature=signature,
            artifacts={"model": _merged_model_dir(model_dir, tmp), "items": str(Path(dataset_dir) / "items.parquet")},
            model_config={"domain": domain}, pip_requirements=["gdrt"], registered_model_name=name,
        )
        version = str(info.registered_model_version)
        client.set_model_version_tag(name, version, SCORE_TAG, str(candidate))
        try:
            current_mv = client.get_model_version_by_alias(name, CHAMPION)
            current = float(current_mv.tags.get(SCORE_TAG)) if current_mv.tags.get(SCORE_TAG) else None
            current_version = current_mv.version
        except Exception:  # noqa: BLE001 - no alias yet
            current, current_version = None, None
        promote = champion_decision(candidate, current)
        if promote:
            client.set_registered_model_alias(name, CHAMPION, version)
            decision = f"champion: {name} version {version} (valid NDCG@10 {candidate:.4f}"
            decision += f" > {current:.4f} of version {current_version})" if current is not None else ", first champion)"
        else:
            decision = (f"kept version {current_version} as champion (valid NDCG@10 {current:.4f} >= "
                        f"{candidate:.4f} of new version {version})")
        mlflow.log_metrics({"candidate_valid_ndcg_at_10": candidate,
                            **({"champion_valid_ndcg_at_10": current} if current is not None else {})})
        mlflow.log_params({"registered_model": name, "version": version, "promoted": promote})
        mlflow.set_tag("gdrt.decision", decision)
    if parent_run_id:  # the last step of the pipeline closes its parent run
        from gdrt_core.tracking import finish_run

        client.set_tag(parent_run_id, "gdrt.decision", decision)
        finish_run(parent_run_id)
    return decision

