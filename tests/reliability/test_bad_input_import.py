"""A user's own model file that cannot be imported as given is refused before any compute: one
line naming the file and the fix, exit 2 from the command line, no store, no run.

Each case goes through `flows.compress.prepare` (config, graph, store, models, data: everything
checked before Prefect or MLflow start), on the digits data (1x8x8 images, 10 classes).
"""

from __future__ import annotations

import os

import onnx
import pytest
import torch

from bonsai.errors import ConfigError
from bonsai.models import SmallCNN
from flows.compress import compose_config, prepare
from tests.helpers import run_cli
from tests.own_model import (
    SPEC,
    pickled_payload,
    rewrite_program,
    save_export,
    save_onnx,
    save_torchscript,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Model files that each fail one check (untrained nets: nothing here needs weights that
    classify)."""
    d = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    net = SmallCNN(1, 10, width=8).eval()
    sd = net.state_dict()
    torch.save(sd, d / "net.pt")
    torch.save({**{k: v for k, v in sd.items() if k != "classifier.bias"}, "extra.w": sd["classifier.weight"]}, d / "keys.pt")  # fmt: skip
    torch.save(net, d / "whole.pt")
    (d / "payload.pt").write_bytes(pickled_payload(d / "ran"))
    (d / "text.pt").write_text("not a checkpoint\n")
    (d / "net.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    (d / "garbage.onnx").write_bytes(b"\x00\x01 not protobuf at all" * 10)
    save_torchscript(net, d / "scripted.pt")
    save_export(net, d / "net.pt2")
    rewrite_program(d / "net.pt2", d / "unsafe.pt2", edit=_call_os_system)
    save_export(SmallCNN(1, 4, width=8), d / "four.pt2")
    save_onnx(SmallCNN(3, 10, width=8), d / "rgb.onnx", shape=(3, 8, 8))
    save_onnx(SmallCNN(1, 4, width=8), d / "four.onnx")
    save_onnx(net, d / "static.onnx", dynamic=False)
    for name, location in (
        ("up", "../weights.bin"),
        ("absolute", str(d / "weights.bin")),
        ("link", "link.bin"),
    ):
        _external(net, d / name, location)
    return d


def _call_os_system(program):
    program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"


def _external(net, folder, location):
    """An ONNX file whose weights are external data at `location` (relative to its folder)."""
    folder.mkdir()
    path = save_onnx(net, folder / "net.onnx")
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)  # fmt: skip
    outside = folder.parent / "weights.bin"
    os.replace(folder / "weights.bin", outside)  # the data now lies outside the folder
    if location == "link.bin":
        (folder / "link.bin").symlink_to(outside)  # inside by name, outside by target
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, str(path))


KEY = "pipeline.stages.model"
CASES = [
    # (id, pipeline, stage overrides (file names relative to the fixture's folder), needles)
    ("missing-file", "from_checkpoint", {"path": "nowhere/net.pt2"}, ["path: no file at", "nowhere/net.pt2"]),
    ("unknown-format", "from_checkpoint", {"path": "net.h5"}, ["net.h5 is of no format Bonsai imports", ".onnx"]),
    ("not-a-checkpoint", "from_checkpoint", {"path": "text.pt", "model": SPEC}, ["text.pt is not a PyTorch file"]),
    ("not-onnx", "from_onnx", {"path": "garbage.onnx"}, ["garbage.onnx is not an ONNX model"]),
    ("format-says-otherwise", "from_checkpoint", {"path": "net.pt", "format": "torchscript"}, ["net.pt is not a TorchScript archive"]),
    (
        "other-shapes",
        "from_checkpoint",
        {"path": "net.pt", "model": {"name": "cnn", "width": 16}},
        ["do not fit the architecture", "features.0.weight [8, 1, 3, 3] vs [16, 1, 3, 3]"],
    ),
    (
        "missing-and-unexpected-keys",
        "from_checkpoint",
        {"path": "keys.pt", "model": SPEC},
        ["1 missing (classifier.bias)", "1 unexpected (extra.w)"],
    ),
    ("weights-without-architecture", "from_checkpoint", {"path": "net.pt"}, ["net.pt holds weights only", "set `model`"]),
    ("pickle-without-trust", "from_checkpoint", {"path": "whole.pt"}, ["whole.pt is a pickled Python object", "bonsai.models.SmallCNN", "trust: true"]),
    ("code-in-a-pickle", "from_checkpoint", {"path": "payload.pt", "model": SPEC}, ["payload.pt is a pickled Python object", "tests.own_model.write_marker", "trust: true"]),
    ("torchscript-without-trust", "from_checkpoint", {"path": "scripted.pt"}, ["scripted.pt is a TorchScript archive", "trust: true"]),
    ("unsafe-pt2-without-trust", "from_checkpoint", {"path": "unsafe.pt2"}, ["unsafe.pt2 is a torch.export program", "torch.os.system", "trust: true"]),
    ("program-of-other-classes", "from_checkpoint", {"path": "four.pt2"}, ["four.pt2 outputs [2, 4]", "the data has 10 classes"]),
    ("onnx-of-other-channels", "from_onnx", {"path": "rgb.onnx"}, ["rgb.onnx takes input 'pixels' of shape ['batch', 3, 8, 8]", "(C differs)"]),
    ("onnx-of-other-classes", "from_onnx", {"path": "four.onnx"}, ["four.onnx outputs [2, 4]", "10 classes"]),
    ("onnx-with-a-fixed-batch", "from_onnx", {"path": "static.onnx"}, ["static.onnx does not run in onnxruntime", "dynamic batch"]),
    ("external-data-up", "from_onnx", {"path": "up/net.onnx"}, ["external data '../weights.bin'", "outside its folder"]),
    ("external-data-absolute", "from_onnx", {"path": "absolute/net.onnx"}, ["weights.bin', outside its folder"]),
    ("external-data-link-out", "from_onnx", {"path": "link/net.onnx"}, ["external data 'link.bin'", "outside its folder"]),
    ("onnx-with-an-architecture", "from_onnx", {"path": "four.onnx", "model": SPEC}, ["an ONNX file carries its own graph"]),
    ("no-file-at-all", "from_onnx", {}, ["set exactly one of path", "pretrained"]),
]  # fmt: skip


def _overrides(pipeline, stage, folder, store):
    out = [f"pipeline={pipeline}", "data=digits", f"tracking.store_dir={store}"]
    for k, v in stage.items():
        if k == "path":
            v = str(folder / v)
        if isinstance(v, dict):
            v = "{" + ",".join(f"{a}:{b}" for a, b in v.items()) + "}"
        out.append(f"{KEY}.{k}={v}")
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_bad_model_file_is_refused_before_any_work(case, files, tmp_path):
    _, pipeline, stage, needles = case
    store = tmp_path / "mlruns"
    raw = compose_config(_overrides(pipeline, stage, files, store))
    with pytest.raises(ConfigError) as e:
        prepare(raw)
    text = str(e.value)
    for needle in needles:
        assert needle in text, (needle, text)
    assert not store.exists(), "no MLflow store, run or stage artifact may be created"
    assert not (files / "ran").exists(), "no code from a file may run"


def test_a_program_cannot_be_pruned_and_the_message_says_what_can(files, tmp_path):
    store = tmp_path / "mlruns"
    overrides = _overrides("from_checkpoint", {"path": "net.pt2"}, files, store)
    raw = compose_config(
        [*overrides, "+pipeline.stages.pruned={kind:prune.structured,input:model}"]
    )
    with pytest.raises(ConfigError) as e:
        prepare(raw)
    assert "pipeline.stages.pruned.input: prune.structured takes torch models" in str(e.value)
    assert "produces torch_program" in str(e.value) and "set the import's `model`" in str(e.value)
    # With its architecture, the same file's weights make a torch model, which prunes.
    raw = compose_config([*overrides, f"{KEY}.model={{name:cnn,width:8}}",
                          "+pipeline.stages.pruned={kind:prune.structured,input:model}"])  # fmt: skip
    prepare(raw)
    assert not store.exists()


def test_pretrained_weights_offline_are_refused_saying_how_to_give_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *a, **kw):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    store = tmp_path / "mlruns"
    raw = compose_config(
        ["pipeline=from_checkpoint", f"{KEY}.pretrained=resnet18", f"tracking.store_dir={store}"]
    )
    with pytest.raises(ConfigError) as e:
        prepare(raw)
    assert f"{KEY}.pretrained: resnet18" in str(e.value) and "needs internet once" in str(e.value)
    assert not store.exists()


def test_the_command_line_exits_2_with_one_line_and_no_traceback(files, tmp_path):
    store = tmp_path / "store"
    proc = run_cli(
        store, ["pipeline=from_checkpoint", f"{KEY}.path={files / 'whole.pt'}", "data=digits"], 120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "whole.pt" in line]
    assert len(lines) == 1 and f"{KEY}.path: whole.pt is a pickled Python object" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not store.exists()
