"""`onnx`: one self-contained ONNX file (no external data), run by onnxruntime on the CPU."""

from __future__ import annotations

from pathlib import Path

from bonsai.formats.base import Format, Session


class OnnxFormat(Format):
    kind = "onnx"
    model_file = "model.onnx"
    runtime = "onnxruntime"
    onnx_graph = True
    probe = """
import numpy as np
import onnxruntime as ort
opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
opts.inter_op_num_threads = 1
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
inp = sess.get_inputs()[0]
sess.run(None, {inp.name: np.zeros(shape, dtype=np.float32)})
"""

    def open_session(self, file: Path, threads: int = 1) -> Session:
        from bonsai.onnx_utils import session

        return session(file, threads)
