import json
import pickle

import pytest
import torch

from bonsai.artifacts import atomic_dir, load_torch, open_artifact, save_torch
from bonsai.errors import ArtifactError
from bonsai.models import build_model

SPEC = {"name": "cnn", "width": 8, "depth": 2}


def _saved(path):
    torch.manual_seed(0)
    model = build_model(SPEC, 1, 4).eval()
    meta = {"spec": SPEC, "in_channels": 1, "num_classes": 4, "input_shape": [1, 8, 8]}
    path.mkdir()
    return model, save_torch(model, path, meta)


def test_torch_roundtrip_without_pickle(tmp_path):
    model, art = _saved(tmp_path / "a")
    assert sorted(p.name for p in art.path.iterdir()) == ["artifact.json", "model.safetensors"]
    again = open_artifact(art.path)
    assert again.digest == art.digest
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_torch(again)(x), model(x))


def test_bit_flip_is_refused_with_checksum_error(tmp_path):
    _, art = _saved(tmp_path / "a")
    data = bytearray(art.file.read_bytes())
    data[len(data) // 2] ^= 0x01
    art.file.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        open_artifact(art.path)


def test_truncated_file_is_refused(tmp_path):
    _, art = _saved(tmp_path / "a")
    art.file.write_bytes(art.file.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        open_artifact(art.path)


def test_pickle_disguised_as_weights_never_executes(tmp_path):
    _, art = _saved(tmp_path / "a")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    art.file.write_bytes(pickle.dumps(Payload()))
    # Even with a forged manifest checksum, the loader reads safetensors only: no unpickling.
    from bonsai.artifacts import write_manifest

    forged = write_manifest(art.path, "torch", art.meta)
    with pytest.raises(ArtifactError):
        load_torch(forged)
    assert not marker.exists()


def test_manifest_listing_files_outside_is_refused(tmp_path):
    _, art = _saved(tmp_path / "a")
    manifest = json.loads((art.path / "artifact.json").read_text())
    manifest["files"]["../outside"] = "0" * 64
    (art.path / "artifact.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside"):
        open_artifact(art.path)


def test_missing_artifact_is_named(tmp_path):
    with pytest.raises(ArtifactError, match="artifact.json is missing"):
        open_artifact(tmp_path / "nothing")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "stage"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash mid-stage")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_publishes_whole(tmp_path):
    final = tmp_path / "stage"
    with atomic_dir(final) as tmp:
        (tmp / "model.bin").write_bytes(b"x")
        assert not final.exists()
    assert (final / "model.bin").read_bytes() == b"x"
