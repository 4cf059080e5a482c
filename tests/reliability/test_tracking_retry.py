"""The retry wrapper around MLflow tracking calls (tasks/retry.py): transient faults are retried
with backoff, anything else is raised at once, and the wait is bounded."""

from __future__ import annotations

import pytest
import requests
from mlflow.exceptions import MlflowException

from tasks import retry


@pytest.fixture
def sleeps(monkeypatch):
    waited: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", waited.append)
    return waited


def _flaky(failures: list[BaseException]):
    calls = []

    def fn(x):
        calls.append(x)
        if failures:
            raise failures.pop(0)
        return x * 2

    return fn, calls


def test_a_server_that_comes_back_is_retried_with_backoff(sleeps):
    refused = MlflowException(
        "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/create failed with exception "
        "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url: ... "
        "(Caused by NewConnectionError(... [Errno 111] Connection refused))"
    )
    fn, calls = _flaky([refused, requests.exceptions.ConnectionError("reset"), refused])
    assert retry.call(fn, 21) == 42
    assert len(calls) == 4
    assert sleeps == [1.0, 2.0, 4.0]  # exponential backoff


def test_a_database_that_restarts_is_retried(sleeps):
    from sqlalchemy.exc import OperationalError

    err = OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
    fn, calls = _flaky([err])
    assert retry.call(fn, 1) == 2
    assert len(calls) == 2


@pytest.mark.parametrize(
    "err",
    [
        MlflowException("Run 'abc' not found", error_code="RESOURCE_DOES_NOT_EXIST"),
        MlflowException("Invalid value for param", error_code="INVALID_PARAMETER_VALUE"),
        ValueError("a bug"),
        Exception('FATAL: password authentication failed for user "bonsai"'),
    ],
    ids=["missing-run", "bad-request", "bug", "wrong-password"],
)
def test_errors_that_waiting_cannot_fix_are_raised_at_once(err, sleeps):
    fn, calls = _flaky([err])
    with pytest.raises(type(err)) as raised:
        retry.call(fn, 1)
    assert raised.value is err  # the error itself, not another one raised on the way
    assert len(calls) == 1 and sleeps == []


def test_the_wait_is_bounded(monkeypatch, sleeps):
    monkeypatch.setenv("BONSAI_TRACKING_RETRY_SECONDS", "0")
    fn, calls = _flaky([ConnectionRefusedError("refused")] * 5)
    with pytest.raises(ConnectionRefusedError):
        retry.call(fn, 1)
    assert len(calls) == 1


def test_the_client_retries_each_method(monkeypatch, sleeps):
    c = retry.client("sqlite:///:memory:")
    fn, calls = _flaky([ConnectionResetError("reset")])
    monkeypatch.setattr(c._client, "get_run", fn)
    assert c.get_run(5) == 10
    assert len(calls) == 2
