"""`coreml`: a Core ML package (ML Program). A package is a folder; the artifact holds it zipped
(stored files only, as Xcode and `coremltools.models.MLModel` take it once unzipped). Core ML runs
only on Apple's systems, which ship it: nothing here runs or times it, and a device needs no
runtime for it."""

from __future__ import annotations

from bonsai.formats.base import Format, StoredArtifact


class CoreMLFormat(Format):
    kind = "coreml"
    model_file = "model.mlpackage.zip"
    runtime = None
    runs_here = False
    zipped = True

    def size_bytes(self, artifact: StoredArtifact) -> int:
        """The package as installed: unzipped (measured by the export stage)."""
        return int(artifact.meta["coreml"]["package_bytes"])
