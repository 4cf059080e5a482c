# Bonsai in a container: CPU-only torch, a non-root user, the store (mlruns/) as a volume.
#   docker build -t bonsai .
#   docker run --rm -v "$PWD/mlruns:/app/mlruns" bonsai                     # default pipeline
#   docker run --rm -v "$PWD/mlruns:/app/mlruns" bonsai teacher=cnn_large   # Hydra overrides
# compose.yaml runs this image as the MLflow server, the Prefect server and a worker.
FROM python:3.11-slim-bookworm

# The CPU wheels of torch (~200 MB instead of the multi-GB CUDA build). Versions: constraints.txt.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=90 \
    BONSAI_STORE=/app/mlruns

# git: runs record the commit they ran. Not version-pinned on purpose: Debian's security updates
# replace the pinned version in the archive, which would break the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY constraints.txt ./
# torch and torchvision from the CPU index first (pinned by constraints.txt: `==2.14.1` matches
# the CPU index's 2.14.1+cpu), so the project's install finds them satisfied.
RUN pip install --constraint constraints.txt --index-url "${TORCH_INDEX_URL}" torch torchvision
COPY pyproject.toml README.md ./
COPY bonsai ./bonsai
COPY tasks ./tasks
COPY flows ./flows
RUN pip install --constraint constraints.txt .
COPY conf ./conf
COPY prefect.yaml ./
COPY mlruns/README.md ./mlruns/README.md

# A non-root user owns the store; the store is a volume (runs, models, stage caches outlive the
# container).
RUN groupadd --gid 1000 bonsai \
    && useradd --create-home --uid 1000 --gid 1000 bonsai \
    && chown -R 1000:1000 /app/mlruns
USER 1000:1000
VOLUME ["/app/mlruns"]

# Where the container serves (MLflow server, Prefect server, worker: compose.yaml sets
# BONSAI_HEALTH_URL per service), the URL must answer 200; a one-shot pipeline run serves nothing.
HEALTHCHECK --interval=30s --timeout=10s --start-period=90s --retries=3 \
    CMD ["python", "-m", "flows.health"]

ENTRYPOINT ["python", "-m", "flows.compress"]
