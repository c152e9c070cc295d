from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_job(dataset: Input[Dataset], base: Input[Model], objective: str, settings: dict, deepspeed: str,
              num_nodes: int, gpus_per_node: int, runtime: str, image: str, pvc_name: str, job_settings: dict,
              run_key: str, parent_run_id: str, run_name: str, model: Output[Model], groups: Input[Artifact] = None,
              tau: float = None, prior: str = None, num_groups: int = None):
    """Train on several nodes: stage the inputs on the shared PVC, submit a Kubeflow Trainer TrainJob
    running `gdrt train`, wait for it, and copy the trained Model artifact back."""
    from gdrt_core.tracking import RunContext
    from pipelines.trainjob import run_step

    model.metadata.update(run_step(
        job_settings, settings, context=RunContext(parent_run_id, run_name), num_nodes=num_nodes,
        gpus_per_node=gpus_per_node, runtime=runtime, image=image, pvc_name=pvc_name,
        run_key=f"{run_key}-{objective}", dataset=dataset.path, base=base.path,
        groups=groups.path if groups is not None else None, out=model.path, objective=objective, tau=tau,
        prior=prior, num_groups=num_groups, deepspeed=deepspeed,
    ))
