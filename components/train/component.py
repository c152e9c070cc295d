from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(dataset: Input[Dataset], base: Input[Model], objective: str, settings: dict, num_gpus: int,
          deepspeed: str, parent_run_id: str, run_name: str, model: Output[Model], groups: Input[Artifact] = None,
          tau: float = None, prior: str = None, num_groups: int = None):
    """Fine-tune with SFT or GDRT (GDRT needs the Groups artifact and gets tau, prior, num_groups; SFT does
    not); DeepSpeed when `deepspeed` is set."""
    from gdrt_core.stages import run_step
    from gdrt_core.tracking import RunContext

    model.metadata.update(run_step(
        "train", settings, RunContext(parent_run_id, run_name), dataset=dataset.path, base=base.path,
        objective=objective, groups=groups.path if groups is not None else None, out=model.path, tau=tau,
        prior=prior, num_groups=num_groups, num_gpus=num_gpus, deepspeed=deepspeed,
    ))
