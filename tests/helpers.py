"""Small helpers shared by tests: run a stage into a temp dir."""

from __future__ import annotations

from pathlib import Path

from bonsai.artifacts import Artifact
from bonsai.stages import StageContext, get_stage


def run_stage(
    kind, params, data, out: Path, *, input=None, teacher=None, seed=0, name=None
) -> Artifact:
    cls = get_stage(kind)
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        name=name or kind,
        data=data,
        out_dir=out,
        input=input,
        teacher=teacher,
        seed=seed,
        progress=False,
    )
    return cls(cls.Config.model_validate(params)).run(ctx)
