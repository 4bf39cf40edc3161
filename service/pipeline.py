"""One request's work: preprocess, forward, methods, post-processing.

Everything here is synchronous NumPy/ONNX Runtime work; the HTTP layer runs it in a worker
thread.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from schemas import (
    DicomInfo,
    ExplainResponse,
    Explanation,
    Heatmap,
    ImageInfo,
    ModelRef,
    Prediction,
    PredictResponse,
    Region,
)
from service.errors import InvalidParameter, UnknownLabel, UnknownMethod
from service.graph.fixations import FixationPlan
from service.imaging.base import DecodedImage
from service.imaging.preprocess import ModelInput, to_model_input
from service.methods import DEFAULT_METHODS, Captures, RawMap, Target, get_method
from service.methods.regions import regions
from service.methods.render import (
    Encoding,
    Size,
    display_sigma,
    encode,
    normalise,
    resize,
    smooth,
)
from service.models.repository import LoadedModel, Served
from service.models.spec import Layout


@dataclass(frozen=True)
class ExplainOptions:
    """The parsed parameters of /explain."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    classes: tuple[str, ...] | None = None
    encoding: Encoding = Encoding.PNG
    size: Size = Size.ORIGINAL
    target: Target = Target.LOGIT
    region_threshold: float = 0.5
    score_threshold: float = 0.5


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


def image_info(image: DecodedImage) -> ImageInfo:
    dicom = None
    if image.format == "dicom":
        m = image.meta
        dicom = DicomInfo(
            study_instance_uid=_str(m.get("StudyInstanceUID")),
            series_instance_uid=_str(m.get("SeriesInstanceUID")),
            sop_instance_uid=_str(m.get("SOPInstanceUID")),
            modality=_str(m.get("Modality")),
            transfer_syntax_uid=_str(m.get("TransferSyntaxUID")),
            photometric_interpretation=_str(m.get("PhotometricInterpretation")),
            frames=int(m.get("frames", 1)),
            frame=int(m.get("frame", 0)),
        )
    return ImageInfo(width=image.width, height=image.height, format=image.format, dicom=dicom)


def _str(value: object) -> str | None:
    return None if value is None else str(value)


def forward(model: LoadedModel, image: DecodedImage, watch: Stopwatch,
            guided_classes: Sequence[int] = ()) -> Forward:
    """Preprocess and run the network once.

    With ``guided_classes``, the forward pass is the guided-backprop graph's, seeded for
    those classes' logits, so the guided maps come with it at no extra forward pass.
    """
    spec = model.config.input
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
        head_vjp=engine.head_vjp,
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


def predictions(model: Served, scores: np.ndarray) -> list[Prediction]:
    return [Prediction(label=label, index=i, score=round(float(s), 6))
            for i, (label, s) in enumerate(zip(model.config.labels, scores))]


def predict(model: Served, image: DecodedImage, watch: Stopwatch) -> PredictResponse:
    scores = model.combine_scores([forward(m, image, watch).scores for m in model.members])
    return PredictResponse(
        model=ModelRef(name=model.name, version=model.config.version),
        image=image_info(image),
        predictions=predictions(model, scores),
        timings_ms=watch.total(),
    )


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
        elif item.lstrip("-").isdigit() and 0 <= int(item) < len(labels):
            index = int(item)
        else:
            raise UnknownLabel(
                f"unknown class {item!r}; labels are {', '.join(labels)} "
                f"(or indices 0..{len(labels) - 1})"
            )
        if index not in out:
            out.append(index)
    return out


def explain(model: Served, image: DecodedImage, options: ExplainOptions,
            watch: Stopwatch) -> ExplainResponse:
    """Scores and maps of one image; for an ensemble, every member runs and the results
    are combined by ``model.combine_scores`` / ``model.combine_maps``."""
    return explain_with_maps(model, image, options, watch)[0]


def explain_with_maps(model: Served, image: DecodedImage, options: ExplainOptions,
                      watch: Stopwatch) -> tuple[ExplainResponse, list[np.ndarray]]:
    """:func:`explain`, plus each explanation's map as an array on the ``options.size``
    grid (what the heatmap encodes), for outputs that draw the maps themselves (DICOM)."""
    methods = [get_method(name) for name in options.methods]
    for member in model.members:
        for name in options.methods:
            if name in member.unavailable:
                raise UnknownMethod(f"method {name!r} is not available for model "
                                    f"{member.name!r}: {member.unavailable[name]}")
    if options.size is Size.FEATURE:
        pixel_methods = [m.name for m in methods if m.grid != "feature"]
        if pixel_methods:
            raise InvalidParameter(
                f"size=feature is only for CAM-type maps; {', '.join(pixel_methods)} "
                "produce maps on the model's input grid"
            )
        if len(model.members) > 1:
            raise InvalidParameter(
                f"size=feature needs one network; the members of ensemble {model.name!r} "
                "each have their own feature grid (use size=model or size=original)"
            )
    labels = model.config.labels
    # Guided maps of known classes' logits come out of the guided graph's own forward pass.
    known = (resolve_classes(labels, options.classes, None, options.score_threshold)
             if options.classes and options.target is Target.LOGIT
             and any(m.needs_guided for m in methods) else [])
    fwds = [forward(m, image, watch, guided_classes=known) for m in model.members]
    scores = model.combine_scores([f.scores for f in fwds])
    classes = known or resolve_classes(labels, options.classes, scores,
                                       options.score_threshold)
    raw: list[tuple[str, RawMap]] = []
    for method in methods:
        per_member = [method.compute(f.captures, classes, options.target) for f in fwds]
        for maps in zip(*per_member):
            raw.append((method.name, model.combine_maps(maps)))
        watch.lap(method.name)
    rendered = [
        _post_process(name, m, image, fwds[0].model_input, model.grid, labels, options)
        for name, m in raw
    ]
    watch.lap("render")
    response = ExplainResponse(
        model=ModelRef(name=model.name, version=model.config.version),
        image=image_info(image),
        predictions=predictions(model, scores),
        explanations=[explanation for explanation, _ in rendered],
        timings_ms=watch.total(),
    )
    return response, [values for _, values in rendered]


def _post_process(method: str, raw: RawMap, image: DecodedImage, model_input: ModelInput,
                  model_hw: tuple[int, int], labels: Sequence[str],
                  options: ExplainOptions) -> tuple[Explanation, np.ndarray]:
    mh, mw = model_hw
    at_model = resize(raw.values, mh, mw)
    strength = normalise(at_model)
    if raw.grid == "model":
        # Pixel-level gradient maps are speckle; boxes around single pixels tell nothing.
        # Regions come from their local energy instead (σ = 2 % of the input's diagonal).
        strength = normalise(smooth(strength, 0.02 * float(np.hypot(mh, mw))))
    found = regions(strength, options.region_threshold, image.width / mw, image.height / mh)
    if options.size is Size.ORIGINAL:
        values = resize(raw.values, image.height, image.width)
        # image.pixels may be a reduced-resolution decode: bring it onto the map's grid.
        source = image.pixels
    elif options.size is Size.MODEL:
        values, source = at_model, model_input.image01
    else:
        values, source = raw.values, model_input.image01
    # Only an overlay draws the image; a big radiograph is not resized for nothing.
    backdrop = (resize(source, *values.shape[:2]) if options.encoding is Encoding.OVERLAY
                else None)
    overlay_sigma = display_sigma(values.shape, raw.grid)
    explanation = Explanation(
        method=method,
        label=None if raw.index is None else labels[raw.index],
        index=raw.index,
        heatmap=Heatmap(encoding=options.encoding.value, width=values.shape[1],
                        height=values.shape[0],
                        data=encode(values, options.encoding, backdrop, overlay_sigma)),
        regions=[Region(box=list(r.box), score=r.score) for r in found],
        points=None if raw.points is None else _to_image(raw.points, image, model_hw),
    )
    return explanation, values


def _to_image(points: np.ndarray, image: DecodedImage,
              model_hw: tuple[int, int]) -> list[list[float]]:
    """Model-grid pixel indices (x, y) → original-image pixels, through the plain stretch.

    Pixel centres map onto pixel centres, as in cv2's resize: (i + 0.5)·scale − 0.5.
    """
    mh, mw = model_hw
    scale = np.array([image.width / mw, image.height / mh])
    xy = (points.astype(np.float64) + 0.5) * scale - 0.5
    xy = np.clip(xy, 0, [image.width - 1, image.height - 1])
    return [[round(float(x), 3), round(float(y), 3)] for x, y in xy]

