"""The compiled multi-node pipeline YAML: TrainJob launcher steps, caching, parameters, shared PVC, determinism."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
NAME = "gdrt_pipeline_multinode.yaml"


def _compile(out_dir: Path, **env) -> Path:
    subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "compile.py"), "--out-dir", str(out_dir)],
        check=True, cwd=REPO, env={**os.environ, **env}, capture_output=True,
    )
    return out_dir / NAME


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = _compile(tmp_path_factory.mktemp("compiled"), GDRT_IMAGE="registry.example.com/ml/gdrt:1.2.3")
    spec, platform = yaml.safe_load_all(path.read_text())
    return path, spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_training_steps_are_trainjob_launchers(compiled):
    _, spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert sorted(k for k in tasks if k.startswith("train")) == ["train-job", "train-job-2"]
    assert tasks["train-job"]["taskInfo"]["name"] == "train SFT (TrainJob)"
    assert tasks["train-job-2"]["taskInfo"]["name"] == "train GDRT (TrainJob)"
    executors = spec["deploymentSpec"]["executors"]
    for name in ("exec-train-job", "exec-train-job-2"):
        container = executors[name]["container"]
        assert "pipelines.trainjob import run_step" in " ".join(container["command"])
        assert "resources" not in container  # the launcher needs no GPU: the TrainJob's nodes have them


def test_launcher_gets_pipeline_parameters(compiled):
    _, spec, _ = compiled
    inputs = spec["root"]["dag"]["tasks"]["train-job"]["inputs"]["parameters"]
    wired = {k: v.get("componentInputParameter") for k, v in inputs.items()}
    assert wired["num_nodes"] == "num_nodes" and wired["gpus_per_node"] == "gpus_per_node"
    assert wired["runtime"] == "runtime" and wired["image"] == "train_image" and wired["pvc_name"] == "shared_pvc"
    assert wired["job_settings"] == "trainjob_settings" and wired["deepspeed"] == "deepspeed"
    assert inputs["run_key"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert inputs["objective"]["runtimeValue"]["constant"] == "sft"


def test_parameter_defaults(compiled):
    _, spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    defaults = {k: v.get("defaultValue") for k, v in params.items()}
    assert defaults["num_nodes"] == 2 and defaults["gpus_per_node"] == 8
    assert params["num_nodes"]["parameterType"] == "NUMBER_INTEGER"
    assert defaults["runtime"] == "deepspeed-distributed" and defaults["trainjob_settings"] == {"launcher": "mpi"}
    assert defaults["train_image"] == "registry.example.com/ml/gdrt:1.2.3"  # GDRT_IMAGE at compile time
    assert defaults["shared_pvc"] == "gdrt-cache" and defaults["deepspeed"] == "zero2"
    assert defaults["tau"] == 1.0 and defaults["num_groups"] == 4 and defaults["domain"] == "office"
    assert "num_gpus" not in defaults


def test_caching_is_off_for_training_evaluation_and_side_effects(compiled):
    _, spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    for name, task in tasks.items():
        cached = task.get("cachingOptions", {}).get("enableCache", False)
        if name.split("-")[0] in ("train", "evaluate", "register", "report") or name == "start-tracking":
            assert not cached, name
    assert tasks["curate"]["cachingOptions"]["enableCache"] is True


def test_launchers_mount_the_shared_pvc(compiled):
    _, _, k8s = compiled
    assert sorted(k8s) == ["exec-train-job", "exec-train-job-2"]
    for name in k8s:
        (mount,) = k8s[name]["pvcMount"]
        assert mount["mountPath"] == "/mnt/gdrt"
        assert mount["pvcNameParameter"] == {"componentInputParameter": "shared_pvc"}


def test_image_is_used_by_every_component(compiled):
    _, spec, _ = compiled
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/ml/gdrt:1.2.3"}


def test_pipeline_graph(compiled):
    _, spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]

    def deps(name):
        return set(tasks[name].get("dependentTasks", []))

    assert {"curate", "init-model", "start-tracking"} <= deps("train-job")
    assert "train-job" in deps("group") and "group" in deps("train-job-2")
    assert {"train-job-2", "evaluate-3", "report"} <= deps("register")


def test_compile_is_deterministic(compiled, tmp_path):
    path, _, _ = compiled
    again = _compile(tmp_path, GDRT_IMAGE="registry.example.com/ml/gdrt:1.2.3")
    assert again.read_bytes() == path.read_bytes()


def test_multinode_pipeline_module_imports_neither_torch_nor_the_sdk():
    code = ("import sys, pipelines.gdrt_pipeline_multinode; "
            "assert 'torch' not in sys.modules and 'kubeflow.trainer' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_committed_yaml_is_current(tmp_path):
    """pipelines/compiled/ is what people upload: it must match the code (recompile after changes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GDRT_")}
    subprocess.run([sys.executable, str(REPO / "pipelines" / "compile.py"), "--out-dir", str(tmp_path)],
                   check=True, cwd=REPO, env=env, capture_output=True)
    assert (tmp_path / NAME).read_bytes() == (REPO / "pipelines" / "compiled" / NAME).read_bytes(), \
        "run `python pipelines/compile.py` and commit pipelines/compiled/"
