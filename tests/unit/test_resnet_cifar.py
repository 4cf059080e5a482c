"""The resnet_cifar family: He et al. 2016, section 4.2 (depth 6n+2, widths 16/32/64 x width)."""

import pytest
import torch
from torch import nn

from bonsai.errors import ConfigError
from bonsai.models import RESNET_CIFAR_DEPTHS, build_model, check_model_spec, count_params


def _resnet(depth, width=1.0, channels=3, classes=10):
    return build_model({"name": "resnet_cifar", "depth": depth, "width": width}, channels, classes)


@pytest.mark.parametrize(
    "depth, params",
    [
        # ResNet-20: the hand-written baseline's teacher (measured on the 2-core reference machine); ResNet-8: its student.
        (20, 272_474),
        (8, 78_042),
        (14, 175_258),
        (32, 466_906),
        (56, 855_770),
    ],
)
def test_parameter_counts_of_the_cifar_resnets(depth, params):
    assert count_params(_resnet(depth)) == params


@pytest.mark.parametrize("depth", RESNET_CIFAR_DEPTHS)
def test_depth_is_6n_plus_2_weighted_layers_in_three_stages(depth):
    model = _resnet(depth)
    n = (depth - 2) // 6
    # Layers on the main path: the stem conv, 2 convs per block, the linear head (1x1 shortcut
    # projections are not counted, as in the paper).
    convs3 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs3) + len(linears) == depth
    assert [len(stage) for stage in model.stages] == [n, n, n]
    # Feature maps 32 -> 32 -> 16 -> 8 with 16, 32, 64 channels.
    shapes = []
    x = model.stem(torch.zeros(1, 3, 32, 32))
    for stage in model.stages:
        x = stage(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_width_multiplies_the_stage_widths():
    half, double = _resnet(20, 0.5), _resnet(20, 2.0)
    assert [s[0].conv1.out_channels for s in half.stages] == [8, 16, 32]
    assert [s[0].conv1.out_channels for s in double.stages] == [32, 64, 128]
    # Conv weights grow with width squared: half width has ~1/4 of the parameters.
    assert 0.2 < count_params(half) / count_params(_resnet(20)) < 0.3


def test_adapts_to_channels_and_classes():
    model = _resnet(8, channels=1, classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("depth", [21, 0, 9, 200, "20", True])
def test_other_depths_are_refused_with_the_valid_list(depth):
    spec = {"name": "resnet_cifar", "depth": depth}
    # At config validation (no model built) and at build time alike.
    with pytest.raises(ConfigError, match=r"depth must be 6n\+2, one of \[8, 14, 20, 32, 44"):
        check_model_spec(spec)
    with pytest.raises(ConfigError, match=repr(depth).replace("'", ".")):
        build_model(spec, 3, 10)


@pytest.mark.parametrize("width", [0, -1, 100, "wide"])
def test_bad_widths_are_refused(width):
    with pytest.raises(ConfigError, match="width must be a number in"):
        check_model_spec({"name": "resnet_cifar", "width": width})


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"valid options: \['depth', 'width'\]"):
        check_model_spec({"name": "resnet_cifar", "blocks": 3})
