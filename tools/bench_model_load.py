"""What loading a model costs: seconds, and the memory it adds, warm-up included.

    # three torchvision networks with seeded random weights (the tools extra: torch)
    .venv/bin/python tools/bench_model_load.py --export /tmp/load-models
    # then, each measurement in a fresh process (no torch there)
    .venv/bin/python tools/bench_model_load.py /tmp/load-models/vgg16 /tmp/load-models/resnet50 \\
        /tmp/load-models/densenet121 [--rounds 2] [--breakdown] [--out load.json]

For every model folder (model.onnx + model.toml) and round, two fresh processes, one after
the other, so that neighbours' load on the CPU hits both alike:

* **plain**: ``onnxruntime.InferenceSession(model.onnx)`` with default options: its seconds
  (the yardstick of the 3× budget) and the RSS it adds.
* **service**: ``service.models.repository.load_model`` (read, specialise, compile, every
  session, the load's own check run) after the allocator tuning ``serve`` applies
  (service.runtime.memory) and after a load and Grad-CAM of the bundled demo model, so
  that the code it imports is not counted. RSS = VmRSS of /proc/self/status after the imports, after the
  load, then after the first call of each method on one image (the calls
  tools/bench_methods.py makes: ``Engine.capture`` + the method), peak = VmHWM; then
  median milliseconds over ``--repeat`` interleaved calls of the hot path (a forward pass,
  a Grad-CAM) and of a guided backprop.

``--breakdown`` adds a third process per model that builds the same things one at a time
and records the seconds of each step and the RSS after it (after handing the heap's free
pages back): read, hash, the weights held once, the compiled graphs, the assembly of each
graph the compiler leaves to its first lookup, each session (with the engine's own
options), each graph's first run. ``--cache`` adds two service processes
loading through one fresh disk compile cache, the first start (a miss: compiled and
written) and the second (a hit: what a deployment's later starts cost), and with
``--breakdown`` the hit's breakdown. The service rows also give each method's first call
in ms (a lazily made session is made there). Target = 2.5 × file size
+ 150 MB (MB = 2^20 bytes), the requirement's bound on what a loaded, warmed-up model adds.
``--options`` adds a fourth: the guided and fixations graphs' median run time under the
engine's session options and under the earlier ones, interleaved in one process.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("vgg16", "resnet50", "densenet121")


def rss_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB."""
    text = Path("/proc/self/status").read_text()

    def field(key: str) -> float:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
        return int(m.group(1)) / 1024.0 if m else float("nan")

    return field("VmRSS"), field("VmHWM")


def file_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 2**20


# --- the child processes -------------------------------------------------------------------


def plain_child(folder: Path) -> dict[str, object]:
    import onnxruntime as ort
    rss0, _ = rss_mb()
    start = time.perf_counter()
    session = ort.InferenceSession(str(folder / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    seconds = time.perf_counter() - start
    rss1, peak = rss_mb()
    del session
    return {"plain_s": round(seconds, 3), "plain_rss_mb": round(rss1 - rss0, 1),
            "plain_peak_mb": round(peak - rss0, 1)}


def _calls(loaded):  # type: ignore[no-untyped-def]
    """One image's call per method, as tools/bench_methods.py makes them."""
    import numpy as np

    from service.methods import METHODS, Row, rows
    from service.models.activation import Activation

    engine = loaded.engine
    spec = loaded.config.input
    shape = ((1, spec.channels, spec.height, spec.width) if spec.layout.value == "NCHW"
             else (1, spec.height, spec.width, spec.channels))
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    cls = int(np.argmax(engine.forward(image)[1][0]))
    act = Activation.SIGMOID

    def method(name: str, classes: list[int | None], prefetch: bool = False):  # type: ignore[no-untyped-def]
        def run() -> object:
            known = [Row(0, c) for c in classes if c is not None] if prefetch else []
            return METHODS[name].compute(engine.capture(image, act, prefetch=known),
                                         rows(classes))
        return run

    calls = {"gradcam": method("gradcam", [cls]), "crm": method("crm", [cls]),
             "crm_combined": method("crm_combined", [None]),
             "guided_backprop": method("guided_backprop", [cls], prefetch=True),
             "guided_gradcam": method("guided_gradcam", [cls], prefetch=True),
             "fixations": method("fixations", [cls]),
             "fixations_summed": method("fixations_summed", [cls])}
    available = {n: f for n, f in calls.items() if n not in loaded.unavailable}
    return image, available


def service_child(folder: Path, threads: int, repeat: int,
                  cache_dir: Path | None = None) -> dict[str, object]:
    sys.path.insert(0, str(ROOT))
    from service.graph.cache import CompileCache
    from service.models.repository import load_model
    from service.runtime.memory import keep_freed_memory

    keep_freed_memory()  # as `medexplain serve` does before it loads anything
    # The bundled model first, so that the code a load imports (the compiler, its rules)
    # is not counted as the measured model's memory.
    _calls(load_model(ROOT / "models" / "demo-cxr", providers=["CPUExecutionProvider"],
                      threads=threads, head_batch=256))[1]["gradcam"]()
    rss0, _ = rss_mb()
    start = time.perf_counter()
    loaded = load_model(folder, providers=["CPUExecutionProvider"], threads=threads,
                        head_batch=256,
                        cache=CompileCache(cache_dir) if cache_dir is not None else None)
    out: dict[str, object] = {"load_s": round(time.perf_counter() - start, 3)}
    rss, peak = rss_mb()
    out["rss_load_mb"] = round(rss - rss0, 1)
    out["peak_load_mb"] = round(peak - rss0, 1)
    image, calls = _calls(loaded)
    warm: dict[str, float] = {}
    first: dict[str, float] = {}
    for name, call in calls.items():
        t = time.perf_counter()
        call()
        first[name] = round((time.perf_counter() - t) * 1e3, 1)
        warm[name] = round(rss_mb()[0] - rss0, 1)
    out["rss_after_method_mb"] = warm
    out["first_call_ms"] = first
    rss, peak = rss_mb()
    out["rss_warm_mb"] = round(rss - rss0, 1)
    out["peak_mb"] = round(peak - rss0, 1)
    engine = loaded.engine
    hot = {"forward": lambda: engine.forward(image), "gradcam": calls.get("gradcam"),
           "guided_backprop": calls.get("guided_backprop")}
    times: dict[str, list[float]] = {k: [] for k, f in hot.items() if f is not None}
    for _ in range(repeat):
        for name, spent in times.items():
            t = time.perf_counter()
            hot[name]()  # type: ignore[misc]
            spent.append((time.perf_counter() - t) * 1e3)
    out["hot_ms"] = {k: round(statistics.median(v), 1) for k, v in times.items()}
    out["rss_end_mb"] = round(rss_mb()[0] - rss0, 1)
    return out


def breakdown_child(folder: Path, threads: int, cache_dir: Path | None = None
                    ) -> dict[str, object]:
    """The load step by step (the same calls load_model and Engine make), the seconds of
    each and the RSS after it; ``cache_dir``: through that disk compile cache (a second
    run over the same folder is a start with a warm cache)."""
    sys.path.insert(0, str(ROOT))
    import hashlib

    import numpy as np

    from service.graph import weights
    from service.graph.build import Capability
    from service.graph.cache import CompileCache
    from service.graph.specialise import specialise
    from service.models.repository import image_shape, load_model, read_config
    from service.runtime.engine import session_options_for
    from service.runtime.memory import keep_freed_memory, release_freed_memory
    from service.runtime.sessions import make_session

    keep_freed_memory()
    load_model(ROOT / "models" / "demo-cxr", providers=["CPUExecutionProvider"],
               threads=threads, head_batch=256)  # the imports, as in service_child
    steps: list[tuple[str, float, float]] = []
    rss0, _ = rss_mb()
    clock = [time.perf_counter()]

    def mark(step: str) -> None:
        seconds = time.perf_counter() - clock[0]
        release_freed_memory()  # what is still held, not what the heap kept
        steps.append((step, round(rss_mb()[0] - rss0, 1), round(seconds, 3)))
        clock[0] = time.perf_counter()

    raw = (folder / "model.onnx").read_bytes()
    mark("read file")
    digest = hashlib.sha256(raw).hexdigest()
    mark("sha256")
    model, held = weights.offload(raw, folder, "model.onnx", digest)
    mark("weights held")
    config = read_config(folder, model)
    spec = config.input
    shape = image_shape(spec.layout, spec.height, spec.width, spec.channels)
    mark("model.toml")
    hit = cache_dir is not None and any(cache_dir.glob("*/split.json"))
    compiled = CompileCache(cache_dir).compile(
        raw, model, layout=spec.layout, activation=config.activation.value,
        target_layer=config.target_layer, input_shape=shape, digest=digest)
    del raw
    mark("compile-cache hit (graphs read)" if hit else "compiled (raw file freed)")
    sessions = {}
    assembled = getattr(compiled.graphs, "assembled", frozenset(compiled.graphs))
    for cap in compiled.graphs:
        if cap not in assembled:  # a rarely used graph, assembled at its first run
            compiled.graphs[cap]
            mark(f"assemble {cap}")
        sessions[cap] = make_session(compiled.graphs[cap], ["CPUExecutionProvider"], threads,
                                     **session_options_for(cap))
        mark(f"session {cap}")
    split = compiled.split
    image = np.zeros(shape, dtype=np.float32)
    _c, h, w = split.target_shape
    acts, _ = sessions[Capability.BACKBONE].run([split.target, split.logits],
                                                {split.image: image})
    mark("run backbone (the load's check)")
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    acts, _ = sessions[Capability.BACKBONE].run([split.target, split.logits],
                                                {split.image: image})
    mark("run backbone again")
    masked = np.repeat(acts, min(h * w, 256), axis=0)
    logits = sessions[Capability.HEAD].run([split.logits], {split.target: masked})[0]
    mark(f"run head ×{len(masked)}")
    k = logits.shape[1]
    if Capability.HEAD_VJP in sessions:
        from service.graph.autodiff import SEED
        sessions[Capability.HEAD_VJP].run(None, {split.target: acts,
                                                 SEED: np.eye(k, dtype=np.float32)[:1]})
        mark("run head_vjp")
    if Capability.GUIDED in sessions:
        from service.graph.build import GUIDED_PREFIX
        sessions[Capability.GUIDED].run(None, {split.image: image, f"{GUIDED_PREFIX}seed":
                                               np.eye(k, dtype=np.float32)[:1]})
        mark("run guided")
    if Capability.FIXATIONS in sessions:
        sessions[Capability.FIXATIONS].run(None, {split.image: image})
        mark("run fixations")
    # Outside the steps: how much of a compilation specialising is (compile_model's first
    # step, on the same proto).
    t = time.perf_counter()
    specialise(model, shape)
    return {"steps": steps, "specialise_s": round(time.perf_counter() - t, 3),
            "weights_mb": round(sum(a.nbytes for a in held.arrays.values()) / 2**20, 1)}


def options_child(folder: Path, threads: int, repeat: int) -> dict[str, object]:
    """The guided and fixations graphs' run time under the engine's options against the
    earlier ones (repacked guided graph, NCHWc layout for both), interleaved in one
    process: the cost of their smaller sessions."""
    sys.path.insert(0, str(ROOT))
    import hashlib

    import numpy as np

    from service.graph import weights
    from service.graph.build import GUIDED_PREFIX, Capability, compile_model
    from service.models.repository import image_shape, read_config
    from service.runtime.engine import session_options_for
    from service.runtime.sessions import make_session

    raw = (folder / "model.onnx").read_bytes()
    model, _held = weights.offload(raw, folder, "model.onnx", hashlib.sha256(raw).hexdigest())
    config = read_config(folder, model)
    spec = config.input
    shape = image_shape(spec.layout, spec.height, spec.width, spec.channels)
    compiled = compile_model(model, layout=spec.layout, activation=config.activation.value,
                             target_layer=config.target_layer, input_shape=shape)
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    k = compiled.backbone.graph.output[1].type.tensor_type.shape.dim[-1].dim_value
    earlier = {Capability.GUIDED: {"prepack": True, "layout": True},
               Capability.FIXATIONS: {"prepack": False, "layout": True}}
    feeds = {Capability.GUIDED: {compiled.split.image: image,
                                 f"{GUIDED_PREFIX}seed": np.eye(k, dtype=np.float32)[:1]},
             Capability.FIXATIONS: {compiled.split.image: image}}
    out: dict[str, object] = {}
    for cap, before in earlier.items():
        if cap not in compiled.graphs:
            continue
        runs = {kind: make_session(compiled.graphs[cap], ["CPUExecutionProvider"], threads,
                                   **opts)
                for kind, opts in (("earlier", before), ("now", session_options_for(cap)))}
        times: dict[str, list[float]] = {kind: [] for kind in runs}
        for round_ in range(repeat + 1):
            for kind, session in runs.items():
                t = time.perf_counter()
                session.run(None, feeds[cap])
                if round_:
                    times[kind].append((time.perf_counter() - t) * 1e3)
        out[str(cap)] = {kind: round(statistics.median(v), 1) for kind, v in times.items()}
    return out


# --- the driver ----------------------------------------------------------------------------


def child(kind: str, folder: Path, args: argparse.Namespace,
          cache_dir: Path | None = None, root: Path | None = None) -> dict[str, object]:
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--_{kind}", str(folder),
           "--threads", str(args.threads), "--repeat", str(args.repeat)]
    if root is not None:
        cmd += ["--_root", str(root)]
    if cache_dir is not None:
        cmd += ["--_cache", str(cache_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False,
                          timeout=1200)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def export(out: Path) -> None:
    """The three networks as tools/export_matrix.py builds them, legacy exporter."""
    sys.path.insert(0, str(ROOT / "tools"))
    import export_matrix as em
    for name in ARCHS:
        arch = em.resolve_arch(f"tv/{name}")
        model = em.build(arch, len(em.LABELS))
        em.randomize(model, arch.size, len(em.LABELS))
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        em.export(model, em.make_images(1, arch.size, em.SEED + 3), folder / "model.onnx",
                  "legacy", static_batch=False)
        (folder / "model.toml").write_text(em.model_toml((arch.size, arch.size)))
        print(f"{folder}: {file_mb(folder):.1f} MB", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", type=Path)
    ap.add_argument("--export", type=Path, help="write the three networks here and exit")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10, help="hot-path calls per kind")
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--out", type=Path, help="results JSON")
    ap.add_argument("--_plain", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_service", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_breakdown", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_options", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--before", type=Path,
                    help="another checkout of the project (e.g. `git archive REV | tar -x`): "
                         "each round also loads with its service package, interleaved")
    ap.add_argument("--cache", action="store_true",
                    help="also load through a disk compile cache: a first start (miss) and a "
                         "second one (hit), each in a fresh process")
    ap.add_argument("--options", action="store_true",
                    help="also time the guided and fixations graphs under the engine's "
                         "options against the earlier ones")
    args = ap.parse_args()
    if args._root:
        global ROOT
        ROOT = args._root.resolve()  # the service package (and demo model) measured
    if args._plain:
        print(json.dumps(plain_child(args._plain)))
        return 0
    if args._service:
        print(json.dumps(service_child(args._service, args.threads, args.repeat, args._cache)))
        return 0
    if args._breakdown:
        print(json.dumps(breakdown_child(args._breakdown, args.threads, args._cache)))
        return 0
    if args._options:
        print(json.dumps(options_child(args._options, args.threads, args.repeat)))
        return 0
    if args.export:
        export(args.export)
        return 0
    import onnxruntime as ort
    print(f"# {shlex.join(['python', *sys.argv])}\n# {platform.processor() or platform.machine()}"
          f", ONNX Runtime {ort.__version__}, Python {platform.python_version()}; "
          f"load average {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
    results = []
    for folder in args.folders:
        size = file_mb(folder)
        row: dict[str, object] = {"model": folder.name, "file_mb": round(size, 1),
                                  "target_mb": round(2.5 * size + 150, 1), "rounds": []}
        row["rounds_before"] = []
        for _ in range(args.rounds):
            plain = child("plain", folder, args)
            if args.before:
                before = child("service", folder, args, root=args.before)
                row["rounds_before"].append({**plain, **before})  # type: ignore[attr-defined]
                print(json.dumps({"model": folder.name, "tree": "before", **plain, **before}),
                      flush=True)
            service = child("service", folder, args)
            row["rounds"].append({**plain, **service})  # type: ignore[attr-defined]
            print(json.dumps({"model": folder.name, **plain, **service}), flush=True)
        if args.breakdown:
            row["breakdown"] = child("breakdown", folder, args)
            print(json.dumps({"model": folder.name, **row["breakdown"]}), flush=True)
        if args.cache:
            with tempfile.TemporaryDirectory(prefix="load-cache-") as tmp:
                for start in ("miss", "hit"):
                    got = child("service", folder, args, Path(tmp))
                    row[f"cache_{start}"] = got
                    print(json.dumps({"model": folder.name, "cache": start, **got}), flush=True)
                if args.breakdown:
                    row["breakdown_hit"] = child("breakdown", folder, args, Path(tmp))
                    print(json.dumps({"model": folder.name, "cache": "hit",
                                      **row["breakdown_hit"]}), flush=True)
        if args.options:
            row["options_ms"] = child("options", folder, args)
            print(json.dumps({"model": folder.name, "options_ms": row["options_ms"]}),
                  flush=True)
        results.append(row)
    print("\n| model | file MB | target MB | RSS after load | after warm-up | peak | load s "
          "| plain s | ratio | forward ms | Grad-CAM ms | guided ms |\n|---|---:|---:|---:|---:|---:|---:"
          "|---:|---:|---:|---:|---:|")
    for row in [*results, *({**r, "model": f"{r['model']} (before)", "rounds": r["rounds_before"]}
                            for r in results if r["rounds_before"])]:
        ok = [r for r in row["rounds"] if "error" not in r]  # type: ignore[attr-defined]
        if not ok:
            print(f"| {row['model']} | error: {row['rounds'][0]['error'][-200:]!r} |")  # type: ignore[index]
            continue

        def med(key: str, rs: list[dict[str, object]] = ok) -> float:
            return statistics.median(float(r[key]) for r in rs)  # type: ignore[arg-type]

        hot = {k: statistics.median(r["hot_ms"][k] for r in ok) for k in ok[0]["hot_ms"]}  # type: ignore[index]
        print(f"| {row['model']} | {row['file_mb']:.0f} | {row['target_mb']:.0f} | "
              f"{med('rss_load_mb'):.0f} | {med('rss_warm_mb'):.0f} | {med('peak_mb'):.0f} | "
              f"{med('load_s'):.2f} | {med('plain_s'):.2f} | "
              f"{med('load_s') / med('plain_s'):.2f} | {hot.get('forward', 0):.1f} | "
              f"{hot.get('gradcam', 0):.1f} | {hot.get('guided_backprop', 0):.1f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
