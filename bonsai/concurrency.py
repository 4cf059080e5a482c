"""Process-wide locks for torch state that is not thread-safe.

While any thread runs `torch.export` (under the dynamo ONNX exporter and MLflow's pt2 model
format), `torch.compiler.is_exporting()` is true for the whole process, and every call of a
dynamo-disabled function, including `Optimizer.zero_grad` and `Optimizer.step`, then edits
`torch.fx.traceback.current_meta` without a lock. A training thread and an exporting thread then
corrupt each other (seen here as `KeyError: 'custom'` with two students distilled concurrently).
Exports and optimizer calls therefore take this one lock. It is re-entrant, so an export inside
a locked section does not deadlock.
"""

import contextlib
import threading
from collections.abc import Iterator

TORCH_GRAPH_LOCK = threading.RLock()


class ModelCalls:
    """Module calls in many threads at once (shared), or one torch.fx trace alone (exclusive).

    `torch.fx.symbolic_trace` (QAT's preparation) patches `torch.nn.Module.__call__` for the whole
    process while it traces. A stage training in another thread meanwhile had its own forward
    pass recorded by the tracer ("NameError: module is not installed as a submodule") and the
    traced QAT model picked up the other model's calls (its fp32 export then differed from torch
    by 1.6e9). Forward passes (training steps, predictions, MAC counts) take the shared side; a
    trace waits until none runs and holds new ones back. No thread holds `TORCH_GRAPH_LOCK`
    inside a shared section, so a trace may take it while exclusive without a deadlock.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._tracer: int | None = None  # thread id of the running trace

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            while self._tracer is not None and self._tracer != me:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def trace(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            while self._tracer is not None:
                self._cond.wait()
            self._tracer = me
            while self._active > 0:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._tracer = None
                self._cond.notify_all()


MODEL_CALLS = ModelCalls()
