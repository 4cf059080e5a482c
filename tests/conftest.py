import json
import os

# Before prefect is imported anywhere: a cold temporary server needs more than 20 s here.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
# Before torch is imported (libgomp reads it when it loads), and inherited by every command and
# server the tests start: two test processes, their commands and servers share 2 cores, and
# OpenMP threads that spin while waiting for work burn the cores the others need. On the 2-core
# EPYC, test_prune + test_quantize + test_caching with -n 2, two alternating rounds: 248 and
# 285 s (350 and 421 s user CPU) spinning, 190 and 206 s (229 and 236 s) passive.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from bonsai.data import load_data  # noqa: E402
from tests import export_cache, mlflow_template  # noqa: E402

# New SQLite stores made in this process start as a copy of the first one MLflow migrated here.
_TEMPLATE = Path(tempfile.mkdtemp(prefix="bonsai-mlflow-template-"))
atexit.register(shutil.rmtree, _TEMPLATE, True)
mlflow_template.install(_TEMPLATE / "mlflow.db")

# One folder for the session, made by the first process to load this file (the xdist controller,
# which removes it at the end) and inherited by its workers and every command they start: the
# export cache (tests/export_cache.py) and the migrated Prefect database the test servers start
# from (tests/servers/procs.py).
if "BONSAI_TEST_SESSION" not in os.environ:
    _SESSION = tempfile.mkdtemp(prefix="bonsai-test-session-")
    atexit.register(shutil.rmtree, _SESSION, True)
    os.environ["BONSAI_TEST_SESSION"] = _SESSION
    (Path(_SESSION) / "exports").mkdir()
    os.environ.setdefault(export_cache.ENV, str(Path(_SESSION) / "exports"))
    os.environ.setdefault("BONSAI_TEST_PREFECT_TEMPLATE", str(Path(_SESSION) / "prefect.db"))
export_cache.install()

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synthetic():
    """4 classes of 1x8x8 prototype-plus-noise images: 256 train, 128 test."""
    return load_data({"name": "synthetic", "num_classes": 4, "num_train": 256, "num_test": 128})


@pytest.fixture(scope="session")
def digits():
    return load_data({"name": "digits"})


@pytest.fixture(scope="session")
def prefect_server(_shared_prefect_server):
    """In-process flows talk to the test process's shared Prefect server (below)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: _shared_prefect_server}):
        yield


# The commands tests run (`python -m flows.compress`, promote, replay, ...) share one Prefect
# server per test process through PREFECT_API_URL, the set-up README's "Sweeps and concurrency"
# recommends: without it each command starts a temporary server of its own (4-5 s and most of a
# core while it starts; the suite runs about two hundred commands). Most of those commands start
# from the fork server of tests/helpers.py run_module (tests/forkserver.py). Tests of the temporary server
# itself run their commands with `temporary_server=True` (tests/helpers.py), which drops the
# variable. tests/servers starts servers of its own.
_USES_COMMANDS: dict[str, bool] = {}


def _runs_commands(module) -> bool:
    name = module.__name__
    if name not in _USES_COMMANDS:
        path = Path(module.__file__)
        text = path.read_text()
        _USES_COMMANDS[name] = "servers" not in path.parts and any(
            s in text for s in ('"flows.', "run_cli", "start_cli")
        )
    return _USES_COMMANDS[name]


@pytest.fixture(scope="session")
def _shared_prefect_server(tmp_path_factory):
    from tests.servers.procs import PrefectServer

    server = PrefectServer(tmp_path_factory.mktemp("shared-prefect"), persist_events=False)
    server.start()
    yield server.api
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def _commands_share_a_prefect_server(request):
    """Module-scoped and autouse, so it comes before the module fixtures that run commands."""
    if "PREFECT_API_URL" in os.environ or not _runs_commands(request.module):
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_API_URL", request.getfixturevalue("_shared_prefect_server"))
        yield


# Heaviest test files first. `make test` hands whole files to 2 workers (--dist loadfile,
# --no-loadscope-reorder: in this order); xdist's own order (files with the most tests first)
# left the few-test, minute-long server and sweep files for last, one worker finishing them while
# the other idled. Seconds per file from an earlier run: `BONSAI_TEST_DURATIONS=tests/durations.json
# make test` rewrites the table; a file it does not know counts 5 s.
DURATIONS = Path(__file__).with_name("durations.json")
_MEASURED: dict[str, float] = {}


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with tests/servers as one unit: its files share one set of PostgreSQL,
    MLflow and Prefect servers (tests/servers/conftest.py), started once on the worker that runs
    them instead of once on each (~30 s of CPU each time, and a Prefect server's polling while
    it idles)."""
    if config.getoption("dist", None) != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "tests/servers/" if scope.startswith("tests/servers/") else scope

    return Scheduling(config, log)


def pytest_collection_modifyitems(config, items):
    try:
        known = json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        known = {}
    items.sort(key=lambda item: -float(known.get(_file_of(item.nodeid), 5.0)))  # stable


def pytest_runtest_logreport(report):
    if os.environ.get("BONSAI_TEST_DURATIONS"):
        f = _file_of(report.nodeid)
        _MEASURED[f] = _MEASURED.get(f, 0.0) + report.duration


def pytest_sessionfinish(session):
    out = os.environ.get("BONSAI_TEST_DURATIONS")
    if out and _MEASURED and not hasattr(session.config, "workerinput"):  # the controller
        table = {f: round(t, 1) for f, t in sorted(_MEASURED.items(), key=lambda x: -x[1])}
        Path(out).write_text(json.dumps(table, indent=0) + "\n")


def pytest_terminal_summary(terminalreporter, config):
    where = export_cache.folder()
    n = export_cache.counts(where) if where is not None else {"hit": 0, "miss": 0}
    if n["hit"] + n["miss"] and not hasattr(config, "workerinput"):
        terminalreporter.write_line(
            f"ONNX exports (tests/export_cache.py): {n['miss']} by torch's exporter, "
            f"{n['hit']} copies of an identical model's"
        )


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "mlruns"
