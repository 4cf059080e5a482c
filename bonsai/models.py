"""Model construction from a plain spec dict, so that a checkpoint rebuilds without pickle.

A spec names a family and its knobs, e.g. `{"name": "cnn", "width": 32, "depth": 2}`,
`{"name": "resnet18", "small_input": true}` or `{"_target_": "my_pkg.nets.Net", "hidden": 64}`.
`num_classes` and `in_channels` come from the data, never from the spec.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import nn

from bonsai.errors import ConfigError


class SmallCNN(nn.Module):
    """A plain CNN family: `depth` stages of `convs_per_stage` conv3x3-BN-ReLU, channels doubling
    per stage from `width`, 2x max-pool between stages, global average pool, linear head.

    Input [B, C, H, W] (any H, W >= 2**(depth-1)) -> logits [B, num_classes].
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 32,  # channels of the first stage
        depth: int = 2,  # number of stages (each halves H and W, except the last)
        convs_per_stage: int = 1,
        dropout: float = 0.0,  # before the classifier
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for stage in range(depth):
            c_out = width * 2**stage
            for _ in range(convs_per_stage):
                layers += [
                    nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                ]
                c_in = c_out
            if stage < depth - 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)  # [B, C_last]
        return self.classifier(self.dropout(x))


def _cnn(in_channels: int, num_classes: int, **kw) -> nn.Module:
    for k in ("width", "depth", "convs_per_stage"):
        if k in kw and (not isinstance(kw[k], int) or kw[k] < 1):
            raise ConfigError(f"model.{k} must be a positive integer, got {kw[k]!r}")
    return SmallCNN(in_channels, num_classes, **kw)


class BasicBlock(nn.Module):
    """Two conv3x3-BN layers with a residual connection (He et al. 2016, figure 2, left).

    When the block changes width or stride, the shortcut is a 1x1 conv + BN projection (option B
    of section 3.3): it exports to ONNX as plain convolutions, where option A's zero-padded
    identity would need a Pad/slice.
    """

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


# Depths 6n+2 of He et al. 2016, section 4.2 (n = 1, 2, 3, 5, 7, 9, 18).
RESNET_CIFAR_DEPTHS = (8, 14, 20, 32, 44, 56, 110)


class ResNetCifar(nn.Module):
    """The CIFAR ResNet of He et al. 2016, section 4.2: a 3x3 conv stem, then three stages of
    n basic blocks with 16, 32, 64 channels (times `width`) on 32x32, 16x16, 8x8 maps (the first
    block of stages 2 and 3 has stride 2), global average pool, linear head. depth = 6n + 2.

    Input [B, C, H, W] (32x32 for CIFAR; any H, W >= 4 works) -> logits [B, num_classes].
    ResNet-20 (n=3) with 3 channels and 10 classes: 272,474 parameters.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        depth: int = 20,  # 6n + 2 layers with weights: one of RESNET_CIFAR_DEPTHS
        width: float = 1.0,  # multiplies the stage widths 16/32/64 (rounded, at least 1)
    ):
        super().__init__()
        _check_resnet_cifar(depth, width)
        n = (depth - 2) // 6
        widths = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        c_in = widths[0]
        for i, c_out in enumerate(widths):
            blocks = [
                BasicBlock(c_in if b == 0 else c_out, c_out, 2 if (i > 0 and b == 0) else 1)
                for b in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():  # He (Kaiming) normal init for convs, as in the paper
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))  # [B, 64*width, H/4, W/4]
        return self.fc(self.pool(x).flatten(1))  # [B, num_classes]


def _check_resnet_cifar(depth: Any, width: Any) -> None:
    if isinstance(depth, bool) or depth not in RESNET_CIFAR_DEPTHS:
        raise ConfigError(
            f"resnet_cifar depth must be 6n+2, one of {list(RESNET_CIFAR_DEPTHS)} "
            f"(ResNet-8/14/20/32/44/56/110), got {depth!r}"
        )
    if isinstance(width, bool) or not isinstance(width, int | float) or not 0 < width <= 16:
        raise ConfigError(
            f"resnet_cifar width must be a number in (0, 16] (multiplies the 16/32/64 "
            f"channels), got {width!r}"
        )


def _resnet_cifar(in_channels: int, num_classes: int, **kw) -> nn.Module:
    return ResNetCifar(in_channels, num_classes, **kw)


def _replace_first_conv(conv: nn.Conv2d, in_channels: int, stride: int | None) -> nn.Conv2d:
    """Same conv with another input channel count and/or stride; pretrained weights are kept
    (averaged over the input channels when those change)."""
    kh, kw = conv.kernel_size[0], conv.kernel_size[-1]
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        (kh, kw),
        stride=(conv.stride[0], conv.stride[-1]) if stride is None else stride,
        padding=conv.padding
        if isinstance(conv.padding, str)
        else (conv.padding[0], conv.padding[-1]),
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        w = conv.weight
        if in_channels != conv.in_channels:
            w = w.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1)
        new.weight.copy_(w)
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _torchvision(name: str) -> Callable[..., nn.Module]:
    def build(
        in_channels: int,
        num_classes: int,
        pretrained: bool = False,  # ImageNet weights from torchvision (downloads once; needs internet)
        small_input: bool = True,  # stride-1 stem (and no max-pool) for images under ~64 px
    ) -> nn.Module:
        import torchvision.models as tvm

        if pretrained:
            try:
                m = getattr(tvm, name)(weights="DEFAULT")
            except Exception as e:  # noqa: BLE001 - network errors come in many types
                raise ConfigError(
                    f"cannot load pretrained {name} weights ({e.__class__.__name__}: {e}); "
                    "they download from the internet once, into torch's cache: run online once, "
                    f"or set pretrained=false"
                ) from e
            _replace_head(m, num_classes)
        else:
            m = getattr(tvm, name)(num_classes=num_classes)
        stride = 1 if small_input else None
        if name.startswith("resnet"):
            m.conv1 = _replace_first_conv(m.conv1, in_channels, stride)
            if small_input:
                m.maxpool = nn.Identity()
        else:  # mobilenet / efficientnet: features[0] is Conv-BN-Act
            m.features[0][0] = _replace_first_conv(m.features[0][0], in_channels, stride)
        for mod in m.modules():
            # torchvision's MobileNet/EfficientNet use BN momentum 0.01: on small datasets the
            # running stats never catch up and eval accuracy sits at chance (measured on the 2-core reference machine).
            if isinstance(mod, nn.BatchNorm2d):
                mod.momentum = 0.1
        return m

    return build


def _replace_head(m: nn.Module, num_classes: int) -> None:
    fc = getattr(m, "fc", None)
    if isinstance(fc, nn.Linear):  # ResNets
        m.fc = nn.Linear(fc.in_features, num_classes)
        return
    classifier = m.get_submodule("classifier")  # MobileNets, EfficientNets: Sequential(..., Linear)
    assert isinstance(classifier, nn.Sequential) and isinstance(classifier[-1], nn.Linear)
    classifier[-1] = nn.Linear(classifier[-1].in_features, num_classes)


FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "cnn": _cnn,
    "resnet_cifar": _resnet_cifar,
    **{
        n: _torchvision(n)
        for n in (
            "resnet18",
            "resnet34",
            "resnet50",
            "mobilenet_v2",
            "mobilenet_v3_small",
            "mobilenet_v3_large",
            "efficientnet_b0",
        )
    },
}


def _allowed_kwargs(fn: Callable) -> set[str]:
    params = inspect.signature(fn).parameters
    return {n for n in params if n not in ("in_channels", "num_classes")}


def check_model_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate a spec's family name and option names without building anything."""
    if not isinstance(spec, dict):
        raise ConfigError(f"model spec must be a mapping, got {spec!r}")
    spec = dict(spec)
    target = spec.pop("_target_", None)
    if target is not None:
        cls = resolve_target(target)
        _check_target_kwargs(cls, target, spec)
        return spec
    name = spec.pop("name", None)
    if name is None:
        raise ConfigError(
            "model spec needs `name` (one of: " + ", ".join(sorted(FAMILIES)) + ") or `_target_` "
            "(an import path to an nn.Module class)"
        )
    if name not in FAMILIES:
        raise ConfigError(
            f"unknown model name {name!r}; valid names: {', '.join(sorted(FAMILIES))}, "
            "or use `_target_: package.module.Class` for your own nn.Module"
        )
    # Families built by a class: its constructor names the options.
    classes: dict[str, Callable[..., Any]] = {"cnn": SmallCNN, "resnet_cifar": ResNetCifar}
    allowed = _allowed_kwargs(classes.get(name, FAMILIES[name]))
    allowed.discard("self")
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(
            f"model {name!r} has no option(s) {sorted(unknown)}; valid options: {sorted(allowed)}"
        )
    if name == "resnet_cifar":  # knob values too, so a bad depth fails at config validation
        _check_resnet_cifar(spec.get("depth", 20), spec.get("width", 1.0))
    return spec


def check_spec_value(spec: Any) -> None:
    """`check_model_spec` for pydantic validators: raises ValueError so the key path is reported."""
    try:
        check_model_spec(spec)
    except ConfigError as e:
        raise ValueError(str(e)) from None


def build_model(spec: dict[str, Any], in_channels: int, num_classes: int) -> nn.Module:
    """Instantiate the model a spec describes, for `in_channels` inputs and `num_classes` outputs."""
    kwargs = check_model_spec(spec)
    if "_target_" in spec:
        return _build_target(spec["_target_"], kwargs, in_channels, num_classes)
    return FAMILIES[spec["name"]](in_channels, num_classes, **kwargs)


# ---------------------------------------------------------------------------------------------
# `_target_`: a user's own nn.Module class, named by its import path.
#
# A config value must never run code of the config writer's choosing: `_target_` is resolved to an
# object and checked before anything is called. Only classes that subclass torch.nn.Module are
# constructed (`subprocess.run`, `os.system`, `builtins.eval` and any other function are refused
# by what they are); the only side effect of resolving is importing the named module. Runs started
# from a deployment also restrict which modules may be imported (`models.allowed_modules`,
# flows/deployed.py): there the config writer is whoever may trigger the deployment.

DEFAULT_ALLOWED_MODULES = ("torchvision.models", "bonsai")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def module_allowed(module: str, prefixes: Iterable[str]) -> bool:
    """`module` is one of `prefixes` or a submodule of one (`bonsai` allows `bonsai.models`,
    not `bonsai_evil`)."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _describe(obj: Any) -> str:
    """What a `_target_` resolved to, for the refusal: 'function subprocess.run'."""
    if inspect.isclass(obj):
        kind = "class"
    elif inspect.isbuiltin(obj):
        kind = "built-in function"
    elif inspect.isfunction(obj) or inspect.ismethod(obj):
        kind = "function"
    elif inspect.ismodule(obj):
        return f"module {obj.__name__}"
    else:
        return f"a {type(obj).__name__} object"
    name = getattr(obj, "__qualname__", getattr(obj, "__name__", "?"))
    return f"{kind} {getattr(obj, '__module__', None) or '?'}.{name}"


def resolve_target(
    target: Any, allowed_modules: Iterable[str] | None = None
) -> Callable[..., nn.Module]:
    """The nn.Module class `target` ("package.module.Class") names, or ConfigError.

    Nothing is called: the module is imported (only under `allowed_modules` when given) and the
    attribute must be a subclass of torch.nn.Module, or a model builder torchvision registers
    (`torchvision.models.resnet18`); anything else (another function, a built-in, a class that
    is not a module) is refused naming what it is."""
    if not isinstance(target, str) or not _IMPORT_PATH.match(target):
        raise ConfigError(
            f"model _target_ {target!r} is not an import path; give module and class, e.g. "
            "my_pkg.nets.MyNet"
        )
    module_name, _, attr = target.rpartition(".")
    if allowed_modules is not None:
        allowed = list(allowed_modules)
        if not module_allowed(module_name, allowed):
            raise ConfigError(
                f"model _target_ {target!r}: module {module_name!r} is not under "
                f"models.allowed_modules {allowed}; the deployment's owner allows a package by "
                "registering the deployment with it in models.allowed_modules (README: Security)"
            )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"model _target_ {target!r} cannot be imported ({e}); give a full import path such "
            "as my_package.models.MyNet, importable from the current environment"
        ) from None
    obj = getattr(module, attr, _MISSING)
    if obj is _MISSING:
        raise ConfigError(
            f"model _target_ {target!r}: module {module_name!r} has no attribute {attr!r}"
        )
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)) and not _model_factory(obj):
        raise ConfigError(
            f"model _target_ {target!r} resolved to {_describe(obj)}, not an nn.Module class: "
            "Bonsai only constructs subclasses of torch.nn.Module and torchvision's registered "
            "model builders (wrap another factory function in a class, or use a `name:` family)"
        )
    return cast(Callable[..., nn.Module], obj)


def _model_factory(obj: Any) -> bool:
    """Whether `obj` is one of torchvision's registered model builders (`resnet18`, ...): the
    one kind of function a `_target_` may name, since torchvision declares them as such."""
    if not inspect.isfunction(obj) or not str(obj.__module__).startswith("torchvision.models"):
        return False
    from torchvision.models import get_model_builder, list_models

    return any(get_model_builder(name) is obj for name in list_models())


_MISSING = object()


def _check_target_kwargs(
    cls: Callable[..., nn.Module], target: str, kwargs: dict[str, Any]
) -> None:
    """Option names the constructor does not take, refused at validation rather than at build."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to read: the constructor call will tell
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = set(kwargs) - set(params)
    if unknown:
        valid = sorted(set(params) - {"self", "in_channels", "num_classes"})
        raise ConfigError(
            f"model _target_ {target!r} takes no option(s) {sorted(unknown)}; its constructor "
            f"takes: {valid}"
        )


def _build_target(target: str, kwargs: dict, in_channels: int, num_classes: int) -> nn.Module:
    cls = resolve_target(target)
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    for key, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if key in params and key not in kwargs:
            kwargs[key] = value
    try:
        model = cls(**kwargs)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a user's constructor refusing its arguments
        # (a channel count or size it does not take, a bad option value) is a configuration
        # problem to name in one line, not a traceback.
        raise ConfigError(
            f"cannot construct {target} with {kwargs}: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(model, nn.Module):  # a model builder that returned something else
        raise ConfigError(f"model _target_ {target!r} built a {type(model).__name__}, not a model")
    return model


def find_targets(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every `_target_` in a config tree, with its key path: what `check_targets` judges."""
    found: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{path}.{k}" if path else str(k)
            if k == "_target_":
                found.append((key, v))
            else:
                found += find_targets(v, key)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += find_targets(v, f"{path}[{i}]")
    return found


def check_targets(config: dict[str, Any], allowed_modules: Iterable[str]) -> None:
    """Every `_target_` anywhere in `config` names an nn.Module class under `allowed_modules`
    (the check of a run started from a deployment); ConfigError naming the first that does not."""
    allowed = list(allowed_modules)
    for key, target in find_targets(config):
        try:
            resolve_target(target, allowed)
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (torch-pruning's counter)."""
    import torch_pruning as tp

    from bonsai.concurrency import MODEL_CALLS

    was_training = model.training
    model.eval()
    with torch.no_grad(), MODEL_CALLS.forward():
        macs, _ = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_shape))
    model.train(was_training)
    return int(macs)


def check_fits_data(
    spec: dict[str, Any], input_shape: tuple[int, ...], num_classes: int, where: str
) -> None:
    """Build the model and run one zero batch: refuse, before any training, a model that cannot
    take the data's images or does not output one logit per class."""
    from bonsai.errors import DataError

    try:
        model = build_model(spec, input_shape[0], num_classes).eval()
    except ConfigError as e:
        c, *size = input_shape
        raise ConfigError(
            f"{where}: {e}; the data's images have {c} channel(s) and size "
            f"{'x'.join(map(str, size))}: if the model cannot take them, set data.channels and "
            "data.image_size (image folders) to what it takes, or give it arguments that fit"
        ) from None
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as e:  # noqa: BLE001 - any failure here is a config/data mismatch
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first is not None and first.in_channels != input_shape[0]:
            fix = (
                f"its first convolution takes {first.in_channels} input channel(s) but the data "
                f"has {input_shape[0]}: set data.channels={first.in_channels} (image folders) or "
                f"build the model for in_channels={input_shape[0]} (Bonsai passes in_channels "
                "to a constructor that accepts it)"
            )
        else:
            fix = "choose a model for this input size or resize the data (data.image_size)"
        raise ConfigError(
            f"{where}: model {spec} cannot run on the data's images of shape "
            f"{list(input_shape)} ({type(e).__name__}: {e}); {fix}"
        ) from e
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise DataError(
            f"{where}: model {spec} outputs shape {list(out.shape)} for a batch of 2, but the "
            f"data has {num_classes} classes; the model must output [batch, {num_classes}] "
            "(accept a num_classes argument, or set it to the data's class count)"
        )


# ---------------------------------------------------------------------------------------------
# Recorded structure: how a pruned or factorized model differs from the model its spec builds.
#
# Structured pruning shrinks layers (a Conv2d with 64 outputs becomes one with 29) and low-rank
# factorization replaces a layer with a Sequential of two; the spec alone no longer rebuilds the
# model. The difference is recorded as plain JSON, one entry per changed module:
#     {"path": "layer1.0.conv1", "module": {"type": "Conv2d", "in_channels": 32, ...}}
# and re-applied after `build_model`, before the safetensors weights are loaded. Only the module
# types below can be described, and building one from its description runs no user code: the
# manifest decides shapes, never what gets executed.

_CONV_KEYS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")
_BN_KEYS = ("num_features", "eps", "momentum", "affine", "track_running_stats")


def _plain(v: Any) -> Any:
    """Tuples (kernel sizes, strides) as lists, so that a description survives JSON unchanged."""
    return list(v) if isinstance(v, tuple) else v


def describe_module(m: nn.Module) -> dict[str, Any] | None:
    """A JSON description that `module_from_description` rebuilds (None: not describable)."""
    if isinstance(m, nn.Conv2d):
        d: dict[str, Any] = {k: _plain(getattr(m, k)) for k in _CONV_KEYS}
        return {
            "type": "Conv2d",
            **d,
            "groups": m.groups,
            "bias": m.bias is not None,
            "padding_mode": m.padding_mode,
        }
    if isinstance(m, nn.Linear):
        return {
            "type": "Linear",
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
        }
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d):
        if type(m) is cls:
            return {"type": cls.__name__, **{k: getattr(m, k) for k in _BN_KEYS}}
    if isinstance(m, nn.LayerNorm):
        return {
            "type": "LayerNorm",
            "normalized_shape": list(m.normalized_shape),
            "eps": m.eps,
            "elementwise_affine": m.elementwise_affine,
            "bias": getattr(m, "bias", None) is not None,
        }
    if isinstance(m, nn.GroupNorm):
        return {
            "type": "GroupNorm",
            "num_groups": m.num_groups,
            "num_channels": m.num_channels,
            "eps": m.eps,
            "affine": m.affine,
        }
    if isinstance(m, nn.PReLU):
        return {"type": "PReLU", "num_parameters": m.num_parameters}
    if type(m) is nn.Sequential:
        children = []
        for name, child in m.named_children():
            cd = describe_module(child)
            if cd is None:
                return None
            children.append([name, cd])
        return {"type": "Sequential", "children": children}
    if type(m) is nn.Identity:
        return {"type": "Identity"}
    return None


def module_from_description(d: dict[str, Any]) -> nn.Module:
    """Build the (untrained) module a `describe_module` description names."""
    from bonsai.errors import ArtifactError

    kw = {k: v for k, v in d.items() if k != "type"}
    kind = d.get("type")
    if kind == "Conv2d":
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
        return nn.Conv2d(**kw)
    if kind == "Linear":
        return nn.Linear(**kw)
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        return getattr(nn, kind)(**kw)
    if kind == "LayerNorm":
        return nn.LayerNorm(**kw)
    if kind == "GroupNorm":
        return nn.GroupNorm(**kw)
    if kind == "PReLU":
        return nn.PReLU(**kw)
    if kind == "Identity":
        return nn.Identity()
    if kind == "Sequential":
        seq = nn.Sequential()
        for name, child in d["children"]:
            seq.add_module(str(name), module_from_description(child))
        return seq
    raise ArtifactError(f"unknown module type {kind!r} in a recorded model structure")


def structure_diff(model: nn.Module, reference: nn.Module) -> list[dict[str, Any]]:
    """The modules of `model` that differ from `reference` (the model its spec builds): changed
    shapes or a changed type, outermost first. Raises ArtifactError when a difference cannot be
    described or re-applying the record would not give `model`'s parameter shapes."""
    from bonsai.errors import ArtifactError

    ref_modules = dict(reference.named_modules())
    out: list[dict[str, Any]] = []
    recorded: list[str] = []
    for path, m in model.named_modules():
        if not path or any(path.startswith(p + ".") for p in recorded):
            continue
        ref = ref_modules.get(path)
        mine = describe_module(m)
        if ref is not None and type(ref) is type(m):
            if mine is None or _same_children(m, ref):
                continue  # a container of the same type: its children are compared one by one
            if mine == describe_module(ref):
                continue
        if mine is None:
            raise ArtifactError(
                f"module {path!r} ({type(m).__name__}) differs from the architecture spec and "
                "its structure cannot be recorded; recordable types: Conv2d, Linear, "
                "BatchNorm1d/2d, LayerNorm, GroupNorm, PReLU, Identity, Sequential of these"
            )
        out.append({"path": path, "module": mine})
        recorded.append(path)
    with torch.device("meta"):  # shapes only: no memory, no draw from the random stream
        apply_structure(reference, out)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if want != got:
        bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ArtifactError(
            "the model's structure cannot be recorded: after re-applying the recorded modules "
            f"these tensors still differ from the model's: {bad[:5]} (a parameter outside a "
            "recordable module changed shape)"
        )
    return out


def _same_children(a: nn.Module, b: nn.Module) -> bool:
    """Both containers (Sequential) with the same child names: compare the children instead."""
    if not isinstance(a, nn.Sequential):
        return False
    return [n for n, _ in a.named_children()] == [n for n, _ in b.named_children()]


# What a recorded structure may declare: pruning and factorization only shrink a layer, so a
# described module holds at most the parameters of the one it replaces (with slack for a
# factorization's two halves and a bias), in containers nested a few levels deep.
MAX_STRUCTURE_DEPTH = 4
MAX_CHILDREN = 64
MAX_CHANNELS = 4096  # in_channels of the data
MAX_OUTPUTS = 100_000  # logit columns


def described_params(d: Any, depth: int = 0) -> int:
    """Parameters of the module a description names, computed from the description alone
    (ArtifactError when it is not one Bonsai writes: bad types, too deep, too many children)."""
    from bonsai.errors import ArtifactError

    def n(key: str) -> int:
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ArtifactError(f"recorded module {d.get('type')}: {key}={v!r} is not a count")
        return v

    if not isinstance(d, dict) or depth > MAX_STRUCTURE_DEPTH:
        raise ArtifactError("recorded structure is nested deeper than any Bonsai writes")
    kind = d.get("type")
    bias = 1 if d.get("bias") else 0
    if kind == "Conv2d":
        k = d.get("kernel_size")
        if not (isinstance(k, list) and len(k) == 2 and all(isinstance(x, int) for x in k)):
            raise ArtifactError(f"recorded Conv2d: kernel_size={k!r}")
        groups = max(n("groups"), 1)
        return n("out_channels") * (n("in_channels") // groups) * k[0] * k[1] + bias * n(
            "out_channels"
        )
    if kind == "Linear":
        return n("in_features") * n("out_features") + bias * n("out_features")
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        return 2 * n("num_features")
    if kind == "GroupNorm":
        return 2 * n("num_channels")
    if kind == "LayerNorm":
        shape = d.get("normalized_shape")
        size = 1
        for x in shape if isinstance(shape, list) else [shape]:
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise ArtifactError(f"recorded LayerNorm: normalized_shape={shape!r}")
            size *= x
        return 2 * size
    if kind == "PReLU":
        return n("num_parameters")
    if kind == "Identity":
        return 0
    if kind == "Sequential":
        children = d.get("children")
        if not isinstance(children, list) or len(children) > MAX_CHILDREN:
            raise ArtifactError("recorded Sequential: children is not a short list")
        total = 0
        for child in children:
            if not (isinstance(child, list) and len(child) == 2):
                raise ArtifactError("recorded Sequential: a child is not [name, module]")
            total += described_params(child[1], depth + 1)
        return total
    raise ArtifactError(f"unknown module type {kind!r} in a recorded model structure")


def check_recorded_model(mm: Any, where: str) -> None:
    """A stored torch model's description (`meta.model`) is one Bonsai could have written: a spec
    the command line would accept, sizes within bounds, and a structure that only shrinks the
    layers of the architecture the spec builds. ArtifactError naming `where` otherwise; nothing
    is built but the architecture itself, on the meta device (no memory)."""
    from bonsai.errors import ArtifactError

    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"artifact {where!r}: {why}")

    if not isinstance(mm, dict) or not isinstance(mm.get("spec"), dict):
        raise bad("its manifest has no model spec")
    for key, top in (("in_channels", MAX_CHANNELS), ("num_classes", MAX_OUTPUTS)):
        v = mm.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            raise bad(f"meta.model.{key}={v!r} is outside 1..{top}")
    try:
        check_model_spec(mm["spec"])
        reference = build_reference(mm["spec"], mm["in_channels"], mm["num_classes"])
    except ConfigError as e:
        raise bad(f"its model spec is refused: {e}") from None
    structure = mm.get("structure") or []
    if not isinstance(structure, list):
        raise bad("meta.model.structure is not a list")
    modules = dict(reference.named_modules())
    if len(structure) > len(modules):
        raise bad(
            f"its structure names {len(structure)} modules; the architecture has {len(modules)}"
        )
    for entry in structure:
        if not isinstance(entry, dict) or entry.get("path") not in modules or not entry["path"]:
            path = entry.get("path") if isinstance(entry, dict) else entry
            raise bad(f"its structure names module {path!r}, which the architecture lacks")
        try:
            declared = described_params(entry.get("module"))
        except ArtifactError as e:
            raise bad(str(e)) from None
        replaced = count_params(modules[entry["path"]])
        if declared > replaced * 1.05 + 4096:
            raise bad(
                f"its structure declares {declared:,} parameters at {entry['path']!r}, where the "
                f"architecture has {replaced:,}: pruning and factorization only shrink layers"
            )


def apply_structure(model: nn.Module, structure: list[dict[str, Any]]) -> nn.Module:
    """Replace the modules a recorded structure names (in place); returns `model`."""
    from bonsai.errors import ArtifactError

    for entry in structure:
        path = entry["path"]
        parent_path, _, name = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError as e:
            raise ArtifactError(
                f"recorded structure names module {path!r}, which the architecture spec does "
                "not have"
            ) from e
        setattr(parent, name, module_from_description(entry["module"]))
    return model


def build_reference(spec: dict[str, Any], in_channels: int, num_classes: int) -> nn.Module:
    """The model a spec builds, for comparing shapes: on the meta device (no memory, no random
    initialization, so the caller's random stream is untouched) when the model allows it."""
    try:
        with torch.device("meta"):
            return build_model(spec, in_channels, num_classes)
    except Exception:  # noqa: BLE001 - a user model may not build on meta tensors
        with torch.random.fork_rng(devices=[]):
            return build_model(spec, in_channels, num_classes)
