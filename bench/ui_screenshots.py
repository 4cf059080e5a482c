"""Look at what a user sees: the MLflow and Prefect UIs in a real headless browser.

    python bench/ui_screenshots.py [OUT_DIR]      # default OUT_DIR: .cache/ui (in the checkout)

Needs Debian's Chromium (`apt-get install chromium`) and Playwright's Python package
(`pip install -e '.[ui]'`; it drives /usr/bin/chromium, it downloads no browser).

In a fresh store, against a `prefect server start` of its own: the default pipeline with
`promote=edge_small`, then a 2-job sweep over the student's temperature (teacher cached). Then
`mlflow server` on the store, and screenshots of:

  mlflow-runs.png     the runs table: run names, the sweep variable and headline metrics as
                      columns, the parents expanded to their stage runs
  mlflow-charts.png   the chart view comparing the runs
  mlflow-pareto.png   the Pareto plot of the last run, as the artifact viewer shows it
  mlflow-registry.png the registered model bonsai-digits-edge_small: its versions and aliases
  prefect-graph.png   the Prefect flow run of the last job: its task graph
  prefect-artifacts.png  the flow run's artifacts tab (the comparison table)

It prints the paths; open them and judge them as a user comparing variants would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, PrefectServer, pipeline_runs, run_cli  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
SWEEP_KEY = "pipeline.stages.student.temperature"
REGISTERED = "bonsai-digits-edge_small"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


def mlflow_server(store: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health")
    return proc, url


def shoot_mlflow(page, url: str, exp_id: str, last_parent: str, out: Path) -> None:
    import re

    page.goto(f"{url}/#/experiments/{exp_id}/runs")
    page.wait_for_selector("text=default #1", timeout=90_000)
    close = page.get_by_role("button", name="Close")  # the Assistant side panel, if shown
    if close.count():
        close.first.click()
    # Columns a user comparing variants adds: the sweep variable and the headline numbers.
    for column in (SWEEP_KEY, "int8.accuracy", "int8.speedup", "int8.size_ratio", "int8.bytes"):
        page.get_by_role("button", name="Columns", exact=True).click()
        page.get_by_placeholder("Search columns").fill(column)
        page.wait_for_timeout(500)
        row = page.locator("[class*='tree-treenode']").filter(
            has_text=re.compile(r"^" + re.escape(column) + r"$")
        )
        row.last.locator("[class*='tree-checkbox']").first.click()
        page.keyboard.press("Escape")
    page.wait_for_timeout(1500)
    page.screenshot(path=str(out / "mlflow-runs.png"))

    page.goto(f"{url}/#/experiments/{exp_id}/runs?compareRunsMode=CHART")
    page.wait_for_timeout(9000)
    page.screenshot(path=str(out / "mlflow-charts.png"))

    page.goto(f"{url}/#/experiments/{exp_id}/runs/{last_parent}/artifacts/plots/pareto.png")
    page.wait_for_selector("img", timeout=90_000)
    page.wait_for_timeout(2500)
    page.screenshot(path=str(out / "mlflow-pareto.png"))

    page.goto(f"{url}/#/models/{REGISTERED}")
    page.wait_for_selector("text=champion", timeout=90_000)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(out / "mlflow-registry.png"))


def shoot_prefect(page, api_url: str, flow_run_id: str, out: Path) -> None:
    ui = api_url.removesuffix("/api")
    page.goto(f"{ui}/runs/flow-run/{flow_run_id}")
    page.wait_for_timeout(8000)
    page.screenshot(path=str(out / "prefect-graph.png"))
    tab = page.get_by_role("tab", name="Artifacts")
    if tab.count():
        tab.first.click()
        page.wait_for_timeout(3000)
    page.screenshot(path=str(out / "prefect-artifacts.png"), full_page=True)


def browser(p):
    return p.chromium.launch(
        executable_path=CHROMIUM,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync"],
    )  # fmt: skip


def reuse(store: Path, out: Path) -> None:
    """`--reuse STORE`: only the MLflow screenshots, of a store made by an earlier run."""
    from playwright.sync_api import sync_playwright

    last = pipeline_runs(store)[-1]
    proc, url = mlflow_server(store)
    try:
        with sync_playwright() as p:
            b = browser(p)
            page = b.new_page(viewport={"width": 2300, "height": 1000})
            shoot_mlflow(page, url, last.info.experiment_id, last.info.run_id, out)
            b.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    from playwright.sync_api import sync_playwright

    args = sys.argv[1:]
    out = Path(
        next(
            (a for a in args if not a.startswith("--") and "/mlruns" not in a),
            str(ROOT / ".cache" / "ui"),
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    if "--reuse" in args:
        reuse(Path(args[args.index("--reuse") + 1]), out)
        return
    store = Path(tempfile.mkdtemp(prefix="bonsai-ui-")) / "mlruns"
    with PrefectServer() as api_url:
        t0 = time.perf_counter()
        run_cli(store, ["promote=edge_small"])
        run_cli(store, ["-m", f"{SWEEP_KEY}=2,8"])
        print(f"default run + 2-job sweep: {time.perf_counter() - t0:.0f} s (store {store})")
        last = pipeline_runs(store)[-1]
        flow_run_id = _last_flow_run(api_url)
        mlflow_proc, url = mlflow_server(store)
        try:
            with sync_playwright() as p:
                b = browser(p)
                page = b.new_page(viewport={"width": 2300, "height": 1000})
                shoot_mlflow(page, url, last.info.experiment_id, last.info.run_id, out)
                shoot_prefect(page, api_url, flow_run_id, out)
                b.close()
        finally:
            mlflow_proc.terminate()
            mlflow_proc.wait(timeout=30)
    for f in sorted(out.glob("*.png")):
        print(f"{f}  ({f.stat().st_size:,} bytes)")


def _last_flow_run(api_url: str) -> str:
    import json

    req = urllib.request.Request(
        f"{api_url}/flow_runs/filter",
        data=json.dumps({"sort": "START_TIME_DESC", "limit": 1}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)[0]["id"]


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    main()
