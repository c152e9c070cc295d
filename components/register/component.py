from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(model: Input[Model], dataset: Input[Dataset], valid_eval: Input[Artifact], domain: str,
             parent_run_id: str) -> str:
    """Register the GDRT model as gdrt-<domain>; move alias `champion` only if it beats the current one."""
    from gdrt_core.registry import register_model

    return register_model(model.path, dataset.path, valid_eval.path, domain=domain, parent_run_id=parent_run_id)
