"""The MLflow pyfunc model every Bonsai variant is logged as (MLflow's "models from code": this
file is stored with the model and executed at load, so loading unpickles nothing).

    model = mlflow.pyfunc.load_model("models:/<name>@champion")   # or runs:/<run>/<stage>
    model.predict(raw_images)   # -> DataFrame: class_index, class_name, probabilities
                                #    (+ <head>_index, <head>_name, <head>_probabilities per head)

It takes the images as the data set stores them and returns the same columns for torch, ONNX and
LiteRT variants; the work is done by `bonsai.predictor.Predictor` on the logged Bonsai artifact.
"""

# No `from __future__ import annotations`: MLflow reads `predict`'s type hints as objects.
import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class BonsaiModel(PythonModel):
    def load_context(self, context) -> None:
        from bonsai.predictor import Predictor

        self.predictor = Predictor(context.artifacts["bonsai_artifact"])

    # The input type hint is MLflow's to read: with an ndarray hint MLflow neither validates nor
    # infers a schema from it (the signature is logged explicitly: raw images in, the DataFrame
    # out), and it no longer warns "Add type hints to the `predict` method" each time this file
    # is executed (once per logged and per loaded model).
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        return pd.DataFrame(self.predictor.columns(np.asarray(model_input)))


mlflow.models.set_model(BonsaiModel())
