"""bench/pipeline_overhead.py: the doc's tables come from its JSON, ratios per round with their
spread, and the verdict from the median round."""

from bench import pipeline_overhead as bench


def _result(plain, flow):
    parts = {"imports": 3.0, "stages": 60.0}
    return {
        "what": "the default run (digits)",
        "orders": ["plain flow", "flow plain", "plain flow"][: len(plain)],
        "walls": {"plain": plain, "flow": flow},
        "parts": {"plain": dict(parts), "flow": {k: 2 * v for k, v in parts.items()}},
    }


def test_ratios_are_per_round_with_their_spread_and_the_verdict_uses_the_median():
    text = bench.render(_result([80.0, 100.0, 90.0], [90.0, 130.0, 99.0]))
    # Per round: 90/80 = 1.125, 130/100 = 1.30, 99/90 = 1.10 -> median 1.125 (1.10-1.30).
    assert "| ratio per round: median (min-max) | 1.00 | 1.12 (1.10-1.30) |" in text
    assert "| median | 90.0 s | 99.0 s |" in text
    # Extras 10, 30, 9 -> median +10.0 s, allowed max(10% of 90, 15) = 15 s: met.
    assert "extra per round: median +10.0 s (+9.0 to +30.0)" in text and "-> met" in text
    assert "| stages | 40.0 |" in text  # flow parts: the mean of the rounds (120 / 3)


def test_a_missed_target_and_a_short_run_say_so():
    text = bench.render(_result([80.0], [120.0]))
    assert "-> MISSED" in text
    assert "fewer than 3 rounds: a smoke check, not a measurement" in text
