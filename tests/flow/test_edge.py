"""pipeline=edge end to end on the digits with two heads: every format, every footprint column,
the single-task comparison and the size-budget promotion."""

import pytest
from mlflow.tracking import MlflowClient

from flows.compress import compose_config, compress

pytestmark = pytest.mark.slow

FORMATS = {
    "teacher": "torch",
    "student": "torch",
    "pruned": "torch",
    "pruned_onnx": "onnx",
    "pruned_int8": "onnx",
    "pruned_coreml": "coreml",
    "pruned_litert": "litert",
}


def test_edge_pipeline_with_two_heads_fills_every_column_and_promotes_within_budget(
    prefect_server, store
):
    from tests.unit.test_multihead import _litert_or_fail

    _litert_or_fail()
    args = ["pipeline=edge", "heads=digit_parity", "promote=edge_budget", "debug=fast",
            "teacher=cnn_large", "eval.footprint=true", "promote.constraints.max_bytes=60000",
            f"tracking.store_dir={store}"]  # fmt: skip
    result = compress(compose_config(args), args)
    rows = {r["stage"]: r for r in result["rows"]}
    assert set(rows) == set(FORMATS)
    for stage, row in rows.items():
        assert row["bytes"] > 0 and row["zipped_bytes"] > 0, stage
        assert "runtime_mb" in row, stage  # what the variant needs on the device
        if FORMATS[stage] == "coreml":  # cannot run here: no accuracy, latency or memory
            assert row["runtime_mb"] == 0 and "accuracy" not in row and "peak_rss_mb" not in row
            continue
        assert row["peak_rss_mb"] > 10, stage
        assert {"accuracy_digit", "accuracy_parity", "latency_p50_ms"} <= set(row), stage
        if FORMATS[stage] in ("torch", "onnx"):
            # The two single-task models it replaces: nearly twice the bytes.
            assert row["single_task_bytes"] > 1.8 * row["bytes"], stage
    # Runtimes differ by format: torch's is by far the largest.
    assert rows["teacher"]["runtime_mb"] > 5 * rows["pruned_onnx"]["runtime_mb"]
    assert rows["pruned_litert"]["runtime_mb"] > 1
    table = result["table"]
    for header in ("digit %", "parity %", "runtime MB", "RSS MB", "1-task models bytes"):
        assert header in table
    # The promotion picks among ONNX and LiteRT variants within 60 KB: here the int8 model.
    promo = result["promotion"]
    client = MlflowClient(result["tracking_uri"])
    runs = client.search_runs(
        [client.get_run(result["parent_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'",
    )
    by_id = {r.info.run_id: r.data.tags["bonsai.stage"] for r in runs}
    assert by_id[promo["winner"]] == "pruned_int8", promo["report"]
    assert "pruned_litert" in promo["report"] and "pruned_coreml" not in promo["report"]
    kinds = {r.data.tags["bonsai.stage"]: r.data.tags.get("bonsai.artifact_kind") for r in runs}
    assert kinds == FORMATS
