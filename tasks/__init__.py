"""Prefect tasks: run one stage (and evaluate it), compare, and every MLflow call (`tracking`)."""
