"""MLflow tracking for every stage: one run per stage, nested under the pipeline's parent run.

- Tracking URI: `MLFLOW_TRACKING_URI` if set, else an embedded sqlite store in the working directory
  (`sqlite:///mlflow.db`, artifacts in ./mlartifacts); `mlflow ui --backend-store-uri sqlite:///mlflow.db`
  shows it.
- A file-based store (sqlite, or a file store directory) is first opened under a file lock next to it
  (`mlflow.db.lock`): stages started together would otherwise all run MLflow's schema creation on a fresh
  database at once and leave it half-migrated. Every client comes from `client()`.
- Parent run: `GDRT_PARENT_RUN_ID` (set by `gdrt run` / the pipeline) makes each stage run a nested run.
  Experiment: `MLFLOW_EXPERIMENT_NAME` or "gdrt".
- Only rank 0 logs (RANK / LOCAL_RANK environment variables); other ranks get a tracker that does nothing.
- A server that cannot be reached when a stage starts is an error naming the URI (before any work). Once the
  stage runs, a failing log call is retried and then dropped with a warning: tracking never kills training,
  and everything logged is on disk in the artifact first.
- Params are flattened ("a.b") and cut to MLflow's limits (key 250 chars, value 6000 chars, 100 per call).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gdrt_core.config import flatten
from gdrt_core.errors import GdrtError

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "gdrt"
MAX_PARAM_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_PARAMS_PER_CALL = 100
DISABLE_ENV = "GDRT_TRACKING"  # "off" disables MLflow logging (artifacts are still written)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def store_lock_path(uri: str) -> Path | None:
    """The lock file beside a file-based store (sqlite database or file store directory); None for servers."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?", 1)[0]  # sqlite:////abs/path or sqlite:///relative/path
        if not path or path == ":memory:":
            return None
    elif uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        path = unquote(urlparse(uri).path)
    elif "://" not in uri and not uri.startswith("sqlite:"):
        path = uri  # a plain directory is a file store
    else:
        return None
    store = Path(path).absolute()
    return store.with_name(store.name + ".lock")


@contextlib.contextmanager
def first_use_lock(uri: str, timeout: float = 600.0) -> Iterator[None]:
    """Hold the lock of a file-based store (no-op for a tracking server)."""
    lock_path = store_lock_path(uri)
    if lock_path is None:
        yield
        return
    from filelock import FileLock, Timeout

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(lock_path), timeout=timeout):
            yield
    except Timeout:
        raise GdrtError(
            f"the MLflow store {uri} has been locked by another process for {timeout:.0f} s", path=str(lock_path),
            hint="wait for the other stage, or delete the lock file if no gdrt process is running",
        ) from None


def client(uri: str | None = None, *, registry: bool = False):
    """An MlflowClient on `uri` (default `tracking_uri()`).

    For a file-based store, the store (and the model registry store when `registry`) is opened under
    `first_use_lock`, so that concurrent first uses create and migrate its schema once.
    """
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    if store_lock_path(uri) is None:
        return MlflowClient(tracking_uri=uri)
    with first_use_lock(uri):
        mlflow_client = MlflowClient(tracking_uri=uri)  # opens (creates, migrates) the tracking store
        mlflow_client.search_experiments(max_results=1)
        if registry:
            mlflow_client.search_registered_models(max_results=1)
    return mlflow_client


def is_rank_zero() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) in ("0", "")


def tracking_enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "on").lower() not in ("off", "0", "false", "no")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, when an HTTP tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (the user's own server)
            if resp.status >= 500:
                raise GdrtError(f"MLflow server at {uri} answered {resp.status} to its health check")
    except (urllib.error.URLError, OSError) as e:
        raise GdrtError(
            f"cannot reach the MLflow tracking server at {uri} ({getattr(e, 'reason', e)})",
            hint="start it, fix MLFLOW_TRACKING_URI, or unset it to use the local sqlite store",
        ) from None


def clean_params(params: dict[str, Any]) -> dict[str, str]:
    """Flatten and cut params to MLflow's limits (values over the limit end in '...')."""
    out = {}
    for k, v in flatten(params).items():
        key = str(k)[:MAX_PARAM_KEY]
        val = "" if v is None else str(v)
        if len(val) > MAX_PARAM_VALUE:
            val = val[: MAX_PARAM_VALUE - 3] + "..."
        out[key] = val
    return out


def _retry(fn, *args, attempts: int = 3, delay: float = 1.0, **kwargs) -> Any:
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never kill the stage
            if i == attempts - 1:
                log.warning("MLflow call %s failed after %d attempts, skipped: %s", getattr(fn, "__name__", fn), attempts, e)
                return None
            time.sleep(delay * (2**i))
    return None


class Tracker:
    """Logs to one MLflow run. Every call is retried and never raises."""

    def __init__(self, client=None, run_id: str | None = None):
        self.client = client
        self.run_id = run_id

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in clean_params(params).items()]
        for i in range(0, len(items), MAX_PARAMS_PER_CALL):
            _retry(self.client.log_batch, self.run_id, params=items[i : i + MAX_PARAMS_PER_CALL])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(k.replace("@", "_at_"), float(v), ts, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and v == v  # skip NaN
        ]
        for i in range(0, len(items), 1000):
            _retry(self.client.log_batch, self.run_id, metrics=items[i : i + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        _retry(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.active:
            _retry(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.active:
            _retry(self.client.log_artifacts, self.run_id, str(directory), artifact_path)


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):  # artifacts beside the database file
        location = (Path(uri[len("sqlite:///"):]).absolute().parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - created concurrently by another stage
        return client.get_experiment_by_name(name).experiment_id


def start_run(run_name: str, *, parent_run_id: str | None = None, tags: dict | None = None,
              experiment: str | None = None) -> Tracker:
    """Create a run (nested under `parent_run_id` if given); raise GdrtError if the store is unreachable."""
    if not (tracking_enabled() and is_rank_zero()):
        return Tracker()
    uri = tracking_uri()
    check_reachable(uri)
    try:
        mlflow_client = client(uri)
        if parent_run_id:  # nested runs live in their parent's experiment
            exp_id = mlflow_client.get_run(parent_run_id).info.experiment_id
        else:
            exp_id = _experiment_id(
                mlflow_client, experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            )
        all_tags = {"mlflow.runName": run_name, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = mlflow_client.create_run(exp_id, tags={k: str(v) for k, v in all_tags.items()}, run_name=run_name)
    except GdrtError:
        raise
    except Exception as e:  # noqa: BLE001
        raise GdrtError(f"cannot start an MLflow run at {uri}: {e}", hint="check MLFLOW_TRACKING_URI") from None
    return Tracker(mlflow_client, run.info.run_id)


def end_run(tracker: Tracker, status: str = "FINISHED") -> None:
    if tracker.active:
        _retry(tracker.client.set_terminated, tracker.run_id, status)


@contextlib.contextmanager
def stage_run(stage: str, config: dict | None = None, *, run_name: str | None = None) -> Iterator[Tracker]:
    """One MLflow run for a stage: params = the resolved config; FAILED status if the stage raises."""
    parent = os.environ.get("GDRT_PARENT_RUN_ID") or None
    run_name = run_name or os.environ.get("GDRT_RUN_NAME") or stage
    tracker = start_run(run_name, parent_run_id=parent, tags={"gdrt.stage": stage})
    tracker.log_params(config or {})
    try:
        yield tracker
    except BaseException:
        end_run(tracker, "FAILED")
        raise
    end_run(tracker, "FINISHED")


def start_pipeline_run(experiment: str, run_name: str, params: dict | None = None, run_id: str = "") -> str:
    """Open the pipeline's parent run and return its id ("" when tracking is off); `run_id` reuses a run
    opened by the caller (`gdrt run` opens it itself, so that it can close it as FINISHED or FAILED)."""
    if run_id:
        return run_id
    tracker = start_run(run_name, experiment=experiment or None, tags={"gdrt.stage": "pipeline"})
    tracker.log_params(params or {})
    return tracker.run_id or ""


def open_run(run_id: str) -> Tracker:
    """A tracker on an existing run (e.g. the pipeline's parent run)."""
    if not (run_id and tracking_enabled() and is_rank_zero()):
        return Tracker()
    return Tracker(client(), run_id)


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    """Close a run opened elsewhere (the pipeline's parent run, at its last step or by `gdrt run`)."""
    end_run(open_run(run_id), status)
