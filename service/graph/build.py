"""The model compiler: from one classifier to the graphs the methods run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx

from service.errors import CompileError
from service.graph import autodiff
from service.graph import fixations as fixation_plan
from service.graph.extract import extract
from service.graph.onnx_graph import GraphIndex, without_weights
from service.graph.specialise import specialise
from service.graph.target import Split, split
from service.models.spec import Layout

GUIDED_PREFIX = "xai/guided/"


@dataclass(frozen=True)
class CompiledModel:
    """The graphs compiled from one classifier.

    Attributes:
        split: where the classifier was cut.
        backbone: image → (target activations, logits).
        head: target activations (batched) → logits.
        head_vjp: target activations, seed over logits → gradient w.r.t. the activations,
            plus the logits; None when some op of the head has no gradient rule
            (``head_vjp_error`` says which): the model still predicts and serves CRM.
        guided: image, seed over logits → guided-backprop gradient w.r.t. the image, plus
            the target activations and logits; None when some op of the backbone has no
            gradient rule (``guided_error`` says which).
        fixations: image → logits plus the activations CNN Fixations reads; None when some
            op on the path has no back-tracking rule (``fixations_error`` says which).
        fixations_plan: the walk over ``fixations``; rebuilt from the graph when not given
            (e.g. by the compile cache).
        head_vjp_error: why there is no ``head_vjp``.
    """

    split: Split
    backbone: onnx.ModelProto
    head: onnx.ModelProto
    head_vjp: onnx.ModelProto | None
    guided: onnx.ModelProto | None = None
    guided_error: str | None = None
    fixations: onnx.ModelProto | None = None
    fixations_error: str | None = None
    fixations_plan: fixation_plan.FixationPlan | None = None
    head_vjp_error: str | None = None

    def __post_init__(self) -> None:
        if self.fixations is not None and self.fixations_plan is None:
            plan = fixation_plan.plan_from_graph(self.fixations, self.split)
            object.__setattr__(self, "fixations_plan", plan)

    def graphs(self) -> dict[str, onnx.ModelProto]:
        graphs = {"backbone": self.backbone, "head": self.head}
        if self.head_vjp is not None:
            graphs["head_vjp"] = self.head_vjp
        if self.guided is not None:
            graphs["guided"] = self.guided
        if self.fixations is not None:
            graphs["fixations"] = self.fixations
        return graphs


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

    A graph that cannot be differentiated (an op without a rule) leaves its graph None
    with the reason beside it; the model keeps the forward graphs, hence predictions and CRM.

    Raises:
        CompileError: when the graph cannot be cut, or a generated graph is invalid.
    """
    if input_shape is not None:
        model = specialise(model, input_shape)
    index = GraphIndex(model)
    cut = split(index, layout=layout, target_layer=target_layer)
    if activation is not None and cut.graph_activation != "none" and (
        activation != cut.graph_activation
    ):
        raise CompileError(
            f"model.toml says output.activation = {activation!r} but the graph ends in "
            f"{cut.graph_activation}"
        )
    backbone = extract(index, [cut.image], [cut.target, cut.logits], name="backbone",
                       batch=False)
    head = extract(index, [cut.target], [cut.logits], name="head")
    head_vjp: onnx.ModelProto | None = None
    head_vjp_error = None
    try:
        head_vjp = autodiff.vjp(head, cut.logits, [cut.target])
    except CompileError as exc:
        # Only Grad-CAM (and Guided Grad-CAM) differentiate the head; predictions and CRM
        # run the forward graphs, which ONNX Runtime runs whatever the ops.
        head_vjp_error = str(exc)
    guided: onnx.ModelProto | None = None
    guided_error = None
    try:
        guided = autodiff.vjp(backbone, cut.logits, [cut.image], guided=True,
                              prefix=GUIDED_PREFIX)
    except CompileError as exc:
        # Grad-CAM and CRM need only the head; the model still serves without guided maps.
        guided_error = str(exc)
    fixations: onnx.ModelProto | None = None
    plan: fixation_plan.FixationPlan | None = None
    fixations_error = None
    try:
        plan = fixation_plan.build_plan(model, cut, layout)
        fixations = fixation_plan.expose(model, plan)
    except CompileError as exc:
        # Only CNN Fixations needs it; the model still serves every other method.
        fixations_error = str(exc)
    compiled = CompiledModel(cut, backbone, head, head_vjp, guided, guided_error, fixations,
                             fixations_error, plan, head_vjp_error=head_vjp_error)
    for name, graph in compiled.graphs().items():
        try:
            # The structure is what is generated; the weights are the source model's own,
            # and serialising them for the checker cost ~3 s per graph of a 500 MB network.
            onnx.checker.check_model(without_weights(graph))
        except onnx.checker.ValidationError as exc:
            raise CompileError(f"the generated {name} graph is invalid: {exc}") from exc
    return compiled
