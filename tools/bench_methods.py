"""Each method's cost as a ratio to one plain forward pass, in the same run.

    .venv/bin/python tools/make_fixtures.py --bench --bench-out /tmp/densenet121.onnx
    .venv/bin/python tools/bench_methods.py [--model /tmp/densenet121.onnx] [--threads 2]

forward = ONNX Runtime on the unmodified model file; backbone = the service's own forward
pass (``Engine.forward``: the backbone graph, compiled as the service compiles the model,
i.e. specialised to the file's input shape). Every other call is what the service
computes for one image, arrays in and out (no HTTP, no pre- or post-processing), through
``Engine.capture`` and the method: gradcam = the backbone run + the head's VJP + the map;
guided_backprop / guided_gradcam with a class known up front = the guided graph (which is
also the forward pass) (+ Grad-CAM's head VJP + the product); crm = the backbone + H·W
masked head runs; fixations = the backbone + the all-activations run + the walk (the
authors' FC rule; fixations_summed: the class-discriminative one). Medians
over ``--repeat`` interleaved rounds after one warm-up, on this machine's CPU.
tools/bench_pgc.py runs the same calls beside pytorch-grad-cam's.
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

from service.graph.build import compile_model
from service.methods import METHODS, Row, rows
from service.models.activation import Activation
from service.runtime.engine import Engine
from service.runtime.sessions import make_session


def our_calls(model: Path, threads: int, image: np.ndarray) -> dict[str, Callable[[], object]]:
    """The service's calls for one image of ``model`` (and the plain forward), by name.

    The explained class is the image's top logit; ``*_14`` explain every class at once.
    """
    source = onnx.load(str(model))
    # As the service compiles it: specialised to the input size it is fed (model.toml's).
    compiled = compile_model(source, input_shape=image.shape)
    engine = Engine(compiled, ["CPUExecutionProvider"], threads)
    plain = make_session(source, ["CPUExecutionProvider"], threads)
    cls = int(np.argmax(engine.forward(image)[1][0]))
    k = engine.n_classes
    act = Activation.SIGMOID

    def method(name: str, classes: list[int | None], prefetch: bool = False) -> Callable[[], object]:
        def run() -> object:
            known = [Row(0, c) for c in classes if c is not None] if prefetch else []
            return METHODS[name].compute(engine.capture(image, act, prefetch=known),
                                         rows(classes))
        return run

    return {
        "forward": lambda: plain.run(None, {compiled.split.image: image}),
        "backbone": lambda: engine.forward(image),
        "gradcam": method("gradcam", [cls]),
        "gradcam_14": method("gradcam", list(range(k))),
        "guided_backprop": method("guided_backprop", [cls], prefetch=True),
        "guided_gradcam": method("guided_gradcam", [cls], prefetch=True),
        "crm": method("crm", [cls]),
        "crm_combined": method("crm_combined", [None]),
        "fixations": method("fixations", [cls]),
        "fixations_summed": method("fixations_summed", [cls]),
    }


def interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
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
    args = ap.parse_args()

    dims = onnx.load(str(args.model), load_external_data=False).graph.input[0]
    shape = tuple(d.dim_value or 1 for d in dims.type.tensor_type.shape.dim)
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    # Interleaved, so a neighbour's load on the CPU hits every measurement alike.
    times = interleaved(our_calls(args.model, args.threads, image), args.repeat)
    forward = statistics.median(times["forward"])
    print(f"{args.model.name}: input {'×'.join(map(str, shape))}; machine: "
          f"{platform.processor() or platform.machine()}, ONNX Runtime {ort.__version__}, "
          f"{args.threads} threads, median of {args.repeat}")
    print(f"  {'call':16s} {'ms':>8s} {'÷ forward':>10s} {'median of per-round ratios':>28s}"
          f" {'÷ backbone, per round':>22s}")
    for name, values in times.items():
        ms = statistics.median(values)
        ratio = statistics.median(t / f for t, f in zip(values, times["forward"]))
        own = statistics.median(t / f for t, f in zip(values, times["backbone"]))
        print(f"  {name:16s} {ms:8.1f} {ms / forward:10.2f} {ratio:28.2f} {own:22.2f}")


if __name__ == "__main__":
    main()
