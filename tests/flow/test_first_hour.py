"""A new user's first hour, through the command line: their own models and images, their typos,
their first sweep. Each test is a trap a user fell into."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bonsai.config import validate_config
from flows.compress import compose_config
from tests.helpers import ROOT, run_module, store_runs


def cli(*args, timeout=600, fresh=False):
    """`python -m flows.compress ARGS`: from the fork server (tests/forkserver.py), or, with
    `fresh`, a new interpreter exactly as a user starts it (the image-folder run below, the one
    whole first run here: a debug=fast run took ~27 s of CPU as a fresh interpreter on the
    2-core EPYC, ~5 s forked)."""
    if not fresh:
        return run_module("flows.compress", list(args), timeout=timeout)
    return subprocess.run(
        [sys.executable, "-m", "flows.compress", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error(proc) -> str:
    """The one error: its `bonsai: error:` line and the indented lines of a config error's list
    of problems under it, joined."""
    lines = proc.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("bonsai: error:")]
    assert len(starts) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    block = [lines[starts[0]]]
    for line in lines[starts[0] + 1 :]:
        if not line.startswith("  "):
            break
        block.append(line.strip())
    return " ".join(block)


def letters(root, size=28, per_class=12, stray=True):
    """A 28x28 grayscale image folder of three 'letters' (a bar, a cross, a box) plus noise."""
    rng = np.random.default_rng(0)
    shapes = {
        "bar": lambda a: a.__setitem__((slice(4, 24), slice(12, 16)), 255),
        "cross": lambda a: (a.__setitem__((slice(12, 16), slice(4, 24)), 255), a.__setitem__((slice(4, 24), slice(12, 16)), 255)),
        "box": lambda a: (a.__setitem__((slice(6, 22), slice(6, 22)), 255), a.__setitem__((slice(9, 19), slice(9, 19)), 0)),
    }  # fmt: skip
    for name, draw in shapes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 60, (size, size), dtype=np.uint8)
            draw(a)
            Image.fromarray(a, mode="L").save(root / name / f"{i}.png")
    if stray:
        (root / "box" / "notes.txt").write_text("not an image")
    return root


def test_a_custom_student_has_a_documented_way_in():
    raw = compose_config(
        ["student=custom", "student._target_=bonsai.models.SmallCNN", "+student.width=8"]
    )
    _, plan = validate_config(raw)
    assert plan["student"].config.model == {"_target_": "bonsai.models.SmallCNN", "width": 8}
    readme = (ROOT / "README.md").read_text()
    assert "student=custom student._target_=" in readme
    assert "teacher=custom teacher._target_=" in readme


@pytest.mark.parametrize(
    "args, needles",
    [
        (["student._target_=my_pkg.Net"], ["student=custom student._target_="]),
        (["teacher=resnet19"], ["unknown config option 'teacher/resnet19'", "resnet18"]),
        (["pipeline.stages.teacher.epochz=3"], ["epochz is not a key", "+pipeline.stages"]),
        (["data=imagefolder"], ["data.root must be set"]),
        (["-m", "teacher=cnn_large,resnet19"], ["unknown config option 'teacher/resnet19'"]),
    ],
    ids=["target-without-custom", "unknown-option", "typo", "missing-root", "bad-sweep-value"],
)
def test_hydra_errors_are_one_bonsai_message_and_exit_2(args, needles, tmp_path):
    proc = cli(*args, f"tracking.store_dir={tmp_path / 'mlruns'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_error(proc)
    for needle in needles:
        assert needle in line, (needle, line)
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_a_sweep_runs_every_job_and_reports_the_failed_ones(tmp_path):
    store = tmp_path / "mlruns"
    proc = cli(
        "-m",
        "data=synthetic",
        "debug=fast",
        "teacher=cnn_large",
        "pipeline.stages.onnx.parity_tol=1e-12,1e-4",  # the first job fails its parity gate
        f"tracking.store_dir={store}",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 of 2 sweep job(s) failed" in proc.stderr
    assert "parity_tol=1e-12" in proc.stderr.split("sweep job(s) failed")[1]
    parents = [r for r in store_runs(store) if r.data.tags.get("bonsai.role") == "pipeline"]
    assert sorted(r.info.status for r in parents) == ["FAILED", "FINISHED"]


def test_a_target_that_does_not_import_is_refused_before_images_are_decoded(tmp_path):
    root = letters(tmp_path / "letters", stray=False)
    store = tmp_path / "mlruns"
    proc = cli(
        "data=imagefolder",
        f"data.root={root}",
        "teacher=custom",
        "teacher._target_=no_such_pkg.nets.BigNet",
        f"tracking.store_dir={store}",
    )
    assert proc.returncode == 2
    assert "'no_such_pkg.nets.BigNet' cannot be imported" in one_error(proc)
    assert not store.exists()  # the decode cache (store/cache) was never written


def test_a_three_channel_model_on_one_channel_images_names_the_channels(tmp_path):
    proc = cli(
        "teacher=custom",
        "teacher._target_=torchvision.models.resnet18",
        "+teacher.num_classes=10",
        f"tracking.store_dir={tmp_path / 'mlruns'}",
    )
    assert proc.returncode == 2
    line = one_error(proc)
    assert "first convolution takes 3 input channel(s) but the data has 1" in line
    assert "data.image_size" not in line


@pytest.mark.slow
def test_a_new_image_folder_runs_says_what_it_skipped_and_serves_raw_images(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from bonsai.data import load_data

    root = letters(tmp_path / "letters")
    store = tmp_path / "mlruns"
    proc = cli(
        "data=imagefolder",
        f"data.root={root}",
        "data.image_size=28",
        "data.channels=3",  # grayscale files, an RGB model: widened, and said so
        "debug=fast",
        "teacher=cnn_large",
        f"tracking.store_dir={store}",
        fresh=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("skipped 1 file(s) that are not images") == 1, proc.stderr[-2000:]
    assert "'box/notes.txt'" in proc.stderr
    assert proc.stderr.count("converted 36 grayscale image(s) to 3 channel(s)") == 1

    data = load_data({"name": "imagefolder", "root": str(root), "image_size": 28, "channels": 3})
    assert data.raw_test.dtype == np.uint8 and data.raw_test.shape[1:] == (28, 28, 3)
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    for run in store_runs(store):
        if run.data.tags.get("bonsai.stage") in ("teacher", "int8"):
            model = mlflow.pyfunc.load_model(run.data.tags["bonsai.model_uri"])
            out = model.predict(data.raw_test)  # uint8 pixels, as the files hold them
            acc = 100 * float((out["class_index"].to_numpy() == data.test_y.numpy()).mean())
            assert acc == run.data.metrics["accuracy"]
            assert set(out["class_name"]) <= {"bar", "box", "cross"}
    assert client.search_experiments()
