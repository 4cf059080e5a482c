"""`mlflow server`, after checking its backend store: a wrong PostgreSQL password, a database that
does not exist or a PostgreSQL that is down is one line and exit 2, in seconds. (`mlflow server`
itself retries the connection for minutes with stack traces in its log and never answers /health,
so clients only see a server that does not start.)

    python -m flows.mlflow_server --backend-store-uri postgresql+psycopg://bonsai:PASSWORD@127.0.0.1:5432/mlflow \\
        --serve-artifacts --artifacts-destination /srv/bonsai/mlartifacts --host 127.0.0.1 --port 5000

Every argument goes to `mlflow server` unchanged. MLflow's job execution (background workers for
its GenAI features: one job runner and seven Huey consumer processes, about 250 MB each, polling
the whole time) is off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION says otherwise: Bonsai uses
none of those jobs, and on a 2-core machine they took CPU from the runs the server tracks.
"""

from __future__ import annotations

import os
import sys


def backend_uri(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a == "--backend-store-uri" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--backend-store-uri="):
            return a.split("=", 1)[1]
    return os.environ.get("MLFLOW_BACKEND_STORE_URI")


def main(argv: list[str] | None = None) -> int:
    from bonsai.store import StoreError
    from tasks.mlflow_backend import probe_database

    args = list(sys.argv[1:] if argv is None else argv)
    uri = backend_uri(args)
    if uri and uri.startswith(("postgresql", "postgres:")):
        try:
            probe_database(uri, timeout=10)
        except StoreError as e:
            print(f"bonsai: error: the MLflow server's backend store: {e}", file=sys.stderr)
            return 2
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "server", *args])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
