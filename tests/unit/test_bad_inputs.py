"""Bad input, by kind: each is refused before any work with a GdrtError naming what and where, nothing is
destroyed and nothing half-written is left (issue 19). Several inputs per kind."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest

from gdrt_core.config import load_config
from gdrt_core.errors import GdrtError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "curate"


def _copy_sliding(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "sliding", src)
    return src


# ------------------------------------------------------------------ kind 1: numbers that do not fit their column


@pytest.mark.parametrize("row, problem", [
    ('9,"[1, 2147483648]",100', "item id 2147483648 is outside the range of the int32 column"),
    ('9,"[-2147483649, 2]",100', "item id -2147483649 is outside the range of the int32 column"),
    ('9,"[1, 2]",9223372036854775808', "timestamp 9223372036854775808 is outside the range of the int64 column"),
])
def test_sliding_numbers_beyond_their_column_name_file_and_line(tmp_path, capsys, row, problem):
    from gdrt_core.cli import main

    src = _copy_sliding(tmp_path)
    lines = (src / "train.csv").read_text().splitlines()
    (src / "train.csv").write_text("\n".join([*lines, row]) + "\n")
    out = tmp_path / "ds"
    assert main(["curate", "--source", str(src), "--format", "sliding", "--domain", "office", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "train.csv" in err and f"line {len(lines) + 1}" in err and problem in err
    assert not out.exists() and "Traceback" not in err


def test_item_id_beyond_int32_in_the_titles_file(tmp_path, capsys):
    from gdrt_core.cli import main

    src = _copy_sliding(tmp_path)
    titles = json.loads((src / "id2name4Rec.json").read_text())
    titles["99999999999"] = "Huge Id Stapler"
    (src / "id2name4Rec.json").write_text(json.dumps(titles, indent=1))
    assert main(["curate", "--source", str(src), "--format", "sliding", "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert "id2name4Rec.json" in err and "99999999999" in err and "int32" in err


@pytest.mark.parametrize("value, expected", [
    (float("nan"), "not an integer"), (float("inf"), "not an integer"), (1.5, "not an integer"),
    (2**63, "outside the range of the int64 column"), (-(2**63) - 1, "outside the range"), ("100", "not an integer"),
    (100, None), (100.0, None),
])
def test_raw_review_times_must_be_int64_integers(value, expected):
    from gdrt_core.curate.amazon import _check_time

    problem = _check_time(value)
    assert (problem is None) if expected is None else (problem[0] == "malformed row" and expected in problem[1])


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "18446744073709551616", "1e400"])
def test_raw_review_time_nan_or_overflow_is_a_bad_line_not_a_crash(literal):
    from gdrt_core.curate.amazon import parse_review_block

    block = (b'{"reviewerID": "A", "asin": "I1", "unixReviewTime": 100}\n'
             + f'{{"reviewerID": "B", "asin": "I2", "unixReviewTime": {literal}}}\n'.encode())
    parsed = parse_review_block(block)
    assert len(parsed.times) == 1 and parsed.times.tolist() == [100]
    ((reason, detail, line),) = parsed.bad
    assert line == 2 and "unixReviewTime" in detail


def test_num_groups_beyond_the_int8_group_column():
    from gdrt_core.grouping import GroupConfig
    from gdrt_core.train import TrainConfig

    for value in (129, 200, 1000):
        with pytest.raises(GdrtError, match=f"num_groups={value} is invalid: must be >= 1 and <= 128"):
            load_config(GroupConfig, None, [f"num_groups={value}"], dataset="d", reference="r", out="o")
        with pytest.raises(GdrtError, match="num_groups"):
            load_config(TrainConfig, None, [f"num_groups={value}"], dataset="d", model="m", out="o")
    assert load_config(GroupConfig, None, ["num_groups=128"], dataset="d", reference="r", out="o").num_groups == 128


# ------------------------------------------------------------------ kind 2: every setting in its range at resolution


def _stage_cls(stage):
    from gdrt_core.stages import STAGES

    return STAGES[stage].config_class()


REQUIRED = {
    "curate": {"source": "s", "format": "sliding", "out": "o"}, "init-model": {"dataset": "d", "out": "o"},
    "train": {"dataset": "d", "model": "m", "out": "o"}, "group": {"dataset": "d", "reference": "r", "out": "o"},
    "evaluate": {"dataset": "d", "model": "m", "out": "o"}, "attribute": {"dataset": "d", "model": "m", "out": "o"},
}


@pytest.mark.parametrize("stage, setting, expected", [
    ("train", "optim=bogus", "optim='bogus' is invalid: unknown optimiser"),
    ("train", "scheduler=zigzag", "scheduler='zigzag' is invalid"),
    ("train", "lr=-1", "lr=-1.0 is invalid: must be > 0"),
    ("train", "lr=0", "lr=0.0 is invalid"),
    ("train", "log_every=0", "log_every=0 is invalid: must be >= 1"),
    ("train", "lora_dropout=2", "lora_dropout=2.0 is invalid: must be >= 0 and < 1"),
    ("train", "lora_dropout=1", "lora_dropout=1.0 is invalid"),
    ("train", "max_steps=-3", "max_steps=-3 is invalid: must be >= 1"),
    ("train", "max_steps=0", "max_steps=0 is invalid"),
    ("train", "epochs=0", "epochs=0.0 is invalid"),
    ("train", "tau=nan", "tau=nan is invalid: must be a finite number"),
    ("train", "warmup_ratio=1.5", "warmup_ratio=1.5 is invalid"),
    ("train", "seed=-1", "seed=-1 is invalid"),
    ("train", "keep_checkpoints=0", "keep_checkpoints=0 is invalid"),
    ("train", "lora_target_modules=", "lora_target_modules=[] is invalid: name at least one module"),
    ("train", "deepspeed=zero9", "deepspeed='zero9' is invalid: must be one of zero2, zero3, zero3-offload"),
    ("train", "prior=biggest", "prior='biggest' is invalid"),
    ("evaluate", "length_penalty=nan", "length_penalty=nan is invalid: must be a finite number"),
    ("evaluate", "length_penalty=inf", "length_penalty=inf is invalid"),
    ("evaluate", "num_beams=0", "num_beams=0 is invalid"),
    ("evaluate", "num_beams=500", "num_beams=500 is invalid: must be >= 1 and <= 127"),
    ("evaluate", "split=dev", "split='dev' is invalid: must be one of train, valid, test"),
    ("evaluate", "dtype=float8", "dtype='float8' is invalid"),
    ("evaluate", "device=gpu", "device='gpu' is invalid: must be auto, cpu, cuda or cuda:N"),
    ("evaluate", "limit=0", "limit=0 is invalid: must be >= 1"),
    ("evaluate", "early_stopping=sometimes", "early_stopping"),
    ("attribute", "limit=0", "limit=0 is invalid: must be >= 1"),
    ("attribute", "method=shapley", "method='shapley' is invalid"),
    ("attribute", "num_negatives=-1", "num_negatives=-1 is invalid"),
    ("attribute", "chunk_size=0", "chunk_size=0 is invalid"),
    ("group", "num_groups=0", "num_groups=0 is invalid: must be >= 1"),
    ("group", "part_size=0", "part_size=0 is invalid"),
    ("group", "splits=train,dev", "splits=['train', 'dev'] is invalid: element 'dev'"),
    ("group", "splits=valid", "splits must include train"),
    ("group", "history_removal=zero", "history_removal='zero' is invalid"),
    ("curate", "max_history=0", "max_history=0 is invalid"),
    ("curate", "num_pop_groups=300", "num_pop_groups=300 is invalid"),
    ("curate", "valid_fraction=1.2", "valid_fraction=1.2 is invalid"),
    ("curate", "valid_fraction=0.6", "leave no training windows"),
    ("curate", "on_bad_rows=ignore", "on_bad_rows='ignore' is invalid: must be one of error, drop"),
    ("curate", "domain=furniture", "unknown domain"),
    ("init-model", "size=huge", "size='huge' is invalid: must be one of tiny, small"),
    ("init-model", "vocab_size=100", "vocab_size=100 is invalid: must be >= 512"),
])
def test_every_stage_setting_is_range_checked_when_resolved(stage, setting, expected):
    overrides = [setting, "test_fraction=0.5"] if setting == "valid_fraction=0.6" else [setting]
    with pytest.raises(GdrtError) as e:
        load_config(_stage_cls(stage), None, overrides, **REQUIRED[stage])
    assert expected in str(e.value)
    assert f"--set {setting}" in str(e.value)  # where the bad value came from


@pytest.mark.parametrize("args, problem", [
    (["sweep", "pipelines/sweeps/office.yaml", "--jobs", "0"], "--jobs must be >= 1, got 0"),
    (["sweep", "pipelines/sweeps/office.yaml", "--jobs", "-2", "--dry-run"], "--jobs must be >= 1, got -2"),
    (["recommend", "--model", "m", "--history", "a", "--k", "0"], "--k must be positive, got 0"),
    (["recommend", "--model", "m", "--history", "a", "--domain", "furniture"], "unknown domain 'furniture'"),
])
def test_command_flags_outside_their_range(tmp_path, monkeypatch, capsys, args, problem):
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert problem in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_the_error_names_the_config_file_and_the_setting_help(tmp_path):
    from gdrt_core.train import TrainConfig

    path = tmp_path / "train.yaml"
    path.write_text("lr: -0.5\n")
    with pytest.raises(GdrtError) as e:
        load_config(TrainConfig, path, [], dataset="d", model="m", out="o")
    assert str(e.value).startswith(f"{path}: setting lr=-0.5 is invalid: must be > 0") and "peak learning rate" in str(e.value)


def test_stages_check_their_config_when_called_from_python(tmp_path):
    """A config built in Python (no load_config) is checked by the stage before any output."""
    from gdrt_core.evaluate import EvalConfig, run

    with pytest.raises(GdrtError, match="length_penalty=nan"):
        run(EvalConfig(dataset=str(tmp_path / "d"), model="m", out=str(tmp_path / "ev"), length_penalty=math.nan))
    assert not (tmp_path / "ev").exists()


def test_every_default_is_in_its_own_range():
    from gdrt_core.config import check_config

    for stage, required in REQUIRED.items():
        check_config(_stage_cls(stage)(**required))


# ------------------------------------------------------------------ kind 3: checks before the work


def test_group_num_groups_zero_is_refused_before_scoring(tmp_path, capsys):
    from gdrt_core.cli import main

    out = tmp_path / "gr"
    code = main(["group", "--dataset", str(tmp_path / "ds"), "--reference", "r", "--out", str(out), "--num-groups", "0"])
    assert code == 2 and "num_groups=0" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # no .parts, no lock, no output


@pytest.mark.parametrize("overrides, expected", [
    (["train_settings.bogus=1"], "train_settings (the train stage): unknown setting(s) bogus"),
    (["train_settings.optim=bogus"], "optim='bogus' is invalid"),
    (["group_settings.part_size=0"], "group_settings (the group stage): setting part_size=0"),
    (["eval_settings.length_penalty=nan"], "eval_settings (the evaluate stage): setting length_penalty=nan"),
    (["valid_eval_settings.limit=0"], "valid_eval_settings (the evaluate stage): setting limit=0"),
    (["attribute_settings.method=x"], "attribute_settings (the attribute stage)"),
    (["curate_settings.max_history=0"], "curate_settings (the curate stage)"),
    (["model_settings.size=huge"], "model_settings (the init-model stage)"),
    (["tau=-1"], "setting tau=-1.0 is invalid: must be > 0"),
    (["num_groups=0"], "setting num_groups=0 is invalid"),
    (["eval_split=dev"], "eval_split='dev' is invalid"),
    (["source_format=csv"], "source_format='csv' is invalid"),
    (["tau=abc"], "tau: expected float"),
    (["nonsense=1"], "unknown pipeline parameter(s) nonsense"),
    # a stage setting the pipeline sets itself (it was overridden without a word)
    (["train_settings.tau=5"], "train_settings.tau would be overridden: the train GDRT step gets its tau from the "
                               "pipeline parameter tau (set `tau: 5` in the pipeline config or --set tau=5, and remove "
                               "train_settings.tau)"),
    (["eval_settings.split=valid"], "eval_settings.split would be overridden: the evaluate SFT step gets its split "
                                    "from the pipeline parameter eval_split"),
    (["valid_eval_settings.split=test"], "the evaluate GDRT (valid) step gets its split from the pipeline, which "
                                         "always runs it with split 'valid' (remove valid_eval_settings.split)"),
    (["train_settings.objective=gdrt"], "train_settings.objective would be overridden"),
    (["group_settings.reference=x"], "passes it the output of the train SFT step"),
    (["model_settings.pretrained=smollm2-135m"], "model_settings.pretrained would be overridden: the base model step "
                                                 "gets its pretrained from the pipeline parameter base_model"),
    (["base_model=embedded:tiny"], "model_settings.size would be overridden: the base model step gets its size from "
                                   "the pipeline parameter base_model ('embedded:tiny')"),
])
def test_gdrt_run_checks_the_whole_pipeline_config_before_its_first_stage(tmp_path, capsys, overrides, expected):
    """Each problem is named before the first step. (The source does not exist: a config that got past the
    check fails at once instead of running the pipeline.)"""
    from pipelines.cli import main

    config = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "quickstart.yaml"
    args = ["run", "--config", str(config), "--out", str(tmp_path / "r"), "--set", f"source={tmp_path / 'none'}"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expected in err and str(config) in err
    assert not (tmp_path / "r").exists()


def test_gdrt_run_checks_local_paths_before_its_first_stage(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("source: no/such/dir\n")
    assert main(["run", "--config", str(config), "--out", "r"]) == 2
    err = capsys.readouterr().err
    assert f"{config}: the source data 'no/such/dir' does not exist" in err
    (tmp_path / "src").mkdir()
    assert main(["run", "--config", str(config), "--set", "source=src", "--set", "base_model=./no-model", "--out", "r"]) == 2
    assert "the base model directory './no-model' does not exist" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["run.yaml", "src"]


def test_gdrt_run_outside_the_repository_reads_the_packaged_default_config(tmp_path, monkeypatch, capsys):
    """Started elsewhere, `gdrt run` without --config fell back to the built-in defaults (the full data, no
    limits: another run) while its errors named pipelines/configs/quickstart.yaml. The default config is the
    one beside the package, wherever the command starts; a relative source in it is refused, saying what
    it is relative to."""
    import yaml

    from pipelines.cli import main
    from pipelines.params import DEFAULT_CONFIG, load_params

    monkeypatch.chdir(tmp_path)
    quickstart = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "quickstart.yaml"
    assert DEFAULT_CONFIG == quickstart
    assert load_params(None, []) == yaml.safe_load(quickstart.read_text(encoding="utf-8"))
    assert main(["run", "--out", "r"]) == 2
    err = capsys.readouterr().err
    assert f"{quickstart}: the source data 'data/office' does not exist (relative to {tmp_path})" in err
    assert "the configs in pipelines/configs/ are written for the repository root" in err
    monkeypatch.setattr("pipelines.params.DEFAULT_CONFIG", tmp_path / "gone.yaml")
    assert main(["run", "--out", "r"]) == 2
    assert f"{tmp_path / 'gone.yaml'}: pipeline config not found" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("stage, args, problem", [
    ("evaluate", ["--model", "MODEL", "--out", "ev", "--split", "valid"], "the valid split has no examples to evaluate"),
    ("group", ["--reference", "MODEL", "--out", "gr"], "the train split has no examples to fit the group edges on"),
    ("train", ["--model", "MODEL", "--out", "tr"], "the train split has no examples to train on"),
])
def test_an_empty_split_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, stage, args, problem):
    from gdrt_core.artifacts import atomic_output_dir
    from gdrt_core.cli import main
    from gdrt_core.dataset import write_dataset

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GDRT_TRACKING", "off")
    with atomic_output_dir(tmp_path / "ds") as tmp:
        write_dataset(tmp, titles={1: "a", 2: "b"}, splits={}, domain="office")
    (tmp_path / "MODEL").mkdir()  # never loaded: the empty split is found first
    assert main([stage, "--dataset", "ds", *args]) == 2
    assert problem in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["MODEL", "ds"]


def test_no_stage_setting_is_overridden_by_the_pipeline_silently():
    """Every setting a runner gives a step itself (its parameters, constants, inputs, output: what
    `stages.run_step` lays over the step's settings) is refused in the step's *_settings mapping, for every
    step of the graph; so is the backbone that base_model chooses."""
    import dataclasses

    from gdrt_core.stages import STAGES, step_values
    from pipelines import graph
    from pipelines.params import PIPELINE_DEFAULTS, check_pipeline_params

    checked = set()
    for s in graph.steps():
        if not s.settings or s.stage not in STAGES:
            continue
        args = {**graph.step_args(s, PIPELINE_DEFAULTS), **dict.fromkeys(s.inputs, "<input>"), "out": "<out>"}
        fields = {f.name for f in dataclasses.fields(STAGES[s.stage].config_class())}
        backbone = {"pretrained", "gguf"} if s.stage == "init-model" else set()
        for key in (set(step_values(s.stage, args)) | backbone) & fields:
            with pytest.raises(GdrtError, match=rf"cfg.yaml: {s.settings}.{key} would be overridden"):
                check_pipeline_params({s.settings: {key: "x"}}, "cfg.yaml")
            checked.add(f"{s.settings}.{key}")
    assert {"train_settings.tau", "train_settings.objective", "eval_settings.split", "valid_eval_settings.split",
            "attribute_settings.split", "curate_settings.format", "model_settings.out"} <= checked


def test_a_base_model_makes_the_model_settings_irrelevant():
    from pipelines.params import check_pipeline_params

    check_pipeline_params({"base_model": "Qwen/Qwen2-0.5B", "model_settings": {"size": "huge"}}, "cfg.yaml")
    with pytest.raises(GdrtError, match="cfg.yaml: train_settings must be a mapping"):
        check_pipeline_params({"train_settings": 3}, "cfg.yaml")
    with pytest.raises(GdrtError, match="cfg.yaml: model_settings"):
        check_pipeline_params({"model_settings": {"size": "huge"}}, "cfg.yaml")


def test_a_sweep_variant_with_a_bad_setting_is_refused_before_any_stage(tmp_path):
    from pipelines.sweep import load_sweep

    config = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "quickstart.yaml"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"config: {config}\nvariants:\n  good: {{}}\n  bad:\n    set:\n      train_settings: {{lr: -1}}\n")
    with pytest.raises(GdrtError, match="variant bad: train_settings .*lr=-1"):
        load_sweep(sweep)


# ------------------------------------------------------------------ kind 4: --out never destroys


def _artifact(path: Path, kind: str) -> Path:
    from gdrt_core.artifacts import atomic_output_dir, write_manifest

    with atomic_output_dir(path) as tmp:
        (tmp / "data.txt").write_text("x")
        write_manifest(tmp, kind)
    return path


def test_out_that_is_contains_or_lies_inside_an_input_is_refused(tmp_path):
    from gdrt_core.artifacts import check_output

    ds = _artifact(tmp_path / "work" / "ds", "dataset")
    for out, problem in [
        (ds, "the output is an input \\(the dataset\\)"),
        (tmp_path / "work", "contains an input \\(the dataset"),
        (tmp_path, "contains an input \\(the dataset"),
        (ds / "inner", "lies inside an input \\(the dataset"),
        (tmp_path / "work" / "." / "ds", "the output is an input \\(the dataset\\)"),
    ]:
        with pytest.raises(GdrtError, match=problem):
            check_output(out, "eval", inputs={"dataset": ds})
    os.symlink(ds, tmp_path / "link")
    with pytest.raises(GdrtError, match="the output is an input \\(the dataset\\)"):
        check_output(tmp_path / "link", "eval", inputs={"dataset": ds})
    check_output(tmp_path / "new", "eval", inputs={"dataset": ds, "model": "org/hub-id", "groups": None})


def test_existing_out_must_be_an_artifact_of_the_same_kind(tmp_path):
    from gdrt_core.artifacts import check_output

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "NOTES.txt").write_text("precious")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    model = _artifact(tmp_path / "model", "model")
    for out, problem in [
        (tmp_path / "notes", r"is not an eval artifact \(no manifest.json; it holds NOTES.txt\)"),
        (tmp_path / "file.txt", "is a file"),
        (model, "holds a model artifact, not an eval"),
    ]:
        with pytest.raises(GdrtError, match=problem):
            check_output(out, "eval")
    check_output(tmp_path / "empty", "eval")
    check_output(model, "model")
    (tmp_path / "interrupted" / "checkpoints").mkdir(parents=True)
    check_output(tmp_path / "interrupted", "model", keep=("checkpoints",))
    with pytest.raises(GdrtError, match="not a model artifact"):
        check_output(tmp_path / "interrupted", "model")
    assert (tmp_path / "notes" / "NOTES.txt").read_text() == "precious"


@pytest.mark.parametrize("out", ["src", ".", "src/ds", "notes"])
def test_curate_never_deletes_what_out_names(tmp_path, monkeypatch, capsys, out):
    from gdrt_core.cli import main

    monkeypatch.chdir(tmp_path)
    _copy_sliding(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["curate", "--source", "src", "--format", "sliding", "--out", out]) == 2
    assert "gdrt curate: error:" in capsys.readouterr().err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("work", ["notes", ".", "ds"])
def test_group_never_deletes_a_work_dir_that_is_not_its_own(tmp_path, monkeypatch, capsys, work):
    from gdrt_core.cli import main

    monkeypatch.chdir(tmp_path)
    _artifact(tmp_path / "ds", "dataset")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["group", "--dataset", "ds", "--reference", "m", "--out", "gr", "--set", f"work_dir={work}"]) == 2
    assert "gdrt group: error:" in capsys.readouterr().err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_atomic_output_dir_with_a_kind_refuses_before_replacing(tmp_path):
    from gdrt_core.artifacts import atomic_output_dir

    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "a.txt").write_text("a")
    with pytest.raises(GdrtError, match="not an eval artifact"), atomic_output_dir(tmp_path / "keep", kind="eval"):
        pytest.fail("the body must not run")
    assert (tmp_path / "keep" / "a.txt").read_text() == "a" and sorted(os.listdir(tmp_path)) == ["keep"]


# ------------------------------------------------------------------ kind 5: integrity


def _splits(target=2, history=(1,)):
    return {"train": {"example_id": [0], "user_id": ["u"], "history": [list(history)], "target": [target],
                      "timestamp": [1]}}


@pytest.mark.parametrize("titles, splits, expected", [
    ({1: "a", 2: "b"}, _splits(target=7), "the train split, row 0: target item id 7 is not one of the items"),
    ({1: "a", 2: "b"}, _splits(history=(1, 9)), "history item id 9 is not one of the items"),
    ({1: "a", 2**31: "b"}, _splits(), "item id 2147483648 is outside the range of the int32 column"),
    ({1: "a", 2: "b"}, {"train": {**_splits()["train"], "timestamp": [2**63]}}, "does not fit its column type"),
    ({1: "a", 2: "b"}, {"train": {**_splits()["train"], "target": [None]}}, "null"),
    ({1: "a", 2: "b"}, {"train": {k: v for k, v in _splits()["train"].items() if k != "user_id"}}, "no column"),
])
def test_write_dataset_validates_before_writing(tmp_path, titles, splits, expected):
    from gdrt_core.artifacts import atomic_output_dir
    from gdrt_core.dataset import write_dataset

    with pytest.raises(GdrtError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        with atomic_output_dir(tmp_path / "ds") as tmp:
            write_dataset(tmp, titles=titles, splits=splits, domain="office")
    assert not (tmp_path / "ds").exists()


def test_write_dataset_checks_streamed_batches_too(tmp_path):
    import pyarrow as pa

    from gdrt_core.dataset import split_schema, write_dataset

    batch = pa.table({"example_id": [0, 1], "user_id": ["u", "v"], "history": [[1], [1]], "target": [2, 5],
                      "timestamp": [1, 2]}, schema=split_schema()).to_batches()[0]
    with pytest.raises(GdrtError, match="row 1: target item id 5"):
        write_dataset(tmp_path, titles={1: "a", 2: "b"}, splits={"train": iter([batch])}, domain="office",
                      popularity={1: 1, 2: 1})


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def test_a_model_artifact_modified_after_it_was_written_is_refused(model_copy):
    from gdrt_core.models import load_model

    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one weight changed
    weights.write_bytes(bytes(data))
    with pytest.raises(GdrtError, match="'model.safetensors' does not match its sha256"):
        load_model(str(model_copy), device="cpu")
    weights.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 0xFF]))  # restored
    load_model(str(model_copy), device="cpu")
    (model_copy / "config.json").write_text((model_copy / "config.json").read_text() + " ")
    with pytest.raises(GdrtError, match="'config.json' does not match its sha256"):
        load_model(str(model_copy), device="cpu")


@pytest.mark.parametrize("keep", [0, 7, 100, -1])
def test_a_truncated_safetensors_file_is_named(model_copy, keep):
    from gdrt_core.artifacts import MANIFEST
    from gdrt_core.models import load_model

    (model_copy / MANIFEST).unlink()  # a plain Hugging Face directory: only the file itself tells
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep] if keep >= 0 else data[: len(data) // 3])
    with pytest.raises(GdrtError) as e:
        load_model(str(model_copy), device="cpu")
    assert str(weights) in str(e.value) and ("truncated" in str(e.value) or "not a safetensors" in str(e.value))


def test_recommend_checks_the_dataset_hash(tmp_path, tiny_model_dir, office_slice):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gdrt_core.recommend import load_recommender

    ds = tmp_path / "ds"
    shutil.copytree(office_slice, ds)
    t = pq.read_table(ds / "items.parquet")
    pq.write_table(t.set_column(1, "title", pa.array(["X " + x for x in t.column("title").to_pylist()])),
                   ds / "items.parquet")
    with pytest.raises(GdrtError, match="'items.parquet' does not match its sha256"):
        load_recommender(str(tiny_model_dir), dataset=str(ds))


# ------------------------------------------------------------------ kind 6: recommend inputs


@pytest.mark.parametrize("histories, expected", [
    ([["Desk Lamp", ""]], "history 0, title 1 is empty"),
    ([["Desk Lamp"], ["   "]], "history 1, title 0 is empty"),
    ([[1, 2]], "history 0, title 0 is int 1, not a string"),
    (["Desk Lamp"], "history 0 is str 'Desk Lamp', not a list of titles"),
    ([None], "history 0 is NoneType"),
])
def test_histories_must_be_lists_of_non_empty_titles(histories, expected):
    from gdrt_core.recommend import check_histories

    with pytest.raises(GdrtError, match=expected):
        check_histories(histories)


def test_recommend_input_files_are_checked_before_the_model_loads(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gdrt_core.cli import main

    cases = {
        "ints.parquet": (pa.table({"history": [1, 2]}), "holds int64, not a list of title strings"),
        "intlists.parquet": (pa.table({"history": [[1], [2]]}), "holds list<element: int64>, not a list of title strings"),
        "nohistory.parquet": (pa.table({"titles": [["a"]]}), "has no `history` column"),
        "empty.parquet": (pa.table({"history": [["Desk Lamp", ""]]}), "history 0, title 1 is empty"),
    }
    for name, (table, _) in cases.items():
        pq.write_table(table, tmp_path / name)
    (tmp_path / "garbage.parquet").write_text("not parquet")
    cases["garbage.parquet"] = (None, "cannot read the --input as parquet")
    cases["missing.parquet"] = (None, "the --input file does not exist")
    for name, (_, problem) in cases.items():
        args = ["recommend", "--model", str(tmp_path / "no-model"), "--input", str(tmp_path / name),
                "--out", str(tmp_path / "recs.parquet")]
        assert main(args) == 2, name
        err = capsys.readouterr().err
        assert problem in err and name in err, err
    assert main(["recommend", "--model", "m", "--history", "Desk Lamp", ""]) == 2
    assert "--history: history 0, title 1 is empty" in capsys.readouterr().err
    assert main(["recommend", "--model", "m", "--input", str(tmp_path / "ints.parquet"),
                 "--out", str(tmp_path / "ints.parquet")]) == 2
    assert "the output is an input (the --input file)" in capsys.readouterr().err
    (tmp_path / "model").mkdir()
    assert main(["recommend", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "ints.parquet"),
                 "--out", str(tmp_path / "model" / "model.safetensors")]) == 2
    assert "lies inside an input (the model" in capsys.readouterr().err
    assert not (tmp_path / "recs.parquet").exists()


# ------------------------------------------------------------------ kind 8: a dead tracking server


def test_models_uri_with_a_dead_server_fails_fast_naming_it(monkeypatch):
    import socket

    from gdrt_core.recommend import load_recommender

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(GdrtError, match=f"127.0.0.1:{port}"):
        load_recommender("models:/gdrt-office@champion")
    assert time.monotonic() - started < 15


def test_a_models_uri_without_a_tracking_store_is_refused_not_created(tmp_path, monkeypatch):
    """With no MLFLOW_TRACKING_URI, `gdrt recommend --model models:/...` created ./mlflow.db (an empty
    store) and then said the model was not found; now it is refused before any store is opened, saying to set
    MLFLOW_TRACKING_URI. An explicit sqlite store that does not exist is refused too; an existing
    ./mlflow.db (the store `gdrt run` writes) is used."""
    from gdrt_core.recommend import load_recommender
    from gdrt_core.tracking import model_store_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for model in ("models:/gdrt-office@champion", "runs:/0123/model"):
        with pytest.raises(GdrtError, match=f"{model} is a model in MLflow, but MLFLOW_TRACKING_URI is not set and "
                                            r"there is no MLflow store in this directory .*set MLFLOW_TRACKING_URI"):
            load_recommender(model)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///typo.db")
    with pytest.raises(GdrtError, match="the store of MLFLOW_TRACKING_URI=sqlite:///typo.db does not exist"):
        load_recommender("models:/gdrt-office@champion")
    assert os.listdir(tmp_path) == []
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / "mlflow.db").touch()
    assert model_store_uri("models:/gdrt-office@champion") == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_client_http_retries_are_bounded_unless_set(monkeypatch):
    from gdrt_core import tracking

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    tracking.bound_http_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


# ------------------------------------------------------------------ kind 9: flags and --set merge; messages


def test_a_flag_never_silently_drops_a_set_entry_of_the_same_name():
    from gdrt_core.evaluate import EvalConfig
    from gdrt_core.train import TrainConfig

    with pytest.raises(GdrtError, match=r"'model' is given both as a single value \('sft'\) and as a section \(model.x\)"):
        load_config(TrainConfig, None, ["model.x=1"], dataset="d", model="sft", out="o")
    with pytest.raises(GdrtError, match="model: expected a single str value"):
        load_config(EvalConfig, None, ["model.x=1"], dataset="d", out="o")
    with pytest.raises(GdrtError, match="'model' is not a settings dict"):
        load_config(TrainConfig, None, ["model=m", "model.x=1"], dataset="d", out="o")


def test_nested_sections_merge_key_by_key():
    from gdrt_core.config import set_dotted

    data: dict = {}
    set_dotted(data, "a.x", 1)
    set_dotted(data, "a", {"y": 2})
    assert data == {"a": {"x": 1, "y": 2}}


def test_attribute_limit_zero_names_the_limit(tmp_path, capsys):
    from gdrt_core.cli import main

    assert main(["attribute", "--dataset", "d", "--model", "m", "--out", str(tmp_path / "a"), "--limit", "0"]) == 2
    err = capsys.readouterr().err
    assert "limit=0 is invalid: must be >= 1" in err and "no examples" not in err


# ------------------------------------------------------------------ faults: full or read-only output file system


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_output_file_system_errors_name_the_path_and_cause(monkeypatch, capsys, code):
    from gdrt_core import cli

    def run_raising(config):
        raise OSError(code, os.strerror(code), "/mnt/out/model.safetensors")

    monkeypatch.setattr("gdrt_core.evaluate.run", run_raising)
    assert cli.main(["evaluate", "--dataset", "d", "--model", "m", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert f"/mnt/out/model.safetensors: cannot write: {os.strerror(code)}" in err


def test_a_path_that_cannot_be_made_is_a_message_not_a_traceback(capsys):
    """`compile.py --out-dir /proc/nope` (a folder that cannot be made there) ended in a FileNotFoundError
    traceback; it is one line naming the path, exit code 2."""
    from gdrt_core.cli import report_errors

    def make():
        os.makedirs("/proc/gdrt-nope/x")

    assert report_errors("compile.py", make) == 2
    err = capsys.readouterr().err
    assert "compile.py: error: /proc/gdrt-nope" in err and "No such file or directory" in err
    assert "Traceback" not in err


def test_other_os_errors_are_not_relabelled():
    from gdrt_core.errors import filesystem_error

    e = OSError(errno.EIO, "I/O error", "/x")
    assert filesystem_error(e) is e


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent_is_a_message(tmp_path):
    from gdrt_core.artifacts import atomic_output_dir

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(GdrtError, match="cannot write: Permission denied"), atomic_output_dir(ro / "out"):
            pass
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------ faults: resume and the train lock


def _train_config(tmp_path, *sets):
    from gdrt_core.artifacts import atomic_output_dir
    from gdrt_core.dataset import write_dataset
    from gdrt_core.train import TrainConfig

    if not (tmp_path / "ds").exists():
        with atomic_output_dir(tmp_path / "ds") as tmp:
            write_dataset(tmp, titles={1: "a", 2: "b"}, splits=_splits(), domain="office")
    return load_config(TrainConfig, None, list(sets), dataset=str(tmp_path / "ds"), model="org/model",
                       out=str(tmp_path / "out"))


def _checkpoint_of(config, step: int = 2) -> Path:
    from gdrt_core.config import to_dict
    from gdrt_core.train import CHECKPOINTS, train_inputs
    from gdrt_core.train.resume import run_fingerprint, seal_checkpoint

    ckpt = Path(config.out) / CHECKPOINTS / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    seal_checkpoint(ckpt, step=step, run=run_fingerprint(to_dict(config), train_inputs(config)))
    return ckpt


@pytest.mark.parametrize("changed, named", [
    (["lr=0.002"], "config lr: 0.0001 -> 0.002"),
    (["objective=gdrt", "groups=g"], "config objective: 'sft' -> 'gdrt'"),
    (["max_steps=9"], "config max_steps: None -> 9"),
])
def test_resume_refuses_checkpoints_of_other_settings(tmp_path, changed, named):
    from gdrt_core.train import run

    ckpt = _checkpoint_of(_train_config(tmp_path))
    before = sorted(p.name for p in ckpt.iterdir())
    with pytest.raises(GdrtError) as e:
        run(_train_config(tmp_path, *changed))
    assert "checkpoint-2 was written by a training run with other settings or inputs" in str(e.value)
    assert named in str(e.value)
    assert sorted(p.name for p in ckpt.iterdir()) == before  # nothing touched


def test_resume_refuses_checkpoints_of_another_dataset(tmp_path):
    from gdrt_core.train import run
    from gdrt_core.train.resume import check_same_run

    config = _train_config(tmp_path)
    ds = tmp_path / "ds"
    _checkpoint_of(config)
    (ds / "manifest.json").write_text((ds / "manifest.json").read_text().replace('"created"', '"created2"'))
    with pytest.raises(GdrtError, match="inputs dataset"):
        run(_train_config(tmp_path))
    marker = Path(config.out) / "checkpoints" / "checkpoint-2" / "gdrt_complete.json"
    info = json.loads(marker.read_text())
    info.pop("run")  # a checkpoint of an older gdrt
    marker.write_text(json.dumps(info))
    with pytest.raises(GdrtError, match="does not record its settings"):
        check_same_run(Path(config.out) / "checkpoints", {"config": {}, "inputs": {}})


def test_settings_that_do_not_change_the_result_may_change_on_resume(tmp_path):
    from gdrt_core.config import to_dict
    from gdrt_core.train import CHECKPOINTS, train_inputs
    from gdrt_core.train.resume import check_same_run, run_fingerprint

    _checkpoint_of(_train_config(tmp_path))
    config = _train_config(tmp_path, "log_every=1", "cpu_threads=2", "keep_checkpoints=5")
    check_same_run(Path(config.out) / CHECKPOINTS, run_fingerprint(to_dict(config), train_inputs(config)))


def test_a_checkpoint_written_before_a_setting_existed_resumes_at_its_default(tmp_path):
    """A checkpoint of an older gdrt does not record `sampling` (added later): resuming it at the default is the
    same run; asking for another value is refused, naming the default, not None."""
    from gdrt_core.train import run
    from gdrt_core.train.resume import MARKER

    config = _train_config(tmp_path)
    _checkpoint_of(config)
    marker = Path(config.out) / "checkpoints" / "checkpoint-2" / MARKER
    info = json.loads(marker.read_text())
    del info["run"]["config"]["sampling"]
    marker.write_text(json.dumps(info))
    with pytest.raises(GdrtError, match="config sampling: 'random' -> 'group_by_length'"):
        run(_train_config(tmp_path, "sampling=group_by_length"))
    from gdrt_core.config import to_dict
    from gdrt_core.train import CHECKPOINTS, TrainConfig, train_inputs
    from gdrt_core.train.resume import check_same_run, run_fingerprint

    check_same_run(Path(config.out) / CHECKPOINTS, run_fingerprint(to_dict(config), train_inputs(config)),
                   defaults=to_dict(TrainConfig(dataset="", model="", out="")))


def test_a_second_train_on_the_same_out_is_refused(tmp_path):
    from gdrt_core.artifacts import exclusive
    from gdrt_core.train import run

    config = _train_config(tmp_path)
    with exclusive(config.out, "gdrt train"):
        with pytest.raises(GdrtError, match="another `gdrt train` is writing this output right now"):
            run(config)
    assert not Path(config.out).exists()


def test_unsealed_checkpoints_are_removed_after_a_write_error(tmp_path):
    from gdrt_core.train.resume import MARKER, remove_unsealed

    work = tmp_path / "checkpoints"
    for step, sealed in ((2, True), (4, False)):
        (work / f"checkpoint-{step}").mkdir(parents=True)
        if sealed:
            (work / f"checkpoint-{step}" / MARKER).write_text("{}")
    remove_unsealed(work)
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-2"]
