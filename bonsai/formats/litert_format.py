"""`litert`: a LiteRT (TFLite) flatbuffer converted at batch 1, run by the ai-edge-litert
interpreter (`bonsai.litert.LiteRTSession`); the converter lives in its own environment."""

from __future__ import annotations

from pathlib import Path

from bonsai.formats.base import Format, Session


class LiteRTFormat(Format):
    kind = "litert"
    model_file = "model.tflite"
    runtime = "ai-edge-litert"
    probe = """
import numpy as np
from ai_edge_litert.interpreter import Interpreter
it = Interpreter(model_path=path, num_threads=threads)
it.allocate_tensors()
inp = it.get_input_details()[0]
it.set_tensor(inp["index"], np.zeros(inp["shape"], dtype=np.float32))
it.invoke()
"""

    def open_session(self, file: Path, threads: int = 1) -> Session:
        from bonsai.litert import LiteRTSession

        return LiteRTSession(file, threads)

    def embed_metadata(self, file: Path, entries: dict[str, str]) -> None:
        from bonsai.formats.embedded import summary
        from bonsai.litert import embed_metadata

        embed_metadata(file, entries, summary(entries))

    def read_metadata(self, file: Path) -> dict[str, str]:
        from bonsai.litert import read_metadata

        return read_metadata(file)
