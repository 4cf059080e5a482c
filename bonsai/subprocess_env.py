"""The environment of a Python subprocess that imports this checkout's bonsai: the footprint's
memory probes and the LiteRT converter both start one.

A module of its own, importing nothing of Bonsai's: the LiteRT runtime module (which a format
module imports) and the footprint (which asks the format table) both need it, and neither may
import the other for it without closing an import cycle through `bonsai.formats`.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout: its bonsai is the one imported


def bonsai_env() -> dict[str, str]:
    """PYTHONPATH starts with the checkout; one OpenMP thread by default."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
