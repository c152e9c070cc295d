"""`gdrt evaluate` end to end on the Office slice with the embedded tiny model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gdrt_core.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: one thread is faster than two on a shared machine (no cross-thread sync per op)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, office_slice):
    from gdrt_core.embedded import EmbeddedConfig, run

    out = tmp_path_factory.mktemp("tiny") / "model"
    run(EmbeddedConfig(dataset=str(office_slice), out=str(out), size="tiny", seed=0))
    return out


def test_evaluate_writes_the_eval_artifact(tmp_path, office_slice, tiny_model, monkeypatch, capsys):
    from gdrt_core.artifacts import read_manifest
    from gdrt_core.dataset import Dataset
    from gdrt_core.metrics import METRIC_KEYS

    monkeypatch.setenv("GDRT_TRACKING", "off")
    out = tmp_path / "eval"
    code = main([
        "evaluate", "--dataset", str(office_slice), "--model", str(tiny_model), "--out", str(out),
        "--limit", "5", "--set", "chunk_size=2", "--set", "batch_size=2",
    ])
    assert code == 0
    assert "evaluate test: 5 examples" in capsys.readouterr().out

    manifest = read_manifest(out, "eval")
    assert set(manifest["files"]) == {"predictions.parquet", "metrics.json", "plots/ranking.png", "plots/exposure.png"}
    assert manifest["config"]["limit"] == 5 and manifest["config"]["split"] == "test"

    predictions = pq.ParquetFile(out / "predictions.parquet")
    assert predictions.metadata.num_row_groups == 3  # streamed: one row group per chunk of 2 examples
    table = predictions.read()
    assert table.schema == pa.schema([
        ("example_id", pa.int64()), ("rank", pa.int8()), ("title", pa.string()), ("score", pa.float32()),
    ])
    dataset = Dataset(office_slice)
    test_ids = dataset.split("test").column("example_id").to_pylist()[:5]
    rows = table.to_pylist()
    assert len(rows) == 5 * 10
    catalogue = set(dataset.titles.values())
    for eid in test_ids:
        ranking = [r for r in rows if r["example_id"] == eid]
        assert [r["rank"] for r in ranking] == list(range(10))
        assert len({r["title"] for r in ranking}) == 10 and all(r["title"] in catalogue for r in ranking)
        scores = [r["score"] for r in ranking]
        assert scores == sorted(scores, reverse=True)

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == set(METRIC_KEYS)
    assert metrics["n_examples"] == 5 and metrics["invalid_rate"] == 0.0
    assert all(0.0 <= metrics[k] <= 1.0 for k in METRIC_KEYS if k not in ("n_examples", "dgu@5", "dgu@10"))
    for png in ("ranking.png", "exposure.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_streamed_metrics_equal_metrics_of_all_rankings_at_once(tmp_path, office_slice, tiny_model, monkeypatch):
    """The stage streams each chunk into the accumulator and keeps no ranking: its metrics (all keys,
    extended set in the manifest) equal compute_metrics over every ranking of predictions.parquet at once
    (what the stage computed when it kept them all), with chunks of 3 over 7 examples (a short last chunk)."""
    from gdrt_core.artifacts import read_manifest
    from gdrt_core.dataset import Dataset
    from gdrt_core.evaluate import EvalConfig, run, score_predictions
    from gdrt_core.metrics import TitleCatalogue, compute_metrics

    monkeypatch.setenv("GDRT_TRACKING", "off")
    out = tmp_path / "eval"
    metrics = run(EvalConfig(dataset=str(office_slice), model=str(tiny_model), out=str(out), limit=7,
                             chunk_size=3, batch_size=2, plots=False, progress=False))
    dataset = Dataset(office_slice)
    split = dataset.split("test").slice(0, 7).to_pydict()
    rows = pq.read_table(out / "predictions.parquet").to_pylist()
    assert pq.ParquetFile(out / "predictions.parquet").metadata.num_row_groups == 3
    rankings = [[r["title"] for r in sorted((r for r in rows if r["example_id"] == eid), key=lambda r: r["rank"])]
                for eid in split["example_id"]]
    targets = [dataset.titles[t] for t in split["target"]]
    expected = compute_metrics(rankings, targets, split["history"], TitleCatalogue.from_dataset(dataset),
                               extended=True)
    assert read_manifest(out, "eval")["metrics"] == expected
    assert metrics == {k: expected[k] for k in metrics}
    again = score_predictions(office_slice, out / "predictions.parquet")  # stored rankings scored again
    assert {k: v for k, v in again.items() if k != "scored"} == expected
    assert read_manifest(out, "eval")["ranked"] == {
        "split": "test", "split_sha256": dataset.manifest["files"]["test.parquet"]["sha256"]}
    scored = score_predictions(office_slice, out)  # or the Eval directory, its split from the manifest
    assert scored.pop("scored")["split"] == "test" and scored == expected
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_evaluate_rejects_bad_settings_without_leaving_output(tmp_path, office_slice, tiny_model, monkeypatch, capsys):
    monkeypatch.setenv("GDRT_TRACKING", "off")
    out = tmp_path / "eval"
    code = main(["evaluate", "--dataset", str(office_slice), "--model", str(tiny_model), "--out", str(out),
                 "--limit", "0"])
    assert code == 2
    assert "setting limit=0 is invalid: must be >= 1" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_evaluate_logs_to_mlflow(tmp_path, office_slice, tiny_model, monkeypatch):
    """One MLflow run named evaluate with the config as params and the metrics."""
    from mlflow.tracking import MlflowClient

    from gdrt_core.evaluate import EvalConfig, run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "evaluate-test")
    monkeypatch.delenv("GDRT_TRACKING", raising=False)
    metrics = run(EvalConfig(dataset=str(office_slice), model=str(tiny_model), out=str(tmp_path / "eval"),
                             limit=2, plots=False, progress=False))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("evaluate-test")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.data.tags["mlflow.runName"] == "evaluate"
    assert mlflow_run.data.params["limit"] == "2"
    assert mlflow_run.data.metrics["ndcg_at_10"] == pytest.approx(metrics["ndcg@10"])
    assert mlflow_run.data.metrics["examples_per_second"] > 0
    assert "popular_share_at_10" in mlflow_run.data.metrics and "gh/0" in mlflow_run.data.metrics


def test_popularity_baselines_rank_without_a_model(tmp_path, office_slice, monkeypatch, capsys):
    """baseline:most-popular(-valid) give every example the same ranking (most_popular_titles, tested by
    hand in tests/unit/test_metrics.py), and the metrics are computed exactly as for a model."""
    from gdrt_core.dataset import Dataset
    from gdrt_core.evaluate import baseline_counts, most_popular_titles
    from gdrt_core.metrics import TitleCatalogue, compute_metrics

    monkeypatch.setenv("GDRT_TRACKING", "off")
    dataset = Dataset(office_slice)
    titles = dataset.titles
    test = dataset.split("test").to_pylist()
    valid_targets = dataset.split("valid").column("target").to_pylist()
    assert baseline_counts(dataset, "baseline:most-popular-valid") == {
        t: valid_targets.count(t) for t in set(valid_targets)
    }
    for name in ("baseline:most-popular", "baseline:most-popular-valid"):
        out = tmp_path / name.split(":")[1]
        assert main(["evaluate", "--dataset", str(office_slice), "--model", name, "--out", str(out),
                     "--num-beams", "5"]) == 0
        expected = most_popular_titles(titles, baseline_counts(dataset, name), 5)
        table = pq.read_table(out / "predictions.parquet").to_pylist()
        assert len(table) == 5 * len(test)
        for eid in {r["example_id"] for r in table}:  # every example, the same five titles and scores
            assert [(r["title"], r["score"]) for r in table if r["example_id"] == eid] == [
                (t, float(c)) for t, c in expected
            ]
        want = compute_metrics([[t for t, _ in expected]] * len(test), [titles[r["target"]] for r in test],
                               [r["history"] for r in test], TitleCatalogue.from_dataset(dataset))
        got = json.loads((out / "metrics.json").read_text())
        assert got == pytest.approx({k: want[k] for k in got})

    assert main(["evaluate", "--dataset", str(office_slice), "--model", "baseline:random",
                 "--out", str(tmp_path / "bad")]) != 0
    assert "unknown baseline 'baseline:random'" in capsys.readouterr().err
    assert main(["evaluate", "--dataset", str(office_slice), "--model", "baseline:most-popular-valid",
                 "--split", "valid", "--out", str(tmp_path / "bad")]) != 0
    assert "cannot be evaluated on valid" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_worker_processes_rank_as_one_process_does(tmp_path, office_slice, tiny_model, monkeypatch):
    """`--set workers=2`: two processes, each with its own copy of the model, rank whole beam-search batches;
    the predictions (titles, order, example order) are one process's, scores up to float32 rounding."""
    monkeypatch.setenv("GDRT_TRACKING", "off")
    tables, metrics = {}, {}
    for workers in (1, 2):
        out = tmp_path / f"eval-{workers}"
        assert main(["evaluate", "--dataset", str(office_slice), "--model", str(tiny_model), "--out", str(out),
                     "--limit", "9", "--set", "chunk_size=5", "--set", "batch_size=2",
                     "--set", f"workers={workers}", "--set", "threads=1", "--set", "plots=false"]) == 0
        tables[workers] = pq.read_table(out / "predictions.parquet")
        metrics[workers] = json.loads((out / "metrics.json").read_text())
    one, two = tables[1], tables[2]
    assert two.column("example_id").to_pylist() == one.column("example_id").to_pylist()
    assert two.column("title").to_pylist() == one.column("title").to_pylist()
    assert two.column("score").to_numpy() == pytest.approx(one.column("score").to_numpy(), abs=1e-4)
    assert metrics[2] == pytest.approx(metrics[1])


def test_a_bad_model_directory_is_reported_before_the_workers_start(tmp_path, office_slice, monkeypatch):
    """With workers, the model is loaded only in the workers: a missing or incomplete model directory must
    still fail at once, with load_model's message, and start no process."""
    import shutil

    from safetensors.torch import save_file

    from gdrt_core import evaluate
    from gdrt_core.dataset import Dataset
    from gdrt_core.errors import GdrtError
    from gdrt_core.generation import BeamSearchSettings

    monkeypatch.setattr("concurrent.futures.ProcessPoolExecutor.__init__",
                        lambda *a, **k: pytest.fail("a worker pool was started"))
    empty = tmp_path / "empty"
    empty.mkdir()
    no_tokenizer, bad_config = tmp_path / "no-tokenizer", tmp_path / "bad-config"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.zeros(1)}, str(no_tokenizer / "model.safetensors"))
    shutil.copytree(no_tokenizer, bad_config)
    (bad_config / "config.json").write_text("{not json")
    for model, message in ((tmp_path / "missing", "model directory does not exist"),
                           (empty, "config.json is missing"),
                           (bad_config, "cannot read the model's config.json"),
                           (no_tokenizer, "no tokenizer files in the model directory"),
                           ("someorg/no-such-model", "someorg/no-such-model")):
        config = evaluate.EvalConfig(dataset=str(office_slice), model=str(model), out=str(tmp_path / "e"), workers=2)
        with pytest.raises(GdrtError, match=message):
            with evaluate._pooled_ranker(config, Dataset(office_slice), BeamSearchSettings()):
                pass


def test_a_worker_killed_mid_run_is_an_error_naming_the_cause(tmp_path, office_slice, tiny_model, monkeypatch):
    """A worker that dies (the kernel's out-of-memory killer) broke the pool with a bare BrokenProcessPool."""
    import multiprocessing

    from gdrt_core import evaluate
    from gdrt_core.dataset import Dataset
    from gdrt_core.errors import GdrtError
    from gdrt_core.generation import BeamSearchSettings

    config = evaluate.EvalConfig(dataset=str(office_slice), model=str(tiny_model), out=str(tmp_path / "e"),
                                 workers=2, threads=1, batch_size=2)
    dataset = Dataset(office_slice)
    examples = list(dataset.examples("test", limit=4))
    with pytest.raises(GdrtError, match="a worker process of the evaluation ended without reporting an error.*out of memory"):
        with evaluate._pooled_ranker(config, dataset, BeamSearchSettings()) as rank:
            rank([list(e.history) for e in examples[:2]], [e.example_id for e in examples[:2]], lambda n: None)
            for process in multiprocessing.active_children():  # the pool's workers
                process.kill()
            rank([list(e.history) for e in examples], [e.example_id for e in examples], lambda n: None)


def test_leaving_the_pool_early_stops_its_workers(office_slice, tiny_model, tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM in the parent (here: an exception from the progress callback, while the other worker
    still ranks) must stop the workers, not let them rank on: the pool's shutdown forgets its processes, so
    they are terminated explicitly."""
    import multiprocessing
    from multiprocessing.process import BaseProcess

    from gdrt_core import evaluate
    from gdrt_core.dataset import Dataset
    from gdrt_core.generation import BeamSearchSettings

    terminated = []
    terminate = BaseProcess.terminate
    monkeypatch.setattr(BaseProcess, "terminate", lambda self: (terminated.append(self.pid), terminate(self)))
    config = evaluate.EvalConfig(dataset=str(office_slice), model=str(tiny_model), out=str(tmp_path / "e"),
                                 workers=2, threads=1, batch_size=1)
    dataset = Dataset(office_slice)
    examples = list(dataset.examples("test", limit=8))

    def interrupt(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with evaluate._pooled_ranker(config, dataset, BeamSearchSettings()) as rank:
            workers = []
            rank([list(e.history) for e in examples[:2]], [e.example_id for e in examples[:2]],
                 lambda n: workers.extend(p for p in multiprocessing.active_children() if p not in workers))
            rank([list(e.history) for e in examples], [e.example_id for e in examples], interrupt)
    assert len(workers) >= 2 and sorted(terminated) == sorted(w.pid for w in workers)
    deadline = time.monotonic() + 30  # the pool's own thread may reap them first: look at the pids, not join()
    while any(_running(w.pid) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(w.pid) for w in workers)


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (Linux /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_a_worker_error_is_the_last_line_of_the_stage_output(tmp_path, office_slice, tiny_model):
    """A sweep reports a failed stage by the last line of its log. With workers, a worker's error (here a prompt
    longer than the model's context) was followed by two resource-tracker warnings about leaked semaphores
    (the tqdm lock of the workers' loading bars, left registered by the terminated workers)."""
    import os
    import shutil
    import subprocess
    import sys

    short = tmp_path / "short-context"
    shutil.copytree(tiny_model, short, ignore=shutil.ignore_patterns("manifest.json"))
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 48
    (short / "config.json").write_text(json.dumps(config))
    env = {**os.environ, "GDRT_TRACKING": "off", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "gdrt_core.cli", "evaluate", "--dataset", str(office_slice), "--model", str(short),
         "--out", str(tmp_path / "eval"), "--limit", "4", "--set", "batch_size=1", "--set", "workers=2",
         "--set", "threads=1", "--set", "progress=false", "--set", "plots=false"],
        capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert lines[-1].startswith("gdrt evaluate: error: ") and "longer than the model's context" in lines[-1], lines[-3:]
    assert "leaked" not in done.stderr and "Loading weights" not in done.stderr
    assert not (tmp_path / "eval").exists()


def test_a_script_without_the_main_guard_opens_one_mlflow_run_not_one_per_worker(tmp_path, office_slice,
                                                                                 tiny_model):
    """The workers (spawn) import the script again; without `if __name__ == "__main__":` each ran the stage
    too and opened its own MLflow run before multiprocessing's error. They now stop before any run, naming
    the guard, and the store holds the parent's run only."""
    import os
    import subprocess
    import sys

    import mlflow

    script = tmp_path / "script.py"
    script.write_text(
        "from gdrt_core.evaluate import EvalConfig, run\n"
        f"run(EvalConfig(dataset={str(office_slice)!r}, model={str(tiny_model)!r}, out={str(tmp_path / 'e')!r}, "
        "limit=4, workers=2, threads=1, batch_size=1, plots=False, progress=False))\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "GDRT_TRACKING": "on"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 1
    assert "started inside a worker process that is importing the main script" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr.strip().splitlines()[-1]  # the parent's error says it too
    runs = mlflow.MlflowClient(uri).search_runs([e.experiment_id for e in mlflow.MlflowClient(uri).search_experiments()])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("evaluate", "FAILED")]
    assert not (tmp_path / "e").exists()
