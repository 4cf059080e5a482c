"""Bonsai's library: data, models, stages, artifacts and measurement.

This package never imports prefect, mlflow or hydra; `tasks/` and `flows/` wrap it for
orchestration and tracking.
"""

__version__ = "0.1.0"
