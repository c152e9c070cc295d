from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(dataset: Input[Dataset], model: Input[Model], split: str, settings: dict, parent_run_id: str,
             run_name: str, evaluation: Output[Artifact], metrics: Output[Metrics]):
    """Constrained beam search + ranking and fairness metrics on one split."""
    from gdrt_core.stages import run_step
    from gdrt_core.tracking import RunContext

    result = run_step("evaluate", settings, RunContext(parent_run_id, run_name), dataset=dataset.path,
                      model=model.path, split=split, out=evaluation.path)
    evaluation.metadata.update(result)
    for key, value in result.items():
        metrics.log_metric(key, value)
