"""MLflow from the train stage: a real `mlflow server` on 127.0.0.1, an unreachable one, and flaky logging."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_train_support import make_tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, office_slice):
    root = tmp_path_factory.mktemp("train_mlflow")
    return {"model": str(make_tiny_model(office_slice, root / "model")), "dataset": str(office_slice)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,  # its own process group
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
            assert proc.poll() is None, "mlflow server exited"
        else:
            pytest.fail("mlflow server did not answer /health in 120 s")
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _config(tiny, out: Path):
    from gdrt_core.train import TrainConfig

    return TrainConfig(dataset=tiny["dataset"], model=tiny["model"], out=str(out), objective="sft", max_steps=3,
                       batch_size=4, max_train=24, valid_size=4, eval_at_start=False, ndcg_every_epoch=False,
                       eval_every=0, save_every=0, log_every=1, cpu_threads=1)


def test_logs_to_a_real_server(tiny, tmp_path, mlflow_server, monkeypatch):
    import mlflow

    from gdrt_core.train import run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "train-server-test")
    run(_config(tiny, tmp_path / "m"))
    client = mlflow.tracking.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("train-server-test")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FINISHED"
    assert r.data.params["objective"] == "sft" and r.data.params["max_steps"] == "3"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [1, 2, 3]
    for key in ("learning_rate", "tokens_per_s", "loss_sft", "eval_loss"):
        assert key in r.data.metrics, key
    arts = {a.path for a in client.list_artifacts(r.info.run_id, "model")}
    assert {"model/adapter_model.safetensors", "model/manifest.json", "model/config.yaml"} <= arts


def test_unreachable_server_fails_before_training(tiny, tmp_path, monkeypatch):
    from gdrt_core.errors import GdrtError
    from gdrt_core.train import run

    uri = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.perf_counter()
    with pytest.raises(GdrtError, match=uri.replace(".", r"\.")):
        run(_config(tiny, tmp_path / "m"))
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "m").exists()


def test_transient_logging_errors_never_stop_training(tiny, tmp_path, monkeypatch):
    """Every other log_batch call fails: retried, at worst dropped; the model is written all the same."""
    from mlflow.tracking import MlflowClient

    from gdrt_core import tracking
    from gdrt_core.train import run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'flaky.db'}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    original = MlflowClient.log_batch
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            raise ConnectionError("server went away")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    manifest = run(_config(tiny, tmp_path / "m"))
    assert manifest["kind"] == "model" and (tmp_path / "m" / "adapter_model.safetensors").is_file()
    assert calls["n"] > 4
