"""Narrow versions of real library architectures through both torch exporters, with float64
autograd references: the models tests/graph/test_exported.py checks in CI.

Usage (the tools extra, ``make tools``, plus timm):
    .venv/bin/python tools/make_exported_fixtures.py [--only NAME ...] [--exporter legacy|dynamo]
        [--out tests/data/exported] [--report report.json]
    .venv/bin/python tools/make_exported_fixtures.py --list

The committed set is every ``committed`` fixture through both exporters, plus the Keras
fixtures of tools/make_exported_fixtures_keras.py; the others are made on demand with
``--only`` (into ``--out``, where the test picks up whatever the manifest lists).

tools/export_matrix.py runs the libraries' full-size models (hundreds of MB, minutes each);
this script builds the same model code with small widths and depths and a small input so
the exported files stay a few hundred KB and CI can run every method on them in seconds.
Per fixture (one architecture) and exporter (``legacy``: ``dynamo=False``, opset 17;
``dynamo``: opset 20, weights inside the file; both with a dynamic batch axis, see
``export_matrix.export``):

1. The library's own model class (timm ConvNeXt, GhostNet; torchvision ShuffleNetV2,
   MobileNetV3, DenseNet, ResNet) with seeded random weights and a 4-class linear head,
   randomised as in the matrix (``export_matrix.randomize``: BatchNorm affine parameters
   and running statistics, head N(0, 1/fan_in)); LayerNorm affine parameters and layer
   scales are drawn too, so no block is (nearly) the identity.
2. It is exported into ``<out>/<name>-<exporter>/model.onnx`` beside a ``model.toml``
   (4 labels, the input size, ImageNet mean/std, NCHW, sigmoid: ``export_matrix.model_toml``)
   and loaded by the service's own loader (``service.models.repository.load_model``,
   what ``medexplain serve`` runs), which picks the target layer.
3. References by torch autograd in float64 for two seeded 8-bit noise images (fed through
   the service's own preprocessing) and every class
   (``export_matrix.torch_refs``): logits, Grad-CAM at the torch tensor whose values are the
   service's target activations, the guided-backprop input gradient with the guided
   rule on torch's own rectifiers, and CRM by brute force (the network re-run with that
   tensor zeroed at each position across channels). The same references in float32 give the float32 floor
   of each error; an input is kept only when both floors stay a tenth of the test's
   tolerance (Grad-CAM and CRM 1e-4, guided 1e-3), so no kink input lies within float32 rounding
   of its kink (otherwise the next seed is tried).
4. The service's own answers are compared at once; a fixture that fails to export, load
   or match is not written and is listed at the end (with ``--report``, as JSON).

``reference.npz`` (K classes, B = 2 images, S the input side; grids channel-first):
    pixels        the two images, (B, S, S, 3) uint8 (seeded noise); the service's own
                  preprocessing (``to_model_input``, model.toml's mean/std) makes the input
    logits        (B, K) float64
    gradcam       ReLU(sum_c mean_ij(dlogit_k/dA_c) A_c), (B, K, h, w) float64
    crm           (z_k − z_k(l, m))², z_k(l, m) the logits with the target zeroed at (l, m)
                  across channels, (B, K, h, w) float64
    guided_class  each image's highest-scoring class k_b, (B,)
    guided        guided backprop of logit k_b w.r.t. the image on the 0..1 scale, summed
                  over its channels (what ``guided_backprop`` answers), (B, S, S) float32:
                  float32 rounding (~6e-8 relative) is far below the 1e-3 the test allows,
                  and noise gradients do not compress, hence one class per image
``manifest.json`` holds per folder the exporter, the target the service picked and its
framework counterpart, the methods the service leaves unavailable (with its reason: the test
expects exactly these), the float32 floors and the errors measured here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_matrix as em  # stdlib only at import: no torch

ROOT = em.ROOT
OUT = ROOT / "tests" / "data" / "exported"
IMAGES = 2
GRADCAM_TOL = 1e-4
GUIDED_TOL = 1e-3
SCORES_TOL = 1e-5
CRM_TOL = 1e-4
# The float32 floor of an input must stay this far under the tolerance (see step 3).
FLOOR_SHARE = 0.1
MAX_TRIES = 8
MAX_ONNX_BYTES = 1_200_000


@dataclass(frozen=True)
class Fixture:
    """One narrow architecture: how to build it from the library's own model code."""

    name: str
    library: str      # what the row says it is, e.g. "timm ConvNeXt"
    size: int         # square input side
    build: Callable[[int], object]  # classes -> nn.Module (torch imported inside)
    committed: bool = True  # in tests/data/exported; the others only on demand (--only)


def _convnext(classes: int):  # type: ignore[no-untyped-def]
    import timm
    # convnext_atto's block (conv_mlp: LayerNorm2d and 1x1-conv MLP), four stages, tiny dims.
    return timm.create_model("convnext_atto", pretrained=False, num_classes=classes,
                             dims=(16, 24, 32, 48), depths=(1, 1, 2, 1), ls_init_value=1.0)


def _convnext_cl(classes: int):  # type: ignore[no-untyped-def]
    import timm
    # convnext_tiny's block (channels-last LayerNorm and Linear MLP between permutes).
    return timm.create_model("convnext_tiny", pretrained=False, num_classes=classes,
                             dims=(16, 24, 32, 48), depths=(1, 1, 1, 1), ls_init_value=1.0)


def _ghostnet(classes: int):  # type: ignore[no-untyped-def]
    from timm.models.ghostnet import GhostNet
    # GhostNet v1's stages (k, expansion, out, SE ratio, stride), fewer blocks; the last
    # expansion sets the width of the 1280-channel conv head's input.
    cfgs = [
        [[3, 16, 16, 0, 1]],
        [[3, 48, 24, 0, 2]],
        [[3, 72, 24, 0, 1]],
        [[5, 72, 40, 0.25, 2]],
        [[3, 120, 40, 0.25, 1]],
        [[3, 240, 80, 0, 2]],
        [[5, 96, 64, 0.25, 2]],
    ]
    return GhostNet(cfgs, num_classes=classes, width=0.35)


def _shufflenet(classes: int):  # type: ignore[no-untyped-def]
    import torchvision
    return torchvision.models.ShuffleNetV2([2, 2, 2], [8, 16, 32, 48, 96], num_classes=classes)


def _mobilenetv3(classes: int):  # type: ignore[no-untyped-def]
    import torchvision
    return torchvision.models.mobilenet_v3_small(weights=None, num_classes=classes,
                                                 width_mult=0.25)


def _densenet(classes: int):  # type: ignore[no-untyped-def]
    import torchvision
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2),
                                       num_init_features=16, bn_size=2, num_classes=classes)


def _resnet(classes: int):  # type: ignore[no-untyped-def]
    from timm.models.resnet import BasicBlock, ResNet
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=classes, channels=(8, 16, 24, 32),
                  stem_width=8)


FIXTURES: dict[str, Fixture] = {f.name: f for f in (
    Fixture("convnext", "timm ConvNeXt (atto block: conv MLP)", 64, _convnext),
    Fixture("convnext_cl", "timm ConvNeXt (tiny block: channels-last MLP)", 64, _convnext_cl),
    Fixture("ghostnet", "timm GhostNet v1 (width 0.35)", 64, _ghostnet),
    Fixture("shufflenet_v2", "torchvision ShuffleNetV2", 64, _shufflenet),
    Fixture("mobilenet_v3", "torchvision MobileNetV3-Small", 64, _mobilenetv3),
    # Covered by the hand-written zoo and the full-size matrix; not committed, to keep the
    # folder near 6 MB.
    Fixture("densenet", "torchvision DenseNet", 64, _densenet, committed=False),
    Fixture("resnet", "timm ResNet (BasicBlock)", 64, _resnet, committed=False),
)}
COMMITTED = tuple(name for name, f in FIXTURES.items() if f.committed)
EXPORTERS = em.DEFAULT_EXPORTERS


def randomize(model, size: int, classes: int) -> None:  # type: ignore[no-untyped-def]
    """The matrix's randomisation, plus random LayerNorm affine parameters and layer scales
    (timm leaves them at 1/0 and 1e-6: blocks would be near the identity, the norms'
    gradients trivial)."""
    import torch
    from torch import nn
    gen = torch.Generator().manual_seed(em.SEED + 5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            gamma = getattr(m, "gamma", None)
            if isinstance(gamma, nn.Parameter):
                gamma.copy_(torch.rand(gamma.shape, generator=gen) + 0.5)
    em.randomize(model, size, classes)


def pixels(n: int, size: int, seed: int):  # type: ignore[no-untyped-def]
    """n seeded 8-bit noise images, (n, size, size, 3) uint8: what a PNG upload decodes to."""
    import numpy as np
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def decoded(image):  # type: ignore[no-untyped-def]
    """One uint8 (H, W, 3) image as the decoders hand it to preprocessing (0..1 float32)."""
    import numpy as np

    from service.imaging.base import DecodedImage
    return DecodedImage(image.astype(np.float32) / np.float32(255.0), "png")


def service_answers(folder: Path, images):  # type: ignore[no-untyped-def]
    """What the service says for the uint8 ``images`` (B, S, S, 3), each alone: the loaded
    model's facts, the network inputs its preprocessing makes, and per image the logits,
    target activations, Grad-CAM, guided-backprop and CRM maps of every class."""
    import numpy as np

    from service.imaging.preprocess import to_model_input
    from service.methods import METHODS, rows
    from service.models.repository import load_model

    loaded = load_model(folder, providers=["CPUExecutionProvider"], threads=2, head_batch=64)
    engine, spec = loaded.engine, loaded.config.input
    k = len(loaded.config.labels)
    out: dict[str, object] = {"unavailable": dict(loaded.unavailable),
                              "target": engine.split.target,
                              "target_shape": list(engine.split.target_shape),
                              "target_layout": engine.split.target_layout.value,
                              "logits_tensor": engine.split.logits}
    arrays: dict[str, list[object]] = {"x": [], "acts": [], "logits": [], "gradcam": [],
                                       "guided": [], "crm": []}
    for image in images:
        x = to_model_input(decoded(image), spec).tensor
        captures = engine.capture(x, loaded.config.activation, spec)
        arrays["x"].append(x[0])
        arrays["acts"].append(captures.activations[0])
        arrays["logits"].append(captures.logits[0])
        for method, key in (("gradcam", "gradcam"), ("guided_backprop", "guided"),
                            ("crm", "crm")):
            if method not in loaded.unavailable:
                maps = METHODS[method].compute(captures, rows(range(k)))
                arrays[key].append(np.stack([m.values for m in maps]))
    out.update({key: np.stack(v) for key, v in arrays.items() if v})  # type: ignore[arg-type]
    return out


def references(model, x, acts, dtype):  # type: ignore[no-untyped-def]
    """torch's references for every image and class in ``dtype`` (export_matrix.torch_refs),
    and per image what the target was matched to."""
    import numpy as np
    import torch

    k = len(em.LABELS)
    res: dict[str, list[object]] = {"logits": [], "gradcam": [], "guided": [], "crm": []}
    notes = []
    for i in range(len(x)):
        xi = torch.from_numpy(x[i:i + 1])
        per_class = [em.torch_refs(model, xi, c, acts[i], dtype) for c in range(k)]
        first = per_class[0]
        notes.append({"target": first.get("torch_target"),
                      "target_act_err": first.get("target_act_err"),
                      "guided_gated": first.get("guided_gated")})
        res["logits"].append(first["logits"])
        res["guided"].append(np.stack([guided_map(r["guided"], em.STD) for r in per_class]))
        if all("gradcam" in r for r in per_class):
            res["gradcam"].append(np.stack([r["gradcam"] for r in per_class]))
            res["crm"].append(crm_reference(model, xi, acts[i], first["target_index"],
                                            first["logits"], dtype))
    return {key: np.stack(v) for key, v in res.items() if len(v) == len(x)}, notes


def crm_reference(model, xi, acts, index: int, logits, dtype):  # type: ignore[no-untyped-def]
    """CRM by brute force on torch's side, (K, h, w): for every (l, m) the network re-run
    with the matched target tensor (the ``index``-th of its shape, as torch_refs counts)
    zeroed at (l, m) across channels, map (z_k − z_k(l, m))²."""
    import numpy as np
    import torch

    c, h, w = acts.shape
    masked = np.empty((h, w, len(logits)))
    m = model.to(dtype)
    try:
        for l in range(h):
            for col in range(w):
                def zero(i, t, l=l, col=col):  # type: ignore[no-untyped-def]
                    if i != index:
                        return t
                    t = t.clone()
                    if tuple(t.shape[1:]) == (c, h, w):
                        t[:, :, l, col] = 0.0
                    else:  # channels last
                        t[:, l, col, :] = 0.0
                    return t
                mode = em.make_mode(guided=False, shapes=[(1, c, h, w), (1, h, w, c)],
                                    replace=zero)
                with torch.no_grad(), mode:
                    masked[l, col] = m(xi.to(dtype))[0].double().numpy()
    finally:
        model.float()
    return ((np.asarray(logits)[None, None, :] - masked) ** 2).transpose(2, 0, 1)


def guided_map(grad, std, channel_axis: int = 0):  # type: ignore[no-untyped-def]
    """A guided gradient w.r.t. the network input → the map ``guided_backprop`` answers:
    x = (image - mean) / std, so d/d(image) is each channel's gradient over its std, summed
    over the channels."""
    import numpy as np
    shape = [1, 1, 1]
    shape[channel_axis] = len(std)
    return (np.asarray(grad) / np.asarray(std, dtype=np.float64).reshape(shape)).sum(
        axis=channel_axis)


def _max_err(got, want) -> float:  # type: ignore[no-untyped-def]
    """The worst relative error over (image, class) maps."""
    return max(em.rel_err(got[i, c], want[i, c]) for i in range(len(want))
               for c in range(want.shape[1]))


def check_and_store(entry: dict[str, object], folder: Path, out: Path, size: int,
                    answers: Callable[[object], dict[str, object]],
                    refs: Callable[[object, object, str], tuple[dict[str, object],
                                                                list[dict[str, object]]]],
                    ) -> dict[str, object]:
    """The exported ``folder`` (model.onnx, model.toml) against its framework: draw images
    until float32 keeps its floors (``answers(images)``: the service's; ``refs(x, acts,
    "float64" | "float32")``: the framework's), compare, and copy the folder with its
    reference.npz into ``out`` when every error is within the test's tolerance. Returns
    ``entry`` completed (``failure`` set when it fails)."""
    import numpy as np

    for attempt in range(MAX_TRIES):
        images = pixels(IMAGES, size, em.SEED + 10 + attempt)
        try:
            ours = answers(images)
        except Exception as exc:  # noqa: BLE001 - recorded: the fixture is listed as failing
            entry["failure"] = f"load: {type(exc).__name__}: {str(exc)[:500]}"
            return entry
        r64, notes = refs(ours["x"], ours["acts"], "float64")
        r32, _ = refs(ours["x"], ours["acts"], "float32")
        floors = {"scores": em.rel_err(em._sigmoid(r32["logits"]), em._sigmoid(r64["logits"])),
                  "guided": _max_err(r32["guided"], r64["guided"])}
        for key in ("gradcam", "crm"):
            if key in r64 and key in r32:
                floors[key] = _max_err(r32[key], r64[key])
        if floors["guided"] <= FLOOR_SHARE * GUIDED_TOL and \
                floors.get("gradcam", 0.0) <= FLOOR_SHARE * GRADCAM_TOL and \
                floors.get("crm", 0.0) <= FLOOR_SHARE * CRM_TOL:
            break
    entry["pixels_seed"] = em.SEED + 10 + attempt
    entry["f32_floor"] = floors
    entry.update({key: ours[key] for key in ("target", "target_shape", "target_layout",
                                             "logits_tensor", "unavailable")})
    entry["framework_target"] = [n["target"] for n in notes]
    entry["target_act_err"] = max(float(n["target_act_err"] or 0.0) for n in notes)
    entry["guided_gated"] = notes[0]["guided_gated"]
    errors: dict[str, float] = {
        "scores": em.rel_err(em._sigmoid(ours["logits"]), em._sigmoid(r64["logits"]))}
    for key in ("gradcam", "crm"):
        if key in ours and key in r64:
            errors[key] = _max_err(ours[key], r64[key])
    if "guided" in ours:
        errors["guided"] = _max_err(ours["guided"], r64["guided"])
    entry["errors"] = errors
    problems = []
    if "gradcam" not in r64:
        problems.append(f"no framework tensor matches the target {ours['target']} "
                        f"(best rel. error {entry['target_act_err']:.1e})")
    for key, tol in (("scores", SCORES_TOL), ("gradcam", GRADCAM_TOL), ("guided", GUIDED_TOL),
                     ("crm", CRM_TOL)):
        if key not in errors:
            problems.append(f"no {key} from the service")
        elif errors[key] > tol:
            problems.append(f"{key} rel. error {errors[key]:.1e} > {tol:.0e}")
    if problems:
        entry["failure"] = "; ".join(problems)
        return entry
    # Guided maps of noise images do not compress: only each image's top class is kept.
    top = np.argmax(r64["logits"], axis=1)
    np.savez_compressed(folder / "reference.npz", pixels=images, logits=r64["logits"],
                        gradcam=r64["gradcam"], crm=r64["crm"], guided_class=top,
                        guided=r64["guided"][np.arange(IMAGES), top].astype(np.float32))
    dest = out / folder.name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(folder, dest)
    return entry


def make_one(fixture: Fixture, exporter: str, out: Path, work: Path) -> dict[str, object]:
    """Build, export and check one (fixture, exporter) (see :func:`check_and_store`)."""
    import copy

    import torch

    name = f"{fixture.name}-{exporter}"
    entry: dict[str, object] = {"library": fixture.library, "exporter": exporter,
                                "input_shape": [3, fixture.size, fixture.size]}
    torch.manual_seed(em.SEED)
    em.import_torchvision()
    model = fixture.build(len(em.LABELS))
    randomize(model, fixture.size, len(em.LABELS))
    entry["params"] = sum(p.numel() for p in model.parameters())
    folder = new_folder(work, name)
    x0 = em.make_images(1, fixture.size, em.SEED + 3)  # the exporters' example input
    try:
        em.export(copy.deepcopy(model), x0, folder / "model.onnx", exporter, False)
    except Exception as exc:  # noqa: BLE001 - a failing exporter is a result
        entry["failure"] = f"export: {type(exc).__name__}: {str(exc)[:500]}"
        return entry
    (folder / "model.toml").write_text(em.model_toml((fixture.size, fixture.size)))
    if not describe(entry, folder):
        return entry
    dtypes = {"float64": torch.float64, "float32": torch.float32}
    return check_and_store(entry, folder, out, fixture.size,
                           lambda images: service_answers(folder, images),
                           lambda x, acts, dtype: references(model, x, acts, dtypes[dtype]))


def new_folder(work: Path, name: str) -> Path:
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def describe(entry: dict[str, object], folder: Path) -> bool:
    """The exported file's opset, ops and size into ``entry``; False (and ``failure``) when
    it is too big to commit."""
    onnx_path = folder / "model.onnx"
    facts = em.onnx_facts(onnx_path)
    entry.update({"opset": facts["opset"], "ops": facts["ops"],
                  "onnx_bytes": onnx_path.stat().st_size})
    if entry["onnx_bytes"] > MAX_ONNX_BYTES:  # type: ignore[operator]
        entry["failure"] = f"model.onnx is {entry['onnx_bytes']} bytes"
        return False
    return True


def update_manifest(out: Path, results: dict[str, dict[str, object]]) -> None:
    """Passing entries into ``out/manifest.json`` (the others stay), failing ones out of it
    (with their folders)."""
    path = out / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    for key, entry in results.items():
        if "failure" in entry:
            manifest.pop(key, None)
            shutil.rmtree(out / key, ignore_errors=True)
        else:
            manifest[key] = entry
    path.write_text(json.dumps(dict(sorted(manifest.items())), indent=1, default=float) + "\n")


def summary(key: str, entry: dict[str, object]) -> str:
    if "failure" in entry:
        return f"{key}: FAILED: {entry['failure']}"
    errors = entry["errors"]
    assert isinstance(errors, dict)
    return (f"{key}: {int(entry['onnx_bytes']) / 1024:.0f} KB, target {entry['target']} "  # type: ignore[call-overload]
            f"{entry['target_shape']}, errors "
            + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
            + f", unavailable {sorted(entry['unavailable'])}")  # type: ignore[arg-type]


def finish(out: Path, report: dict[str, dict[str, object]], report_path: Path | None) -> None:
    if report_path:
        report_path.write_text(json.dumps(report, indent=1, default=float) + "\n")
    failed = [k for k, e in report.items() if "failure" in e]
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{len(report) - len(failed)} written, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else "") + f"; {out} holds {total / 2**20:.2f} MB")


def service_worker(folder: Path, images_path: Path, answers_path: Path) -> None:
    """``service_answers`` for another interpreter (the Keras script's): the images from an
    .npy, the arrays into an .npz and the rest into a .json beside it."""
    import numpy as np
    ours = service_answers(folder, np.load(images_path))
    arrays = {k: v for k, v in ours.items() if isinstance(v, np.ndarray)}
    np.savez(answers_path, **arrays)
    answers_path.with_suffix(".json").write_text(json.dumps(
        {k: v for k, v in ours.items() if k not in arrays}))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only", action="append", metavar="NAME",
                    help="fixture (repeatable; default: the committed ones of --list); the "
                         "manifest keeps the other entries")
    ap.add_argument("--exporter", action="append", choices=EXPORTERS)
    ap.add_argument("--report", type=Path, default=None,
                    help="write every entry, failing ones included, to this JSON file")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--_service", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args._service:
        service_worker(*(Path(a) for a in args._service))
        return 0
    if args.list:
        for f in FIXTURES.values():
            print(f"{f.name:16s} {f.size}x{f.size}  {'committed' if f.committed else '         '}"
                  f"  {f.library}")
        return 0
    unknown = set(args.only or ()) - set(FIXTURES)
    if unknown:
        raise SystemExit(f"unknown fixture(s) {', '.join(sorted(unknown))}; --list shows them")
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(2)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="exported-fixtures-") as tmp:
        for name in args.only or COMMITTED:
            for exporter in args.exporter or EXPORTERS:
                key = f"{name}-{exporter}"
                print(f"{key} ...", flush=True)
                report[key] = make_one(FIXTURES[name], exporter, out, Path(tmp))
                update_manifest(out, {key: report[key]})
                print(f"  {summary(key, report[key])}", flush=True)
    finish(out, report, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
