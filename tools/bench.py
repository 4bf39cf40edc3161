"""Benchmarks of the demo model: explanation cost as a ratio to prediction, the pointing
game, and explanation quality against the phantoms' exact masks.

    python tools/bench.py speed [--repeat 30]
    python tools/bench.py pointing [--n 300] [--seed 7]
    python tools/bench.py quality [--n 200] [--seed 11] [--plot docs/quality.png]
                                  [--gallery docs/gallery.png]

All run in-process (no HTTP) on this machine's CPU with ONNX Runtime; NumPy + OpenCV only.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import phantoms
import quality as metrics

from service import pipeline
from service.api.request import ExplainParams
from service.graph.build import Capability
from service.imaging.base import DecodedImage
from service.imaging.preprocess import to_model_input
from service.methods import RawMap, Target, get_method, rows
from service.methods.fixations_summed import FcSelection, SummedFixations
from service.methods.maps import normalise, resize, smooth
from service.methods.regions import map_regions
from service.models.repository import LoadedModel, load_model
from service.outputs import JSON_OUTPUT, Packaging
from service.outputs import render as drawing

METHODS = ("gradcam", "crm", "crm_combined")


def _model(threads: int) -> LoadedModel:
    return load_model(ROOT / "models" / "demo-cxr", providers=["CPUExecutionProvider"],
                      threads=threads, head_batch=256)


def _median_ms(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def speed(args: argparse.Namespace) -> None:
    model = _model(args.threads)
    image = DecodedImage(phantoms.generate(np.random.default_rng(0), findings=["Nodule"]).image,
                         "png")
    labels = tuple(str(i) for i in range(len(model.config.labels)))

    def predict() -> None:
        pipeline.predict(model, image, pipeline.Stopwatch())

    def explain(methods: tuple[str, ...]):  # type: ignore[no-untyped-def]
        # What /explain does after decoding: compute, then the JSON output's PNG maps.
        params = ExplainParams(methods=methods, classes=labels)

        def run() -> None:
            result = pipeline.explain(model, image, params.options(), pipeline.Stopwatch())
            JSON_OUTPUT.render(result, params, Packaging.JSON)

        return run

    rows = [("predict", _median_ms(predict, args.repeat))]
    for methods in (("gradcam",), ("crm",), ("gradcam", "crm")):
        rows.append((f"explain({','.join(methods)}, all {len(labels)} classes)",
                     _median_ms(explain(methods), args.repeat)))
    print(f"machine: {platform.machine()} {platform.processor() or ''}, threads={args.threads}, "
          f"onnxruntime {ort.__version__}, numpy {np.__version__}, median of {args.repeat}")
    print(f"{'call':45s} {'ms':>8s} {'÷ predict':>10s}")
    for name, ms in rows:
        print(f"{name:45s} {ms:8.2f} {ms / rows[0][1]:10.2f}")


def pointing(args: argparse.Namespace) -> None:
    """Hit when the map's maximum (at the model grid) lies within ``tolerance`` px of the mask."""
    model = _model(args.threads)
    rng = np.random.default_rng(args.seed)
    hits = {(m, label): [0, 0] for m in METHODS for label in phantoms.LABELS}
    for _ in range(args.n):
        ph = phantoms.generate(rng)
        if not ph.masks:
            continue
        image = DecodedImage(ph.image, "png")
        present = [phantoms.LABELS.index(k) for k in ph.masks]
        options = ExplainParams(methods=METHODS, classes=tuple(map(str, present))).options()
        spec = model.config.input
        captures = model.engine.capture(to_model_input(image, spec).tensor,
                                        model.config.activation, spec)
        for method in METHODS:
            method_rows = rows(present if get_method(method).per_class else [None],
                               options.target)
            for raw in get_method(method).compute(captures, method_rows):
                values = resize(raw.values, 256, 256)
                for cls in ([raw.index] if raw.index is not None else present):
                    label = phantoms.LABELS[cls]
                    hit = metrics.pointing_hit(values, ph.masks[label], args.tolerance)
                    hits[(method, label)][0] += int(hit)
                    hits[(method, label)][1] += 1
    print(f"pointing game: {args.n} phantoms (seed {args.seed}), tolerance {args.tolerance} px "
          "at 256², hit = map maximum inside the dilated finding mask")
    print(f"{'method':14s}" + "".join(f"{label:>18s}" for label in phantoms.LABELS) + f"{'all':>8s}")
    for method in METHODS:
        row, total = [], [0, 0]
        for label in phantoms.LABELS:
            h, n = hits[(method, label)]
            total[0] += h
            total[1] += n
            row.append(f"{h / n:.3f} ({h}/{n})" if n else "-")
        print(f"{method:14s}" + "".join(f"{r:>18s}" for r in row) + f"{total[0] / total[1]:8.3f}")


QUALITY_METHODS = ("gradcam", "crm", "crm_combined", "guided_backprop", "guided_gradcam",
                   "fixations", "fixations_summed")
RANDOM = "random"
METRICS = ("pointing", "energy", "box_iou", "deletion", "insertion")
# Deletion and insertion baseline: the image blurred with σ = 16 px at 256² (1/16 of the
# width): a nodule or a pneumothorax's pleural line is gone, the anatomy's layout stays.
BLUR_SIGMA_FRACTION = 1 / 16
# The FC rules measured for a class-discriminative CNN Fixations (BENCHMARKS.md): the
# authors' conv / pool / Add / Concat rules throughout, a different choice at FC layers on
# a vector only. The served ones are scored as methods: `fixations` (per neuron, all > 0)
# and `fixations_summed` (summed, 50 % share).
FIXATION_CANDIDATES = {
    "fc: per neuron, 90 % share": FcSelection(summed=False, share=0.9),
    "fc: per neuron, 50 % share": FcSelection(summed=False, share=0.5),
    "fc: summed, all > 0": FcSelection(summed=True, share=1.0),
    "fc: summed, 90 % share": FcSelection(summed=True, share=0.9),
    "fc: summed, 25 % share": FcSelection(summed=True, share=0.25),
}
GALLERY_METHODS = ("gradcam", "crm", "guided_gradcam", "fixations", "fixations_summed")
# Gradient maps are drawn as their magnitude blurred by this σ (px at 256²), else invisible.
GALLERY_SMOOTH_PX = 3.0


def _predictor(model: LoadedModel):  # type: ignore[no-untyped-def]
    """(B, H, W) grey images on the model grid, 0..1 → probabilities (B, K), in chunks."""
    spec = model.config.input
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)

    def predict(images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), 64):
            batch = np.repeat(images[start:start + 64, :, :, None], spec.channels, axis=3)
            tensor = (batch - mean) / std
            if spec.layout.value == "NCHW":
                tensor = tensor.transpose(0, 3, 1, 2)
            logits = model.engine.forward(np.ascontiguousarray(tensor, dtype=np.float32))[1]
            out.append(model.config.activation.scores(logits))
        return np.concatenate(out)

    return predict


def _candidate_maps(model: LoadedModel, image: DecodedImage, classes: list[int],
                    options: pipeline.ExplainOptions) -> list[pipeline.Map]:
    """The maps of every FIXATION_CANDIDATES rule, as /explain would post-process them."""
    spec = model.config.input
    grid = (spec.height, spec.width)
    captures = model.engine.capture(to_model_input(image, spec).tensor,
                                    model.config.activation, spec)
    maps = []
    for name, selection in FIXATION_CANDIDATES.items():
        for raw in SummedFixations(selection).compute(captures, rows(classes, options.target)):
            maps.append(pipeline.Map(name, raw.index, raw.values, True,
                                     map_regions(raw, grid, image.pixels.shape[:2],
                                                 options.region_threshold), raw.points))
    return maps


def quality(args: argparse.Namespace) -> None:
    """Every method (and uniform random maps) against the masks of held-out phantoms."""
    import cv2

    model = _model(args.threads)
    spec = model.config.input
    grid = (spec.height, spec.width)
    predict = _predictor(model)
    rng = np.random.default_rng(args.seed)
    noise = np.random.default_rng(args.seed + 1)  # random maps and tie-breaking
    methods = tuple(args.methods.split(","))
    names = (*methods, *(FIXATION_CANDIDATES if args.candidates else ()), RANDOM)
    found: dict[tuple[str, str], list[float]] = {}
    per_label: dict[tuple[str, str, str], list[float]] = {}
    # Class pairs of multi-finding phantoms: (points differ, point-set Jaccard, both own hits).
    pairs: dict[str, list[tuple[float, float, float]]] = {}
    options = ExplainParams(methods=methods, target=Target.LOGIT).options()
    start = time.perf_counter()
    for _ in range(args.n):
        ph = phantoms.generate(rng)
        if not ph.masks:
            continue
        image = DecodedImage(ph.image, "png")
        present = [phantoms.LABELS.index(k) for k in ph.masks]
        result = pipeline.explain(model, image, replace(options, classes=tuple(map(str, present))),
                                  pipeline.Stopwatch())
        model_input = to_model_input(image, spec)
        noise_map = RawMap(noise.random(grid, dtype=np.float32), None, "model")
        random = pipeline.Map(  # the service's own region code, for a random map
            RANDOM, None, noise_map.values, True,
            map_regions(noise_map, grid, image.pixels.shape[:2], options.region_threshold))
        grey = model_input.image01.mean(axis=2)
        baseline = cv2.GaussianBlur(grey, (0, 0), BLUR_SIGMA_FRACTION * spec.width)
        extra = _candidate_maps(model, image, present, options) if args.candidates else []
        hits: dict[tuple[str, int], float] = {}
        for e in [*result.maps, *extra, random]:
            values = resize(e.values, *grid)
            deletion, insertion = metrics.deletion_insertion(grey, baseline, values, predict,
                                                             args.steps, noise)
            for cls in ([e.index] if e.index is not None else present):
                label = phantoms.LABELS[cls]
                mask = cv2.resize(ph.masks[label].astype(np.uint8), grid[::-1],
                                  interpolation=cv2.INTER_NEAREST) > 0
                box = tuple(e.regions[0].box) if e.regions else (0, 0, 0, 0)
                scores = {
                    "pointing": float(metrics.pointing_hit(values, mask, args.tolerance)),
                    "energy": metrics.energy_fraction(values, mask),
                    "box_iou": metrics.box_iou(box, metrics.mask_box(mask)),  # type: ignore[arg-type]
                    "deletion": float(deletion[cls]),
                    "insertion": float(insertion[cls]),
                }
                for metric, v in scores.items():
                    found.setdefault((e.method, metric), []).append(v)
                    per_label.setdefault((e.method, metric, label), []).append(v)
                hits[(e.method, cls)] = scores["pointing"]
        for e, other in itertools.combinations([*result.maps, *extra], 2):
            if e.method != other.method or e.index is None or other.index is None:
                continue
            both = hits[(e.method, e.index)] * hits[(e.method, other.index)]
            if e.points is None or other.points is None:
                pairs.setdefault(e.method, []).append((float("nan"), float("nan"), both))
                continue
            a = {tuple(p) for p in np.round(e.points, 3).tolist()}
            b = {tuple(p) for p in np.round(other.points, 3).tolist()}
            union = len(a | b)
            pairs.setdefault(e.method, []).append(
                (float(a != b), len(a & b) / union if union else 1.0, both))
    seconds = time.perf_counter() - start
    n_found = len(found[(RANDOM, "pointing")])
    print(f"explanation quality: {args.n} phantoms (seed {args.seed}), {n_found} findings, "
          f"demo-cxr, logit target, maps at the model grid {grid[0]}×{grid[1]}; "
          f"{seconds:.0f} s, onnxruntime {ort.__version__}, numpy {np.__version__}")
    print(f"pointing: max within {args.tolerance} px of the mask; energy: Σ|map| in mask; "
          "box_iou: first region vs mask box; deletion/insertion: RISE AUC, "
          f"{100 / args.steps:g} % of the pixels per step, baseline = image blurred with "
          f"σ = {BLUR_SIGMA_FRACTION * spec.width:g} px")
    header = "| method | " + " | ".join(METRICS) + " |"
    print(header)
    print("|---|" + "---:|" * len(METRICS))
    means = {(m, k): float(np.mean(found[(m, k)])) for m in names for k in METRICS}
    for m in names:
        print(f"| {m} | " + " | ".join(f"{means[(m, k)]:.3f}" for k in METRICS) + " |")
    for metric in ("pointing", "deletion", "insertion"):
        print(f"\n{metric} by label")
        print("| method | " + " | ".join(phantoms.LABELS) + " |")
        print("|---|" + "---:|" * len(phantoms.LABELS))
        for m in names:
            cells = []
            for label in phantoms.LABELS:
                v = per_label.get((m, metric, label), [])
                cells.append(f"{np.mean(v):.3f} (n={len(v)})" if v else "-")
            print(f"| {m} | " + " | ".join(cells) + " |")
    print("\nclass pairs of multi-finding phantoms: points differ (share of pairs), "
          "Jaccard overlap of the two point sets (mean), both maps point into their own "
          "finding (share)")
    print("| method | pairs | points differ | point overlap | both hit |")
    print("|---|---:|---:|---:|---:|")
    for m in names:
        if m not in pairs:
            continue
        rows = np.asarray(pairs[m])
        cells = [f"{np.mean(rows[:, k]):.3f}" if not np.isnan(rows[:, k]).all() else "-"
                 for k in range(3)]
        print(f"| {m} | {len(rows)} | " + " | ".join(cells) + " |")
    if args.plot:
        _save(args.plot, _plot(means, names))
    if args.gallery:
        _save(args.gallery, _gallery(model, args.seed))


def _save(path: str, image: np.ndarray) -> None:
    import cv2

    out = ROOT / path
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {path} ({out.stat().st_size / 1024:.0f} KiB)")


_FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX
_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def _text(img: np.ndarray, text: str, xy: tuple[int, int], scale: float = 0.45,
          colour: tuple[int, int, int] = (0, 0, 0)) -> None:
    import cv2

    cv2.putText(img, text, xy, _FONT, scale, colour, 1, cv2.LINE_AA)


def _plot(means: dict[tuple[str, str], float], names: tuple[str, ...]) -> np.ndarray:
    """One bar panel per metric, a bar per method, values printed; RGB uint8."""
    import cv2

    titles = {"pointing": "pointing game (higher better)", "energy": "energy in mask (higher)",
              "box_iou": "box IoU (higher)", "deletion": "deletion AUC (lower better)",
              "insertion": "insertion AUC (higher)"}
    pw, ph, top, bottom = 250, 230, 28, 20
    img = np.full((ph + 60, pw * len(METRICS), 3), 255, dtype=np.uint8)
    bar = (pw - 30) // len(names)
    for p, metric in enumerate(METRICS):
        x0 = p * pw + 15
        _text(img, titles[metric], (p * pw + 8, 18), 0.42)
        base = ph - bottom
        cv2.line(img, (x0, base), (x0 + bar * len(names), base), (0, 0, 0), 1)
        for i, m in enumerate(names):
            v = means[(m, metric)]
            h = round(v * (base - top - 14))
            x = x0 + i * bar
            colour = _COLOURS[i % len(_COLOURS)]
            cv2.rectangle(img, (x + 2, base - h), (x + bar - 3, base), colour, -1)
            _text(img, f"{v:.2f}"[1:] if v < 1 else "1.0", (x + 1, base - h - 4), 0.33)
    for i, m in enumerate(names):  # legend
        x = 10 + i * (pw * len(METRICS) - 20) // len(names)
        cv2.rectangle(img, (x, ph + 22), (x + 14, ph + 36), _COLOURS[i % len(_COLOURS)], -1)
        _text(img, m, (x + 18, ph + 34), 0.45)
    return img


def _gallery(model: LoadedModel, seed: int, cell: int = 120) -> np.ndarray:
    """Rows: one phantom per finding; columns: the image and overlays; mask outline white;
    fixations points as white dots; gradient maps as |map| blurred (σ 3 px)."""
    import cv2

    rng = np.random.default_rng(seed + 2)
    columns = ("original", *GALLERY_METHODS)
    label_w, head = 118, 22
    img = np.full((head + cell * len(phantoms.LABELS), label_w + cell * len(columns), 3), 255,
                  dtype=np.uint8)
    for c, name in enumerate(columns):
        _text(img, name, (label_w + c * cell + 6, 16))
    for r, label in enumerate(phantoms.LABELS):
        ph = phantoms.generate(rng, findings=[label])
        image = DecodedImage(ph.image, "png")
        options = ExplainParams(methods=GALLERY_METHODS, classes=(label,)).options()
        result = pipeline.explain(model, image, options, pipeline.Stopwatch())
        image01 = to_model_input(image, model.config.input).image01
        grey = np.repeat(image01.mean(axis=2, keepdims=True), 3, axis=2)
        tiles = [(np.clip(grey, 0, 1) * 255).round().astype(np.uint8)]
        for e in result.maps:
            values = normalise(resize(e.values, *image01.shape[:2]))
            if Capability.GUIDED in get_method(e.method).requires:  # pixel speckle: local energy
                values = normalise(smooth(values, GALLERY_SMOOTH_PX))
            levels = drawing.to_uint8(values, *values.shape)
            tile = drawing.overlay(levels, drawing.grey_uint8(image01, *values.shape),
                                   rgb=True, alpha=0.6)
            for x, y in (e.points if e.points is not None else []):
                cv2.circle(tile, (round(x), round(y)), 2, (255, 255, 255), -1)
            tiles.append(tile)
        mask = cv2.resize(ph.masks[label].astype(np.uint8), image01.shape[1::-1],
                          interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        y0 = head + r * cell
        score = float(result.scores[phantoms.LABELS.index(label)])
        _text(img, label, (6, y0 + cell // 2 - 4), 0.42)
        _text(img, f"p = {score:.2f}", (6, y0 + cell // 2 + 14), 0.42)
        for c, tile in enumerate(tiles):
            tile = np.ascontiguousarray(tile)
            cv2.drawContours(tile, contours, -1, (255, 255, 255), 1)
            small = cv2.resize(tile, (cell, cell), interpolation=cv2.INTER_AREA)
            img[y0:y0 + cell, label_w + c * cell:label_w + (c + 1) * cell] = small
    return img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--repeat", type=int, default=30)
    s.set_defaults(run=speed)
    p = sub.add_parser("pointing")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--tolerance", type=int, default=17,
                   help="px at 256² (15 px at 224², the usual pointing-game tolerance)")
    p.set_defaults(run=pointing)
    q = sub.add_parser("quality", help="pointing game, energy in mask, box IoU, deletion and "
                                       "insertion AUC for every method and random maps")
    q.add_argument("--n", type=int, default=200)
    q.add_argument("--seed", type=int, default=11)
    q.add_argument("--tolerance", type=int, default=17, help="pointing game, px at 256²")
    q.add_argument("--steps", type=int, default=25,
                   help="deletion/insertion steps over all pixels (25: 4 %% per step)")
    q.add_argument("--methods", default=",".join(QUALITY_METHODS),
                   help="comma list of served methods to score")
    q.add_argument("--candidates", action="store_true",
                   help="also score every FIXATION_CANDIDATES rule of CNN Fixations")
    q.add_argument("--plot", default="docs/quality.png", help="bar charts ('' for none)")
    q.add_argument("--gallery", default="docs/gallery.png", help="overlays ('' for none)")
    q.set_defaults(run=quality)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
