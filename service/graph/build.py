"""The model compiler: from one classifier to the graphs the methods run."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import onnx

from service.errors import CompileError
from service.graph import autodiff, tokens
from service.graph import fixations as fixation_plan
from service.graph.extract import extract
from service.graph.onnx_graph import GraphIndex, attr, without_weights
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
    POOLED_HEAD = "pooled_head"  # spatial means of the target activations (batched) → logits
    POOLED_HEAD_VJP = "pooled_head_vjp"  # those means, seed over logits → ∂/∂means

    @property
    def title(self) -> str:
        """How messages name the graph ("no head VJP graph: ...")."""
        return _TITLES[self]


_TITLES = {Capability.BACKBONE: "backbone graph", Capability.HEAD: "head graph",
           Capability.HEAD_VJP: "head VJP graph", Capability.GUIDED: "guided-backprop graph",
           Capability.FIXATIONS: "CNN Fixations plan",
           Capability.POOLED_HEAD: "pooled head graph",
           Capability.POOLED_HEAD_VJP: "pooled head VJP graph"}

# The graphs few requests use. Their runs hold every layer's activations (guided backprop
# keeps each forward output for its backward pass, CNN Fixations exposes them all:
# DenseNet-121 ~0.1-0.2 GB each). compile_model runs their builders' rules, so whether
# they can be built (and why not) is known when the model is loaded, but assembles them
# into protos (and checks them) at their first lookup in ``CompiledModel.graphs``: on
# DenseNet-121 that was 0.13 of the compilation's 0.22 s. The engine makes their sessions
# at their first run too (service.runtime.engine.Engine's ``lazy``).
RARELY_USED: frozenset[Capability] = frozenset({Capability.GUIDED, Capability.FIXATIONS})

# Makes one graph's proto from what its builder decided; raises no CompileError of the
# model's (the builder raised those), only the checker's on a generated graph.
Assembly = Callable[[], onnx.ModelProto]


class Graphs(Mapping[Capability, onnx.ModelProto]):
    """The graphs of one compiled model by capability; those in ``deferred`` are assembled
    and checked at their first lookup (once, whatever the threads), the others at once.

    Membership (``cap in graphs``, iterating the keys) never assembles: it is what the
    compiler decided. A deferred graph whose check fails raises that CompileError at every
    lookup. :meth:`release` drops a deferred graph's proto once a session holds what it
    needs of it; a later lookup assembles it again.

    Raises:
        CompileError: a generated graph the ONNX checker rejects (at once or at its first
            lookup).
    """

    def __init__(self, assemblies: Mapping[Capability, Assembly],
                 deferred: Iterable[Capability] = (), *, check: bool = True) -> None:
        later = frozenset(deferred)
        self._order = list(assemblies)
        self._deferred = {cap: make for cap, make in assemblies.items() if cap in later}
        self._failed: dict[Capability, CompileError] = {}
        self._lock = threading.Lock()
        # Graphs read back from the compile cache were checked when they were compiled.
        self._check = _checked if check else (lambda _cap, graph: graph)
        self._graphs = {cap: self._check(cap, make()) for cap, make in assemblies.items()
                        if cap not in later}

    def __getitem__(self, cap: Capability) -> onnx.ModelProto:
        graph = self._graphs.get(cap)
        if graph is not None:
            return graph
        with self._lock:
            if cap not in self._graphs and cap not in self._failed:
                make = self._deferred[cap]  # KeyError: not a graph of this model
                try:
                    self._graphs[cap] = self._check(cap, make())
                except CompileError as exc:
                    self._failed[cap] = exc
                    del self._deferred[cap]  # what it held (the source model, ...) goes
            if cap in self._failed:
                raise self._failed[cap]
            return self._graphs[cap]

    def release(self, cap: Capability) -> None:
        """Drop ``cap``'s proto if it is a deferred graph (else nothing).

        An ONNX Runtime session copies what it needs of a graph, and the guided graph's
        proto holds its flipped convolution kernels inline: torchvision's DenseNet-121,
        ResNet-50 and VGG-16 kept 56-76 MB each in it after its session was made. The
        assembler is kept (the source it reads holds its weights outside it, so it is
        small), and a later lookup, another engine's first session of the graph,
        assembles and checks the graph again.
        """
        with self._lock:
            if cap in self._deferred:
                self._graphs.pop(cap, None)

    def __contains__(self, cap: object) -> bool:
        return cap in self._order

    def __iter__(self) -> Iterator[Capability]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    @property
    def assembled(self) -> frozenset[Capability]:
        """The graphs whose protos exist now."""
        return frozenset(self._graphs)


def _checked(cap: Capability, graph: onnx.ModelProto) -> onnx.ModelProto:
    try:
        # The structure is what is generated; the weights are the source model's own,
        # and serialising them for the checker cost ~3 s per graph of a 500 MB network.
        onnx.checker.check_model(without_weights(graph))
    except onnx.checker.ValidationError as exc:
        raise CompileError(f"the generated {cap} graph is invalid: {exc}") from exc
    return graph


@dataclass(frozen=True)
class CompiledModel:
    """The graphs compiled from one classifier, keyed by capability.

    Attributes:
        split: where the classifier was cut.
        graphs: every graph that could be built; always BACKBONE and HEAD (from
            compile_model a :class:`Graphs`: the RARELY_USED ones assembled at their first
            lookup).
        errors: why each missing graph is missing (the op without a rule, ...): the model
            still serves every method that does not require it.
        _plan: the walk over the FIXATIONS graph, when the compiler has it; else
            :attr:`fixations_plan` derives it from the graph at its first use.
    """

    split: Split
    graphs: Mapping[Capability, onnx.ModelProto]
    errors: Mapping[Capability, str] = field(default_factory=dict)
    _plan: fixation_plan.FixationPlan | None = None

    def __post_init__(self) -> None:
        missing = {Capability.BACKBONE, Capability.HEAD} - set(self.graphs)
        if missing:
            raise CompileError(f"no {', '.join(sorted(missing))} graph")

    def release(self, cap: Capability) -> None:
        """Drop ``cap``'s proto where it can be assembled again (Graphs.release); a
        mapping of ready protos keeps it."""
        if isinstance(self.graphs, Graphs):
            self.graphs.release(cap)

    @property
    def fixations_plan(self) -> fixation_plan.FixationPlan | None:
        """The walk over the FIXATIONS graph; None for a model without one. A compile
        cache hit has none yet: it is derived from the graph (which that assembles) at its
        first use, i.e. at the first CNN Fixations request, not at load. Two threads that
        get here at once derive the same plan."""
        if self._plan is None and Capability.FIXATIONS in self.graphs:
            plan = fixation_plan.plan_from_graph(self.graphs[Capability.FIXATIONS], self.split)
            object.__setattr__(self, "_plan", plan)
        return self._plan

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
    index: GraphIndex  # the model's
    cut: Split
    layout: Layout
    backbone: onnx.ModelProto
    head: onnx.ModelProto
    fixations_plan: fixation_plan.FixationPlan | None = None
    pooled_head: onnx.ModelProto | None = None  # its one input is the spatial mean


def _head_vjp(src: _Source) -> Assembly:
    return autodiff.differentiate(src.head, src.cut.logits, [src.cut.target]).model


def _guided(src: _Source) -> Assembly:
    if src.cut.tokens is not None:
        raise CompileError(
            "guided backprop is defined for rectifier networks (it lets only positive "
            "gradient through each ReLU, where the ReLU's input was positive); a vision "
            "transformer's MLPs use GELU, which is not a rectifier, so the map would be the "
            "plain input gradient under another name"
        )
    return autodiff.differentiate(src.backbone, src.cut.logits, [src.cut.image], guided=True,
                                  prefix=GUIDED_PREFIX).model


def _fixations(src: _Source) -> Assembly:
    model, target = src.model, src.cut.target
    plan = src.fixations_plan = fixation_plan.build_plan(model, src.cut, src.layout,
                                                         index=src.index)
    return lambda: fixation_plan.expose(model, plan, target)


def _pooled_head(src: _Source) -> Assembly:
    """The head from its first step on, when that step is the mean of the target
    activations over their spatial axes and nothing else in the head reads them (the
    GlobalAveragePool → classifier of most CNNs). A masked copy's mean is then the image's
    mean less the masked position's share, so CRM runs this graph on H·W such means instead
    of the whole head on H·W copies of the activations (service.methods.crm)."""
    cut = src.cut
    if cut.context:
        raise CompileError("the head reads prefix tokens beside the activations")
    readers = [n for n in src.head.graph.node if cut.target in n.input]
    first = readers[0] if len(readers) == 1 else None
    if first is None or not _spatial_mean(first, src.index, cut.target_layout):
        what = ", ".join(sorted({n.op_type for n in readers})) or "nothing"
        raise CompileError(
            f"the head does not begin with the spatial mean of {cut.target!r} (it reads it "
            f"with {what}): CRM re-evaluates the whole head on H·W masked copies")
    pooled = first.output[0]
    shape = src.index.shape(pooled)
    if shape is None or not all(isinstance(d, int) for d in shape[1:]) or \
            math.prod(shape[1:]) != cut.target_shape[0]:  # type: ignore[arg-type]
        raise CompileError(f"the spatial mean {pooled!r} has no static shape of one value "
                           "per channel")
    graph = src.pooled_head = extract(src.index, [pooled], [cut.logits], name="pooled_head")
    return lambda: graph


def _pooled_head_vjp(src: _Source) -> Assembly:
    """The pooled head's VJP: with the head reading the activations only through their
    spatial mean, ∂S/∂A_k(i, j) is ∂S/∂mean_k / HW at every (i, j), so Grad-CAM's weights
    come from this graph on R mean vectors instead of the head's VJP on R copies of A."""
    if src.pooled_head is None:
        raise CompileError("no pooled head")
    mean = src.pooled_head.graph.input[0].name
    return autodiff.differentiate(src.pooled_head, src.cut.logits, [mean]).model


def _spatial_mean(node: onnx.NodeProto, index: GraphIndex, layout: Layout) -> bool:
    """Whether ``node`` averages its 4-D input over exactly the spatial axes."""
    spatial = {1, 2} if layout is Layout.NHWC else {2, 3}
    if node.op_type == "GlobalAveragePool":
        return layout is Layout.NCHW
    if node.op_type != "ReduceMean":
        return False
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = index.constant(node.input[1])
    if axes is None:
        return False
    return {int(a) % 4 for a in list(axes)} == spatial  # type: ignore[call-overload]


# The optional graphs, each built by one function that raises CompileError when some op has
# no rule and otherwise returns the graph's assembly (everything that can fail on the
# model's ops runs in the builder, before it returns). A method needing a new graph adds a
# Capability and its builder here.
BUILDERS: dict[Capability, Callable[[_Source], Assembly]] = {
    Capability.HEAD_VJP: _head_vjp,
    Capability.GUIDED: _guided,
    Capability.FIXATIONS: _fixations,
    Capability.POOLED_HEAD: _pooled_head,
    Capability.POOLED_HEAD_VJP: _pooled_head_vjp,  # after POOLED_HEAD, which it differentiates
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
    The RARELY_USED graphs are assembled at their first lookup (see :class:`Graphs`).

    Raises:
        CompileError: when the graph cannot be cut, or a generated graph is invalid (a
            RARELY_USED one: at its first lookup).
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
    assemblies: dict[Capability, Assembly] = {Capability.BACKBONE: lambda: backbone,
                                              Capability.HEAD: lambda: head}
    errors: dict[Capability, str] = {}
    source = _Source(model, index, cut, layout, backbone, head)
    for capability, build in BUILDERS.items():
        try:
            assemblies[capability] = build(source)
        except CompileError as exc:
            # Only the methods requiring this graph are lost; predictions and CRM run the
            # forward graphs, which ONNX Runtime runs whatever the ops.
            errors[capability] = str(exc)
    return CompiledModel(cut, Graphs(assemblies, deferred=RARELY_USED), errors,
                         source.fixations_plan)
