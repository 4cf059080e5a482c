"""What a bare model file says about itself, in its own metadata.

A mobile engineer takes the `.onnx` or `.tflite` file away, not the artifact folder beside it:
the file alone must say how raw images become its input and what its outputs mean. The formats
that can hold key/value metadata (ONNX `metadata_props`, the LiteRT flatbuffer's `metadata`
entries) write these entries when the artifact's manifest is written (`Format.embed_metadata`,
called by `bonsai.artifacts.write_manifest` before the files are checksummed):

    bonsai.metadata_version  "1"
    bonsai.preprocessing     JSON: raw image -> input tensor (below)
    bonsai.outputs           JSON: [{"name": output, "classes": [label, ...], "values": "logits"}]
                             one entry per output in the model's order: one per head of a
                             multi-task model (named after it), else one named `logits`

`bonsai.preprocessing` holds `image` (image files: the reader, the color `mode` the file is
converted to, the `size` and `resize_filter` it is resized with, the `order` of those steps;
null for data sets stored as arrays), `raw` (layout and dtype of the decoded pixels),
`divide_by`, per-channel `mean` and `std`, `channel_order`, `input` (name, dtype, layout,
shape), and `formula`, the arithmetic in words. Fed that way, the file computes what Bonsai
evaluated, as `bonsai.predictor` does from the manifest.
"""

from __future__ import annotations

import json
from typing import Any

METADATA_VERSION = "1"
VERSION_KEY = "bonsai.metadata_version"
PREPROCESSING_KEY = "bonsai.preprocessing"
OUTPUTS_KEY = "bonsai.outputs"
KEYS = (VERSION_KEY, PREPROCESSING_KEY, OUTPUTS_KEY)


def model_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """The entries for an artifact's model file, from its manifest's `meta` (`model` and `data`
    sections); empty when the manifest does not record the data's preprocessing."""
    from bonsai.onnx_utils import INPUT_NAME, OUTPUT_NAME

    data, model = meta.get("data") or {}, meta.get("model") or {}
    if not {"classes", "normalize", "raw_format"} <= set(data) or "input_shape" not in model:
        return {}
    c, h, w = (int(d) for d in model["input_shape"])
    raw = data["raw_format"]
    image = data.get("decode") or None
    preprocessing = {
        "image": image,
        "raw": {"layout": raw["layout"], "dtype": raw["dtype"]},
        "divide_by": float(raw["divide_by"]),
        "mean": [float(m) for m in data["normalize"]["mean"]],
        "std": [float(s) for s in data["normalize"]["std"]],
        # The channels as the model takes them: those of the decoded image (Pillow's mode).
        "channel_order": image["mode"] if image else ("L" if c == 1 else "RGB"),
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "layout": "NCHW",
            "shape": ["batch", c, h, w],
        },
        "formula": "input[n, c, y, x] = (float32(pixel[n, y, x, c]) / divide_by - mean[c]) "
        "/ std[c], in float32 arithmetic",
    }
    heads = model.get("heads") or []
    outputs = [
        {"name": str(hd["name"]), "classes": [str(k) for k in hd["classes"]], "values": "logits"}
        for hd in heads
    ] or [{"name": OUTPUT_NAME, "classes": [str(k) for k in data["classes"]], "values": "logits"}]
    return {
        VERSION_KEY: METADATA_VERSION,
        PREPROCESSING_KEY: json.dumps(preprocessing, sort_keys=True),
        OUTPUTS_KEY: json.dumps(outputs),
    }


def summary(entries: dict[str, str]) -> str:
    """One paragraph for a format's free-text description field (ONNX `doc_string`, LiteRT
    `description`): what to feed and what comes out, pointing at the keys for the details."""
    pre = json.loads(entries[PREPROCESSING_KEY])
    outs = json.loads(entries[OUTPUTS_KEY])
    image = pre["image"]
    read = (
        f"Decode each image with {image['reader']}, convert to mode {image['mode']}, resize to "
        f"{image['size'][0]}x{image['size'][1]} ({image['resize_filter']}) if the size differs; "
        if image
        else ""
    )
    return (
        f"Made by Bonsai. {read}input '{pre['input']['name']}' is float32 NCHW "
        f"{pre['input']['shape'][1:]} = (pixel / {pre['divide_by']:g} - mean) / std per channel "
        f"(mean {[round(m, 4) for m in pre['mean']]}, std {[round(s, 4) for s in pre['std']]}). "
        "Outputs (logits): "
        + "; ".join(f"{o['name']}: {', '.join(o['classes'])}" for o in outs)
        + f". Exact values: metadata {PREPROCESSING_KEY} and {OUTPUTS_KEY}."
    )
