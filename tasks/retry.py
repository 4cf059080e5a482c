"""Retry MLflow tracking calls through transient faults of the tracking server or database.

A shared tracking server gets restarted (an upgrade, a crashed container brought back by its
supervisor) while pipelines run; a run must not fail for that. Every MLflow call Bonsai makes in
`tasks/tracking.py` (and `tasks/mlflow_backend.py`) goes through `call` or through the client `client()`
returns, which retry a call that failed for a transient reason with exponential backoff:

- the server did not answer (connection refused or reset, a timeout), or answered 5xx/429;
- a database store (`tracking.uri=postgresql+psycopg://...`, the local SQLite store) lost its
  connection or was locked (SQLAlchemy's OperationalError).

MLflow's own HTTP client already retries refused connections and 5xx for a few minutes
(MLFLOW_HTTP_REQUEST_MAX_RETRIES=7, backoff factor 2); this layer adds the same for database
URIs, for what escapes MLflow's retries (its budget ran out, a reset in the middle of a
multi-request call), and one readable line per retry instead of urllib3's. Anything else (a 4xx:
a bad request, a missing run) is raised at once: retrying would not change it.

Budget: `BONSAI_TRACKING_RETRY_SECONDS` (default 300) of waiting in all per call, backoff from
1 s doubling to at most 30 s between attempts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

log = logging.getLogger("bonsai")

T = TypeVar("T")

# Words in an error (or its causes) that mean the request never got an answer, or got one from
# a server or database that is restarting: retrying later can succeed.
_TRANSIENT_WORDS = (
    "connection refused",
    "connection reset",
    "connection aborted",
    "remote end closed connection",
    "remotedisconnected",
    "max retries exceeded",
    "temporarily unavailable",
    "temporarily_unavailable",
    "request_limit_exceeded",
    "too many requests",
    "timed out",
    "read timeout",
    "server closed the connection",
    "terminating connection due to administrator command",
    "the database system is starting up",
    "the database system is shutting down",
    "could not connect to server",
    "connection to server at",
    "database is locked",
    "too many 500 error responses",
    "too many 502 error responses",
    "too many 503 error responses",
    "too many 504 error responses",
    "bad gateway",
    "service unavailable",
    "gateway timeout",
)
# ...but these mean the server answered and refused: waiting will not help.
_PERMANENT_WORDS = ("password authentication failed", "does not exist", "permission denied")


def _chain(err: BaseException):
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_transient(err: BaseException) -> bool:
    """Whether `err` (from an MLflow call) is worth retrying."""
    import requests

    for e in _chain(err):
        text = f"{type(e).__name__}: {e}".lower()
        if any(w in text for w in _PERMANENT_WORDS):
            return False
        if isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if any(w in text for w in _TRANSIENT_WORDS):
            return True
        code = getattr(e, "error_code", None)  # MlflowException
        if code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        status = getattr(e, "get_http_status_code", None)
        if callable(status) and code not in (None, "INTERNAL_ERROR"):
            try:
                if int(status()) in (429, 502, 503, 504):
                    return True
            except (TypeError, ValueError):
                pass
    return False


def budget_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("BONSAI_TRACKING_RETRY_SECONDS", "300")))
    except ValueError:
        return 300.0


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, retried with backoff while it fails for a transient reason."""
    deadline = time.monotonic() + budget_seconds()
    delay = 1.0
    attempt = 1
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            left = deadline - time.monotonic()
            if not is_transient(e) or left <= 0:
                raise
            wait = min(delay, 30.0, left)
            name = getattr(fn, "__qualname__", getattr(fn, "__name__", "call"))
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            log.warning(
                f"tracking call {name} failed ({first}); retry {attempt} in {wait:.0f} s "
                f"(giving up after {budget_seconds():.0f} s)"
            )
            time.sleep(wait)
            delay *= 2
            attempt += 1


def retrying(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator form of `call`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return call(fn, *args, **kwargs)

    return wrapper


class RetryingClient:
    """An `MlflowClient` whose every method call goes through `call`."""

    def __init__(self, *args: Any, **kwargs: Any):
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if callable(attr):
            return retrying(attr)
        return attr


def client(*args: Any, **kwargs: Any) -> Any:
    """`MlflowClient(*args, **kwargs)` with retries (typed Any: it has MlflowClient's methods)."""
    return RetryingClient(*args, **kwargs)


@contextlib.contextmanager
def started_run(**kwargs: Any) -> Iterator[Any]:
    """`with mlflow.start_run(**kwargs) as run:` with the start and the end retried: the run
    ends FINISHED, or FAILED if the block raised (MLflow's own semantics)."""
    import mlflow

    run = call(mlflow.start_run, **kwargs)
    ok = False
    try:
        yield run
        ok = True
    finally:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run.info.run_id:
            call(mlflow.end_run, "FINISHED" if ok else "FAILED")
