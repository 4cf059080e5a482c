"""distill with FitNets feature hints: the student's features learn to predict the teacher's."""

import pytest
import torch
from torch import nn

from bonsai.artifacts import load_torch
from bonsai.errors import ConfigError
from bonsai.models import build_model
from bonsai.stages.distill import FeatureHint, _match, check_hints
from tests.helpers import run_stage

TEACHER = {"name": "cnn", "width": 32, "depth": 2}
STUDENT = {"name": "cnn", "width": 8, "depth": 2}


@pytest.fixture(scope="module")
def teacher(synthetic, tmp_path_factory):
    return run_stage(
        "train",
        {"model": TEACHER, "epochs": 5, "lr": 0.01},
        synthetic,
        tmp_path_factory.mktemp("t"),
    )


def _features(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    out = {}
    h = model.get_submodule(layer).register_forward_hook(lambda _m, _i, o: out.setdefault("f", o))
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    return out["f"]


def _linear_fit_error(s: torch.Tensor, t: torch.Tensor) -> float:
    """Relative error of the best per-pixel linear map (a 1x1 conv fitted by least squares)
    from student channels [N, Cs, H, W] to teacher channels [N, Ct, H, W]."""
    a = s.permute(0, 2, 3, 1).reshape(-1, s.shape[1])
    a = torch.cat([a, torch.ones(len(a), 1)], 1)  # bias
    b = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    sol = torch.linalg.lstsq(a.double(), b.double()).solution
    return float(((a.double() @ sol - b.double()) ** 2).sum() / ((b - b.mean(0)) ** 2).sum())


def test_hints_make_student_features_predict_the_teachers(synthetic, teacher, tmp_path):
    # Student features.6 (16 ch, 4x4) imitates teacher features.6 (64 ch, 4x4) through a 1x1
    # adapter. Measured over 3 seeds: relative error of the best linear map from the student's
    # to the teacher's features 0.193-0.199 without hints, 0.141-0.151 with them.
    base = {"model": {"name": "cnn", "width": 16, "depth": 2}, "epochs": 10, "lr": 0.01}
    hint = [{"student": "features.6", "teacher": "features.6", "weight": 5.0}]
    plain = run_stage("distill", base, synthetic, tmp_path / "plain", teacher=teacher)
    hinted = run_stage(
        "distill", {**base, "features": hint}, synthetic, tmp_path / "hint", teacher=teacher
    )
    x = synthetic.test_x
    t = _features(load_torch(teacher), "features.6", x)
    err_plain = _linear_fit_error(_features(load_torch(plain), "features.6", x), t)
    err_hint = _linear_fit_error(_features(load_torch(hinted), "features.6", x), t)
    assert err_hint < 0.85 * err_plain, (err_plain, err_hint)
    # The adapters were for training only: the artifact is the plain student.
    assert set(load_torch(hinted).state_dict()) == set(load_torch(plain).state_dict())


def test_hints_between_maps_of_different_sizes_and_between_vectors(synthetic, teacher, tmp_path):
    hints = [
        # student 8x8 map -> teacher 4x4 map (average-pooled down)
        {"student": "features.2", "teacher": "features.6", "weight": 1.0},
        # teacher 8x8 map -> student 4x4 map (bilinear up)
        {"student": "features.6", "teacher": "features.2", "weight": 1.0},
        # pooled vectors [B, C]
        {"student": "dropout", "teacher": "dropout", "weight": 1.0},
    ]
    art = run_stage(
        "distill",
        {"model": STUDENT, "epochs": 1, "features": hints},
        synthetic,
        tmp_path / "d",
        teacher=teacher,
    )
    assert art.meta["model"]["spec"] == STUDENT
    assert _match(torch.zeros(2, 5, 8, 8), torch.zeros(2, 5, 4, 4)).shape == (2, 5, 4, 4)
    assert _match(torch.zeros(2, 5, 2, 2), torch.zeros(2, 5, 4, 4)).shape == (2, 5, 4, 4)


def test_unknown_or_incompatible_hint_layers_are_refused_with_the_valid_names():
    s = build_model(STUDENT, 1, 4)
    t = build_model(TEACHER, 1, 4)
    with pytest.raises(ConfigError) as e:
        check_hints([FeatureHint(student="features.22", teacher="features.2")], s, t, (1, 8, 8))
    msg = str(e.value)
    assert "features.0.student: no layer named 'features.22'" in msg
    assert "valid names: features, features.0, features.1" in msg
    with pytest.raises(ConfigError, match="pair maps with maps"):
        check_hints([FeatureHint(student="features.2", teacher="dropout")], s, t, (1, 8, 8))
