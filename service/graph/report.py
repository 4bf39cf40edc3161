"""What the compiler built, for people: op histograms, node counts, exposed outputs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from service.graph import weights
from service.graph.build import BUILDERS, CompiledModel


def graph_summary(model: onnx.ModelProto) -> dict[str, Any]:
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    return {
        "nodes": len(graph.node),
        "generated_nodes": sum(1 for n in graph.node if n.name.startswith("xai/")),
        "inputs": [i.name for i in graph.input if i.name not in inits],
        "outputs": [o.name for o in graph.output],
        "ops": dict(sorted(Counter(n.op_type for n in graph.node).items())),
    }


def report(source: onnx.ModelProto, compiled: CompiledModel, seconds: float) -> dict[str, Any]:
    split = compiled.split
    return {
        "compile_seconds": round(seconds, 3),
        "image_input": split.image,
        "scores_output": split.scores,
        "logits": split.logits,
        "graph_activation": split.graph_activation,
        "target_layer": {"name": split.layer, "layout": split.target_layout.value,
                         "shape_chw": list(split.target_shape),
                         **({"prefix_tokens": split.prefix_tokens} if split.tokens else {})},
        **{str(cap): compiled.errors.get(cap) for cap in BUILDERS},
        "source": graph_summary(source),
        "graphs": {name: graph_summary(g) for name, g in compiled.graphs.items()},
    }


def write(out: Path, compiled: CompiledModel) -> list[Path]:
    """Write every compiled graph as ``<name>.onnx`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, graph in compiled.graphs.items():
        path = out / f"{name}.onnx"
        onnx.save(weights.embed(graph), path)  # self-contained: the weights inline
        paths.append(path)
    return paths
