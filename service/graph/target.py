"""Find the logits and the explanation target layer, and check the cut between them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import onnx

from service.errors import CompileError
from service.graph.extract import shape_from_cut
from service.graph.onnx_graph import GraphIndex, attr
from service.graph.tokens import GRID, PREFIX, TokenGrid
from service.models.spec import Layout

# Output activations the compiler recognises at the end of a graph.
FINAL_ACTIVATIONS = {"Sigmoid": "sigmoid", "Softmax": "softmax"}

# Ops that read their 4-D input as NCHW whatever the model's declared layout.
_CHANNEL_FIRST_OPS = {
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
    "BatchNormalization", "InstanceNormalization", "LpPool", "GlobalLpPool",
}

# Leading tokens of a transformer that are not patches: timm has at most a class token, a
# distillation token and 8 register tokens.
MAX_PREFIX_TOKENS = 16
# Ops that mix tokens with weights computed from the image: attention's Q·Kᵀ and A·V.
_MIXING_OPS = {"MatMul", "Einsum"}


@dataclass(frozen=True)
class Split:
    """Where the compiler cuts a classifier.

    Attributes:
        image: the graph input fed with the image.
        scores: the graph output.
        logits: the tensor the scores are computed from (scores itself if the graph has no
            final activation).
        graph_activation: "sigmoid", "softmax" or "none": what the graph applies to logits.
        target: the target layer's tensor name.
        target_layout: how the target tensor stores its axes.
        target_shape: (channels, height, width) of the target layer.
        tokens: for a transformer, the (B, N, C) token tensor the target is the patch grid
            of (``target`` is then :data:`service.graph.tokens.GRID`, added by
            :func:`service.graph.tokens.regrid`); None for a CNN.
        prefix_tokens: how many leading tokens of ``tokens`` are not patches (class,
            distillation, register tokens); the head reads them as ``context``.
    """

    image: str
    scores: str
    logits: str
    graph_activation: str
    target: str
    target_layout: Layout
    target_shape: tuple[int, int, int]
    tokens: str | None = None
    prefix_tokens: int = 0

    @property
    def context(self) -> str | None:
        """The tensor the head reads beside the target (the prefix tokens), or None."""
        return PREFIX if self.tokens is not None and self.prefix_tokens else None

    @property
    def layer(self) -> str:
        """The source model's tensor the target is: what ``explain.target_layer`` names."""
        return self.tokens or self.target

    @property
    def token_grid(self) -> TokenGrid | None:
        if self.tokens is None:
            return None
        c, h, w = self.target_shape
        return TokenGrid(self.tokens, self.prefix_tokens, c, h, w)


def find_logits(index: GraphIndex) -> tuple[str, str, str]:
    """Return (scores output, logits tensor, graph activation)."""
    if not index.graph_outputs:
        raise CompileError("the model has no outputs")
    scores = index.graph_outputs[0]
    node = index.producer.get(scores)
    if node is not None and node.op_type in FINAL_ACTIVATIONS:
        return scores, node.input[0], FINAL_ACTIVATIONS[node.op_type]
    return scores, scores, "none"


def tensor_layout(index: GraphIndex, name: str, default: Layout) -> Layout:
    """Whether a 4-D tensor is NCHW or NHWC, judged by the ops around it."""
    for consumer in index.consumers.get(name, []):
        if consumer.op_type in _CHANNEL_FIRST_OPS:
            return Layout.NCHW
        if consumer.op_type == "Transpose" and list(attr(consumer, "perm", [])) == [0, 3, 1, 2]:
            return Layout.NHWC
        if consumer.op_type in ("ReduceMean", "ReduceMax", "ReduceSum"):
            axes = attr(consumer, "axes")
            if axes is None and len(consumer.input) > 1:
                value = index.constant(consumer.input[1])
                axes = None if value is None else value.reshape(-1).tolist()
            if axes is not None:
                norm = sorted(int(a) % 4 for a in axes)  # type: ignore[union-attr]
                if norm == [1, 2]:
                    return Layout.NHWC
                if norm == [2, 3]:
                    return Layout.NCHW
    producer = index.producer.get(name)
    if producer is not None:
        if producer.op_type in _CHANNEL_FIRST_OPS:
            return Layout.NCHW
        if producer.op_type == "Transpose" and list(attr(producer, "perm", [])) == [0, 2, 3, 1]:
            return Layout.NHWC
    return default


def _looks_like_an_image(shape: tuple[object, ...] | None) -> bool:
    """4-D with at least two axes after the batch that are not 1 (or unknown): an image,
    not a broadcast constant such as a (1, 1, 1, 3) mean."""
    if shape is None or len(shape) != 4:
        return False
    return sum(1 for d in shape[1:] if not (isinstance(d, int) and d == 1)) >= 2


def detect_layout(model: onnx.ModelProto) -> Layout | None:
    """The image input's layout as the graph shows it; None when it does not tell.

    The first ops on the image decide (a Conv reads NCHW; a Transpose to channels-first
    means NHWC); else its declared shape: channels (1 or 3) on axis 1 or on axis 3 but not
    both. Read from the proto alone, no shape inference: it runs before compiling.
    """
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers and _looks_like_an_image(
        tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
              for d in i.type.tensor_type.shape.dim))]
    if len(inputs) != 1:
        return None
    image = inputs[0]
    for node in model.graph.node:
        if image.name not in node.input:
            continue
        if node.op_type in _CHANNEL_FIRST_OPS:
            return Layout.NCHW
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [])
            if perm == [0, 3, 1, 2]:
                return Layout.NHWC
            if perm == [0, 1, 2, 3]:
                return Layout.NCHW
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in image.type.tensor_type.shape.dim]
    if len(dims) != 4:
        return None
    first, last = dims[1] in (1, 3), dims[3] in (1, 3)
    if first != last:
        return Layout.NCHW if first else Layout.NHWC
    return None


def _chw(shape: tuple[object, ...], layout: Layout) -> tuple[int, int, int] | None:
    dims = shape[1:]
    if layout is Layout.NHWC:
        dims = (dims[2], dims[0], dims[1])
    if not all(isinstance(d, int) for d in dims):
        return None
    return dims  # type: ignore[return-value]


def _is_cut(index: GraphIndex, tensor: str, logits: str) -> bool:
    """True when logits can be computed from ``tensor`` and constants alone.

    A Shape of the image reads only its sizes, which the cut tensor's batch and the
    image's static sizes give (see :func:`service.graph.extract.shape_from_cut`): torch's
    dynamo exporter indexes flattened tensors with positions computed from the image's
    batch size, so without this no tensor would cut ConvNeXt.
    """
    inputs = set(index.graph_inputs)
    for node in index.ancestors([logits], stop=[tensor]):
        if shape_from_cut(index, node, tensor) is not None:
            continue
        if any(i in inputs for i in node.input):
            return False
    return True


def split(index: GraphIndex, *, layout: Layout, target_layer: str | None = None) -> Split:
    """Locate image, logits and target layer.

    The target layer is ``target_layer`` when given, else the last 4-D activation on the
    path to the logits whose spatial size is greater than 1 and through which every path
    from the image passes; for a vision transformer, whose last such activation is its
    patch embedding, the patch grid of a token tensor further on (see
    :func:`_token_split`). ``target_layer`` may name such a token tensor too.

    Raises:
        CompileError: when the graph has several image inputs, when no target layer
            qualifies, or when the named one is neither a 4-D cut of the graph nor a token
            tensor that is one.
    """
    if len(index.graph_inputs) != 1:
        images = [n for n in index.graph_inputs if _looks_like_an_image(index.shape(n))]
        others = [n for n in index.graph_inputs if n not in images]
        if len(images) == 1 and others:
            raise CompileError(
                f"the graph has inputs without values besides the image {images[0]!r}: "
                f"{', '.join(others)}. Keras 3's model.export(format=\"onnx\") writes the "
                "constants of Normalization (and similar) layers that way, and the file "
                "does not hold them. Export with tf2onnx (tf2onnx.convert.from_keras), or "
                "remove the Normalization layer before exporting and put its mean and std "
                "into model.toml's [input]"
            )
        raise CompileError(
            f"expected one image input, the graph has {len(index.graph_inputs)}: "
            f"{', '.join(index.graph_inputs)}"
        )
    image = index.graph_inputs[0]
    scores, logits, activation = find_logits(index)

    def describe(name: str) -> tuple[Layout, tuple[int, int, int]] | None:
        shape = index.shape(name)
        if shape is None or len(shape) != 4:
            return None
        tl = tensor_layout(index, name, layout)
        chw = _chw(shape, tl)
        return None if chw is None else (tl, chw)

    if target_layer is not None:
        if target_layer not in index.producer:
            raise CompileError(f"target layer {target_layer!r} is not a tensor of the graph")
        shape = index.shape(target_layer)
        if shape is not None and len(shape) == 3:
            last = _last_grid(index, describe, upto=target_layer, logits=logits)
            found = None if last is None else _token_split(
                index, Split(image, scores, logits, activation, *last), only=target_layer)
            if found is None:
                raise CompileError(
                    f"target layer {target_layer!r} is not a token tensor (B, prefix + h·w, C) "
                    "of a patch grid h×w (a 4-D activation before it), with static sizes and "
                    f"at most {MAX_PREFIX_TOKENS} prefix tokens, that separates the image "
                    "from the logits"
                )
            return found
        info = describe(target_layer)
        if info is None:
            raise CompileError(
                f"target layer {target_layer!r} is not a 4-D tensor with static channel and "
                "spatial sizes, nor a transformer's 3-D token tensor"
            )
        if not _is_cut(index, target_layer, logits):
            raise CompileError(
                f"target layer {target_layer!r} does not separate the image from the logits: "
                "some path to the logits goes around it"
            )
        return Split(image, scores, logits, activation, target_layer, *info)

    last = _last_grid(index, describe, upto=logits, logits=logits)
    if last is None:
        raise CompileError(
            "found no 4-D activation with spatial size > 1 that separates the image from the "
            "logits; name one with explain.target_layer in model.toml"
        )
    # A transformer's last 4-D activation is its patch embedding; its target is the token
    # grid further on (a CNN has no token tensor after its last 4-D activation).
    grid = Split(image, scores, logits, activation, *last)
    return _token_split(index, grid) or grid


def _last_grid(index: GraphIndex,
               describe: Callable[[str], tuple[Layout, tuple[int, int, int]] | None], *,
               upto: str, logits: str) -> tuple[str, Layout, tuple[int, int, int]] | None:
    """(name, layout, (C, H, W)) of the last 4-D activation computing ``upto`` whose
    spatial size is greater than 1 and through which every path from the image to the
    logits passes."""
    for node in reversed(index.ancestors([upto])):
        for out in node.output:
            info = describe(out) if out else None
            if info is None or info[1][1] * info[1][2] <= 1:
                continue
            if _is_cut(index, out, logits):
                return out, *info
    return None


def _token_split(index: GraphIndex, grid: Split, only: str | None = None) -> Split | None:
    """The transformer target after the patch grid ``grid`` (the patch embedding's Conv
    output, (B, C, h, w)), or None when no token tensor follows it.

    A token tensor is (B, prefix + h·w, C) with static sizes and the grid's C (the patch
    embedding projects to the token width; a CNN's (B, C, H·W) flatten has H·W there),
    computed from the grid, and a cut of the graph. The one picked is the last that feeds
    the last token-mixing op (attention's A·V: a MatMul of two image-dependent tensors):
    the residual stream entering the last block. Later token tensors do not do: after the
    last attention every op is per token up to the class-token select, so the logits would
    not depend on any patch token there (pytorch-grad-cam's advice for ViTs: a layer before
    the last attention). pgc's usual pick, ``blocks[-1].norm1``'s output, is no cut (the
    residual goes around it); the block input it normalises is, and its gradient is the
    same attention-borne one, taken through that LayerNorm. Without such a MatMul, the last
    token tensor is picked.

    ``only``: check that tensor alone (``explain.target_layer``).
    """
    if grid.target_layout is not Layout.NCHW:
        return None
    channels, h, w = grid.target_shape
    batch = (index.shape(grid.target) or (None,))[0]
    after = index.descendants([grid.target])
    upstream = index.ancestors([grid.logits])
    dynamic = index.descendants([grid.image])
    mixing = [n for n in upstream if n.op_type in _MIXING_OPS
              and any(i in after for i in n.input)
              and sum(1 for i in n.input if i in dynamic) >= 2]
    feeding = None
    if mixing:
        last = mixing[-1]
        feeding = {o for n in index.ancestors(last.input) for o in n.output} | set(last.input)
    names = [only] if only is not None else [o for n in reversed(upstream) for o in n.output]
    for name in names:
        if not name or name == grid.target or name not in after:
            continue
        if only is None and feeding is not None and name not in feeding:
            continue
        shape = index.shape(name)
        if shape is None or len(shape) != 3 or not all(isinstance(d, int) for d in shape[1:]):
            continue
        if shape[0] != batch and (isinstance(shape[0], int) or isinstance(batch, int)):
            continue
        n, c = int(shape[1]), int(shape[2])  # type: ignore[arg-type]
        if c != channels or not 0 <= n - h * w <= MAX_PREFIX_TOKENS:
            continue
        if _is_cut(index, name, grid.logits):
            return replace(grid, target=GRID, target_layout=Layout.NCHW,
                           target_shape=(c, h, w), tokens=name, prefix_tokens=n - h * w)
    return None
