"""Each method's cost as a ratio to one plain forward pass, in the same run.

    .venv/bin/python tools/make_fixtures.py --bench --bench-out /tmp/densenet121.onnx
    .venv/bin/python tools/bench_methods.py [--model /tmp/densenet121.onnx] [--threads 2]
    .venv/bin/python tools/bench_methods.py --profile DIR   # per-op profile, backbone/guided
    .venv/bin/python tools/bench_methods.py --provider cuda --check   # on a GPU (tools/gpu_check.sh)

forward = ONNX Runtime on the unmodified model file; backbone = the service's own forward
pass (``Engine.forward``: the backbone graph, compiled as the service compiles the model,
i.e. specialised to the file's input shape). Every other call is what the service
computes for one image, arrays in and out (no HTTP, no pre- or post-processing), through
``Engine.capture`` and the method: gradcam = the backbone run + the head's VJP + the map;
guided_backprop / guided_gradcam with a class known up front = the guided graph (which is
also the forward pass) (+ Grad-CAM's head VJP + the product); crm = the backbone + H·W
masked head runs; fixations = the backbone + the all-activations run + the walk (the
authors' FC rule; fixations_summed: the class-discriminative one). Medians
over ``--repeat`` interleaved rounds after one warm-up, on this machine's CPU, or with
``--provider cuda`` on its GPU through the service's CUDA path (I/O binding, cuDNN's
search, the engine's warm-up); ``--check`` then also compares every call's maps with the
same calls on the CPU. tools/bench_pgc.py runs the same calls beside pytorch-grad-cam's.
"""

from __future__ import annotations

import argparse
import json
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

from service.graph.build import Capability, compile_model
from service.methods import METHODS, Row, rows
from service.models.activation import Activation
from service.runtime.engine import Engine
from service.runtime.sessions import CPU, make_session, requested_providers


def our_calls(model: Path, threads: int, image: np.ndarray, provider: str = "cpu"
              ) -> dict[str, Callable[[], object]]:
    """The service's calls for one image of ``model`` (and the plain forward), by name, on
    ``provider`` ("cpu" or "cuda", as ``MEDEXPLAIN_PROVIDERS`` takes it).

    The explained class is the image's top logit; ``*_14`` explain every class at once.

    Raises:
        SystemExit: CUDA was asked for and the engine fell back to the CPU.
    """
    source = onnx.load(str(model))
    # As the service compiles it: specialised to the input size it is fed (model.toml's).
    compiled = compile_model(source, input_shape=image.shape)
    providers = requested_providers(provider)
    engine = Engine(compiled, providers, threads)
    if engine.device != provider:
        raise SystemExit(engine.fallback or f"{provider} is not available in this "
                         f"ONNX Runtime ({', '.join(ort.get_available_providers())})")
    engine.warm_up(image.shape)
    plain = make_session(source, providers, threads)
    cls = int(np.argmax(engine.forward(image)[1][0]))
    k = engine.n_classes
    act = Activation.SIGMOID

    def method(name: str, classes: list[int | None], prefetch: bool = False) -> Callable[[], object]:
        # As the pipeline asks: known guided rows prefetched, fixations' forward pass traced.
        traced = [0] if Capability.FIXATIONS in METHODS[name].requires else []

        def run() -> object:
            known = [Row(0, c) for c in classes if c is not None] if prefetch else []
            return METHODS[name].compute(engine.capture(image, act, prefetch=known,
                                                        fixations=traced), rows(classes))
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


def differences(calls: dict[str, Callable[[], object]],
                cpu: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Per call, the largest difference between its maps from ``calls`` and from the same
    call on the CPU, relative to the largest magnitude of the CPU's maps (points: in
    pixels)."""
    out: dict[str, float] = {}
    for name, fn in calls.items():
        if name in ("forward", "backbone"):
            got, want = fn()[-1], cpu[name]()[-1]  # the logits
            out[name] = float(np.abs(got - want).max() / np.abs(want).max())
            continue
        got_maps, want_maps = fn(), cpu[name]()
        worst = 0.0
        for got, want in zip(got_maps, want_maps, strict=True):
            scale = float(np.abs(want.values).max()) or 1.0
            worst = max(worst, float(np.abs(got.values - want.values).max()) / scale)
            if want.points is not None:
                worst = max(worst, float(np.abs(got.points - want.points).max()))
        out[name] = worst
    return out


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


def profile_graphs(model: Path, threads: int, image: np.ndarray, rounds: int,
                   folder: Path) -> None:
    """ONNX Runtime's profiler on the backbone and the guided graph, run alternately
    ``rounds`` times after one untimed run of each: kernel milliseconds per run by op type,
    as ONNX Runtime optimised the graphs (NCHWc Conv, ReorderInput/Output, fused
    activations), each node's median over the runs summed per op type, and what the run
    took beyond its kernels (ONNX Runtime's work between nodes).

    The untimed run is left out because a graph's first run takes its memory from the
    arena for the first time (page faults): counted as one of 10 runs it made the guided
    graph's Concat nodes look twice as dear as the backbone's same nodes (5.2 against 2.6
    ms per run), which their medians are not (2.5 against 2.4)."""
    compiled = compile_model(onnx.load(str(model)), input_shape=image.shape)
    if compiled.guided is None:
        raise SystemExit(f"no guided graph: {compiled.guided_error}")
    make_session(compiled.backbone, ["CPUExecutionProvider"], threads)  # the shared pool
    sessions = {}
    for name, graph in (("backbone", compiled.backbone), ("guided", compiled.guided)):
        options = ort.SessionOptions()
        options.use_per_session_threads = False
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(folder / name)
        sessions[name] = ort.InferenceSession(graph.SerializeToString(), options,
                                              providers=["CPUExecutionProvider"])
    image_name = compiled.split.image
    logits = sessions["backbone"].run(None, {image_name: image})[1]
    seed = np.zeros_like(logits)
    seed[0, int(np.argmax(logits))] = 1.0
    seed_name = next(i.name for i in compiled.guided.graph.input if i.name != image_name)
    feeds = {"backbone": {image_name: image}, "guided": {image_name: image, seed_name: seed}}
    sessions["guided"].run(None, feeds["guided"])  # the backbone's untimed run was above
    for _ in range(rounds):
        for name, session in sessions.items():
            session.run(None, feeds[name])
    totals = {}
    for name, session in sessions.items():
        events = json.loads(Path(session.end_profiling()).read_text())
        runs = sorted((e for e in events if e.get("name") == "model_run"),
                      key=lambda e: e["ts"])
        first_end = runs[0]["ts"] + runs[0]["dur"]
        per_node: dict[tuple[str, str], list[float]] = {}  # (op type, node) → ms per run
        for e in events:
            if (e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                    and e["ts"] >= first_end):
                per_node.setdefault((e["args"]["op_name"], e["name"]), []).append(
                    e["dur"] / 1e3)
        per_op: dict[str, list[float]] = {}
        for (op, _), values in per_node.items():
            per_op.setdefault(op, []).append(statistics.median(values))
        totals[name] = sum(sum(v) for v in per_op.values())
        run_ms = statistics.median(e["dur"] / 1e3 for e in runs[1:])
        print(f"  {name}: run {run_ms:.1f} ms, kernels {totals[name]:.1f} ms, between "
              f"kernels {run_ms - totals[name]:.1f} ms ({len(per_node)} nodes; medians of "
              f"{len(runs) - 1} runs)")
        print(f"    {'op':20s} {'nodes':>6s} {'ms/run':>8s} {'÷ backbone kernels':>19s}")
        for op, values in sorted(per_op.items(), key=lambda kv: -sum(kv[1])):
            print(f"    {op:20s} {len(values):6d} {sum(values):8.2f} "
                  f"{sum(values) / totals['backbone']:19.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/densenet121.onnx"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                    help="where the service's calls and the plain forward run (default cpu)")
    ap.add_argument("--check", action="store_true",
                    help="also compare every call's maps with the CPU's (for --provider cuda)")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="instead: ONNX Runtime's per-op profile of the backbone and the "
                         "guided graph, --repeat alternate runs, its files written to DIR")
    args = ap.parse_args()

    dims = onnx.load(str(args.model), load_external_data=False).graph.input[0]
    shape = tuple(d.dim_value or 1 for d in dims.type.tensor_type.shape.dim)
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        profile_graphs(args.model, args.threads, image, args.repeat, args.profile)
        return
    # Interleaved, so a neighbour's load on the CPU hits every measurement alike.
    calls = our_calls(args.model, args.threads, image, args.provider)
    times = interleaved(calls, args.repeat)
    forward = statistics.median(times["forward"])
    where = (f"{platform.processor() or platform.machine()}, {args.threads} threads"
             if args.provider == "cpu" else f"{args.provider} (CPU threads: {args.threads})")
    print(f"{args.model.name}: input {'×'.join(map(str, shape))}; machine: {where}, ONNX "
          f"Runtime {ort.__version__}, median of {args.repeat}")
    print(f"  {'call':16s} {'ms':>8s} {'÷ forward':>10s} {'median of per-round ratios':>28s}"
          f" {'÷ backbone, per round':>22s}")
    for name, values in times.items():
        ms = statistics.median(values)
        ratio = statistics.median(t / f for t, f in zip(values, times["forward"]))
        own = statistics.median(t / f for t, f in zip(values, times["backbone"]))
        print(f"  {name:16s} {ms:8.1f} {ms / forward:10.2f} {ratio:28.2f} {own:22.2f}")
    if args.check:
        print(f"  largest difference from {CPU}, relative to the CPU map's largest value "
              "(points: pixels):")
        cpu = our_calls(args.model, args.threads, image, "cpu")
        for name, diff in differences(calls, cpu).items():
            print(f"  {name:16s} {diff:.2e}")


if __name__ == "__main__":
    main()
