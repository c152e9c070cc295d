from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def init_model(dataset: Input[Dataset], base_model: str, settings: dict, model: Output[Model]):
    """The base model: the embedded default model built for the dataset ('' or embedded:tiny|small), a pretrained
    backbone from the package index (pretrained:smollm2-135m), a converted GGUF file (gguf:FILE), or a reference
    to a model directory / hub id."""
    from gdrt_core.stages import run_step

    model.metadata.update(run_step("init-model", settings, base_model=base_model, dataset=dataset.path,
                                   out=model.path))
