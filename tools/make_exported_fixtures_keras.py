"""Keras' MobileNetV3Small at a narrow width through tf2onnx and Keras 3's own ONNX export,
with float64 TensorFlow references: the Keras half of tests/data/exported (the torch half
and everything the two share is tools/make_exported_fixtures.py).

TensorFlow never enters the service's environment: run this with the Keras virtualenv of
tools/export_matrix_keras.py; each exported model is loaded by the service in a process of
the service's interpreter (``--service-python``, default ``.venv/bin/python``):

    .venv-keras/bin/python tools/make_exported_fixtures_keras.py [--exporter tf2onnx|keras]
        [--out tests/data/exported] [--service-python .venv/bin/python]

``keras.applications.MobileNetV3Small(alpha=ALPHA, minimalistic=False, ...)`` keeps the
hard-swish and hard-sigmoid (``relu6(x + 3) / 6``) of the full model and its own
preprocessing (pixels on 0..255: model.toml says mean 0, std 1/255, layout NHWC, sigmoid
over the 4 raw logits). Weights are seeded and randomised as in the Keras matrix
(``export_matrix_keras.randomize``); exporters as there (``export_matrix_keras.export``:
tf2onnx opset 17 with a dynamic batch axis, or ``model.export(format="onnx")``).
References by ``export_matrix_keras.tf_refs``: Grad-CAM at the Keras tensor matching the
service's target, guided backprop with the guided rule on Keras' own rectifiers (the ReLU
inside hard-sigmoid is not one); CRM by re-running the graph with that tensor zeroed at
each position across channels; in float64 and, for the floors, float32. The rest (image
draws, floors, comparison, reference.npz, manifest) is make_exported_fixtures'.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_matrix as em  # stdlib only at import: no torch, no tensorflow
import export_matrix_keras as ek
import make_exported_fixtures as mef

ROOT = em.ROOT
ARCH = "MobileNetV3Small"
ALPHA = 0.25
SIZE = 64
EXPORTERS = ek.EXPORTERS


@contextmanager
def input_side(size: int) -> Iterator[None]:
    """export_matrix_keras draws its calibration batch and states its export signature at
    its module-wide SIZE (224, read at call time); these fixtures are ``size`` wide."""
    old, ek.SIZE = ek.SIZE, size
    try:
        yield
    finally:
        ek.SIZE = old


def build(floatx: str):  # type: ignore[no-untyped-def]
    """The narrow application with seeded weights, computing in ``floatx`` (as ek.build)."""
    import keras
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(floatx)
    keras.utils.set_random_seed(em.SEED)
    try:
        return keras.applications.MobileNetV3Small(
            input_shape=(SIZE, SIZE, 3), alpha=ALPHA, minimalistic=False, weights=None,
            classes=len(em.LABELS), classifier_activation=None)
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")


def references(weights, x, acts, floatx: str):  # type: ignore[no-untyped-def]
    """TensorFlow's references for every image and class (ek.tf_refs), in ``floatx``.

    tf_refs applies the guided rule to the model it is given, in place: every call gets a
    fresh copy of the network.
    """
    import numpy as np

    k = len(em.LABELS)
    res: dict[str, list[object]] = {"logits": [], "gradcam": [], "guided": [], "crm": []}
    notes = []
    for i in range(len(x)):
        per_class, models = [], []
        for c in range(k):
            models.append(build(floatx))
            models[-1].set_weights([w.astype(floatx) for w in weights])
            per_class.append(ek.tf_refs(models[-1], x[i:i + 1].astype(floatx), c, acts[i]))
        first = per_class[0]
        # tf_refs names the matched operation "<name> (<class>)"; names are numbered per
        # build, positions in the graph are not.
        names = [op.name for op in models[0].operations]
        target = names.index(str(first["tf_target"]).rsplit(" (", 1)[0]) \
            if "tf_target" in first else None
        notes.append({"target": first.get("tf_target"),
                      "target_act_err": first.get("target_act_err"),
                      "guided_gated": first.get("guided_gated")})
        res["logits"].append(first["logits"])
        res["guided"].append(np.stack([mef.guided_map(r["guided"], (1 / 255.0,) * 3, 2)
                                       for r in per_class]))
        if all("gradcam" in r for r in per_class):
            res["gradcam"].append(np.stack([r["gradcam"] for r in per_class]))
            res["crm"].append(crm_reference(weights, x[i:i + 1].astype(floatx), acts[i],
                                            target, first["logits"], floatx))
    return {key: np.stack(v) for key, v in res.items() if len(v) == len(x)}, notes


def crm_reference(weights, xi, acts, target: int, logits, floatx: str):  # type: ignore[no-untyped-def]
    """CRM by brute force on Keras' side, (K, h, w): the graph run node by node (as tf_refs
    runs it) with the output of ``model.operations[target]`` zeroed at (l, m) across
    channels, map (z_k − z_k(l, m))²."""
    import numpy as np
    import tensorflow as tf
    from keras.src.models.functional import operation_fn as keras_operation_fn

    c, h, w = acts.shape
    model = build(floatx)
    model.set_weights([v.astype(floatx) for v in weights])
    masked = np.empty((h, w, len(logits)))
    chosen = model.operations[target]
    for l in range(h):
        for col in range(w):
            def wrap(op, l=l, col=col):  # type: ignore[no-untyped-def]
                call = keras_operation_fn(op, training=False)
                if op is not chosen:
                    return call

                def run(*args, **kwargs):  # type: ignore[no-untyped-def]
                    out = call(*args, **kwargs)
                    keep = np.ones(tuple(out.shape[1:]))
                    if keep.shape == (h, w, c):
                        keep[l, col, :] = 0.0
                    else:
                        keep[:, l, col] = 0.0
                    return out * tf.constant(keep[None], dtype=out.dtype)
                return run

            outs = model._run_through_graph([tf.constant(xi, dtype=model.inputs[0].dtype)],
                                            operation_fn=wrap)
            z = outs[0] if isinstance(outs, (list, tuple)) else outs
            masked[l, col] = np.asarray(z[0], dtype=np.float64)
    return ((np.asarray(logits)[None, None, :] - masked) ** 2).transpose(2, 0, 1)


def service_answers(folder: Path, images, python: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """make_exported_fixtures.service_answers, run by the service's interpreter."""
    import json

    import numpy as np
    np.save(folder.parent / f"{folder.name}.images.npy", images)
    answers = folder.parent / f"{folder.name}.answers.npz"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "KERAS_"))}
    done = subprocess.run([python, str(ROOT / "tools" / "make_exported_fixtures.py"),
                           "--_service", str(folder), str(folder.parent / f"{folder.name}.images.npy"),
                           str(answers)], capture_output=True, text=True, env=env, check=False,
                          timeout=600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-1500:])
    with np.load(answers) as data:
        ours: dict[str, object] = dict(data)
    ours.update(json.loads(answers.with_suffix(".json").read_text()))
    return ours


def make_one(exporter: str, out: Path, work: Path, python: str) -> dict[str, object]:
    name = f"keras_mobilenet_v3-{exporter}"
    entry: dict[str, object] = {"library": f"Keras {ARCH} (alpha {ALPHA})", "exporter": exporter,
                                "input_shape": [SIZE, SIZE, 3]}
    m32 = build("float32")
    with input_side(SIZE):
        ek.randomize(m32)
    entry["params"] = int(m32.count_params())
    folder = mef.new_folder(work, name)
    try:
        with input_side(SIZE):
            ek.export(m32, folder / "model.onnx", exporter)
    except Exception as exc:  # noqa: BLE001 - a failing exporter is a result
        entry["failure"] = f"export: {type(exc).__name__}: {str(exc)[:500]}"
        return entry
    (folder / "model.toml").write_text(em.model_toml(
        (SIZE, SIZE), mean=(0.0, 0.0, 0.0), std=(1 / 255.0,) * 3, layout="NHWC"))
    if not mef.describe(entry, folder):
        return entry
    weights = m32.get_weights()
    return mef.check_and_store(entry, folder, out, SIZE,
                               lambda images: service_answers(folder, images, python),
                               lambda x, acts, floatx: references(weights, x, acts, floatx))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=mef.OUT)
    ap.add_argument("--exporter", action="append", choices=EXPORTERS)
    ap.add_argument("--service-python", default=str(ROOT / ".venv" / "bin" / "python"))
    ap.add_argument("--report", type=Path, default=None)
    args = ap.parse_args(argv)
    ek._env()
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(2)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="exported-fixtures-keras-") as tmp:
        for exporter in args.exporter or EXPORTERS:
            key = f"keras_mobilenet_v3-{exporter}"
            print(f"{key} ...", flush=True)
            report[key] = make_one(exporter, out, Path(tmp), args.service_python)
            mef.update_manifest(out, {key: report[key]})
            print(f"  {mef.summary(key, report[key])}", flush=True)
    mef.finish(out, report, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
