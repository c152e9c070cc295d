"""The GDRT pipeline: the graph of pipelines/graph.py (curate -> base model -> train SFT -> group (reference =
SFT) -> train GDRT -> evaluate both -> attribute both -> report -> register) as KFP tasks. The steps,
their arguments, display names and caching come from the graph; resources and accelerators are set here.
"""


from kfp import dsl, kubernetes
from kfp.dsl import Markdown

from components.attribute.component import attribute
from components.curate.component import curate
from components.evaluate.component import evaluate
from components.group.component import group
from components.init_model.component import init_model
from components.register.component import register
from components.report.component import report
from components.tracking.component import start_tracking
from components.train.component import train
from pipelines import graph, resources
from pipelines.params import PIPELINE_DEFAULTS as D

PIPELINE_NAME = "gdrt"


def _gpu_training(task: dsl.PipelineTask, num_gpus, checkpoint_pvc) -> dsl.PipelineTask:
    """GPUs, GPU-node placement, a memory-backed /dev/shm and (optionally) the checkpoint/cache PVC."""
    task.set_accelerator_type(resources.ACCELERATOR)
    task.set_accelerator_limit(num_gpus)
    task.set_cpu_limit(resources.TRAIN_CPU)
    task.set_memory_limit(resources.TRAIN_MEMORY)
    key, _, value = resources.NODE_SELECTOR.partition("=")
    kubernetes.add_node_selector(task, label_key=key, label_value=value)
    kubernetes.add_toleration(task, key=resources.TOLERATION_KEY, operator="Exists", effect="NoSchedule")
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=resources.SHM_SIZE)
    if checkpoint_pvc:
        kubernetes.mount_pvc(task, pvc_name=checkpoint_pvc, mount_path=resources.CACHE_MOUNT)
        task.set_env_variable("HF_HOME", f"{resources.CACHE_MOUNT}/hf-cache")
    task.set_caching_options(enable_caching=False)
    return task


# graph stage kind -> the component that runs it
COMPONENTS = {"curate": curate, "init-model": init_model, "train": train, "group": group, "evaluate": evaluate,
              "attribute": attribute, "report": report, "register": register}


def start_run_task(*, experiment, run_name, params: dict, parent_run_id) -> dsl.PipelineTask:
    """The step that opens the pipeline's parent MLflow run (or adopts `parent_run_id`)."""
    start = start_tracking(experiment=experiment, run_name=run_name, params=params, run_id=parent_run_id)
    return start.set_display_name("mlflow: start run").set_caching_options(enable_caching=False)


def build_pipeline(*, cluster: bool = True, checkpoint_pvc=None):
    """The pipeline function. cluster=False leaves out the Kubernetes settings (e.g. for kfp.local)."""

    @dsl.pipeline(name=PIPELINE_NAME, description="GDRT vs SFT fine-tuning of an LLM recommender")
    def gdrt_pipeline(
        source: str = D["source"],
        source_format: str = D["source_format"],
        domain: str = D["domain"],
        base_model: str = D["base_model"],
        experiment: str = D["experiment"],
        run_name: str = D["run_name"],
        tau: float = D["tau"],
        num_groups: int = D["num_groups"],
        prior: str = D["prior"],
        num_gpus: int = D["num_gpus"],
        deepspeed: str = D["deepspeed"],
        eval_split: str = D["eval_split"],
        curate_settings: dict = D["curate_settings"],
        model_settings: dict = D["model_settings"],
        train_settings: dict = D["train_settings"],
        group_settings: dict = D["group_settings"],
        eval_settings: dict = D["eval_settings"],
        valid_eval_settings: dict = D["valid_eval_settings"],
        attribute_settings: dict = D["attribute_settings"],
        parent_run_id: str = "",
    ) -> Markdown:
        params = dict(locals())  # the pipeline parameters by name: what the graph's steps read
        start = start_run_task(experiment=experiment, run_name=run_name, params={
            "source": source, "domain": domain, "base_model": base_model, "tau": tau, "num_groups": num_groups,
            "prior": prior,
        }, parent_run_id=parent_run_id)

        def make_task(step: graph.Step, args: dict) -> dsl.PipelineTask:
            task = COMPONENTS[step.stage](**args)
            if step.stage == "train" and cluster:
                _gpu_training(task, num_gpus, checkpoint_pvc)
            return task

        tasks = graph.add_tasks(params, start.output, make_task)
        return tasks["report"].outputs["page"]

    return gdrt_pipeline
