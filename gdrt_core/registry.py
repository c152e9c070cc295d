"""Registering a trained model in the MLflow registry, loading it back safely, and the champion decision.

The model is logged from code (MLflow "models from code": `python_model` is the file gdrt_core/pyfunc.py,
no pickle) with its weights (LoRA merged, safetensors), tokenizer and catalogue, the gdrt_core package in
its `code/` and pinned requirements, so that it serves anywhere: `mlflow models serve|predict|build-docker`
with any environment manager. It is registered as `gdrt-<domain>`, and alias `champion` moves to the new
version only when its valid NDCG@10 beats the current champion's (a version tag). The decision and both
numbers are logged.

Loading runs the model's code, so `load_verified_model` (what `gdrt recommend` uses) first checks every file
of the downloaded model against the sha256 recorded at registration (tag `gdrt.model_sha256` on the version
and the run) and refuses a pickled python model, any pickle file, or a changed or added file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from gdrt_core.artifacts import follow_umask, read_manifest, sha256_file
from gdrt_core.config import parse_yaml
from gdrt_core.errors import GdrtError

CHAMPION = "champion"
SCORE_TAG = "valid_ndcg_at_10"
DIGEST_TAG = "gdrt.model_sha256"
REGISTRY_META = "registered_model_meta"
MODEL_CODE = Path(__file__).with_name("pyfunc.py")
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".cloudpickle")
# what the python model imports (gdrt_core.recommend and what it loads), pinned to the versions installed here
SERVING_PACKAGES = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pyarrow", "pandas", "numpy")


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
    follow_umask(out)  # the weights are written 0600; MLflow copies the modes into the artifact store
    return str(out)


def serving_requirements() -> list[str]:
    """`package==version` for what the python model imports, as installed here (local tags like +cpu dropped)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+', 1)[0]}" for name in SERVING_PACKAGES]


def _code_copy(tmp: str) -> str:
    """The gdrt_core package as source only (no __pycache__), for the model's code/."""
    dest = Path(tmp) / "code" / "gdrt_core"
    shutil.copytree(MODEL_CODE.parent, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(dest)


def _line(name: str, path: Path) -> str:
    """One file of the model in its digest: its path inside the model and its sha256."""
    return f"{name}\0{sha256_file(path)}\n"


def _file_lines(root: Path, files) -> list[str]:
    return [_line(f.relative_to(root).as_posix(), f) for f in files]


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def model_digest(model_dir: str | os.PathLike) -> str:
    """sha256 over the relative path and sha256 of every file of a logged model: code, MLmodel,
    requirements and artifacts (weights, tokenizer, catalogue). Not covered: `registered_model_meta` (MLflow
    rewrites it when registering) and byte-code caches (removed before loading)."""
    root = Path(model_dir)
    files = [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.name != REGISTRY_META]
    return _digest(_file_lines(root, files))


def _recorded_digest(client, uri: str, model_dir: str) -> str:
    """The model sha256 recorded at registration for a models:/ or runs:/ URI."""
    tags: dict = {}
    if uri.startswith("runs:/"):
        tags = client.get_run(uri[len("runs:/"):].split("/", 1)[0]).data.tags
    elif uri.startswith("models:/"):
        ref = uri[len("models:/"):].strip("/")
        if "@" in ref:
            name, alias = ref.split("@", 1)
            tags = client.get_model_version_by_alias(name, alias).tags
        elif "/" in ref:
            name, version = ref.split("/", 1)
            tags = client.get_model_version(name, version).tags
        else:  # a logged model id (models:/m-...): the run it was logged in has the tag
            from mlflow.models import Model

            run_id = Model.load(str(Path(model_dir) / "MLmodel")).run_id
            tags = client.get_run(run_id).data.tags if run_id else {}
    expected = tags.get(DIGEST_TAG)
    if not expected:
        raise GdrtError(
            f"{uri} has no {DIGEST_TAG} tag: it was not registered by gdrt's register step (or by an older version "
            "that stored a pickle), so its files cannot be checked", hint="register the model again with gdrt",
        )
    return expected


def check_model_files(model_dir: str | os.PathLike, expected_digest: str, uri: str) -> None:
    """Refuse a downloaded model whose loading would run anything but the registered code."""
    import yaml

    root = Path(model_dir)
    try:
        flavors = parse_yaml((root / "MLmodel").read_text(encoding="utf-8")).get("flavors", {})
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise GdrtError(f"{uri}: cannot read its MLmodel file ({e})", path=str(root)) from None
    pyfunc = flavors.get("python_function") or {}
    if pyfunc.get("loader_module") != CODE_LOADER or "python_model" in pyfunc:
        raise GdrtError(
            f"{uri} is not a python model logged from code (loader {pyfunc.get('loader_module')!r}"
            + (f", pickled python model {pyfunc['python_model']!r}" if "python_model" in pyfunc else "")
            + "): loading it could unpickle arbitrary code, so it is refused",
            path=str(root / "MLmodel"), hint="register the model again with gdrt's register step",
        )
    pickles = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise GdrtError(f"{uri} contains pickle files ({', '.join(pickles)}); refused", path=str(root),
                        hint="a gdrt model holds safetensors weights, JSON and code only; register it again")
    found = model_digest(root)
    if found != expected_digest:
        raise GdrtError(
            f"{uri}: its files (code, MLmodel, requirements or weights) differ from those registered (sha256 "
            f"{found[:12]} vs {expected_digest[:12]} recorded in tag {DIGEST_TAG}): modified after registration, "
            "refused", path=str(root),
            hint="register the model again, and check who can write to the artifact store",
        )
    for cache in [p for p in root.rglob("__pycache__") if p.is_dir()]:  # byte code is not in the digest
        shutil.rmtree(cache)


def load_verified_model(uri: str):
    """(the MLflow pyfunc model at a models:/ or runs:/ URI, its local directory) after `check_model_files`.

    The model is downloaded into a fresh temporary directory (removed by the caller when done), checked, and
    loaded from there, so what is checked is what runs.
    """
    import mlflow

    from gdrt_core.tracking import client as tracking_client
    from gdrt_core.tracking import model_store_uri

    store = model_store_uri(uri)  # a store that exists (none is created to read from), a server that answers
    client = tracking_client(store, registry=True)
    mlflow.set_tracking_uri(store)
    local = tempfile.mkdtemp(prefix="gdrt-model-")
    try:
        model_dir = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=local)
        check_model_files(model_dir, _recorded_digest(client, uri, model_dir), uri)
        return mlflow.pyfunc.load_model(model_dir), local
    except BaseException:
        shutil.rmtree(local, ignore_errors=True)
        raise


def _logged_digest(uri: str, dest: Path, artifacts: dict[str, str]) -> str:
    """`model_digest` of a logged model without downloading its artifacts: everything else is downloaded
    (small), and the artifacts are hashed from their local sources under the paths MLmodel gives them."""
    import mlflow

    dest.mkdir(parents=True)
    for entry in mlflow.artifacts.list_artifacts(artifact_uri=uri):
        if entry.path not in ("artifacts", REGISTRY_META):
            mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{entry.path}", dst_path=str(dest))
    lines = _file_lines(dest, [p for p in dest.rglob("*") if p.is_file()])
    logged = parse_yaml((dest / "MLmodel").read_text(encoding="utf-8"))["flavors"]["python_function"]["artifacts"]
    for key, source in artifacts.items():
        rel, src = logged[key]["path"], Path(source)
        if src.is_file():
            lines.append(_line(rel, src))
        else:
            lines += [_line(f"{rel}/{f.relative_to(src).as_posix()}", f) for f in src.rglob("*") if f.is_file()]
    return _digest(lines)


def alias_not_found(error: BaseException) -> bool:
    """Whether an MLflow error means "the alias is not set" (and nothing else).

    MLflow 3's stores (sqlalchemy, file) raise MlflowException(INVALID_PARAMETER_VALUE, "Registered model alias
    <alias> not found."); a tracking server forwards it as a RestException with the same code and message.
    RESOURCE_DOES_NOT_EXIST is a registry that answers 404 for a missing alias (or model). Any other error
    (the server unreachable or failing, permissions, a 404 from a proxy, which MLflow reads as
    ENDPOINT_NOT_FOUND) says nothing about the alias.
    """
    from mlflow.exceptions import MlflowException

    if not isinstance(error, MlflowException):
        return False
    if error.error_code == "RESOURCE_DOES_NOT_EXIST":
        return True
    text = str(error.message).lower()
    return error.error_code == "INVALID_PARAMETER_VALUE" and "alias" in text and "not found" in text


def current_champion(client, name: str):
    """The model version that holds alias `champion` of registered model `name`, or None when none does.

    Only MLflow's "alias not found" means no champion; any other error is a GdrtError with the cause (a
    network blip must not promote an unvetted model).
    """
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except Exception as e:  # noqa: BLE001 - sorted below: only "alias not found" is an answer
        if alias_not_found(e):
            return None
        raise GdrtError(
            f"could not read alias {CHAMPION!r} of registered model {name!r}: {type(e).__name__}: {e}",
            hint="the champion decision needs the current champion's score; check the tracking server "
            "(MLFLOW_TRACKING_URI) and run the register step again",
        ) from e


def champion_decision(candidate: float, current: float | None) -> bool:
    """Promote when there is no champion yet or the candidate is strictly better on valid NDCG@10."""
    return current is None or candidate > current


def register_model(model_dir: str, dataset_dir: str, valid_eval_dir: str, *, domain: str,
                   parent_run_id: str = "") -> str:
    """Log + register the model; returns the decision text ("champion: version N ..." / "kept ...")."""
    import mlflow

    from gdrt_core.tracking import client as tracking_client
    from gdrt_core.tracking import reachable_uri

    read_manifest(valid_eval_dir, "eval")
    metrics = json.loads((Path(valid_eval_dir) / "metrics.json").read_text(encoding="utf-8"))
    candidate = float(metrics["ndcg@10"])
    uri = reachable_uri()
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
        artifacts = {"model": _merged_model_dir(model_dir, tmp), "items": str(Path(dataset_dir) / "items.parquet")}
        with warnings.catch_warnings():
            # the signature above is what an input example would give MLflow: its advice to add one is noise here
            warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(MODEL_CODE), code_paths=[_code_copy(tmp)], signature=signature,
                artifacts=artifacts, model_config={"domain": domain}, pip_requirements=serving_requirements(),
                registered_model_name=name,
            )
        version = str(info.registered_model_version)
        digest = _logged_digest(f"models:/{name}/{version}", Path(tmp) / "logged", artifacts)
        client.set_model_version_tag(name, version, DIGEST_TAG, digest)
        mlflow.set_tag(DIGEST_TAG, digest)
        client.set_model_version_tag(name, version, SCORE_TAG, str(candidate))
        current_mv = current_champion(client, name)
        current_version = current_mv.version if current_mv is not None else None
        current = float(current_mv.tags[SCORE_TAG]) if current_mv is not None and current_mv.tags.get(SCORE_TAG) else None
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

