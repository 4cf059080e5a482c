"""Prefect flows. Importing this package sets the environment defaults Prefect needs here."""

import os

# A cold temporary Prefect server needs more than its default 20 s on a 2-core machine, and its
# telemetry cannot reach the internet (measured on the 2-core reference machine). Users' own settings win.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Never unpickle a model from the tracking store.
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
