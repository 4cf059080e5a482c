import os

# Before prefect is imported anywhere: a cold temporary server needs more than 20 s here.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from bonsai.data import load_data  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synthetic():
    """4 classes of 1x8x8 prototype-plus-noise images: 256 train, 128 test."""
    return load_data({"name": "synthetic", "num_classes": 4, "num_train": 256, "num_test": 128})


@pytest.fixture(scope="session")
def digits():
    return load_data({"name": "digits"})


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (and database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "mlruns"
