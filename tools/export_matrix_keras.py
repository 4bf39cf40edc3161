"""The export matrix for Keras: keras.applications through tf2onnx and Keras 3's own ONNX
export, loaded by the service and checked against TensorFlow's autograd.

TensorFlow never enters the service's environment: this script runs in its own virtualenv,

    python3.11 -m venv .venv-keras
    .venv-keras/bin/pip install tensorflow-cpu==2.21.0 "tf2onnx==1.17.*" keras==3.15.1

and loads each exported model with the service in a process of the service's interpreter
(``--service-python``, default ``.venv/bin/python``), exactly as tools/export_matrix.py does
(its ``--_service`` worker; see that file for what is measured and how). Usage:

    .venv-keras/bin/python tools/export_matrix_keras.py [--arch NAME ...]
        [--exporter tf2onnx|keras ...] [--checkout DIR] [--out results.json]

Per row, in a fresh process: ``keras.applications.<NAME>(weights=None, classes=4,
classifier_activation=None, input_shape=(224, 224, 3))`` with seeded random weights (every
BatchNormalization: random gamma/beta, moving statistics from one training-mode batch of
4 random images; the 4-unit Dense head re-drawn N(0, 1/fan_in)); the application's own
preprocessing layers are kept (they expect pixels in [0, 255], so model.toml says mean 0,
std 1/255, layout NHWC, activation sigmoid). Exporters: ``tf2onnx``:
``tf2onnx.convert.from_keras(model, input_signature=[TensorSpec((None, H, W, 3), name="image")],
opset=17)``; ``keras``: ``model.export(path, format="onnx")`` with its defaults.

References, in float64 (``keras.config.set_floatx("float64")``, the same weights):
Grad-CAM at the service's detected target, mapped back to the Keras operation (layer or op
node) whose output has the target's shape and the closest values (ties: the latest), the
gradient by ``tf.GradientTape`` w.r.t. that very tensor of a model that also outputs it;
guided backprop by ``tf.GradientTape`` w.r.t. the input with the guided rule (backward =
ReLU(incoming) · [0 < x (< max)], ``tf.custom_gradient``) on the real rectifiers: ReLU,
LeakyReLU, PReLU layers, Activation(relu/relu6/leaky_relu) and layers built with
``activation="relu"``; a ReLU layer fed by an ``x + 3`` op (Keras' hard-sigmoid,
``relu6(x + 3) / 6``, inside MobileNetV3's hard-swish) is not a rectifier. The float32 model
gives the float32 floor of each error.

An export whose graph still holds TensorFlow ops (nodes no ONNX schema defines) is invalid
ONNX: no runtime loads it, so the row stops at the export with the ops, their counts and
why tf2onnx leaves them (``UNCONVERTED``). ConvNeXtTiny is one, through every tf2onnx
route (``from_keras``, ``from_function`` with an input signature, a SavedModel through
``python -m tf2onnx.convert --saved-model``, and Keras' own export, which calls
``from_function``): see BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_matrix as em  # stdlib only at import: no torch, no tensorflow

ROOT = em.ROOT
ARCHS = ("MobileNetV3Small", "MobileNetV3Large", "EfficientNetB0", "ConvNeXtTiny",
         "NASNetMobile", "ResNet50", "DenseNet121")
DEFAULT_ARCHS = ARCHS[:5]
EXPORTERS = ("tf2onnx", "keras")
SIZE = 224
SEED = em.SEED
# Why tf2onnx (1.17) leaves a TensorFlow op in the graph, for those these applications hit.
UNCONVERTED = {
    # keras/src/backend/tensorflow/nn.py conv(): "grouped convolutions are broken on CPU
    # without XLA", so a Conv2D with groups > 1 (ConvNeXt's 7×7 depthwise convolution,
    # Conv2D(groups=C)) runs in a tf.function(jit_compile=True). The frozen graph keeps
    # that as a call marked _XlaMustCompile, which tf2onnx has no conversion for
    # (onnx/tensorflow-onnx#2099, #2347).
    "StatefulPartitionedCall": "XLA-compiled grouped Conv2D",
    "PartitionedCall": "XLA-compiled grouped Conv2D",
    # Exact GELU: tf.nn.gelu(approximate=False) is 0.5·x·erfc(−x/√2); tf2onnx converts Erf
    # but not Erfc.
    "Erfc": "exact GELU's erfc",
}


def _env() -> None:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def build(name: str, floatx: str):  # type: ignore[no-untyped-def]
    """The application with seeded random weights, computing in ``floatx``."""
    import keras
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(floatx)  # floatx alone leaves the layers in float32
    keras.utils.set_random_seed(SEED)
    ctor = getattr(keras.applications, name)
    try:
        model = ctor(weights=None, classes=len(em.LABELS), classifier_activation=None,
                     input_shape=(SIZE, SIZE, 3))
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")
    return model


def images(n: int, seed: int):  # type: ignore[no-untyped-def]
    import numpy as np
    return (np.random.default_rng(seed).random((n, SIZE, SIZE, 3)) * 255.0).astype(np.float32)


def randomize(model) -> None:  # type: ignore[no-untyped-def]
    import keras
    import numpy as np
    rng = np.random.default_rng(SEED + 1)
    bns = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
    for bn in bns:
        c = bn.gamma.shape[0] if bn.gamma is not None else bn.moving_mean.shape[0]
        if bn.gamma is not None:
            bn.gamma.assign((rng.random(c) + 0.5).astype("float32"))
        if bn.beta is not None:
            bn.beta.assign((rng.standard_normal(c) * 0.2).astype("float32"))
        bn.momentum = 0.0  # the training pass below sets the moving statistics to its own
    dense = [la for la in model.layers if isinstance(la, keras.layers.Dense)
             and la.units == len(em.LABELS)][-1:]
    for d in dense:
        k = d.kernel.shape[0]
        d.kernel.assign((rng.standard_normal(d.kernel.shape) / np.sqrt(k)).astype("float32"))
        d.bias.assign((rng.standard_normal(d.bias.shape) * 0.1).astype("float32"))
    model(images(4, SEED + 2), training=True)
    for bn in bns:
        bn.momentum = 0.99


def export(model, path: Path, exporter: str) -> None:  # type: ignore[no-untyped-def]
    import tensorflow as tf
    if exporter == "tf2onnx":
        import tf2onnx
        spec = (tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="image"),)
        tf2onnx.convert.from_keras(model, input_signature=spec, opset=17,
                                   output_path=str(path))
    elif exporter == "keras":
        model.export(str(path), format="onnx", verbose=False)
    else:
        raise ValueError(exporter)


def unconverted_ops(path: Path) -> dict[str, int]:
    """Ops of the exported graph's default domain that no ONNX schema defines (TensorFlow
    ops tf2onnx left as they were), with their counts. Other domains (ONNX Runtime's
    contrib ops) are a runtime's business, not checked here."""
    from collections import Counter

    import onnx
    proto = onnx.load(str(path), load_external_data=False)
    return dict(Counter(n.op_type for n in proto.graph.node
                        if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)))


def _producer(layer):  # type: ignore[no-untyped-def]
    try:
        node = layer._inbound_nodes[0]
        t = node.input_tensors[0]
        return t._keras_history.operation
    except (AttributeError, IndexError):
        return None


def guided_patch(model) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Apply the guided rule to the model's rectifiers in place; (gated, skipped)."""
    import keras
    import tensorflow as tf

    def guided(fn, high):  # type: ignore[no-untyped-def]
        @tf.custom_gradient
        def g(x):  # type: ignore[no-untyped-def]
            y = fn(x)

            def grad(dy):  # type: ignore[no-untyped-def]
                mask = x > 0
                if high is not None:
                    mask = tf.logical_and(mask, x < high)
                return tf.nn.relu(dy) * tf.cast(mask, dy.dtype)
            return y, grad
        return g

    gated = skipped = 0
    relu_fns = {"relu": None, "relu6": 6.0, "leaky_relu": None}
    for layer in model.layers:
        L = keras.layers
        if isinstance(layer, L.ReLU):
            if float(layer.threshold) != 0.0:
                skipped += 1
                continue
            prod = _producer(layer)
            if prod is not None and type(prod).__name__ in ("Add", "AddOp") :
                skipped += 1  # relu6(x + 3): hard-sigmoid, not a rectifier
                continue
            high = float(layer.max_value) if layer.max_value is not None else None
            layer.call = guided(layer.call, high)
            gated += 1
        elif isinstance(layer, (L.LeakyReLU, L.PReLU)):
            layer.call = guided(layer.call, None)
            gated += 1
        elif isinstance(layer, L.Activation):
            name = getattr(layer.activation, "__name__", "")
            if name in relu_fns:
                layer.call = guided(layer.call, relu_fns[name])
                gated += 1
        elif getattr(layer, "activation", None) is not None:
            name = getattr(layer.activation, "__name__", "")
            if name in relu_fns:
                layer.activation = guided(layer.activation, relu_fns[name])
                gated += 1
    return gated, skipped


def tf_refs(model, x, cls: int, acts):  # type: ignore[no-untyped-def]
    """Grad-CAM at the Keras tensor matching ``acts`` (C, H, W), the guided input gradient
    and the logits for class ``cls``, in the model's dtype.

    The graph is run node by node (``Functional._run_through_graph``, what ``Model.call``
    does) so the tensors of the target's shape are the very ones fed downstream, watched
    by the tape: their gradient is the one the head gives them.
    """
    import numpy as np
    import tensorflow as tf
    from keras.src.models.functional import operation_fn as keras_operation_fn
    c, h, w = acts.shape
    res: dict[str, object] = {}
    found: list[tuple[str, str, object]] = []
    xt = tf.constant(x, dtype=model.inputs[0].dtype)

    def wrap(op):  # type: ignore[no-untyped-def]
        call = keras_operation_fn(op, training=False)

        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            out = call(*args, **kwargs)
            if tf.is_tensor(out) and len(out.shape) == 4 and \
                    tuple(out.shape[1:]) in ((h, w, c), (c, h, w)):
                tape.watch(out)
                found.append((op.name, type(op).__name__, out))
            return out
        return run

    with tf.GradientTape(persistent=True) as tape:
        outs = model._run_through_graph([xt], operation_fn=wrap)
        z = outs[0] if isinstance(outs, (list, tuple)) else outs
        selected = z[0, cls]  # inside the tape: the slice is part of what it differentiates
    res["candidates"] = len(found)
    res["logits"] = np.asarray(z[0], dtype=np.float64)
    best = None
    for i, (name, kind, t) in enumerate(found):
        v = np.asarray(t[0], dtype=np.float64)
        if v.shape != (c, h, w):
            v = v.transpose(2, 0, 1)
        err = em.rel_err(v, acts)
        if best is None or err <= best[0]:  # the closest; among equals, the latest
            best = (err, i, name, kind, v)
    if best is not None:
        err, i, name, kind, v = best
        res["target_act_err"] = err
        res["tf_target"] = f"{name} ({kind})"
        grad = tape.gradient(selected, found[i][2])
        if err <= em.ACT_TOL and grad is not None:
            ga = np.asarray(grad[0], dtype=np.float64)
            if ga.shape != (c, h, w):
                ga = ga.transpose(2, 0, 1)
            weights = ga.mean(axis=(1, 2))
            res["gradcam"] = np.maximum(np.einsum("c,chw->hw", weights, v), 0.0)
        elif grad is None:
            res["target_note"] = f"no gradient reaches {name}"
    del tape
    res["guided_gated"], res["guided_skipped"] = guided_patch(model)
    xg = tf.Variable(xt)
    with tf.GradientTape() as tape:
        zg = model(xg, training=False)
        sel = zg[0, cls]
    res["guided"] = np.asarray(tape.gradient(sel, xg)[0], dtype=np.float64)
    res["guided_logits"] = np.asarray(zg[0], dtype=np.float64)
    return res


def row_worker(spec_path: Path) -> None:
    _env()
    spec = json.loads(spec_path.read_text())
    folder = Path(spec["folder"])
    res: dict[str, object] = {}
    result = folder / "result.json"

    def save() -> None:
        result.write_text(json.dumps(res, default=float))

    try:
        import numpy as np
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(2)
        name, exporter = spec["arch"].split("/", 1)[1], spec["exporter"]
        m32 = build(name, "float32")
        randomize(m32)
        res["params_m"] = round(m32.count_params() / 1e6, 2)
        x = images(1, SEED + 3)
        m64 = build(name, "float64")
        m64.set_weights([w.astype("float64") for w in m32.get_weights()])
        z64 = np.asarray(m64(x.astype("float64"), training=False)[0], dtype=np.float64)
        cls = int(np.argmax(z64))
        res["class"] = cls
        mdir = folder / "model"
        mdir.mkdir(parents=True, exist_ok=True)
        onnx_path = mdir / "model.onnx"
        t = time.perf_counter()
        try:
            export(m32, onnx_path, exporter)
        except Exception as exc:  # noqa: BLE001
            res["export_s"] = round(time.perf_counter() - t, 1)
            res["export_error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            traceback.print_exc()
            save()
            return
        res["export_s"] = round(time.perf_counter() - t, 1)
        res["onnx_mb"] = round(sum(p.stat().st_size for p in mdir.iterdir()) / 2**20, 1)
        res.update(em.onnx_facts(onnx_path))
        left = unconverted_ops(onnx_path)
        if left:
            res["export_error"] = "TF ops left: " + ", ".join(
                f"{op} ×{n} ({UNCONVERTED.get(op, 'no tf2onnx conversion')})"
                for op, n in sorted(left.items()))
            save()
            return
        (mdir / "model.toml").write_text(em.model_toml(
            (SIZE, SIZE), mean=(0.0, 0.0, 0.0), std=(1 / 255.0,) * 3, layout="NHWC"))
        np.savez(folder / "input.npz", x=x, cls=np.int64(cls))
        save()
        t = time.perf_counter()
        try:
            with (folder / "service.log").open("w") as fh:
                subprocess.run([spec["service_python"], str(ROOT / "tools" / "export_matrix.py"),
                                "--_service", str(spec_path)], stdout=fh,
                               stderr=subprocess.STDOUT, timeout=em.SERVICE_TIMEOUT_S,
                               check=False, env={k: v for k, v in os.environ.items()
                                                 if not k.startswith(("TF_", "KERAS_"))})
        except subprocess.TimeoutExpired:
            res["service_error"] = "service process timed out"
        res["service_s"] = round(time.perf_counter() - t, 1)
        sj = folder / "service.json"
        if sj.is_file():
            res.update(json.loads(sj.read_text()))
        elif "service_error" not in res:
            res["service_error"] = "service process wrote nothing"
        if (folder / "ort_logits.npy").is_file():
            res["ort_scores_max_abs_diff"] = float(np.abs(
                em._sigmoid(np.load(folder / "ort_logits.npy")) - em._sigmoid(z64)).max())
        save()
        if not res.get("compiles") or not (folder / "service.npz").is_file():
            return
        ours = dict(np.load(folder / "service.npz"))
        res["scores_max_abs_diff"] = float(np.abs(em._sigmoid(ours["logits"])
                                                  - em._sigmoid(z64)).max())
        t = time.perf_counter()
        refs: dict[str, dict[str, object]] = {}
        try:
            refs["f64"] = tf_refs(m64, x, cls, ours["acts"])
            refs["f32"] = tf_refs(m32, x, cls, ours["acts"])
        except Exception as exc:  # noqa: BLE001
            res["reference_error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        res["reference_s"] = round(time.perf_counter() - t, 1)
        r64, r32 = refs.get("f64"), refs.get("f32")
        if r64:
            for key in ("tf_target", "target_act_err", "guided_gated", "guided_skipped"):
                res[key] = r64.get(key)
            res["target_candidates"] = r64.get("candidates")
            res["guided_logits_check"] = em.rel_err(r64["guided_logits"], z64)
            if "gradcam" not in r64:
                res["target_note"] = (f"no Keras tensor matches the ONNX target "
                                      f"{res.get('target')} (best rel. error "
                                      f"{r64.get('target_act_err')})")
            elif "gradcam" in ours:
                res["gradcam_err"] = em.rel_err(ours["gradcam"], r64["gradcam"])
                if r32 and "gradcam" in r32:
                    res["gradcam_f32_floor"] = em.rel_err(r32["gradcam"], r64["gradcam"])
            if "guided" in ours:
                res["guided_err"] = em.rel_err(ours["guided"], r64["guided"])
                diff = np.abs(ours["guided"] - r64["guided"]) / np.abs(r64["guided"]).max()
                res["guided_err_q99"] = float(np.quantile(diff, 0.99))
                if r32:
                    res["guided_f32_floor"] = em.rel_err(r32["guided"], r64["guided"])
    except Exception as exc:  # noqa: BLE001
        res["worker_error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    save()


def _versions(python: str) -> dict[str, str]:
    code = ("import json; from importlib import metadata as m; out={}\n"
            "for d in ('tensorflow-cpu','keras','tf2onnx','onnx','numpy','onnxruntime-gpu',"
            "'onnxruntime'):\n"
            "    try: out[d]=m.version(d)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60,
                             check=True)
        return json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}


def run(args: argparse.Namespace) -> int:
    archs = args.arch or list(DEFAULT_ARCHS)
    for a in archs:
        if a not in ARCHS:
            raise SystemExit(f"unknown architecture {a!r}; known: {', '.join(ARCHS)}")
    exporters = args.exporter or list(EXPORTERS)
    checkout = Path(args.checkout).resolve()
    out = Path(args.out).resolve()
    md = Path(args.md).resolve() if args.md else out.with_suffix(".md")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="export-matrix-keras-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    service_python = str(Path(args.service_python).resolve()) if args.service_python else \
        str(ROOT / ".venv" / "bin" / "python")
    # ONNX Runtime only counts in the service's environment: it runs every model.
    versions = {k: v for k, v in _versions(sys.executable).items()
                if not k.startswith("onnxruntime")}
    versions.update({f"service {k}": v for k, v in _versions(service_python).items()
                     if k in ("onnx", "onnxruntime-gpu", "onnxruntime", "numpy")})
    meta: dict[str, object] = {
        "command": shlex.join(["python", *sys.argv]),
        "service": f"checkout {checkout.name} at {em._git_commit(checkout)}",
        "machine": em.machine_info(), "versions": versions,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    rows: list[dict[str, object]] = []

    def save() -> None:
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        md.write_text(em.render_markdown(rows, meta).replace("# Export matrix",
                                                              "# Export matrix (Keras)", 1))

    for arch in archs:
        for exporter in exporters:
            name = f"keras/{arch}"
            folder = work / f"{arch}-{exporter}"
            folder.mkdir(parents=True, exist_ok=True)
            spec = {"arch": name, "exporter": exporter, "folder": str(folder),
                    "checkout": str(checkout), "service_python": service_python}
            row = em.run_row(Path(__file__).resolve(), spec, folder, env=None,
                             timeout=em.ROW_TIMEOUT_S, keep=args.keep)
            rows.append(row)
            save()
            print(f"  {em.table_row(row)}", flush=True)
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print(f"wrote {out} and {md}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", metavar="NAME", help=f"one of {', '.join(ARCHS)}")
    ap.add_argument("--exporter", action="append", choices=EXPORTERS)
    ap.add_argument("--checkout", default=str(ROOT))
    ap.add_argument("--service-python", default=None,
                    help="the interpreter of the service's environment (default .venv/bin/python)")
    ap.add_argument("--out", default="export-matrix-keras.json")
    ap.add_argument("--md", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._row:
        row_worker(Path(args._row))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
