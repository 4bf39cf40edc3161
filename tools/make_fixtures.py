"""Build the model zoo that tests/graph/test_zoo.py checks our ONNX gradients against.

Usage:
    .venv/bin/python tools/make_fixtures.py [--out tests/data/zoo]
    .venv/bin/python tools/make_fixtures.py --bench [--bench-out /tmp/densenet121.onnx]

Zoo mode writes, per architecture, a small CNN classifier with seeded random weights
(``<name>.onnx``, float32, exported with ``torch.onnx.export(dynamo=False, opset 17)`` in
eval mode, input ``image``, output ``logits``, dynamic batch axis ``N``), reference values
computed by torch autograd on a float64 copy of the same network (``<name>.npz``), and a
``manifest.json`` describing them. The tests never import torch: the references are all
they get from it.

npz contents (K classes; A the target-layer activation, channel-first even for NHWC):
    x             the input as fed to ONNX, (1, *input shape), float32
    logits        (K,), pre-activation even when the graph ends in Sigmoid/Softmax
    target        A, (C, H, W)
    grad_target   dlogit_k/dA, (K, C, H, W)
    gradcam       ReLU(sum_c mean_ij(dlogit_k/dA_c) A_c), (K, H, W)
    grad_input    dlogit_k/dx, (K, *x.shape[1:])
    guided_input  guided backprop dlogit_k/dx, (K, *x.shape[1:]): at every rectifier (ReLU,
                  ReLU6, LeakyReLU) the backward is ReLU(incoming) * f'(input), i.e. only
                  positive gradient where the input was > 0 (and < 6 for ReLU6); HardSwish,
                  HardSigmoid, SiLU and Sigmoid keep their true derivative.

The input ``x`` of each model is drawn from a seeded search that keeps every kink input
(ReLU, LeakyReLU, Clip at 0 and 6, HardSwish/HardSigmoid at +-3) far enough from its kink
that float32 rounding cannot move it across (see ``MARGIN``): otherwise one unit flipping
between float32 ONNX Runtime and the float64 reference would change the gradient by far
more than the tests' 1e-4 tolerance.

Bench mode writes a DenseNet-121-sized classifier (growth 32, blocks 6-12-24-16,
224x224, random weights) for speed benchmarks; it is not committed.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.graph.onnx_graph import GraphIndex
from service.graph.target import split
from service.models.spec import Layout

OPSET = 17
# A kink input must lie at least MARGIN * max|tensor| from its kink (float64). The float32
# error of ONNX Runtime on these networks is below 1.5e-6 of max|tensor| (measured by
# check_onnx, which also asserts that no kink input actually changed side).
MARGIN = 5e-6
MAX_TRIES = 200


# --- activations that know guided backprop ------------------------------------------------


class _GuidedRectifier(torch.autograd.Function):
    """Forward as the rectifier; backward ReLU(gy) * [low < x < high] (guided backprop)."""

    @staticmethod
    def forward(ctx, x, fn, high):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x)
        ctx.high = high
        return fn(x)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        mask = x > 0
        if ctx.high is not None:
            mask = mask & (x < ctx.high)
        return gy.clamp(min=0) * mask.to(gy.dtype), None, None


# kind -> (function, kinks of its derivative, upper bound of the guided mask for rectifiers)
_ACTS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], tuple[float, ...], object]] = {
    "relu": (F.relu, (0.0,), None),
    "relu6": (F.relu6, (0.0, 6.0), 6.0),
    "leaky": (lambda x: F.leaky_relu(x, 0.1), (0.0,), None),
    "hardswish": (F.hardswish, (-3.0, 3.0), None),
    "hardsigmoid": (F.hardsigmoid, (-3.0, 3.0), None),
    "silu": (F.silu, (), None),
    "sigmoid": (torch.sigmoid, (), None),
}
RECTIFIERS = ("relu", "relu6", "leaky")
# ONNX op the exporter emits for each kink activation (SiLU becomes Sigmoid + Mul).
ONNX_OP = {"relu": "Relu", "relu6": "Clip", "leaky": "LeakyRelu", "hardswish": "HardSwish",
           "hardsigmoid": "HardSigmoid"}


class Act(nn.Module):
    """A pointwise activation; ``guided`` switches rectifiers to the guided backward and
    ``record`` (a list) collects the inputs of activations with kinks, in call order."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.guided = False
        self.record: list[tuple[str, torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn, kinks, high = _ACTS[self.kind]
        if self.record is not None and kinks:
            self.record.append((self.kind, x.detach()))
        if self.guided and self.kind in RECTIFIERS:
            return _GuidedRectifier.apply(x, fn, high)
        return fn(x)

    def extra_repr(self) -> str:
        return self.kind


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, act: str | None = "relu",
            groups: int = 1, padding: int | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2 if padding is None else padding,
                  groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(Act(act))
    return nn.Sequential(*layers)


class ZooNet(nn.Module):
    """A classifier: ``logits`` is the network up to the logits, ``forward`` adds ``final``.

    ``self.target`` is an nn.Identity at the explanation target layer (it exports to
    nothing) so a forward hook can grab the tensor our detector picks.
    """

    final = "none"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.logits(x)
        if self.final == "sigmoid":
            return torch.sigmoid(z)
        if self.final == "softmax":
            return torch.softmax(z, dim=-1)
        return z


# --- 1. resnet ----------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, act=None)
        self.shortcut = (conv_bn(cin, cout, 1, stride, act=None)
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu = Act("relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet(ZooNet):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 7, 2), nn.MaxPool2d(3, 2, 1))
        self.layers = nn.Sequential(
            BasicBlock(16, 16), BasicBlock(16, 24, 2), BasicBlock(24, 24), BasicBlock(24, 32, 2),
        )
        self.target = nn.Identity()
        self.fc = nn.Linear(32, classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        a = self.target(self.layers(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(a, 1), 1))


# --- 2. densenet --------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3, concatenated onto its input."""

    def __init__(self, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), Act("relu"), nn.Conv2d(cin, bn_size * growth, 1, bias=False),
            nn.BatchNorm2d(bn_size * growth), Act("relu"),
            nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class DenseNet(ZooNet):
    def __init__(self, classes: int, growth: int, blocks: Sequence[int], init: int,
                 bn_size: int, hidden: int | None) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(3, init, 7, 2), nn.MaxPool2d(3, 2, 1)]
        c = init
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(c, growth, bn_size))
                c += growth
            if i < len(blocks) - 1:
                layers += [nn.BatchNorm2d(c), Act("relu"), nn.Conv2d(c, c // 2, 1, bias=False),
                           nn.AvgPool2d(2, 2)]
                c //= 2
        layers += [nn.BatchNorm2d(c), Act("relu")]
        self.features = nn.Sequential(*layers)
        self.target = nn.Identity()
        if hidden is None:
            self.classifier = nn.Sequential(nn.Linear(c, classes))
        else:
            self.classifier = nn.Sequential(nn.Linear(c, hidden), Act("relu"),
                                            nn.Linear(hidden, classes))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        a = self.target(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(a, 1), 1))


# --- 3. vgg -------------------------------------------------------------------------------


class Vgg(ZooNet):
    def __init__(self, classes: int, in_hw: tuple[int, int]) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8, 3), conv_bn(8, 8, 3),
            nn.MaxPool2d(2, 2),                                   # 48x64 -> 24x32
            conv_bn(8, 16, 3), conv_bn(16, 16, 3, act="leaky"),
            nn.MaxPool2d(3, 2, padding=1),                        # -> 12x16
            conv_bn(16, 24, 3), conv_bn(24, 24, 3),
            nn.MaxPool2d(3, 2, ceil_mode=True),                   # -> 6x8 (5x7 without ceil)
            nn.Conv2d(24, 16, 3, padding=1), Act("relu"),
            nn.MaxPool2d(2, 2),                                   # -> 3x4
        )
        self.target = nn.Identity()
        h, w = in_hw
        flat = 16 * (h // 16) * (w // 16)
        self.classifier = nn.Sequential(
            nn.Linear(flat, 32), Act("relu"), nn.Dropout(0.5), nn.Linear(32, classes),
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.target(self.features(x)), 1))


# --- 4. mobilenet -------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """GAP -> 1x1 conv -> act -> 1x1 conv -> gate -> Mul."""

    def __init__(self, c: int, squeeze: int, act: str, gate: str) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c, squeeze, 1)
        self.act = Act(act)
        self.expand = nn.Conv2d(squeeze, c, 1)
        self.gate = Act(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class InvertedResidual(nn.Module):
    """MobileNetV2 (act relu6, no SE) or V3-style (hardswish, hard-sigmoid SE) block;
    also EfficientNet's MBConv (silu, sigmoid SE)."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int, act: str,
                 se: tuple[int, str, str] | None) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, mid, 1, act=act))
        layers.append(conv_bn(mid, mid, k, stride, act=act, groups=mid))
        if se is not None:
            layers.append(SqueezeExcite(mid, *se))
        layers.append(conv_bn(mid, cout, 1, act=None))  # linear bottleneck
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNet(ZooNet):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2, act="relu6"),                                  # 32x32
            InvertedResidual(16, 16, 3, 3, 2, "relu6", None),                   # 16x16
            InvertedResidual(16, 16, 3, 3, 1, "relu6", None),
            InvertedResidual(16, 24, 3, 3, 2, "hardswish", (12, "relu", "hardsigmoid")),  # 8x8
            InvertedResidual(24, 24, 3, 5, 1, "hardswish", (16, "relu", "hardsigmoid")),
            conv_bn(24, 64, 1, act="hardswish"),
        )
        self.target = nn.Identity()
        self.classifier = nn.Sequential(nn.Linear(64, 32), Act("hardswish"),
                                        nn.Linear(32, classes))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        a = self.target(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(a, 1), 1))


# --- 5. efficientnet ----------------------------------------------------------------------


class EfficientNet(ZooNet):
    final = "sigmoid"

    def __init__(self, classes: int) -> None:
        super().__init__()

        def mb(cin: int, cout: int, expand: int, k: int, stride: int) -> InvertedResidual:
            return InvertedResidual(cin, cout, expand, k, stride, "silu",
                                    (max(1, cin // 4), "silu", "sigmoid"))

        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2, act="silu"),   # 32x32
            mb(16, 16, 1, 3, 1),
            mb(16, 24, 4, 3, 2),                # 16x16
            mb(24, 24, 4, 5, 1),
            mb(24, 32, 4, 3, 2),                # 8x8
            conv_bn(32, 64, 1, act="silu"),
        )
        self.target = nn.Identity()
        self.fc = nn.Linear(64, classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        a = self.target(self.features(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(a, 1), 1))


# --- 6. inception -------------------------------------------------------------------------


class InceptionA(nn.Module):
    """1x1 | 1x1-3x3 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(3, s1, p1, count_include_pad=False)-1x1."""

    def __init__(self, cin: int, w: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, w, 1)
        self.b3 = nn.Sequential(conv_bn(cin, w, 1), conv_bn(w, w, 3))
        self.b5 = nn.Sequential(conv_bn(cin, w, 1), conv_bn(w, w, 5))
        self.b33 = nn.Sequential(conv_bn(cin, w, 1), conv_bn(w, w, 3), conv_bn(w, w, 3))
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.bp = conv_bn(cin, w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.b33(x),
                          self.bp(self.pool(x))], dim=1)


class ReductionB(nn.Module):
    """Inception-v3 grid reduction: 3x3 s2 | 1x1-3x3-3x3 s2 | maxpool 3 s2 (no padding)."""

    def __init__(self, cin: int, w: int) -> None:
        super().__init__()
        self.b3 = conv_bn(cin, w, 3, 2, padding=0)
        self.b33 = nn.Sequential(conv_bn(cin, w, 1), conv_bn(w, w, 3),
                                 conv_bn(w, w, 3, 2, padding=0))
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b3(x), self.b33(x), self.pool(x)], dim=1)


class Inception(ZooNet):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3, 2), nn.MaxPool2d(3, 2, 1),     # 16x16
            InceptionA(16, 6),                                # 30 channels
            ReductionB(30, 12),                               # 7x7, 54 channels
            InceptionA(54, 8),                                # 40 channels
        )
        self.target = nn.Identity()
        self.fc = nn.Linear(40, classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        a = self.target(self.features(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(a, 1), 1))


# --- 7. nhwc ------------------------------------------------------------------------------


class Nhwc(ZooNet):
    """Keras/tf2onnx-like: NHWC input, NCHW convs between two Transposes, ReduceMean pool."""

    final = "softmax"

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), Act("relu"),              # 24x24
            conv_bn(16, 32, 3, 2),                               # 12x12
            nn.Conv2d(32, 32, 3, 1, 1), Act("relu"),
        )
        self.target = nn.Identity()
        self.dense = nn.Linear(32, classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        a = self.target(self.features(x.permute(0, 3, 1, 2)))
        return self.dense(a.permute(0, 2, 3, 1).mean(dim=(1, 2)))


# --- the zoo ------------------------------------------------------------------------------

# name -> (constructor, input shape without batch, layout, number of classes, seed)
ZOO: dict[str, tuple[Callable[[int], ZooNet], tuple[int, int, int], str, int, int]] = {
    "resnet": (ResNet, (3, 64, 64), "NCHW", 5, 101),
    "densenet": (lambda k: DenseNet(k, growth=8, blocks=(3, 3), init=16, bn_size=2, hidden=32),
                 (3, 64, 64), "NCHW", 4, 102),
    "vgg": (lambda k: Vgg(k, (48, 64)), (3, 48, 64), "NCHW", 3, 103),
    "mobilenet": (MobileNet, (3, 64, 64), "NCHW", 4, 104),
    "efficientnet": (EfficientNet, (3, 64, 64), "NCHW", 3, 105),
    "inception": (Inception, (3, 64, 64), "NCHW", 5, 106),
    "nhwc": (Nhwc, (48, 48, 3), "NHWC", 4, 107),
}


def randomize(model: nn.Module, in_shape: Sequence[int], gen: torch.Generator,
              batch: int = 8) -> None:
    """Random BN affine parameters, then running statistics from a calibration batch.

    The statistics come from a train-mode pass over random images (cumulative average), so
    they are far from (0, 1) but keep activations O(1) in eval mode.
    """
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(batch, *in_shape, generator=gen))
    model.eval()


def set_mode(model: nn.Module, *, guided: bool = False,
             record: list[tuple[str, torch.Tensor]] | None = None) -> None:
    for m in model.modules():
        if isinstance(m, Act):
            m.guided = guided
            m.record = record


def export(model: ZooNet, in_shape: Sequence[int], path: Path | None = None) -> bytes:
    model.eval()
    buf = io.BytesIO()
    # dynamo=False on purpose (no onnxscript needed; the graphs match what users export).
    warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export",
                            DeprecationWarning)
    torch.onnx.export(
        model, (torch.zeros(1, *in_shape),), buf, dynamo=False, opset_version=OPSET,
        input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, do_constant_folding=True,
    )
    data = buf.getvalue()
    if path is not None:
        path.write_bytes(data)
    return data


def kink_margin(record: list[tuple[str, torch.Tensor]]) -> float:
    """min over kink activations of (distance to the nearest kink) / max|input| (float64)."""
    worst = np.inf
    for kind, t in record:
        x = t.double()
        scale = max(float(x.abs().max()), 1e-12)
        for k in _ACTS[kind][1]:
            worst = min(worst, float((x - k).abs().min()) / scale)
    return worst


def pick_input(m64: ZooNet, in_shape: Sequence[int], seed: int) -> tuple[np.ndarray, float, int]:
    """The first seeded input whose kink inputs all keep MARGIN from their kinks."""
    best: tuple[float, np.ndarray, int] | None = None
    for attempt in range(MAX_TRIES):
        rng = np.random.default_rng([seed, attempt])
        x = rng.standard_normal((1, *in_shape)).astype(np.float32)
        record: list[tuple[str, torch.Tensor]] = []
        set_mode(m64, record=record)
        with torch.no_grad():
            m64.logits(torch.from_numpy(x.astype(np.float64)))
        set_mode(m64)
        margin = kink_margin(record)
        if best is None or margin > best[0]:
            best = (margin, x, attempt)
        if margin >= MARGIN:
            break
    assert best is not None
    if best[0] < MARGIN:
        print(f"  warning: best kink margin {best[0]:.1e} < {MARGIN:.0e}", file=sys.stderr)
    return best[1], best[0], best[2]


def references(m64: ZooNet, x: np.ndarray) -> dict[str, np.ndarray]:
    """Autograd references on the float64 model."""
    store: dict[str, torch.Tensor] = {}
    hook = m64.target.register_forward_hook(lambda mod, inp, out: store.__setitem__("A", out))
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    try:
        set_mode(m64)
        z = m64.logits(xt)
        a = store["A"]
        k = z.shape[1]
        grad_target, grad_input = [], []
        for c in range(k):
            ga, gx = torch.autograd.grad(z[0, c], [a, xt], retain_graph=True)
            grad_target.append(ga[0])
            grad_input.append(gx[0])
        set_mode(m64, guided=True)
        zg = m64.logits(xt)
        guided = [torch.autograd.grad(zg[0, c], xt, retain_graph=True)[0][0] for c in range(k)]
    finally:
        set_mode(m64)
        hook.remove()
    gt = torch.stack(grad_target).detach().numpy()
    acts = a[0].detach().numpy()
    if acts.ndim != 3:
        raise AssertionError(f"target hook caught shape {tuple(a.shape)}")
    weights = gt.mean(axis=(2, 3))
    cam = np.maximum(np.einsum("kc,chw->khw", weights, acts), 0.0)
    return {
        "x": x,
        "logits": z[0].detach().numpy(),
        "target": acts,
        "grad_target": gt,
        "gradcam": cam,
        # Input gradients are most of the zoo's bytes; float32 rounding (~6e-8 relative)
        # is far below the 1e-4 the tests allow, so they are stored in float32.
        "grad_input": torch.stack(grad_input).detach().numpy().astype(np.float32),
        "guided_input": torch.stack(guided).detach().numpy().astype(np.float32),
    }


def _run_with(model: onnx.ModelProto, outputs: Sequence[str],
              feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` in ONNX Runtime, also returning intermediate tensors."""
    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    for name in outputs:
        if name not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                                     None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    # No graph optimisation: fused nodes would hide the intermediate tensors we compare.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(list(outputs), feeds)


def check_onnx(model: onnx.ModelProto, m64: ZooNet, ref: dict[str, np.ndarray],
               layout: str) -> dict[str, object]:
    """Detect the target, and check the ONNX float32 run against the float64 references.

    Returns the manifest fields the detector decides (target name, shape, logits tensor).
    """
    index = GraphIndex(model)
    cut = split(index, layout=Layout(layout))
    kinks = [n for n in model.graph.node if n.op_type in ONNX_OP.values()]
    record: list[tuple[str, torch.Tensor]] = []
    set_mode(m64, record=record)
    with torch.no_grad():
        m64.logits(torch.from_numpy(ref["x"].astype(np.float64)))
    set_mode(m64)
    if [ONNX_OP[k] for k, _ in record] != [n.op_type for n in kinks]:
        raise AssertionError("kink activations of the ONNX graph and the torch model differ: "
                             f"{[n.op_type for n in kinks]} vs {[k for k, _ in record]}")
    names = [cut.logits, cut.target, *(n.input[0] for n in kinks)]
    logits, target, *pre = _run_with(model, names, {cut.image: ref["x"]})
    if cut.target_layout is Layout.NHWC:
        target = target.transpose(0, 3, 1, 2)
    for label, got, want in (("logits", logits[0], ref["logits"]),
                             ("target", target[0], ref["target"])):
        if got.shape != want.shape:
            raise AssertionError(f"{label}: ONNX {got.shape} vs hooked {want.shape}; the "
                                 f"detector picked {cut.target!r}")
        err = np.abs(got - want).max() / np.abs(want).max()
        if err > 1e-5:
            raise AssertionError(f"{label}: ONNX vs torch float64 relative error {err:.1e}; "
                                 f"the detector picked {cut.target!r}")
    # float32 error at kink inputs vs distance from the kink: no unit may change side.
    worst_err, flips = 0.0, 0
    for (kind, want), got in zip(record, pre):
        w = want.numpy()
        scale = np.abs(w).max()
        worst_err = max(worst_err, float(np.abs(got - w).max() / scale))
        for k in _ACTS[kind][1]:
            flips += int(np.count_nonzero(np.sign(got - k) != np.sign(w - k)))
    if flips:
        raise AssertionError(f"{flips} kink inputs changed side between float32 and float64")
    return {"target": cut.target, "target_layout": cut.target_layout.value,
            "target_shape": list(cut.target_shape), "logits_tensor": cut.logits,
            "graph_activation": cut.graph_activation, "f32_kink_error": worst_err}


def make_zoo(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    manifest: dict[str, dict[str, object]] = {}
    for name, (ctor, in_shape, layout, classes, seed) in ZOO.items():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = ctor(classes)
        randomize(model, in_shape, gen)
        onnx_path = out / f"{name}.onnx"
        proto = onnx.load_from_string(export(model, in_shape, onnx_path))
        m64 = copy.deepcopy(model).double().eval()
        x, margin, attempt = pick_input(m64, in_shape, seed)
        ref = references(m64, x)
        info = check_onnx(proto, m64, ref, layout)
        if info["graph_activation"] != model.final:
            raise AssertionError(f"{name}: graph ends in {info['graph_activation']}, "
                                 f"model says {model.final}")
        np.savez_compressed(out / f"{name}.npz", **ref)
        ops = Counter(n.op_type for n in proto.graph.node)
        manifest[name] = {
            "onnx": onnx_path.name,
            "npz": f"{name}.npz",
            "layout": layout,
            "input": "image",
            "input_shape": list(in_shape),
            "output": "logits",
            "final_activation": model.final,
            **info,
            "classes": classes,
            "params": sum(p.numel() for p in model.parameters()),
            "onnx_bytes": onnx_path.stat().st_size,
            "ops": dict(sorted(ops.items())),
            "x_seed": [seed, attempt],
            "kink_margin": margin if np.isfinite(margin) else None,  # None: no kinks
        }
        print(f"{name:13s} {manifest[name]['params']:7d} params "
              f"{onnx_path.stat().st_size / 1024:6.1f} KB target {info['target']} "
              f"{info['target_shape']} margin {margin:.1e} f32 err {info['f32_kink_error']:.1e}")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"zoo: {total / 1024:.0f} KB in {out}")


def make_bench(path: Path, classes: int, size: int) -> None:
    """DenseNet-121: growth 32, blocks 6-12-24-16, 64 initial features, GAP -> Linear."""
    torch.manual_seed(121)
    model = DenseNet(classes, growth=32, blocks=(6, 12, 24, 16), init=64, bn_size=4,
                     hidden=None)
    randomize(model, (3, size, size), torch.Generator().manual_seed(121), batch=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    export(model, (3, size, size), path)
    params = sum(p.numel() for p in model.parameters())
    print(f"{path}: {params / 1e6:.2f}M params, {path.stat().st_size / 2**20:.1f} MiB, "
          f"input (N, 3, {size}, {size}), {classes} classes")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "zoo")
    ap.add_argument("--bench", action="store_true",
                    help="write the DenseNet-121-sized benchmark model instead of the zoo")
    ap.add_argument("--bench-out", type=Path, default=Path("/tmp/densenet121.onnx"))
    ap.add_argument("--bench-classes", type=int, default=14)
    ap.add_argument("--bench-size", type=int, default=224)
    args = ap.parse_args(argv)
    if args.bench:
        make_bench(args.bench_out, args.bench_classes, args.bench_size)
    else:
        make_zoo(args.out)


if __name__ == "__main__":
    main()
