"""pytorch-grad-cam on torch against medexplain on ONNX Runtime: DenseNet-121, the same
weights, each library in its own process, interleaved rounds.

    .venv/bin/python tools/bench_pgc.py [--size 224] [--threads 2] [--rounds 15]
        [--calls guided_backprop,guided_gradcam] [--before <another checkout>]

The torch worker builds tools/make_fixtures.py's benchmark DenseNet-121 (growth 32, blocks
6-12-24-16, 14 classes, random weights from seed 121; its rectifiers as nn.ReLU, which
pytorch-grad-cam's guided model swaps for its own) and exports it to ONNX in a temporary
folder; the ONNX Runtime worker compiles that file as the service does. Both get the same
random image; the explained class is its top logit. Each round sends every call once to each
worker, one at a time (the order of the calls and of the workers rotated every round), so
the processes never compete for the cores and slow drifts of the machine hit all alike;
each worker times its own call, after ``--pause`` seconds of idle (the previous call's
threads, spinning for more work, would otherwise share the cores with it). ``--before``
adds a third worker, the ONNX Runtime worker of another checkout (its own tools/ and
service/), for before/after numbers from one run; ``--calls`` runs a subset (more rounds in
the same time). After one warm-up round (without the 14-class call): medians per call;
ratios are medians of the per-round ratios.

pytorch-grad-cam's calls (grad-cam 1.5.7): forward = ``model(x)`` without gradients;
gradcam = ``GradCAM(model, [target layer])(x, [ClassifierOutputTarget(c)])``, the target
layer being the tensor medexplain detects (the final ReLU of ``features``); gradcam_14 =
that for each of the 14 classes (it takes one target per image in the batch); guided_backprop
= ``GuidedBackpropReLUModel(model, "cpu")(x, c)``; guided_gradcam = both, multiplied as its
README does; torch flushes denormals to zero (faster for it, see torch_calls). Ours: tools/bench_methods.py's ``our_calls`` (forward = a plain ONNX Runtime
session on the exported file, backbone = the service's own forward pass). backbone, crm,
crm_combined and fixations exist only on our side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CALLS = ("forward", "backbone", "gradcam", "gradcam_14", "guided_backprop", "guided_gradcam",
         "crm", "crm_combined", "fixations")


def _placeholder(attr: str) -> type:
    if attr.startswith("__"):
        raise AttributeError(attr)
    return object


def torch_calls(size: int, threads: int, image: np.ndarray,
                onnx_path: Path) -> dict[str, Callable[[], object]]:
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT / "tools"))
    import make_fixtures

    if "torchvision" not in sys.modules:
        # pytorch-grad-cam imports torchvision's transforms only for image helpers and
        # methods not used here; a torchvision wheel built for another torch (a CUDA build
        # beside torch+cpu) cannot load its operators, so placeholders stand in for it.
        try:
            import torchvision.transforms  # noqa: F401
        except RuntimeError:
            for name in ("torchvision", "torchvision.transforms",
                         "torchvision.transforms.functional"):
                stand_in = types.ModuleType(name)
                stand_in.__path__ = []  # type: ignore[attr-defined]
                stand_in.__getattr__ = _placeholder  # type: ignore[method-assign]
                sys.modules[name] = stand_in
    from pytorch_grad_cam import GradCAM, GuidedBackpropReLUModel
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.set_num_threads(threads)
    # The random weights leave denormal activations, which torch's CPU kernels take a slow
    # path for (measured 3× on the forward pass); flushing them only helps pytorch-grad-cam.
    torch.set_flush_denormal(True)
    make_fixtures.make_bench(onnx_path, 14, size)
    torch.manual_seed(121)  # make_bench's model, again (it does not return it)
    model = make_fixtures.DenseNet(14, growth=32, blocks=(6, 12, 24, 16), init=64, bn_size=4,
                                   hidden=None)
    make_fixtures.randomize(model, (3, size, size), torch.Generator().manual_seed(121),
                            batch=2)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, make_fixtures.Act) and child.kind == "relu":
                setattr(parent, name, nn.ReLU())
    model.eval()
    x = torch.from_numpy(image)
    with torch.no_grad():
        logits = model(x)
    cls = int(logits.argmax())
    cam = GradCAM(model=model, target_layers=[model.target])
    guided = GuidedBackpropReLUModel(model=model, device=torch.device("cpu"))

    def forward() -> object:
        with torch.no_grad():
            return model(x)

    def gradcam_n(classes: list[int]) -> Callable[[], object]:
        return lambda: [cam(input_tensor=x, targets=[ClassifierOutputTarget(c)])
                        for c in classes]

    def guided_gradcam() -> object:
        mask = cam(input_tensor=x, targets=[ClassifierOutputTarget(cls)])[0]
        return guided(x, target_category=cls) * mask[..., None]

    return {"forward": forward, "gradcam": gradcam_n([cls]),
            "gradcam_14": gradcam_n(list(range(14))),
            "guided_backprop": lambda: guided(x, target_category=cls),
            "guided_gradcam": guided_gradcam, "_logits": lambda: logits.numpy()}


def worker(kind: str, size: int, threads: int, onnx_path: Path) -> None:
    """Answer 'name' lines on stdin with the call's milliseconds on stdout."""
    image = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
    # stdout carries the answers; whatever the builders print goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        calls, logits = _calls(kind, size, threads, image, onnx_path)
    print(json.dumps({"ready": True, "logits": np.asarray(logits).ravel().tolist()}),
          flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name not in calls:
            print(json.dumps({"ms": None}), flush=True)
            continue
        start = time.perf_counter()
        calls[name]()
        print(json.dumps({"ms": (time.perf_counter() - start) * 1e3}), flush=True)


def _calls(kind: str, size: int, threads: int, image: np.ndarray,
           onnx_path: Path) -> tuple[dict[str, Callable[[], object]], object]:
    if kind == "torch":
        calls = torch_calls(size, threads, image, onnx_path)
        logits = calls.pop("_logits")()
    else:
        sys.path.insert(0, str(ROOT / "tools"))
        sys.path.insert(0, str(ROOT))
        import bench_methods

        calls = bench_methods.our_calls(onnx_path, threads, image)
        logits = calls["forward"]()[0]  # type: ignore[index]
    return calls, logits


class Worker:
    def __init__(self, kind: str, args: argparse.Namespace, onnx_path: Path,
                 root: Path = ROOT) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        # The worker runs this file of ``root``'s tree, so ``root``'s service is measured.
        self.proc = subprocess.Popen(
            [sys.executable, str(root / "tools" / Path(__file__).name), "--worker", kind,
             "--size", str(args.size), "--threads", str(args.threads), "--onnx",
             str(onnx_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=root)
        self.ready = self._read()

    def _read(self) -> dict[str, object]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.proc.args[3]} exited ({self.proc.wait()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def call(self, name: str) -> float | None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        return self._read()["ms"]  # type: ignore[return-value]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--worker", choices=["torch", "ort"])
    ap.add_argument("--onnx", type=Path)
    ap.add_argument("--out", type=Path, help="also write the medians as JSON")
    ap.add_argument("--calls", help=f"comma-separated subset of {','.join(CALLS)} "
                                    "(forward and backbone are always run: the ratios need them)")
    ap.add_argument("--pause", type=float, default=0.2,
                    help="seconds of idle before each call (default 0.2): the threads of the "
                         "process that ran the call before, spinning for more work, otherwise "
                         "share the cores with this one")
    ap.add_argument("--before", type=Path,
                    help="another checkout of the project (e.g. `git archive REV | tar -x`): "
                         "a third worker runs its service, interleaved with the other two")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.size, args.threads, args.onnx)
        return
    wanted = args.calls.split(",") if args.calls else list(CALLS)
    unknown = sorted(set(wanted) - set(CALLS))
    if unknown:
        raise SystemExit(f"unknown calls {', '.join(unknown)}; choose from {', '.join(CALLS)}")
    selected = [c for c in CALLS if c in wanted or c in ("forward", "backbone")]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / f"densenet121_{args.size}.onnx"
        torch_worker = Worker("torch", args, onnx_path)  # writes the ONNX file first
        workers = [("pgc", torch_worker), ("ours", Worker("ort", args, onnx_path))]
        if args.before:
            workers.append(("before", Worker("ort", args, onnx_path, args.before.resolve())))
        try:
            gap = np.abs(np.subtract(torch_worker.ready["logits"], workers[1][1].ready["logits"]))
            times: dict[str, dict[str, list[float]]] = {side: {} for side, _ in workers}
            for round_ in range(args.rounds + 1):
                calls = selected[round_ % len(selected):] + selected[:round_ % len(selected)]
                # The workers' order rotates too, so none always runs right after another.
                turn = round_ % len(workers)
                for name in calls:
                    if not round_ and name.endswith("_14"):
                        continue  # the one-class call warmed the same path up
                    for side, w in workers[turn:] + workers[:turn]:
                        time.sleep(args.pause)
                        ms = w.call(name)
                        print(f"round {round_} {side} {name}: {ms} ms", file=sys.stderr,
                              flush=True)
                        if round_ and ms is not None:
                            times[side].setdefault(name, []).append(ms)
        finally:
            for _, w in workers:
                w.close()
    med = {side: {n: statistics.median(v) for n, v in t.items()} for side, t in times.items()}

    def ratio(a: list[float], b: list[float]) -> float:
        """The median of per-round ratios: a drift of the machine cancels within a round."""
        return statistics.median(x / y for x, y in zip(a, b, strict=True))

    import onnxruntime
    import torch

    print(f"DenseNet-121 {args.size}², 14 classes; torch {torch.__version__}, grad-cam 1.5.7, "
          f"ONNX Runtime {onnxruntime.__version__}; {args.threads} threads; "
          f"{platform.processor() or platform.machine()}; medians of {args.rounds} rounds "
          f"(ratios: medians of per-round ratios); logits differ by ≤ {gap.max():.1e}")
    sides = [side for side in ("ours", "before") if side in times]
    print("| call | pytorch-grad-cam ms | " + " | ".join(
        f"{s} ms | pgc ÷ {s} | {s} ÷ its forward | {s} ÷ its backbone" for s in sides) + " |")
    print("|---|---:|" + "---:|---:|---:|---:|" * len(sides))
    pgc_t = times["pgc"]
    for name in selected:
        pgc = med["pgc"].get(name)
        cells = [name, "" if pgc is None else f"{pgc:,.1f}"]
        for side in sides:
            t = times[side]
            cells += [f"{med[side][name]:,.1f}",
                      "" if pgc is None else f"{ratio(pgc_t[name], t[name]):.1f}",
                      f"{ratio(t[name], t['forward']):.2f}", f"{ratio(t[name], t['backbone']):.2f}"]
        print("| " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps({"size": args.size, "medians": med,
                                        "logit_gap": float(gap.max())}, indent=1))


if __name__ == "__main__":
    main()
