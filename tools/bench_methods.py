"""Each method's cost for one class as a ratio to one plain forward pass, in the same run.

    .venv/bin/python tools/make_fixtures.py --bench --bench-out /tmp/densenet121.onnx
    .venv/bin/python tools/bench_methods.py [--model /tmp/densenet121.onnx] [--threads 2]

forward = ONNX Runtime on the unmodified model file. gradcam = the backbone run + the
head's VJP + the map; guided_gradcam = the guided graph (which is also the forward pass) +
Grad-CAM's head VJP + the product; fixations = the all-activations run + the walk (the
authors' FC rule; fixations_summed: the class-discriminative one). Medians
over ``--repeat`` interleaved rounds after one warm-up, on this machine's CPU; no HTTP,
no pre- or post-processing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.graph.build import compile_model  # noqa: E402
from service.methods import METHODS, Target, rows  # noqa: E402
from service.methods.fixations import walk  # noqa: E402
from service.methods.fixations_summed import SummedFixations  # noqa: E402
from service.models.activation import Activation  # noqa: E402
from service.runtime.engine import Engine  # noqa: E402
from service.runtime.sessions import make_session  # noqa: E402


def _interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Milliseconds of each function per round, after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeat + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/densenet121.onnx"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--profile", action="store_true", help="cProfile the walk")
    args = ap.parse_args()

    source = onnx.load(str(args.model))
    start = time.perf_counter()
    compiled = compile_model(source)
    compile_s = time.perf_counter() - start
    plan = compiled.fixations_plan
    if plan is None:
        raise SystemExit(f"no fixations graph: {compiled.fixations_error}")
    engine = Engine(compiled, ["CPUExecutionProvider"], args.threads)
    shape = tuple(d.dim_value or 1 for d in
                  compiled.backbone.graph.input[0].type.tensor_type.shape.dim)
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    cls = int(np.argmax(engine.forward(image)[1][0]))
    acts = engine.all_activations(image)
    plain = make_session(source, ["CPUExecutionProvider"], args.threads)
    asked = rows([cls], Target.LOGIT)

    def gradcam() -> object:
        return METHODS["gradcam"].compute(engine.capture(image, Activation.NONE), asked)

    def guided_gradcam() -> object:
        # The class known up front: the guided graph is the forward pass (prefetched rows).
        captures = engine.capture(image, Activation.NONE, prefetch=asked)
        return METHODS["guided_gradcam"].compute(captures, asked)

    summed = METHODS["fixations_summed"]
    assert isinstance(summed, SummedFixations)

    # Interleaved, so a neighbour's load on the CPU hits every measurement alike.
    times = _interleaved({
        "forward": lambda: plain.run(None, {compiled.split.image: image}),
        "gradcam": gradcam,
        "guided_gradcam": guided_gradcam,
        "all activations": lambda: engine.all_activations(image),
        "walk": lambda: walk(plan, acts, [cls]),
        "fixations": lambda: walk(plan, engine.all_activations(image), [cls]),
        "fixations_summed": lambda: walk(plan, engine.all_activations(image), [cls],
                                         fc=summed.selection),
    }, args.repeat)
    med = {k: statistics.median(v) for k, v in times.items()}
    forward = med["forward"]
    points = walk(plan, acts, [cls])[plan.image]
    exposed = sum(a.nbytes for a in acts.values()) / 2**20

    print(f"{args.model.name}: {len(plan.steps)} steps, {len(plan.needed)} exposed tensors "
          f"({exposed:.1f} MiB), {len(points)} image points for class {cls}; compiled in "
          f"{compile_s:.1f} s")
    print(f"machine: {platform.processor() or platform.machine()}, ONNX Runtime "
          f"{ort.__version__}, {args.threads} threads, median of {args.repeat}")
    print(f"  {'call':16s} {'ms':>8s} {'÷ forward':>10s} {'median of per-round ratios':>28s}")
    for name, ms in med.items():
        ratio = statistics.median(t / f for t, f in zip(times[name], times["forward"]))
        print(f"  {name:16s} {ms:8.1f} {ms / forward:10.2f} {ratio:28.2f}")
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(lambda: [walk(plan, acts, [cls]) for _ in range(5)])
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(20)


if __name__ == "__main__":
    main()
