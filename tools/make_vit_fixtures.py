"""Build the vision-transformer fixtures that tests/graph/test_vit.py checks the token-grid
Grad-CAM and CRM against.

Usage:
    .venv/bin/python tools/make_vit_fixtures.py [--out tests/data/vit]
    .venv/bin/python tools/make_vit_fixtures.py --check-real [--exporter legacy|dynamo ...]

Writes, per variant and exporter, a tiny timm vision transformer with seeded random
weights (``<name>-<exporter>.onnx``, float32, input ``image``, output ``logits``, dynamic
batch axis ``N``; ``legacy`` is ``torch.onnx.export(dynamo=False, opset 17)``, ``dynamo``
the dynamo exporter at opset 20), one ``<name>.npz`` of references computed by torch on a
float64 copy of the same network, and ``manifest.json``. The tests never import torch.

Variants (embed_dim 32, depth 2, 2 heads, patch 8, 3 classes):
    vit       VisionTransformer, class token, 32×32 input: a 4×4 grid, 1 prefix token
    deit_dist VisionTransformerDistilled (class + distillation token): 2 prefix tokens
    vit_reg   VisionTransformer with 4 register tokens, 32×48 input: a 4×6 grid (not
              square, so a transposed reshape shows), 5 prefix tokens
    swin      SwinTransformer (embed_dim 16, patch 4, window 4, depths 2-2, heads 1-2,
              32×32 input): its tokens are (B, h, w, C) all along, so its target is a 4-D
              NHWC tensor, the final norm's output, 32×4×4; no prefix tokens

npz contents (K classes; T the target tokens: for a ViT those entering the last block,
(N, C), for Swin the final norm's output, (h, w, C); P prefix tokens; A the patch grid of
T, pytorch-grad-cam's ``reshape_transform``: T[P:] reshaped to (h, w, C) and moved to
(C, h, w)):
    x             the input as fed to ONNX, (1, 3, H, W), float32
    logits        (K,)
    tokens        T, (N, C)
    target        A, (C, h, w)
    prefix        T[:P], (P, C) (ViTs only)
    grad_target   dlogit_k/dA, (K, C, h, w): autograd at T (its prefix rows dropped)
    gradcam       ReLU(Σ_c mean_ij(dlogit_k/dA_c) A_c), (K, h, w)
    crm           (logit_k − logit_k with patch token (l, m) of T zeroed)², (K, h, w): the
                  rest of the network (ViT: the last block and the head) re-run for every
                  one of the h·w tokens
    crm_combined  Σ_k crm, (h, w)

The script also runs pytorch-grad-cam's own GradCAM (``target_layers=[blocks[-2]]`` and
the usual ViT ``reshape_transform``; Swin: ``[norm]``) and checks that its output (min-max
scaled and resized to the input by grad-cam) is this reference's Grad-CAM scaled the same
way (to 1e-6: the resize is float32).

``--check-real`` writes nothing: it compares the service's CRM on timm's real 224²
ViT-Tiny, DeiT-Tiny and DeiT-Tiny-distilled (tools/export_matrix.py's random weights and
image) with torch float64, beside torch's own float32 error (CRM subtracts nearly equal
scores, so its float32 floor is higher than Grad-CAM's).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

# timm imports torchvision, whose compiled ops may not load here: export_matrix shims them.
import export_matrix as em
from export_matrix import import_torchvision

SEED = 3104
CLASSES = 3
EXPORTERS = ("legacy", "dynamo")
# name -> (timm class, input (H, W), keyword arguments)
VARIANTS: dict[str, tuple[str, tuple[int, int], dict[str, object]]] = {
    "vit": ("VisionTransformer", (32, 32), {}),
    "deit_dist": ("VisionTransformerDistilled", (32, 32), {}),
    "vit_reg": ("VisionTransformer", (32, 48), {"reg_tokens": 4}),
    "swin": ("SwinTransformer", (32, 32), {}),
}


def build(name: str) -> torch.nn.Module:
    """The variant with seeded weights scaled so that activations stay O(1) and attention
    is far from uniform (timm's init, std 0.02, leaves a 2-block network almost constant)."""
    import_torchvision()
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    cls_name, size, kwargs = VARIANTS[name]
    torch.manual_seed(SEED)
    model: torch.nn.Module
    if cls_name == "SwinTransformer":
        model = SwinTransformer(img_size=size, patch_size=4, window_size=4, embed_dim=16,
                                depths=(2, 2), num_heads=(1, 2), num_classes=CLASSES)
    else:
        cls = {"VisionTransformer": VisionTransformer,
               "VisionTransformerDistilled": VisionTransformerDistilled}[cls_name]
        model = cls(img_size=size, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                    num_classes=CLASSES, **kwargs)
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif pname.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.dim() >= 2 and not pname.endswith(("token", "pos_embed", "bias_table")):
                p.copy_(noise * float(np.prod(p.shape[1:])) ** -0.5)
            else:  # class / distillation / register tokens, position embedding and bias
                p.copy_(0.5 * noise)
    return model.eval()


def grid_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(prefix tokens, h, w) of the target: a ViT's patch grid, a Swin's last stage."""
    if is_swin(model):
        h, w = model.layers[-1].output_resolution
        return 0, int(h), int(w)
    h, w = model.patch_embed.grid_size
    return int(model.num_prefix_tokens), int(h), int(w)


def is_swin(model: torch.nn.Module) -> bool:
    return type(model).__name__ == "SwinTransformer"


def reshape_transform(tokens: torch.Tensor, prefix: int, h: int, w: int) -> torch.Tensor:
    """pytorch-grad-cam's ViT reshape_transform: drop the prefix tokens, (B, C, h, w); a
    Swin's (B, h, w, C) tokens are only moved to channels first."""
    result = tokens[:, prefix:, :] if tokens.dim() == 3 else tokens
    result = result.reshape(tokens.size(0), h, w, tokens.size(-1))
    return result.transpose(2, 3).transpose(1, 2)


def target_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is the target: ViT, the block before the last (the tokens
    entering the last one); Swin, the final norm (its tokens still form the grid)."""
    return model.norm if is_swin(model) else model.blocks[-2]


def tail(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The network from the target tokens to the logits."""
    if is_swin(model):
        return model.forward_head(tokens)
    return model.forward_head(model.norm(model.blocks[-1](tokens)))


def references(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    m = copy.deepcopy(model).double()
    prefix, h, w = grid_shape(m)
    logits, tokens = target_tokens(m, x.double())
    tokens.requires_grad_(True)
    z = tail(m, tokens)[0]
    assert torch.allclose(z, logits, rtol=0, atol=1e-12), "tail() is not the network's end"
    grads = torch.stack([torch.autograd.grad(z[k], tokens, retain_graph=True)[0][0]
                         for k in range(CLASSES)])                   # (K, *tokens)
    acts = reshape_transform(tokens.detach(), prefix, h, w)[0]        # (C, h, w)
    grad_target = reshape_transform(grads, prefix, h, w)              # (K, C, h, w)
    weights = grad_target.mean(dim=(2, 3))                            # (K, C)
    gradcam = torch.relu(torch.einsum("kc,chw->khw", weights, acts))
    crm = crm_maps(m, tokens.detach())
    out = {
        "logits": logits.numpy(), "tokens": tokens.detach()[0].numpy(),
        "target": acts.numpy(), "grad_target": grad_target.numpy(),
        "gradcam": gradcam.numpy(), "crm": crm.numpy(), "crm_combined": crm.sum(dim=0).numpy(),
    }
    if prefix:
        out["prefix"] = tokens.detach()[0, :prefix].numpy()
    return out


def crm_maps(model: torch.nn.Module, tokens: torch.Tensor, chunk: int = 49) -> torch.Tensor:
    """(S_k − S_k with patch token (l, m) zeroed)², (K, h, w), in ``tokens``' dtype: the rest
    of the network re-run for each of the h·w patch tokens, ``chunk`` copies at a time."""
    prefix, h, w = grid_shape(model)
    with torch.no_grad():
        base = tail(model, tokens)[0]
        masked = []
        for start in range(0, h * w, chunk):
            where = torch.arange(start, min(start + chunk, h * w))
            copies = tokens.repeat(len(where), *([1] * (tokens.dim() - 1)))
            flat = copies.view(len(where), -1, copies.size(-1))       # (n, N, C) view
            flat[torch.arange(len(where)), prefix + where, :] = 0.0
            masked.append(tail(model, copies))                         # (n, K)
    return ((base[None, :] - torch.cat(masked)) ** 2).T.reshape(-1, h, w)


def target_tokens(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor,
                                                                     torch.Tensor]:
    """(logits (K,), the target tokens (1, ...)) of one image."""
    seen: list[torch.Tensor] = []
    hook = target_layer(model).register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        logits = model(x)[0]
    hook.remove()
    return logits, seen[0].detach().clone()


def check_real(exporters: Sequence[str]) -> None:
    """CRM of the service on timm's real ViT-Tiny / DeiT-Tiny (distilled too) at 224²,
    random weights as tools/export_matrix.py makes them, against torch float64 (and
    torch's own float32 run, its floor); nothing is written to the repository."""
    import tempfile

    import onnx

    sys.path.insert(0, str(ROOT))
    from service.graph.build import compile_model
    from service.methods import METHODS, rows
    from service.models.activation import Activation
    from service.runtime.engine import Engine

    def rel(got: np.ndarray, want: np.ndarray) -> float:
        return float(np.abs(got - want).max() / np.abs(want).max())

    for arch in ("timm/vit_tiny_patch16_224", "timm/deit_tiny_patch16_224",
                 "timm/deit_tiny_distilled_patch16_224"):
        model = em.build(em.ARCHS[arch], len(em.LABELS))
        em.randomize(model, 224, len(em.LABELS))
        x = em.make_images(1, 224, em.SEED + 3)
        m64, m32 = copy.deepcopy(model).double(), copy.deepcopy(model).float()
        z, tokens = target_tokens(m64, x.double())
        want = crm_maps(m64, tokens).numpy()
        floor = crm_maps(m32, target_tokens(m32, x)[1]).double().numpy()
        cls = int(z.argmax())
        for exporter in exporters:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    em.export(copy.deepcopy(model), x, path, exporter, False)
                compiled = compile_model(onnx.load(str(path)), activation="none",
                                         input_shape=[1, 3, 224, 224])
            captures = Engine(compiled, ["CPUExecutionProvider"], 2).capture(
                x.numpy(), Activation("none"))
            (crm,) = METHODS["crm"].compute(captures, rows([cls]))
            (combined,) = METHODS["crm_combined"].compute(captures, rows([None]))
            print(f"{arch:38s} {exporter:7s} prefix {compiled.split.prefix_tokens}  "
                  f"crm {rel(crm.values, want[cls]):.1e} (f32 floor "
                  f"{rel(floor[cls], want[cls]):.1e})  crm_combined "
                  f"{rel(combined.values, want.sum(0)):.1e} (f32 floor "
                  f"{rel(floor.sum(0), want.sum(0)):.1e})")


def pgc_check(model: torch.nn.Module, x: torch.Tensor, gradcam: np.ndarray) -> float:
    """max |grad-cam's GradCAM − our reference scaled as grad-cam scales| over classes."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    m = copy.deepcopy(model).double()
    prefix, h, w = grid_shape(m)
    worst = 0.0
    with GradCAM(m, target_layers=[target_layer(m)],
                 reshape_transform=lambda t: reshape_transform(t, prefix, h, w)) as cam:
        for k in range(CLASSES):
            theirs = cam(x.double(), targets=[ClassifierOutputTarget(k)])[0]
            # grad-cam scales each layer's map and resizes it, then scales the mean over
            # layers (one here) again.
            ours = scale_cam_image(scale_cam_image(gradcam[k][None],
                                                   (x.shape[3], x.shape[2])))[0]
            worst = max(worst, float(np.abs(theirs - ours).max()))
    return worst


def check_onnx(path: Path, x: np.ndarray, logits: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(["logits"], {"image": x})
    return float(np.abs(got[0] - logits).max() / np.abs(logits).max())


def make(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, dict[str, object]] = {}
    for name, (cls_name, (height, width), _) in VARIANTS.items():
        model = build(name)
        rng = np.random.default_rng(SEED + 2)
        x = torch.from_numpy(rng.standard_normal((1, 3, height, width)).astype(np.float32))
        ref = references(model, x)
        pgc_err = pgc_check(model, x, ref["gradcam"])
        assert pgc_err <= 1e-6, f"{name}: pytorch-grad-cam disagrees by {pgc_err:.2e}"
        np.savez_compressed(out / f"{name}.npz", x=x.numpy(), **ref)
        prefix, h, w = grid_shape(model)
        for exporter in EXPORTERS:
            key = f"{name}-{exporter}"
            path = out / f"{key}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                em.export(copy.deepcopy(model), x, path, exporter, False)
            err = check_onnx(path, x.numpy(), ref["logits"])
            assert err <= 1e-4, f"{key}: ONNX Runtime's logits are {err:.2e} off"
            manifest[key] = {
                "onnx": path.name, "npz": f"{name}.npz", "timm_class": cls_name,
                "exporter": exporter, "input_shape": [3, height, width],
                "prefix_tokens": prefix, "grid": [h, w], "channels": int(ref["target"].shape[0]),
                "target_layout": "NHWC" if is_swin(model) else "NCHW",
            }
            print(f"{key:18s} prefix {prefix} grid {h}x{w}  onnx logits {err:.1e}  "
                  f"pytorch-grad-cam {pgc_err:.1e}  {path.stat().st_size // 1024} KiB")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "vit")
    parser.add_argument("--check-real", action="store_true",
                        help="write nothing; check CRM on timm's real 224² ViT/DeiT instead")
    parser.add_argument("--exporter", action="append", choices=EXPORTERS,
                        help="with --check-real (repeatable; default: both)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.check_real:
        check_real(args.exporter or EXPORTERS)
    else:
        make(args.out)


if __name__ == "__main__":
    main()
