"""The GDRT pipeline with training on several nodes: the same graph (pipelines/graph.py) as
pipelines/gdrt_pipeline.py, but each training is a launcher step (components/train_job) that submits a Kubeflow Trainer TrainJob on the
DeepSpeed runtime and waits for it.

Multi-node training needs shared storage: the launcher step mounts the ReadWriteMany PVC `shared_pvc` at
/mnt/gdrt, copies the dataset, base model and groups there, and the TrainJob's nodes mount the same PVC.
The launcher needs no GPU; its service account must be allowed to create and read TrainJobs.
"""

from kfp import dsl, kubernetes
from kfp.dsl import Markdown

from components.image import IMAGE
from components.train_job.component import train_job
from pipelines import graph, resources
from pipelines.gdrt_pipeline import COMPONENTS, start_run_task
from pipelines.params import PIPELINE_DEFAULTS as D

PIPELINE_NAME = "gdrt-multinode"
SHARED_MOUNT = "/mnt/gdrt"  # the launcher step's mount of the shared PVC; TrainJob nodes use the same path
DEFAULT_PVC = resources.CACHE_PVC or "gdrt-cache"


def build_multinode_pipeline():
    """The pipeline function (cluster only: a TrainJob needs Kubernetes)."""

    @dsl.pipeline(name=PIPELINE_NAME, description="GDRT vs SFT fine-tuning, training as multi-node TrainJobs")
    def gdrt_multinode_pipeline(
        source: str = D["source"],
        source_format: str = D["source_format"],
        domain: str = D["domain"],
        base_model: str = D["base_model"],
        experiment: str = D["experiment"],
        run_name: str = D["run_name"],
        tau: float = D["tau"],
        num_groups: int = D["num_groups"],
        prior: str = D["prior"],
        num_nodes: int = 2,
        gpus_per_node: int = 8,
        runtime: str = "deepspeed-distributed",
        train_image: str = IMAGE,
        shared_pvc: str = DEFAULT_PVC,
        deepspeed: str = D["deepspeed"],
        eval_split: str = D["eval_split"],
        curate_settings: dict = D["curate_settings"],
        model_settings: dict = D["model_settings"],
        train_settings: dict = D["train_settings"],
        trainjob_settings: dict = {"launcher": "mpi"},  # noqa: B006
        group_settings: dict = D["group_settings"],
        eval_settings: dict = D["eval_settings"],
        valid_eval_settings: dict = D["valid_eval_settings"],
        attribute_settings: dict = D["attribute_settings"],
        parent_run_id: str = "",
    ) -> Markdown:
        params = dict(locals())  # the pipeline parameters by name: what the graph's steps read
        start = start_run_task(experiment=experiment, run_name=run_name, params={
            "source": source, "domain": domain, "base_model": base_model, "tau": tau, "num_groups": num_groups,
            "prior": prior, "num_nodes": num_nodes, "gpus_per_node": gpus_per_node,
        }, parent_run_id=parent_run_id)

        def make_task(step: graph.Step, args: dict) -> dsl.PipelineTask:
            if step.stage != "train":
                return COMPONENTS[step.stage](**args)
            args = {k: v for k, v in args.items() if k != "num_gpus"}  # GPUs: gpus_per_node x num_nodes
            task = train_job(**args, num_nodes=num_nodes, gpus_per_node=gpus_per_node, runtime=runtime,
                             image=train_image, pvc_name=shared_pvc, job_settings=trainjob_settings,
                             run_key=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
            kubernetes.mount_pvc(task, pvc_name=shared_pvc, mount_path=SHARED_MOUNT)
            return task

        tasks = graph.add_tasks({**params, "num_gpus": None}, start.output, make_task,
                                display_suffix={"train": " (TrainJob)"})
        return tasks["report"].outputs["page"]

    return gdrt_multinode_pipeline
