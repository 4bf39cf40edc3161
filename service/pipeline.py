"""One request's computation: preprocess, forward, methods, regions — arrays in, arrays out.

Everything here is synchronous NumPy/ONNX Runtime work; the HTTP layer runs it in a worker
thread and hands the :class:`Result` to an output (service.outputs), which encodes it.
Nothing here encodes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.errors import UnknownLabel, UnknownMethod
from service.graph.fixations import FixationPlan
from service.imaging.base import DecodedImage
from service.imaging.preprocess import ModelInput, to_model_input
from service.methods import Captures, Target, get_method
from service.methods.regions import Region, map_regions
from service.models.repository import LoadedModel, Served
from service.models.spec import Layout


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


@dataclass(frozen=True)
class Forward:
    """The result of the forward pass on one image."""

    model_input: ModelInput
    captures: Captures
    scores: np.ndarray


class Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()
        self._last = self._start

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(self.timings.get(name, 0.0) + (now - self._last) * 1e3, 3)
        self._last = now

    def total(self) -> dict[str, float]:
        self.timings["total"] = round((time.perf_counter() - self._start) * 1e3, 3)
        return self.timings


def forward(model: LoadedModel, image: DecodedImage, watch: Stopwatch,
            guided_classes: Sequence[int] = (), model_input: ModelInput | None = None
            ) -> Forward:
    """Preprocess and run the network once.

    With ``guided_classes``, the forward pass is the guided-backprop graph's, seeded for
    those classes' logits, so the guided maps come with it at no extra forward pass.
    ``model_input``, when given, is the network input already built (a client's
    preprocessed tensor): it is used as it is instead of preprocessing ``image``.
    """
    spec = model.config.input
    if model_input is None:
        model_input = to_model_input(image, spec)
    watch.lap("preprocess")
    engine = model.engine
    prefetched: dict[bytes, np.ndarray] = {}
    if guided_classes and engine.has_guided:
        seeds = np.eye(len(model.config.labels), dtype=np.float32)[list(guided_classes)]
        acts, logits, grads = engine.guided(model_input.tensor, seeds)
        prefetched[seeds.tobytes()] = grads
    else:
        acts, logits = engine.forward(model_input.tensor)
    watch.lap("forward")
    captures = Captures(
        activations=acts[0],
        logits=logits[0],
        activation=model.config.activation,
        head=engine.head,
        head_vjp=engine.head_vjp if engine.has_head_vjp else None,
        guided=_guided_fn(model, model_input, prefetched) if engine.has_guided else None,
        fixations=_fixations_fn(model, model_input) if engine.has_fixations else None,
    )
    return Forward(model_input, captures, model.config.activation.scores(logits)[0])


def _guided_fn(model: LoadedModel, model_input: ModelInput,
               prefetched: dict[bytes, np.ndarray]):  # type: ignore[no-untyped-def]
    """Guided gradients w.r.t. the image before normalisation, channel-first."""
    spec = model.config.input
    inv_std = 1.0 / np.asarray(spec.std, dtype=np.float32)

    def guided(seeds: np.ndarray) -> np.ndarray:
        seeds = seeds.astype(np.float32, copy=False)
        grads = prefetched.get(seeds.tobytes())
        if grads is None:
            grads = model.engine.guided(model_input.tensor, seeds)[2]
        if spec.layout is Layout.NHWC:
            grads = grads.transpose(0, 3, 1, 2)
        # x_norm = (x − mean) / std, so d/dx = d/dx_norm / std, channel by channel.
        return grads * inv_std[None, :, None, None]

    return guided


def _fixations_fn(model: LoadedModel, model_input: ModelInput):  # type: ignore[no-untyped-def]
    """The activations CNN Fixations walks, run once on first use."""
    found: list[tuple[Mapping[str, np.ndarray], FixationPlan]] = []

    def fixations() -> tuple[Mapping[str, np.ndarray], FixationPlan]:
        if not found:
            plan = model.engine.compiled.fixations_plan
            assert plan is not None
            found.append((model.engine.all_activations(model_input.tensor), plan))
        return found[0]

    return fixations


def predict(model: Served, image: DecodedImage, watch: Stopwatch,
            model_input: ModelInput | None = None) -> Result:
    """Scores only: one forward pass per network (``model_input``: see :func:`forward`)."""
    fwds = [forward(m, image, watch, model_input=_single(model, model_input))
            for m in model.members]
    return Result(model, image, model.combine_scores([f.scores for f in fwds]),
                  fwds[0].model_input.image01, (), watch)


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



def explain(model: Served, image: DecodedImage, options: ExplainOptions,
            watch: Stopwatch, model_input: ModelInput | None = None) -> Result:
    """Scores and maps of one image, as arrays; for an ensemble, every member runs and the
    results are combined by ``model.combine_scores`` / ``model.combine_maps``
    (``model_input``: see :func:`forward`)."""
    methods = [get_method(name) for name in options.methods]
    for member in model.members:
        for name in options.methods:
            if name in member.unavailable:
                raise UnknownMethod(f"method {name!r} is not available for model "
                                    f"{member.name!r}: {member.unavailable[name]}")
    labels = model.config.labels
    # Guided maps of known classes' logits come out of the guided graph's own forward pass.
    known = (resolve_classes(labels, options.classes, None, options.score_threshold)
             if options.classes and options.target is Target.LOGIT
             and any(m.needs_guided for m in methods) else [])
    fwds = [forward(m, image, watch, guided_classes=known,
                    model_input=_single(model, model_input)) for m in model.members]
    scores = model.combine_scores([f.scores for f in fwds])
    classes = known or resolve_classes(labels, options.classes, scores,
                                       options.score_threshold)
    image_hw = (image.height, image.width)
    maps: list[Map] = []
    for method in methods:
        per_member = [method.compute(f.captures, classes, options.target) for f in fwds]
        for raw in (model.combine_maps(m) for m in zip(*per_member)):
            maps.append(Map(
                method=method.name,
                index=raw.index,
                values=raw.values,
                gradient=raw.grid == "model",
                regions=map_regions(raw, model.grid, image_hw, options.region_threshold),
                points=None if raw.points is None else _to_image(raw.points, image,
                                                                 model.grid),
            ))
        watch.lap(method.name)
    return Result(model, image, scores, fwds[0].model_input.image01, tuple(maps), watch)


def _single(model: Served, model_input: ModelInput | None) -> ModelInput | None:
    """A ready network input fits one network: each ensemble member has its own input."""
    if model_input is not None and len(model.members) > 1:
        raise ValueError(f"ensemble {model.name!r} takes images, not one network's input")
    return model_input


def _to_image(points: np.ndarray, image: DecodedImage,
              model_hw: tuple[int, int]) -> np.ndarray:
    """Model-grid pixel indices (x, y) → original-image pixels, through the plain stretch.

    Pixel centres map onto pixel centres, as in cv2's resize: (i + 0.5)·scale − 0.5.
    """
    mh, mw = model_hw
    scale = np.array([image.width / mw, image.height / mh])
    xy = (points.astype(np.float64) + 0.5) * scale - 0.5
    return np.clip(xy, 0, [image.width - 1, image.height - 1])
