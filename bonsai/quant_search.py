"""Static int8 that searches its own settings: `quantize.static`'s `search:`.

Candidates are every combination of the listed settings: weights per channel or per tensor,
symmetric or asymmetric activations, the calibration method (minmax, entropy, percentile), the
op types to quantize and the format (QDQ pairs or quantized operators). Each is quantized from the same calibration images (calibrated once
per method and op-type set, onnxruntime's calibration cache), and measured:

- accuracy on the decision split (the data's validation split), its drop below the fp32 parent's. A
  candidate beyond the tolerance is out, unless `fallback` keeps its most sensitive layers in
  float (ranked once, each layer quantized alone) until it is within;
- bytes of the file;
- batch-1 latency (one onnxruntime thread): every candidate within tolerance is screened in a
  few alternating rounds, then the `finalists` best are timed in `rounds` alternating rounds
  together with the fp32 parent, so the choice rests on medians taken under the same load.

The objective picks among the finalists: `latency` takes the smallest file among those whose
median is within `tie` (relative) of the fastest finalist's (near-identical models differ by
noise, not by speed: measured differences of a few percent between per-channel and per-tensor
weights flip from run to run), `bytes` the smallest file, equal sizes broken by latency.

The winner's settings (`Settings.as_dict`) reproduce its file byte for byte through
`quantize_settings` with the same calibration images: calibration and onnxruntime's QDQ
quantizer are deterministic.
"""

from __future__ import annotations

import itertools
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from bonsai.errors import ConfigError, GateError
from bonsai.measure.latency import measure_latency_paired
from bonsai.metrics import accuracy, worst_drop
from bonsai.onnx_utils import run_logits, session
from bonsai.quantization import LAYER_OPS, layer_nodes, logit_error, quantize_qdq

Method = Literal["minmax", "entropy", "percentile"]
# `op_types` entries: `all` (every op type onnxruntime's QDQ quantizer supports: also Add,
# MaxPool, Relu...), `weighted` (only the layers that carry weights), or an explicit list.
OP_SETS: dict[str, tuple[str, ...] | None] = {"all": None, "weighted": LAYER_OPS}


class SearchConfig(BaseModel):
    """`quantize.static`'s `search:` block. Every list is one dimension of the candidate grid."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # latency: the fastest (ties within `tie` go to the smaller file); bytes: the smallest.
    objective: Literal["latency", "bytes"] = "latency"
    per_channel: list[bool] = [True, False]
    activation_symmetric: list[bool] = [False, True]
    calibrate_method: list[Method] = ["minmax", "entropy", "percentile"]
    op_types: list[Literal["all", "weighted"] | list[str]] = ["all", "weighted"]
    # QDQ: Quantize/DequantizeLinear pairs that onnxruntime fuses at load; QOperator: quantized
    # operators (QLinearConv...) in the file, which drops the pairs' bytes.
    quant_format: list[Literal["QDQ", "QOperator"]] = ["QDQ", "QOperator"]
    # A candidate beyond the tolerance keeps its most sensitive layers in float (up to the
    # stage's max_float_layers) instead of dropping out.
    fallback: bool = True
    finalists: int = Field(default=4, ge=1, strict=True)  # timed in full, with the fp32 parent
    # Screening of every candidate within tolerance: alternating rounds of `screen_per_round`
    # batch-1 runs each (cheap: 48 candidates x 200 runs of a 0.2 ms model is 2 s). Fewer runs
    # left a 0.017 ms model's screening so noisy that the smaller near-fastest files missed
    # the finalists (measured by bench/quantize_search.py).
    screen_rounds: int = Field(default=5, ge=1, strict=True)
    screen_per_round: int = Field(default=40, ge=1, strict=True)
    rounds: int = Field(default=10, ge=1, strict=True)  # alternating rounds of the finalists
    per_round: int = Field(default=30, ge=1, strict=True)  # batch-1 runs per model per round
    tie: float = 0.03  # relative latency difference treated as noise (latency objective)

    @field_validator(
        "per_channel", "activation_symmetric", "calibrate_method", "op_types", "quant_format"
    )
    @classmethod
    def _not_empty(cls, v: list, info) -> list:
        if not v:
            raise ValueError(
                f"search.{info.field_name} is empty, which leaves no candidate to try; list at "
                f"least one value (e.g. {_EXAMPLES[info.field_name]}), or set search: null to "
                "quantize once with the stage's own settings"
            )
        for item in v:
            if isinstance(item, list) and not item:
                raise ValueError(
                    "search.op_types holds an empty op-type list: name at least one op type "
                    "(e.g. [Conv, Gemm]) or use all / weighted"
                )
        return v

    @field_validator("tie")
    @classmethod
    def _tie(cls, v: float) -> float:
        if not (math.isfinite(v) and 0 <= v < 1):
            raise ValueError(
                "search.tie must be within [0, 1): the relative latency difference treated as "
                "noise (0.03: finalists within 3% of the fastest count as equally fast)"
            )
        return v


_EXAMPLES = {
    "per_channel": "[true, false]",
    "activation_symmetric": "[false, true]",
    "calibrate_method": "[minmax, entropy, percentile]",
    "op_types": "[all, weighted]",
    "quant_format": "[QDQ, QOperator]",
}


@dataclass(frozen=True)
class Settings:
    """One candidate's quantization settings (with the stage's fixed ones, all a file needs)."""

    per_channel: bool
    activation_symmetric: bool
    calibrate_method: str
    op_types: tuple[str, ...] | None  # None: every op type the quantizer supports
    quant_format: str = "QDQ"  # QDQ | QOperator
    float_nodes: tuple[str, ...] = ()  # nodes kept in float (accuracy-aware fallback)

    @property
    def label(self) -> str:
        ops = "all" if self.op_types is None else "+".join(self.op_types)
        text = (
            f"{'per-channel' if self.per_channel else 'per-tensor'}/"
            f"{'sym' if self.activation_symmetric else 'asym'}/{self.calibrate_method}/{ops}/"
            f"{self.quant_format}"
        )
        return text + (f"/{len(self.float_nodes)} float" if self.float_nodes else "")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["op_types"] = None if self.op_types is None else list(self.op_types)
        d["float_nodes"] = list(self.float_nodes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Settings:
        return cls(
            per_channel=bool(d["per_channel"]),
            activation_symmetric=bool(d["activation_symmetric"]),
            calibrate_method=str(d["calibrate_method"]),
            op_types=None if d["op_types"] is None else tuple(d["op_types"]),
            quant_format=str(d.get("quant_format", "QDQ")),
            float_nodes=tuple(d.get("float_nodes") or ()),
        )


def candidates(cfg: SearchConfig) -> list[Settings]:
    """The grid, in a fixed order. Refuses an empty one (a config built around the validators)."""
    ops = [OP_SETS[o] if isinstance(o, str) else tuple(o) for o in cfg.op_types]
    out = [
        Settings(pc, sym, m, o, fmt)
        for m, o, fmt, pc, sym in itertools.product(
            cfg.calibrate_method,
            dict.fromkeys(ops),
            cfg.quant_format,
            cfg.per_channel,
            cfg.activation_symmetric,
        )
    ]
    if not out:
        raise ConfigError(
            "quantize.static search has no candidate: every one of per_channel, "
            "activation_symmetric, calibrate_method, op_types and quant_format needs at least "
            "one value"
        )
    return out


def quantize_settings(
    model: Path,
    dst: Path,
    calib: np.ndarray,
    s: Settings,
    *,
    fixed: dict[str, Any],
    cache: Path | None = None,
) -> Path:
    """Quantize `model` into `dst` with candidate settings `s` and the stage's `fixed` ones
    (batch, activation_type, weight_type). The one function both the search and a reproduction
    call, so the same settings make the same file."""
    return quantize_qdq(
        model,
        dst,
        calib,
        **_qdq_args(s),
        nodes_to_exclude=list(s.float_nodes) or None,
        cache=cache,
        **fixed,
    )


@dataclass
class Tried:
    """One candidate and what was measured of it."""

    settings: Settings
    file: Path
    accuracy: float
    drop: float
    bytes: int
    within: bool
    screen_ms: float = math.nan
    p50_ms: float = math.nan
    speedup: float = math.nan
    finalist: bool = False

    def row(self) -> dict[str, Any]:
        return {
            "candidate": self.settings.label,
            "accuracy": round(self.accuracy, 4),
            "drop": round(self.drop, 4),
            "bytes": self.bytes,
            "within_tolerance": self.within,
            "screen_p50_ms": None if math.isnan(self.screen_ms) else round(self.screen_ms, 5),
            "p50_ms": None if math.isnan(self.p50_ms) else round(self.p50_ms, 5),
            "speedup_vs_parent": None if math.isnan(self.speedup) else round(self.speedup, 4),
            "finalist": self.finalist,
        }


@dataclass
class SearchResult:
    winner: Tried
    tried: list[Tried]
    parent_accuracy: float
    parent_p50_ms: float
    ranking: list[dict[str, Any]] = field(default_factory=list)  # fallback's layer ranking


def finalists(screened: dict[str, Tried], cfg: SearchConfig) -> list[str]:
    """Which screened candidates are timed in full. bytes: the smallest files. latency: the
    fastest screened one, then the smallest files among those screened within three times `tie` of it
    (a short screening is noisier than the full timing, and the full timing's tie rule prefers
    the smaller file, so the smaller near-fastest files must reach it)."""
    keys = list(screened)
    if cfg.objective == "bytes":
        return sorted(keys, key=lambda k: (screened[k].bytes, screened[k].screen_ms))[
            : cfg.finalists
        ]
    fastest = min(keys, key=lambda k: screened[k].screen_ms)
    near = [
        k
        for k in keys
        if k != fastest and screened[k].screen_ms <= screened[fastest].screen_ms * (1 + 3 * cfg.tie)
    ]
    near.sort(key=lambda k: (screened[k].bytes, screened[k].screen_ms))
    return [fastest, *near[: cfg.finalists - 1]]


def choose(tried: list[Tried], objective: str, tie: float) -> Tried:
    """The winner among the timed finalists; a candidate beyond the tolerance is never one."""
    pool = [t for t in tried if t.within and t.finalist and not math.isnan(t.p50_ms)]
    if not pool:
        raise GateError("no candidate within the tolerance was timed")
    if objective == "bytes":
        return min(pool, key=lambda t: (t.bytes, t.p50_ms))
    fastest = min(t.p50_ms for t in pool)
    tied = [t for t in pool if t.p50_ms <= fastest * (1 + tie)]
    return min(tied, key=lambda t: (t.bytes, t.p50_ms))


def search(
    model_in: Path,
    parent: Path,
    calib: np.ndarray,
    decision: tuple[np.ndarray, np.ndarray],
    x1: np.ndarray,
    cfg: SearchConfig,
    *,
    fixed: dict[str, Any],
    within: Callable[[float, float], bool],
    max_float_layers: int,
    work: Path,
    heads: Any = None,
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Quantize `model_in` (the pre-processed fp32 model) with every candidate, measure each, and
    return the winner (its file in `work`). `parent` is the fp32 model the latency is compared
    to; `within(drop, parent_accuracy)` is the stage's tolerance; `threads` serve accuracy passes
    (latency is timed with one thread)."""
    grid = candidates(cfg)
    x, y = decision
    parent_logits = run_logits(session(parent, threads=threads), x)
    parent_acc = accuracy(parent_logits, y, heads)

    def measure(s: Settings, dst: Path) -> Tried:
        quantize_settings(model_in, dst, calib, s, fixed=fixed, cache=_cache(work, s))
        logits = run_logits(session(dst, threads=threads), x)
        acc, drop = accuracy(logits, y, heads), worst_drop(parent_logits, logits, y, heads)
        return Tried(s, dst, acc, drop, dst.stat().st_size, within(drop, parent_acc))

    tried: list[Tried] = []
    ranking: list[dict[str, Any]] = []
    for i, s in enumerate(grid):
        t = measure(s, work / f"cand-{i}.onnx")
        tried.append(t)
        if not t.within and cfg.fallback and max_float_layers > 0:
            if not ranking:
                ranking = _rank_layers(model_in, calib, s, fixed, x, parent_logits, y, heads,
                                       threads, work)  # fmt: skip
            for n in range(1, min(max_float_layers, len(ranking)) + 1):
                fs = Settings(**{**asdict(s), "float_nodes": tuple(r["node"] for r in ranking[:n])})
                t = measure(fs, work / f"cand-{i}-float{n}.onnx")
                tried.append(t)
                if t.within:
                    break
    ok = [t for t in tried if t.within]
    log(
        f"search: {len(tried)} candidates ({len(grid)} settings"
        f"{', with float fallbacks' if len(tried) > len(grid) else ''}), {len(ok)} within "
        f"tolerance on {len(y)} decision images (fp32 {parent_acc:.2f}%)"
    )
    if not ok:
        best = min(tried, key=lambda t: t.drop)
        raise GateError(
            f"no quantize.static search candidate stays within the tolerance: of {len(tried)} "
            f"tried, the best was {best.settings.label} at {best.accuracy:.2f}% vs fp32 "
            f"{parent_acc:.2f}% on {len(y)} decision images (a drop of {best.drop:.2f} points); "
            "try a larger tolerance, search.fallback=true with max_float_layers > 0, or "
            "quantize.qat"
        )
    # Screening: every candidate within tolerance, a few alternating rounds with the parent.
    names = {f"c{i}": t for i, t in enumerate(tried) if t.within}
    sessions = {"parent": session(parent, threads=1)}
    sessions |= {k: session(t.file, threads=1) for k, t in names.items()}
    screen = measure_latency_paired(
        sessions, x1, rounds=cfg.screen_rounds, per_round=cfg.screen_per_round
    )
    for k, t in names.items():
        t.screen_ms = screen[k]["latency_p50_ms"]
    final = finalists(names, cfg)
    # Finalists: alternating rounds with the fp32 parent; medians decide.
    lat = measure_latency_paired(
        {"parent": sessions["parent"]} | {k: sessions[k] for k in final},
        x1,
        rounds=cfg.rounds,
        per_round=cfg.per_round,
    )
    parent_ms = lat["parent"]["latency_p50_ms"]
    for k in final:
        t = names[k]
        t.finalist, t.p50_ms = True, lat[k]["latency_p50_ms"]
        t.speedup = parent_ms / t.p50_ms
    winner = choose(tried, cfg.objective, cfg.tie)
    log(
        f"search: {winner.settings.label} chosen ({cfg.objective}): {winner.bytes:,} bytes, "
        f"p50 {winner.p50_ms:.4f} ms vs fp32 {parent_ms:.4f} ms ({winner.speedup:.2f}x), "
        f"{winner.accuracy:.2f}% (a drop of {winner.drop:.2f} points) among "
        f"{len(final)} finalists"
    )
    return SearchResult(winner, tried, parent_acc, parent_ms, ranking)


def _cache(work: Path, s: Settings) -> Path:
    """Calibrated ranges, one file per method and op-type set (onnxruntime calibrates the
    inputs and outputs of the op types it quantizes; nodes kept in float do not change them)."""
    ops = "all" if s.op_types is None else "+".join(s.op_types)
    return work / f"calib-{s.calibrate_method}-{ops}.json"


def reproduce(
    src: Path,
    dst: Path,
    calib: np.ndarray,
    settings: dict[str, Any],
    *,
    fixed: dict[str, Any],
    preprocess: bool,
    work: Path,
    meta: dict[str, Any] | None = None,
) -> Path:
    """The file a search chose, made again from its fp32 source `src` and recorded `settings`
    (the manifest's `search_settings`), without any calibration cache. `meta`: the artifact's
    manifest entries, whose metadata is embedded in the file as the stored one has it."""
    from bonsai.formats import get_format
    from bonsai.formats.embedded import model_metadata
    from bonsai.quantization import preprocess as pre

    model_in = pre(src, work / "pre.onnx") if preprocess else src
    quantize_settings(model_in, dst, calib, Settings.from_dict(settings), fixed=fixed)
    if meta is not None and (entries := model_metadata(meta)):
        get_format("onnx").embed_metadata(dst, entries)
    return dst


def _qdq_args(s: Settings) -> dict[str, Any]:
    """`quantize_qdq`'s arguments for candidate settings `s` (which nodes aside)."""
    return {
        "method": s.calibrate_method,
        "per_channel": s.per_channel,
        "activation_symmetric": s.activation_symmetric,
        "op_types": list(s.op_types) if s.op_types is not None else None,
        "quant_format": s.quant_format,
    }


def _rank_layers(model_in, calib, s, fixed, x, parent_logits, y, heads, threads, work):
    """The weighted layers, most damaging first when quantized alone with settings `s`."""
    rows = []
    for j, layer in enumerate(layer_nodes(model_in)):
        dst = work / f"alone-{j}.onnx"
        quantize_qdq(
            model_in,
            dst,
            calib,
            **_qdq_args(s),
            nodes_to_quantize=[layer["node"]],
            cache=_cache(work, s),
            **fixed,
        )
        logits = run_logits(session(dst, threads=threads), x)
        dst.unlink()
        rows.append(
            {
                **layer,
                "drop_alone": worst_drop(parent_logits, logits, y, heads),
                "logit_error_alone": logit_error(logits, parent_logits),
            }
        )
    return sorted(rows, key=lambda r: (-r["drop_alone"], -r["logit_error_alone"]))


def keep(result: SearchResult, dst: Path) -> Path:
    """Move the winner's file to `dst`."""
    shutil.move(str(result.winner.file), dst)
    return dst
