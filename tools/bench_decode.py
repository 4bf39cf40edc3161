"""DICOM decode timings of real radiographs, each comparison measured in the same run.

    .venv/bin/python tools/bench_decode.py [--repeat 15]

1. Decode + preprocess of RG1_UNCR.dcm (1841 x 1955, 15-bit CR, MONOCHROME1, window
   15000/30000) for the bundled model's input (256 x 256 x 3): the old path (the per-pixel float64 VOI
   pipeline and one-call resize, kept in ``tests/imaging/reference_voi.py`` and
   ``tests/imaging/reference_preprocess.py``) against the current one (lookup table over
   every stored value, no frame copy, two-pass area resize), with whether the network
   inputs are bit-identical.
2. Reduced-resolution JPEG 2000 (``Settings.j2k_reduced_resolution``, off by default):
   ``decode_dicom`` at full resolution against ``decode_dicom(..., min_size=(256, 256))``
   for RG1_J2KR.dcm and RG3_J2KR.dcm, and how far the demo model's scores move from those
   of the uncompressed twin (RG1_UNCR.dcm, RG3_UNCR.dcm), which a full decode matches.

Everything includes parsing, the Modality/VOI LUTs and MONOCHROME1 inversion. Medians over
``--repeat`` interleaved rounds after one warm-up, on this machine's CPU. A benchmark, not
a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.imaging import decode
from service.imaging.dicom import decode_dicom
from service.imaging.preprocess import to_model_input
from service.models.repository import LoadedModel, load_model
from service.models.spec import InputSpec
from tests.imaging import reference_preprocess, reference_voi

MODEL = ROOT / "models" / "demo-cxr"
TWINS = {"RG1_J2KR.dcm": "RG1_UNCR.dcm", "RG3_J2KR.dcm": "RG3_UNCR.dcm"}


def _data(name: str) -> bytes:
    path = Path(name)
    if not path.is_file():
        found = get_testdata_file(name, download=False)
        if found is None:
            sys.exit(f"{name} is neither a file nor in the installed pydicom-data")
        path = Path(found)
    return path.read_bytes()


def _medians(fns: dict[str, Callable[[], object]], repeat: int, *,
             interleave: bool = True) -> dict[str, float]:
    """Median ms of each function over ``repeat`` rounds after one warm-up round.

    Interleaved (one call of each per round) unless told otherwise; then each function
    runs all its rounds in turn.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    blocks = [list(fns.items())] if interleave else [[item] for item in fns.items()]
    for block in blocks:
        for round_ in range(repeat + 1):
            for name, fn in block:
                start = time.perf_counter()
                fn()
                if round_:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def old_vs_new(spec: InputSpec, repeat: int) -> None:
    data = _data("RG1_UNCR.dcm")

    def old() -> np.ndarray:
        image = reference_voi.decode_dicom_old(data)
        return reference_preprocess.to_model_input(image, spec).tensor

    def new() -> np.ndarray:
        return to_model_input(decode(data, "application/dicom"), spec).tensor

    # One after the other: interleaved, the new path would also pay for the page faults
    # left by the old path's freed float64 frames (see BENCHMARKS.md).
    median = _medians({"old": old, "new": new}, repeat, interleave=False)
    together = _medians({"old": old, "new": new}, repeat)
    same = np.array_equal(old().view(np.uint32), new().view(np.uint32))
    print(f"decode + preprocess of RG1_UNCR.dcm to {spec.height}x{spec.width}x{spec.channels}, "
          f"median of {repeat}:")
    print(f"  old path  {median['old']:8.1f} ms")
    print(f"  new path  {median['new']:8.1f} ms  ({median['old'] / median['new']:.1f}x faster; "
          f"network input {'bit-identical' if same else 'DIFFERS'})")
    print(f"  interleaved in one loop: old {together['old']:.1f} ms, new {together['new']:.1f} ms")


def reduced_jpeg2000(model: LoadedModel, repeat: int) -> None:
    spec = model.config.input
    size = max(spec.height, spec.width)

    def scores(image: object) -> np.ndarray:
        logits = model.engine.forward(to_model_input(image, spec).tensor)[1]  # type: ignore[arg-type]
        return np.asarray(model.config.activation.scores(logits)[0])

    labels = list(model.config.labels)
    for name, twin in TWINS.items():
        data = _data(name)
        min_size = (size, size)
        median = _medians({"full": partial(decode_dicom, data),
                           "reduced": partial(decode_dicom, data, min_size=min_size)}, repeat)
        full = decode_dicom(data)
        reduced = decode_dicom(data, min_size=min_size)
        expected = scores(decode_dicom(_data(twin)))
        deviation = {"full": scores(full) - expected, "reduced": scores(reduced) - expected}
        worst = int(np.argmax(np.abs(deviation["reduced"])))
        print(f"{name}: {full.width}x{full.height}, model input {size}x{size}, "
              f"median of {repeat}")
        print(f"  full     {median['full']:8.1f} ms  pixels {full.pixels.shape}  "
              f"max |score - {twin}| {np.abs(deviation['full']).max():.6f}")
        print(f"  reduced  {median['reduced']:8.1f} ms  pixels {reduced.pixels.shape}  "
              f"max |score - {twin}| {abs(deviation['reduced'][worst]):.6f} "
              f"({labels[worst]})")
        print(f"  ratio    {median['reduced'] / median['full']:8.1%} of the full decode "
              f"({median['full'] / median['reduced']:.1f}x faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    model = load_model(MODEL, providers=["CPUExecutionProvider"], threads=1, head_batch=256)
    print(f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs")
    old_vs_new(model.config.input, args.repeat)
    reduced_jpeg2000(model, args.repeat)


if __name__ == "__main__":
    main()
