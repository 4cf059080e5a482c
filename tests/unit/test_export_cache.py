"""The test session's export cache (tests/export_cache.py): an export of a model exported already
is a copy of that export, byte for byte what torch's exporter writes; anything that changes the
export changes the key."""

import pytest
import torch
from torch import nn

import bonsai.onnx_utils as ou
from bonsai.models import build_model
from tests import export_cache

CNN = {"name": "cnn", "width": 4, "depth": 1}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    where = tmp_path / "cache"
    where.mkdir()
    monkeypatch.setenv(export_cache.ENV, str(where))
    return where


def _double(module, inputs, output):
    return output * 2


def _key(model, **kw):
    args = {"example": torch.zeros(2, 1, 8, 8), "opset": 18, "output_names": ["logits"], **kw}
    return export_cache.key_of(model, **args)


def test_a_second_export_of_the_same_model_is_a_copy_with_torchs_bytes(
    cache, tmp_path, monkeypatch
):
    torch.manual_seed(0)
    model = build_model(CNN, 1, 10).eval()
    twin = build_model(CNN, 1, 10).eval()
    twin.load_state_dict(model.state_dict())  # another object, the same model
    first = ou.export_onnx(model, (1, 8, 8), tmp_path / "a.onnx")
    second = ou.export_onnx(twin, (1, 8, 8), tmp_path / "b.onnx")
    assert export_cache.counts(cache) == {"hit": 1, "miss": 1}
    monkeypatch.setenv(export_cache.ENV, "0")  # torch's exporter, for real
    own = ou.export_onnx(twin, (1, 8, 8), tmp_path / "c.onnx")
    assert export_cache.counts(cache) == {"hit": 1, "miss": 1}
    assert first.read_bytes() == second.read_bytes() == own.read_bytes()


def test_what_the_export_reads_is_in_the_key():
    torch.manual_seed(0)
    model = build_model(CNN, 1, 10).eval()
    base = _key(model)
    assert base is not None and _key(model) == base
    other = build_model(CNN, 1, 10).eval()  # other weights
    assert _key(other) != base
    assert _key(model, opset=20) != base
    assert _key(model, output_names=["out"]) != base
    assert _key(model, example=torch.zeros(2, 1, 16, 16)) != base
    model.train()
    assert _key(model) != base  # a module's mode changes what it computes
    model.eval()
    with torch.no_grad():
        next(model.parameters())[0].view(-1)[0] += 1e-6
    assert _key(model) not in (None, base)


def test_a_patched_forward_is_another_model(monkeypatch):
    torch.manual_seed(0)
    model = build_model(CNN, 1, 10).eval()
    base = _key(model)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))

    def forward(self, x):  # what a test that breaks a layer does
        return nn.Conv2d._conv_forward(self, x, self.weight, None)

    monkeypatch.setattr(type(conv), "forward", forward)
    assert _key(model) not in (None, base)


def test_models_it_cannot_key_are_exported_as_usual(cache, tmp_path):
    model = build_model(CNN, 1, 10).eval()
    model.register_forward_hook(_double)  # picklable (by name): only the hook check refuses it
    assert _key(model) is None
    ou.export_onnx(model, (1, 8, 8), tmp_path / "hooked.onnx")

    class Local(nn.Module):  # a class pickle cannot name
        def forward(self, x):
            return x.flatten(1)

    assert _key(Local()) is None
    ou.export_onnx(Local(), (1, 8, 8), tmp_path / "local.onnx")
    assert export_cache.counts(cache) == {"hit": 0, "miss": 0}
    assert not list(cache.glob("*.onnx"))
