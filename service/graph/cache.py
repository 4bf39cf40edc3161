"""Compiled graphs cached by model hash: in memory always, on disk when a folder is given.

The key covers the model's bytes, the compile options and the compiler's own source, so a
changed rule never serves a stale graph.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from service.errors import CompileError
from service.graph.build import RARELY_USED, Capability, CompiledModel, Graphs, compile_model
from service.graph.target import Split
from service.models.spec import Layout

log = logging.getLogger(__name__)

@cache
def compiler_fingerprint() -> str:
    """A hash of the compiler's source files."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _reader(path: Path) -> Callable[[], onnx.ModelProto]:
    """Reads one cached graph (weights held outside it stay references: the loader
    supplies them).

    Raises:
        CompileError: the file cannot be read or parsed.
    """
    def read() -> onnx.ModelProto:
        try:
            return onnx.load(path, load_external_data=False)
        except (OSError, DecodeError) as exc:
            raise CompileError(f"the compile cache's {path.name} cannot be read: {exc}") from exc
    return read


class CompileCache:
    """At most ``capacity`` compiled models in memory, plus an optional disk folder."""

    def __init__(self, folder: Path | None = None, capacity: int = 8) -> None:
        self.folder = folder
        self.capacity = capacity
        self._memory: OrderedDict[str, CompiledModel] = OrderedDict()

    @staticmethod
    def key(raw: bytes, layout: Layout, activation: str | None, target_layer: str | None,
            input_shape: Sequence[int] | None = None, *, digest: str | None = None) -> str:
        """The entry's name; ``digest``: ``raw``'s SHA-256 when the caller has it already
        (hashing VGG-16's 0.5 GB again took 0.3-0.4 s of its load)."""
        shape = None if input_shape is None else "x".join(str(int(d)) for d in input_shape)
        model = digest or hashlib.sha256(raw).hexdigest()
        return hashlib.sha256(f"{model}|{layout}|{activation}|{target_layer}|{shape}|"
                              f"{compiler_fingerprint()}".encode()).hexdigest()

    def compile(self, raw: bytes, model: onnx.ModelProto, *, layout: Layout,
                activation: str | None, target_layer: str | None,
                input_shape: Sequence[int] | None = None,
                digest: str | None = None) -> CompiledModel:
        key = self.key(raw, layout, activation, target_layer, input_shape, digest=digest)
        hit = self._memory.get(key) or self._load(key)
        if hit is None:
            hit = compile_model(model, layout=layout, activation=activation,
                                target_layer=target_layer, input_shape=input_shape)
            self._store(key, hit)
        self._memory[key] = hit
        self._memory.move_to_end(key)
        while len(self._memory) > self.capacity:
            self._memory.popitem(last=False)
        return hit

    def _load(self, key: str) -> CompiledModel | None:
        if self.folder is None:
            return None
        entry = self.folder / key
        try:
            meta = json.loads((entry / "split.json").read_text(encoding="utf-8"))
            errors = {Capability(k): str(v) for k, v in meta.get("errors", {}).items()}
            files = {cap: entry / f"{cap}.onnx" for cap in Capability
                     if (entry / f"{cap}.onnx").exists()}
            if set(Capability) - set(files) - set(errors):
                return None  # a graph file went missing: compile again
            # The rarely used graphs are read at their first use, as a compilation would
            # assemble them (the guided one, with its flipped kernels inline, was most of
            # a hit's time); the others now, so that a bad entry is compiled again.
            graphs = Graphs({cap: _reader(path) for cap, path in files.items()},
                            deferred=RARELY_USED, check=False)
        except (OSError, ValueError, CompileError):
            return None
        split = Split(**{**meta["split"], "target_layout": Layout(meta["split"]["target_layout"]),
                         "target_shape": tuple(meta["split"]["target_shape"])})
        return CompiledModel(split, graphs, errors)

    def _store(self, key: str, compiled: CompiledModel) -> None:
        if self.folder is None:
            return
        entry = self.folder / key
        try:
            entry.mkdir(parents=True, exist_ok=True)
            for cap, graph in compiled.graphs.items():
                onnx.save(graph, entry / f"{cap}.onnx")
            # Writing assembled the rarely used graphs: they go again, to be assembled at
            # their first use as without a folder (not held for a model's life whether or
            # not that use ever comes; the guided one holds its flipped kernels inline).
            for cap in RARELY_USED:
                compiled.release(cap)
            split = {**compiled.split.__dict__, "target_layout": compiled.split.target_layout.value,
                     "target_shape": list(compiled.split.target_shape)}
            # split.json last: its presence marks a complete entry.
            (entry / "split.json").write_text(
                json.dumps({"split": split, "errors": {str(k): v for k, v in
                                                       compiled.errors.items()}}),
                encoding="utf-8")
        except OSError as exc:
            # A read-only file system only costs the next start a recompilation.
            log.warning("cannot write the compile cache in %s: %s", self.folder, exc.strerror)
