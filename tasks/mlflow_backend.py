"""The MLflow backend of a store: check it (and the servers a run needs) before any work, create
its database once, repair or refuse a damaged one, and follow it when it is copied or moved.

- `check_store` runs before data is loaded or a run is created, and needs no MLflow import:
  a store path that is a file, a folder that cannot be written, a database that is not SQLite or
  fails SQLite's quick check, and a tracking server that does not answer are each refused in
  seconds with one message (the CLI exits 2).
- `init_store` creates the MLflow database and experiment under the store's file lock, so
  commands started together on a new store do not run MLflow's migrations at once (which left
  the schema half-migrated). A database whose migration was interrupted (alembic's temporary
  tables left behind, or a schema revision other than MLflow's head) is moved aside and created
  again when it holds no runs, and refused with the command that repairs it when it does.
- Relocation: MLflow keeps absolute `file://` paths (the experiment's artifact location, each
  run's and logged model's artifact folder). `store.json` remembers where the store was last
  used; when that differs from where it is now (the store was copied or moved), those paths are
  rewritten to the new location, under the lock, before any run starts.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from bonsai.store import StoreError, read_layout, store_lock, write_layout

SQLITE_HEADER = b"SQLite format 3\x00"
# Columns where MLflow stores absolute artifact locations (MLflow 3.x schema).
PATH_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


def store_uri(uri: str | None, store_dir: str) -> str:
    if uri:
        return uri
    return f"sqlite:///{Path(store_dir).resolve() / 'mlflow.db'}"


def check_store(uri: str | None, store_dir: str, probe_timeout: float = 10.0) -> None:
    """Refuse, in seconds and before any work, a store or server that cannot be used."""
    root = Path(store_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise StoreError(
            f"tracking.store_dir {str(root)!r} is a file, not a folder; point "
            "tracking.store_dir at a folder (it is created if missing)"
        )
    # Nothing is created here: a run refused later (bad data) must leave no store behind.
    unwritable = (
        f"tracking.store_dir {str(root)!r} is not writable ({{}}); make it writable or point "
        "tracking.store_dir at a folder you can write"
    )
    # A real write, not a permission check: as root every mode bit says yes, and /proc or a
    # read-only mount still refuses (the run would fail a minute later instead).
    if root.is_dir():
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=root)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise StoreError(unwritable.format(e.strerror)) from None
    else:
        ancestor = next(p for p in root.absolute().parents if p.exists())
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=ancestor))
        except OSError as e:
            why = f"cannot create it in {str(ancestor)!r}: {e.strerror}"
            raise StoreError(unwritable.format(why)) from None
    if uri and uri.startswith(("http://", "https://")):
        probe_server(uri, probe_timeout)
    elif uri and uri.startswith(("postgresql", "postgres:")):
        probe_database(uri, probe_timeout)
    elif not uri:
        check_database(root / "mlflow.db")
    prefect_url = _prefect_api_url()
    if prefect_url:
        probe_prefect(prefect_url, probe_timeout)


def _prefect_api_url() -> str | None:
    """PREFECT_API_URL (environment or the active Prefect profile); None: a temporary server."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    try:
        from prefect.settings import get_current_settings
    except ImportError:
        return None
    value = get_current_settings().api.url
    return str(value) if value else None


def _wait_healthy(base: str, timeout: float, give_up_on: tuple[int, ...]) -> str | None:
    """Poll `base`/health once a second for up to `timeout` s: None once it answers 200, else
    the last failure (at once for an HTTP status in `give_up_on`)."""
    health = base.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(health, timeout=5) as r:
                if r.status == 200:
                    return None
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
            if e.code in give_up_on:
                return last
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = str(getattr(e, "reason", e))
        if time.monotonic() >= deadline:
            return last
        time.sleep(1.0)


def probe_prefect(url: str, timeout: float) -> None:
    """Wait up to `timeout` s for a Prefect API's /health; refuse with what to start.

    Without this a command pointed at a Prefect server that is down waits in Prefect's client
    retries for minutes before failing with a stack trace."""
    last = _wait_healthy(url, timeout, give_up_on=(401, 403, 404))  # 404: not a Prefect API
    if last is None:
        return
    raise StoreError(
        f"the Prefect API at {url} (PREFECT_API_URL) does not answer ({last}); start the server "
        "(`prefect server start --host 127.0.0.1 --port 4200`, then "
        "PREFECT_API_URL=http://127.0.0.1:4200/api), or unset PREFECT_API_URL to run with a "
        "temporary server"
    )


def _redact(uri: str) -> str:
    """The URI without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def probe_database(uri: str, timeout: float) -> None:
    """Connect once to a PostgreSQL URI (a tracking store or an MLflow server's backend store);
    refuse a wrong password, a missing database or a server that is down, in seconds."""
    from urllib.parse import unquote, urlsplit

    shown = _redact(uri)
    scheme = uri.split("://", 1)[0]
    if scheme not in ("postgresql+psycopg", "postgresql+psycopg2"):
        raise StoreError(
            f"{shown}: name the driver in the URI, postgresql+psycopg://user:password@host:port/"
            "database (psycopg 3 is what Bonsai installs)"
        )
    try:
        import psycopg
    except ImportError:
        raise StoreError(
            "a PostgreSQL store needs psycopg: pip install 'psycopg[binary]'"
        ) from None
    parts = urlsplit(uri)
    try:
        with psycopg.connect(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            dbname=parts.path.lstrip("/") or None,
            connect_timeout=max(1, int(min(timeout, 10))),
        ) as con:
            con.execute("SELECT 1")
    except psycopg.OperationalError as e:
        why = " ".join(str(e).split())
        if "password authentication failed" in why or "no password supplied" in why:
            fix = "fix the password in the URI (the user's PostgreSQL password)"
        elif "does not exist" in why:
            fix = "create it (createdb -h HOST -p PORT -U USER DATABASE) or fix its name"
        else:
            fix = "start PostgreSQL there, or fix host and port"
        raise StoreError(f"cannot use the PostgreSQL store {shown}: {why}; {fix}") from None


def check_database(db: Path) -> None:
    """A present mlflow.db must be an intact SQLite file (read-only check, no MLflow import)."""
    if not db.exists() or db.stat().st_size == 0:
        return  # created (again) by init_store
    fix = (
        f"move it aside (mv {db} {db}.bad) to start a new tracking database; the stage artifacts "
        "and cached results in the store are kept and reused"
    )
    with open(db, "rb") as f:
        header = f.read(16)
    if header != SQLITE_HEADER:
        raise StoreError(f"{str(db)!r} is not an SQLite database (damaged or overwritten); {fix}")
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
            verdict = con.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{str(db)!r} cannot be read as a database ({e}); {fix}") from None
    if verdict != "ok":
        raise StoreError(f"{str(db)!r} fails SQLite's integrity check ({verdict}); {fix}")


def probe_server(uri: str, timeout: float) -> None:
    """Wait up to `timeout` s for an MLflow server's /health; refuse with what to start."""
    last = _wait_healthy(uri, timeout, give_up_on=(401, 403))  # refused: waiting will not help
    if last is None:
        return
    raise StoreError(
        f"the MLflow tracking server at {uri} does not answer ({last}); start it, e.g. "
        "`mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$PWD/mlruns/"
        'mlflow.db` (on PostgreSQL: `python -m flows.mlflow_server ...`, README "Run as a '
        'service"; a server whose database refuses it never answers: check its log), or use '
        "the local store with tracking=local"
    )


def _db_state(db: Path) -> tuple[str, int]:
    """('missing' | 'ok' | 'half', runs) read with sqlite3; 'half' = an interrupted migration."""
    if not db.exists() or db.stat().st_size == 0:
        return "missing", 0
    from mlflow.store.db.utils import _get_latest_schema_revision

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        runs = con.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
        if not tables:
            return "missing", 0
        if any(t.startswith("_alembic_tmp") for t in tables) or "alembic_version" not in tables:
            return "half", runs
        rev = con.execute("SELECT version_num FROM alembic_version").fetchall()
    if [r[0] for r in rev] != [_get_latest_schema_revision()]:
        return "half", runs
    return "ok", runs


def init_store(uri: str | None, store_dir: str, experiment: str) -> tuple[str, str]:
    """Create (once, under the store lock) the database and the experiment; returns (uri, id).

    For a local store the experiment's artifacts go under `<store_dir>/artifacts/` explicitly:
    otherwise MLflow points them at the working directory of whoever created the database.
    """
    import mlflow

    from tasks import retry

    root = Path(store_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    resolved = store_uri(uri, store_dir)
    local = resolved.startswith("sqlite:///")
    # A database URI (no server in between): MLflow would put artifacts under the cwd.
    database = local or resolved.startswith("postgresql")
    with store_lock(root):
        if local:
            _repair_or_refuse(root / "mlflow.db")
            _relocate(root)
        mlflow.set_tracking_uri(resolved)
        client = retry.client(resolved)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            location = (root / "artifacts" / experiment).as_uri() if database else None
            exp_id = client.create_experiment(
                experiment, artifact_location=location, tags=EXPERIMENT_TAGS
            )
        else:
            exp_id = exp.experiment_id
            for k, v in EXPERIMENT_TAGS.items():
                if exp.tags.get(k) != v:
                    client.set_experiment_tag(exp_id, k, v)
        if local:
            write_layout(root)
    return resolved, exp_id


# MLflow's UI opens an experiment on its GenAI overview unless it says what kind it is.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": "Bonsai model-compression runs: one parent run per pipeline "
    "execution, one child run per stage.",
}


def _repair_or_refuse(db: Path) -> None:
    state, runs = _db_state(db)
    if state != "half":
        return
    if runs:
        raise StoreError(
            f"{str(db)!r} was left half-migrated (an MLflow schema migration was interrupted) "
            f"and holds {runs} run(s); back it up, then run `mlflow db upgrade sqlite:///{db}`"
        )
    aside = db.with_name(f"{db.name}.half-migrated-{int(time.time())}")
    os.replace(db, aside)
    print(
        f"bonsai: {db} was left half-migrated by an interrupted creation and held no runs; "
        f"moved it to {aside.name} and created it again",
        flush=True,
    )


def _relocate(root: Path) -> None:
    """Rewrite MLflow's absolute artifact paths when the store was copied or moved here.

    Where the paths point is read from the database itself, not from store.json (a file anyone
    can edit): a store.json naming another root changes nothing. They are rewritten only when
    this store holds the artifacts they name; otherwise the command is refused with the fix."""
    db = root / "mlflow.db"
    if not db.exists():
        return
    old = _root_from_db(db)
    layout = read_layout(root)
    if old is not None and layout is not None and Path(layout["root"]) != old:
        print(
            f"bonsai: {root / 'store.json'} names {layout['root']} as the store's last place, "
            f"but mlflow.db's artifact paths are under {old}: trusting the database "
            "(store.json is rewritten)",
            file=sys.stderr,
            flush=True,
        )
    if old is None or old == root:
        return
    if not (root / "artifacts").is_dir():
        raise StoreError(
            f"{str(db)!r} records its artifacts under {str(old)!r}, and this store has no "
            f"artifacts/ folder: it is not a copy of that store. Copy the whole store folder "
            f"(cp -a {old} {root}) or point tracking.store_dir at {old}"
        )
    pairs = [(old.as_uri() + "/", root.as_uri() + "/"), (str(old) + "/", str(root) + "/")]
    with sqlite3.connect(db, timeout=60) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        columns = {t: {r[1] for r in con.execute(f'PRAGMA table_info("{t}")')} for t in tables}
        changed = 0
        for table, col in PATH_COLUMNS:
            if col not in columns.get(table, ()):
                continue
            for a, b in pairs:
                cur = con.execute(
                    f'UPDATE "{table}" SET "{col}" = ? || substr("{col}", ?) '
                    f'WHERE substr("{col}", 1, ?) = ?',
                    (b, len(a) + 1, len(a), a),
                )
                changed += cur.rowcount
    print(f"bonsai: the store moved from {old} to {root}; updated {changed} path(s)", flush=True)


def _root_from_db(db: Path) -> Path | None:
    """A store made before store.json: the root its experiments' artifact folders point into."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        rows = con.execute("SELECT artifact_location FROM experiments").fetchall()
    for (loc,) in rows:
        if loc and loc.startswith("file://") and "/artifacts/" in loc:
            from urllib.parse import unquote, urlparse

            return Path(unquote(urlparse(loc).path.rsplit("/artifacts/", 1)[0]))
    return None
