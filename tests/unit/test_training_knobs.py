"""The training loop's knobs do what they claim: exact pad+crop+flip augmentation, channels_last
training that still exports with parity, the lr schedules' shapes, and KD targets replayed from
cached views that are exactly the teacher's outputs on what the student sees."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bonsai.training as training
from bonsai.artifacts import load_torch
from bonsai.data import load_data
from bonsai.models import build_model
from bonsai.onnx_utils import export_onnx, run_logits, session
from bonsai.stages import StageContext
from bonsai.stages.common import FinetuneConfig
from bonsai.training import (
    apply_augment,
    black_fill,
    distillation_loss,
    draw_augment,
    fit,
    make_schedule,
    predict_logits,
)
from tests.helpers import run_stage

RESNET = {"name": "resnet_cifar", "depth": 8, "width": 0.5}


@pytest.fixture(scope="module")
def rgb():
    """4 classes of 3x16x16 gratings: 256 train, 128 test."""
    return load_data(
        {
            "name": "synthetic",
            "num_classes": 4,
            "num_train": 256,
            "num_test": 128,
            "channels": 3,
            "image_size": 16,
        }
    )


def _ce(logits, y, _idx, _x):
    return F.cross_entropy(logits, y)


# ---------------------------------------------------------------------------------------------
# Augmentation


def test_augment_is_torchvision_pad4_crop_flip_on_the_raw_images():
    """On normalized tensors, but equal to the standard recipe on raw uint8 images: pad 4 black
    pixels, crop 32x32 at (dy, dx), flip, then normalize."""
    from torchvision.transforms.v2 import functional as TF

    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen)
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
    norm = (raw / 255.0 - mean[:, None, None]) / std[:, None, None]
    params = training.draw_augment(64, 32, "shift_flip", gen)
    fill = -mean / std  # what black_fill(data) returns for this data
    got = apply_augment(norm, params, fill)
    for i, (dy, dx, flip) in enumerate(params.tolist()):
        img = TF.crop(TF.pad(raw[i], [4], fill=0), dy, dx, 32, 32)
        img = TF.horizontal_flip(img) if flip else img
        want = (img / 255.0 - mean[:, None, None]) / std[:, None, None]
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)
    assert params[:, 2].sum() > 0 and (params[:, :2] != 4).any()  # flips and shifts happened


def test_black_fill_is_the_normalized_zero_pixel(rgb):
    fill = black_fill(rgb)
    mean, std = torch.tensor(rgb.mean), torch.tensor(rgb.std)
    torch.testing.assert_close(fill * std + mean, torch.zeros(3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("h, pad", [(32, 4), (8, 1)])
def test_crop_offsets_are_uniform_over_0_to_2pad_and_half_flip(h, pad):
    p = draw_augment(18_000, h, "shift_flip", torch.Generator().manual_seed(1))
    for col in (0, 1):
        counts = torch.bincount(p[:, col].long(), minlength=2 * pad + 1)
        assert len(counts) == 2 * pad + 1  # torchvision's RandomCrop: top-left in [0, 2*pad]
        assert counts.min() > 0.8 * 18_000 / (2 * pad + 1)
    assert abs(p[:, 2].float().mean() - 0.5) < 0.02
    shift = draw_augment(1000, h, "shift", torch.Generator().manual_seed(1))
    assert shift[:, 2].sum() == 0  # `shift` never flips (digits)
    none = draw_augment(10, h, "none", torch.Generator())
    assert (none[:, :2] == pad).all() and (none[:, 2] == 0).all()  # the identity crop


def test_identity_params_return_the_batch_unchanged(rgb):
    x = rgb.train_x[:8]
    out = apply_augment(x, draw_augment(8, 16, "none", torch.Generator()), black_fill(rgb))
    assert torch.equal(out, x)


# ---------------------------------------------------------------------------------------------
# channels_last


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_trains_in_nhwc_and_returns_an_nchw_model(rgb, channels_last):
    torch.manual_seed(0)
    model = build_model(RESNET, 3, 4)
    seen = {"inputs": set(), "weights": set()}

    def record(_module, args):
        seen["weights"].add(
            model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
            and not model.stem[0].weight.is_contiguous()
        )
        seen["inputs"].add(args[0].is_contiguous(memory_format=torch.channels_last))

    handle = model.register_forward_pre_hook(record)
    fit(
        model,
        rgb,
        loss_fn=_ce,
        epochs=1,
        lr=0.01,
        batch_size=64,
        augment="shift_flip",
        channels_last=channels_last,
        gen=torch.Generator().manual_seed(0),
        progress=False,
    )
    handle.remove()
    assert seen == {"inputs": {channels_last}, "weights": {channels_last}}
    assert all(p.is_contiguous() for p in model.parameters())  # saved and exported as NCHW


def test_channels_last_model_exports_to_onnx_with_parity(rgb, tmp_path):
    art = run_stage(
        "train",
        {"model": RESNET, "epochs": 2, "lr": 0.05, "optimizer": "sgd", "channels_last": True},
        rgb,
        tmp_path / "t",
    )
    onnx_art = run_stage("export.onnx", {}, rgb, tmp_path / "onnx", input=art)
    assert onnx_art.meta["parity_max_abs_diff"] < 1e-4
    # A model still in NHWC memory (e.g. exported mid-training) exports the same function.
    model = load_torch(art).to(memory_format=torch.channels_last)
    path = export_onnx(model, (3, 16, 16), tmp_path / "nhwc.onnx")
    ref = predict_logits(load_torch(art), rgb.test_x).numpy()
    np.testing.assert_allclose(run_logits(session(path), rgb.test_x), ref, atol=1e-4)


def test_every_knob_on_is_still_reproducible_with_a_seed(rgb, teacher_art, tmp_path):
    knobs = {
        "model": RESNET,
        "epochs": 2,
        "lr": 0.05,
        "optimizer": "sgd",
        "augment": "shift_flip",
        "amp": True,
        "channels_last": True,
        "schedule": "onecycle",
        "warmup_epochs": 0.5,
    }
    a = run_stage("train", knobs, rgb, tmp_path / "a", seed=5)
    b = run_stage("train", knobs, rgb, tmp_path / "b", seed=5)
    assert a.file.read_bytes() == b.file.read_bytes()
    kd = {**knobs, "teacher_views": 2}
    c = run_stage("distill", kd, rgb, tmp_path / "c", teacher=teacher_art, seed=5)
    d = run_stage("distill", kd, rgb, tmp_path / "d", teacher=teacher_art, seed=5)
    assert c.file.read_bytes() == d.file.read_bytes()


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules


def _lrs(schedule, total, warmup, lr=0.15):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    sched = make_schedule(opt, schedule, total, warmup)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out), opt


def test_onecycle_warms_up_to_the_peak_then_anneals():
    lrs, opt = _lrs("onecycle", 100, 20)
    assert lrs[0] == pytest.approx(0.15 / 25)  # starts at lr / div_factor
    assert int(lrs.argmax()) == 19 and lrs.max() == pytest.approx(0.15, rel=1e-3)
    assert (np.diff(lrs[:20]) > 0).all() and (np.diff(lrs[20:]) < 0).all()
    assert lrs[-1] < 0.15 / 25 / 100  # annealed far below the start
    assert lrs[10] > 0.5 * 0.15  # cosine warm-up: half-way up at the middle of it
    assert opt.param_groups[0]["momentum"] == 0.9  # momentum not cycled


def test_cosine_with_linear_warmup_and_without():
    lrs, _ = _lrs("cosine", 100, 10)
    assert lrs[0] == pytest.approx(0.15 / 25)
    np.testing.assert_allclose(np.diff(lrs[:11]), np.diff(lrs[:11]).mean(), rtol=1e-6)  # linear
    assert lrs[10] == pytest.approx(0.15)
    assert (np.diff(lrs[10:]) < 0).all()
    plain, _ = _lrs("cosine", 100, 0)
    assert plain[0] == 0.15 and plain[50] == pytest.approx(0.075, rel=1e-3)  # the old schedule


def test_warmup_is_capped_at_half_the_run():
    lrs, _ = _lrs("onecycle", 10, 1000)
    assert int(lrs.argmax()) == 4


@pytest.mark.parametrize("total", range(1, 13))
def test_short_runs_get_a_schedule_that_steps(total):
    """debug=fast caps epochs to 1: a run of a few steps with a warm-up of a whole epoch made
    OneCycleLR divide by a phase of zero steps (ZeroDivisionError in the first stage)."""
    for warmup in range(0, total + 2):
        lrs, _ = _lrs("onecycle", total, warmup)
        assert np.isfinite(lrs).all() and (lrs > 0).all()
        if total >= 4:  # a real cycle: it reaches the peak inside the run
            assert lrs.max() == pytest.approx(0.15, rel=1e-3), (total, warmup)


def test_fit_steps_the_configured_schedule(rgb, monkeypatch):
    """The lr each training step uses follows the onecycle shape through `fit`."""
    opts = []
    real = training.make_schedule

    def spy(opt, *a, **kw):
        opts.append(opt)
        return real(opt, *a, **kw)

    monkeypatch.setattr(training, "make_schedule", spy)
    used = []

    def loss(logits, y, idx, x):
        used.append(opts[0].param_groups[0]["lr"])
        return F.cross_entropy(logits, y)

    fit(
        build_model(RESNET, 3, 4),
        rgb,
        loss_fn=loss,
        epochs=4,
        lr=0.1,
        batch_size=32,  # 8 steps per epoch, 32 in all
        optimizer="sgd",
        schedule="onecycle",
        warmup_epochs=1.0,
        gen=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert len(used) == 32 and int(np.argmax(used)) == 7  # the peak ends the first epoch
    assert used[0] == pytest.approx(0.1 / 25) and used[-1] < 0.1 / 25


# ---------------------------------------------------------------------------------------------
# Knowledge distillation with replayed teacher views


@pytest.fixture(scope="module")
def teacher_art(rgb, tmp_path_factory):
    return run_stage(
        "train",
        {"model": RESNET, "epochs": 3, "lr": 0.05, "optimizer": "sgd", "augment": "shift_flip"},
        rgb,
        tmp_path_factory.mktemp("teacher") / "t",
    )


def _count_forwards(model):
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_replay_reproduces_the_teacher_targets_it_cached(rgb, teacher_art):
    teacher = load_torch(teacher_art)
    reference = load_torch(teacher_art)  # a second copy: checks without touching the counted one
    gen = torch.Generator().manual_seed(0)
    loss = distillation_loss(teacher, rgb, "shift_flip", 4.0, 0.9, teacher_views=3, gen=gen)
    assert loss.cached.shape == (3, 256, 4) and loss.views.shape == (3, 256, 3)
    calls = _count_forwards(teacher)
    worst, inputs, step = [0.0], {}, [0]

    def checked(logits, y, idx, x):
        replayed = loss.targets(idx, x)
        worst[0] = max(worst[0], float((predict_logits(reference, x) - replayed).abs().max()))
        epoch = step[0] // 4  # 256 images in batches of 64
        step[0] += 1
        inputs.setdefault(epoch, {}).update(zip(idx.tolist(), x.clone(), strict=True))
        return loss(logits, y, idx, x)

    checked.set_epoch = loss.set_epoch  # fit announces each epoch (view) to the loss

    fit(
        build_model(RESNET, 3, 4),
        rgb,
        loss_fn=checked,
        epochs=4,
        lr=0.01,
        batch_size=64,
        augment="shift_flip",
        views=loss.views,
        gen=gen,
        progress=False,
    )
    # The student saw exactly the views whose teacher outputs were cached...
    assert worst[0] < 1e-4, worst[0]
    # ...and the teacher never ran while it trained.
    assert calls[0] == 0
    # Epoch e replays view e mod 3: epoch 0 saw view 0, so did epoch 3; epoch 1 saw another.
    fill = black_fill(rgb)
    view0 = apply_augment(rgb.train_x, loss.views[0], fill)
    assert all(torch.equal(inputs[0][i], view0[i]) for i in range(256))
    assert all(torch.equal(inputs[3][i], view0[i]) for i in range(256))
    assert not all(torch.equal(inputs[1][i], view0[i]) for i in range(256))


def test_online_teacher_runs_on_every_batch(rgb, teacher_art):
    teacher = load_torch(teacher_art)
    loss = distillation_loss(teacher, rgb, "shift_flip", 4.0, 0.9)
    assert loss.cached is None and loss.views is None
    calls = _count_forwards(teacher)
    fit(
        build_model(RESNET, 3, 4),
        rgb,
        loss_fn=loss,
        epochs=2,
        lr=0.01,
        batch_size=64,
        augment="shift_flip",
        gen=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert calls[0] == 2 * 4  # 2 epochs x 4 batches


def test_replayed_kd_moves_the_student_toward_the_teacher(rgb, tmp_path):
    """A teacher that is confidently wrong in a known way (labels shifted by one): a student
    distilled from its replayed outputs alone (alpha=1) follows it."""
    shifted = dataclasses.replace(rgb, train_y=(rgb.train_y + 1) % 4, test_y=(rgb.test_y + 1) % 4)
    knobs = {"model": RESNET, "epochs": 6, "lr": 0.01, "augment": "shift"}
    liar = run_stage("train", knobs, shifted, tmp_path / "liar")
    liar_preds = predict_logits(load_torch(liar), rgb.test_x).argmax(1)
    student = run_stage(
        "distill",
        {**knobs, "alpha": 1.0, "temperature": 2.0, "teacher_views": 2},
        rgb,
        tmp_path / "kd",
        teacher=liar,
    )
    preds = predict_logits(load_torch(student), rgb.test_x).argmax(1)
    assert float((preds == liar_preds).float().mean()) > 0.8
    assert float((preds == rgb.test_y).float().mean()) < 0.3


def test_finetune_with_a_teacher_replays_views_too(rgb, teacher_art, tmp_path, monkeypatch):
    import bonsai.stages.common as common_mod

    teacher_calls = []
    real = common_mod.distillation_loss

    def spy(teacher, *a, **kw):
        loss = real(teacher, *a, **kw)  # views computed here, before training
        teacher_calls.append(_count_forwards(teacher))
        return loss

    monkeypatch.setattr(common_mod, "distillation_loss", spy)
    config = FinetuneConfig(epochs=2, lr=0.01, augment="shift_flip", teacher_views=1)
    ctx = StageContext(name="ft", data=rgb, out_dir=tmp_path, teacher=teacher_art, progress=False)
    history = config.finetune(load_torch(teacher_art), ctx, torch.Generator().manual_seed(0))
    assert len(history) == 2
    assert teacher_calls[0][0] == 0  # replayed: no teacher forward while fine-tuning
