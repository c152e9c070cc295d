"""Concurrent first use of a file-based MLflow store: the schema is created once, under a lock beside it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gdrt_core.errors import GdrtError
from gdrt_core.tracking import first_use_lock, store_lock_path


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sqlite:////abs/dir/mlflow.db", "/abs/dir/mlflow.db.lock"),
        ("sqlite:///rel/mlflow.db", "rel/mlflow.db.lock"),
        ("sqlite:////abs/x.db?timeout=20", "/abs/x.db.lock"),
        ("file:///abs/mlruns", "/abs/mlruns.lock"),
        ("mlruns", "mlruns.lock"),
    ],
)
def test_lock_beside_file_based_stores(uri, expected):
    assert store_lock_path(uri) == Path(expected).absolute()


@pytest.mark.parametrize(
    "uri", ["http://localhost:5000", "https://mlflow.example.com", "sqlite:///:memory:", "postgresql://u@h/db"],
)
def test_no_lock_for_servers(uri):
    assert store_lock_path(uri) is None


def test_a_held_lock_is_named_after_the_timeout(tmp_path):
    from filelock import FileLock

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with FileLock(str(tmp_path / "mlflow.db.lock")), pytest.raises(GdrtError, match="locked by another process"):
        with first_use_lock(uri, timeout=0.2):
            pass


_OPEN_STORE = """
import sys
from gdrt_core.tracking import client
c = client(sys.argv[1], registry=True)

run = c.create_run(c.search_experiments(max_results=1)[0].experiment_id)
c.set_terminated(run.info.run_id)
print("ok")
"""


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_concurrent_first_use_leaves_a_usable_store(tmp_path, store, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if store == "sqlite" else (tmp_path / "mlruns").as_uri()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_ALLOW_FILE_STORE": "true"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _OPEN_STORE, uri], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.strip().endswith("ok")
    from gdrt_core.tracking import client

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    runs = client(uri).search_runs([client(uri).search_experiments(max_results=1)[0].experiment_id])
    assert len(runs) == 3


def test_creating_the_store_does_not_print_mlflow_migration_lines(tmp_path, capfd):
    """Every stage of a first `gdrt run` printed MLflow's "Creating initial MLflow database tables..." and
    "Updating database tables" in the middle of its own output."""
    import logging

    from gdrt_core.tracking import client

    store_log = logging.getLogger("mlflow.store.db.utils")
    level = store_log.level
    client(f"sqlite:///{tmp_path / 'mlflow.db'}", registry=True)
    out = capfd.readouterr()
    assert "database tables" not in out.out + out.err
    assert (tmp_path / "mlflow.db").is_file() and store_log.level == level
