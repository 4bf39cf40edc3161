"""The compiler's graphs by capability: the rarely used ones decided at compile time and
assembled at their first lookup."""

from __future__ import annotations

import threading

import onnx
import pytest
from onnx import helper

from service.errors import CompileError
from service.graph import autodiff
from service.graph import fixations as fixation_plan
from service.graph.build import (
    GUIDED_PREFIX,
    RARELY_USED,
    Capability,
    Graphs,
    compile_model,
)
from service.models.spec import Layout
from tests import handmade
from tests.handmade import TARGET

EAGER = frozenset(Capability) - RARELY_USED


@pytest.mark.parametrize("name", ["linear", "nhwc"])
def test_rarely_used_graphs_are_assembled_at_their_first_lookup_as_built_at_once(
        name: str) -> None:
    h = handmade.build(name)
    compiled = compile_model(h.model, layout=Layout(h.layout), target_layer=TARGET)
    graphs = compiled.graphs
    assert isinstance(graphs, Graphs)
    assert set(graphs) == set(Capability) and len(graphs) == len(Capability)
    assert compiled.missing(Capability) == {}
    assert graphs.assembled == EAGER  # membership and the plan asked for nothing more
    assert compiled.fixations_plan is not None
    split = compiled.split
    at_once = {
        Capability.GUIDED: autodiff.vjp(compiled.backbone, split.logits, [split.image],
                                        guided=True, prefix=GUIDED_PREFIX),
        Capability.FIXATIONS: fixation_plan.expose(h.model, compiled.fixations_plan),
    }
    for cap, graph in at_once.items():
        assert graphs[cap].SerializeToString() == graph.SerializeToString()
        assert graphs[cap] is graphs[cap]  # assembled once
    assert graphs.assembled == frozenset(Capability)


def test_a_backbone_op_without_a_guided_rule_is_named_before_anything_is_assembled() -> None:
    """``linear`` with a Softplus after the convolution: no VJP rule covers it, CNN
    Fixations passes through it."""
    model = handmade.build("linear").model
    for node in model.graph.node:
        if node.op_type == "Conv":
            node.output[0] = "conv_raw"
    model.graph.node.insert(1, helper.make_node("Softplus", ["conv_raw"], ["conv"],
                                                name="the_softplus"))
    compiled = compile_model(model, target_layer=TARGET)
    assert set(compiled.graphs) == EAGER | {Capability.FIXATIONS}
    assert compiled.graphs.assembled == EAGER  # type: ignore[attr-defined]
    assert compiled.missing(Capability) == {Capability.GUIDED: compiled.errors[Capability.GUIDED]}
    assert compiled.errors[Capability.GUIDED].startswith(
        "no gradient rule for op type(s) Softplus; nodes: Softplus (the_softplus). "
        "Supported ops: ")


def test_a_deferred_graph_the_checker_rejects_fails_at_every_lookup_assembled_once() -> None:
    compiled = compile_model(handmade.build("linear").model, target_layer=TARGET)
    broken = onnx.ModelProto()
    broken.CopyFrom(compiled.guided)  # type: ignore[arg-type]
    broken.graph.node[0].input[0] = "nowhere"  # read before anything writes it
    calls: list[int] = []

    def assemble() -> onnx.ModelProto:
        calls.append(1)
        return broken

    graphs = Graphs({Capability.BACKBONE: lambda: compiled.backbone,
                     Capability.HEAD: lambda: compiled.head, Capability.GUIDED: assemble},
                    deferred=[Capability.GUIDED])
    assert Capability.GUIDED in graphs and calls == []
    errors: list[BaseException] = []

    def look_up() -> None:
        try:
            graphs[Capability.GUIDED]
        except CompileError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=look_up) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1] and len(errors) == 3 and len({id(e) for e in errors}) == 1
    assert str(errors[0]).startswith("the generated guided graph is invalid: ")
    assert "nowhere" in str(errors[0])
    assert Capability.GUIDED in graphs and graphs.assembled == {Capability.BACKBONE,
                                                                Capability.HEAD}
    with pytest.raises(KeyError):
        graphs[Capability.FIXATIONS]


def test_an_eager_graph_the_checker_rejects_fails_the_compilation() -> None:
    compiled = compile_model(handmade.build("linear").model, target_layer=TARGET)
    broken = onnx.ModelProto()
    broken.CopyFrom(compiled.head)
    broken.graph.node[0].input[0] = "nowhere"
    with pytest.raises(CompileError, match="^the generated head graph is invalid: .*nowhere"):
        Graphs({Capability.BACKBONE: lambda: compiled.backbone,
                Capability.HEAD: lambda: broken}, deferred=RARELY_USED)
