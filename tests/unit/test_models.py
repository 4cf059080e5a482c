import pytest
import torch

from bonsai.errors import ConfigError
from bonsai.models import SmallCNN, build_model, count_macs, count_params


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "cnn", "width": 8, "depth": 3, "convs_per_stage": 2},
        {"name": "resnet18"},
        {"name": "mobilenet_v3_small"},
        {"name": "efficientnet_b0"},
        {"_target_": "bonsai.models.SmallCNN", "width": 4},
    ],
    ids=lambda s: s.get("name", s.get("_target_")),
)
@pytest.mark.parametrize("channels, size", [(1, 8), (3, 32)])
def test_every_family_adapts_to_channels_and_classes(spec, channels, size):
    model = build_model(spec, in_channels=channels, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)


def test_cnn_knobs_change_size():
    small = build_model({"name": "cnn", "width": 8, "depth": 2}, 1, 10)
    wide = build_model({"name": "cnn", "width": 16, "depth": 2}, 1, 10)
    deep = build_model({"name": "cnn", "width": 8, "depth": 3}, 1, 10)
    assert count_params(small) < count_params(wide)
    assert count_params(small) < count_params(deep)
    assert count_macs(small, (1, 8, 8)) < count_macs(wide, (1, 8, 8))


def test_macs_of_a_single_conv_layer_are_exact():
    # conv 1->8, 3x3, 8x8 output: 8*8*8*9 = 4608 MACs; linear 8->10: 80 MACs.
    m = SmallCNN(1, 10, width=8, depth=1)
    macs = count_macs(m, (1, 8, 8))
    # torch-pruning also counts elementwise ops on the 8x8x8 = 512 activations: BN (2 each),
    # ReLU and the average pool (1 each), at most 4 per activation in all.
    assert 4608 + 80 <= macs <= 4608 + 80 + 4 * 512 + 64


def test_mobilenet_batchnorm_momentum_is_raised():
    m = build_model({"name": "mobilenet_v3_small"}, 1, 10)
    assert {bn.momentum for bn in m.modules() if isinstance(bn, torch.nn.BatchNorm2d)} == {0.1}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "vgg11"}, "unknown model name 'vgg11'"),
        ({"name": "cnn", "widht": 8}, "no option\\(s\\) \\['widht'\\]"),
        ({"width": 8}, "needs `name`"),
        ({"_target_": "no.such.Module"}, "cannot be imported"),
        ({"_target_": "collections.OrderedDict"}, "not an nn.Module"),
        ({"name": "cnn", "depth": 0}, "positive integer"),
    ],
)
def test_bad_specs_are_refused_with_the_fix(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_model(spec, 1, 10)


def test_pretrained_offline_is_a_clear_error(monkeypatch):
    import torchvision.models as tvm

    def offline(**kw):
        raise OSError("network unreachable")

    monkeypatch.setattr(tvm, "resnet18", offline)
    with pytest.raises(ConfigError, match="pretrained=false"):
        build_model({"name": "resnet18", "pretrained": True}, 3, 10)
