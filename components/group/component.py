from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def group(dataset: Input[Dataset], reference: Input[Model], settings: dict, num_groups: int, parent_run_id: str,
          groups: Output[Artifact]):
    """Group target tokens by their history-removed log-probability under the reference model."""
    from gdrt_core.stages import run_step
    from gdrt_core.tracking import RunContext

    groups.metadata.update(run_step("group", settings, RunContext(parent_run_id), dataset=dataset.path,
                                    reference=reference.path, num_groups=num_groups, out=groups.path))
