"""The Prefect task that promotes: decide under a policy, compare the winner with the current
champion side by side, register it as `champion` or `challenger`, and record the decision in an
MLflow run of its own (role `promote`) with every candidate's verdict.

Latency recorded on another day or machine is not comparable, so when the objective is latency
the winner and the champion are timed again in alternating rounds in this process before the
decision. Two promotions at once on one store are serialized by a file lock per registered model,
so they never both read "no champion" and leave two versions each believing it is the champion.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from bonsai.promotion import Candidate, PolicyConfig, beats, decide, decision_metric
from bonsai.store import file_lock
from tasks import registry, tracking


def _verdicts(pool: registry.Pool, winner: Candidate | None, policy: PolicyConfig) -> str:
    """A Markdown table: one row per candidate, why it lost or won. Accuracy on both splits:
    the validation split's decided, the test split's is the one reported."""
    metric = decision_metric(policy.objective.metric)
    shown = ("accuracy", "val_accuracy", "bytes", "latency_p50_ms")
    extra = "" if metric in shown else f" {metric} |"
    lines = [
        f"| candidate | kind | val accuracy % | test accuracy % | bytes | p50 ms |{extra} verdict |",
        "|---|---|---|---|---|---|" + ("---|" if extra else "") + "---|",
    ]
    rows = [(c, "; ".join(c.failed) or "passes") for c in pool.candidates]
    rows += [(c, why) for c, why in pool.set_aside]
    for c, verdict in rows:
        if c is winner:
            verdict = "**winner**"
        m = c.metrics
        lines.append(
            f"| {c.label} | {c.kind} | {m.get('val_accuracy', float('nan')):.2f} | "
            f"{m.get('accuracy', float('nan')):.2f} | "
            f"{m.get('bytes', 0):,.0f} | {m.get('latency_p50_ms', float('nan')):.4f} | "
            + (f"{m.get(metric, float('nan')):.6g} | " if extra else "")
            + f"{verdict} |"
        )
    return "\n".join(lines)


def _remeasure(winner: Candidate, champ_uri: str, eval_cfg: dict[str, Any]) -> tuple[float, float]:
    """p50 latency (ms) of the winner and the champion, timed side by side in this process."""
    import numpy as np

    from bonsai.formats import open_session
    from bonsai.measure.latency import measure_latency_paired

    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "new": registry.model_file(winner.model_uri, Path(tmp) / "new"),
            "old": registry.model_file(champ_uri, Path(tmp) / "old"),
        }
        sessions = {k: open_session(f, eval_cfg["threads"]) for k, f in files.items()}
        shape = [d if isinstance(d, int) else 1 for d in sessions["new"].get_inputs()[0].shape]
        x1 = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        paired = measure_latency_paired(
            sessions, x1, rounds=eval_cfg["compare_rounds"], per_round=eval_cfg["compare_repeats"]
        )
    return paired["new"]["latency_p50_ms"], paired["old"]["latency_p50_ms"]


def _log_run(experiment_id, policy, name, decision, version, report, winner) -> None:
    """The promotion's own MLflow run: the policy as params, the decision as tags, the
    verdict table as an artifact."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.create_run(
        experiment_id,
        run_name=f"promote {policy.name} · {decision}",
        tags={
            tracking.TAG_ROLE: "promote",
            "bonsai.policy": policy.name,
            "bonsai.decision": decision,
            "bonsai.registered_model": name,
            "bonsai.version": str(version or ""),
            "bonsai.winner_run_id": winner.run_id if winner else "",
            "mlflow.note.content": report[:5000],
        },
    )
    rid = run.info.run_id
    for k, v in tracking.flatten(policy.model_dump(mode="json")).items():
        client.log_param(rid, f"policy.{k}"[:250], v[:6000])
    client.log_text(rid, report + "\n", "promotion.md")
    client.set_terminated(rid, "FINISHED")


def registered_model_name(policy: PolicyConfig, data_set: str) -> str:
    """`promote.model_name`, else bonsai-<data set>-<policy>: one registered model (and
    one champion) per data set and policy. The data set is the pipeline run's `bonsai.data_set`
    tag: an image folder's own name, else `data.name` (bonsai.data.data_set_name)."""
    return policy.model_name or f"bonsai-{data_set}-{policy.name}"


@task(name="promote", cache_policy=NO_CACHE, persist_result=False)
def promote(
    policy_cfg: dict[str, Any],
    experiment_id: str,
    run_id: str | None,
    store_dir: str,
    eval_cfg: dict[str, Any],
) -> dict[str, Any]:
    """Returns {"decision": champion|challenger|unchanged|none, "version", "reason" (why, one
    line: what the commands print when nothing was promoted), "report" (every verdict)}."""
    from mlflow.tracking import MlflowClient

    log = get_run_logger()
    policy = PolicyConfig.model_validate(policy_cfg)
    pool = registry.gather(experiment_id, policy, run_id or policy.run_id)
    winner = decide(pool.candidates, policy)
    name = registered_model_name(policy, pool.data_name)
    metric = decision_metric(policy.objective.metric)  # accuracy: the validation split's
    decision, version, why = "none", None, ""
    with file_lock(Path(store_dir) / "locks" / f"promote-{name}.lock"):
        if winner is None:
            why = (
                f"no variant satisfies policy {policy.name!r} (each candidate's failed "
                "constraint is in the table above); nothing was registered: relax "
                "promote.constraints.* or run a pipeline whose variants meet them"
            )
        else:
            champ = registry.champion(name)
            new_value = winner.metrics[metric]
            old_run = registry.source_run(champ) if champ is not None else None
            if champ is not None and old_run is None:
                # Its numbers are gone with its run: nothing to compare against, so the policy's
                # winner takes the alias; the old version stays reachable by its number.
                gone = champ.tags.get("bonsai.source_run_id", "?")
                log.warning(
                    f"{name} version {champ.version} (champion) lost its source run {gone} "
                    "(deleted, or removed by mlflow gc): promoting as if it had no champion"
                )
                decision = "champion"
                why = (
                    f"champion version {champ.version}'s source run {gone} is gone (deleted or "
                    "garbage-collected), so it cannot be compared"
                )
            elif champ is None:
                decision, why = "champion", f"{name} has no champion yet"
            elif (
                champ.tags.get("bonsai.source_run_id") == winner.run_id
                or champ.tags.get("bonsai.model_uri") == winner.model_uri
            ):
                decision, version = "unchanged", champ.version
                why = f"the winner is already {name} version {champ.version} (champion)"
            elif champ.tags.get("bonsai.data_digest") != pool.data_digest:
                decision = "challenger"
                why = (
                    f"champion version {champ.version} was measured on other data (digest "
                    f"{champ.tags.get('bonsai.data_digest')}, now {pool.data_digest}): not comparable"
                )
            elif old_run is not None and metric not in old_run.data.metrics:  # before val
                decision = "challenger"
                why = (
                    f"champion version {champ.version} has no {metric} (recorded before it was "
                    "measured): not comparable"
                )
            else:
                assert old_run is not None
                old_value = old_run.data.metrics[metric]
                how = "as recorded"
                if metric == "latency_p50_ms":
                    new_value, old_value = _remeasure(
                        winner, f"models:/{name}/{champ.version}", eval_cfg
                    )
                    how = "re-measured side by side"
                won = beats(new_value, old_value, policy)
                decision = "champion" if won else "challenger"
                why = (
                    f"{metric} {new_value:.6g} vs champion version {champ.version}'s "
                    f"{old_value:.6g} ({how}): {'better' if won else 'not better'}"
                    + (
                        f" by the required {policy.min_improvement:.0%}"
                        if policy.min_improvement
                        else ""
                    )
                )
            if decision in ("champion", "challenger") and not policy.dry_run:
                tags = registry.lineage(MlflowClient(), winner)
                version = registry.register(name, winner, policy, tags, decision, why)
    report = (
        f"Policy {policy.name!r} over {len(pool.candidates)} candidate(s) "
        f"({policy.scope}); objective: {'lowest' if policy.objective.lower_is_better else 'highest'} "
        f"{metric}.\n\n{_verdicts(pool, winner, policy)}\n\n"
        f"Decision: {decision}"
        + (f" → {name} version {version}" if version else "")
        + (" (dry run: nothing changed)" if policy.dry_run and decision != "none" else "")
        + f". {why}"
    )
    log.info(
        f"promotion {policy.name}: {decision}"
        + (f" -> {name} version {version}" if version else "")
    )
    _log_run(experiment_id, policy, name, decision, version, report, winner)
    return {
        "decision": decision,
        "version": version,
        "reason": why,
        "report": report,
        "winner": winner and winner.run_id,
        # What a recipe search optimizes (flows/search.py): the winner's objective value
        # (accuracy: on the validation split, as promotion decided).
        "metric": metric,
        "value": winner.metrics[metric] if winner else None,
        "lower_is_better": policy.objective.lower_is_better,
    }
