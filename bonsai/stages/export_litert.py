"""`export.litert`: convert a torch model to LiteRT (TFLite) with litert-torch, then prove the
interpreter computes the same function (the converter runs in its own environment:
bonsai/litert.py). A multi-task model keeps one output per head, in the heads' order."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from bonsai.artifacts import Artifact, load_torch, write_manifest
from bonsai.errors import ConfigError, GateError, StageFailed
from bonsai.formats import get_format
from bonsai.heads import heads_from_meta
from bonsai.litert import convert, converter_python, output_names
from bonsai.onnx_utils import OUTPUT_NAME
from bonsai.stages.base import Stage, StageConfig, StageContext


class ExportLiteRTConfig(StageConfig):
    # The interpreter with litert-torch; null: $BONSAI_LITERT_PYTHON, else .venv-litert.
    python: str | None = None
    # Maximum |LiteRT - torch| over the logits of `parity_samples` test images.
    parity_tol: float = Field(default=1e-3, gt=0)
    parity_samples: int = Field(default=64, ge=1)


class ExportLiteRT(Stage):
    kind = "export.litert"
    Config = ExportLiteRTConfig
    consumes = ("torch",)
    produces = "litert"

    @classmethod
    def check_inputs(cls, config, input_kind, has_teacher) -> None:
        try:  # before any compute: a converter that is not there fails the command at once
            converter_python(config.python)
        except StageFailed as e:
            raise ConfigError(f"export.litert: {e}") from None

    def run(self, ctx: StageContext) -> Artifact:
        c: ExportLiteRTConfig = self.config  # type: ignore[assignment]
        assert ctx.input is not None
        heads = heads_from_meta(ctx.input.meta["model"])
        fmt = get_format(self.produces)
        path = ctx.out_dir / fmt.model_file
        versions = convert(ctx.input.path, path, heads, c.python)
        names = [n for n, _ in heads] if heads else [OUTPUT_NAME]
        if sorted(got := output_names(path)) != sorted(names):
            raise GateError(
                f"the LiteRT model's signature has outputs {got}; expected {names} (one per "
                "head, named after it, as in the ONNX graph)"
            )
        x = ctx.data.test_x[: c.parity_samples]
        diff = fmt.parity(load_torch(ctx.input), path, x)  # in the LiteRT interpreter
        if not np.isfinite(diff) or diff > c.parity_tol:
            raise GateError(
                f"LiteRT parity failed: max |LiteRT - torch| = {diff:.3g} over {len(x)} test "
                f"images, above parity_tol={c.parity_tol:g}"
            )
        meta = {k: v for k, v in ctx.input.meta.items() if k in ("model", "data")}
        return write_manifest(
            ctx.out_dir,
            self.produces,
            {
                **meta,
                "parity_max_abs_diff": diff,
                "converter": versions,
                "outputs": names,
            },
        )
