"""Reverse-mode differentiation of ONNX graphs, emitted as ONNX.

``vjp`` takes a model and returns a new model that also reads a seed (the vector in the
vector-Jacobian product) shaped like one of its tensors and outputs the gradient of
<seed, tensor> with respect to chosen tensors. Rules live one op family per module and
meet their op types in ``registry.RULES``; a rule never needs to know where in the
network its node sits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import onnx
from onnx import helper

from service.errors import CompileError
from service.graph.autodiff.builder import PREFIX, VjpBuilder
from service.graph.autodiff.fold import fold_channel_scales
from service.graph.autodiff.registry import RULES, Rule
from service.graph.extract import value_info
from service.graph.onnx_graph import GraphIndex

SEED = f"{PREFIX}seed"


def grad_name(tensor: str, prefix: str = PREFIX) -> str:
    return f"{prefix}grad/{tensor}"


def rule(node: onnx.NodeProto) -> Rule | None:
    """The VJP rule of a node's op, or None. The rules are those of the standard ONNX ops:
    an op of another domain (com.microsoft's Gelu, a model-local function) may share a name
    with one but not its meaning."""
    if node.domain not in ("", "ai.onnx"):
        return None
    return RULES.get(node.op_type)


def op_name(node: onnx.NodeProto) -> str:
    """The op type, qualified by its domain when that is not the standard one."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


class Gradient:
    """A gradient graph whose rules have all run, assembled into a model on demand.

    :func:`differentiate` runs every rule (so it raises every CompileError the graph can
    raise); :meth:`model` only turns what they recorded into protos, which is most of the
    build's time and cannot fail on a missing rule.
    """

    def __init__(self, model: onnx.ModelProto, builder: VjpBuilder,
                 outputs: list[onnx.ValueInfoProto], seed: onnx.ValueInfoProto,
                 prefix: str) -> None:
        self._source = model
        self._builder = builder
        self._outputs = outputs
        self._seed = seed
        self._prefix = prefix

    def model(self) -> onnx.ModelProto:
        """The forward model with the gradient appended (a new proto each call), its
        per-channel gradient scales folded into the convolutions after them (fold.py)."""
        source, builder = self._source, self._builder
        graph = helper.make_graph(
            [*source.graph.node, *builder.node_protos()],
            f"{source.graph.name}_vjp",
            [*source.graph.input, self._seed],
            self._outputs,
            initializer=[*source.graph.initializer, *builder.initializer_protos()],
            value_info=builder.value_info(),
        )
        out = helper.make_model(graph, opset_imports=list(source.opset_import),
                                producer_name="medexplain")
        out.ir_version = source.ir_version
        return fold_channel_scales(out, self._prefix)


def differentiate(model: onnx.ModelProto, of: str, wrt: Sequence[str], *,
                  guided: bool = False, keep_outputs: bool = True,
                  prefix: str = PREFIX) -> Gradient:
    """The gradient of <seed, ``of``> with respect to ``wrt``, not yet assembled.

    Args:
        model: the forward model; not modified.
        of: the tensor being differentiated; a new graph input ``<prefix>seed`` of the same
            shape carries the vector of the vector-Jacobian product.
        wrt: tensors (graph inputs or intermediate) to differentiate with respect to; each
            becomes an output named ``grad_name(t)``.
        guided: apply the guided-backprop rule at rectifiers.
        keep_outputs: keep the model's own outputs beside the gradients.
        prefix: names of everything generated start with it; differentiating an already
            differentiated graph again needs a new one (e.g. ``xai/guided/``).

    Raises:
        CompileError: for an op without a rule (naming it and listing the supported ops),
            or when ``of`` does not depend on a ``wrt`` tensor.
    """
    index = GraphIndex(model)
    builder = VjpBuilder(index, guided=guided, prefix=prefix)
    seed = f"{prefix}seed"

    upstream = {id(n) for n in index.ancestors([of])}
    active: set[str] = set(wrt)
    path: list[onnx.NodeProto] = []
    for node in index.graph.node:
        if id(node) in upstream and any(i in active for i in node.input):
            active.update(o for o in node.output if o)
            path.append(node)
    if of not in active:
        raise CompileError(f"tensor {of!r} does not depend on {', '.join(wrt)}")

    missing = sorted({op_name(n) for n in path if rule(n) is None})
    if missing:
        where = [f"{op_name(n)} ({n.name or n.output[0]})" for n in path if op_name(n) in missing]
        raise CompileError(
            f"no gradient rule for op type(s) {', '.join(missing)}; nodes: "
            f"{', '.join(where[:10])}{' ...' if len(where) > 10 else ''}. "
            f"Supported ops: {', '.join(sorted(RULES))}"
        )

    grads: dict[str, list[str]] = defaultdict(list)
    grads[of].append(seed)

    def total(tensor: str) -> str | None:
        parts = grads.get(tensor)
        if not parts:
            return None
        if len(parts) > 1:
            grads[tensor] = [builder.add(parts, hint="acc")]
            builder.shaped_like(grads[tensor][0], tensor)
        return grads[tensor][0]

    for node in reversed(path):
        gys = [total(o) if o else None for o in node.output]
        if all(g is None for g in gys):
            continue
        needs = [bool(i) and i in active and not index.is_constant(i) for i in node.input]
        gxs = rule(node)(builder, node, gys, needs)  # type: ignore[misc]
        for inp, need, gx in zip(node.input, needs, gxs):
            if need and gx is not None:
                grads[inp].append(gx)
                builder.shaped_like(gx, inp)

    outputs: list[onnx.ValueInfoProto] = list(model.graph.output) if keep_outputs else []
    for tensor in wrt:
        g = total(tensor)
        if g is None:
            raise CompileError(f"tensor {of!r} does not depend on {tensor!r}")
        builder.rename(g, grad_name(tensor, prefix))
        info = value_info(index, tensor, batch=False)
        info.name = grad_name(tensor, prefix)
        outputs.append(info)

    seed_info = value_info(index, of, batch=False)
    seed_info.name = seed
    return Gradient(model, builder, outputs, seed_info, prefix)


def vjp(model: onnx.ModelProto, of: str, wrt: Sequence[str], *, guided: bool = False,
        keep_outputs: bool = True, prefix: str = PREFIX) -> onnx.ModelProto:
    """Append the gradient of <seed, ``of``> with respect to ``wrt`` to ``model``: the
    model of :func:`differentiate` (see there for the arguments and errors)."""
    return differentiate(model, of, wrt, guided=guided, keep_outputs=keep_outputs,
                         prefix=prefix).model()


__all__ = ["RULES", "SEED", "Gradient", "differentiate", "grad_name", "op_name", "rule",
           "vjp"]
