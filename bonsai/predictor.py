"""A deployed variant: raw images in, the same answer out whatever the variant is.

Every Bonsai artifact that runs here (torch, ONNX or LiteRT, fp32 or int8) is served through
`Predictor`, so code written against one variant works on every other: it takes the images as the
data set stores them (`raw_format` in the artifact's manifest: e.g. uint8 [N, H, W, C] from image
files, the 0..16 grid values [N, 8, 8] for digits), applies the same preprocessing the evaluator's
inputs went through (`bonsai.data.preprocess`: scale to [0, 1], per-channel normalization), runs
the model, and returns the class index, the class name and the class probabilities. Fed the test
split's raw images it reproduces the evaluated accuracy exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bonsai.artifacts import open_artifact
from bonsai.data import preprocess
from bonsai.errors import ArtifactError
from bonsai.formats import get_format
from bonsai.onnx_utils import run_logits


class Predictor:
    def __init__(self, artifact_dir: str | Path, threads: int = 1):
        self.artifact = open_artifact(artifact_dir)  # checksums verified
        data = self.artifact.meta.get("data") or {}
        missing = [k for k in ("classes", "normalize", "raw_format") if k not in data]
        if missing:
            raise ArtifactError(
                f"artifact {str(artifact_dir)!r} does not record {', '.join(missing)}: it was "
                "made by an older Bonsai; run its pipeline again (runtime.force=all)"
            )
        self.classes = np.asarray(data["classes"], dtype=object)
        self.raw_format = data["raw_format"]
        self.mean = data["normalize"]["mean"]
        self.std = data["normalize"]["std"]
        # Multi-task: [(name, label names)] per head, in the order of the logit columns.
        self.heads = [
            (str(h["name"]), np.asarray(h["classes"], dtype=object))
            for h in self.artifact.meta["model"].get("heads") or []
        ]
        # Each format opens its own session (a torch module, onnxruntime, the LiteRT
        # interpreter) behind one `run`/`get_inputs`, so every variant answers the same way.
        sess = get_format(self.artifact.kind).artifact_session(self.artifact, threads)

        def logits(x: np.ndarray) -> np.ndarray:
            return run_logits(sess, x)

        self._logits = logits

    def input_shape(self) -> tuple[int, ...]:
        """The raw shape of one image, as `raw_format.layout` orders it."""
        c, h, w = self.artifact.meta["model"]["input_shape"]
        return {"NHW": (h, w), "NHWC": (h, w, c), "NCHW": (c, h, w)}[self.raw_format["layout"]]

    def predict(self, raw: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """{"class_index": int64 [N], "class_name": object [N], "probabilities": float32 [N, K]}.

        Multi-task: those three are the first head's, and every head adds `<head>_index`,
        `<head>_name` and `<head>_probabilities` (its own softmax over its own columns)."""
        raw = np.asarray(raw)
        if raw.shape[1:] != self.input_shape():
            raise ValueError(
                f"expected images of shape [N, {', '.join(map(str, self.input_shape()))}] "
                f"({self.raw_format['layout']}, as the data set stores them), got {list(raw.shape)}"
            )
        parts = []
        for i in range(0, len(raw), batch_size):
            x = preprocess(raw[i : i + batch_size], self.raw_format, self.mean, self.std)
            parts.append(self._logits(x))
        width = sum(len(c) for _, c in self.heads) or len(self.classes)
        z = np.concatenate(parts) if parts else np.zeros((0, width), np.float32)
        if not self.heads:
            return _answer(z, self.classes)
        out: dict[str, np.ndarray] = {}
        start = 0
        for i, (name, classes) in enumerate(self.heads):
            a = _answer(z[:, start : start + len(classes)], classes)
            start += len(classes)
            if i == 0:
                out.update(a)
            out[f"{name}_index"], out[f"{name}_name"] = a["class_index"], a["class_name"]
            out[f"{name}_probabilities"] = a["probabilities"]
        return out

    def columns(self, raw: np.ndarray) -> dict[str, list | np.ndarray]:
        """`predict` as table columns, one row per image, in `predict`'s order (what the logged
        MLflow model returns as a DataFrame): names as str, each row's probabilities a list."""

        def column(key: str, values: np.ndarray) -> list | np.ndarray:
            if key.endswith("probabilities"):
                return list(values)
            return values.astype(str) if key.endswith("name") else values

        return {k: column(k, v) for k, v in self.predict(raw).items()}


def _answer(z: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    idx = z.argmax(axis=1).astype(np.int64)
    return {
        "class_index": idx,
        "class_name": classes[idx],
        "probabilities": (e / e.sum(axis=1, keepdims=True)).astype(np.float32),
    }
