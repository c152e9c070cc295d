"""The train stage end to end on the Office slice with the tiny model: artifact, valid loss, MLflow, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from test_train_support import make_groups, make_tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, office_slice):
    root = tmp_path_factory.mktemp("train_run")
    model = make_tiny_model(office_slice, root / "model")
    groups = make_groups(office_slice, model, root / "groups")
    return {"model": str(model), "dataset": str(office_slice), "groups": str(groups)}


def test_gdrt_run_writes_model_artifact_and_lowers_valid_loss(tiny, tmp_path, monkeypatch):
    """30 GDRT steps with LoRA: valid loss goes down; the artifact is complete; MLflow (sqlite) has the run."""
    import mlflow

    from gdrt_core.artifacts import read_manifest
    from gdrt_core.models import load_model
    from gdrt_core.train import TrainConfig, run

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "train-run-test")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "model"
    cfg = TrainConfig(
        dataset=tiny["dataset"], model=tiny["model"], out=str(out), objective="gdrt", groups=tiny["groups"],
        lr=1e-2, max_steps=30, batch_size=8, grad_accum=2, eval_every=15, save_every=15, log_every=5,
        valid_size=20, cpu_threads=1, lora_target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    )
    manifest = run(cfg)
    assert manifest["kind"] == "model" and manifest["objective"] == "gdrt"
    read_manifest(out, "model")  # hashes verify
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.yaml",
            "trainer_state.json", "train_metrics.json", "manifest.json"} <= names
    assert "checkpoints" not in names
    assert set(manifest["inputs"]) == {"dataset", "groups"}
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["global_step"] == 30
    assert metrics["eval_loss"] < metrics["eval_loss_initial"] - 0.05, metrics
    # ndcg_every_epoch (default): the valid NDCG@10 of the epoch end that max_steps reached, and of the kept model
    assert metrics["valid_ndcg_curve"][-1]["step"] == 30
    assert 0.0 <= metrics["eval_ndcg@10"] <= 1.0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train_logs = [h for h in history if "loss" in h]
    assert train_logs and all(f"group_weight/{g}" in train_logs[0] for g in range(4))
    assert sum(train_logs[0][f"group_weight/{g}"] for g in range(4)) == pytest.approx(1.0, abs=1e-5)
    assert "tokens_per_s" in train_logs[0] and "loss_gdrt" in train_logs[0]
    model = load_model(str(out), device="none")  # adapter + base reference load back
    assert model is not None

    client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("train-run-test")
    (mlrun,) = client.search_runs([exp.experiment_id])
    assert mlrun.data.params["objective"] == "gdrt" and mlrun.data.params["tau"] == "1.0"
    assert "group_weight/0" in mlrun.data.metrics and "learning_rate" in mlrun.data.metrics
    assert len(client.get_metric_history(mlrun.info.run_id, "loss")) == 6
    arts = {a.path for a in client.list_artifacts(mlrun.info.run_id, "model")}
    assert "model/adapter_model.safetensors" in arts


def test_gdrt_without_groups_is_a_clear_error(tiny, tmp_path):
    from gdrt_core.errors import GdrtError
    from gdrt_core.train import TrainConfig, run

    with pytest.raises(GdrtError, match="--groups"):
        run(TrainConfig(dataset=tiny["dataset"], model=tiny["model"], out=str(tmp_path / "m"), objective="gdrt"))
    assert not (tmp_path / "m").exists()


def test_cli_sft_full_finetune(tiny, tmp_path, monkeypatch):
    """`gdrt train` with --set overrides; config.yaml holds the resolved config."""
    import yaml

    from gdrt_core.cli import main

    monkeypatch.setenv("GDRT_TRACKING", "off")
    out = tmp_path / "sft"
    rc = main(["train", "--dataset", tiny["dataset"], "--model", tiny["model"], "--objective", "sft", "--out", str(out),
               "--set", "max_steps=4", "--set", "lora=false", "--set", "eval_every=0", "--set", "save_every=0",
               "--set", "ndcg_every_epoch=false", "--set", "max_train=32", "--set", "valid_size=8", "--set", "cpu_threads=1"])
    assert rc == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["objective"] == "sft" and saved["lora"] is False and saved["max_steps"] == 4
    assert (out / "model.safetensors").is_file()
    assert Path(saved["dataset"]) == Path(tiny["dataset"])


def test_gdrt_on_the_grouping_stage_output(tiny, tmp_path, monkeypatch):
    """The real Groups artifact (gdrt_core.grouping) joins onto the training tokens by (example_id, position)."""
    from gdrt_core.grouping import GroupConfig
    from gdrt_core.grouping import run as group_run
    from gdrt_core.train import TrainConfig, run

    monkeypatch.setenv("GDRT_TRACKING", "off")
    groups = tmp_path / "groups"
    group_run(GroupConfig(dataset=tiny["dataset"], reference=tiny["model"], out=str(groups), limit=16,
                          device="cpu"))
    manifest = run(TrainConfig(dataset=tiny["dataset"], model=tiny["model"], out=str(tmp_path / "m"),
                               objective="gdrt", groups=str(groups), max_train=16, max_steps=2, batch_size=4,
                               valid_size=4, eval_at_start=False, ndcg_every_epoch=False, save_every=0,
                               eval_every=0, log_every=1, cpu_threads=1))
    assert manifest["num_groups"] == 4
    history = json.loads((tmp_path / "m" / "trainer_state.json").read_text())["log_history"]
    logs = [h for h in history if "loss" in h]
    assert sum(logs[0][f"group_tokens/{g}"] for g in range(4)) > 0


def test_groups_from_another_tokenizer_are_a_clear_error(tiny, tmp_path):
    """A Groups artifact whose token ids differ from this tokenizer's is refused, naming the example."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from gdrt_core.artifacts import atomic_output_dir, write_manifest
    from gdrt_core.dataset import Dataset
    from gdrt_core.errors import GdrtError
    from gdrt_core.models import load_tokenizer
    from gdrt_core.train.data import build_features, load_token_groups

    table = pq.read_table(Path(tiny["groups"]) / "token_groups.parquet")
    table = table.set_column(2, "token_id", pc.add(table.column("token_id"), 1))
    bad = tmp_path / "bad_groups"
    with atomic_output_dir(bad) as tmp:
        pq.write_table(table, tmp / "token_groups.parquet")
        shutil.copy(Path(tiny["groups"]) / "groups.json", tmp / "groups.json")
        write_manifest(tmp, "groups", config={})
    lookup, num_groups = load_token_groups(bad)
    assert num_groups == 4
    with pytest.raises(GdrtError, match="another tokenizer"):
        build_features(Dataset(tiny["dataset"]), "train", load_tokenizer(tiny["model"]), token_groups=lookup, limit=2)


@pytest.mark.parametrize("edit, message", [
    (lambda t, info: (t.drop_columns(["split"]), info), "has no column split"),
    (lambda t, info: (t.set_column(4, "group", pa.array([7] * t.num_rows, pa.int8())), info),
     r"group ids run from 7 to 7, outside 0\.\.3"),
    (lambda t, info: (t, {k: v for k, v in info.items() if k not in ("num_groups", "edges")}),
     "cannot be read as the groups' summary"),
    (lambda t, info: (t, {**info, "num_groups": "4"}), "num_groups is '4'"),
    (lambda t, info: (t.set_column(4, "group", pa.array(["0"] * t.num_rows)), info),
     "has a column of another type: group is string"),
    (lambda t, info: (pa.concat_tables([t, t.slice(0, 3)]), info), "3 train target tokens have more than one row"),
])
def test_a_groups_artifact_unlike_what_gdrt_group_writes_is_refused_naming_the_file(tiny, tmp_path, edit, message):
    """A Groups artifact edited by hand (its manifest's hashes updated to match) is refused before training,
    with the file and what is wrong in it, not a KeyError or a group index out of range in the loss."""
    import pyarrow.parquet as pq

    from gdrt_core.artifacts import atomic_output_dir, write_json_atomic, write_manifest
    from gdrt_core.errors import GdrtError
    from gdrt_core.train.data import load_token_groups

    info = json.loads((Path(tiny["groups"]) / "groups.json").read_text())
    table, info = edit(pq.read_table(Path(tiny["groups"]) / "token_groups.parquet"), info)
    bad = tmp_path / "bad_groups"
    with atomic_output_dir(bad) as tmp:
        pq.write_table(table, tmp / "token_groups.parquet")
        write_json_atomic(tmp / "groups.json", info)
        write_manifest(tmp, "groups", config={})
    with pytest.raises(GdrtError, match=message) as e:
        load_token_groups(bad)
    assert str(bad) in str(e.value)


def _ndcg_run_config(tiny, out, **kw):
    from gdrt_core.train import TrainConfig

    settings = dict(
        dataset=tiny["dataset"], model=tiny["model"], out=str(out), objective="sft", lr=3e-3, epochs=3,
        batch_size=16, max_train=32, valid_size=6, eval_every=0, save_every=0, keep_checkpoints=3,
        select_best="valid_ndcg@10", eval_at_start=False, log_every=1, cpu_threads=1, lora=False,
    )
    return TrainConfig(**{**settings, **kw})


def test_select_best_by_valid_ndcg_keeps_the_best_epoch(tiny, tmp_path, monkeypatch):
    """Scripted NDCG values 0.1, 0.5, 0.2 at the three epoch ends: the kept model is epoch 2's checkpoint
    (its valid loss is the one logged at epoch 2), and the curve and the choice are in the artifact and MLflow."""
    import mlflow

    from gdrt_core.train import loop, run

    scripted = iter([0.1, 0.5, 0.2])  # a 4th call (evaluating the kept model again) would raise StopIteration

    class Scripted:
        def __call__(self, model):
            return next(scripted)

    monkeypatch.setattr(loop, "_valid_ndcg", lambda config, dataset, tokenizer: Scripted())
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "select-ndcg")
    out = tmp_path / "model"
    manifest = run(_ndcg_run_config(tiny, out))
    metrics = json.loads((out / "train_metrics.json").read_text())
    steps_per_epoch = 2  # 32 windows / batch 16
    assert [c["step"] for c in metrics["valid_ndcg_curve"]] == [2, 4, 6]
    assert [c["ndcg@10"] for c in metrics["valid_ndcg_curve"]] == [0.1, 0.5, 0.2]
    assert metrics["eval_ndcg@10"] == 0.5  # the kept model's, as logged at its step: not evaluated again
    assert metrics["selected_by"] == "valid_ndcg@10" and metrics["best_metric"] == 0.5
    assert metrics["best_checkpoint_step"] == 2 * steps_per_epoch
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]  # the 3 epoch ends, no more
    assert [step for step, _ in losses] == [2, 4, 6]
    assert metrics["eval_loss"] == pytest.approx(losses[1][1], abs=1e-6)  # epoch 2's weights were kept
    assert losses[1][1] != pytest.approx(losses[2][1], abs=1e-6)
    assert manifest["metrics"]["best_checkpoint_step"] == 4

    client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("select-ndcg").experiment_id])
    curve = [m.value for m in client.get_metric_history(mlrun.info.run_id, "eval_ndcg_at_10")]
    assert curve[:3] == [0.1, 0.5, 0.2]


def test_valid_ndcg_during_training_equals_the_evaluate_stage(tiny, tmp_path, monkeypatch):
    """The in-training number is the evaluation's: same model, same valid sample -> same NDCG@10; an error
    in it fails the training run instead of passing for 0.0."""
    from gdrt_core.evaluate import EvalConfig, SampleNdcg
    from gdrt_core.evaluate import run as evaluate
    from gdrt_core.train import run

    monkeypatch.setenv("GDRT_TRACKING", "off")
    out = tmp_path / "model"
    run(_ndcg_run_config(tiny, out, epochs=1))
    metrics = json.loads((out / "train_metrics.json").read_text())
    staged = evaluate(EvalConfig(dataset=tiny["dataset"], model=str(out), out=str(tmp_path / "ev"), split="valid",
                                 limit=6, plots=False, progress=False))
    assert metrics["eval_ndcg@10"] == pytest.approx(staged["ndcg@10"], abs=1e-9)

    def broken(self, model):
        raise RuntimeError("ranking failed")

    monkeypatch.setattr(SampleNdcg, "__call__", broken)
    with pytest.raises(RuntimeError, match="ranking failed"):
        run(_ndcg_run_config(tiny, tmp_path / "model2", epochs=1))
    assert not (tmp_path / "model2" / "train_metrics.json").exists()


@pytest.mark.parametrize(("settings", "eval_steps"), [
    (dict(epochs=1), [2]),  # the epoch end is the last step: its evaluation is the final one
    (dict(max_steps=3, eval_every=2), [2, 3]),  # the last evaluation (step 2) is stale: evaluated again at 3
])
def test_the_final_valid_loss_is_evaluated_only_when_not_logged_at_the_last_step(tiny, tmp_path, monkeypatch,
                                                                                  settings, eval_steps):
    from gdrt_core.train import run

    monkeypatch.setenv("GDRT_TRACKING", "off")
    out = tmp_path / "model"
    run(_ndcg_run_config(tiny, out, select_best="none", ndcg_every_epoch=False, **settings))
    metrics = json.loads((out / "train_metrics.json").read_text())
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    assert [step for step, _ in losses] == eval_steps
    assert metrics["eval_loss"] == pytest.approx(losses[-1][1], abs=1e-9)


def test_a_bad_groups_artifact_is_refused_before_the_workers_are_launched(tiny, tmp_path, monkeypatch):
    """With num_gpus=2 the Groups artifact was read only in the workers: two copies of the error, torchrun's
    traceback, and a last line blaming "the training workers" with a hint to re-run."""
    import pyarrow.parquet as pq

    from gdrt_core.artifacts import atomic_output_dir, write_manifest
    from gdrt_core.errors import GdrtError
    from gdrt_core.train import TrainConfig, run

    monkeypatch.setenv("GDRT_TRACKING", "off")
    monkeypatch.setattr("gdrt_core.train.deepspeed.relaunch_under_torchrun", lambda *a, **k: pytest.fail("launched"))
    bad = tmp_path / "bad_groups"
    with atomic_output_dir(bad) as tmp:
        pq.write_table(pq.read_table(Path(tiny["groups"]) / "token_groups.parquet"), tmp / "token_groups.parquet")
        (tmp / "groups.json").write_text("[]")
        write_manifest(tmp, "groups", config={})
    with pytest.raises(GdrtError, match="groups.json: cannot be read as the groups' summary"):
        run(TrainConfig(dataset=tiny["dataset"], model=tiny["model"], out=str(tmp_path / "new" / "m"),
                        objective="gdrt", groups=str(bad), num_gpus=2, max_steps=1, batch_size=2, max_train=4))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_a_run_stopped_before_its_first_checkpoint_leaves_no_empty_output(tiny, tmp_path, monkeypatch, existing):
    """Ctrl-C during the first steps left `<out>/checkpoints/` (and `<out>`) empty behind; an output directory
    that was there before stays, and a run stopped after a checkpoint keeps it for the resume."""
    from gdrt_core.train import TrainConfig, run
    from gdrt_core.train.trainer import GdrtTrainer

    monkeypatch.setenv("GDRT_TRACKING", "off")

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(GdrtTrainer, "train", interrupted)
    out = tmp_path / "new" / "m"
    if existing:
        out.mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt):
        run(TrainConfig(dataset=tiny["dataset"], model=tiny["model"], out=str(out), objective="sft", max_steps=2,
                        batch_size=2, max_train=4, valid_size=2, cpu_threads=1, ndcg_every_epoch=False))
    if existing:
        assert out.is_dir() and list(out.iterdir()) == []
    else:
        assert not (tmp_path / "new").exists()
