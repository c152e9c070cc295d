"""Training on several nodes: `gdrt train` submitted as a Kubeflow Trainer TrainJob, and waited for.

The pipeline's launcher step (components/train_job) runs `run_step(...)`, i.e. `run(config, settings, ...)`:

1. Stage the inputs on the shared PVC. The TrainJob's pods cannot see the pipeline's artifact store, and
   every node must read the same dataset / base model / groups and write one output model: multi-node
   training needs shared storage (a ReadWriteMany PVC mounted at `pvc_mount` on the launcher step and on
   every training node). Layout: `<pvc_mount>/runs/<run_key>/{dataset,base,groups,model,train.yaml}`.
2. Submit the TrainJob with the `kubeflow` SDK (TrainerClient.train with a CustomTrainerContainer: the
   project image, num_nodes, GPUs per node; options for the command, labels, deadline and the volumes).
3. Poll the job until Complete; a Failed job or the timeout fails the step with the job's status,
   condition message and last events.
4. Copy the trained Model artifact (without its checkpoints) from the PVC into the step's output.

How the processes start, by runtime (`launcher` setting):
- mpi (the DeepSpeed runtime, e.g. `deepspeed-distributed`, OpenMPI with one slot per node): the launcher
  pod runs `mpirun` with one rank per node; each rank starts `torchrun --nnodes N --nproc_per_node G
  --node_rank $OMPI_COMM_WORLD_RANK` against the first host of the MPI hostfile (where rank 0 runs). The
  image needs OpenMPI and sshd, as the runtime requires of any image it runs.
- torch (`torch-distributed`): torchrun reads the PET_* variables the runtime sets on every node.
Inside the workers `gdrt train` finds LOCAL_RANK / WORLD_SIZE and trains in place (DeepSpeed from the
resolved train config); only rank 0 logs to MLflow.

The TrainJob manifest is built offline by `render_manifest` with the SDK's own spec builder, so tests
assert on exactly what the SDK submits. The `kubeflow` package is the optional extra `multinode`.
"""

from __future__ import annotations

import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gdrt_core.config import check_config, field, to_dict
from gdrt_core.errors import GdrtError

if TYPE_CHECKING:
    from gdrt_core.tracking import RunContext

TRAINER_CONTAINER = "node"  # the trainer container of the Kubeflow Trainer runtimes (launcher and node jobs)
REPLICATED_JOBS = ("launcher", "node")  # jobs of the MPI runtimes; torch runtimes have "node" only
LAUNCHERS = ("mpi", "torch")
HOSTFILE = "/etc/mpi/hostfile"  # written by the Trainer's MPI plugin on the launcher
PVC_VOLUME = "gdrt-shared"
SHM_VOLUME = "dshm"
SDK_HINT = "install the optional extra: pip install 'gdrt[multinode]' (the kubeflow SDK)"


@dataclass
class TrainJobConfig:
    image: str = field(help="container image of the training nodes (the project's CUDA image)")
    runtime: str = field("deepspeed-distributed", help="Kubeflow Trainer (Cluster)TrainingRuntime name")
    launcher: str = field("mpi", choices=LAUNCHERS, help="mpi (DeepSpeed/MPI runtimes: mpirun starts one torchrun per node) | "
                                      "torch (torch-distributed runtime: torchrun reads PET_* variables)")
    num_nodes: int = field(2, ge=1, help="training nodes (pods)")
    gpus_per_node: int = field(8, ge=1, help="GPUs per node; one training process per GPU")
    cpu_per_node: str = field("8", help="CPU request/limit per node ('' = the runtime's)")
    memory_per_node: str = field("64G", help="memory request/limit per node ('' = the runtime's)")
    pvc_name: str = field("gdrt-cache", help="ReadWriteMany PVC shared by the launcher step and every node")
    pvc_mount: str = field("/mnt/gdrt", help="where the PVC is mounted (same path in the step and the nodes)")
    shm_size: str = field("16Gi", help="memory-backed /dev/shm per node (NCCL and data loaders need it)")
    toleration: str = field("nvidia.com/gpu", help="taint key tolerated by the nodes ('' = none)")
    namespace: str | None = field(None, help="namespace of the TrainJob (None = the step's own namespace)")
    master_port: int = field(29500, ge=1, le=65535, help="rendezvous port of rank 0 (launcher mpi)")
    timeout_s: int = field(172800, ge=1, help="fail the step (and deadline the TrainJob) after this many seconds")
    poll_s: int = field(30, ge=1, help="seconds between status checks")
    env: dict[str, str] = field({}, help="extra environment variables of the training processes")

    def check(self, source: str) -> None:
        """The rules across settings and the ones a range cannot say."""
        if self.poll_s >= self.timeout_s:
            raise GdrtError(f"poll_s ({self.poll_s}) must be below timeout_s ({self.timeout_s})", path=source)
        if not self.image.strip():
            raise GdrtError("image is empty", path=source, hint="set the project image (GDRT_IMAGE when compiling)")
        if not self.pvc_name.strip():
            raise GdrtError("pvc_name is empty", path=source,
                            hint="multi-node training needs a ReadWriteMany PVC shared by every node")
        if not self.pvc_mount.startswith("/"):
            raise GdrtError(f"pvc_mount {self.pvc_mount!r} is not an absolute path", path=source)


def validate(config: TrainJobConfig) -> None:
    """Errors that can be found before anything is copied or submitted: every setting in its range, and
    the rules across settings."""
    check_config(config, "train_job config")


# ----------------------------------------------------------------------------------------- command


def train_argv(*, dataset: str, model: str, out: str, config_file: str, context: RunContext | None = None) -> list[str]:
    """`gdrt train` arguments of every worker: the resolved train config travels as a YAML file, the MLflow
    run context as its flags (--parent-run-id, --run-name)."""
    return ["train", "--dataset", dataset, "--model", model, "--out", out, "--config", config_file,
            *(context.args() if context else [])]


def train_command(config: TrainJobConfig, argv: list[str], env_names: list[str]) -> list[str]:
    """The trainer container's command for the runtime's launcher (see the module docstring)."""
    if config.launcher == "torch":
        return ["python", "-m", "torch.distributed.run", "-m", "gdrt_core.cli", *argv]
    worker = shlex.join([
        "python", "-m", "torch.distributed.run", f"--nnodes={config.num_nodes}",
        f"--nproc_per_node={config.gpus_per_node}", "--node_rank=__NODE_RANK__",
        "--master_addr=__MASTER_ADDR__", f"--master_port={config.master_port}", "-m", "gdrt_core.cli", *argv,
    ])
    # the rank and master address are expanded by each rank's shell, not by the launcher's
    worker = worker.replace("__NODE_RANK__", '"$OMPI_COMM_WORLD_RANK"').replace("__MASTER_ADDR__", '"$MASTER_ADDR"')
    forwarded = " ".join(f"-x {name}" for name in ["MASTER_ADDR", *env_names])
    script = (
        "set -eu\n"
        f"MASTER_ADDR=$(head -n 1 {HOSTFILE} | cut -d ' ' -f 1)\n"
        "export MASTER_ADDR\n"
        f"exec mpirun --hostfile {HOSTFILE} -np {config.num_nodes} --map-by ppr:1:node --bind-to none "
        f"{forwarded} bash -c {shlex.quote('exec ' + worker)}"
    )
    return ["bash", "-c", script]


def resources_per_node(config: TrainJobConfig) -> dict[str, Any]:
    """The SDK's resources_per_node ("gpu" is its alias of nvidia.com/gpu)."""
    resources: dict[str, Any] = {"gpu": str(config.gpus_per_node)}  # a quantity string, as Kubernetes writes it
    if config.cpu_per_node:
        resources["cpu"] = config.cpu_per_node
    if config.memory_per_node:
        resources["memory"] = config.memory_per_node
    return resources


# ------------------------------------------------------------------------------------- SDK objects


def trainjob_request(config: TrainJobConfig, command: list[str], env: dict[str, str], *,
                     labels: dict[str, str] | None = None) -> tuple[Any, list]:
    """The SDK's trainer and options for TrainerClient.train: image, nodes, resources, env, command,
    labels, deadline, and a runtime patch that mounts the shared PVC and /dev/shm on every node."""
    try:
        from kubeflow.trainer import CustomTrainerContainer
        from kubeflow.trainer.options.kubernetes import (
            ActiveDeadlineSeconds,
            ContainerPatch,
            JobSetSpecPatch,
            JobSetTemplatePatch,
            JobSpecPatch,
            JobTemplatePatch,
            Labels,
            PodSpecPatch,
            PodTemplatePatch,
            ReplicatedJobPatch,
            RuntimePatch,
            TrainerCommand,
            TrainingRuntimeSpecPatch,
        )
    except ImportError:
        raise GdrtError("the kubeflow SDK is not installed", hint=SDK_HINT) from None

    trainer = CustomTrainerContainer(image=config.image, num_nodes=config.num_nodes,
                                     resources_per_node=resources_per_node(config), env=dict(env))
    volumes = [
        {"name": PVC_VOLUME, "persistentVolumeClaim": {"claimName": config.pvc_name}},
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}},
    ]
    mounts = [{"name": PVC_VOLUME, "mountPath": config.pvc_mount}, {"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    tolerations = ([{"key": config.toleration, "operator": "Exists", "effect": "NoSchedule"}]
                   if config.toleration else None)
    jobs = REPLICATED_JOBS if config.launcher == "mpi" else ("node",)
    patch = RuntimePatch(training_runtime_spec=TrainingRuntimeSpecPatch(template=JobSetTemplatePatch(
        spec=JobSetSpecPatch(replicated_jobs=[
            ReplicatedJobPatch(name=job, template=JobTemplatePatch(spec=JobSpecPatch(template=PodTemplatePatch(
                spec=PodSpecPatch(volumes=volumes, tolerations=tolerations,
                                  containers=[ContainerPatch(name=TRAINER_CONTAINER, volume_mounts=mounts)]),
            ))))
            for job in jobs
        ]),
    )))
    options = [TrainerCommand(command=command), ActiveDeadlineSeconds(seconds=config.timeout_s), patch]
    if labels:
        options.insert(0, Labels(labels=labels))
    return trainer, options


def render_manifest(config: TrainJobConfig, command: list[str], env: dict[str, str], *, name: str,
                    labels: dict[str, str] | None = None) -> dict:
    """The TrainJob (trainer.kubeflow.org/v1alpha1) exactly as TrainerClient.train would create it, built
    offline by the SDK's own spec builder (no cluster: the runtime is described, not looked up)."""
    from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend
    from kubeflow.trainer.constants import constants
    from kubeflow.trainer.types import types
    from kubeflow_trainer_api import models

    trainer, options = trainjob_request(config, command, env, labels=labels)
    backend = KubernetesBackend.__new__(KubernetesBackend)  # the spec builder needs no connection
    job_spec: dict[str, Any] = {}
    for option in options:
        option(job_spec, trainer, backend)
    spec = job_spec.get("spec", {})
    runtime = types.Runtime(
        name=config.runtime, kind=types.RuntimeKind.CLUSTER_TRAINING_RUNTIME,
        trainer=types.RuntimeTrainer(trainer_type=types.TrainerType.CUSTOM_TRAINER, framework=config.launcher,
                                     image=config.image),
    )
    trainjob_spec = backend._get_trainjob_spec(
        runtime=runtime, trainer=trainer, trainer_overrides=spec.get("trainer", {}),
        runtime_patches=spec.get("runtimePatches"), active_deadline_seconds=spec.get("activeDeadlineSeconds"),
    )
    job = models.TrainerV1alpha1TrainJob(
        apiVersion=constants.API_VERSION, kind=constants.TRAINJOB_KIND,
        metadata=models.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name, labels=job_spec.get("metadata", {}).get("labels")),
        spec=trainjob_spec,
    )
    return job.to_dict()


def make_client(namespace: str | None = None) -> Any:
    """A TrainerClient on the cluster (in-cluster config inside a pipeline step, else kube-config)."""
    try:
        from kubeflow.common.types import KubernetesBackendConfig
        from kubeflow.trainer import TrainerClient
    except ImportError:
        raise GdrtError("the kubeflow SDK is not installed", hint=SDK_HINT) from None
    return TrainerClient(KubernetesBackendConfig(namespace=namespace))


# ------------------------------------------------------------------------------------------- waiting


def failure_details(client: Any, name: str, max_events: int = 5) -> str:
    """The Failed condition's reason and message and the job's last events, as far as they can be read."""
    parts = []
    backend = getattr(client, "backend", None)
    try:
        from kubeflow.trainer.constants import constants

        cr = backend.custom_api.get_namespaced_custom_object(
            constants.GROUP, constants.VERSION, backend.namespace, constants.TRAINJOB_PLURAL, name)
        for c in (cr.get("status") or {}).get("conditions") or []:
            if c.get("type") == "Failed" and c.get("status") == "True":
                parts.append(f"{c.get('reason', '')}: {c.get('message', '')}".strip(": "))
    except Exception:  # noqa: BLE001 - details are best effort; the status alone still fails the step
        pass
    try:
        events = client.get_job_events(name)[-max_events:]
        parts += [f"{e.involved_object_kind}/{e.involved_object_name} {e.reason}: {e.message}" for e in events]
    except Exception:  # noqa: BLE001
        pass
    return "; ".join(parts) or "no condition message or events could be read"


def wait_for_trainjob(client: Any, name: str, *, timeout_s: float, poll_s: float,
                      sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                      log: Callable[[str], None] = print, max_read_errors: int = 5) -> Any:
    """Poll `client.get_job(name)` until Complete; Failed or the timeout is a GdrtError with the status
    and the job's message. Status changes are logged (a step's log shows the job's progress); up to
    `max_read_errors` failed reads in a row are retried."""
    deadline = clock() + timeout_s
    last_status = None
    errors = 0
    while True:
        try:
            job = client.get_job(name)
            errors = 0
        except (RuntimeError, TimeoutError) as e:  # the API server can be briefly unreachable
            errors += 1
            if errors >= max_read_errors:
                raise GdrtError(f"cannot read TrainJob {name} ({e}; {e.__cause__})",
                                hint=f"check the cluster and `kubectl get trainjob {name}`") from None
            log(f"TrainJob {name}: status not readable ({e}), retrying")
            sleep(poll_s)
            continue
        if job.status != last_status:
            log(f"TrainJob {name}: {job.status}")
            last_status = job.status
        if job.status == "Complete":
            return job
        if job.status == "Failed":
            raise GdrtError(f"TrainJob {name} failed: {failure_details(client, name)}",
                            hint=f"see `kubectl describe trainjob {name}` and the logs of its pods")
        if clock() >= deadline:
            raise GdrtError(
                f"TrainJob {name} did not complete within {timeout_s:.0f} s (last status {job.status})",
                hint=f"its active deadline stops it; raise timeout_s or inspect `kubectl describe trainjob {name}`")
        sleep(poll_s)


# --------------------------------------------------------------------------------- shared storage


def run_dir(config: TrainJobConfig, run_key: str) -> Path:
    """This training's folder on the shared PVC (the same path on the launcher step and every node)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in run_key.strip("/")) or "run"
    return Path(config.pvc_mount) / "runs" / safe


def stage_input(src: str, dst: Path) -> str:
    """Copy an artifact directory onto the PVC (replacing an older copy); a hub id passes through."""
    if not Path(src).is_dir():
        return src
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.replace(dst)
    return str(dst)


def collect_model(trained: Path, out: str) -> dict:
    """The trained Model artifact from the PVC into the step's output (checkpoints stay on the PVC)."""
    from gdrt_core.artifacts import atomic_output_dir, read_manifest
    from gdrt_core.train import CHECKPOINTS

    manifest = read_manifest(trained, "model")
    with atomic_output_dir(out) as tmp:
        for item in trained.iterdir():
            if item.name == CHECKPOINTS:
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    return manifest


# ------------------------------------------------------------------------------------------- stage


def run(config: TrainJobConfig, train_settings: dict | None = None, *, dataset: str, model: str, out: str,
        groups: str | None = None, run_key: str, env: dict[str, str] | None = None,
        context: RunContext | None = None, client: Any = None, **train_values: Any) -> dict:
    """Train `gdrt train` on `config.num_nodes` nodes through a TrainJob; the Model artifact lands in `out`.

    `train_settings` and `train_values` (objective, tau, ...) make the train stage's config, as for the
    single-node step; its paths are replaced by their copies on the PVC. `context` (the MLflow parent run
    and run name) goes to the workers as `gdrt train` flags. Returns the model's scalars.
    """
    import yaml

    from gdrt_core.stages import scalars, stage_config

    validate(config)
    root = run_dir(config, run_key)
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "dataset": stage_input(dataset, root / "dataset"),
        "model": stage_input(model, root / "base"),
        "groups": stage_input(groups, root / "groups") if groups else None,
    }
    trained = root / "model"
    train_config = stage_config("train", train_settings, **train_values, **paths, out=str(trained),
                                num_gpus=config.gpus_per_node)
    config_file = root / "train.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(train_config), sort_keys=False), encoding="utf-8")

    env = {"HF_HOME": f"{config.pvc_mount}/hf-cache", **config.env, **(env or {})}
    argv = train_argv(dataset=paths["dataset"], model=paths["model"], out=str(trained), config_file=str(config_file),
                      context=context)
    command = train_command(config, argv, sorted(env))
    trainer, options = trainjob_request(config, command, env, labels={"app.kubernetes.io/part-of": "gdrt"})
    client = client or make_client(config.namespace)
    try:
        name = client.train(runtime=config.runtime, trainer=trainer, options=options)
    except (RuntimeError, ValueError, TimeoutError) as e:
        raise GdrtError(
            f"cannot submit the TrainJob on runtime {config.runtime!r}: {e}" + (f" ({e.__cause__})" if e.__cause__ else ""),
            hint="check that the runtime exists and runs custom trainers (kubectl get clustertrainingruntimes) "
                 "and that the step's service account may create trainjobs.trainer.kubeflow.org",
        ) from None
    print(f"submitted TrainJob {name}: {config.num_nodes} node(s) x {config.gpus_per_node} GPU(s), "
          f"runtime {config.runtime}, run dir {root}", flush=True)
    wait_for_trainjob(client, name, timeout_s=config.timeout_s, poll_s=config.poll_s)
    manifest = collect_model(trained, out)
    return {"trainjob": name, "num_nodes": config.num_nodes, "gpus_per_node": config.gpus_per_node,
            **scalars({"metrics": manifest.get("metrics", {})})}


def tracking_env() -> dict[str, str]:
    """The MLflow server the training processes log to. (An embedded sqlite store is local to one pod:
    multi-node runs need an MLflow server's URI.) The parent run and run name go as `gdrt train` flags."""
    import os

    env = {}
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://", "databricks")):  # a local store would be the launcher pod's own
        env["MLFLOW_TRACKING_URI"] = uri
    elif uri:
        print(f"warning: MLFLOW_TRACKING_URI {uri} is local to this step; the TrainJob's nodes will not log to it",
              flush=True)
    return env


def run_step(job_settings: dict, train_settings: dict | None = None, *, context: RunContext | None = None,
             **args: Any) -> dict:
    """The launcher component's body: typed TrainJob config from `job_settings` (explicit arguments that
    are TrainJob settings win), the train step's arguments from the rest (as the single-node train step
    gets them: `gdrt_core.stages.step_values`, `model_source`); the run context passed to the nodes."""
    import dataclasses

    from gdrt_core.config import load_config
    from gdrt_core.stages import model_source, step_values

    job_fields = {f.name for f in dataclasses.fields(TrainJobConfig)}
    job_values = {k: v for k, v in args.items() if k in job_fields and v not in (None, "")}
    values = step_values("train", {k: v for k, v in args.items() if k not in job_fields})
    values["model"] = model_source(values["model"])
    config = load_config(TrainJobConfig, None, None, **{**(job_settings or {}), **job_values})
    return run(config, train_settings, env=tracking_env(), context=context, **values)
