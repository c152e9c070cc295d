from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def attribute(dataset: Input[Dataset], model: Input[Model], split: str, settings: dict, parent_run_id: str,
              run_name: str, attribution: Output[Artifact], groups: Input[Artifact] = None):
    """Feature-ablation attribution: how much the model relies on auxiliary vs history tokens."""
    from gdrt_core.stages import run_step
    from gdrt_core.tracking import RunContext

    attribution.metadata.update(run_step(
        "attribute", settings, RunContext(parent_run_id, run_name), dataset=dataset.path, model=model.path,
        split=split, groups=groups.path if groups is not None else None, out=attribution.path,
    ))
