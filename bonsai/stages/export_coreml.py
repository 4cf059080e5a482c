"""`export.coreml`: convert a torch model to a Core ML package (ML Program) with coremltools.

Core ML runs only on Apple's systems, so here the stage proves what it can: the package loads
with coremltools' own reader, its input and outputs are the ones declared (one output per head
for a multi-task model, named after it), and it carries the metadata an app needs (class names,
input normalization, where it came from). Accuracy and latency are not measured: the comparison
table leaves them empty for Core ML rows rather than borrowing another variant's.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Literal

import torch

from bonsai.artifacts import Artifact, load_torch, write_manifest
from bonsai.errors import GateError, StageFailed
from bonsai.formats import get_format
from bonsai.formats.embedded import model_metadata
from bonsai.heads import heads_from_meta
from bonsai.onnx_utils import INPUT_NAME, OUTPUT_NAME, NamedHeads
from bonsai.stages.base import Stage, StageConfig, StageContext


class ExportCoreMLConfig(StageConfig):
    # Weights and compute: float16 is Core ML's default for ML Programs (the Neural Engine
    # runs float16); float32 keeps the torch model's numbers.
    precision: Literal["float16", "float32"] = "float16"
    minimum_target: Literal["iOS15", "iOS16", "iOS17", "iOS18"] = "iOS16"


def zip_package(package: Path, dst: Path) -> None:
    """The package folder as a zip with fixed timestamps and order (the same bytes every time)."""
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for f in sorted(p for p in package.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(
                str(Path(package.name) / f.relative_to(package)), (1980, 1, 1, 0, 0, 0)
            )
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, f.read_bytes())


def package_summary(package: Path) -> dict:
    """What coremltools' reader sees in a package: its type, input and output names and shapes,
    and metadata. Raises GateError when it cannot read it."""
    import coremltools as ct

    try:
        spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    except Exception as e:  # noqa: BLE001 - coremltools raises several types on bad packages
        raise GateError(f"coremltools cannot read the converted package: {e}") from e
    d = spec.description

    def shape(f) -> list[int]:
        return [int(s) for s in f.type.multiArrayType.shape]

    return {
        "type": spec.WhichOneof("Type"),
        "spec_version": int(spec.specificationVersion),
        "inputs": {f.name: shape(f) for f in d.input},
        "outputs": {f.name: shape(f) for f in d.output},
        "metadata": dict(d.metadata.userDefined),
        "author": d.metadata.author,
    }


class ExportCoreML(Stage):
    kind = "export.coreml"
    Config = ExportCoreMLConfig
    consumes = ("torch",)
    produces = "coreml"

    def run(self, ctx: StageContext) -> Artifact:
        c: ExportCoreMLConfig = self.config  # type: ignore[assignment]
        assert ctx.input is not None
        import logging

        logging.getLogger("coremltools").setLevel(logging.ERROR)  # "libcoremlpython": no macOS
        try:
            import coremltools as ct
        except ImportError as e:
            raise StageFailed(
                f"coremltools is not installed ({e}); pip install 'coremltools>=8,<10'"
            ) from e
        mm = ctx.input.meta["model"]
        heads = heads_from_meta(mm)
        model = load_torch(ctx.input)
        if heads:
            model = NamedHeads(model, [k for _, k in heads]).eval()
        shape = (1, *mm["input_shape"])
        names = [n for n, _ in heads] if heads else [OUTPUT_NAME]
        with torch.no_grad():
            traced = torch.jit.trace(model, torch.zeros(shape))
        try:
            ml = ct.convert(
                traced,
                inputs=[ct.TensorType(name=INPUT_NAME, shape=shape)],
                outputs=[ct.TensorType(name=n) for n in names],
                convert_to="mlprogram",
                compute_precision=getattr(ct.precision, c.precision.upper()),
                minimum_deployment_target=getattr(ct.target, c.minimum_target),
            )
        except Exception as e:  # noqa: BLE001 - the converter's message names the operator
            raise StageFailed(f"Core ML conversion failed: {type(e).__name__}: {e}") from e
        data = ctx.input.meta.get("data") or {}
        ml.author = "Bonsai"
        ml.short_description = (
            f"{ctx.name}: {mm['spec'].get('name', mm['spec'].get('_target_'))} on "
            f"{'x'.join(map(str, mm['input_shape']))} inputs, "
            f"{'heads ' + ', '.join(names) if heads else str(mm['num_classes']) + ' classes'}"
        )
        ml.user_defined_metadata["bonsai.source_digest"] = ctx.input.digest
        ml.user_defined_metadata["bonsai.classes"] = json.dumps(data.get("classes", []))
        ml.user_defined_metadata["bonsai.normalize"] = json.dumps(data.get("normalize", {}))
        if heads:
            ml.user_defined_metadata["bonsai.heads"] = json.dumps(mm["heads"])
        # The same preprocessing and output entries the ONNX and LiteRT files carry.
        ml.user_defined_metadata.update(model_metadata({"model": mm, "data": data}))
        with tempfile.TemporaryDirectory(dir=ctx.out_dir.parent) as tmp:
            package = Path(tmp) / "model.mlpackage"
            ml.save(str(package))
            summary = package_summary(package)
            want_in = {INPUT_NAME: list(shape)}
            if summary["inputs"] != want_in or list(summary["outputs"]) != names:
                raise GateError(
                    f"the Core ML package declares inputs {summary['inputs']} and outputs "
                    f"{list(summary['outputs'])}; expected {want_in} and {names}"
                )
            if summary["metadata"].get("bonsai.source_digest") != ctx.input.digest:
                raise GateError("the Core ML package lost its metadata on saving")
            package_bytes = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
            zip_package(package, ctx.out_dir / get_format(self.produces).model_file)
            shutil.rmtree(package)
        return write_manifest(
            ctx.out_dir,
            self.produces,
            {
                "model": mm,
                "data": data,
                "coreml": {**summary, "package_bytes": package_bytes, **c.model_dump()},
                "coremltools_version": ct.__version__,
            },
        )
