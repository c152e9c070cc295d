"""Multi-node training as a Kubeflow Trainer TrainJob, all offline: the manifest the SDK would submit,
the launch command run against a fake mpirun, the wait loop, and the launcher's whole flow with a fake
client (inputs staged on the "PVC", the trained model copied back without its checkpoints)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("kubeflow.trainer")

from gdrt_core.errors import GdrtError  # noqa: E402
from gdrt_core.tracking import RunContext  # noqa: E402
from pipelines.trainjob import (  # noqa: E402
    HOSTFILE,
    TrainJobConfig,
    render_manifest,
    run,
    train_argv,
    train_command,
    validate,
    wait_for_trainjob,
)

ARGV = train_argv(dataset="/mnt/gdrt/runs/r1/data set", model="/mnt/gdrt/runs/r1/base",
                  out="/mnt/gdrt/runs/r1/model", config_file="/mnt/gdrt/runs/r1/train.yaml",
                  context=RunContext(parent_run_id="abc", run_name="train sft"))
ENV = {"HF_HOME": "/mnt/gdrt/hf-cache", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}


def _manifest(**overrides) -> dict:
    config = TrainJobConfig(image="registry.example.com/ml/gdrt:1.2.3-cuda", **overrides)
    return render_manifest(config, train_command(config, ARGV, sorted(ENV)), ENV, name="gdrt-sft",
                           labels={"app.kubernetes.io/part-of": "gdrt"})


def test_manifest_has_runtime_nodes_image_resources_env():
    job = _manifest(num_nodes=4, gpus_per_node=8)
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"] == {"name": "gdrt-sft", "labels": {"app.kubernetes.io/part-of": "gdrt"}}
    spec = job["spec"]
    assert spec["runtimeRef"] == {"name": "deepspeed-distributed", "kind": "ClusterTrainingRuntime"}
    assert spec["activeDeadlineSeconds"] == 172800
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 4
    assert trainer["image"] == "registry.example.com/ml/gdrt:1.2.3-cuda"
    per_node = {"nvidia.com/gpu": "8", "cpu": "8", "memory": "64G"}
    assert trainer["resourcesPerNode"] == {"limits": per_node, "requests": per_node}
    assert {e["name"]: e["value"] for e in trainer["env"]} == ENV


def test_manifest_command_is_mpirun_one_torchrun_per_node():
    command = _manifest(num_nodes=4, gpus_per_node=8)["spec"]["trainer"]["command"]
    assert command[:2] == ["bash", "-c"]
    script = command[2]
    assert f"mpirun --hostfile {HOSTFILE} -np 4 --map-by ppr:1:node" in script
    assert "-x MASTER_ADDR -x HF_HOME -x MLFLOW_TRACKING_URI" in script
    assert "--parent-run-id abc --run-name" in script  # the run context as gdrt train's flags (quoting: below)
    assert "--nnodes=4 --nproc_per_node=8" in script and "--master_port=29500" in script
    assert "-m gdrt_core.cli train --dataset" in script  # quoting: see the fake-mpirun test below


def test_manifest_mounts_shared_pvc_and_shm_on_launcher_and_nodes():
    patches = _manifest(pvc_name="team-rwx", shm_size="32Gi")["spec"]["runtimePatches"]
    assert len(patches) == 1 and patches[0]["manager"] == "trainer.kubeflow.org/kubeflow-sdk"
    jobs = patches[0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert [j["name"] for j in jobs] == ["launcher", "node"]
    for job in jobs:
        pod = job["template"]["spec"]["template"]["spec"]
        assert pod["volumes"] == [
            {"name": "gdrt-shared", "persistentVolumeClaim": {"claimName": "team-rwx"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}},
        ]
        assert pod["containers"] == [{"name": "node", "volumeMounts": [
            {"name": "gdrt-shared", "mountPath": "/mnt/gdrt"}, {"name": "dshm", "mountPath": "/dev/shm"}]}]
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_torch_runtime_lets_torchrun_read_the_runtime_variables():
    job = _manifest(runtime="torch-distributed", launcher="torch", toleration="", cpu_per_node="", memory_per_node="")
    spec = job["spec"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    assert spec["trainer"]["command"] == ["python", "-m", "torch.distributed.run", "-m", "gdrt_core.cli", *ARGV]
    assert spec["trainer"]["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8"}
    jobs = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert [j["name"] for j in jobs] == ["node"]
    assert "tolerations" not in jobs[0]["template"]["spec"]["template"]["spec"]


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_mpi_command_runs_one_worker_per_node_with_its_rank(tmp_path):
    """A fake mpirun starts `-np` ranks with OMPI_COMM_WORLD_RANK set and the forwarded MASTER_ADDR; a fake
    python prints its arguments: each rank must run torchrun with its node rank, the first hostfile host as
    master, and `gdrt train` arguments intact (a path with a space survives both shells)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "mpirun", """#!/bin/bash
np=0
while [ "$1" != "bash" ]; do
  case "$1" in -np) np=$2; shift 2;; --hostfile|--map-by|--bind-to|-x) shift 2;; *) shift;; esac
done
for ((r = 0; r < np; r++)); do OMPI_COMM_WORLD_RANK=$r "$@" > "$OUT_DIR/rank$r"; done
""")
    _executable(bin_dir / "python", '#!/bin/bash\nprintf "%s\\n" "$@"\n')
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("job-launcher-0-0.job slots=1\njob-node-0-0.job slots=1\njob-node-0-1.job slots=1\n")
    config = TrainJobConfig(image="img", num_nodes=3, gpus_per_node=2)
    script = train_command(config, ARGV, ["HF_HOME"])[2].replace(HOSTFILE, str(hostfile))
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT_DIR": str(tmp_path)}
    subprocess.run(["bash", "-c", script], check=True, env=env, timeout=30)
    for rank in range(3):
        args = (tmp_path / f"rank{rank}").read_text().splitlines()
        assert args == ["-m", "torch.distributed.run", "--nnodes=3", "--nproc_per_node=2", f"--node_rank={rank}",
                        "--master_addr=job-launcher-0-0.job", "--master_port=29500", "-m", "gdrt_core.cli", *ARGV]


class FakeClient:
    """The TrainerClient calls the launcher makes: train, get_job, get_job_events (and backend.custom_api)."""

    def __init__(self, statuses, on_train=None, conditions=None, events=()):
        self.statuses = list(statuses)
        self.on_train = on_train
        self.submitted = None
        self.backend = SimpleNamespace(namespace="team", custom_api=SimpleNamespace(
            get_namespaced_custom_object=lambda *a: {"status": {"conditions": conditions or []}}))
        self.events = [SimpleNamespace(involved_object_kind="Pod", involved_object_name=n, reason=r, message=m)
                       for n, r, m in events]

    def train(self, runtime, trainer, options):
        self.submitted = SimpleNamespace(runtime=runtime, trainer=trainer, options=options)
        if self.on_train:
            self.on_train(trainer, options)
        return "j123"

    def get_job(self, name):
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return SimpleNamespace(name=name, status=status)

    def get_job_events(self, name):
        return self.events


def test_wait_returns_when_complete_and_logs_status_changes():
    client, sleeps, lines = FakeClient(["Created", "Running", "Running", "Complete"]), [], []
    job = wait_for_trainjob(client, "j1", timeout_s=100, poll_s=5, sleep=sleeps.append, log=lines.append)
    assert job.status == "Complete" and sleeps == [5, 5, 5]
    assert lines == ["TrainJob j1: Created", "TrainJob j1: Running", "TrainJob j1: Complete"]


def test_failed_job_fails_the_step_with_its_message_and_events():
    client = FakeClient(["Running", "Failed"], conditions=[
        {"type": "Created", "status": "True", "reason": "JobSetCreated", "message": "ok"},
        {"type": "Failed", "status": "True", "reason": "TrainingFailed", "message": "node-0 exited with code 1"},
    ], events=[("j1-node-0-0", "BackOff", "Back-off restarting failed container node")])
    with pytest.raises(GdrtError) as err:
        wait_for_trainjob(client, "j1", timeout_s=100, poll_s=5, sleep=lambda s: None, log=lambda s: None)
    text = str(err.value)
    assert "TrainJob j1 failed: TrainingFailed: node-0 exited with code 1" in text
    assert "Pod/j1-node-0-0 BackOff: Back-off restarting failed container node" in text
    assert "kubectl describe trainjob j1" in text


def test_wait_times_out_with_the_last_status():
    """Clock 0, then +5 per sleep: 0, 5, 10 are checked, and at 10 >= timeout 10 the wait gives up."""
    now = [0.0]
    client = FakeClient(["Running"])
    with pytest.raises(GdrtError, match=r"did not complete within 10 s \(last status Running\)"):
        wait_for_trainjob(client, "j1", timeout_s=10, poll_s=5, clock=lambda: now[0],
                          sleep=lambda s: now.__setitem__(0, now[0] + s), log=lambda s: None)
    assert now[0] == 10


@pytest.mark.parametrize("change, message", [
    ({"launcher": "slurm"}, "launcher='slurm' is invalid: must be one of mpi, torch"),
    ({"num_nodes": 0}, "num_nodes=0 is invalid: must be >= 1"),
    ({"master_port": 70000}, "master_port=70000 is invalid"),
    ({"pvc_name": ""}, "ReadWriteMany PVC"),
    ({"pvc_mount": "mnt"}, "not an absolute path"),
    ({"poll_s": 60, "timeout_s": 60}, "must be below timeout_s"),
])
def test_invalid_settings_are_reported(change, message):
    with pytest.raises(GdrtError, match=message):
        validate(TrainJobConfig(image="img", **change))


def test_run_stages_inputs_submits_waits_and_collects_the_model(tmp_path):
    from gdrt_core.artifacts import write_manifest

    dataset = tmp_path / "kfp" / "dataset"
    dataset.mkdir(parents=True)
    (dataset / "items.parquet").write_bytes(b"items")
    groups = tmp_path / "kfp" / "groups"
    groups.mkdir()
    (groups / "groups.json").write_text("{}")
    pvc = tmp_path / "pvc"

    def fake_training(trainer, options):
        """What the nodes do: read the staged config, write the Model artifact and a checkpoint on the PVC."""
        cfg = yaml.safe_load((pvc / "runs" / "job-uuid-gdrt" / "train.yaml").read_text())
        model = Path(cfg["out"])
        (model / "checkpoints" / "checkpoint-10").mkdir(parents=True)
        (model / "adapter_model.safetensors").write_bytes(b"weights")
        write_manifest(model, "model", config=cfg, metrics={"train_loss": 1.25})

    client = FakeClient(["Running", "Complete"], on_train=fake_training)
    config = TrainJobConfig(image="img", num_nodes=2, gpus_per_node=4, pvc_mount=str(pvc), poll_s=1)
    out = tmp_path / "kfp" / "model"
    result = run(config, {"lr": 3e-4}, dataset=str(dataset), model="org/base-model", groups=str(groups),
                 out=str(out), run_key="job-uuid-gdrt", context=RunContext(parent_run_id="p1"), client=client,
                 objective="gdrt", tau=0.5, deepspeed="zero3")

    root = pvc / "runs" / "job-uuid-gdrt"
    assert (root / "dataset" / "items.parquet").read_bytes() == b"items" and (root / "groups" / "groups.json").exists()
    cfg = yaml.safe_load((root / "train.yaml").read_text())
    assert cfg["dataset"] == str(root / "dataset") and cfg["groups"] == str(root / "groups")
    assert cfg["model"] == "org/base-model"  # a hub id is not copied
    assert (cfg["objective"], cfg["tau"], cfg["lr"], cfg["deepspeed"]) == ("gdrt", 0.5, 3e-4, "zero3")
    sub = client.submitted
    assert sub.runtime == "deepspeed-distributed" and sub.trainer.num_nodes == 2 and sub.trainer.image == "img"
    assert sub.trainer.env == {"HF_HOME": f"{pvc}/hf-cache"}
    command = sub.options[1].command[2]
    assert "--parent-run-id p1" in command
    assert f"--config {root / 'train.yaml'}" in command and "--nproc_per_node=4" in command
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors", "manifest.json"]
    assert result == {"trainjob": "j123", "num_nodes": 2, "gpus_per_node": 4, "metrics.train_loss": 1.25}


def test_failed_job_leaves_no_output_model(tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    client = FakeClient(["Failed"], conditions=[{"type": "Failed", "status": "True", "reason": "OOMKilled",
                                                 "message": "node-1"}])
    config = TrainJobConfig(image="img", pvc_mount=str(tmp_path / "pvc"), poll_s=1)
    out = tmp_path / "out"
    with pytest.raises(GdrtError, match="OOMKilled: node-1"):
        run(config, {}, dataset=str(dataset), model="org/base", out=str(out), run_key="k", client=client)
    assert not out.exists()


def test_component_function_on_small_artifacts(tmp_path, monkeypatch):
    """components/train_job called directly: KFP artifacts in, the TrainJob built from the pipeline's
    parameters (explicit values win over job_settings), the model and its metadata out."""
    from kfp.dsl import Dataset, Model

    from components.train_job.component import train_job
    from gdrt_core.artifacts import write_manifest
    from pipelines import trainjob

    pvc = tmp_path / "pvc"
    (tmp_path / "dataset").mkdir()
    base = tmp_path / "base"
    base.mkdir()
    (base / "base_model.json").write_text('{"model": "org/base-model"}')  # init_model's hub-id reference

    def fake_training(trainer, options):
        model = pvc / "runs" / "uuid-1-sft" / "model"
        model.mkdir(parents=True)
        write_manifest(model, "model", metrics={"train_loss": 2.0})

    client = FakeClient(["Complete"], on_train=fake_training)
    monkeypatch.setattr(trainjob, "make_client", lambda namespace=None: client)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    model = Model(uri=str(tmp_path / "out"))
    train_job.python_func(
        dataset=Dataset(uri=str(tmp_path / "dataset")), base=Model(uri=str(base)), objective="sft", settings={},
        tau=1.0, prior="uniform", num_groups=4, deepspeed="zero2", num_nodes=3, gpus_per_node=2,
        runtime="deepspeed-distributed", image="reg/gdrt:1-cuda", pvc_name="team-rwx",
        job_settings={"num_nodes": 9, "pvc_mount": str(pvc), "poll_s": 1}, run_key="uuid-1", parent_run_id="p9",
        run_name="train sft", model=model, groups=None,
    )
    sub = client.submitted
    assert sub.trainer.num_nodes == 3 and sub.trainer.image == "reg/gdrt:1-cuda"
    assert "GDRT_PARENT_RUN_ID" not in sub.trainer.env and "GDRT_RUN_NAME" not in sub.trainer.env
    assert "--parent-run-id p9 --run-name" in sub.options[1].command[2]
    assert sub.trainer.env["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    patch = sub.options[-1].training_runtime_spec.template.spec.replicated_jobs[0].template.spec.template.spec
    assert patch.volumes[0]["persistentVolumeClaim"]["claimName"] == "team-rwx"
    cfg = yaml.safe_load((pvc / "runs" / "uuid-1-sft" / "train.yaml").read_text())
    assert cfg["model"] == "org/base-model" and cfg["deepspeed"] == "zero2" and cfg["objective"] == "sft"
    assert model.metadata == {"trainjob": "j123", "num_nodes": 3, "gpus_per_node": 2, "metrics.train_loss": 2.0}
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_wait_retries_unreadable_status_then_gives_up():
    class Flaky(FakeClient):
        def __init__(self, fail_times):
            super().__init__(["Complete"])
            self.fail_times = fail_times

        def get_job(self, name):
            if self.fail_times:
                self.fail_times -= 1
                raise RuntimeError(f"Failed to get TrainJob: team/{name}")
            return super().get_job(name)

    quiet = {"sleep": lambda s: None, "log": lambda s: None}
    assert wait_for_trainjob(Flaky(4), "j1", timeout_s=100, poll_s=1, **quiet).status == "Complete"
    with pytest.raises(GdrtError, match="cannot read TrainJob j1"):
        wait_for_trainjob(Flaky(5), "j1", timeout_s=100, poll_s=1, **quiet)


def test_submission_errors_name_the_runtime_and_what_to_check(tmp_path):
    class Refusing(FakeClient):
        def train(self, runtime, trainer, options):
            raise ValueError(f"CustomTrainer can't be used with {runtime} runtime")

    (tmp_path / "dataset").mkdir()
    config = TrainJobConfig(image="img", runtime="torchtune-llama", pvc_mount=str(tmp_path / "pvc"))
    with pytest.raises(GdrtError, match="cannot submit the TrainJob on runtime 'torchtune-llama'.*clustertrainingruntimes"):
        run(config, {}, dataset=str(tmp_path / "dataset"), model="org/base", out=str(tmp_path / "out"), run_key="k",
            client=Refusing(["Complete"]))
