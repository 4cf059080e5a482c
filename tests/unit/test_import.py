"""The `import` stage: a model trained by a plain script outside Bonsai, saved in every format
users save models in, comes into the store evaluated exactly as the script measured it, keyed on
its content, and goes on through distillation, pruning and int8 with itself as the reference."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from bonsai.artifacts import load_torch, open_artifact
from bonsai.build import run_stage
from bonsai.data import load_data
from bonsai.errors import ConfigError
from bonsai.formats.program_format import UnsafeProgram, check_program, load_program
from bonsai.measure.compare import Variant, compare, format_table
from bonsai.stages import ModelCheck, get_stage
from bonsai.store import Store
from tests.own_model import SPEC, pickled_payload, rewrite_program, save_all, train_plain

FAST_EVAL = {"warmup": 1, "repeats": 10, "footprint": False}
Import = get_stage("import")


@pytest.fixture(scope="module")
def data():
    return load_data({"name": "digits", "max_train": 600, "max_test": 300})


@pytest.fixture(scope="module")
def own(data, tmp_path_factory):
    """(the files of a model trained by a plain script, the accuracy the script measured)."""
    net, accuracy = train_plain(data)
    assert 50 < accuracy < 100  # trained, and not trivially perfect: equality means something
    return save_all(net, tmp_path_factory.mktemp("own")), accuracy


def check(params: dict, data) -> None:
    """The stage's pre-flight checks, as `flows.compress.prepare` runs them."""
    config = Import.Config.model_validate(params)
    Import.check_models(config, ModelCheck(None, None, data.input_shape, data.num_outputs))


FORMATS = [
    # (file, extra parameters, artifact kind made)
    ("state_dict", {"model": SPEC}, "torch"),
    ("wrapped", {"model": SPEC}, "torch"),  # {"state_dict": {"model.<key>": ...}, "epoch": ...}
    ("safetensors", {"model": SPEC}, "torch"),
    ("torch_export", {}, "torch_program"),
    ("torch_export", {"model": SPEC}, "torch"),  # its weights into the architecture
    ("torchscript", {"trust": True}, "torch_program"),
    ("pickle", {"trust": True}, "torch_program"),
    ("pickle", {"trust": True, "model": SPEC}, "torch"),
    ("onnx", {}, "onnx"),
    ("onnx_external", {}, "onnx"),  # weights in a .data file beside it
    ("onnx_batch1", {}, "onnx"),  # exported for batch 1 only: made dynamic on import
]


@pytest.mark.parametrize(
    ("name", "extra", "kind"),
    FORMATS,
    ids=[f"{n}{'+model' if 'model' in e else ''}" for n, e, _ in FORMATS],
)
def test_imported_accuracy_equals_what_the_plain_script_measured(
    name, extra, kind, own, data, tmp_path
):
    files, accuracy = own
    params = {"path": str(files[name]), **extra}
    check(params, data)  # pre-flight passes
    built = run_stage(tmp_path, "model", "import", params, data, eval_cfg=FAST_EVAL, log=print)
    assert built.artifact.kind == kind
    assert built.metrics["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert built.metrics["params"] > 0 and built.metrics["macs"] > 0
    source = built.artifact.meta["source"]
    assert source["file"] == files[name].name and len(source["sha256"]) == 64
    if kind == "torch_program":  # a trusted file too is stored as a program that is safe to load
        check_program(built.artifact.file.read_bytes(), "stored")
    # The store holds a copy: reloaded from it alone, it computes the same predictions.
    if kind != "onnx":
        model = load_torch(open_artifact(built.artifact.path))
        with torch.no_grad():
            preds = model(data.test_x).argmax(1).numpy()
        assert (preds == np.asarray(built.record.evaluation.predictions)).all()


def test_an_onnx_import_takes_bonsai_names_and_a_dynamic_batch(own, data, tmp_path):
    import onnx

    files, _ = own
    built = run_stage(
        tmp_path, "model", "import", {"path": str(files["onnx_batch1"])}, data, evaluate=False
    )
    graph = onnx.load(str(built.artifact.file)).graph
    assert [i.name for i in graph.input] == ["input"] and graph.output[0].name == "logits"
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not list(built.artifact.path.glob("*.data"))  # external data inlined: one file


def test_an_imported_model_goes_through_distill_prune_and_int8_as_the_reference(
    own, data, tmp_path
):
    files, accuracy = own

    def stage(name, kind, params, **kw):
        return run_stage(tmp_path, name, kind, params, data, eval_cfg=FAST_EVAL, **kw)

    # The .pt2 program as the teacher, the state_dict (with its architecture) pruned itself.
    model = stage("model", "import", {"path": str(files["torch_export"])})
    weights = stage("weights", "import", {"path": str(files["state_dict"]), "model": SPEC})
    student = stage(
        "student", "distill", {"model": {"name": "cnn", "width": 4}, "epochs": 2, "lr": 0.01},
        teacher=model,
    )  # fmt: skip
    pruned = stage(
        "pruned", "prune.structured", {"ratio": 0.25, "epochs": 1}, input=student, teacher=model
    )
    pruned_import = run_stage(
        tmp_path, "pruned_import", "prune.structured", {"ratio": 0.5}, data, input=weights,
        evaluate=False,
    )  # fmt: skip
    onnx = stage("onnx", "export.onnx", {}, input=pruned)
    int8 = stage("int8", "quantize.static", {"tolerance": None}, input=onnx)
    program_onnx = stage("program_onnx", "export.onnx", {}, input=model)
    assert program_onnx.metrics["accuracy"] == accuracy  # the program exports faithfully
    assert pruned_import.artifact.meta["model"]["params"] < weights.metrics["params"]
    assert int8.artifact.kind == "onnx" and "speed_guard_ok" in int8.metrics

    built = [model, student, pruned, onnx, int8]
    store = Store(tmp_path)
    variants = [
        Variant(
            b.key.rsplit("-", 1)[0],
            "import" if b is model else b.record.kind,
            b.metrics,
            np.asarray(b.record.evaluation.predictions),
            store.latency_model(b.key, b.artifact.kind),
        )
        for b in built
    ]
    rows = compare(variants, "model", data.test_x[:1].numpy(), rounds=1, per_round=5)
    assert rows[0]["stage"] == "model" and rows[0]["accuracy"] == accuracy
    assert rows[0]["accuracy_delta"] == 0 and rows[0]["speedup"] == 1
    assert rows[-1]["stage"] == "int8" and rows[-1]["agreement"] > 0
    table = format_table(rows)
    assert "| model   | import" in table and "| int8    | quantize.static" in table


def test_the_key_follows_the_files_content_not_its_path(own, data, tmp_path):
    files, _ = own
    mine = tmp_path / "mine"
    mine.mkdir()
    original = shutil.copy(files["state_dict"], mine / "net.pt")
    params = {"path": str(original), "model": SPEC}
    store = tmp_path / "store"

    first = run_stage(store, "model", "import", params, data, eval_cfg=FAST_EVAL)
    assert first.built
    assert not run_stage(store, "model", "import", params, data, eval_cfg=FAST_EVAL).built

    # The same bytes elsewhere: the same key, reused.
    elsewhere = shutil.copy(original, tmp_path / "copy.pt")
    moved = run_stage(
        store, "model", "import", {**params, "path": str(elsewhere)}, data, eval_cfg=FAST_EVAL
    )
    assert moved.key == first.key and not moved.built

    # The original edited: another key, imported again.
    state = torch.load(original, weights_only=True)
    state["classifier.bias"] += 1.0
    torch.save(state, original)
    edited = run_stage(store, "model", "import", params, data, eval_cfg=FAST_EVAL)
    assert edited.key != first.key and edited.built

    # The original gone: refused at pre-flight, naming the file; the finished builds still load.
    original.rename(tmp_path / "gone.pt")
    with pytest.raises(ConfigError, match=r"path: no file at .*mine/net\.pt"):
        check(params, data)
    for b in (first, edited):
        art = open_artifact(b.artifact.path)  # checksums verified
        with torch.no_grad():
            preds = load_torch(art)(data.test_x).argmax(1).numpy()
        assert (preds == np.asarray(b.record.evaluation.predictions)).all()
    assert first.metrics["accuracy"] != edited.metrics["accuracy"] or (
        first.artifact.digest != edited.artifact.digest
    )


def test_an_onnx_files_external_data_is_part_of_its_key(own, data, tmp_path):
    files, _ = own
    folder = shutil.copytree(files["onnx_external"].parent, tmp_path / "ext")
    params = {"path": str(folder / "net.onnx")}
    key = Import.key_params(params)["sha256"]
    data_file = next(p for p in folder.iterdir() if p.suffix != ".onnx")
    raw = bytearray(data_file.read_bytes())
    raw[-1] ^= 0x01
    data_file.write_bytes(bytes(raw))
    assert Import.key_params(params)["sha256"] != key
    assert "path" not in Import.key_params(params)


# ---------------------------------------------------------------------------------------------
# What is loaded without trust, and what never runs


def _edit_target(program):
    program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"


def _edit_expression(program):
    text = json.dumps(program)
    symbol = next(s for s in text.split('"') if s.startswith("Symbol("))
    program.clear()
    program.update(json.loads(text.replace(symbol, "__import__('os').getcwd()")))


def _edit_guards(program):
    program["guards_code"] = ["__import__('os').getcwd()"]


def _edit_comment(program):
    node = program["graph_module"]["graph"]["nodes"][0]
    node["metadata"]["stack_trace"] = 'File "x.py", line 1, in f\n    y\rimport os'


UNSAFE = [
    ("call-target", dict(edit=_edit_target), "calls 'torch.os.system'"),
    ("shape-expression", dict(edit=_edit_expression), "symbolic shape expression"),
    ("guards-code", dict(edit=_edit_guards), "guards code"),
    ("carriage-return", dict(edit=_edit_comment), "control characters"),
    ("shared-library", dict(add={"data/aotinductor/model/model.so": b"\x7fELF"}), "aotinductor"),
]


@pytest.mark.parametrize(("name", "change", "why"), UNSAFE, ids=[u[0] for u in UNSAFE])
def test_a_pt2_outside_the_checked_subset_needs_trust(name, change, why, own, data, tmp_path):
    files, _ = own
    bad = rewrite_program(files["torch_export"], tmp_path / "bad.pt2", **change)
    with pytest.raises(UnsafeProgram, match=why):
        check_program(bad.read_bytes(), "bad.pt2")
    with pytest.raises(UnsafeProgram):
        load_program(bad)
    with pytest.raises(
        ConfigError, match=r"path: bad\.pt2 is a torch\.export program .*trust: true"
    ):
        check({"path": str(bad)}, data)


def test_pickled_sample_inputs_are_refused_and_never_unpickled(own, data, tmp_path):
    files, _ = own
    marker = tmp_path / "ran"
    bad = rewrite_program(
        files["torch_export"],
        tmp_path / "bad.pt2",
        replace={"sample_inputs/model.pt": pickled_payload(marker)},
    )
    with pytest.raises(ConfigError, match="sample inputs are not plain tensors.*trust: true"):
        check({"path": str(bad)}, data)
    assert not marker.exists()


def test_a_whole_pickled_module_is_refused_without_trust_and_its_code_never_runs(data, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    path.write_bytes(pickled_payload(marker))
    with pytest.raises(ConfigError) as e:
        check({"path": str(path)}, data)
    assert "a pickled Python object" in str(e.value) and "trust: true" in str(e.value)
    assert "it references tests.own_model.write_marker" in str(e.value)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Pretrained weights by name: the download path, tested offline


def test_pretrained_weights_download_once_and_offline_say_how_to_give_the_file(
    tmp_path, monkeypatch
):
    from bonsai.model_files import pretrained_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls = []

    def offline(url, dst, *a, **kw):
        calls.append(url)
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigError) as e:
        pretrained_file("resnet18")
    text = str(e.value)
    assert calls == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    assert "needs internet once" in text and str(tmp_path / "torch") in text
    assert "path=<file>.pth with model={_target_:torchvision.models.resnet18}" in text

    # A file already in torch's cache is used as it is: no download.
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"weights")
    assert pretrained_file("ResNet18_Weights.IMAGENET1K_V1") == (
        cached,
        {"_target_": "torchvision.models.resnet18"},
    )
    assert len(calls) == 1
    with pytest.raises(ConfigError, match="timm"):
        pretrained_file("timm:resnet18")
    with pytest.raises(ConfigError, match="not a torchvision classification model"):
        pretrained_file("resnet19")


def test_a_deployment_never_lets_a_trigger_grant_trust():
    from flows.deployed import sensitive

    assert sensitive("pipeline.stages.model.trust")
    assert sensitive("pipeline.stages.model.path")


def test_the_readmes_commands_for_your_own_model_compose_and_validate():
    """Every command of the README's section composes into a valid pipeline whose reference is
    the import (the user's own package stands in as a test net)."""
    import shlex

    from bonsai.config import validate_config
    from flows.compose import compose_config
    from tests.helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Compress your own model", 1)[1].split("\n## ", 1)[0]
    commands = [
        line
        for line in section.replace("\\\n", " ").splitlines()
        if line.startswith("python -m flows.compress")
    ]
    assert len(commands) >= 8
    for command in commands:
        args = shlex.split(command.replace("my_pkg.nets.Net", "tests.nets.ResidualDepthwiseSE"))
        cfg, plan = validate_config(compose_config(args[3:]))
        assert plan.reference == "model" and plan["model"].kind == "import", command


def test_a_trusted_pt2_outside_the_subset_is_stored_converted_into_a_checked_one(
    own, data, tmp_path
):
    files, accuracy = own

    def annotate(program):  # metadata torch ignores, outside what the check admits
        program["graph_module"]["graph"]["nodes"][0]["metadata"]["note"] = "mine"

    odd = rewrite_program(files["torch_export"], tmp_path / "odd.pt2", edit=annotate)
    with pytest.raises(ConfigError, match=r"node metadata \['note'\].*trust: true"):
        check({"path": str(odd)}, data)
    check({"path": str(odd), "trust": True}, data)
    built = run_stage(
        tmp_path, "model", "import", {"path": str(odd), "trust": True}, data, eval_cfg=FAST_EVAL
    )
    assert built.artifact.kind == "torch_program"
    assert built.artifact.file.read_bytes() != odd.read_bytes()  # converted, not copied
    check_program(built.artifact.file.read_bytes(), "stored")
    assert built.metrics["accuracy"] == accuracy


def test_a_multi_task_onnx_import_gets_one_output_per_head(tmp_path):
    import onnx

    from bonsai.models import SmallCNN
    from tests.own_model import save_onnx

    heads = [{"name": "digit", "labels": "classes"}, {"name": "parity", "labels": "even_odd"}]
    data = load_data({"name": "digits", "max_train": 200, "max_test": 100, "heads": heads})
    torch.manual_seed(0)
    path = save_onnx(SmallCNN(1, data.num_outputs, width=8), tmp_path / "both.onnx")  # 10 + 2
    check({"path": str(path)}, data)
    built = run_stage(tmp_path, "model", "import", {"path": str(path)}, data, eval_cfg=FAST_EVAL)
    graph = onnx.load(str(built.artifact.file)).graph
    assert [o.name for o in graph.output] == ["digit", "parity"]
    assert {"accuracy_digit", "accuracy_parity"} <= set(built.metrics)
