"""quantize.static's search (bonsai/quant_search.py) on tiny digits models: it refuses an empty
candidate set, never chooses a candidate beyond the tolerance, and the settings it records
reproduce the stored file byte for byte."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from bonsai.artifacts import MANIFEST, load_torch, save_torch
from bonsai.errors import ConfigError, GateError
from bonsai.onnx_utils import run_logits, session
from bonsai.quant_search import SearchConfig, Settings, Tried, candidates, choose, reproduce
from bonsai.stages import get_stage
from bonsai.stages.quantize_common import calibration_images
from bonsai.stages.quantize_static import search_fixed
from bonsai.training import predict_logits
from tests.helpers import run_stage

CNN = {"name": "cnn", "width": 16, "depth": 2, "convs_per_stage": 1}
# A small grid keeps each search to a second or two on 2 cores.
SMALL = {"calibrate_method": ["minmax", "percentile"], "rounds": 3, "per_round": 10}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cnn(digits, tmp_path_factory):
    return run_stage(
        "train", {"model": CNN, "epochs": 6, "lr": 0.01}, digits, tmp_path_factory.mktemp("cnn")
    )


@pytest.fixture(scope="module")
def cnn_onnx(digits, cnn, tmp_path_factory):
    return run_stage("export.onnx", {}, digits, tmp_path_factory.mktemp("onnx"), input=cnn)


@pytest.fixture(scope="module")
def outlier_onnx(digits, cnn, tmp_path_factory):
    """The same function with one activation channel 200x wider than the others (as in
    test_quantize.py): every int8 candidate loses >10 points unless the two layers touching
    that tensor stay in float."""
    model = load_torch(cnn)
    with torch.no_grad():
        bn = model.features[-2]
        bn.weight[0] *= 200.0
        bn.bias[0] *= 200.0
        model.classifier.weight[:, 0] /= 200.0
    same = predict_logits(load_torch(cnn), digits.test_x).argmax(1)
    assert bool((predict_logits(model, digits.test_x).argmax(1) == same).all())
    art = save_torch(
        model, tmp_path_factory.mktemp("outlier"), cnn.meta["model"], data=cnn.meta["data"]
    )
    return run_stage("export.onnx", {}, digits, tmp_path_factory.mktemp("outlier_onnx"), input=art)


# ---------------------------------------------------------------------------------------------
# An empty candidate set is refused, before any compute


@pytest.mark.parametrize(
    "dim", ["per_channel", "activation_symmetric", "calibrate_method", "op_types"]
)
def test_the_search_refuses_an_empty_candidate_set(dim):
    cfg = get_stage("quantize.static").Config
    with pytest.raises(ValidationError) as e:
        cfg(search={dim: []})
    msg = str(e.value)
    assert f"search.{dim} is empty, which leaves no candidate to try" in msg
    assert "list at least one value" in msg and "search: null" in msg
    # A config built around the validators still gets no empty search.
    with pytest.raises(ConfigError, match="has no candidate"):
        candidates(SearchConfig.model_construct(**{**SearchConfig().model_dump(), dim: []}))


def test_the_candidate_grid_is_every_combination():
    grid = candidates(SearchConfig())
    assert len(grid) == 2 * 2 * 3 * 2 * 2 == len(set(grid))
    assert len(candidates(SearchConfig(**SMALL, op_types=["all"]))) == 2 * 2 * 2 * 2
    with pytest.raises(ValidationError, match="empty op-type list"):
        SearchConfig(op_types=[[]])


# ---------------------------------------------------------------------------------------------
# A candidate beyond the tolerance is never chosen


def _tried(label: str, *, within: bool, nbytes: int, p50: float) -> Tried:
    s = Settings(label == "pc", False, "minmax", None)
    return Tried(s, Path(label), 98.0, 0.0 if within else 5.0, nbytes, within,
                 p50_ms=p50, finalist=True)  # fmt: skip


@pytest.mark.parametrize("objective", ["latency", "bytes"])
def test_choose_never_takes_a_candidate_beyond_tolerance_even_when_smallest_and_fastest(
    objective,
):
    breaker = _tried("pt", within=False, nbytes=10_000, p50=0.010)
    ok = _tried("pc", within=True, nbytes=12_000, p50=0.020)
    assert choose([breaker, ok], objective, tie=0.03) is ok
    with pytest.raises(GateError):
        choose([breaker], objective, tie=0.03)


def test_latency_ties_within_noise_go_to_the_smaller_file():
    a = _tried("pc", within=True, nbytes=12_000, p50=0.0100)
    b = _tried("pt", within=True, nbytes=11_000, p50=0.0102)  # 2% slower: noise
    c = _tried("pt", within=True, nbytes=9_000, p50=0.0200)  # really slower
    assert choose([a, b, c], "latency", tie=0.03) is b
    assert choose([a, b, c], "latency", tie=0.0) is a
    assert choose([a, b, c], "bytes", tie=0.03) is c


def test_the_search_keeps_layers_in_float_rather_than_choose_a_candidate_beyond_tolerance(
    digits, outlier_onnx, tmp_path
):
    params = {"tolerance": 2.0, "search": {**SMALL, "per_channel": [False], "op_types": ["all"]}}
    art = run_stage("quantize.static", params, digits, tmp_path / "q", input=outlier_onnx)
    rows = art.meta["search_table"]
    broke = [r for r in rows if not r["within_tolerance"]]
    # Measured, not assumed: every all-int8 candidate is far beyond the tolerance...
    plain = [r for r in rows if "float" not in r["candidate"]]
    assert plain and all(r["drop"] > 10 for r in plain), plain
    # ...and smaller than the float fallback that is chosen.
    chosen = art.meta["search_settings"]
    assert chosen["float_nodes"], chosen
    assert art.meta["search_decision_accuracy_drop"] <= 2.0
    assert min(r["bytes"] for r in broke) < art.file.stat().st_size
    assert not any(r["finalist"] for r in broke)
    assert art.meta["search_candidates"] == len(rows)
    # With no fallback, the stage fails naming the best candidate, instead of choosing one.
    no_fb = {**params, "search": {**params["search"], "fallback": False}}
    with pytest.raises(GateError, match="no quantize.static search candidate stays within"):
        run_stage("quantize.static", no_fb, digits, tmp_path / "nofb", input=outlier_onnx)


# ---------------------------------------------------------------------------------------------
# The chosen settings reproduce the stored file byte for byte


class _Ctx:
    def __init__(self, data, seed):
        self.data, self.seed = data, seed


def test_the_chosen_settings_reproduce_the_stored_file_byte_for_byte(digits, cnn_onnx, tmp_path):
    params = {"search": SMALL}
    art = run_stage("quantize.static", params, digits, tmp_path / "q", input=cnn_onnx, seed=3)
    meta = art.meta
    # Every one of the 32 settings was tried (and a float fallback of any that broke the
    # tolerance: with 7-bit weights, on a CPU whose int8 saturates, some per-tensor ones do).
    settings_tried = {re.sub(r"/\d+ float$", "", r["candidate"]) for r in meta["search_table"]}
    assert len(settings_tried) == 2 * 2 * 2 * 2 * 2
    assert meta["search_candidates"] == len(meta["search_table"])
    c = get_stage("quantize.static").Config(**params)
    calib = calibration_images(_Ctx(digits, 3), c.calibration_samples, c.calibration_batch)
    settings = meta["search_settings"]
    again = reproduce(
        cnn_onnx.file, tmp_path / "again.onnx", calib, settings,
        fixed=search_fixed(c), preprocess=c.preprocess, work=tmp_path, meta=meta,
    )  # fmt: skip
    stored = json.loads((art.path / MANIFEST).read_text())["files"]["model.onnx"]
    assert sha256(art.file) == stored
    assert sha256(again) == stored
    # Other settings make another file: the comparison can fail.
    other = {**settings, "per_channel": not settings["per_channel"]}
    flipped = reproduce(
        cnn_onnx.file, tmp_path / "other.onnx", calib, other,
        fixed=search_fixed(c), preprocess=c.preprocess, work=tmp_path, meta=meta,
    )  # fmt: skip
    assert sha256(flipped) != sha256(art.file)
    # The winner was timed against its parent, and its accuracy is the file's.
    assert math.isfinite(next(r["p50_ms"] for r in meta["search_table"] if r["finalist"]))
    logits = run_logits(session(art.file), digits.test_x)
    parent = run_logits(session(cnn_onnx.file), digits.test_x)
    y = digits.test_y.numpy()
    drop = 100 * (float((parent.argmax(1) == y).mean()) - float((logits.argmax(1) == y).mean()))
    assert meta["accuracy_drop"] == pytest.approx(drop, abs=1e-6)
    assert np.isfinite(meta["speedup_vs_parent"])


def test_latency_finalists_are_the_fastest_and_the_smallest_near_it():
    from bonsai.quant_search import finalists

    def screened(nbytes, ms):
        t = _tried("pt", within=True, nbytes=nbytes, p50=math.nan)
        t.screen_ms = ms
        return t

    pool = {
        "fast": screened(12_000, 0.0100),
        "near_small": screened(9_000, 0.0104),  # within 2 x 3%
        "near_big": screened(13_000, 0.0101),
        "slow_smallest": screened(8_000, 0.0200),  # not near the fastest
    }
    cfg = SearchConfig(finalists=2)
    assert finalists(pool, cfg) == ["fast", "near_small"]
    assert finalists(pool, SearchConfig(finalists=4)) == ["fast", "near_small", "near_big"]
    assert finalists(pool, SearchConfig(finalists=2, objective="bytes")) == [
        "slow_smallest",
        "near_small",
    ]


def test_the_table_shows_how_many_candidates_were_tried_only_for_searched_rows():
    from bonsai.measure.compare import format_table, table_columns

    plain = {"stage": "int8", "kind": "quantize.static", "accuracy": 98.0, "bytes": 1000.0}
    searched = {**plain, "stage": "int8_search", "search_candidates": 48.0}
    assert "search_candidates" not in [c[0] for c in table_columns([plain])]
    assert "search_candidates" in [c[0] for c in table_columns([plain, searched])]
    table = format_table([plain, searched])
    header, _, row_plain, row_searched = table.splitlines()[:4]
    assert "tried" in header and row_searched.rstrip(" |").endswith("48")
