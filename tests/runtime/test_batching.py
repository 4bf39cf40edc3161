"""Batch-shaped compute: a batch answers exactly what each of its requests would alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from service import pipeline
from service.errors import ServiceError, UnknownLabel, UnknownMethod
from service.graph.build import Capability, CompiledModel
from service.imaging import decode
from service.imaging.preprocess import ModelInput
from service.methods import Target
from service.models.ensemble import load_ensemble
from service.models.repository import LoadedModel, Served, load_model
from service.pipeline import ExplainOptions
from service.runtime.engine import Engine
from tests.api.conftest import MODELS, phantom_bytes
from tests.api.test_ensemble import _copy, _ensemble

IMAGES = ["cardiomegaly.png", "nodule_pneumothorax.png", "all-findings.png", "normal.png",
          "pleural-effusion.png"]
ALL = ("crm", "crm_combined", "gradcam", "guided_backprop", "guided_gradcam", "fixations")
# Why not bit for bit: ONNX Runtime's CPU kernels split work by batch size (the head's
# GEMM gave logits 9.5e-7 apart for 1 and for 256 rows), so the head VJP of a batch's rows
# adds the same products in another order: float32 rounding. Seen on the demo model:
# Grad-CAM maps 9e-10 apart; forward passes, CRM (each image's masked copies run on their
# own, since CRM magnifies the logits' last bits), fixations and scores bit for bit.
TOL = 1e-6


def _options(methods: Sequence[str], classes: Sequence[str] | None = None,
             target: Target = Target.LOGIT) -> ExplainOptions:
    return ExplainOptions(tuple(methods), tuple(classes) if classes else None, target, 0.5, 0.5)


# Mixed methods, classes and targets: prefetched guided maps (known classes, logit), default
# classes, probabilities, class-agnostic maps, scores only, and one image asked twice.
JOBS: list[tuple[str, ExplainOptions | None]] = [
    (IMAGES[0], _options(ALL, ["Cardiomegaly"])),
    (IMAGES[1], _options(("gradcam", "crm"), None, Target.PROBABILITY)),
    (IMAGES[2], _options(("guided_backprop", "guided_gradcam"), ["0", "2"], Target.PROBABILITY)),
    (IMAGES[3], _options(("crm_combined", "fixations", "gradcam"))),
    (IMAGES[4], None),
    (IMAGES[0], _options(("guided_backprop", "gradcam"), ["Nodule", "Cardiomegaly"])),
]


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model(MODELS / "demo-cxr", providers=["CPUExecutionProvider"], threads=1,
                      head_batch=256)


def _job(model: Served, image: str, options: ExplainOptions | None) -> pipeline.Job:
    decoded = decode(phantom_bytes(image), "image/png")
    return pipeline.prepare(model, decoded, options, pipeline.Stopwatch())


def _assert_same(batched: pipeline.Computed | ServiceError,
                 alone: pipeline.Computed | ServiceError) -> None:
    assert isinstance(batched, pipeline.Computed) and isinstance(alone, pipeline.Computed)
    np.testing.assert_allclose(batched.scores, alone.scores, rtol=0, atol=TOL)
    assert [(n, r.index, r.grid) for n, r in batched.raw] == [
        (n, r.index, r.grid) for n, r in alone.raw]
    assert bool(batched.raw) == bool(batched.job.options), "maps exactly when asked"
    for (name, b), (_, a) in zip(batched.raw, alone.raw):
        peak = float(np.abs(a.values).max())
        np.testing.assert_allclose(b.values, a.values, rtol=0, atol=TOL * max(peak, 1e-12),
                                   err_msg=name)
        if a.points is None:
            assert b.points is None
        else:
            np.testing.assert_array_equal(b.points, a.points)


def _answers(model: Served, jobs: list[tuple[str, ExplainOptions | None]]) -> None:
    batched = pipeline.compute(model, [_job(model, i, o) for i, o in jobs])
    for (image, options), got in zip(jobs, batched, strict=True):
        (alone,) = pipeline.compute(model, [_job(model, image, options)])
        _assert_same(got, alone)


def test_a_batch_answers_what_each_request_would_alone(demo: LoadedModel) -> None:
    _answers(demo, JOBS)
    # The job with everything has one map per method and the guided maps are not zero.
    first = pipeline.compute(demo, [_job(demo, *JOBS[0])])[0]
    assert isinstance(first, pipeline.Computed)
    assert [n for n, _ in first.raw] == list(ALL)
    assert all(np.abs(r.values).max() > 0 for _, r in first.raw)


def test_batch_order_does_not_change_answers(demo: LoadedModel) -> None:
    forward = pipeline.compute(demo, [_job(demo, i, o) for i, o in JOBS])
    backward = pipeline.compute(demo, [_job(demo, i, o) for i, o in reversed(JOBS)])
    for a, b in zip(forward, reversed(backward)):
        _assert_same(a, b)


def test_ensembles_batch_too(tmp_path: Path) -> None:
    root = tmp_path
    members = {n: load_model(_copy(root, n, perturb=n == "b"), providers=[
        "CPUExecutionProvider"], threads=1, head_batch=256) for n in ("a", "b")}
    _ensemble(root, "ens", 'members = ["a", "b"]\n')
    ensemble = load_ensemble(root / "ens", members, ["ens"])
    _answers(ensemble, JOBS[:4])


def test_an_error_fails_only_its_own_request(demo: LoadedModel) -> None:
    jobs = [_job(demo, IMAGES[0], _options(("gradcam",), ["Cardiomegaly"])),
            _job(demo, IMAGES[1], _options(("gradcam",), ["no such finding"])),
            _job(demo, IMAGES[2], _options(("crm",), ["Nodule"]))]
    good = [pipeline.compute(demo, [jobs[0]])[0], pipeline.compute(demo, [jobs[2]])[0]]
    results = pipeline.compute(demo, jobs)
    assert isinstance(results[1], UnknownLabel) and "no such finding" in results[1].detail
    _assert_same(results[0], good[0])
    _assert_same(results[2], good[1])


def test_an_unavailable_method_fails_only_its_own_request() -> None:
    """A model without a guided graph: the request asking guided maps gets UnknownMethod,
    its batch-mates their maps."""
    demo = load_model(MODELS / "demo-cxr", providers=["CPUExecutionProvider"], threads=1,
                      head_batch=256)
    compiled = demo.engine.compiled
    without = CompiledModel(compiled.split, {c: g for c, g in compiled.graphs.items()
                                             if c is not Capability.GUIDED},
                            {Capability.GUIDED: "removed for the test"}, compiled.fixations_plan)
    crippled = replace(demo, engine=Engine(without, ["CPUExecutionProvider"], 1))
    asks = [(IMAGES[0], _options(("guided_backprop",), ["0"])),
            (IMAGES[1], _options(("gradcam",), ["0"]))]
    results = pipeline.compute(crippled, [_job(crippled, *a) for a in asks])
    assert isinstance(results[0], UnknownMethod)
    assert "no guided-backprop graph: removed for the test" in results[0].detail
    _assert_same(results[1], pipeline.compute(demo, [_job(demo, *asks[1])])[0])


def bad_input(job: pipeline.Job) -> pipeline.Job:
    """The job with a network input of the wrong size: ONNX Runtime refuses it."""
    inp = job.inputs[0]
    return replace(job, inputs=(ModelInput(inp.image01, inp.tensor[:, :, :100, :100]),))
