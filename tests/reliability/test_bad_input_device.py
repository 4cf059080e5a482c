"""A device the machine does not have is refused before any work: `runtime.device=cuda` (or
`mps`) without one exits 2 with one line naming what torch found and the fix, and leaves no
store, MLflow run or stage artifact behind."""

import pytest
import torch

from bonsai.errors import ConfigError
from flows.compress import compose_config, compress


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_exits_2_before_anything_runs(tmp_path):
    from tests.helpers import run_cli

    store = tmp_path / "mlruns"
    out = run_cli(store, ["debug=fast", "runtime.device=cuda"], timeout=120, temporary_server=True)
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("bonsai: error:")]
    assert len(errors) == 1, out.stderr
    assert "runtime.device=cuda, but torch " in errors[0]
    assert "use runtime.device=auto" in errors[0] and "runtime.device=cpu" in errors[0]
    assert "Traceback" not in out.stderr
    assert "temporary Prefect server" not in out.stderr  # refused before the flow started
    assert not store.exists(), "no MLflow store, run or stage artifact may be created"


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_without_apple_silicon_is_refused_before_anything_runs(tmp_path):
    store = tmp_path / "mlruns"
    raw = compose_config(["debug=fast", "runtime.device=mps", f"tracking.store_dir={store}"])
    with pytest.raises(ConfigError, match=r"runtime\.device=mps, but torch .* no MPS device"):
        compress(raw)
    assert not store.exists()
