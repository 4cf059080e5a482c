"""Rebuild a registered model from scratch and check that it comes out the same.

python -m flows.replay models:/bonsai-digits-edge_small@champion
python -m flows.replay models:/bonsai-digits-edge_small/3 tracking.store_dir=/path/to/mlruns

From the version's lineage tags it finds the pipeline run that built it, recomposes that run's
exact config from its recorded overrides (and refuses if the config hash differs: the code or
the conf/ files changed what those overrides mean), runs the pipeline again with every stage
forced, and compares the rebuilt stage with the original: accuracy, parameters, MACs and bytes
exactly (a fixed seed on CPU), speed within `replay.latency_tolerance`: the speedup over the
pipeline's reference stage, which each run timed side by side with it, so a replay on a busier
or another machine still compares like with like (the absolute p50 is shown, not judged: a
20-microsecond model's moved 2.8x between two moments of one loaded CI run). Exit 0: reproduced;
1: it was not; 2: bad input (no such model, no Bonsai lineage).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import flows  # noqa: F401  (environment defaults, before prefect is imported)
from flows.cli import run_app
from flows.compose import compose_config

EXACT = ("accuracy", "params", "macs", "bytes")
_MODEL_URI: list[str] = []  # the positional argument, taken off the command line before Hydra


def _version(uri: str):
    """The ModelVersion a models:/<name>@<alias> or models:/<name>/<version> URI names."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from bonsai.errors import ConfigError

    body = uri.removeprefix("models:/")
    client = MlflowClient()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = body.rpartition("/")
        return client.get_model_version(name, version)
    except (MlflowException, ValueError) as e:
        raise ConfigError(f"cannot find registered model {uri!r} ({e})") from None


def replay(model_uri: str, config: dict[str, Any]) -> dict[str, Any]:
    import mlflow
    from mlflow.tracking import MlflowClient

    from bonsai.config import validate_config
    from bonsai.errors import ConfigError, StageFailed
    from flows.compress import apply_caps, compress
    from tasks.mlflow_backend import check_store, init_store
    from tasks.tracking import config_hash

    if not model_uri.startswith("models:/") or ("@" not in model_uri and model_uri.count("/") < 2):
        raise ConfigError(
            f"replay takes a registered model: models:/<name>@<alias> or models:/<name>/<version> "
            f"(got {model_uri!r})"
        )
    cfg, _ = validate_config(config)
    check_store(cfg.tracking.uri, cfg.tracking.store_dir)
    uri, _ = init_store(cfg.tracking.uri, cfg.tracking.store_dir, cfg.tracking.experiment)
    mlflow.set_tracking_uri(uri)
    version = _version(model_uri)
    tags = version.tags
    needed = ("bonsai.pipeline_run_id", "bonsai.source_run_id", "bonsai.config_hash")
    missing = [t for t in needed if not tags.get(t)]
    if missing:
        raise ConfigError(
            f"{model_uri} (version {version.version}) has no Bonsai lineage ({', '.join(missing)} "
            "missing): it was not registered by Bonsai's promotion, so there is no recipe to replay"
        )
    from mlflow.exceptions import MlflowException

    from tasks.registry import source_run

    client = MlflowClient()
    source = source_run(version)
    parent = tags["bonsai.pipeline_run_id"]
    try:
        local = client.download_artifacts(parent, "config/overrides.json")
    except (MlflowException, OSError):
        local = None
    if source is None or local is None:
        gone = [
            f"the stage run {tags['bonsai.source_run_id']} that built it" if source is None else "",
            f"its pipeline run {parent}'s recorded overrides" if local is None else "",
        ]
        raise ConfigError(
            f"{model_uri} (version {version.version}) cannot be replayed: "
            f"{' and '.join(g for g in gone if g)} are gone (deleted, or removed by mlflow gc); "
            f"its recipe is no longer in this store. Its lineage tags still say: config hash "
            f"{tags['bonsai.config_hash']}, git commit {tags.get('bonsai.git_commit', '?')}"
        )
    stage = source.data.tags["bonsai.stage"]
    overrides = json.loads(Path(local).read_text())["overrides"]
    original = apply_caps(compose_config(overrides))  # what the pipeline run hashed
    if config_hash(original) != tags["bonsai.config_hash"]:
        recorded = json.loads(
            Path(client.download_artifacts(parent, "config/resolved.json")).read_text()
        )
        now, then = _flat(original), _flat(recorded)
        changed = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
        raise StageFailed(
            f"the overrides {' '.join(overrides)} no longer compose the config that built "
            f"{model_uri}: config hash {config_hash(original)} != {tags['bonsai.config_hash']}; "
            f"changed: {', '.join(changed[:10])}. Check out commit "
            f"{tags.get('bonsai.git_commit', '?')} to replay it"
        )
    # The same recipe, every stage rebuilt, recorded in the store this command uses.
    rerun = {**original, "tracking": config["tracking"]}
    # On the device the original trained on: `auto` on a GPU machine would train a CPU-built
    # recipe on CUDA, whose numbers differ, and the exact checks below would fail for that alone.
    # Runs recorded before devices existed trained on the CPU. (A CUDA original on a machine
    # without one is refused at pre-flight, saying so.)
    device = _device_of(client, parent)
    rerun["runtime"] = {**original["runtime"], "force": ["all"], "device": device}
    rerun["promote"] = None  # a replay checks a recipe; it does not compete for the registry
    result = compress(rerun, [*overrides, "runtime.force=all", f"runtime.device={device}"])
    client.set_tag(result["parent_run_id"], "bonsai.replay_of", f"{version.name}/{version.version}")
    row: dict[str, Any] = next((r for r in result["rows"] if r["stage"] == stage), {})
    new = {
        **result["stages"][stage]["metrics"],
        **({"speedup": row["speedup"]} if "speedup" in row else {}),
    }
    old = source.data.metrics
    rows, ok = [], True
    # Speed as a ratio measured side by side within each run. The reference stage's own speedup
    # is 1.0 by definition, and runs recorded without one have none: those judge the absolute
    # latency.
    ratio = stage != result["reference"] and old.get("speedup") and new.get("speedup")
    speed = "speedup" if ratio else "latency_p50_ms"
    for key in (*EXACT, "speedup", "latency_p50_ms"):
        a, b = old.get(key), new.get(key)
        if a is None or b is None:
            continue
        good: bool | None = None  # shown, not judged
        if key in EXACT:
            good = a == b
        elif key == speed:
            good = abs(b - a) <= cfg.replay.latency_tolerance * a
        ok &= good is not False
        rows.append((key, a, b, good))
    return {"ok": ok, "rows": rows, "stage": stage, "version": version, "run": result}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _device_of(client, run_id: str) -> str:
    """The device kind (cpu, cuda, mps) a pipeline run trained on, from its logged params."""
    resolved = client.get_run(run_id).data.params.get("runtime.device_resolved", "cpu")
    return resolved.split(":")[0] if resolved.split(":")[0] in ("cuda", "mps") else "cpu"


def _job(config: dict[str, Any], overrides: list[str]) -> str:
    from bonsai.errors import ConfigError, StageFailed

    if not _MODEL_URI:
        raise ConfigError("which model? python -m flows.replay models:/<name>@champion")
    r = replay(_MODEL_URI[0], config)
    v = r["version"]
    lines = [
        f"Replay of {v.name} version {v.version} (stage {r['stage']!r}), rebuilt in pipeline "
        f"run {r['run']['parent_run_id']}:",
        "",
        "| metric | original | replayed | match |",
        "|---|---|---|---|",
    ]
    for key, a, b, good in r["rows"]:
        match = "yes" if good else "NO" if good is False else "(not judged: machine load)"
        lines.append(f"| {key} | {a:.6g} | {b:.6g} | {match} |")
    text = "\n".join(lines)
    if not r["ok"]:
        print(text)
        raise StageFailed(f"{v.name} version {v.version} did not reproduce (see the table)")
    return text + "\n\nReproduced: every metric matches.\n"


def main() -> None:
    # `python -m flows.replay models:/x@champion [overrides]`: the model URI is not a Hydra
    # override (its ':', '/' and '@' would need quoting), so it is taken off first.
    args = sys.argv[1:]
    uris = [a for a in args if a.startswith(("models:/", "runs:/"))]
    _MODEL_URI.extend(uris[:1])
    sys.argv = [sys.argv[0], *[a for a in args if a not in uris[:1]]]
    run_app(_job)


if __name__ == "__main__":
    main()
