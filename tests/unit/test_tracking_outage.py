"""MLflow outages never make a stage wait: calls are queued and sent in the background, retried until the
server is back, and what could not be sent within GDRT_TRACKING_FLUSH_S is reported (issue 19)."""

from __future__ import annotations

import threading
import time

import pytest

from gdrt_core import tracking


class FakeClient:
    """Stands in for MlflowClient: records the calls it took; `down` makes every call fail like an outage."""

    def __init__(self, *, fail_first: int = 0, delay: float = 0.0, down: bool = False):
        self.fail_first, self.delay, self.down = fail_first, delay, down
        self.calls: list[tuple] = []
        self.lock = threading.Lock()

    def _take(self, call: tuple) -> None:
        time.sleep(self.delay)
        with self.lock:
            if self.down or self.fail_first > 0:
                self.fail_first -= 1
                raise ConnectionError("Connection refused")
            self.calls.append(call)

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._take(("batch", [m.key for m in metrics], [p.key for p in params], [t.key for t in tags]))

    def set_terminated(self, run_id, status):
        self._take(("status", status))

    def log_artifacts(self, run_id, directory, artifact_path=None):
        self._take(("artifacts", directory))


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(tracking, "RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(tracking, "RETRY_MAX_S", 0.05)


def test_logging_never_waits_for_a_slow_server():
    import mlflow.entities  # noqa: F401 - imported before the clock starts

    client = FakeClient(delay=0.5)
    tracker = tracking.Tracker(client, "run")
    started = time.monotonic()
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    assert time.monotonic() - started < 0.3
    assert tracker.terminate("FINISHED") == []
    assert [c[0] for c in client.calls] == ["batch"] * 5 + ["status"]


def test_an_outage_is_bridged_in_order_and_the_status_set_when_the_server_returns(capsys):
    client = FakeClient(fail_first=6)
    tracker = tracking.Tracker(client, "run")
    tracker.log_params({"lr": 0.1})
    tracker.log_metrics({"loss": 2.0}, step=1)
    tracker.log_artifacts("/tmp/out", "model")
    assert tracker.terminate("FINISHED") == []
    assert client.calls == [("batch", [], ["lr"], []), ("batch", ["loss"], [], []), ("artifacts", "/tmp/out"),
                            ("status", "FINISHED")]
    assert "did not log" not in capsys.readouterr().err


def test_a_server_that_stays_down_costs_at_most_the_flush_bound_and_is_reported(monkeypatch, capsys):
    monkeypatch.setenv(tracking.FLUSH_ENV, "0.3")
    client = FakeClient(down=True)
    tracker = tracking.Tracker(client, "run-7")
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_metrics({"loss": 0.5}, step=2)
    started = time.monotonic()
    lost = tracker.terminate("FAILED")
    assert time.monotonic() - started < 2
    assert lost == ["metrics", "metrics", "run status FAILED"]
    err = capsys.readouterr().err
    assert "did not log 3 call(s) of run run-7" in err and "2 x metrics" in err and "1 x run status FAILED" in err
    tracker.log_metrics({"late": 1.0})  # a closed tracker takes nothing more, and never raises
    assert client.calls == []


def test_a_slow_but_working_server_gets_everything_however_long_it_takes(monkeypatch):
    """The bound is on failing calls, not on a long upload: nothing is cut short while the server works."""
    monkeypatch.setenv(tracking.FLUSH_ENV, "0.2")
    client = FakeClient(delay=0.15)
    tracker = tracking.Tracker(client, "run")
    for step in range(4):
        tracker.log_metrics({"loss": 1.0}, step=step)
    tracker.log_artifacts("/tmp/model", "model")
    assert tracker.terminate("FINISHED") == []
    assert [c[0] for c in client.calls] == ["batch"] * 4 + ["artifacts", "status"]


def test_a_call_the_server_refuses_is_dropped_and_the_rest_goes_on(capsys):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    client = FakeClient()
    original = client.log_batch

    def refuse_params(run_id, metrics=(), params=(), tags=()):
        if params:
            raise MlflowException("param too long", error_code=INVALID_PARAMETER_VALUE)
        original(run_id, metrics=metrics, params=params, tags=tags)

    client.log_batch = refuse_params
    tracker = tracking.Tracker(client, "run")
    tracker.log_params({"x": "y"})
    tracker.log_metrics({"loss": 1.0})
    assert tracker.terminate("FINISHED") == ["params"]
    assert client.calls == [("batch", ["loss"], [], []), ("status", "FINISHED")]
    assert "1 x params" in capsys.readouterr().err


def test_an_inactive_tracker_does_nothing():
    tracker = tracking.Tracker()
    tracker.log_metrics({"a": 1.0})
    tracker.log_artifacts("/nowhere")
    assert tracker.terminate() == []
