"""Batch-1 latency, every default in one place: what the evaluator, the final comparison, the
quantization speed guard and promotion's re-measurement time with.

Batch-1 latency on a shared machine drifts by tens of percent over seconds; comparisons are made
in alternating rounds in one process (`measure_latency_paired`) so every model sees the same
drift and the ratios are trustworthy.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

THREADS = 1  # onnxruntime intra-op threads when timing (a phone core, roughly)
WARMUP = 20  # untimed runs before timing
REPEATS = 200  # timed batch-1 runs of one model (the evaluator)
ROUNDS = 10  # alternating rounds over every model (side-by-side comparisons)
PER_ROUND = 50  # timed runs of each model per round


def latency_samples(sess, x1: np.ndarray, repeats: int) -> np.ndarray:
    """`repeats` wall-clock timings (ms) of single runs on one batch-1 input."""
    name = sess.get_inputs()[0].name
    feed = {name: np.ascontiguousarray(x1, dtype=np.float32)}
    out = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        out[i] = (time.perf_counter_ns() - t0) / 1e6
    return out


def measure_latency(
    sess, x1: np.ndarray, warmup: int = WARMUP, repeats: int = REPEATS
) -> dict[str, float]:
    """Median and 90th percentile batch-1 latency in ms, after warm-up runs."""
    latency_samples(sess, x1, warmup)
    s = latency_samples(sess, x1, repeats)
    return {"latency_p50_ms": float(np.median(s)), "latency_p90_ms": float(np.percentile(s, 90))}


def measure_latency_paired(
    sessions: Mapping[str, Any],
    x1: np.ndarray,
    rounds: int = ROUNDS,
    per_round: int = PER_ROUND,
    warmup: int = WARMUP,
) -> dict[str, dict[str, float]]:
    """Latency of several models measured in alternating rounds in one process: the order
    reverses every round (A B C, C B A, ...) so no model always runs right after another."""
    samples: dict[str, list[np.ndarray]] = {k: [] for k in sessions}
    for s in sessions.values():
        latency_samples(s, x1, warmup)
    order = list(sessions)
    for r in range(rounds):
        for k in order if r % 2 == 0 else order[::-1]:
            samples[k].append(latency_samples(sessions[k], x1, per_round))
    out = {}
    for k, parts in samples.items():
        a = np.concatenate(parts)
        out[k] = {
            "latency_p50_ms": float(np.median(a)),
            "latency_p90_ms": float(np.percentile(a, 90)),
        }
    return out
