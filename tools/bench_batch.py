"""What a batch saves per image, in process: the compute stage of B requests as one batch
against the same B requests one at a time, and the forward pass alone.

    .venv/bin/python tools/make_fixtures.py --bench --bench-out /tmp/densenet121.onnx
    .venv/bin/python tools/bench_batch.py --model /tmp/densenet121.onnx [--threads 1 2]
        [--batch 1 2 4 8 16] [--rounds 7]

The dynamic batcher (service.runtime.worker) can only gain what the compute stage
(``service.pipeline.compute``: one forward pass over the batch's images, then each method
once over all its rows) saves when B requests go through it at once instead of one by one.
This measures that directly, with no HTTP, decode or render beside it: the same B decoded
phantoms (a 256×256 PNG; /explain's defaults: Grad-CAM and CRM of the labels over the
threshold), as one batch and as B batches of one, interleaved, medians over ``--rounds``;
and ``Engine.forward`` of B images at once against one at a time. Each thread count runs in
a process of its own (ONNX Runtime's thread pool is fixed per process). Ratios > 1: the
batch is cheaper per image.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IMAGE = ROOT / "tests" / "data" / "phantoms" / "cardiomegaly.png"


def measure(folder: Path, threads: int, batches: list[int], rounds: int) -> dict[str, object]:
    import onnxruntime as ort

    from service import imaging, pipeline
    from service.methods import Target
    from service.models.repository import load_repository
    from tools.bench_methods import interleaved

    repository = load_repository(folder.parent, default=None, providers=["CPUExecutionProvider"],
                                 threads=threads, head_batch=256, image_batch=max(batches))
    model = repository.get(None)  # the folder holds one model
    engine = model.members[0].engine
    options = pipeline.ExplainOptions(methods=("gradcam", "crm"), classes=None,
                                      target=Target.LOGIT, region_threshold=0.5,
                                      score_threshold=0.5)
    image = imaging.decode(IMAGE.read_bytes(), "image/png")

    def jobs(n: int) -> list[pipeline.Job]:
        return [pipeline.prepare(model, image, options, pipeline.Stopwatch()) for _ in range(n)]

    tensors = np.concatenate([j.inputs[0].tensor for j in jobs(max(batches))])
    calls = {}
    for b in batches:
        calls[f"compute_batch_{b}"] = (lambda b=b: pipeline.compute(model, jobs(b)))
        calls[f"compute_single_{b}"] = (lambda b=b: [pipeline.compute(model, jobs(1))
                                                     for _ in range(b)])
        calls[f"forward_batch_{b}"] = (lambda b=b: engine.forward(tensors[:b]))
        calls[f"forward_single_{b}"] = (lambda b=b: [engine.forward(tensors[k:k + 1])
                                                     for k in range(b)])
    # After an untimed round: every shape's first run allocates.
    times = interleaved(calls, rounds)
    medians = {name: statistics.median(v) for name, v in times.items()}
    out: dict[str, object] = {"threads": threads, "onnxruntime": ort.__version__, "rows": []}
    for b in batches:
        out["rows"].append({  # type: ignore[attr-defined]
            "batch": b,
            "compute_single_ms_per_image": medians[f"compute_single_{b}"] / b,
            "compute_batch_ms_per_image": medians[f"compute_batch_{b}"] / b,
            "forward_single_ms_per_image": medians[f"forward_single_{b}"] / b,
            "forward_batch_ms_per_image": medians[f"forward_batch_{b}"] / b,
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/densenet121.onnx"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(measure(args.worker, args.threads[0], args.batch, args.rounds)))
        return
    from tools.bench_load import repository

    with tempfile.TemporaryDirectory() as tmp:
        folder = repository(f"bench={args.model}", Path(tmp)) / "bench"
        print(f"{args.model.name}: {platform.processor() or platform.machine()}, "
              f"{args.rounds} rounds; ms per image, single = the same images one at a time")
        print("| threads | batch | compute single | compute batch | single ÷ batch "
              "| forward single | forward batch | single ÷ batch |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for threads in args.threads:
            done = subprocess.run(
                [sys.executable, __file__, "--worker", str(folder), "--threads", str(threads),
                 "--rounds", str(args.rounds), "--batch", *map(str, args.batch)],
                capture_output=True, text=True, check=True, cwd=ROOT)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            for row in result["rows"]:
                cs, cb = row["compute_single_ms_per_image"], row["compute_batch_ms_per_image"]
                fs, fb = row["forward_single_ms_per_image"], row["forward_batch_ms_per_image"]
                print(f"| {threads} | {row['batch']} | {cs:.1f} | {cb:.1f} | {cs / cb:.2f} | "
                      f"{fs:.1f} | {fb:.1f} | {fs / fb:.2f} |")


if __name__ == "__main__":
    main()
