from kfp import dsl

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def start_tracking(experiment: str, run_name: str, params: dict, run_id: str) -> str:
    """Open the pipeline's parent MLflow run (or adopt `run_id`); every stage nests its run under it."""
    from gdrt_core.tracking import start_pipeline_run

    return start_pipeline_run(experiment, run_name, params, run_id=run_id)
