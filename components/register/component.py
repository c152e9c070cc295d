from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(model: Input[Model], dataset: Input[Dataset], valid_eval: Input[Artifact], domain: str,
             parent_run_id: str) -> str:
    """Register the GDRT model as gdrt-<domain>; move alias `champion` only if it beats the current one."""
    from gdrt_core.stages import run_step
    from gdrt_core.tracking import RunContext

    return run_step("register", None, RunContext(parent_run_id), model=model.path, dataset=dataset.path,
                    valid_eval=valid_eval.path, domain=domain)
