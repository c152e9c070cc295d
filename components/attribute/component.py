from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def attribute(dataset: Input[Dataset], model: Input[Model], split: str, settings: dict, parent_run_id: str,
              run_name: str, attribution: Output[Artifact], groups: Input[Artifact] = None):
    """Feature-ablation attribution: how much the model relies on auxiliary vs history tokens."""
    from gdrt_core.stages import model_source, run_stage

    attribution.metadata.update(run_stage(
        "attribute", {**settings, "run_name": run_name}, parent_run_id=parent_run_id, dataset=dataset.path,
        model=model_source(model.path), split=split, groups=groups.path if groups is not None else None,
        out=attribution.path,
    ))
