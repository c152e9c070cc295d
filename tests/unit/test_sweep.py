"""gdrt sweep: the sweep file, the shared-stage plan, pooling, and failure handling (no model is trained)."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import pytest
import yaml

from gdrt_core import results
from gdrt_core.errors import GdrtError
from pipelines import sweep


def _write(tmp_path, variants, **extra):
    config = {"source": "data/office", "tau": 1.0, "num_groups": 4, "train_settings": {"epochs": 1, "seed": 42},
              "model_settings": {"size": "tiny", "seed": 0}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    spec = {"config": "cfg.yaml", "variants": variants}
    spec.update(extra)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return tmp_path / "sweep.yaml"


def test_load_sweep_fills_defaults_and_merges_overrides(tmp_path):
    path = _write(tmp_path, {"a": {"pool": "p"}, "b": {"pool": "p", "set": {"train_settings.seed": 7}},
                             "t": {"set": {"tau": 100, "train_settings.epochs": 2}}, "r": {"reference": "base"}},
                  set={"train_settings.epochs": 3}, experiment="exp")
    experiment, variants = sweep.load_sweep(path, ["num_groups=8"])
    assert experiment == "exp"
    assert list(variants) == ["a", "b", "t", "r"]
    a, b, t, r = variants.values()
    assert a.params["valid_eval_settings"] == {"limit": 500}  # pipeline default filled in
    assert a.params["train_settings"] == {"epochs": 3, "seed": 42} and a.params["num_groups"] == 8
    assert b.params["train_settings"] == {"epochs": 3, "seed": 7} and b.pool == "p"
    assert t.params["train_settings"]["epochs"] == 2 and t.params["tau"] == 100 and t.pool == "t"
    assert r.reference == "base" and a.reference == "sft"
    assert t.overrides == {"train_settings.epochs": 2, "num_groups": 8, "tau": 100}


@pytest.mark.parametrize("variants, extra, message", [
    ({"a": {"set": {"tua": 1}}}, {}, "variant a: unknown pipeline parameter 'tua'"),
    ({"a": {"sett": {}}}, {}, "variant a: unknown setting(s) sett (known: pool, reference, set)"),
    ({"a": {"reference": "sft2"}}, {}, "variant a: setting reference='sft2' is invalid: must be one of sft, base"),
    ({}, {}, "`variants` must map"),
    ({"a": {}}, {"runs": 1}, "unknown setting(s) runs (known: config, experiment, set, variants)"),
    # malformed values: each a message naming the key, never a TypeError
    (["a", "b"], {}, "variants: expected a mapping, got ['a', 'b']"),
    ({"a": [1]}, {}, "variant a: must be a mapping of set / pool / reference, not [1]"),
    ({"a": 5}, {}, "variant a: must be a mapping of set / pool / reference, not 5"),
    ({"a": {"set": [1]}}, {}, "variant a: set: expected a mapping, got [1]"),
    ({"a": {"pool": [1]}}, {}, "variant a: pool: expected a single str value, got [1]"),
    ({"a": {"reference": ["sft"]}}, {}, "variant a: reference: expected a single str value"),
    ({"a": {"set": {1: 2}}}, {}, "the sweep file has the key 1 under variants.a.set, which YAML reads as an int"),
    ({True: {}}, {}, "the sweep file has the key True under variants, which YAML reads as a bool"),
    ({"a": {}}, {"set": [1]}, "set: expected a mapping, got [1]"),
    ({"a": {}}, {"experiment": ["e"]}, "experiment: expected a single str value"),
    ({"a": {}}, {"config": ["cfg.yaml"]}, "config: expected a single str value"),
    # a name too long for the stage directories made from it failed with OSError after two stages had run
    ({"v" * 300: {}}, {}, f"variant name '{'v' * 40}...' has 300 characters, more than 64"),
    ({"a b": {}}, {}, "variant name 'a b' is not a safe file name"),
    ({"../up": {}}, {}, "variant name '../up' is not a safe file name"),
    ({"-a": {}}, {}, "variant name '-a' is not a safe file name"),
])
def test_load_sweep_errors_name_the_problem(tmp_path, variants, extra, message):
    path = _write(tmp_path, variants, **extra)
    with pytest.raises(GdrtError) as e:  # a GdrtError: the CLI prints it as one paragraph, no traceback
        sweep.load_sweep(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_integer_variant_names_in_a_sweep_file_are_text_names(tmp_path):
    """`variants: {42: {}}` (a seed as the name) was refused by the file reader as a key that is not a setting
    name; a variant name is no setting: the sweep reader names the variant "42". A name YAML reads as a
    boolean is still refused, and `42:` beside `"42":` is one name given twice."""
    _write(tmp_path, {"a": {}})
    sweep_file = tmp_path / "ints.yaml"
    sweep_file.write_text("config: cfg.yaml\nvariants:\n  42: {}\n  43: {set: {train_settings.seed: 43}}\n")
    experiment, variants = sweep.load_sweep(sweep_file)
    assert list(variants) == ["42", "43"] and variants["43"].params["train_settings"]["seed"] == 43
    assert variants["42"].pool == "42"
    assert list(sweep.load_sweep(sweep_file, only=["43"])[1]) == ["43"]
    sweep_file.write_text("config: cfg.yaml\nvariants:\n  42: {}\n  \"42\": {}\n")
    with pytest.raises(GdrtError, match=r"ints.yaml: two variants are named '42' \(the keys 42 and '42'\)"):
        sweep.load_sweep(sweep_file)
    sweep_file.write_text("config: cfg.yaml\nvariants:\n  on: {}\n")
    with pytest.raises(GdrtError, match=r"ints.yaml: the sweep file has the key True under variants, which YAML "
                                        r"reads as a bool \(from on, yes or true unquoted\), not a variant name"):
        sweep.load_sweep(sweep_file)
    for written, number in (("010", 8), ("0x1F", 31), ("1_000", 1000), ("1:30", 90), ("1.10", 1.1)):
        # YAML reads these as numbers that print otherwise: the variant would be renamed ("010" -> "8")
        sweep_file.write_text(f"config: cfg.yaml\nvariants:\n  a: {{}}\n  {written}: {{}}\n")
        with pytest.raises(GdrtError, match=rf"ints.yaml, line 4: the sweep file has the key '{written}', which "
                                            rf"YAML reads as the number {number}") as err:
            sweep.load_sweep(sweep_file)
        assert f'"{written}":' in err.value.hint


def test_load_sweep_only_and_missing_file(tmp_path):
    names = ["tau-0.5", "seed_42", "x" * 64]  # a name of safe characters, up to 64 of them
    assert list(sweep.load_sweep(_write(tmp_path, dict.fromkeys(names, {})))[1]) == names
    path = _write(tmp_path, {"a": {}, "b": {}})
    assert list(sweep.load_sweep(path, only=["b"])[1]) == ["b"]
    with pytest.raises(GdrtError, match=r"no variant \['c'\]"):
        sweep.load_sweep(path, only=["c"])
    with pytest.raises(GdrtError, match="sweep file not found"):
        sweep.load_sweep(tmp_path / "nope.yaml")


REPO = Path(__file__).resolve().parents[2]
SHIPPED_SWEEPS = sorted(p.name for p in (REPO / "pipelines" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED_SWEEPS)
def test_every_shipped_sweep_file_loads_and_plans(name):
    """The sweep files in pipelines/sweeps/ (the GPU protocol among them) load, pass every stage's settings
    check (`load_sweep`), and plan a GDRT training of each variant's own, before a GPU is ever spent on them;
    their sources exist (those under ../shared/ where this checkout sits next to its data)."""
    _, variants = sweep.load_sweep(REPO / "pipelines" / "sweeps" / name)
    plan = sweep.plan(variants)
    assert len({role["gdrt"] for role in plan.roles.values()}) == len(variants)
    for v in variants.values():
        if not v.params["source"].startswith("../shared/") or (REPO.parent / "shared" / "data").is_dir():
            assert (REPO / v.params["source"]).is_dir(), f"{name}: variant {v.name}: source {v.params['source']} is missing"


def test_gpu_sweep_runs_shipped_sweep_files():
    """scripts/gpu_sweep.sh's default list names sweep files that exist (a misspelt one would show only on the GPU)."""
    import re

    text = (REPO / "scripts" / "gpu_sweep.sh").read_text(encoding="utf-8")
    listed = re.search(r"\|\| sweeps=\(([^)]*)\)", text).group(1).split()
    assert len(listed) >= 4 and all((REPO / f).is_file() for f in listed), listed


def test_plan_shares_identical_stages_and_wires_the_reference(tmp_path):
    path = _write(tmp_path, {"a": {}, "t": {"set": {"tau": 100}}, "g": {"set": {"num_groups": 2}},
                             "s": {"set": {"train_settings.seed": 7}}, "r": {"reference": "base"}})
    p = sweep.plan(sweep.load_sweep(path)[1])
    roles = p.roles
    # the ablations change GDRT only: one SFT training for a, t, g, r; another for the seed variant
    assert roles["a"]["sft"] == roles["t"]["sft"] == roles["g"]["sft"] == roles["r"]["sft"] != roles["s"]["sft"]
    assert roles["a"]["groups"] == roles["t"]["groups"] != roles["g"]["groups"]
    assert len({roles[v]["gdrt"] for v in roles}) == 5
    assert p.nodes[roles["r"]["groups"]].inputs["reference"] == roles["r"]["base"]
    assert p.nodes[roles["a"]["groups"]].inputs["reference"] == roles["a"]["sft"]
    assert p.nodes[roles["t"]["gdrt"]].args["tau"] == 100
    assert "tau" not in p.nodes[roles["a"]["sft"]].args  # SFT does not depend on the GDRT knobs
    trains = [n for n in p.nodes.values() if n.stage == "train"]
    assert len(trains) == 2 + 5
    order = list(p.nodes)
    for key, node in p.nodes.items():  # inputs come first
        assert all(order.index(dep) < order.index(key) for dep in node.inputs.values())
    assert len({n.dirname for n in p.nodes.values()}) == len(p.nodes)


def test_a_settings_mapping_in_the_common_set_is_not_shared_between_variants(tmp_path):
    """`set: {train_settings: {...}}` for every variant, then `train_settings.seed` per variant: each seed gets
    its own training (the mapping was one object, mutated by every variant, so all seeds trained alike)."""
    path = _write(tmp_path, {"s42": {}, "s43": {"set": {"train_settings.seed": 43}},
                             "s44": {"set": {"train_settings.seed": 44}}},
                  set={"train_settings": {"epochs": 2, "seed": 42}})
    variants = sweep.load_sweep(path)[1]
    assert [v.params["train_settings"]["seed"] for v in variants.values()] == [42, 43, 44]
    roles = sweep.plan(variants).roles
    assert len({roles[v]["sft"] for v in roles}) == 3 and len({roles[v]["gdrt"] for v in roles}) == 3


def test_pooled_rows_count_a_shared_sft_training_once():
    row = lambda v: {"ndcg@10": v}  # noqa: E731
    res = {
        "s42": {"pool": "default", "sft_key": "k42", "sft": row(0.1), "gdrt": row(0.2)},
        "s43": {"pool": "default", "sft_key": "k43", "sft": row(0.3), "gdrt": row(0.4)},
        "tau": {"pool": "tau", "sft_key": "k42", "sft": row(0.1), "gdrt": row(0.5)},
    }
    pooled = sweep.pooled_rows(res)
    assert list(pooled) == ["default SFT", "default GDRT", "tau GDRT"]
    mean, std, n = results.summarize([r["ndcg@10"] for r in pooled["default SFT"]])
    assert n == 2 and mean == pytest.approx(0.2) and std == pytest.approx(math.sqrt(0.02))
    table = results.markdown(pooled, columns=(("NDCG@10", "ndcg@10"),))
    assert "| default SFT | 2 | 0.2000 ± 0.1414 |" in table and "| tau GDRT | 1 | 0.5000 |" in table


def test_summarize_and_train_seconds(tmp_path):
    assert results.summarize([None, "x", True]) == (None, None, 0)
    assert results.summarize([2.0, None]) == (2.0, None, 1)
    (tmp_path / "train_metrics.json").write_text(json.dumps({"train_runtime": 90.0, "epoch": 3.0}))
    assert results.train_s_per_epoch(tmp_path) == 30.0
    assert results.train_s_per_epoch(tmp_path / "missing") is None


def test_failed_stage_skips_its_dependents_and_keeps_the_results(tmp_path, monkeypatch):
    monkeypatch.setenv("GDRT_TRACKING", "off")
    config = {"source": str(tmp_path / "no-such-source"), "model_settings": {"size": "tiny"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"config": "cfg.yaml", "variants": {"a": {}}}))
    stream = io.StringIO()
    with pytest.raises(GdrtError, match="11 stage"):
        sweep.run(str(tmp_path / "sweep.yaml"), tmp_path / "out", stream=stream)
    log = stream.getvalue()
    assert "curate office" in log and "FAILED" in log and log.count("SKIPPED") == 10
    assert "see " in log  # the failing stage's log is named
    assert "gdrt sweep: curate office: error:" in log
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["a"]["sft"] == {"model": "SFT", "aux_share": None}
    assert not list((tmp_path / "out" / "stages").glob("*.done.json"))


def test_plot_leaves_out_a_metric_no_model_has(tmp_path):
    pooled = {"SFT": [{"ndcg@10": 0.03, "mgu@5": 0.1}], "GDRT": [{"ndcg@10": 0.02, "mgu@5": 0.12},
                                                              {"ndcg@10": 0.04, "mgu@5": 0.08}]}
    results.plot(pooled, tmp_path / "p.png")
    from PIL import Image

    with Image.open(tmp_path / "p.png") as image:  # two panels: narrower than the three-panel figure
        two_wide = image.size[0]
    pooled["SFT"][0]["aux_share"] = 0.8
    results.plot(pooled, tmp_path / "q.png")
    with Image.open(tmp_path / "q.png") as image:
        assert image.size[0] > two_wide


def test_a_stage_run_under_another_variant_name_is_found_by_its_key(tmp_path):
    path = _write(tmp_path, {"a": {}, "t": {"set": {"tau": 100}}})
    full = sweep.plan(sweep.load_sweep(path)[1])
    sft = full.nodes[full.roles["a"]["sft"]]
    assert sft.dirname.startswith("train-sft-a-")
    out = tmp_path / "out"
    sweep.node_dir(out, sft).mkdir(parents=True)
    sweep.done_path(out, sft).write_text("{}")
    (out / "stages" / f"train-sft-t-{sft.key[:8]}").mkdir()  # an unfinished run of the same stage, other name

    only_t = sweep.plan(sweep.load_sweep(path, only=["t"])[1])
    t_sft = only_t.nodes[only_t.roles["t"]["sft"]]
    assert t_sft.key == sft.key and t_sft.dirname.startswith("train-sft-t-")
    sweep.adopt_existing(only_t, out)
    assert t_sft.dirname == sft.dirname and sweep.done_path(out, t_sft).is_file()
    gdrt = only_t.nodes[only_t.roles["t"]["gdrt"]]
    assert gdrt.dirname.startswith("train-gdrt-t-")  # nothing earlier: keeps its own name


def test_a_failed_gdrt_run_step_is_labelled_gdrt_run(tmp_path, monkeypatch):
    """The steps of `gdrt run` run in the sweep's executor; their errors said `gdrt sweep: curate: error:`."""
    from pipelines import local_run

    monkeypatch.setenv("GDRT_TRACKING", "off")
    stream = io.StringIO()
    with pytest.raises(GdrtError) as e:
        local_run.run({"source": str(tmp_path / "no-such-source")}, tmp_path / "out", stream=stream)
    assert "the pipeline failed at curate: gdrt run: curate: error:" in str(e.value)
    assert "gdrt sweep" not in str(e.value) + stream.getvalue()


def test_gdrt_run_resumes_only_the_config_a_directory_was_started_with(tmp_path, monkeypatch):
    """`gdrt run --out DIR` with another config resumed silently, mixing two configs' stages in one run
    directory. DIR/params.json records the parameters; a difference is refused before any step, naming DIR
    and each difference. A directory without the record (a sweep's) resumes only with its own stages."""
    from pipelines import local_run

    monkeypatch.setenv("GDRT_TRACKING", "off")
    out = tmp_path / "out"
    params = {"source": str(tmp_path / "no-such-source")}  # curate fails at once: no model is trained
    for _ in range(2):  # the same config resumes (and fails at curate again)
        with pytest.raises(GdrtError, match="the pipeline failed at curate"):
            local_run.run(params, out, stream=io.StringIO())
    assert json.loads((out / "params.json").read_text())["source"] == params["source"]
    logs = sorted((out / "logs").iterdir())
    with pytest.raises(GdrtError) as e:
        local_run.run({**params, "tau": 0.5, "train_settings": {"epochs": 2}}, out, stream=io.StringIO())
    assert (f"{out}: the run directory was started with another config: tau 1.0 then, 0.5 now; "
            "train_settings.epochs the default then, 2.0 now (to resume it, give it the config it was started "
            "with") in str(e.value)
    assert sorted((out / "logs").iterdir()) == logs  # refused before any step
    (out / "params.json").unlink()
    (out / "stages").mkdir(exist_ok=True)
    (out / "stages" / "train-sft-a-0123abcd.done.json").write_text("{}")  # another config's (a sweep's) stage
    with pytest.raises(GdrtError, match="holds finished stages that this config does not have "
                                        r"\(train-sft-a-0123abcd\)"):
        local_run.run(params, out, stream=io.StringIO())


def test_gdrt_run_resumes_a_config_that_resolves_to_the_same_settings(tmp_path, monkeypatch):
    """Resuming compared the parameters as written: `tau: 1` for the recorded 1.0, `lr: 1e-3` (text in YAML
    1.1) for 0.001 or a stage setting written out at its default (`epochs: 3`) was refused as another config.
    The check compares the resolved settings; the stages planned are the same ones."""
    from pipelines import local_run

    monkeypatch.setenv("GDRT_TRACKING", "off")
    out = tmp_path / "out"
    source = str(tmp_path / "no-such-source")  # curate fails at once: no model is trained
    first = {"source": source, "train_settings": {"lr": 0.001}}
    same = {"source": source, "tau": 1, "train_settings": {"lr": "1e-3", "epochs": 3, "seed": 42},
            "model_settings": {"size": "small"}}
    assert list(local_run.plan_run(first).nodes) == list(local_run.plan_run(same).nodes)
    for params in (first, same):
        with pytest.raises(GdrtError, match="the pipeline failed at curate"):
            local_run.run(params, out, stream=io.StringIO())
    with pytest.raises(GdrtError, match="another config: train_settings.lr 0.001 then, 0.002 now"):
        local_run.run({**same, "train_settings": {"lr": "2e-3"}}, out, stream=io.StringIO())


def test_a_number_written_two_ways_or_a_default_written_out_is_one_stage(tmp_path):
    """`tau: 1` and `tau: 1.0`, `lr: 1e-3` (which YAML 1.1 reads as text) and `lr: 0.001`, a setting left
    out and written out at its default: the same resolved settings, so the same stages, trained once."""
    _write(tmp_path, {"a": {}})
    sweep_file = tmp_path / "numbers.yaml"
    sweep_file.write_text("config: cfg.yaml\nvariants:\n"
                          "  a: {set: {tau: 1, train_settings.lr: 1e-3}}\n"
                          "  b: {set: {tau: 1.0, train_settings.lr: 0.001, train_settings.lora: true}}\n"
                          "  c: {set: {tau: 2, train_settings.lr: 1e-3}}\n")
    variants = sweep.load_sweep(sweep_file)[1]
    assert variants["a"].params["train_settings"]["lr"] == "1e-3"  # as YAML read it
    roles = sweep.plan(variants).roles
    for role in ("data", "base", "sft", "groups", "gdrt", "eval_gdrt", "attr_gdrt", "valid_gdrt"):
        assert roles["a"][role] == roles["b"][role], role
    assert roles["a"]["sft"] == roles["c"]["sft"] and roles["a"]["gdrt"] != roles["c"]["gdrt"]


def test_steps_run_at_once_share_the_cores_out():
    """--jobs N gives each step cores // N OpenMP threads (at least 1); an OMP_NUM_THREADS the user set wins;
    one job at a time keeps torch's default."""
    assert sweep.step_env({"A": "1"}, 2, cpus=2) == {"A": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    assert sweep.step_env({}, 2, cpus=16)["OMP_NUM_THREADS"] == "8"
    assert sweep.step_env({}, 4, cpus=2)["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in sweep.step_env({}, 1, cpus=2)
    assert sweep.step_env({"OMP_NUM_THREADS": "3"}, 2, cpus=2)["OMP_NUM_THREADS"] == "3"
    for garbage in ("", "garbage", "0", "-2", "1.5"):  # OpenMP ignores these and takes every core
        assert sweep.step_env({"OMP_NUM_THREADS": garbage}, 2, cpus=4)["OMP_NUM_THREADS"] == "2"


def test_gdrt_run_steps_get_the_shared_out_threads(tmp_path, monkeypatch):
    from pipelines import local_run

    monkeypatch.setenv("GDRT_TRACKING", "off")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen = []
    popen = sweep.subprocess.Popen

    def spy(*args, env=None, **kw):
        seen.append(env)
        return popen(*args, env=env, **kw)

    monkeypatch.setattr(sweep.subprocess, "Popen", spy)
    with pytest.raises(GdrtError):
        local_run.run({"source": str(tmp_path / "no-such-source")}, tmp_path / "out", jobs=2, stream=io.StringIO())
    assert seen and seen[0]["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))


def test_gdrt_run_prints_an_mlflow_ui_command_that_survives_copy_paste(tmp_path, monkeypatch, capsys):
    """The `mlflow ui --backend-store-uri URI` hint of `gdrt run` was not shell-quoted: a working directory
    with spaces broke the copied command. The URI is now one shell word."""
    import argparse
    import shlex

    from pipelines import local_run

    where = tmp_path / "my runs"
    where.mkdir()
    uri = f"sqlite:///{where / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(local_run, "run", lambda params, out, jobs: {"rows": [], "report_dir": str(where)})
    local_run.cli(argparse.Namespace(jobs=1, config=None, overrides=[f"source={tmp_path}"], out=str(where / "r")))
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("open the runs: ")
    assert shlex.split(line.removeprefix("open the runs: ")) == [local_run.mlflow_command(), "ui",
                                                                   "--backend-store-uri", uri]
    assert local_run.open_runs_line("http://mlflow:5000") == "open the runs at http://mlflow:5000"


def test_the_mlflow_command_of_the_hint_runs_without_the_venv_on_path(monkeypatch, tmp_path):
    """The quickstart's last line said `mlflow ui ...`, but scripts/setup.sh's .venv is not on PATH: the hint
    names the mlflow beside the running Python then (relative to the working directory below it)."""
    import sys
    from pathlib import Path

    from pipelines import local_run

    monkeypatch.setenv("PATH", str(tmp_path))  # no mlflow on it
    monkeypatch.chdir(Path(sys.executable).parent.parent)
    assert local_run.mlflow_command() == str(Path(Path(sys.executable).parent.name) / "mlflow")
    monkeypatch.chdir(tmp_path)
    assert local_run.mlflow_command() == str(Path(sys.executable).parent / "mlflow")
    (tmp_path / "mlflow").write_text("#!/bin/sh\n")
    (tmp_path / "mlflow").chmod(0o755)
    assert local_run.mlflow_command() == "mlflow"


def test_with_tracking_off_gdrt_run_registers_nothing_and_creates_no_store(tmp_path, monkeypatch, capsys):
    """`GDRT_TRACKING=off gdrt run` still created ./mlflow.db and ./mlruns: its register step logged and
    registered the model in the default local store. With tracking off the step now registers nothing and
    opens no store, and the run's last line says so instead of pointing at `mlflow ui`."""
    import argparse

    from gdrt_core import registry
    from gdrt_core.stages import NOT_REGISTERED, run_step
    from gdrt_core.tracking import RunContext
    from pipelines import local_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("GDRT_TRACKING", "off")
    called = []
    monkeypatch.setattr(registry, "register_model", lambda *a, **k: called.append(a) or "champion")
    args = {"model": "m", "dataset": "d", "valid_eval": "v", "domain": "office"}
    assert run_step("register", None, RunContext(), **args) == NOT_REGISTERED
    assert run_step("register", None, RunContext(parent_run_id="p", enabled=False), **args) == NOT_REGISTERED
    assert called == [] and os.listdir(tmp_path) == []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(local_run, "run", lambda params, out, jobs: {"rows": [], "report_dir": str(tmp_path)})
    local_run.cli(argparse.Namespace(jobs=1, config=None, overrides=[f"source={tmp_path}"], out="r"))
    assert capsys.readouterr().out.splitlines()[-1] == (
        "MLflow tracking is off (GDRT_TRACKING): nothing was logged or registered")
    assert run_step("register", None, RunContext(enabled=True), **args) == "champion"  # tracking on: registered


@pytest.mark.parametrize("key,value", [("run_name", None), ("run_name", "  "), ("experiment", None), ("experiment", "")])
def test_an_empty_run_or_experiment_name_is_refused_before_any_step(key, value):
    """`run_name:` left blank ran every stage, then failed in the report (and named the MLflow run "None")."""
    from pipelines.params import check_pipeline_params

    with pytest.raises(GdrtError, match=rf"pipeline parameter {key} is empty") as err:
        check_pipeline_params({key: value}, "cfg.yaml")
    assert err.value.path == "cfg.yaml" and "leave the line out" in err.value.hint


def test_a_blank_base_model_or_deepspeed_means_what_the_empty_text_means():
    """`base_model:` (YAML null) is the embedded default like `base_model: ""` (it crashed the base-model step),
    and `deepspeed:` is off like `deepspeed: ""`: the same stages, and a resume accepts either."""
    from gdrt_core.stages import base_model_settings
    from pipelines.params import check_pipeline_params, resolved_params

    check_pipeline_params({"base_model": None, "deepspeed": None}, "cfg.yaml")
    assert base_model_settings(None, {"size": "tiny"}) == base_model_settings("", {"size": "tiny"}) == {"size": "tiny"}
    assert resolved_params({"base_model": None, "deepspeed": None}) == resolved_params({"base_model": "", "deepspeed": ""})


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_an_empty_out_is_refused_not_replaced_by_the_default(command, tmp_path, monkeypatch, capsys):
    """`gdrt run --out ''` (an unset shell variable) ran into runs/<timestamp>."""
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["run", "--out", " "] if command == "run" else ["sweep", "s.yaml", "--out", ""]
    assert main(argv) == 2
    assert "--out is empty" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("raised, code, said", [
    (PermissionError(13, "Permission denied", "/runs/out/stages/x"), 2, "error: /runs/out/stages/x"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (GdrtError("the source is empty", path="/data/x"), 2, "error: /data/x: the source is empty"),
])
def test_a_stage_process_ends_in_one_line_naming_the_stage(tmp_path, monkeypatch, capsys, raised, code, said):
    """A stage's own process (`python -m pipelines.sweep --node`) printed a traceback for a file-system error
    or Ctrl-C in the stage; every ending is now the command's one line, naming the stage."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"command": "gdrt run", "label": "train sft"}))

    def fail(_spec):
        raise raised

    monkeypatch.setattr(sweep, "run_spec", fail)
    assert sweep._node_main(str(spec)) == code
    err = capsys.readouterr().err
    assert err.startswith(f"gdrt run: train sft: {said}") and "Traceback" not in err and err.count("\n") <= 2
