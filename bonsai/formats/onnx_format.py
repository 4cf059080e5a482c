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

    def embed_metadata(self, file: Path, entries: dict[str, str]) -> None:
        """`entries` as the model's `metadata_props` (what onnxruntime's `get_modelmeta()
        .custom_metadata_map` and Netron show), the summary as its `doc_string`."""
        import onnx

        from bonsai.formats.embedded import summary

        m = onnx.load(str(file))
        kept = [(p.key, p.value) for p in m.metadata_props if p.key not in entries]
        del m.metadata_props[:]
        for key, value in [*kept, *sorted(entries.items())]:
            m.metadata_props.add(key=key, value=value)
        m.doc_string = summary(entries)
        onnx.save(m, str(file))

    def read_metadata(self, file: Path) -> dict[str, str]:
        import onnx

        return {p.key: p.value for p in onnx.load(str(file)).metadata_props}
