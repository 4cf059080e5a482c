"""What a new user hit on their own data (issue 24), through the command line, on a generated
image folder: a residual/depthwise/SE teacher, two heads, ONNX, int8 and LiteRT variants.

One `debug=fast` pipeline run (the module fixture) serves most checks: the promotion that finds
no variant, the per-head columns of the logged models, the LiteRT output names, the metadata in
the bare model files and the start-up lines; `flows.promote` then registers over its runs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, run_cli, run_module, store_runs

HEADS = "[{name:shape,labels:classes},{name:form,labels:{open:[bar,cross],closed:[box]}}]"
FORM = {"bar": "open", "cross": "open", "box": "closed"}  # the `form` head's labels, as declared
FOLDER = "shapes"  # the data set's name: registered models are named after it


def shapes(root: Path, train: int = 24, test: int = 8, size: int = 36) -> Path:
    """root/{train,test}/{bar,box,cross}/*.png: colored shapes on colored noise, RGB files of
    36x36, so that a 28x28 grayscale model needs both the conversion and the resize."""
    rng = np.random.default_rng(24)
    s = size
    draw = {
        "bar": lambda a, c: a.__setitem__((slice(s // 6, s - s // 6), slice(s // 2 - 3, s // 2 + 3)), c),
        "cross": lambda a, c: (a.__setitem__((slice(s // 2 - 3, s // 2 + 3), slice(s // 6, s - s // 6)), c), a.__setitem__((slice(s // 6, s - s // 6), slice(s // 2 - 3, s // 2 + 3)), c)),
        "box": lambda a, c: (a.__setitem__((slice(s // 5, s - s // 5), slice(s // 5, s - s // 5)), c), a.__setitem__((slice(s // 3, s - s // 3), slice(s // 3, s - s // 3)), 0)),
    }  # fmt: skip
    for split, n in (("train", train), ("test", test)):
        for name, shape in draw.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 70, (s, s, 3), dtype=np.uint8)
                shape(a, rng.integers(150, 256, 3, dtype=np.uint8))
                Image.fromarray(a, mode="RGB").save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The pipeline on the folder, with a promotion no variant can pass (1 KB budget)."""
    tmp = tmp_path_factory.mktemp("own")
    root, store = shapes(tmp / FOLDER), tmp / "mlruns"
    proc = run_cli(
        store,
        [
            "data=imagefolder", f"data.root={root}", "data.image_size=28", "data.channels=1",
            f"data.heads={HEADS}", "debug=fast",
            # The network exported directly (no student: a stage less to wait for), trained
            # past chance on 72 images so that the accuracies below mean something.
            "teacher=custom", "teacher._target_=tests.nets.ResidualDepthwiseSE", "+teacher.width=8",
            "runtime.max_epochs=10", "pipeline.stages.teacher.batch_size=16",
            "pipeline.stages.teacher.lr=0.01",
            "~pipeline.stages.student", "pipeline.stages.onnx.input=teacher",
            "+pipeline.stages.litert={kind:export.litert,input:teacher}",
            "pipeline.stages.int8.tolerance=100",  # 6 validation images: one is 17 points
            "promote=edge_small", "promote.constraints.max_bytes=1000",
        ],
        temporary_server=True,  # a user's first run: test 7 reads what its start-up says
    )  # fmt: skip
    stages = {
        r.data.tags["bonsai.stage"]: r
        for r in store_runs(store)
        if r.data.tags.get("bonsai.role") == "stage"
    }
    return proc, root, store, stages


def errors(proc) -> list[str]:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("bonsai: error:")]


def promote_cli(store: Path, *args: str):
    return run_module(
        "flows.promote",
        [*args, f"tracking.store_dir={store}"],
        timeout=300,
    )


def mlflow_client(store: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    return MlflowClient(f"sqlite:///{store}/mlflow.db")


def model_file(run, name: str, dst: Path) -> Path:
    """Copy the deployable file of a stage's logged model, alone, into an empty folder."""
    from tasks.registry import model_file as logged

    src = logged(run.data.tags["bonsai.model_uri"], dst / "download")
    (dst / "alone").mkdir()
    return Path(shutil.copy(src, dst / "alone" / name))


# ---------------------------------------------------------------------------------------------
# 1. Nothing passes the policy: one line, exit 1, nothing registered


@pytest.mark.slow
def test_a_policy_nothing_passes_is_one_line_and_exit_1_and_registers_nothing(run):
    proc, _, store, stages = run
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = errors(proc)
    assert "no variant satisfies policy 'edge_small'" in line and "promote.constraints" in line
    assert "> max_bytes 1,000" in proc.stdout  # each candidate's failed constraint, printed
    assert set(stages) == {"teacher", "onnx", "int8", "litert"}
    assert all(r.info.status == "FINISHED" for r in stages.values())  # the variants are kept
    assert mlflow_client(store).search_registered_models() == []


# ---------------------------------------------------------------------------------------------
# 7. Start-up says what it waits for; MLflow's type-hint warning is gone


@pytest.mark.slow
def test_start_up_says_what_it_waits_for_and_mlflow_does_not_warn_about_type_hints(run):
    proc = run[0]
    # 72 training images: 2 of each class's 24 held out as the validation split (val_size 0.1)
    checked = (
        r"checked the configuration, store, data \(66 train, 6 validation and 24 test images\) "
        r"and models"
    )
    assert re.search(rf"bonsai: {checked} in \d+\.\d s", proc.stderr), proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    start = next(i for i, x in enumerate(lines) if "starting a temporary Prefect server" in x)
    answered = next(i for i, x in enumerate(lines) if "Prefect server answered after" in x)
    assert start < answered and re.search(r"answered after \d+\.\d s", lines[answered])
    assert re.search(r"MLflow store ready in \d+\.\d s", proc.stdout + proc.stderr)
    assert "Add type hints" not in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# 2. A logged multi-task model answers every head


def _data(root: Path):
    from bonsai.data import load_data

    return load_data(
        {"name": "imagefolder", "root": str(root), "image_size": 28, "channels": 1,
         "heads": [{"name": "shape", "labels": "classes"},
                   {"name": "form", "labels": {"open": ["bar", "cross"], "closed": ["box"]}}]}
    )  # fmt: skip


def _raw_test(root: Path) -> np.ndarray:
    """The test images as Bonsai decodes them: every file of test/, classes and files sorted."""
    return _data(root).raw_test


@pytest.mark.slow
def test_logged_models_answer_every_head_as_evaluated(run):
    import mlflow

    _, root, store, stages = run
    mlflow_client(store)
    data = _data(root)
    shape_truth = np.asarray(data.classes)[data.test_y.numpy()]
    form_truth = np.asarray([FORM[c] for c in shape_truth])
    for stage in ("teacher", "onnx", "litert"):
        r = stages[stage]
        model = mlflow.pyfunc.load_model(r.data.tags["bonsai.model_uri"])
        out = model.predict(data.raw_test)
        assert list(out.columns) == [
            "class_index", "class_name", "probabilities",
            "shape_index", "shape_name", "shape_probabilities",
            "form_index", "form_name", "form_probabilities",
        ], stage  # fmt: skip
        assert model.metadata.get_output_schema().input_names() == list(out.columns)
        m = r.data.metrics
        acc_shape = 100.0 * float((out["shape_name"].to_numpy() == shape_truth).mean())
        acc_form = 100.0 * float((out["form_name"].to_numpy() == form_truth).mean())
        assert (acc_shape, acc_form) == (m["accuracy_shape"], m["accuracy_form"]), stage
        assert {len(p) for p in out["form_probabilities"]} == {2}
    assert stages["onnx"].data.metrics["accuracy_shape"] > 60  # past chance (1/3)


# ---------------------------------------------------------------------------------------------
# 3 and 5. The bare files: LiteRT outputs named after the heads; the preprocessing inside


def _pixels(files: list[Path], image: dict, resample=None) -> np.ndarray:
    """What the metadata says a model takes, done here with Pillow alone."""
    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert(image["mode"])
            if list(im.size) != image["size"]:
                filt = Image.Resampling[image["resize_filter"].upper()]
                filt = filt if resample is None else resample
                im = im.resize(tuple(image["size"]), filt)
            a = np.asarray(im, dtype=np.uint8)
        out.append(a[:, :, None] if a.ndim == 2 else a)
    return np.stack(out)  # uint8 [N, H, W, C]


def _inputs(pixels: np.ndarray, pre: dict) -> np.ndarray:
    assert (pre["raw"], pre["input"]["layout"]) == ({"layout": "NHWC", "dtype": "uint8"}, "NCHW")
    x = pixels.astype(np.float32) / np.float32(pre["divide_by"])
    x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["onnx", "int8"])
def test_the_onnx_file_alone_reproduces_the_reported_accuracy_from_raw_images(run, stage, tmp_path):
    import onnx
    import onnxruntime as ort

    _, root, store, stages = run
    mlflow_client(store)
    path = model_file(stages[stage], "model.onnx", tmp_path)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    pre = json.loads(meta["bonsai.preprocessing"])
    outputs = json.loads(meta["bonsai.outputs"])
    image = pre["image"]
    assert image == {
        "reader": "Pillow", "mode": "L", "size": [28, 28], "resize_filter": "bilinear",
        "order": "open, convert(mode), resize(size, resize_filter) if the size differs",
    }  # fmt: skip
    assert pre["channel_order"] == "L" and pre["input"]["shape"] == ["batch", 1, 28, 28]
    assert [(o["name"], o["classes"]) for o in outputs] == [
        ("shape", ["bar", "box", "cross"]),
        ("form", ["open", "closed"]),
    ]
    files = sorted((root / "test").glob("*/*.png"))
    assert len(files) == 24 and {Image.open(f).mode for f in files} == {"RGB"}  # 36x36 colour
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["shape", "form"]
    x = _inputs(_pixels(files, image), pre)
    logits = sess.run(None, {pre["input"]["name"]: x})
    truth = {"shape": [f.parent.name for f in files], "form": [FORM[f.parent.name] for f in files]}
    correct = np.stack(
        [
            np.asarray(o["classes"])[z.argmax(1)] == np.asarray(truth[o["name"]])
            for o, z in zip(outputs, logits, strict=True)
        ],
        axis=1,
    )  # [N images, heads]
    m = stages[stage].data.metrics
    # Exactly: the same pixels and float32 arithmetic as the evaluator's, whose accuracy is
    # this same mean of booleans (bonsai.metrics).
    assert 100.0 * float(correct[:, 0].mean()) == m["accuracy_shape"]
    assert 100.0 * float(correct[:, 1].mean()) == m["accuracy_form"]
    assert 100.0 * float(correct.mean()) == m["accuracy"]
    # Image by image, the logged model (Bonsai's own decoding and preprocessing) gives these
    # probabilities: the same inputs, not only the same count of right answers.
    import mlflow

    served = mlflow.pyfunc.load_model(stages[stage].data.tags["bonsai.model_uri"])
    out = served.predict(_raw_test(root))
    for o, z in zip(outputs, logits, strict=True):
        e = np.exp(z - z.max(1, keepdims=True))
        np.testing.assert_allclose(
            e / e.sum(1, keepdims=True), np.stack(out[f"{o['name']}_probabilities"]), atol=1e-6
        )
    # The recorded filter matters here: another one gives other inputs and other logits.
    nearest = _inputs(_pixels(files, image, Image.Resampling.NEAREST), pre)
    assert np.abs(sess.run(None, {"input": nearest})[0] - logits[0]).max() > 1e-3
    assert "(pixel / 255 - mean) / std" in onnx.load(str(path)).doc_string


@pytest.mark.slow
def test_litert_outputs_are_named_after_the_heads_and_carry_the_same_metadata(run, tmp_path):
    import onnx
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter

    _, root, store, stages = run
    mlflow_client(store)
    path = model_file(stages["litert"], "model.tflite", tmp_path)
    it = Interpreter(model_path=str(path))
    assert it.get_signature_list() == {
        "serving_default": {"inputs": ["input"], "outputs": ["form", "shape"]}
    }
    assert sorted(d["name"] for d in it.get_output_details()) == [
        "serving_default_form_output", "serving_default_shape_output",
    ]  # fmt: skip
    raw = path.read_bytes()
    model = schema.Model.GetRootAs(raw, 0)
    entries = {}
    for i in range(model.MetadataLength()):
        e = model.Metadata(i)
        entries[e.Name().decode()] = model.Buffers(e.Buffer()).DataAsNumpy().tobytes().decode()
    onnx_file = model_file(stages["onnx"], "model.onnx", tmp_path / "onnx")
    onnx_meta = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    for key in ("bonsai.metadata_version", "bonsai.preprocessing", "bonsai.outputs"):
        assert entries[key] == onnx_meta[key], key  # the same student: the same recipe
    assert "min_runtime_version" in entries  # the converter's own entry is kept
    # Run through its signature on the inputs the metadata describes: every head by name.
    pre = json.loads(entries["bonsai.preprocessing"])
    files = sorted((root / "test").glob("*/*.png"))
    x = _inputs(_pixels(files, pre["image"]), pre)
    runner = it.get_signature_runner()
    shape_names = np.asarray(json.loads(entries["bonsai.outputs"])[0]["classes"])
    got = [shape_names[runner(input=x[i : i + 1])["shape"].argmax()] for i in range(len(x))]
    acc = 100.0 * float((np.asarray(got) == [f.parent.name for f in files]).mean())
    assert acc == stages["litert"].data.metrics["accuracy_shape"]


# ---------------------------------------------------------------------------------------------
# 4. One registered model per data set, named after the folder


@pytest.mark.slow
def test_the_registered_model_is_named_after_the_folder(run):
    _, _, store, _ = run
    loose = ["promote=edge_small", "promote.constraints.max_accuracy_drop=null"]
    proc = promote_cli(store, *loose)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow_client(store)
    name = f"bonsai-{FOLDER}-edge_small"
    assert [m.name for m in client.search_registered_models()] == [name]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert f"→ {name} version 1" in proc.stdout


@pytest.mark.slow
def test_a_registration_that_fails_leaves_no_empty_registered_model(run):
    from mlflow.exceptions import MlflowException

    from bonsai.promotion import Candidate, PolicyConfig
    from tasks import registry

    client = mlflow_client(run[2])
    before = {m.name for m in client.search_registered_models()}
    policy = PolicyConfig.model_validate({"name": "edge_small", "objective": {"metric": "bytes"}})
    ghost = Candidate("0" * 32, "onnx", "models:/m-00000000000000000000000000000000", "onnx", {})
    with pytest.raises(MlflowException):
        registry.register("bonsai-ghost", ghost, policy, {}, "champion", "test")
    assert {m.name for m in client.search_registered_models()} == before


def test_the_data_sets_name_comes_from_the_folder(tmp_path):
    from bonsai.data import DigitsData, ImageFolderData, data_set_name

    assert data_set_name(ImageFolderData(root=str(tmp_path / "letters"))) == "letters"
    assert data_set_name(ImageFolderData(root=str(tmp_path / "x-rays" / "."))) == "x-rays"
    assert data_set_name(ImageFolderData(root=str(tmp_path / "my photos:2024"))) == "my-photos-2024"
    assert data_set_name(DigitsData()) == "digits"
    readme = (ROOT / "README.md").read_text()
    assert "bonsai-<data set>-<policy>" in readme and "promote.model_name" in readme


# ---------------------------------------------------------------------------------------------
# 6. A model that cannot take the configured images: one line, exit 2, before anything runs


def test_a_target_that_refuses_the_images_channels_is_one_line_and_exit_2(tmp_path):
    root, store = shapes(tmp_path / FOLDER, train=2, test=1), tmp_path / "mlruns"
    proc = run_cli(
        store,
        ["data=imagefolder", f"data.root={root}", "data.image_size=28",  # channels: 3 (default)
         "teacher=custom", "teacher._target_=tests.nets.GrayscaleOnly"],
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = errors(proc)
    assert "pipeline.stages.teacher.model: cannot construct tests.nets.GrayscaleOnly" in line
    assert "ValueError: GrayscaleOnly takes 1-channel images, got in_channels=3" in line
    assert "3 channel(s) and size 28x28" in line and "set data.channels" in line
    assert not store.exists()  # refused before the store, the decode cache or a run
