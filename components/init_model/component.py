from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def init_model(dataset: Input[Dataset], base_model: str, settings: dict, model: Output[Model]):
    """The embedded default model for the dataset, built only when no base model is given."""
    from gdrt_core.stages import prepare_base_model

    model.metadata.update(prepare_base_model(base_model, settings, dataset=dataset.path, out=model.path))
