"""Every MLflow Model Registry call Bonsai makes: gather promotion candidates from tracked runs,
read the current champion, register a winner with its lineage, move aliases.

Aliases, not the deprecated stages: `champion` is what a device ships (`models:/<name>@champion`),
`challenger` is a winner that did not beat it. Versions are never deleted: a replaced champion
stays reachable as `models:/<name>/<version>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bonsai.artifacts import open_artifact
from bonsai.promotion import Candidate, PolicyConfig
from tasks.tracking import (
    TAG_ARTIFACT_KIND,
    TAG_BUILD,
    TAG_CACHED,
    TAG_DATA,
    TAG_DATA_SET,
    TAG_INPUT_RUN,
    TAG_MODEL_URI,
    TAG_ROLE,
    TAG_STAGE,
    TAG_TEACHER_RUN,
)

CHAMPION, CHALLENGER = "champion", "challenger"
# Model-version tags that make a registered variant traceable and replayable.
LINEAGE = (
    "bonsai.stages",
    "bonsai.source_run_id",
    "bonsai.pipeline_run_id",
    "bonsai.config_hash",
    "bonsai.data_digest",
    "bonsai.overrides",
    "bonsai.git_commit",
    "bonsai.policy",
)


@dataclass
class Pool:
    """The candidates that may compete, and those set aside (other data or eval settings)."""

    candidates: list[Candidate]
    set_aside: list[tuple[Candidate, str]]
    data_digest: str
    eval_threads: str
    data_name: str  # the reference run's data set (its `bonsai.data_set` tag)


def _stage_runs(client: MlflowClient, experiment_id: str, parent_ids: list[str]) -> list[Any]:
    """FINISHED stage runs whose parent is one of `parent_ids`."""
    parents = set(parent_ids)
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{TAG_ROLE}` = 'stage' and attributes.status = 'FINISHED'",
        max_results=50000,
    )
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") in parents]


def pipeline_runs(client: MlflowClient, experiment_id: str) -> list[Any]:
    """FINISHED pipeline runs, newest first."""
    return client.search_runs(
        [experiment_id],
        f"tags.`{TAG_ROLE}` = 'pipeline' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=10000,
    )


def gather(experiment_id: str, policy: PolicyConfig, run_id: str | None) -> Pool:
    """The candidates of one pipeline run (`run_id`, else the newest) or, with scope
    `experiment`, of every finished pipeline run; one per build (a cached stage run and the run
    that built it are one model). Only variants measured on the reference run's data and with
    its latency thread count compete."""
    from bonsai.errors import ConfigError

    client = MlflowClient()
    parents = pipeline_runs(client, experiment_id)
    if not parents:
        raise ConfigError(
            "there is no finished pipeline run in this experiment to promote from; run "
            "`python -m flows.compress` first (or check tracking.experiment)"
        )
    by_id = {p.info.run_id: p for p in parents}
    if run_id is not None and run_id not in by_id:
        raise ConfigError(
            f"promote.run_id={run_id!r} is not a finished pipeline run of this experiment"
        )
    reference = by_id[run_id] if run_id else parents[0]
    scope = [reference] if policy.scope == "run" else parents
    stage_runs = _stage_runs(client, experiment_id, [p.info.run_id for p in scope])
    ref_stage = next(
        (r for r in stage_runs if r.data.tags.get("mlflow.parentRunId") == reference.info.run_id),
        None,
    )
    threads = ref_stage.data.params.get("runtime.eval_threads", "") if ref_stage else ""
    digest = reference.data.tags.get(TAG_DATA, "")
    # Runs recorded before the data set tag existed: the data config's name.
    data_set = reference.data.tags.get(TAG_DATA_SET) or reference.data.params.get("data.name")
    pool = Pool([], [], digest, threads, data_set or "data")
    seen: dict[str, Candidate] = {}
    for r in sorted(
        stage_runs, key=lambda r: (r.data.tags.get(TAG_CACHED) != "false", r.info.start_time)
    ):
        tags = r.data.tags
        if not tags.get(TAG_MODEL_URI):
            continue
        metrics = dict(r.data.metrics)
        # Within one pipeline run every variant was timed side by side at the end: prefer it.
        metrics["latency_p50_ms"] = metrics.get(
            "paired_latency_p50_ms", metrics.get("latency_p50_ms", float("nan"))
        )
        c = Candidate(
            run_id=r.info.run_id,
            stage=tags.get(TAG_STAGE, r.info.run_name or ""),
            model_uri=tags[TAG_MODEL_URI],
            kind=tags.get(TAG_ARTIFACT_KIND, "torch"),
            metrics=metrics,
            tags={**tags, **{f"param.{k}": v for k, v in r.data.params.items()}},
        )
        build = tags.get(TAG_BUILD, r.info.run_id)
        if build in seen:
            continue  # the same model, reached again through the cache
        seen[build] = c
        if tags.get(TAG_DATA, digest) != digest:
            pool.set_aside.append((c, f"measured on other data (digest {tags.get(TAG_DATA)})"))
        elif r.data.params.get("runtime.eval_threads", threads) != threads:
            pool.set_aside.append(
                (c, f"latency measured with {r.data.params.get('runtime.eval_threads')} "
                    f"thread(s), not {threads}")
            )  # fmt: skip
        else:
            pool.candidates.append(c)
    return pool


def lineage(client: MlflowClient, c: Candidate) -> dict[str, str]:
    """The tags that say where a candidate came from: its chain of stages up to the first,
    its source runs, the pipeline run's config hash, overrides, data digest and git commit."""
    chain, run = [], client.get_run(c.run_id)
    while True:
        chain.append(run.data.tags.get(TAG_STAGE, "?"))
        up = run.data.tags.get(TAG_INPUT_RUN) or run.data.tags.get(TAG_TEACHER_RUN)
        if not up:
            break
        run = client.get_run(up)
    parent = client.get_run(c.tags["mlflow.parentRunId"])
    ptags = parent.data.tags
    return {
        "bonsai.stages": " > ".join(reversed(chain)),
        "bonsai.source_run_id": c.run_id,
        "bonsai.pipeline_run_id": parent.info.run_id,
        "bonsai.pipeline_run_name": parent.info.run_name or "",
        "bonsai.config_hash": ptags.get("bonsai.config_hash", ""),
        "bonsai.data_digest": ptags.get(TAG_DATA, ""),
        "bonsai.overrides": ptags.get("bonsai.overrides", ""),
        "bonsai.git_commit": ptags.get("mlflow.source.git.commit", ""),
        "bonsai.model_uri": c.model_uri,
    }


def champion(name: str):
    """The version holding alias `champion` of registered model `name`, or None."""
    client = MlflowClient()
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def source_run(version) -> Any | None:
    """The run a registered version was built by, or None when it is gone: deleted, or removed
    for good by `mlflow gc` (a version outlives its run)."""
    run_id = version.tags.get("bonsai.source_run_id")
    if not run_id:
        return None
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return None
    return None if run.info.lifecycle_stage == "deleted" else run


def register(
    name: str, c: Candidate, policy: PolicyConfig, tags: dict[str, str], alias: str, note: str
) -> str:
    """Register candidate `c` as a new version of registered model `name` with alias `alias`;
    returns the version. All or nothing: when any step fails, the version it made and a
    registered model it created are deleted again, so a failed promotion never leaves an empty
    registered model (or a version without its alias) behind."""
    client = MlflowClient()
    created, version = False, None
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name,
            tags={"bonsai.policy": policy.name},
            description=f"Bonsai variants promoted by policy {policy.name!r}: the alias "
            "`champion` is the one to ship; `challenger` a winner that did not beat it.",
        )
        created = True
    try:
        version = mlflow.register_model(
            c.model_uri,
            name,
            tags={**tags, "bonsai.policy": policy.name, "bonsai.decision": note[:5000]},
        ).version
        client.set_registered_model_alias(name, alias, version)
        client.update_model_version(name, version, description=note[:5000])
    except BaseException:
        _undo_registration(client, name, version, created)
        raise
    return str(version)


def _undo_registration(client: MlflowClient, name: str, version, created: bool) -> None:
    """Best effort: the original error is what the user needs to see, not a cleanup's."""
    try:
        if version is not None:
            client.delete_model_version(name, version)
        if created:
            client.delete_registered_model(name)
    except MlflowException:
        pass


def model_file(model_uri: str, dst: Path) -> Path:
    """Download a logged model and return its deployable file (the Bonsai artifact's main model
    file, as its format names it), checksums verified."""
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst)))
    return open_artifact(local / "artifacts" / "bonsai_artifact").file
