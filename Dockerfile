# Bonsai in a container: installs the project and runs the default pipeline on the embedded data.
#   docker build -t bonsai .
#   docker run --rm -v "$PWD/mlruns:/app/mlruns" bonsai                 # default pipeline
#   docker run --rm -v "$PWD/mlruns:/app/mlruns" bonsai teacher=cnn_large   # Hydra overrides
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=90

RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bonsai ./bonsai
COPY tasks ./tasks
COPY flows ./flows
RUN pip install .
COPY conf ./conf
COPY mlruns/README.md ./mlruns/README.md

ENTRYPOINT ["python", "-m", "flows.compress"]
