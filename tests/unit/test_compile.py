"""The compiled pipeline YAML: image, accelerators, shm, PVC, caching, parameter defaults, determinism."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _compile(out_dir: Path, **env) -> dict:
    subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "compile.py"), "--out-dir", str(out_dir)],
        check=True, cwd=REPO, env={**os.environ, **env}, capture_output=True,
    )
    return out_dir / "gdrt_pipeline.yaml"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = _compile(tmp_path_factory.mktemp("compiled"), GDRT_IMAGE="registry.example.com/ml/gdrt:1.2.3")
    spec, platform = yaml.safe_load_all(path.read_text())
    return path, spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_image_is_configurable_and_used_by_every_component(compiled):
    _, spec, _ = compiled
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/ml/gdrt:1.2.3"}
    for e in spec["deploymentSpec"]["executors"].values():  # the image's own kfp, nothing pip-installed
        assert "pip install" not in " ".join(e["container"]["command"])


def test_training_gets_gpus_shm_pvc_and_gpu_nodes(compiled):
    _, spec, k8s = compiled
    executors = spec["deploymentSpec"]["executors"]
    trains = [k for k in executors if k.startswith("exec-train")]
    assert len(trains) == 2
    for name in trains:
        res = executors[name]["container"]["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert "num_gpus" in res["accelerator"]["resourceCount"]
        env = {e["name"]: e["value"] for e in executors[name]["container"]["env"]}
        assert env["HF_HOME"] == "/mnt/gdrt/hf-cache"
        plat = k8s[name]
        assert plat["emptyDirMounts"] == [
            {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi", "volumeName": "dshm"}
        ]
        assert plat["pvcMount"][0]["mountPath"] == "/mnt/gdrt"
        assert plat["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert plat["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert not any(k.startswith("exec-evaluate") for k in k8s)  # evaluation runs where it is scheduled


def test_caching_is_off_for_train_evaluate_and_side_effects(compiled):
    _, spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    for name, task in tasks.items():
        cached = task.get("cachingOptions", {}).get("enableCache", False)
        if name.split("-")[0] in ("train", "evaluate", "register", "report") or name == "start-tracking":
            assert not cached, name
    assert tasks["curate"]["cachingOptions"]["enableCache"] is True


def test_parameter_defaults(compiled):
    _, spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    defaults = {k: v.get("defaultValue") for k, v in params.items()}
    assert defaults["tau"] == 1.0 and defaults["num_groups"] == 4 and defaults["prior"] == "uniform"
    assert defaults["source"] == "data/office" and defaults["domain"] == "office"
    assert defaults["deepspeed"] == "zero2" and defaults["num_gpus"] == 1 and defaults["base_model"] == ""
    assert defaults["model_settings"] == {}  # the embedded model's own defaults (size small, seed 0)


def test_pipeline_graph(compiled):
    _, spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]

    def deps(name):
        return set(tasks[name].get("dependentTasks", []))

    assert {"curate", "init-model"} <= deps("train")
    assert "train" in deps("group") and "group" in deps("train-2")
    assert {"train-2", "evaluate-3", "report"} <= deps("register")


def test_compile_is_deterministic(compiled, tmp_path):
    path, _, _ = compiled
    again = _compile(tmp_path, GDRT_IMAGE="registry.example.com/ml/gdrt:1.2.3")
    assert again.read_bytes() == path.read_bytes()


def test_pipeline_modules_do_not_import_torch():
    code = "import sys, pipelines.gdrt_pipeline; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_committed_yaml_is_current(tmp_path):
    """pipelines/compiled/ is what people upload: it must match the code (recompile after changes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GDRT_")}
    subprocess.run([sys.executable, str(REPO / "pipelines" / "compile.py"), "--out-dir", str(tmp_path)],
                   check=True, cwd=REPO, env=env, capture_output=True)
    committed = REPO / "pipelines" / "compiled" / "gdrt_pipeline.yaml"
    assert (tmp_path / "gdrt_pipeline.yaml").read_bytes() == committed.read_bytes(), \
        "run `python pipelines/compile.py` and commit pipelines/compiled/"


@pytest.mark.parametrize("out_dir", ["", "  "])
def test_an_empty_out_dir_is_refused(tmp_path, monkeypatch, capsys, out_dir):
    """`--out-dir ''` is the current directory: the pipelines were written into the cwd."""
    from pipelines.compile import main

    monkeypatch.chdir(tmp_path)
    assert main(["--out-dir", out_dir]) == 2
    assert "error: --out-dir is empty: expected the directory to write the compiled pipelines to" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
