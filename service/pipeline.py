"""The requests' computation: preprocess, forward, methods, regions — arrays in, arrays out.

A request goes through three stages: :func:`prepare` (preprocessing, on the request pool),
:func:`compute` (on the model's compute stream, a whole batch of requests at once: one
forward pass per network, each method once over every row the batch asks of it) and
:func:`finish` (regions and points in image pixels, on the request pool again). The HTTP
layer hands the :class:`Result` to an output (service.outputs), which encodes it. Nothing
here encodes. :func:`explain` and :func:`predict` run the three stages for one image.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.errors import ServiceError, UnknownLabel, UnknownMethod
from service.graph.build import Capability
from service.imaging.base import DecodedImage
from service.imaging.preprocess import ModelInput, to_model_input
from service.methods import Method, RawMap, Row, Target, get_method
from service.methods.regions import Region, map_regions
from service.models.repository import Served


@dataclass(frozen=True)
class ExplainOptions:
    """What to compute for /explain (the request model, service.api.request, holds the
    defaults; outputs may narrow it, e.g. one Secondary Capture explains one method)."""

    methods: tuple[str, ...]
    classes: tuple[str, ...] | None
    target: Target
    region_threshold: float
    score_threshold: float


@dataclass(frozen=True)
class Map:
    """One explanation as arrays: what every output draws or reports from.

    Attributes:
        method: the method's name.
        index: the explained class, or None for class-agnostic maps.
        values: the raw map on its native grid: the target layer's for CAM-type maps of a
            single network, the network input's for gradient maps and ensembles.
        gradient: whether it is a signed pixel-level gradient map (drawn as its magnitude,
            locally smoothed) rather than a non-negative CAM-type map.
        regions: boxes in original-image pixels, found on the network's input grid.
        points: (N, 2) image points (x, y) in original-image pixels (CNN Fixations), or None.
    """

    method: str
    index: int | None
    values: np.ndarray
    gradient: bool
    regions: list[Region]
    points: np.ndarray | None = None


@dataclass(frozen=True)
class Result:
    """Everything computed for one image: scores for every label and the maps asked for.

    ``image01`` is the (first) network's input before normalisation, (h, w, C): the
    backdrop of model-grid overlays. ``watch`` keeps timing until the output is written.
    """

    model: Served
    image: DecodedImage
    scores: np.ndarray
    image01: np.ndarray
    maps: tuple[Map, ...]
    watch: Stopwatch

    def label(self, index: int | None) -> str | None:
        return None if index is None else self.model.config.labels[index]

    def score(self, index: int | None) -> float | None:
        """A label's score as every answer reports it (6 decimals); None for no label."""
        return None if index is None else round(float(self.scores[index]), 6)


class Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()
        self._last = self._start

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(self.timings.get(name, 0.0) + (now - self._last) * 1e3, 3)
        self._last = now

    def add(self, name: str, ms: float) -> None:
        """Time spent for this request elsewhere (its share of a batch: the whole batch's)."""
        self.timings[name] = round(self.timings.get(name, 0.0) + ms, 3)

    def mark(self) -> None:
        """The next lap starts now."""
        self._last = time.perf_counter()

    def total(self) -> dict[str, float]:
        self.timings["total"] = round((time.perf_counter() - self._start) * 1e3, 3)
        return self.timings


# A class given by index.
_INDEX = re.compile(r"[0-9]{1,6}")


def resolve_classes(labels: Sequence[str], requested: Sequence[str] | None,
                    scores: np.ndarray | None, threshold: float) -> list[int]:
    """Class indices from labels or indices; default: scores ≥ threshold, at least top-1.

    Raises:
        UnknownLabel: for a name that is no label (case-insensitive) and no valid index.
    """
    if not requested:
        assert scores is not None, "default classes need the scores"
        chosen = [i for i, s in enumerate(scores) if s >= threshold]
        return chosen or [int(np.argmax(scores))]
    lowered = {label.lower(): i for i, label in enumerate(labels)}
    out: list[int] = []
    for item in requested:
        if item.lower() in lowered:
            index = lowered[item.lower()]
        # ASCII digits only: str.isdigit() also accepts '²', which int() refuses.
        elif _INDEX.fullmatch(item) and int(item) < len(labels):
            index = int(item)
        else:
            raise UnknownLabel(
                f"unknown class {item[:100]!r}; labels are {', '.join(labels)} "
                f"(or indices 0..{len(labels) - 1})"
            )
        if index not in out:
            out.append(index)
    return out



@dataclass(frozen=True)
class Job:
    """One image's work for the compute stream.

    Attributes:
        image: the decoded upload.
        inputs: the network input of each member (one for a plain model).
        options: what to explain; None for scores only (/predict).
        watch: the request's timings.
    """

    image: DecodedImage
    inputs: tuple[ModelInput, ...]
    options: ExplainOptions | None
    watch: Stopwatch


@dataclass(frozen=True)
class Computed:
    """A job's arrays out of the compute stream: scores and raw maps (method, map)."""

    job: Job
    scores: np.ndarray
    raw: tuple[tuple[str, RawMap], ...]


@dataclass(frozen=True)
class _Plan:
    """What a job asks, checked before its batch runs."""

    methods: tuple[Method, ...]
    known: tuple[int, ...]  # classes known before the forward pass (given by the client)
    prefetch: bool          # their guided maps come out of the guided graph's forward pass
    fixations: bool         # the forward pass is the fixations graph's


def prepare(model: Served, image: DecodedImage, options: ExplainOptions | None,
            watch: Stopwatch) -> Job:
    """Preprocess the image for each network of ``model``."""
    inputs = tuple(to_model_input(image, m.config.input) for m in model.members)
    watch.lap("preprocess")
    return Job(image, inputs, options, watch)


def _plan(model: Served, options: ExplainOptions | None) -> _Plan:
    """Raises: UnknownMethod for a method a network cannot serve, UnknownLabel for a class
    that is none."""
    if options is None:
        return _Plan((), (), False, False)
    methods = tuple(get_method(name) for name in options.methods)
    for member in model.members:
        for name in options.methods:
            if name in member.unavailable:
                raise UnknownMethod(f"method {name!r} is not available for model "
                                    f"{member.name!r}: {member.unavailable[name]}")
    known = (tuple(resolve_classes(model.config.labels, options.classes, None,
                                   options.score_threshold)) if options.classes else ())
    prefetch = bool(known) and options.target is Target.LOGIT and any(
        Capability.GUIDED in m.requires for m in methods)
    return _Plan(methods, known, prefetch,
                 any(Capability.FIXATIONS in m.requires for m in methods))


def compute(model: Served, jobs: Sequence[Job]) -> list[Computed | ServiceError]:
    """One batch: every job's scores and raw maps, or its own error.

    The networks run once over the batch's images; each method runs once over the rows
    (image, class) of every job asking it. A job's answer depends on its own image and
    options only: batch-mates change which rows share a graph run, not the numbers beyond
    float rounding of the kernels' batch paths (the tests bound it).
    """
    for job in jobs:
        job.watch.lap("queue")
    out: list[Computed | ServiceError | None] = [None] * len(jobs)
    plans: dict[int, _Plan] = {}
    for k, job in enumerate(jobs):
        try:
            plans[k] = _plan(model, job.options)
        except ServiceError as exc:
            out[k] = exc
    live = list(plans)
    if live:
        for k, computed in zip(live, _compute(model, [jobs[k] for k in live],
                                              [plans[k] for k in live])):
            out[k] = computed
    for job in jobs:
        job.watch.mark()
    return out  # type: ignore[return-value]


def _compute(model: Served, jobs: Sequence[Job], plans: Sequence[_Plan]) -> list[Computed]:
    def spend(name: str, since: float, which: Sequence[int]) -> float:
        now = time.perf_counter()
        for k in which:
            jobs[k].watch.add(name, (now - since) * 1e3)
        return now

    everyone = range(len(jobs))
    t = time.perf_counter()
    prefetch = [Row(k, c) for k, plan in enumerate(plans) if plan.prefetch for c in plan.known]
    traced = [k for k, plan in enumerate(plans) if plan.fixations]
    captures = [member.engine.capture(np.concatenate([job.inputs[m].tensor for job in jobs]),
                                      member.config.activation, member.config.input, prefetch,
                                      traced)
                for m, member in enumerate(model.members)]
    scores = [model.combine_scores([member.config.activation.scores(c.logits[k:k + 1])[0]
                                    for member, c in zip(model.members, captures)])
              for k in everyone]
    t = spend("forward", t, everyone)
    classes = [list(plan.known) or (resolve_classes(model.config.labels, None, scores[k],
                                                    job.options.score_threshold)
                                    if job.options is not None else [])
               for k, (job, plan) in enumerate(zip(jobs, plans))]
    raw: list[dict[str, list[RawMap]]] = [{} for _ in jobs]
    methods = list(dict.fromkeys(m for plan in plans for m in plan.methods))
    for method in methods:
        asking = [k for k, plan in enumerate(plans) if method in plan.methods]
        rows, owners = [], []
        for k in asking:
            target = jobs[k].options.target  # type: ignore[union-attr]
            for cls in (classes[k] if method.per_class else [None]):
                rows.append(Row(k, cls, target))
                owners.append(k)
        per_member = [method.compute(c, rows) for c in captures]
        for k, maps in zip(owners, zip(*per_member, strict=True)):
            raw[k].setdefault(method.name, []).append(model.combine_maps(maps))
        t = spend(method.name, t, asking)
    # Each job's maps in its own order of methods, whatever order the batch ran them in.
    return [Computed(job, s, tuple((m.name, r) for m in plan.methods for r in maps[m.name]))
            for job, s, plan, maps in zip(jobs, scores, plans, raw)]


def finish(model: Served, computed: Computed) -> Result:
    """Regions and points in original-image pixels: the :class:`Result` outputs read."""
    job = computed.job
    image = job.image
    region_threshold = job.options.region_threshold if job.options is not None else 0.5
    maps = tuple(Map(
        method=name,
        index=raw.index,
        values=raw.values,
        gradient=raw.grid == "model",
        regions=map_regions(raw, model.grid, (image.height, image.width), region_threshold),
        points=None if raw.points is None else _to_image(raw.points, image, model.grid),
    ) for name, raw in computed.raw)
    if maps:
        job.watch.lap("regions")
    return Result(model, image, computed.scores, job.inputs[0].image01, maps, job.watch)


def explain(model: Served, image: DecodedImage, options: ExplainOptions,
            watch: Stopwatch) -> Result:
    """Scores and maps of one image, as arrays, in this thread (a batch of one); for an
    ensemble, every member runs and the results are combined by ``model.combine_scores`` /
    ``model.combine_maps``.

    Raises:
        ServiceError: the job's own error (UnknownMethod, UnknownLabel, ...).
    """
    return _one(model, prepare(model, image, options, watch))


def predict(model: Served, image: DecodedImage, watch: Stopwatch) -> Result:
    """Scores only: one forward pass per network."""
    return _one(model, prepare(model, image, None, watch))


def _one(model: Served, job: Job) -> Result:
    done = compute(model, [job])[0]
    if isinstance(done, ServiceError):
        raise done
    return finish(model, done)


def _to_image(points: np.ndarray, image: DecodedImage,
              model_hw: tuple[int, int]) -> np.ndarray:
    """Model-grid pixel indices (x, y) → original-image pixels, through the plain stretch.

    Pixel centres map onto pixel centres, as in cv2's resize: (i + 0.5)·scale − 0.5.
    """
    mh, mw = model_hw
    scale = np.array([image.width / mw, image.height / mh])
    xy = (points.astype(np.float64) + 0.5) * scale - 0.5
    return np.clip(xy, 0, [image.width - 1, image.height - 1])
