"""Full vs reduced-resolution decoding of a JPEG 2000 radiograph, in the same run.

    .venv/bin/python tools/bench_decode.py [--file RG1_J2KR.dcm] [--size 256] [--repeat 15]

full = ``decode_dicom`` at full resolution (pydicom + pylibjpeg-openjpeg); reduced =
``decode_dicom(..., min_size=(size, size))``, which discards the finest JPEG 2000
resolution levels the network does not need. Both include parsing, the Modality/VOI LUTs
and MONOCHROME1 inversion. Medians over ``--repeat`` interleaved rounds after one warm-up,
on this machine's CPU. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydicom.data import get_testdata_file  # noqa: E402

from service.imaging.dicom import decode_dicom  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default="RG1_J2KR.dcm",
                        help="a pydicom-data file name, or a path to a DICOM file")
    parser.add_argument("--size", type=int, default=256, help="the model's square input side")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()

    path = Path(args.file)
    if not path.is_file():
        found = get_testdata_file(args.file, download=False)
        if found is None:
            sys.exit(f"{args.file} is neither a file nor in the installed pydicom-data")
        path = Path(found)
    data = path.read_bytes()
    min_size = (args.size, args.size)

    fns = {
        "full": lambda: decode_dicom(data),
        "reduced": lambda: decode_dicom(data, min_size=min_size),
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(args.repeat + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:  # the first round warms up
                times[name].append((time.perf_counter() - start) * 1e3)

    full = decode_dicom(data)
    reduced = decode_dicom(data, min_size=min_size)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{path.name}: {full.width}x{full.height}, model input {args.size}x{args.size}; "
          f"{platform.processor() or platform.machine()}, median of {args.repeat}")
    print(f"  full     {median['full']:8.1f} ms  pixels {full.pixels.shape}")
    print(f"  reduced  {median['reduced']:8.1f} ms  pixels {reduced.pixels.shape} "
          f"(reported size {reduced.width}x{reduced.height})")
    print(f"  ratio    {median['reduced'] / median['full']:8.1%} of the full decode")


if __name__ == "__main__":
    main()
