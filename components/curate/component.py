from kfp import dsl
from kfp.dsl import Dataset, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def curate(source: str, source_format: str, domain: str, settings: dict, parent_run_id: str,
           dataset: Output[Dataset]):
    """Source data -> Dataset artifact (items + train/valid/test windows)."""
    from gdrt_core.stages import run_step
    from gdrt_core.tracking import RunContext

    dataset.metadata.update(run_step("curate", settings, RunContext(parent_run_id), source=source,
                                     source_format=source_format, domain=domain, out=dataset.path))
