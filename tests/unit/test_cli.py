"""The CLI: one subcommand per stage of the registry, every stage's --help lists its settings, the run
context comes from explicit flags; errors become exit code 2. The `gdrt` console script adds the
orchestration commands (pipelines/cli.py)."""

import argparse
import os

import pytest

from gdrt_core.cli import build_parser, main, run_context, settings_help
from gdrt_core.config import SetText, from_dict, load_config, parse_override, parse_yaml, set_value
from gdrt_core.errors import GdrtError
from gdrt_core.stages import STAGES
from gdrt_core.train import TrainConfig


@pytest.mark.parametrize("stage", ["curate", "init-model", "train", "group", "attribute", "evaluate"])
def test_help_lists_every_setting(stage, capsys):
    with pytest.raises(SystemExit) as e:
        main([stage, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "settings (in --config FILE.yaml, or --set key=value):" in out
    assert "out (required)" in out or "out =" in out


def test_settings_help_only_for_stages():
    assert settings_help("recommend") == "" and "tau = 1.0" in settings_help("train")


def test_bad_input_is_exit_code_2(tmp_path, capsys):
    assert main(["evaluate", "--dataset", str(tmp_path / "missing"), "--model", "m", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "gdrt evaluate: error:" in err and "missing" in err
    assert not (tmp_path / "o").exists()


def test_every_subcommand_parses():
    from pipelines import cli as console

    parser = console.build_parser()
    args = parser.parse_args(["run", "--set", "tau=0.5", "--jobs", "2"])
    assert args.overrides == ["tau=0.5"] and args.jobs == 2
    assert parser.parse_args(["sweep", "s.yaml", "--dry-run"]).dry_run
    commands = set(parser._subparsers._group_actions[0].choices)
    assert commands == {*STAGES, "recommend", "compare-attribution", "score-predictions", "compare-predictions", "run", "sweep"}


def test_the_library_cli_has_the_stages_of_the_registry_and_no_orchestration():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert commands == {*STAGES, "recommend", "compare-attribution", "score-predictions", "compare-predictions"}


def test_console_script_points_at_the_orchestration_entry():
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["gdrt"] == "pipelines.cli:main"


def test_run_context_comes_from_explicit_flags(monkeypatch):
    monkeypatch.delenv("GDRT_TRACKING", raising=False)
    args = build_parser().parse_args(["evaluate", "--dataset", "d", "--model", "m", "--out", "o",
                                      "--parent-run-id", "p1", "--run-name", "evaluate sft"])
    context = run_context(args)
    assert (context.parent_run_id, context.run_name, context.enabled) == ("p1", "evaluate sft", True)
    assert run_context(argparse.Namespace(**{**vars(args), "no_tracking": True})).enabled is False
    # and back: a context as the flags of a stage run in another process
    again = run_context(build_parser().parse_args(["evaluate", "--dataset", "d", "--model", "m", "--out", "o",
                                                   *context.args()]))
    assert again == context


def test_the_stage_run_gets_the_context_not_the_environment(monkeypatch):
    """`stage_run` nests under the context's parent run with its run name; GDRT_PARENT_RUN_ID / GDRT_RUN_NAME
    in the environment are not read."""
    from gdrt_core import tracking

    seen = {}

    def fake_start_run(run_name, *, parent_run_id=None, tags=None, experiment=None, enabled=None):
        seen.update(run_name=run_name, parent=parent_run_id, enabled=enabled)
        return tracking.Tracker()

    monkeypatch.setattr(tracking, "start_run", fake_start_run)
    monkeypatch.setenv("GDRT_PARENT_RUN_ID", "from-env")
    monkeypatch.setenv("GDRT_RUN_NAME", "from-env")
    with tracking.stage_run("group", {}, tracking.RunContext("p2", "group sft")):
        pass
    assert seen == {"run_name": "group sft", "parent": "p2", "enabled": seen["enabled"]}
    with tracking.use_context(tracking.RunContext("p3")), tracking.stage_run("train", {}):
        pass  # a stage whose run() takes no context argument: the one it runs under
    assert (seen["run_name"], seen["parent"]) == ("train", "p3")
    with tracking.stage_run("train", {}):
        pass
    assert (seen["run_name"], seen["parent"]) == ("train", None)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_flag_names_a_field_of_the_stage_config(stage):
    """The stage command passes a flag to the config by its dest: a flag naming no field would be ignored."""
    import dataclasses

    from gdrt_core.cli import STAGE_ARGUMENTS

    p = argparse.ArgumentParser(add_help=False)
    STAGE_ARGUMENTS[stage](p)
    flags = {a.dest for a in p._actions}
    fields = {f.name for f in dataclasses.fields(STAGES[stage].config_class())}
    assert flags and flags <= fields, f"{stage}: flags naming no config field: {sorted(flags - fields)}"


def test_flags_become_the_config_and_the_summary_line_is_printed(monkeypatch, capsys, tmp_path):
    """--config < --set < flags; the stage's run gets the config under the flags' run context, and the
    command prints the stage's summary line."""
    from gdrt_core import tracking

    seen = {}

    def fake_run(config):
        seen.update(config=config, context=tracking.current_context())
        return {"n_examples": 3, "hr@10": 0.5, "ndcg@10": 0.25, "mgu@10": 0.125}

    monkeypatch.setattr("gdrt_core.evaluate.run", fake_run)
    config = tmp_path / "eval.yaml"
    config.write_text("num_beams: 5\nlimit: 7\nbatch_size: 3\n")
    assert main(["evaluate", "--dataset", "d", "--model", "m", "--out", "o", "--config", str(config),
                 "--set", "limit=8", "--set", "batch_size=4", "--num-beams", "6", "--split", "test",
                 "--run-name", "evaluate sft", "--no-tracking"]) == 0
    c = seen["config"]
    assert (c.dataset, c.model, c.out, c.split, c.num_beams, c.limit, c.batch_size) == ("d", "m", "o", "test", 6, 8, 4)
    assert seen["context"].run_name == "evaluate sft" and not seen["context"].enabled
    assert capsys.readouterr().out == ("evaluate test: 3 examples, HR@10 0.5000, NDCG@10 0.2500, MGU@10 0.1250 "
                                       "-> o\n")


def test_train_relaunched_prints_nothing(monkeypatch, capsys):
    monkeypatch.setattr("gdrt_core.train.run", lambda config: None)
    assert main(["train", "--dataset", "d", "--model", "m", "--out", "o"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(("given", "where"), [(["--seed", "1"], "--seed"), (["--size", "tiny"], "--size"),
                                              (["--set", "size=tiny"], "--set size=tiny"),
                                              (["--set", "vocab_size=600"], "--set vocab_size=600"),
                                              (["--config", "CONFIG"], "CONFIG")])
def test_init_model_embedded_settings_with_pretrained_are_an_error(capsys, monkeypatch, tmp_path, given, where):
    """A setting of the embedded model (size, seed, vocab_size, prompt_examples) has no effect with a pretrained
    backbone: from a flag, --set or --config alike it is refused, naming the setting (it was dropped silently
    unless given as --size / --seed)."""
    monkeypatch.setattr("gdrt_core.embedded.run", lambda config: pytest.fail("ran"))
    config = tmp_path / "m.yaml"
    config.write_text("seed: 3\n")
    given = [str(config) if g == "CONFIG" else g for g in given]
    where = str(config) if where == "CONFIG" else where
    name = {"--seed": "seed", "--size": "size"}.get(where, "seed" if where == str(config) else where[6:].split("=")[0])
    for backbone in (["--pretrained", "smollm2-135m"], ["--gguf", "m.gguf"]):
        assert main(["init-model", *backbone, *given, "--out", "o", "--no-tracking"]) == 2
        err = capsys.readouterr().err
        assert (f"gdrt init-model: error: {where}: setting {name} has no effect with {backbone[0][2:]}, given by "
                f"{backbone[0]}") in err and f"Drop {name}, or drop {backbone[0][2:]}" in err


def test_stage_modules_have_no_argparse():
    """The stage modules are `run(config)` plus `summary_line(config, result)`; argument parsing is cli.py's."""
    import importlib
    import inspect

    for stage in STAGES.values():
        module = importlib.import_module(stage.module)
        assert callable(module.summary_line) and not hasattr(module, "cli")
        assert "argparse" not in inspect.getsource(module), stage.module


def test_a_path_of_the_wrong_kind_is_a_clear_error(tmp_path, capsys):
    """A file given as an output directory, or a directory as a config file: one paragraph naming the path
    and exit code 2, not a traceback."""
    from pipelines.cli import main as gdrt

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert gdrt(["sweep", str(tmp_path), "--dry-run"]) == 2
    assert f"{tmp_path}: Is a directory" in capsys.readouterr().err
    assert gdrt(["run", "--out", str(a_file), "--set", f"source={tmp_path}"]) == 2
    assert f"{a_file}: File exists" in capsys.readouterr().err
    assert main(["evaluate", "--dataset", str(tmp_path), "--model", "baseline:most-popular",
                 "--out", str(tmp_path / "e"), "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Is a directory" in err and "Traceback" not in err


def test_compile_into_a_file_is_a_clear_error(tmp_path, capsys):
    """`python pipelines/compile.py --out-dir FILE`: the CLI's one-paragraph error naming the path."""
    from pipelines.compile import main as compile_main

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert compile_main(["--out-dir", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert f"pipelines/compile.py: error: {a_file}: File exists" in err and "Traceback" not in err
    assert a_file.read_text() == "x"


def test_compile_with_a_directory_in_the_way_writes_neither_pipeline(tmp_path, capsys):
    """A directory where the second YAML goes: a one-paragraph error naming the path, and the pair is all or
    nothing: the first YAML was left compiled alone; now neither is written, an earlier first YAML keeps its
    content, and no temporary file (`.gdrt_pipeline*.tmp.yaml`, `*.old.yaml`) is left behind."""
    from pipelines.compile import main as compile_main

    (tmp_path / "gdrt_pipeline_multinode.yaml").mkdir()
    assert compile_main(["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"pipelines/compile.py: error: {tmp_path / 'gdrt_pipeline_multinode.yaml'}: Is a directory" in err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["gdrt_pipeline_multinode.yaml"]
    (tmp_path / "gdrt_pipeline.yaml").write_text("earlier")
    assert compile_main(["--out-dir", str(tmp_path)]) == 2
    assert sorted(os.listdir(tmp_path)) == ["gdrt_pipeline.yaml", "gdrt_pipeline_multinode.yaml"]
    assert (tmp_path / "gdrt_pipeline.yaml").read_text() == "earlier"


@pytest.mark.parametrize("image", ["", "  ", "registry.example.com/gdrt :1"])
def test_compile_refuses_a_blank_image_naming_the_variable(tmp_path, capsys, monkeypatch, image):
    """GDRT_IMAGE='' compiled a pipeline whose steps had an empty container image; now it is refused, naming
    the variable, before anything is written."""
    from components.image import image_from_env
    from pipelines.compile import main as compile_main

    monkeypatch.setenv("GDRT_IMAGE", image)
    assert compile_main(["--out-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert f"pipelines/compile.py: error: GDRT_IMAGE: GDRT_IMAGE={image!r}" in err and "unset it" in err
    assert not (tmp_path / "c").exists()
    assert image_from_env({}) == "gdrt/gdrt:0.1.0"
    assert image_from_env({"GDRT_IMAGE": "r.example.com/gdrt:2"}) == "r.example.com/gdrt:2"


# every option of `gdrt` and pipelines/compile.py that takes a path (dest names)
PATH_OPTIONS = {"config", "source", "meta", "out", "dataset", "model", "groups", "reference", "gguf", "input",
                "sweep", "out_dir"}


def test_every_path_option_expands_home(tmp_path, monkeypatch, capsys):
    """`gdrt run --out "~/r"`, `gdrt recommend --out "~/x.parquet"` and `compile.py --out-dir "~/c"` created a
    directory named `~`: every path option of every command now expands `~` (one argparse type, user_path)."""
    from gdrt_core.artifacts import atomic_output_dir
    from gdrt_core.cli import user_path
    from gdrt_core.dataset import write_dataset
    from pipelines.cli import build_parser as gdrt_parser
    from pipelines.compile import build_parser as compile_parser

    subcommands = next(a for a in gdrt_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    parsers = {f"gdrt {name}": p for name, p in subcommands.items()} | {"compile.py": compile_parser()}
    seen = set()
    for name, parser in parsers.items():
        for action in parser._actions:
            if action.dest in PATH_OPTIONS:
                assert action.type is user_path, f"{name} {action.option_strings or action.dest}"
                seen.add(action.dest)
    assert seen == PATH_OPTIONS
    monkeypatch.setenv("HOME", str(tmp_path))
    assert gdrt_parser().parse_args(["run", "--out", "~/r", "--config", "~/c.yaml"]).out == str(tmp_path / "r")
    assert compile_parser().parse_args(["--out-dir", "~/c"]).out_dir == str(tmp_path / "c")
    assert gdrt_parser().parse_args(["sweep", "~/s.yaml"]).sweep == str(tmp_path / "s.yaml")
    monkeypatch.chdir(tmp_path)
    train = {"example_id": [0], "user_id": ["u"], "history": [[1]], "target": [2], "timestamp": [1]}
    with atomic_output_dir(tmp_path / "ds") as tmp:
        write_dataset(tmp, titles={1: "Desk Lamp", 2: "Stapler"}, splits={"train": train}, domain="office")
    assert main(["recommend", "--model", "baseline:most-popular", "--dataset", "~/ds", "--history", "Desk Lamp",
                 "--k", "1", "--out", "~/recs.parquet"]) == 0
    assert f"wrote 1 ranking to {tmp_path / 'recs.parquet'}" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["ds", "recs.parquet"]


def test_atomic_file_removes_its_temporary_file_on_any_failure(tmp_path):
    from gdrt_core.artifacts import atomic_file, write_json_atomic

    with pytest.raises(RuntimeError), atomic_file(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    (tmp_path / "b.json").mkdir()
    with pytest.raises(IsADirectoryError):
        write_json_atomic(tmp_path / "b.json", {"x": 1})
    assert sorted(os.listdir(tmp_path)) == ["b.json"]
    write_json_atomic(tmp_path / "c.json", {"x": 1})
    assert (tmp_path / "c.json").read_text() == '{\n  "x": 1\n}\n'


def test_required_settings_can_come_from_the_config_or_set(tmp_path, monkeypatch):
    """What `--help` says: a required setting is a flag, a key of --config FILE.yaml, or a --set."""
    seen = {}
    monkeypatch.setattr("gdrt_core.train.run", lambda config: seen.update(config=config))
    config = tmp_path / "train.yaml"
    config.write_text("dataset: d\nmodel: m\n")
    assert main(["train", "--config", str(config), "--set", "out=o", "--no-tracking"]) == 0
    assert (seen["config"].dataset, seen["config"].model, seen["config"].out) == ("d", "m", "o")
    assert main(["train", "--set", "dataset=d2", "--model", "m2", "--out", "o2", "--no-tracking"]) == 0
    assert (seen["config"].dataset, seen["config"].model, seen["config"].out) == ("d2", "m2", "o2")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_missing_required_setting_names_it_and_the_three_ways_to_give_it(stage, capsys):
    from gdrt_core.config import required_settings

    required = required_settings(STAGES[stage].config_class())
    assert main([stage, "--no-tracking"]) == 2
    err = capsys.readouterr().err
    assert f"missing required setting{'s' if len(required) > 1 else ''} {', '.join(required)}" in err
    for name in required:
        assert f"--{name.replace('_', '-')}" in err
    assert "--config FILE.yaml" in err and "--set" in err and "Traceback" not in err


def test_one_missing_setting_is_spelled_out_with_the_config_file_it_was_looked_for_in(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("dataset: d\nmodel: m\n")
    assert main(["train", "--config", str(config), "--no-tracking"]) == 2
    assert (f"gdrt train: error: {config}: missing required setting out (give it as --out VALUE, as `out: VALUE` "
            "in --config FILE.yaml or as --set out=VALUE)\n") == capsys.readouterr().err


@pytest.mark.parametrize("text, found", [("", "nothing (it is empty)"), ("# a comment\n", "nothing (it is empty)"),
                                         ("- a\n- b\n", "a list"), ("42\n", "an int")])
def test_an_empty_or_non_mapping_config_is_refused_by_run_sweep_and_stages(tmp_path, capsys, monkeypatch, text,
                                                                         found):
    """`gdrt run`, `gdrt sweep` and a stage's --config refuse such a file alike (one reader, one wording)."""
    from pipelines.cli import main as gdrt

    monkeypatch.setenv("GDRT_TRACKING", "off")
    config = tmp_path / "c.yaml"
    config.write_text(text)
    expected = f"must hold a mapping of settings (key: value lines), not {found}"
    assert gdrt(["run", "--config", str(config), "--out", str(tmp_path / "r"),
                 "--set", f"source={tmp_path / 'no-data'}"]) == 2
    err = capsys.readouterr().err
    assert f"{config}: the pipeline config {expected}" in err
    assert gdrt(["sweep", str(config), "--dry-run"]) == 2
    assert f"{config}: the sweep file {expected}" in capsys.readouterr().err
    assert main(["evaluate", "--config", str(config), "--dataset", "d", "--model", "m", "--out", "o"]) == 2
    assert f"{config}: the config file {expected}" in capsys.readouterr().err
    (tmp_path / "s.yaml").write_text("config: c.yaml\nvariants: {a: {}}\n")  # the sweep's pipeline config
    assert gdrt(["sweep", str(tmp_path / "s.yaml"), "--dry-run"]) == 2
    assert f"{config}: the pipeline config {expected}" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["c.yaml", "s.yaml"]


def test_a_config_file_that_is_not_utf8_is_refused_naming_its_line(tmp_path, capsys, monkeypatch):
    """A Latin-1 config (`run_name: café`) was a UnicodeDecodeError traceback; now every reader refuses it
    (`config.read_yaml`), naming the file and the line of the first byte that is not UTF-8."""
    from pipelines.cli import main as gdrt

    monkeypatch.setenv("GDRT_TRACKING", "off")
    config = tmp_path / "c.yaml"
    config.write_bytes("tau: 1.0\nrun_name: café\n".encode("latin-1"))
    expected = f"{config}, line 2: the pipeline config is not UTF-8 text (byte 0xe9) (save it as UTF-8"
    assert gdrt(["run", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert main(["evaluate", "--config", str(config), "--dataset", "d", "--model", "m", "--out", "o"]) == 2
    assert f"{config}, line 2: the config file is not UTF-8 text" in capsys.readouterr().err
    (tmp_path / "s.yaml").write_bytes(b"config: c.yaml\n# r\xe9sum\xe9\nvariants: {a: {}}\n")
    assert gdrt(["sweep", str(tmp_path / "s.yaml"), "--dry-run"]) == 2
    assert f"{tmp_path / 's.yaml'}, line 2: the sweep file is not UTF-8 text" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["c.yaml", "s.yaml"]


def test_a_key_given_twice_in_a_config_file_is_refused_naming_both_lines(tmp_path, capsys, monkeypatch):
    """Two `tau:` lines, two `limit:` lines in a stage's settings or two variants of one name were read as the
    last one, silently; every reader (`config.parse_yaml`) refuses a key given twice in one mapping, naming
    the file, the key and both lines. A key brought in by a YAML merge (`<<: *base`) may still be overridden."""
    from pipelines.cli import main as gdrt

    monkeypatch.setenv("GDRT_TRACKING", "off")
    config = tmp_path / "c.yaml"
    config.write_text("tau: 1.0\nnum_groups: 4\ntau: 2.0\n", encoding="utf-8")
    assert gdrt(["run", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert (f"{config}, line 3: the pipeline config gives the key 'tau' twice, on line 1 and line 3 (YAML would "
            "keep only the last value, silently") in err and "Traceback" not in err
    config.write_text("eval_settings:\n  limit: 5\n  beams: 2\n  limit: 6\n", encoding="utf-8")
    assert gdrt(["run", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    assert f"{config}, line 4: the pipeline config gives the key 'limit' twice, on line 2 and line 4" in \
        capsys.readouterr().err
    assert main(["evaluate", "--config", str(config), "--dataset", "d", "--model", "m", "--out", "o"]) == 2
    assert f"{config}, line 4: the config file gives the key 'limit' twice" in capsys.readouterr().err
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("config: c.yaml\nvariants:\n  a: {}\n  b: {}\n  a: {set: {tau: 2}}\n", encoding="utf-8")
    assert gdrt(["sweep", str(sweep_file), "--dry-run"]) == 2
    assert f"{sweep_file}, line 5: the sweep file gives the key 'a' twice, on line 3 and line 5" in \
        capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["c.yaml", "s.yaml"]
    with pytest.raises(GdrtError, match="--set eval_settings=.*: the value of eval_settings is not a valid YAML list "
                                        "or mapping \\(found the key 'limit' twice"):
        from pipelines.params import load_params

        load_params(None, ["eval_settings={limit: 5, limit: 6}"])
    merged = parse_yaml("base: &b {lr: 0.1, epochs: 2}\ntrain_settings:\n  <<: *b\n  lr: 0.2\n")
    assert merged["train_settings"] == {"lr": 0.2, "epochs": 2}


@pytest.mark.parametrize("text, key, where", [
    ("1: 2\n", "1", ""),
    ("true: x\n", "True", ""),
    ("train_settings:\n  null: 3\n", "null", " under train_settings"),
])
def test_a_config_key_that_is_not_text_is_refused(tmp_path, capsys, monkeypatch, text, key, where):
    """`1: 2` or `true: x` in a config file was a TypeError traceback from the stage and the pipeline readers.
    Setting names are checked where they are read as such (`config.from_dict`, `check_pipeline_params`), so
    a stage's config with a pipeline section (`train_settings:`) is refused first as an unknown setting."""
    from pipelines.cli import main as gdrt

    monkeypatch.setenv("GDRT_TRACKING", "off")
    config = tmp_path / "k.yaml"
    config.write_text(text, encoding="utf-8")
    assert main(["curate", "--config", str(config), "--source", "s", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    expected = ("unknown setting(s) train_settings" if where else
                f"{config}: the config has the key {key}, which YAML reads as")
    assert expected in err and "Traceback" not in err
    assert gdrt(["run", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{config}: the pipeline config has the key {key}{where}, which YAML reads as" in err
    assert "Traceback" not in err
    # the hint quotes what may have been typed, not YAML's reading ("None": was never in the file)
    said = {"null": ('no value (from an empty key, null or ~ unquoted)', '"null":'),
            "True": ('a bool (from on, yes or true unquoted)', '"on":, "yes": or "true":')}.get(key)
    assert said is None or (said[0] in err and said[1] in err and '"None"' not in err and '"True"' not in err)
    assert sorted(os.listdir(tmp_path)) == ["k.yaml"]


def test_set_values_are_yaml(monkeypatch):
    """`--set` reads its value as YAML (lists, numbers, booleans), keeps plain text as text, and refuses a
    broken list naming the --set."""
    seen = {}
    monkeypatch.setattr("gdrt_core.train.run", lambda config: seen.update(config=config))
    assert main(["train", "--dataset", "d", "--model", "org/name", "--out", "o", "--no-tracking",
                 "--set", "lora_target_modules=[q_proj, v_proj]", "--set", "lr=0.5", "--set", "lora=false"]) == 0
    c = seen["config"]
    assert (c.lora_target_modules, c.lr, c.lora, c.model) == (["q_proj", "v_proj"], 0.5, False, "org/name")
    for item, tp, value in [("lora_target_modules=q_proj,k_proj", list[str], "q_proj,k_proj"),
                            ("model=models:/gdrt-office@champion", str, "models:/gdrt-office@champion"),
                            ("device=cuda:0", str, "cuda:0"), ("limit=", int | None, ""),
                            ("limit=null", int | None, None), ("neutral_token=*", list[str], "*")]:
        assert set_value(parse_override(item)[1], tp, "key", "--set") == value, item  # `*`: not YAML, the text
    with pytest.raises(GdrtError, match=r"--set lora_target_modules=\[q_proj: the value of lora_target_modules is "
                                        "not a valid YAML"):
        load_config(TrainConfig, None, ["dataset=d", "model=m", "out=o", "lora_target_modules=[q_proj"])


EVAL_METRICS = {"n_examples": 1, "hr@10": 0.0, "ndcg@10": 0.0, "mgu@10": 0.0}  # what a fake evaluate run returns


@pytest.mark.parametrize("typed", ["null", "010", "1_000", "1.10", "on", "/tmp/run #2", "&a b", "!!binary aGVsbG8=",
                                   "[x"])
def test_set_values_of_text_settings_are_kept_as_typed(monkeypatch, typed):
    """A --set value for a text setting is the text typed: YAML would make `null` None (a directory named
    `None`), `010` 8, `1_000` 1000, `1.10` 1.1, `on` True, drop `#2` as a comment, `&a` as an anchor and
    decode `!!binary` (bytes). A Literal of strings is text too."""
    from typing import Literal

    seen = {}
    monkeypatch.setattr("gdrt_core.evaluate.run", lambda config: seen.update(config=config) or EVAL_METRICS)
    assert main(["evaluate", "--dataset", "d", "--model", "m", "--no-tracking", "--set", f"out={typed}"]) == 0
    assert seen["config"].out == typed
    assert set_value(SetText(typed), Literal["010", "on"] | None, "k", "--set") == typed


@pytest.mark.parametrize(("typed", "meant"), [('"gguf:"', "gguf:"), ("'a b #2'", "a b #2"), ('"010"', "010"),
                                             ('"unclosed', '"unclosed'), ("'x'y'", "'x'y'")])
def test_a_quoted_text_value_is_its_content(typed, meant):
    """Quotes remain the way to write text YAML-style (`--set 'model="gguf:"'`): a well-formed quoted YAML
    string gives its content; anything else stays as typed."""
    assert set_value(SetText(typed), str, "k", "--set") == meant


def test_pipeline_set_values_follow_the_parameter_type():
    """gdrt run / sweep: a text parameter (run_name, a str default) or a text stage setting
    (train_settings.out) keeps its text; numbers and mappings are still YAML."""
    from pipelines.params import load_params

    params = load_params(None, ["run_name=010", "tau=0.5", "train_settings.out=on", "train_settings.lr=0.5",
                                "eval_settings={limit: 3}"])
    assert (params["run_name"], params["tau"], params["eval_settings"]) == ("010", 0.5, {"limit": 3})
    assert (params["train_settings"]["out"], params["train_settings"]["lr"]) == ("on", 0.5)


@pytest.mark.parametrize("item", ["max_train=true", "batch_size=false"])
def test_a_boolean_is_not_a_number(monkeypatch, capsys, item):
    """int(True) is 1: `--set max_train=true` (an int | None setting) and `batch_size: false` in a config
    file are errors naming the setting."""
    monkeypatch.setattr("gdrt_core.train.run", lambda config: pytest.fail("ran"))
    assert main(["train", "--dataset", "d", "--model", "m", "--out", "o", "--no-tracking", "--set", item]) == 2
    assert f"--set {item}: {item.split('=')[0]}: expected int, got the boolean" in capsys.readouterr().err
    with pytest.raises(GdrtError, match="f.yaml: batch_size: expected int, got the boolean False"):
        from_dict(TrainConfig, {"dataset": "d", "model": "m", "out": "o", "batch_size": False}, source="f.yaml")


@pytest.mark.parametrize(("line", "found"), [("out: on", "True"), ("out: yes", "True"), ("out: off", "False"),
                                             ("out: no", "False"), ("split: no", "False")])
def test_a_yaml_boolean_for_a_text_setting_in_a_config_file_is_refused(monkeypatch, capsys, tmp_path, line, found):
    """`out: on` in a config file was the directory "True" (YAML reads on/off/yes/no as booleans); the
    error names the file and the setting and says to quote the value. Quoted, it is the text."""
    monkeypatch.setattr("gdrt_core.evaluate.run", lambda config: pytest.fail("ran"))
    config = tmp_path / "c.yaml"
    config.write_text(f"{line}\n")
    key = line.split(":")[0]
    args = ["evaluate", "--config", str(config), "--dataset", "d", "--model", "m", "--no-tracking"]
    assert main([*args, *(["--out", "o"] if key != "out" else [])]) == 2
    err = capsys.readouterr().err
    assert f"{config}: {key}: got the YAML boolean {found} for a text setting" in err and "quote the value" in err
    from pipelines.params import check_pipeline_params

    with pytest.raises(GdrtError, match=f"cfg.yaml: train_settings .*: optim: got the YAML boolean {found}"):
        check_pipeline_params({"train_settings": {"optim": found == "True"}}, "cfg.yaml")  # a stage setting too


@pytest.mark.parametrize(("line", "found"), [("out: 0x10", "16"), ("out: 1_000", "1000"), ("out: 1.10", "1.1"),
                                             ("model: 2024", "2024"), ("split: 0", "0")])
def test_a_yaml_number_for_a_text_setting_in_a_config_file_is_refused(monkeypatch, capsys, tmp_path, line, found):
    """`out: 010` in a config file was the directory "8" (YAML reads 010 as an octal number: now refused as
    such, test_an_integer_that_yaml_reads_otherwise_than_written_is_refused); a number given
    to a text setting is refused naming the file and the setting, and saying to quote the value, in a stage's
    config, in a pipeline config's stage settings and in a sweep file."""
    monkeypatch.setattr("gdrt_core.evaluate.run", lambda config: pytest.fail("ran"))
    config = tmp_path / "c.yaml"
    config.write_text(f"{line}\n")
    key = line.split(":")[0]
    flags = [x for k in ("dataset", "model", "out") if k != key for x in (f"--{k}", k[0])]
    assert main(["evaluate", "--config", str(config), "--no-tracking", *flags]) == 2
    err = capsys.readouterr().err
    assert f"{config}: {key}: got the YAML number {found} for a text setting" in err and "quote the value" in err
    from pipelines.params import check_pipeline_params
    from pipelines.sweep import VariantSpec

    with pytest.raises(GdrtError, match=f"cfg.yaml: train_settings .*: optim: got the YAML number {found}"):
        check_pipeline_params({"train_settings": {"optim": float(found) if "." in found else int(found)}}, "cfg.yaml")
    with pytest.raises(GdrtError, match="s.yaml: variant a: pool: got the YAML number 1 for a text setting"):
        from_dict(VariantSpec, {"pool": 1}, source="s.yaml: variant a")


def test_a_quoted_or_boolean_setting_keeps_its_meaning(monkeypatch, tmp_path):
    """Quoted, `out: "on"` is the text; an empty `out:` has no value (not the text "None"); bf16 and
    select_best take YAML booleans (their type says so)."""
    seen = {}
    monkeypatch.setattr("gdrt_core.evaluate.run", lambda config: seen.update(config=config) or EVAL_METRICS)
    config = tmp_path / "c.yaml"
    config.write_text('out: "on"\n')
    assert main(["evaluate", "--config", str(config), "--dataset", "d", "--model", "m", "--no-tracking"]) == 0
    assert seen["config"].out == "on"
    with pytest.raises(GdrtError, match="f.yaml: out: has no value"):
        from_dict(TrainConfig, {"dataset": "d", "model": "m", "out": None}, source="f.yaml")
    c = from_dict(TrainConfig, {"dataset": "d", "model": "m", "out": "o", "bf16": False, "select_best": False})
    assert (c.bf16, c.select_best) == ("false", "none")


@pytest.mark.parametrize("line", [["--out", ""], ["--out", "  "], ["--set", "out="], ["--dataset", ""],
                                  ["--set", "model= "]])
def test_an_empty_path_setting_is_refused(monkeypatch, capsys, tmp_path, line):
    """An empty path is the current directory: `--out ""` replaced the working directory with the artifact."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("gdrt_core.evaluate.run", lambda config: pytest.fail("ran"))
    key = line[1].split("=")[0] if line[0] == "--set" else line[0][2:]
    flags = [x for k in ("dataset", "model", "out") if k != key for x in (f"--{k}", k[0])]
    assert main(["evaluate", *flags, *line, "--no-tracking"]) == 2
    err = capsys.readouterr().err
    assert f"setting {key}=" in err and "an empty path is the current directory" in err


def test_the_output_guard_refuses_an_empty_path(tmp_path, monkeypatch):
    from gdrt_core.artifacts import check_output

    monkeypatch.chdir(tmp_path)
    for out in ("", "  "):
        with pytest.raises(GdrtError, match="--out is empty: expected the directory to write an eval artifact to"):
            check_output(out, "eval")


@pytest.mark.parametrize("how", ["flag", "set", "config"])
def test_a_path_under_home_is_expanded_however_it_is_given(monkeypatch, tmp_path, how):
    """`~` in a path setting is the home directory, from a flag, --set or --config alike (it created
    `./~/ev2` and said an existing `~/ds` did not exist)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    seen = {}
    monkeypatch.setattr("gdrt_core.evaluate.run", lambda config: seen.update(config=config) or EVAL_METRICS)
    config = tmp_path / "c.yaml"
    config.write_text("dataset: ~/ds\n" if how == "config" else "num_beams: 5\n")
    given = {"flag": ["--dataset", "~/ds"], "set": ["--set", "dataset=~/ds"], "config": []}[how]
    assert main(["evaluate", "--config", str(config), *given, "--model", "m", "--set", "out=~/ev2",
                 "--no-tracking"]) == 0
    assert (seen["config"].dataset, seen["config"].out) == (str(tmp_path / "ds"), str(tmp_path / "ev2"))


def test_an_error_names_where_the_value_came_from(tmp_path, capsys):
    """With --config F.yaml --set limit=-1, the bad limit came from the --set, not from F.yaml; a bad value in
    the file is the file's; a bad flag is the flag's."""
    config = tmp_path / "F.yaml"
    config.write_text("num_beams: 10\n")
    base = ["evaluate", "--config", str(config), "--dataset", "d", "--model", "m", "--out", "o", "--no-tracking"]
    assert main([*base, "--set", "limit=-1"]) == 2
    assert "gdrt evaluate: error: --set limit=-1: setting limit=-1 is invalid" in capsys.readouterr().err
    config.write_text("num_beams: 0\n")
    assert main([*base, "--set", "limit=3"]) == 2
    assert f"error: {config}: setting num_beams=0 is invalid" in capsys.readouterr().err
    config.write_text("{}\n")
    assert main([*base, "--set", "bogus=1"]) == 2
    assert "error: --set bogus=1: unknown setting(s) bogus" in capsys.readouterr().err


def test_the_pipeline_and_sweep_read_set_values_as_the_stages_do(tmp_path):
    from pipelines.params import load_params
    from pipelines.sweep import load_sweep

    sets = ["train_settings.lora_target_modules=[q_proj, v_proj]", "tau=0.5"]
    params = load_params(None, sets)
    assert params["train_settings"]["lora_target_modules"] == ["q_proj", "v_proj"] and params["tau"] == 0.5
    (tmp_path / "cfg.yaml").write_text("source: data/office\n")
    (tmp_path / "s.yaml").write_text("config: cfg.yaml\nvariants: {a: {}}\n")
    _, variants = load_sweep(tmp_path / "s.yaml", sets)
    assert variants["a"].params["train_settings"]["lora_target_modules"] == ["q_proj", "v_proj"]


def test_run_refuses_a_non_empty_directory_that_is_no_earlier_run(tmp_path, capsys, monkeypatch):
    """`gdrt run --out DIR` / `gdrt sweep --out DIR`: a new or empty directory starts, an earlier run's
    (its stages/*.done.json, logs/*.spec.json) resumes, anything else is refused before any work."""
    from pipelines.cli import main as gdrt
    from pipelines.sweep import check_work_dir

    monkeypatch.setenv("GDRT_TRACKING", "off")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert gdrt(["run", "--out", str(out), "--set", f"source={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"{out}: the output directory is not empty (it holds notes.txt)" in err and "Traceback" not in err
    assert gdrt(["sweep", "pipelines/sweeps/office.yaml", "--out", str(out), "--dry-run"]) == 2
    assert "(it holds notes.txt) and is not an earlier run's working directory" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["notes.txt"]
    check_work_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_work_dir(tmp_path / "empty")
    (out / "logs").mkdir()
    with pytest.raises(GdrtError, match="not an earlier run's"):
        check_work_dir(out)  # a logs/ of something else is no marker
    (out / "logs" / "curate-office-0123abcd.spec.json").write_text("{}")
    check_work_dir(out)
    (tmp_path / "done" / "stages").mkdir(parents=True)
    (tmp_path / "done" / "stages" / "curate-office-0123abcd.done.json").write_text("{}")
    check_work_dir(tmp_path / "done")


def test_recommend_names_what_model_accepts(tmp_path, capsys):
    """A path that does not exist is "no model directory"; an unknown `baseline:` lists what --model takes;
    a popularity baseline ranks the --dataset's titles, as the evaluate stage does."""
    from gdrt_core.artifacts import atomic_output_dir
    from gdrt_core.dataset import write_dataset

    for missing in ("/nonexistent/path", "./no-such-model", "../no/such/model"):
        assert main(["recommend", "--model", missing, "--history", "Desk Lamp"]) == 2
        err = capsys.readouterr().err
        assert f"--model: no model directory at {missing}" in err and "models:/NAME@ALIAS" in err
    assert main(["recommend", "--model", "baseline:popular", "--history", "Desk Lamp"]) == 2
    err = capsys.readouterr().err
    assert "unknown popularity baseline 'baseline:popular'" in err
    assert "baseline:most-popular, baseline:most-popular-valid" in err and "a model directory" in err
    assert main(["recommend", "--model", "baseline:most-popular", "--history", "Desk Lamp"]) == 2
    assert "give it with --dataset DIR" in capsys.readouterr().err
    train = {"example_id": [0, 1], "user_id": ["u", "v"], "history": [[1], [3]], "target": [2, 2],
             "timestamp": [1, 2]}
    titles = {1: "Desk Lamp", 2: "Stapler", 3: "Pens"}
    with atomic_output_dir(tmp_path / "ds") as tmp:
        write_dataset(tmp, titles=titles, splits={"train": train}, domain="office")
    assert main(["recommend", "--model", "baseline:most-popular", "--dataset", str(tmp_path / "ds"),
                 "--history", "Desk Lamp", "--k", "2"]) == 0
    # interactions: Stapler 2 (both users), Desk Lamp 1 and Pens 1 (a tie: alphabetical)
    assert capsys.readouterr().out == "  1.    2.0000  Stapler\n  2.    1.0000  Desk Lamp\n"


def test_recommend_history_with_out_writes_the_ranking(tmp_path, capsys):
    """`--history ... --out recs.parquet` printed the ranking and ignored --out; now it also writes the file
    --input writes (a `history` column, `recommendations`, `scores`), atomically."""
    import pyarrow.parquet as pq

    from gdrt_core.artifacts import atomic_output_dir
    from gdrt_core.dataset import write_dataset

    train = {"example_id": [0, 1], "user_id": ["u", "v"], "history": [[1], [3]], "target": [2, 2], "timestamp": [1, 2]}
    with atomic_output_dir(tmp_path / "ds") as tmp:
        write_dataset(tmp, titles={1: "Desk Lamp", 2: "Stapler", 3: "Pens"}, splits={"train": train}, domain="office")
    out = tmp_path / "recs.parquet"
    args = ["recommend", "--model", "baseline:most-popular", "--dataset", str(tmp_path / "ds"), "--k", "2"]
    assert main([*args, "--history", "Desk Lamp", "Pens", "--out", str(out)]) == 0
    assert capsys.readouterr().out == ("  1.    2.0000  Stapler\n  2.    1.0000  Desk Lamp\n"
                                       f"wrote 1 ranking to {out}\n")
    assert pq.read_table(out).to_pylist() == [{"history": ["Desk Lamp", "Pens"],
                                               "recommendations": ["Stapler", "Desk Lamp"], "scores": [2.0, 1.0]}]
    assert sorted(os.listdir(tmp_path)) == ["ds", "recs.parquet"]
    assert main([*args, "--history", "Desk Lamp", "--out", str(tmp_path / "ds")]) == 2
    assert "the output is an input (the dataset)" in capsys.readouterr().err


def test_recommend_out_is_parquet_or_csv_by_its_suffix(tmp_path, capsys):
    """`--out x.csv` wrote parquet bytes into a .csv file: now a .csv is CSV (list columns as JSON text, the
    scores as float32 prints them), and a suffix that is neither .parquet nor .csv is refused before any
    model is loaded, naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gdrt_core.artifacts import atomic_output_dir
    from gdrt_core.dataset import write_dataset
    from gdrt_core.recommend import csv_table

    train = {"example_id": [0, 1], "user_id": ["u", "v"], "history": [[1], [3]], "target": [2, 2], "timestamp": [1, 2]}
    with atomic_output_dir(tmp_path / "ds") as tmp:
        write_dataset(tmp, titles={1: "Desk Lamp", 2: "Stapler", 3: "Pens"}, splits={"train": train}, domain="office")
    pq.write_table(pa.table({"user": ["u"], "history": [["Desk Lamp", 'Pens "blue"']]}), tmp_path / "in.parquet")
    args = ["recommend", "--model", "baseline:most-popular", "--dataset", str(tmp_path / "ds"), "--k", "2",
            "--input", str(tmp_path / "in.parquet")]
    assert main([*args, "--out", str(tmp_path / "recs.CSV")]) == 0
    assert (tmp_path / "recs.CSV").read_text(encoding="utf-8") == (
        '"user","history","recommendations","scores"\n'
        '"u","[""Desk Lamp"", ""Pens \\""blue\\""""]","[""Stapler"", ""Desk Lamp""]","[2.0, 1.0]"\n')
    for bad, found in (("recs.json", "ends in '.json'"), ("recs", "has no suffix")):
        capsys.readouterr()
        assert main([*args, "--out", str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / bad}: the --out file {found}: rankings are written as .parquet or .csv" in err
    assert sorted(os.listdir(tmp_path)) == ["ds", "in.parquet", "recs.CSV"]
    scores = pa.table({"scores": pa.array([[-1.2345600128173828, None], None], pa.list_(pa.float32()))})
    assert csv_table(scores).column("scores").to_pylist() == ["[-1.23456, null]", None]


def test_the_library_cli_has_the_installed_pipeline_commands(tmp_path, capsys):
    """`python -m gdrt_core.cli run|sweep` works where the pipelines package is installed (the `gdrt.commands`
    entry points), without the library importing it: a bad setting is refused before any step runs."""
    from pathlib import Path

    from gdrt_core import cli

    assert {"run", "sweep"} <= set(cli.plugin_commands())
    config = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "quickstart.yaml"
    rc = cli.main(["run", "--config", str(config), "--set", "train_settings.bogus=1", "--out", str(tmp_path / "r")])
    assert rc == 2 and "unknown setting(s) bogus" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


# a command whose action writes into an atomic output directory and waits there to be stopped
STOPPED_IN_A_STAGE = """
import sys, time
from gdrt_core.artifacts import atomic_output_dir

def write_slowly(out):
    with atomic_output_dir(out) as tmp:
        (tmp / "part").write_text("half")
        print("ready", flush=True)
        time.sleep(60)

if sys.argv[1] == "command":  # `gdrt <stage>` / compile.py: main -> report_errors
    from gdrt_core.cli import report_errors
    sys.exit(report_errors("gdrt curate", lambda: write_slowly(sys.argv[2])))
import pipelines.sweep as sweep  # a step of gdrt run / gdrt sweep, as the executor starts it
sweep.run_spec = lambda spec: write_slowly(spec["out"])
sys.exit(sweep._node_main(sys.argv[2]))
"""


@pytest.mark.parametrize("how", ["command", "node"])
def test_sigterm_removes_the_temporary_output_like_ctrl_c(tmp_path, how):
    """SIGTERM (kill, a scheduler's stop, the executor stopping its steps) killed the process where it stood
    and left `.out.tmp-*` behind; Ctrl-C unwound the `atomic_output_dir` blocks. Now SIGTERM unwinds the same
    way in `gdrt` (report_errors) and in a step of gdrt run / gdrt sweep: exit code 143, no temporary left."""
    import json
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "stopped.py"
    script.write_text(STOPPED_IN_A_STAGE)
    work = tmp_path / "work"
    work.mkdir()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out": str(work / "out"), "label": "curate office", "command": "gdrt run"}))
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, str(script), how, str(work / "out") if how == "command" else str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        assert proc.stdout.readline() == "ready\n"
        assert [p.name[:9] for p in work.iterdir()] == [".out.tmp-"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143
    assert err.strip().endswith(("gdrt curate: terminated", "gdrt run: curate office: terminated")), err
    assert list(work.iterdir()) == []


def test_an_integer_that_yaml_reads_otherwise_than_written_is_refused(tmp_path):
    """YAML 1.1 reads `num_groups: 010` as 8 (octal) and `1:30` as 90 (base 60): a config file giving one is
    refused naming the line; `--set num_groups=010` means 10; hexadecimal and `1_000` are meant and pass."""
    from gdrt_core.config import from_dict, parse_override, read_yaml, set_value
    from gdrt_core.stages import STAGES

    config = tmp_path / "g.yaml"
    for text, number, kind in (("010", 8, "octal"), ("1:30", 90, "base 60"), ("-07", -7, "octal")):
        config.write_text(f"splits: [train]\nnum_groups: {text}\n")
        with pytest.raises(GdrtError, match=rf"g.yaml, line 2: the config file has the value '{text}', which YAML "
                                            rf"reads as the number {number} \({kind}\)"):
            read_yaml(config)
    config.write_text("num_groups: 0x4\nlimit: 1_000\n")
    assert read_yaml(config) == {"num_groups": 4, "limit": 1000}
    cls = STAGES["group"].config_class()
    value = set_value(parse_override("num_groups=010")[1], int, "num_groups", "--set")
    assert from_dict(cls, {"dataset": "d", "reference": "m", "out": "o", "num_groups": value}).num_groups == 10


def test_a_closed_stdout_pipe_ends_a_command_quietly():
    """`gdrt ... | head -1`: the reader leaves after one line; the command's next writes raised BrokenPipeError,
    a traceback on stderr. report_errors ends it with 141 (as a shell reports SIGPIPE) and nothing on stderr."""
    import subprocess
    import sys

    code = ("import sys\nfrom gdrt_core.cli import report_errors\n"
            "sys.exit(report_errors('gdrt x', lambda: [print('line', i, flush=True) for i in range(100000)]))")
    proc = subprocess.run(f"{sys.executable} -c \"{code}\" | head -1; echo rc=${{PIPESTATUS[0]}} >&2",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60)
    assert proc.stdout == "line 0\n"
    assert proc.stderr.strip() == "rc=141", proc.stderr


@pytest.mark.parametrize("raised, code, line", [(KeyboardInterrupt(), 130, "gdrt train: interrupted\n"),
                                                 ("terminated", 143, "gdrt train: terminated\n")])
def test_a_stop_is_reported_once_not_by_every_torchrun_worker(monkeypatch, capsys, raised, code, line):
    """Stopping `gdrt train --set deepspeed=zero2` printed "interrupted" once per worker process besides the
    launcher's line: a torchrun worker (TORCHELASTIC_RUN_ID set) ends with the same code and says nothing."""
    from gdrt_core.cli import Terminated, report_errors

    def stop():
        raise Terminated("signal 15") if raised == "terminated" else raised

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert report_errors("gdrt train", stop) == code
    assert capsys.readouterr().err == line
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert report_errors("gdrt train", stop) == code
    assert capsys.readouterr().err == ""
