"""Train the bundled synthetic demo model (models/demo-cxr) and export it to ONNX.

Usage:
    .venv/bin/python tools/train_demo_model.py [--out models/demo-cxr] [--seed 0] \
        [--train N] [--epochs E]

The model is a deliberately small DenseNet-style CNN trained on phantoms from
tools/phantoms.py, so it trains on a 2-core CPU in minutes. It exists to
exercise the explanation pipeline end to end with a model whose "findings"
have known locations; it has never seen patient data and must not be used for
diagnosis.

Everything is seeded (torch.manual_seed + NumPy SeedSequence) so a rerun with
the same arguments on the same torch version reproduces the same weights up to
floating-point non-determinism of the CPU kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import phantoms  # tools/ is a folder of scripts, not a package: found through sys.path above

SIZE = 256
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LABELS = phantoms.LABELS
# Training nodules reach a larger radius than the generator's default (5-12 px)
# that the held-out set uses: with only small nodules in the training set the
# network did not pick up the nodule signal at all within the time budget
# (AUROC ~0.5 after 8 epochs); the larger ones teach it the feature, which then
# transfers to the small ones.
TRAIN_NODULE_RADIUS = (5.0, 16.0)
# Per-label BCE weights. The three large findings are learned within a few
# epochs; the nodule, a few cells of the 16x16 map diluted by global average
# pooling, only got learned once its loss was weighted up.
LOSS_WEIGHTS = (1.0, 4.0, 1.0, 1.0)


# --- model -----------------------------------------------------------------------


class DenseLayer(nn.Module):
    """BN -> ReLU -> 3x3 conv, concatenated onto the input (DenseNet connectivity)."""

    def __init__(self, in_channels: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # relu is in-place on the BN output, never on x, which the concat still needs.
        return torch.cat([x, self.conv(self.relu(self.norm(x)))], dim=1)


def _dense_block(in_channels: int, n_layers: int, growth: int) -> nn.Sequential:
    return nn.Sequential(*(DenseLayer(in_channels + i * growth, growth) for i in range(n_layers)))


class DemoDenseNet(nn.Module):
    """Tiny DenseNet for 256x256 inputs; the head is GAP -> Dense -> ReLU -> Dense -> Sigmoid.

    The explanation target is the 16x16 output of `features.relu_final`. The
    GAP -> Dense -> ReLU -> Dense head is what the product's CRM method expects,
    so its shape must not change.
    """

    def __init__(
        self,
        n_labels: int = len(LABELS),
        stem: int = 12,
        width: int = 24,
        growth1: int = 12,
        transition: int = 32,
        growth2: int = 16,
        layers: int = 3,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        c1 = width + layers * growth1
        c2 = transition + layers * growth2
        self.features = nn.Sequential()
        conv0 = nn.Conv2d(3, stem, 5, stride=2, padding=2, bias=False)
        conv1 = nn.Conv2d(stem, width, 3, stride=2, padding=1, bias=False)
        self.features.add_module("conv0", conv0)  # 128^2
        self.features.add_module("norm0", nn.BatchNorm2d(stem))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(3, stride=2, padding=1))  # 64^2
        self.features.add_module("conv1", conv1)  # 32^2
        self.features.add_module("norm1", nn.BatchNorm2d(width))
        self.features.add_module("relu1", nn.ReLU(inplace=True))
        self.features.add_module("block1", _dense_block(width, layers, growth1))
        self.features.add_module("trans_norm", nn.BatchNorm2d(c1))
        self.features.add_module("trans_relu", nn.ReLU(inplace=True))
        self.features.add_module("trans_conv", nn.Conv2d(c1, transition, 1, bias=False))
        self.features.add_module("trans_pool", nn.AvgPool2d(2, stride=2))  # 16^2
        self.features.add_module("block2", _dense_block(transition, layers, growth2))
        self.features.add_module("norm_final", nn.BatchNorm2d(c2))
        self.features.add_module("relu_final", nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
            nn.Linear(hidden, n_labels),
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exported with the sigmoid so the ONNX model outputs probabilities;
        # training uses logits() with BCEWithLogits for numerical stability.
        return torch.sigmoid(self.logits(x))


# --- data ------------------------------------------------------------------------


def make_set(
    seq: np.random.SeedSequence, n: int, nodule_radius: tuple[float, float] = (5.0, 12.0)
) -> tuple[np.ndarray, np.ndarray]:
    """n phantoms as uint8 images (n, H, W) and multi-hot labels (n, 4).

    uint8 storage keeps ~6000 images at 256^2 under 400 MB.
    """
    rng = np.random.default_rng(seq)
    images = np.empty((n, SIZE, SIZE), np.uint8)
    labels = np.zeros((n, len(LABELS)), np.float32)
    for i in range(n):
        ph = phantoms.generate(rng, SIZE, nodule_radius=nodule_radius)
        images[i] = np.round(ph.image * 255.0).astype(np.uint8)
        for label in ph.masks:
            labels[i, LABELS.index(label)] = 1.0
    return images, labels


_MEAN_T = torch.tensor(MEAN).view(1, 3, 1, 1)
_STD_T = torch.tensor(STD).view(1, 3, 1, 1)


def to_input(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) grey images -> normalised (N, 3, H, W) float, as the service feeds ONNX."""
    x = torch.from_numpy(images_u8).float().div_(255.0).unsqueeze(1)
    return (x.expand(-1, 3, -1, -1) - _MEAN_T) / _STD_T


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation on (N, 1, H, W) 0..1 images: brightness/contrast and a small shift.

    No flips: left/right anatomy (cardiac apex on the image's right) is part of
    what the model should learn.
    """
    n = x.shape[0]
    contrast = 1.0 + 0.15 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
    bright = 0.05 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
    x = ((x - 0.5) * contrast + 0.5 + bright).clamp_(0.0, 1.0)
    pad = 8
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return x[:, :, dy : dy + SIZE, dx : dx + SIZE]


# --- metrics ---------------------------------------------------------------------


def auroc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic; tied scores get average ranks."""
    scores = np.asarray(scores, np.float64)
    targets = np.asarray(targets).astype(bool)
    n_pos, n_neg = int(targets.sum()), int((~targets).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # Average rank (1-based) for each run of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[targets].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch: int = 128) -> np.ndarray:
    model.eval()
    out = [model(to_input(images[i : i + batch])).numpy() for i in range(0, len(images), batch)]
    return np.concatenate(out)


# --- export ----------------------------------------------------------------------


def export_onnx(model: nn.Module, path: Path) -> None:
    """Export with the TorchScript-based exporter (dynamo=False).

    It needs no extra packages (the dynamo exporter needs onnxscript) and, in
    eval mode, folds only the BNs that directly follow a conv, so the
    BatchNormalization nodes inside the dense blocks stay real graph nodes.
    """
    model.eval()
    dummy = torch.zeros(1, 3, SIZE, SIZE)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["scores"],
        dynamic_axes={"image": {0: "N"}, "scores": {0: "N"}},
        do_constant_folding=True,
    )


def verify_onnx(model: nn.Module, path: Path, images: np.ndarray) -> dict[str, object]:
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = to_input(images)
    ref = predict(model, images)
    got = sess.run(["scores"], {"image": x.numpy()})[0]
    diff = float(np.abs(ref - got).max())
    if got.shape != (len(images), len(LABELS)) or diff >= 1e-4:
        raise RuntimeError(
            f"ONNX Runtime disagrees with torch: shape {got.shape}, max abs diff {diff}"
        )
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    # The service auto-detects the explanation target as the ReLU feeding the
    # global average pool; fail here rather than ship a model where it cannot.
    gap = next(n for n in proto.graph.node if n.op_type == "GlobalAveragePool")
    producer = next(n for n in proto.graph.node if gap.input[0] in n.output)
    if producer.op_type != "Relu":
        raise RuntimeError(
            f"GlobalAveragePool is fed by {producer.op_type}, expected the final Relu"
        )
    return {
        "max_abs_diff": diff,
        "ops": dict(sorted(ops.items())),
        "target_layer": gap.input[0],
        "inputs": [i.name for i in proto.graph.input],
        "outputs": [o.name for o in proto.graph.output],
    }


# --- main ------------------------------------------------------------------------

_WARNING = (
    "# Synthetic demo model: trained on synthetic chest-radiograph phantoms, NOT on patient data."
    " Not for diagnosis."
)
_DESCRIPTION = (
    "Synthetic phantom demo: a tiny DenseNet-style CNN trained only on synthetic chest-radiograph"
    " phantoms, for demonstrating and testing the explanation pipeline."
    " NOT trained on patient data; NOT for diagnosis."
)
MODEL_TOML = f"""\
{_WARNING}
name = "demo-cxr"
version = "1"
description = "{_DESCRIPTION}"
labels = ["Cardiomegaly", "Nodule", "Pleural Effusion", "Pneumothorax"]
[input]
size = [256, 256]
channels = 3
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
layout = "NCHW"
[output]
activation = "sigmoid"
[explain]
# target_layer is auto-detected (the final ReLU of the last dense block)
[accepts]
# Chest radiographs only: a DICOM of another modality or body part gets 422
# dicom_not_accepted instead of scores the network was never trained to give.
modalities = ["CR", "DX"]
body_parts = ["CHEST"]
# A DX "FOR PROCESSING" image holds the detector's raw values, not meant for display.
presentation_intents = ["FOR PRESENTATION"]
[codes]
# The labels' SNOMED CT concepts (as pydicom's DICOM code dictionary has them): the
# Structured Report's finding types. The model is still a synthetic demo, not for diagnosis.
Cardiomegaly = {{ scheme = "SCT", value = "287272002", meaning = "Cardiomegaly" }}
Nodule = {{ scheme = "SCT", value = "27925004", meaning = "Nodule" }}
"Pleural Effusion" = {{ scheme = "SCT", value = "60046008", meaning = "Pleural effusion" }}
Pneumothorax = {{ scheme = "SCT", value = "36118008", meaning = "Pneumothorax" }}
"""


def model_card(metrics: dict[str, object], args: argparse.Namespace, size_bytes: int) -> str:
    auc, pos, neg = metrics["auroc"], metrics["positives"], metrics["negatives"]
    rows = "\n".join(
        f"| {label} | {auc[label]:.4f} | {pos[label]} / {neg[label]} |"  # type: ignore[index]
        for label in LABELS
    )
    minutes = float(metrics["train_seconds"]) / 60.0
    cmd = (
        f".venv/bin/python tools/train_demo_model.py --out {args.out} --seed {args.seed} "
        f"--train {args.train} --heldout {args.heldout} --epochs {args.epochs} "
        f"--batch {args.batch} --lr {args.lr}"
    )
    return f"""# demo-cxr: synthetic demo model

**Trained only on synthetic chest-radiograph phantoms. Never trained on or validated against patient
data. Not a medical device; not for diagnosis.**

## What it is

A tiny multi-label CNN that scores four "findings" (Cardiomegaly, Nodule, Pleural Effusion,
Pneumothorax) on 256×256 cartoon chest radiographs produced by `tools/phantoms.py`. Its purpose is
to demonstrate and test the explanation pipeline: the phantom generator knows the exact region of
every finding, so explanation maps can be checked against ground truth.

Intended use: demos, integration tests and benchmarks of this service. Out of scope: any real image.
On real radiographs its scores are meaningless.

## Architecture

DenseNet-style, written from scratch (`DemoDenseNet` in `tools/train_demo_model.py`),
{metrics['parameters']:,} parameters, ONNX file {size_bytes / 1024:.0f} KiB.

- input `image`: (N, 3, 256, 256) float32, the grey image replicated to 3 channels, scaled to
  0..1 and normalised with ImageNet mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225)
- stem: conv 5×5/2 (3→12) → BN → ReLU → max-pool 3×3/2 → conv 3×3/2 (12→24) → BN → ReLU
  (32×32)
- dense block 1: 3 layers, growth 12 (BN → ReLU → conv 3×3, concatenated) → transition
  BN → ReLU → conv 1×1 (→32) → avg-pool 2×2 (16×16)
- dense block 2: 3 layers, growth 16 → BN → ReLU (80×16×16: the explanation target layer)
- head: global average pool → Linear(80→64) → ReLU → Dropout(0.2) → Linear(64→4) →
  Sigmoid
- output `scores`: (N, 4) independent probabilities, label order as in `model.toml`

Exported with `torch.onnx.export(..., dynamo=False)`, opset 17, dynamic batch dimension `N`.

## Training data

Phantoms from `tools/phantoms.py` (NumPy/OpenCV only): body outline, lungs with vessel-like
markings, heart, mediastinum, spine, ribs and clavicles, with random geometry, exposure, blur and
noise. Each finding is present independently with probability 0.35. Training nodules have radii of
5–16 px (the larger ones make the feature learnable in the time budget); held-out nodules use the
generator's default 5–12 px.

- training: {metrics['n_train']} phantoms, held-out: {metrics['n_heldout']} phantoms (independent
  streams spawned from seed {metrics['seed']})
- augmentation: brightness/contrast jitter and shifts of up to ±8 px (no flips)
- loss: binary cross-entropy (with logits), per-label weights {LOSS_WEIGHTS} (the small
  nodule needs the extra weight to be learned in time); Adam, batch {metrics['batch_size']},
  {metrics['epochs']} epochs, one-cycle learning-rate schedule

## Held-out results (AUROC)

| label | AUROC | positives / negatives |
| --- | --- | --- |
{rows}

These numbers say only that the network learned the phantoms; they say nothing about clinical
performance.

## Reproduce

```
{cmd}
```

Training took {minutes:.1f} min wall time (data generation included) on a 2-core CPU with torch
{metrics['torch_version']}. Results are seeded but may differ in the last digits across torch
versions or CPUs.
"""


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("models/demo-cxr"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=6000, help="number of training phantoms")
    ap.add_argument("--heldout", type=int, default=1200, help="number of held-out phantoms")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak one-cycle learning rate")
    args = ap.parse_args()

    t0 = time.perf_counter()
    torch.set_num_threads(2)
    # Adam's second-moment estimates and small BN gradients go denormal after a
    # few hundred steps, which made each step ~3x slower on CPU.
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_seq, heldout_seq = np.random.SeedSequence(args.seed).spawn(2)

    x_train, y_train = make_set(train_seq, args.train, TRAIN_NODULE_RADIUS)
    x_held, y_held = make_set(heldout_seq, args.heldout)
    elapsed = time.perf_counter() - t0
    print(f"generated {args.train} + {args.heldout} phantoms in {elapsed:.0f} s", flush=True)

    # channels_last lets oneDNN use its fast NHWC kernels: ~20% faster per step here.
    model = DemoDenseNet().to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-5)
    steps_per_epoch = math.ceil(args.train / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
    )
    loss_fn = nn.BCEWithLogitsLoss(weight=torch.tensor(LOSS_WEIGHTS))
    mean, std = _MEAN_T, _STD_T

    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(args.train, generator=gen).numpy()
        total = 0.0
        for b in range(steps_per_epoch):
            idx = np.sort(perm[b * args.batch : (b + 1) * args.batch])
            x = torch.from_numpy(x_train[idx]).float().div_(255.0).unsqueeze(1)
            x = (augment(x, gen).expand(-1, 3, -1, -1) - mean) / std
            x = x.contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(y_train[idx])
            loss = loss_fn(model.logits(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        scores = predict(model, x_held)
        aucs = " ".join(f"{auroc(scores[:, j], y_held[:, j]):.3f}" for j in range(len(LABELS)))
        print(
            f"epoch {epoch + 1}/{args.epochs} loss {total / args.train:.4f} held-out AUROC {aucs} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )

    train_seconds = time.perf_counter() - t0
    scores = predict(model, x_held)
    metrics: dict[str, object] = {
        "auroc": {
            label: round(auroc(scores[:, j], y_held[:, j]), 4) for j, label in enumerate(LABELS)
        },
        "positives": {label: int(y_held[:, j].sum()) for j, label in enumerate(LABELS)},
        "negatives": {label: int((1 - y_held[:, j]).sum()) for j, label in enumerate(LABELS)},
        "n_train": args.train,
        "n_heldout": args.heldout,
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch,
        "parameters": n_params,
        "train_seconds": round(train_seconds, 1),
        "torch_version": torch.__version__,
    }

    print(f"\n{'label':<18} {'AUROC':>7}  positives/negatives")
    for label in LABELS:
        a = metrics["auroc"][label]  # type: ignore[index]
        pos, neg = metrics["positives"][label], metrics["negatives"][label]  # type: ignore[index]
        print(f"{label:<18} {a:>7.4f}  {pos}/{neg}")
    print(
        f"training time (data generation included): {train_seconds:.0f} s "
        f"({train_seconds / 60:.1f} min)"
    )

    model = model.to(memory_format=torch.contiguous_format)
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / "model.onnx"
    export_onnx(model, onnx_path)
    check = verify_onnx(model, onnx_path, x_held[:5])
    size = onnx_path.stat().st_size
    print(f"ONNX: {size} bytes, batch-5 max |ORT - torch| = {check['max_abs_diff']:.2e}")
    print(f"ONNX inputs {check['inputs']} outputs {check['outputs']}")
    print(f"ONNX target layer tensor {check['target_layer']}")
    print(f"ONNX ops: {check['ops']}")

    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (args.out / "model.toml").write_text(MODEL_TOML)
    (args.out / "README.md").write_text(model_card(metrics, args, onnx_path.stat().st_size))
    worst = min(metrics["auroc"].values())  # type: ignore[union-attr]
    if worst < 0.9:
        print(f"WARNING: worst AUROC {worst:.4f} is below the 0.9 target", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
