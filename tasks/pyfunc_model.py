"""The MLflow pyfunc model every Bonsai variant is logged as (MLflow's "models from code": this
file is stored with the model and executed at load, so loading unpickles nothing).

    model = mlflow.pyfunc.load_model("models:/<name>@champion")   # or runs:/<run>/<stage>
    model.predict(raw_images)   # -> DataFrame: class_index, class_name, probabilities

It takes the images as the data set stores them and returns the same columns for torch and
ONNX variants; the work is done by `bonsai.predictor.Predictor` on the logged Bonsai artifact.
"""

from __future__ import annotations

import warnings

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

# The signature is logged explicitly (raw images in, a DataFrame out); MLflow's type-hint
# validation would only repeat it.
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")


class BonsaiModel(PythonModel):
    def load_context(self, context) -> None:
        from bonsai.predictor import Predictor

        self.predictor = Predictor(context.artifacts["bonsai_artifact"])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        out = self.predictor.predict(np.asarray(model_input))
        return pd.DataFrame(
            {
                "class_index": out["class_index"],
                "class_name": out["class_name"].astype(str),
                "probabilities": list(out["probabilities"]),
            }
        )


mlflow.models.set_model(BonsaiModel())
