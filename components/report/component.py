from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def report(sft_eval: Input[Artifact], gdrt_eval: Input[Artifact], sft_attribution: Input[Artifact],
           gdrt_attribution: Input[Artifact], title: str, parent_run_id: str, page: Output[Markdown]):
    """SFT vs GDRT comparison (Markdown + HTML + plots), logged to the parent MLflow run."""
    from gdrt_core.stages import run_report

    page.metadata.update(run_report(
        [("SFT", sft_eval.path, sft_attribution.path), ("GDRT", gdrt_eval.path, gdrt_attribution.path)],
        out=page.path, title=title, parent_run_id=parent_run_id,
    ))
