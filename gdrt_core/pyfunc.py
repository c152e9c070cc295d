"""The MLflow python model of a trained recommender, logged from code (imports mlflow; load it lazily).

`mlflow.pyfunc.load_model("models:/gdrt-office@champion").predict(df)` with a DataFrame whose `history`
column holds lists of titles (oldest first) returns a DataFrame with `recommendations` (titles, best first)
and `scores`. `params={"k": 5}` sets the list length (default 10).

This file is the model's code (MLflow "models from code"): `registry.register_model` logs it with
`python_model=<this file>` and the gdrt_core package in the model's `code/`, so the logged model holds no
pickle; loading it runs this file, whose last line hands MLflow the model object (`set_model`).
"""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model


class GdrtRecommenderModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from gdrt_core.recommend import Recommender

        self.recommender = Recommender.load(
            context.artifacts["model"], items=context.artifacts["items"], domain=context.model_config["domain"],
            device="cpu" if not _cuda() else "auto",
        )

    def predict(self, context, model_input: pd.DataFrame, params=None):
        """The rankings of `model_input`'s `history` lists (a list of lists is taken too, when called directly).
        The DataFrame hint tells MLflow the input type; the logged signature does the validation."""
        k = int((params or {}).get("k", 10))
        if isinstance(model_input, pd.DataFrame):
            if "history" not in model_input.columns:
                raise ValueError("the input DataFrame needs a `history` column (a list of titles per row)")
            histories = [list(h) for h in model_input["history"]]
        else:
            histories = [list(h) for h in model_input]
        results = self.recommender.recommend(histories, k=k)
        return pd.DataFrame({"recommendations": [r.titles for r in results], "scores": [r.scores for r in results]})


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


set_model(GdrtRecommenderModel())
