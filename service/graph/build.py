"""The model compiler: from one classifier to the graphs the methods run."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import onnx

from service.errors import CompileError
from service.graph import autodiff, tokens
from service.graph import fixations as fixation_plan
from service.graph.extract import extract
from service.graph.onnx_graph import GraphIndex, without_weights
from service.graph.specialise import specialise
from service.graph.target import Split, split
from service.models.spec import Layout

GUIDED_PREFIX = "xai/guided/"


class Capability(StrEnum):
    """A graph the compiler makes of a classifier; methods declare the ones they require.

    The backbone and the head are always built (a model that cannot be cut is refused);
    the others may be missing, with the reason in ``CompiledModel.errors``.
    """

    BACKBONE = "backbone"    # image → (target activations, logits[, context])
    HEAD = "head"            # target activations (batched)[, context] → logits
    HEAD_VJP = "head_vjp"    # target activations, seed over logits → ∂/∂activations
    GUIDED = "guided"        # image, seed over logits → guided ∂/∂image (+ activations, logits)
    FIXATIONS = "fixations"  # image → logits plus every tensor CNN Fixations reads

    @property
    def title(self) -> str:
        """How messages name the graph ("no head VJP graph: ...")."""
        return _TITLES[self]


_TITLES = {Capability.BACKBONE: "backbone graph", Capability.HEAD: "head graph",
           Capability.HEAD_VJP: "head VJP graph", Capability.GUIDED: "guided-backprop graph",
           Capability.FIXATIONS: "CNN Fixations plan"}


@dataclass(frozen=True)
class CompiledModel:
    """The graphs compiled from one classifier, keyed by capability.

    Attributes:
        split: where the classifier was cut.
        graphs: every graph that could be built; always BACKBONE and HEAD.
        errors: why each missing graph is missing (the op without a rule, ...): the model
            still serves every method that does not require it.
        fixations_plan: the walk over the FIXATIONS graph; rebuilt from the graph when not
            given (e.g. by the compile cache).
    """

    split: Split
    graphs: Mapping[Capability, onnx.ModelProto]
    errors: Mapping[Capability, str] = field(default_factory=dict)
    fixations_plan: fixation_plan.FixationPlan | None = None

    def __post_init__(self) -> None:
        missing = {Capability.BACKBONE, Capability.HEAD} - set(self.graphs)
        if missing:
            raise CompileError(f"no {', '.join(sorted(missing))} graph")
        fixations = self.graphs.get(Capability.FIXATIONS)
        if fixations is not None and self.fixations_plan is None:
            plan = fixation_plan.plan_from_graph(fixations, self.split)
            object.__setattr__(self, "fixations_plan", plan)

    @property
    def available(self) -> frozenset[Capability]:
        return frozenset(self.graphs)

    def missing(self, requires: Iterable[Capability]) -> dict[Capability, str]:
        """``requires − available``, each with the compiler's reason, in Capability order."""
        wanted = set(requires)
        return {cap: self.errors.get(cap, "not compiled") for cap in Capability
                if cap in wanted and cap not in self.graphs}

    # Named views of ``graphs`` and ``errors`` for readers that want one graph.
    @property
    def backbone(self) -> onnx.ModelProto:
        return self.graphs[Capability.BACKBONE]

    @property
    def head(self) -> onnx.ModelProto:
        return self.graphs[Capability.HEAD]

    @property
    def head_vjp(self) -> onnx.ModelProto | None:
        return self.graphs.get(Capability.HEAD_VJP)

    @property
    def guided(self) -> onnx.ModelProto | None:
        return self.graphs.get(Capability.GUIDED)

    @property
    def fixations(self) -> onnx.ModelProto | None:
        return self.graphs.get(Capability.FIXATIONS)

    @property
    def head_vjp_error(self) -> str | None:
        return self.errors.get(Capability.HEAD_VJP)

    @property
    def guided_error(self) -> str | None:
        return self.errors.get(Capability.GUIDED)

    @property
    def fixations_error(self) -> str | None:
        return self.errors.get(Capability.FIXATIONS)


@dataclass
class _Source:
    """What the optional graphs are built from; builders may leave products beside them."""

    model: onnx.ModelProto
    cut: Split
    layout: Layout
    backbone: onnx.ModelProto
    head: onnx.ModelProto
    fixations_plan: fixation_plan.FixationPlan | None = None


def _head_vjp(src: _Source) -> onnx.ModelProto:
    return autodiff.vjp(src.head, src.cut.logits, [src.cut.target])


def _guided(src: _Source) -> onnx.ModelProto:
    if src.cut.tokens is not None:
        raise CompileError(
            "guided backprop is defined for rectifier networks (it lets only positive "
            "gradient through each ReLU, where the ReLU's input was positive); a vision "
            "transformer's MLPs use GELU, which is not a rectifier, so the map would be the "
            "plain input gradient under another name"
        )
    return autodiff.vjp(src.backbone, src.cut.logits, [src.cut.image], guided=True,
                        prefix=GUIDED_PREFIX)


def _fixations(src: _Source) -> onnx.ModelProto:
    src.fixations_plan = fixation_plan.build_plan(src.model, src.cut, src.layout)
    return fixation_plan.expose(src.model, src.fixations_plan)


# The optional graphs, each built by one function that raises CompileError when some op has
# no rule. A method needing a new graph adds a Capability and its builder here.
BUILDERS: dict[Capability, Callable[[_Source], onnx.ModelProto]] = {
    Capability.HEAD_VJP: _head_vjp,
    Capability.GUIDED: _guided,
    Capability.FIXATIONS: _fixations,
}


def compile_model(model: onnx.ModelProto, *, layout: Layout = Layout.NCHW,
                  activation: str | None = None,
                  target_layer: str | None = None,
                  input_shape: Sequence[int] | None = None) -> CompiledModel:
    """Cut ``model`` at its target layer and differentiate its head.

    Args:
        model: the classifier.
        layout: the layout of the image input (model.toml ``input.layout``).
        activation: model.toml ``output.activation``; must agree with a final
            Sigmoid/Softmax found in the graph.
        target_layer: model.toml ``explain.target_layer``, or None to auto-detect.
        input_shape: the image input's full shape (batch of one first, in ``layout``), from
            model.toml's input size and channels; when given, the model is specialised to it
            first (:func:`service.graph.specialise.specialise`: shape arithmetic folded,
            fixed-batch reshapes made batch-agnostic).

    A graph that cannot be built (an op without a rule) is left out of ``graphs`` with the
    reason in ``errors``; the model keeps the forward graphs, hence predictions and CRM.

    Raises:
        CompileError: when the graph cannot be cut, or a generated graph is invalid.
    """
    if input_shape is not None:
        model = specialise(model, input_shape)
    index = GraphIndex(model)
    cut = split(index, layout=layout, target_layer=target_layer)
    grid = cut.token_grid
    if grid is not None:
        # The target is a transformer's token grid: made a tensor of the graph (GRID, with
        # the prefix tokens as the head's second input), so every graph below is cut there.
        model = tokens.regrid(model, grid)
        index = GraphIndex(model)
    if activation is not None and cut.graph_activation != "none" and (
        activation != cut.graph_activation
    ):
        raise CompileError(
            f"model.toml says output.activation = {activation!r} but the graph ends in "
            f"{cut.graph_activation}"
        )
    context = [cut.context] if cut.context else []
    backbone = extract(index, [cut.image], [cut.target, cut.logits, *context],
                       name="backbone", batch=False)
    head = extract(index, [cut.target, *context], [cut.logits], name="head")
    graphs = {Capability.BACKBONE: backbone, Capability.HEAD: head}
    errors: dict[Capability, str] = {}
    source = _Source(model, cut, layout, backbone, head)
    for capability, build in BUILDERS.items():
        try:
            graphs[capability] = build(source)
        except CompileError as exc:
            # Only the methods requiring this graph are lost; predictions and CRM run the
            # forward graphs, which ONNX Runtime runs whatever the ops.
            errors[capability] = str(exc)
    compiled = CompiledModel(cut, graphs, errors, source.fixations_plan)
    for name, graph in compiled.graphs.items():
        try:
            # The structure is what is generated; the weights are the source model's own,
            # and serialising them for the checker cost ~3 s per graph of a 500 MB network.
            onnx.checker.check_model(without_weights(graph))
        except onnx.checker.ValidationError as exc:
            raise CompileError(f"the generated {name} graph is invalid: {exc}") from exc
    return compiled
