from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def report(dataset: Input[Dataset], sft_eval: Input[Artifact], gdrt_eval: Input[Artifact],
           sft_attribution: Input[Artifact], gdrt_attribution: Input[Artifact], title: str, parent_run_id: str,
           page: Output[Markdown]):
    """SFT vs GDRT comparison (Markdown + HTML + plots; the paired differences with bootstrap intervals over the
    evaluated examples), logged to the parent MLflow run."""
    from gdrt_core.stages import run_step
    from gdrt_core.tracking import RunContext

    page.metadata.update(run_step(
        "report", None, RunContext(parent_run_id), dataset=dataset.path, sft_eval=sft_eval.path,
        gdrt_eval=gdrt_eval.path, sft_attribution=sft_attribution.path, gdrt_attribution=gdrt_attribution.path,
        title=title, out=page.path,
    ))
