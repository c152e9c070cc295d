from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(dataset: Input[Dataset], base: Input[Model], objective: str, settings: dict, tau: float, prior: str,
          num_groups: int, num_gpus: int, deepspeed: str, parent_run_id: str, run_name: str, model: Output[Model],
          groups: Input[Artifact] = None):
    """Fine-tune with SFT or GDRT (GDRT needs the Groups artifact); DeepSpeed when `deepspeed` is set."""
    from gdrt_core.stages import model_source, run_stage

    model.metadata.update(run_stage(
        "train", {**settings, "run_name": run_name}, parent_run_id=parent_run_id, dataset=dataset.path, model=model_source(base.path),
        objective=objective, groups=groups.path if groups is not None else None, out=model.path, tau=tau,
        prior=prior, num_groups=num_groups, num_gpus=num_gpus, deepspeed=deepspeed or None,
    ))
