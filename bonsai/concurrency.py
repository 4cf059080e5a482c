"""Process-wide locks for torch state that is not thread-safe.

While any thread runs `torch.export` (under the dynamo ONNX exporter and MLflow's pt2 model
format), `torch.compiler.is_exporting()` is true for the whole process, and every call of a
dynamo-disabled function, including `Optimizer.zero_grad` and `Optimizer.step`, then edits
`torch.fx.traceback.current_meta` without a lock. A training thread and an exporting thread then
corrupt each other (seen here as `KeyError: 'custom'` with two students distilled concurrently).
Exports and optimizer calls therefore take this one lock. It is re-entrant, so an export inside
a locked section does not deadlock.
"""

import threading

TORCH_GRAPH_LOCK = threading.RLock()
