"""Benchmarks of the demo model: explanation cost as a ratio to prediction, and the pointing game.

    python tools/bench.py speed [--repeat 30]
    python tools/bench.py pointing [--n 300] [--seed 7]

Both run in-process (no HTTP) on this machine's CPU with ONNX Runtime; NumPy + OpenCV only.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import phantoms  # noqa: E402

from service import pipeline  # noqa: E402
from service.imaging.base import DecodedImage  # noqa: E402
from service.methods import Target, get_method  # noqa: E402
from service.methods.render import Encoding, Size, resize  # noqa: E402
from service.models.repository import LoadedModel, load_model  # noqa: E402

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
        options = pipeline.ExplainOptions(methods=methods, classes=labels, size=Size.MODEL)
        return lambda: pipeline.explain(model, image, options, pipeline.Stopwatch())

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
    import cv2

    model = _model(args.threads)
    rng = np.random.default_rng(args.seed)
    hits = {(m, label): [0, 0] for m in METHODS for label in phantoms.LABELS}
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE,
                                       (2 * args.tolerance + 1, 2 * args.tolerance + 1))
    for _ in range(args.n):
        ph = phantoms.generate(rng)
        if not ph.masks:
            continue
        image = DecodedImage(ph.image, "png")
        present = [phantoms.LABELS.index(k) for k in ph.masks]
        options = pipeline.ExplainOptions(methods=METHODS, classes=tuple(map(str, present)),
                                          size=Size.MODEL, encoding=Encoding.NPY,
                                          target=Target.LOGIT)
        fwd = pipeline.forward(model, image, pipeline.Stopwatch())
        for method in METHODS:
            for raw in get_method(method).compute(fwd.captures, present, options.target):
                values = resize(raw.values, 256, 256)
                y, x = np.unravel_index(int(np.argmax(values)), values.shape)
                for cls in ([raw.index] if raw.index is not None else present):
                    label = phantoms.LABELS[cls]
                    mask = cv2.dilate(ph.masks[label].astype(np.uint8), kernel) > 0
                    hits[(method, label)][0] += int(mask[y, x])
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
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
