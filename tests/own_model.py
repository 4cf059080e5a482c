"""A model trained outside Bonsai, by a plain script, and saved the ways users save models: what
the `import` stage's tests bring in (tests/unit/test_import.py, tests/reliability/
test_bad_input_import.py, tests/flow/test_own_model.py).

The "plain script" is `train_plain`: torch only, on the normalized tensors of
`bonsai.data.load_data` (the inputs every stage sees), its accuracy measured by hand.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from bonsai.models import SmallCNN

SPEC = {"name": "cnn", "width": 8}  # the architecture, as a Bonsai spec (SmallCNN, width 8)


def train_plain(data, epochs: int = 4, seed: int = 0) -> tuple[nn.Module, float]:
    """(a SmallCNN trained with plain torch, its top-1 accuracy in percent on the test split)."""
    torch.manual_seed(seed)
    net = SmallCNN(data.in_channels, data.num_classes, width=8)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(data.train_x), generator=gen)
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(data.train_x[idx]), data.train_y[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        correct = (net(data.test_x).argmax(1) == data.test_y).sum().item()
    return net, 100.0 * correct / len(data.test_y)


def save_export(net: nn.Module, path: Path, shape=(1, 8, 8)) -> Path:
    """A torch.export program with a dynamic batch, as torch's docs show it."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        net.eval(), (torch.zeros(2, *shape),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, path)
    return path


def save_torchscript(net: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated: users still have such files
        torch.jit.save(torch.jit.script(net.eval()), str(path))
    return path


def save_onnx(net: nn.Module, path: Path, shape=(1, 8, 8), *, dynamic=True) -> Path:
    """An ONNX file as a user's script exports it (its own input/output names)."""
    kw = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dynamic else {}
    batch = 2 if dynamic else 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(), (torch.zeros(batch, *shape),), str(path), dynamo=True,
            external_data=False, input_names=["pixels"], output_names=["scores"],
            verbose=False, **kw,
        )  # fmt: skip
    return path


def save_all(net: nn.Module, folder: Path) -> dict[str, Path]:
    """The model saved in every format the import stage reads."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sd = net.state_dict()
    torch.save(sd, folder / "net.pt")
    # A Lightning-style checkpoint: the weights under `state_dict`, prefixed by the attribute
    # that held the model, beside training state.
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3, "global_step": 90},
        folder / "net.ckpt",
    )
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "net.safetensors"))
    torch.save(net, folder / "whole.pt")  # the whole module, pickled
    external = folder / "external"
    external.mkdir(exist_ok=True)
    save_onnx(net, folder / "net.onnx")
    return {
        "state_dict": folder / "net.pt",
        "wrapped": folder / "net.ckpt",
        "safetensors": folder / "net.safetensors",
        "pickle": folder / "whole.pt",
        "torch_export": save_export(net, folder / "net.pt2"),
        "torchscript": save_torchscript(net, folder / "scripted.pt"),
        "onnx": folder / "net.onnx",
        "onnx_external": with_external_data(folder / "net.onnx", external / "net.onnx"),
        "onnx_batch1": declare_batch_1(folder / "net.onnx", folder / "batch1.onnx"),
    }


def with_external_data(src: Path, dest: Path) -> Path:
    """A copy of an ONNX file with its weights in a data file beside it (as torch's exporter
    writes large models)."""
    import onnx

    model = onnx.load(str(src))
    onnx.save(model, str(dest), save_as_external_data=True, location="net.onnx.data",
              size_threshold=0)  # fmt: skip
    return dest


def declare_batch_1(src: Path, dest: Path) -> Path:
    """A copy of an ONNX file whose input declares a fixed batch of 1 while its graph works for
    any batch (as older exporters wrote models exported without dynamic axes)."""
    import onnx

    model = onnx.load(str(src))
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_value = 1
    onnx.save(model, str(dest))
    return dest


def rewrite_program(src: Path, dest: Path, edit=None, add: dict[str, bytes] | None = None,
                    replace: dict[str, bytes] | None = None) -> Path:  # fmt: skip
    """A copy of the .pt2 archive `src` with its program JSON changed by `edit(json)`, entries
    added (`add`, names below the archive's root) or replaced (`replace`, by name suffix)."""
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        root = names[0].split("/", 1)[0]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zout:
            for n in names:
                data = zin.read(n)
                if n.endswith("models/model.json") and edit is not None:
                    program = json.loads(data)
                    edit(program)
                    data = json.dumps(program).encode()
                for suffix, new in (replace or {}).items():
                    if n.endswith(suffix):
                        data = new
                zout.writestr(n, data)
            for n, data in (add or {}).items():
                zout.writestr(f"{root}/{n}", data)
    dest.write_bytes(buf.getvalue())
    return dest


def write_marker(marker: str) -> None:
    Path(marker).write_text("code from the file ran")


class WritesMarker:
    """Unpickling it calls `write_marker`: proof that a loader ran code named in a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (write_marker, (str(self.marker),))


def pickled_payload(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"weights": torch.zeros(1), "payload": WritesMarker(marker)}, buf)
    return buf.getvalue()
