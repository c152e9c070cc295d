"""The registered model: logged from code (no pickle), shipped with gdrt_core and pinned requirements, its
files following the umask, and refused by `gdrt recommend` when any of its files was changed afterwards."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import yaml

from gdrt_core.errors import GdrtError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_model_dir, office_slice):
    """The tiny model registered as gdrt-office in a fresh sqlite store (umask 022): (store dir, uri, model dir)."""
    from gdrt_core.artifacts import atomic_output_dir, write_manifest
    from gdrt_core.registry import register_model

    root = tmp_path_factory.mktemp("registry")
    eval_dir = root / "valid_eval"
    with atomic_output_dir(eval_dir) as tmp:
        (tmp / "metrics.json").write_text(json.dumps({"ndcg@10": 0.25}))
        write_manifest(tmp, "eval")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri}
    old_env = {k: os.environ.get(k) for k in env}
    old_cwd, old_umask = Path.cwd(), os.umask(0o022)
    os.environ.update(env)
    os.chdir(root)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            decision = register_model(str(tiny_model_dir), str(office_slice), str(eval_dir), domain="office")
        import mlflow

        mlflow.set_tracking_uri(uri)
        model_dir = Path(mlflow.artifacts.download_artifacts("models:/gdrt-office/1"))  # the store's own files
    finally:
        os.chdir(old_cwd)
        os.umask(old_umask)
        for k, v in old_env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert decision.startswith("champion: gdrt-office version 1")
    # MLflow's advice on type hints and input examples was printed into every register step's log
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "mlflow" in w.filename] == []
    return root, uri, model_dir


@pytest.fixture()
def store(registered, monkeypatch):
    root, uri, model_dir = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(root)
    return registered


def test_the_model_is_code_not_pickle(store):
    _, _, model_dir = store
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    assert not [p for p in model_dir.rglob("*") if p.suffix in (".pkl", ".pickle")]
    assert (model_dir / "pyfunc.py").is_file() and (model_dir / "code" / "gdrt_core" / "recommend.py").is_file()
    assert not list((model_dir / "code").rglob("__pycache__"))


def test_requirements_are_pinned_and_resolvable(store):
    _, _, model_dir = store
    reqs = [r for r in (model_dir / "requirements.txt").read_text().splitlines() if r.strip()]
    names = {r.split("==")[0] for r in reqs}
    assert {"mlflow", "torch", "transformers", "tokenizers", "safetensors", "pyarrow", "pandas"} <= names
    assert "gdrt" not in names  # the index's `gdrt` is not this project; the code ships in code/
    assert all("==" in r and "+" not in r for r in reqs), reqs


def test_logged_files_follow_the_umask(store):
    _, _, model_dir = store
    for path in [model_dir, *model_dir.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_recommend_from_the_registry(store, capsys):
    from mlflow.tracking import MlflowClient

    from gdrt_core.cli import main
    from gdrt_core.recommend import load_recommender

    run_id = MlflowClient(store[1]).get_model_version("gdrt-office", "1").run_id
    for uri in ("models:/gdrt-office@champion", f"runs:/{run_id}/model"):
        assert len(load_recommender(uri).recommend([["Desk Lamp"]], k=2)[0].titles) == 2
    assert main(["recommend", "--model", "models:/gdrt-office/1", "--history", "Desk Lamp", "--k", "3"]) == 0
    assert len([ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]) == 3


class _Payload:
    """A pickle that creates a file when loaded: what an attacker would put in the artifact store."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_model(model_dir: Path, pwned: Path):
    (model_dir / "python_model.pkl").write_bytes(pickle.dumps(_Payload(pwned)))
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    flavor.pop("model_code_path", None)
    flavor.update(loader_module="mlflow.pyfunc.model", python_model="python_model.pkl")
    (model_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def _append(path: Path, text: str):
    with open(path, "a") as f:
        f.write(text)


TAMPER = {
    "pickled python model": (_pickle_model, "not a python model logged from code"),
    "pickle file added": (lambda d, p: (d / "python_model.pkl").write_bytes(pickle.dumps(_Payload(p))), "pickle files"),
    "model code changed": (lambda d, p: _append(d / "pyfunc.py", f"\nopen({str(p)!r}, 'w')\n"), "differ from those registered"),
    "package code changed": (
        lambda d, p: _append(d / "code" / "gdrt_core" / "recommend.py", f"\nopen({str(p)!r}, 'w')\n"),
        "differ from those registered",
    ),
    "requirements changed": (lambda d, p: _append(d / "requirements.txt", "evil-package\n"), "differ from those registered"),
    "weights changed": (
        lambda d, p: [_append(f, "x") for f in d.rglob("model.safetensors")], "differ from those registered",
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_a_tampered_model_is_refused_before_any_of_it_runs(store, tmp_path, case):
    from gdrt_core.recommend import load_recommender

    _, _, model_dir = store
    backup = tmp_path / "backup"
    shutil.copytree(model_dir, backup)
    pwned = tmp_path / "pwned"
    tamper, message = TAMPER[case]
    try:
        tamper(model_dir, pwned)
        with pytest.raises(GdrtError, match=message):
            load_recommender("models:/gdrt-office@champion")
        assert not pwned.exists()
    finally:
        shutil.rmtree(model_dir)
        shutil.copytree(backup, model_dir)
    load_recommender("models:/gdrt-office@champion")  # restored: loads again


def test_a_model_without_the_recorded_digest_is_refused(store):
    from mlflow.tracking import MlflowClient

    from gdrt_core.recommend import load_recommender
    from gdrt_core.registry import DIGEST_TAG

    _, uri, _ = store
    client = MlflowClient(uri)
    digest = client.get_model_version("gdrt-office", "1").tags[DIGEST_TAG]
    client.delete_model_version_tag("gdrt-office", "1", DIGEST_TAG)
    try:
        with pytest.raises(GdrtError, match="has no gdrt.model_sha256 tag"):
            load_recommender("models:/gdrt-office/1")
    finally:
        client.set_model_version_tag("gdrt-office", "1", DIGEST_TAG, digest)


def test_no_champion_only_when_the_alias_is_missing(tmp_path):
    """A real sqlite registry: a registered model without alias `champion` has no champion (None); once the
    alias is set, its version is the champion."""
    from mlflow.tracking import MlflowClient

    from gdrt_core.registry import CHAMPION, current_champion

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("gdrt-x")
    client.create_model_version("gdrt-x", source=str(tmp_path / "model"))
    assert current_champion(client, "gdrt-x") is None
    client.set_registered_model_alias("gdrt-x", CHAMPION, "1")
    assert str(current_champion(client, "gdrt-x").version) == "1"


class _FailingRegistry:
    def __init__(self, error: BaseException):
        self.error = error

    def get_model_version_by_alias(self, name, alias):
        raise self.error


def _server_error(code: str, message: str):
    from mlflow.exceptions import RestException

    return RestException({"error_code": code, "message": message})


def test_only_alias_not_found_means_no_champion():
    """The tracking server's form of "alias not found" (RestException, INVALID_PARAMETER_VALUE) and a 404 of the
    alias (RESOURCE_DOES_NOT_EXIST) mean no champion; an unreachable or failing server, another
    INVALID_PARAMETER_VALUE, or a proxy's 404 fail with the cause in the message."""
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    from gdrt_core.registry import current_champion

    for missing in (_server_error("INVALID_PARAMETER_VALUE", "Registered model alias champion not found."),
                    _server_error("RESOURCE_DOES_NOT_EXIST", "alias champion does not exist")):
        assert current_champion(_FailingRegistry(missing), "gdrt-office") is None
    for error, cause in (
        (requests.exceptions.ConnectionError("Connection refused"), "Connection refused"),
        (MlflowException("server busy", TEMPORARILY_UNAVAILABLE), "server busy"),
        (_server_error("INTERNAL_ERROR", "database is locked"), "database is locked"),
        (_server_error("INVALID_PARAMETER_VALUE", "Invalid model name"), "Invalid model name"),
        (_server_error("ENDPOINT_NOT_FOUND", "404 from the proxy"), "404 from the proxy"),
    ):
        with pytest.raises(GdrtError, match=f"could not read alias 'champion'.*{cause}"):
            current_champion(_FailingRegistry(error), "gdrt-office")


def test_a_registry_error_fails_the_register_step(tiny_model_dir, office_slice, tmp_path, monkeypatch):
    """register_model with the alias read failing (not "not found"): the step fails with the cause, and no
    alias is set on the version it registered."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
    from mlflow.tracking import MlflowClient

    from gdrt_core.artifacts import atomic_output_dir, write_manifest
    from gdrt_core.registry import register_model

    eval_dir = tmp_path / "valid_eval"
    with atomic_output_dir(eval_dir) as tmp:
        (tmp / "metrics.json").write_text(json.dumps({"ndcg@10": 0.25}))
        write_manifest(tmp, "eval")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)

    def unavailable(self, name, alias):
        raise MlflowException("registry read timed out", TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", unavailable)
    with pytest.raises(GdrtError, match="registry read timed out"):
        register_model(str(tiny_model_dir), str(office_slice), str(eval_dir), domain="office")
    monkeypatch.undo()
    assert MlflowClient(uri).get_model_version("gdrt-office", "1").aliases == []


@pytest.mark.slow
def test_serves_in_a_fresh_environment(store, tmp_path):
    """`mlflow models predict` with an environment manager: MLflow builds a new environment from the model's
    python_env.yaml and requirements.txt (from the package index) and serves it from its files alone,
    without this checkout or an installed gdrt. uv when it is on PATH (it finds an installed Python 3.x of
    the model's version), else virtualenv (pyenv, which downloads that Python). Slow: installs torch."""
    import subprocess
    import sys

    _, uri, _ = store
    manager = "uv" if shutil.which("uv") else "virtualenv"
    request = {"dataframe_split": {"columns": ["history"], "data": [[["Desk Lamp", "Stapler"]]]}, "params": {"k": 3}}
    (tmp_path / "input.json").write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_DISABLE_TELEMETRY="true")
    for pip_name, uv_name in (("PIP_INDEX_URL", "UV_INDEX_URL"), ("PIP_EXTRA_INDEX_URL", "UV_EXTRA_INDEX_URL"),
                              ("PIP_FIND_LINKS", "UV_FIND_LINKS")):  # uv does not read pip's settings
        if pip_name in env and uv_name not in env:
            env[uv_name] = env[pip_name]
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", "models:/gdrt-office@champion",
         "-i", str(tmp_path / "input.json"), "-t", "json", "-o", str(tmp_path / "out.json"), "--env-manager", manager],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    predictions = json.loads((tmp_path / "out.json").read_text())["predictions"]
    assert len(predictions) == 1 and len(predictions[0]["recommendations"]) == 3
    assert "gdrt_core/recommend.py" not in result.stderr  # no traceback through the code
