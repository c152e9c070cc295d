"""MLflow tracking for every stage: one run per stage, nested under the pipeline's parent run.

- Tracking URI: `MLFLOW_TRACKING_URI` if set, else an embedded sqlite store in the working directory
  (`sqlite:///mlflow.db`, artifacts in ./mlartifacts); `mlflow ui --backend-store-uri sqlite:///mlflow.db`
  shows it.
- A file-based store (sqlite, or a file store directory) is first opened under a file lock next to it
  (`mlflow.db.lock`): stages started together would otherwise all run MLflow's schema creation on a fresh
  database at once and leave it half-migrated. Every client comes from `client()`.
- Run context: a `RunContext` (parent run id, the stage's run name, tracking on/off, experiment) is an
  argument of every stage run: `run_stage(..., context=)`, `stage_run(..., context=)`. Across processes it
  travels as explicit arguments (`gdrt <stage> --parent-run-id ID --run-name NAME`, a component's
  `parent_run_id` / `run_name` inputs, the sweep's node spec), never through the environment. A stage's run
  nests under the parent run, in the parent's experiment. Experiment of a run without a parent: the
  context's, else `MLFLOW_EXPERIMENT_NAME`, else "gdrt". `GDRT_TRACKING=off` is the operator's switch: the
  default of a context's `enabled`.
- Only rank 0 logs (RANK / LOCAL_RANK environment variables); other ranks get a tracker that does nothing.
- A server that cannot be reached when a stage starts is an error naming the URI (before any work). Once the
  stage runs, logging never makes it wait: calls are queued and sent by a background thread, a failing call
  is retried in the background until the server is back, and the stage's end waits for the queue (at most
  GDRT_TRACKING_FLUSH_S seconds, default 120, of failing calls), then sets the run's status and reports what
  was not logged. Tracking never kills training, and everything logged is on disk in the artifact first.
- The MLflow client's own HTTP retries are bounded (MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, _BACKOFF_FACTOR=1,
  _TIMEOUT=30 unless set): a dead server fails a call in seconds, not minutes.
- Params are flattened ("a.b") and cut to MLflow's limits (key 250 chars, value 6000 chars, 100 per call).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
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


def store_path(uri: str) -> Path | None:
    """The file or directory of a file-based store (sqlite database or file store directory); None for
    servers (and an in-memory sqlite)."""
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
    return Path(path).absolute()


def store_lock_path(uri: str) -> Path | None:
    """The lock file beside a file-based store (sqlite database or file store directory); None for servers."""
    store = store_path(uri)
    return None if store is None else store.with_name(store.name + ".lock")


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
    store_log = logging.getLogger("mlflow.store.db.utils")  # "Creating initial MLflow database tables..." on every
    level = store_log.level                                  # stage's first use, in the middle of its output
    with first_use_lock(uri):
        store_log.setLevel(logging.WARNING)
        try:
            mlflow_client = MlflowClient(tracking_uri=uri)  # opens (creates, migrates) the tracking store
            mlflow_client.search_experiments(max_results=1)
            if registry:
                mlflow_client.search_registered_models(max_results=1)
        finally:
            store_log.setLevel(level)
    return mlflow_client


def is_rank_zero() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) in ("0", "")


def tracking_enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "on").lower() not in ("off", "0", "false", "no")


@dataclasses.dataclass(frozen=True)
class RunContext:
    """Where a stage's MLflow run goes: nested under `parent_run_id` (when set), named `run_name` (default:
    the stage's name), in `experiment` (runs without a parent); nothing is logged when `enabled` is False."""

    parent_run_id: str = ""
    run_name: str = ""
    enabled: bool = dataclasses.field(default_factory=tracking_enabled)
    experiment: str = ""

    def args(self) -> list[str]:
        """The context as `gdrt <stage>` arguments, for a stage run in another process."""
        out = ["--parent-run-id", self.parent_run_id] if self.parent_run_id else []
        out += ["--run-name", self.run_name] if self.run_name else []
        out += ["--experiment", self.experiment] if self.experiment else []
        return out + ([] if self.enabled else ["--no-tracking"])


_CONTEXT: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar("gdrt_run_context", default=None)


def current_context() -> RunContext:
    """The context a stage run without an explicit one uses: the innermost `use_context`, else the default."""
    return _CONTEXT.get() or RunContext()


@contextlib.contextmanager
def use_context(context: RunContext) -> Iterator[RunContext]:
    """Run the block under `context` (for a stage whose `run` does not take a context argument)."""
    token = _CONTEXT.set(context)
    try:
        yield context
    finally:
        _CONTEXT.reset(token)


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


# bounded MLflow client retries (its defaults, 7 retries with backoff factor 2 and a 120 s timeout per
# request, hold a caller for minutes when the server is down); values the user sets win
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
FLUSH_ENV = "GDRT_TRACKING_FLUSH_S"  # how long a stage's end waits for MLflow calls still queued
DEFAULT_FLUSH_S = 120.0
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0  # background retry backoff


def bound_http_retries() -> None:
    """Limit the MLflow client's HTTP retries and timeouts for this process (unless the user set them)."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


def reachable_uri() -> str:
    """The tracking URI, after its health check (a GdrtError naming it when it does not answer), with the
    client's HTTP retries bounded: every direct use of the MLflow client starts here."""
    uri = tracking_uri()
    check_reachable(uri)
    bound_http_retries()
    return uri


def model_store_uri(model: str) -> str:
    """The tracking URI to read `model` (a models:/ or runs:/ URI) from, after `reachable_uri`'s health check.
    A file-based store that does not exist is refused: opening it would create an empty store (./mlflow.db
    when MLFLOW_TRACKING_URI is not set), which holds no model."""
    uri = tracking_uri()
    store = store_path(uri)
    if store is not None and not store.exists():
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            raise GdrtError(f"{model} is a model in MLflow, but MLFLOW_TRACKING_URI is not set and there is no "
                            f"MLflow store in this directory ({store})",
                            hint="set MLFLOW_TRACKING_URI to the server or store that holds it, e.g. "
                                 "http://HOST:5000 or sqlite:////path/to/mlflow.db, or run from the directory of "
                                 "the gdrt run that registered it")
        raise GdrtError(f"{model} is a model in MLflow, but the store of MLFLOW_TRACKING_URI={uri} does not exist",
                        path=str(store), hint="set MLFLOW_TRACKING_URI to the server or store that holds the model")
    return reachable_uri()


def _permanent(error: Exception) -> bool:
    """A call the server refused as invalid (HTTP 4xx): retrying cannot help, unlike an outage."""
    code = getattr(error, "get_http_status_code", lambda: None)()
    return isinstance(code, int) and 400 <= code < 500


class Tracker:
    """Logs to one MLflow run without ever making the caller wait: every call is queued and sent, in order,
    by one background thread. A call that fails (server down or failing) is retried in the background with
    a growing pause (up to 30 s) until it succeeds; one the server refuses as invalid (4xx) is dropped with a
    warning. `close` (the stage's end) waits for the queue while the server takes the calls (a long upload is
    not cut short), but at most GDRT_TRACKING_FLUSH_S seconds of failing calls, then reports what was not
    logged. Nothing here raises."""

    def __init__(self, client=None, run_id: str | None = None):
        self.client = client
        self.run_id = run_id
        self._pending: deque[tuple[str, Callable[[], Any]]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failing_since: float | None = None  # monotonic time of the first failure since the last success
        self.dropped: list[str] = []

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None

    def _send(self, what: str, fn: Callable, *args: Any, **kwargs: Any) -> None:
        if not self.active or self._closed:
            return
        with self._cond:
            self._pending.append((what, functools.partial(fn, *args, **kwargs)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="gdrt-mlflow", daemon=True)
                self._thread.start()
                _OPEN.add(self)
            self._cond.notify_all()

    def _work(self) -> None:
        delay, warned = RETRY_FIRST_S, False
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                what, call = self._pending[0]
            try:
                call()
            except Exception as e:  # noqa: BLE001 - tracking must never kill the stage
                if _permanent(e):
                    log.warning("MLflow refused %s, not logged: %s", what, e)
                    self.dropped.append(what)
                else:
                    if self._failing_since is None:
                        self._failing_since = time.monotonic()
                    if not warned:
                        log.warning("MLflow call (%s) failed, retrying in the background: %s", what, e)
                        warned = True
                    if self._closed and not self._pending:
                        return
                    time.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
            delay, warned, self._failing_since = RETRY_FIRST_S, False, None
            with self._cond:
                if self._pending and self._pending[0][1] is call:  # (close() may have emptied the queue)
                    self._pending.popleft()
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> list[str]:
        """Wait for the queued calls while the server takes them, giving up once calls have been failing for
        `timeout` s (default GDRT_TRACKING_FLUSH_S) of this wait; returns the calls left."""
        if timeout is None:
            timeout = float(os.environ.get(FLUSH_ENV, DEFAULT_FLUSH_S))
        started = time.monotonic()
        with self._cond:
            while self._pending:
                failing = self._failing_since
                if failing is not None and time.monotonic() - max(failing, started) >= timeout:
                    break
                self._cond.wait(min(max(timeout, 0.01), 0.2))
            return [what for what, _ in self._pending]

    def close(self, timeout: float | None = None) -> list[str]:
        """Flush, stop the sender, and report (stderr) what MLflow did not get; returns it."""
        unsent = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()
        _OPEN.discard(self)
        lost = unsent + self.dropped
        if lost:
            import sys

            counts: dict[str, int] = {}
            for what in lost:
                counts[what] = counts.get(what, 0) + 1
            print(f"gdrt: warning: MLflow at {tracking_uri()} did not log {len(lost)} call(s) of run {self.run_id} "
                  f"({', '.join(f'{n} x {w}' for w, n in counts.items())}); the stage's outputs on disk hold "
                  "everything", file=sys.stderr, flush=True)
        return lost

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in clean_params(params).items()]
        for i in range(0, len(items), MAX_PARAMS_PER_CALL):
            self._send("params", self.client.log_batch, self.run_id, params=items[i : i + MAX_PARAMS_PER_CALL])

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
            self._send("metrics", self.client.log_batch, self.run_id, metrics=items[i : i + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        self._send("tags", self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.active:
            self._send(f"artifact {Path(path).name}", self.client.log_artifact, self.run_id, str(path),
                       artifact_path)

    def log_artifacts(self, directory: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.active:
            self._send(f"artifacts {Path(directory).name}", self.client.log_artifacts, self.run_id, str(directory),
                       artifact_path)

    def terminate(self, status: str = "FINISHED") -> list[str]:
        """Queue the run's final status and close: the status is set once everything before it was sent."""
        if self.active:
            self._send(f"run status {status}", self.client.set_terminated, self.run_id, status)
        return self.close()


_OPEN: set[Tracker] = set()


@atexit.register
def _flush_open_trackers() -> None:
    """Trackers on runs opened elsewhere (no status to set) still send what they queued, within the bound."""
    for tracker in list(_OPEN):
        tracker.close()


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
              experiment: str | None = None, enabled: bool | None = None) -> Tracker:
    """Create a run (nested under `parent_run_id` if given); raise GdrtError if the store is unreachable.
    `enabled` None = the operator's switch (`tracking_enabled()`)."""
    if not ((tracking_enabled() if enabled is None else enabled) and is_rank_zero()):
        return Tracker()
    uri = reachable_uri()
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
    """Set the run's status after everything queued before it (bounded wait; what is left is reported)."""
    tracker.terminate(status)


def check_not_spawning(stage: str) -> None:
    """Refuse to start `stage` while this process is a new worker importing its parent's main script
    (multiprocessing's spawn start method, which `gdrt evaluate --set workers=N` uses). A script that runs a
    stage without `if __name__ == "__main__":` would otherwise run it again in every worker, each opening its
    own MLflow run, before multiprocessing's own error. `_inheriting` is the flag multiprocessing sets for that
    import (multiprocessing.spawn, `_check_not_importing_main`)."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise GdrtError(
            f"the {stage} stage was started inside a worker process that is importing the main script",
            hint='put the script\'s code under `if __name__ == "__main__":` (worker processes import the main '
                 "script again), or run the stage with workers=1",
        )


@contextlib.contextmanager
def stage_run(stage: str, config: dict | None = None, context: RunContext | None = None) -> Iterator[Tracker]:
    """One MLflow run for a stage under `context` (default `current_context()`): params = the resolved
    config; FAILED status if the stage raises."""
    check_not_spawning(stage)
    context = context or current_context()
    tracker = start_run(context.run_name or stage, parent_run_id=context.parent_run_id or None,
                        tags={"gdrt.stage": stage}, experiment=context.experiment or None, enabled=context.enabled)
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


def open_run(run_id: str, enabled: bool | None = None) -> Tracker:
    """A tracker on an existing run (e.g. the pipeline's parent run)."""
    if not (run_id and (tracking_enabled() if enabled is None else enabled) and is_rank_zero()):
        return Tracker()
    bound_http_retries()
    return Tracker(client(), run_id)


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    """Close a run opened elsewhere (the pipeline's parent run, at its last step or by `gdrt run`)."""
    end_run(open_run(run_id), status)
