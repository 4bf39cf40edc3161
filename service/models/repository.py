"""The model repository: one folder per model with model.onnx and model.toml, and
ensembles (folders with ensemble.toml, see :mod:`service.models.ensemble`)."""

from __future__ import annotations

import logging
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from service.errors import CompileError, ModelError, ModelUnavailable, UnknownModel
from service.graph import weights
from service.graph.build import RARELY_USED
from service.graph.cache import CompileCache
from service.graph.specialise import image_shape
from service.graph.target import FINAL_ACTIVATIONS, detect_layout
from service.methods import METHODS
from service.methods.base import RawMap
from service.models.activation import Activation
from service.models.ensemble import ENSEMBLE_TOML, Ensemble, ensemble_name, load_ensemble
from service.models.spec import Accepts, Attribute, InputSpec, LabelCode, Layout
from service.runtime.engine import Engine
from service.runtime.sessions import ORT_ERRORS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """What model.toml says about a model."""

    name: str
    version: str
    description: str
    labels: tuple[str, ...]
    input: InputSpec
    activation: Activation
    target_layer: str | None
    folder: Path
    accepts: Accepts = field(default_factory=Accepts)
    codes: Mapping[str, LabelCode] = field(default_factory=dict)


def _require(table: dict[str, object], key: str, kind: type, where: str) -> object:
    if key not in table:
        raise ModelError(f"{where}: missing key {key!r}")
    value = table[key]
    if not isinstance(value, kind):
        raise ModelError(f"{where}: {key!r} must be a {kind.__name__}")
    return value


def read_config(folder: Path, model: onnx.ModelProto) -> ModelConfig:
    """Parse and validate ``folder/model.toml`` against the graph it describes.

    ``input.layout`` and ``output.activation`` may be left out when the graph shows them:
    the layout from the ops reading the image (or its shape), the activation from a final
    Sigmoid/Softmax. Written, they override (and the compiler checks the activation).

    Raises:
        ModelError: naming the file and the offending key, or what to write when the
            graph does not tell.
    """
    path = folder / "model.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path.name} in {folder.name}: {exc}") from exc
    where = f"{folder.name}/model.toml"
    labels = _require(data, "labels", list, where)
    if not labels or not all(isinstance(x, str) and x for x in labels):  # type: ignore[union-attr]
        raise ModelError(f"{where}: labels must be a non-empty list of names")
    if len(set(labels)) != len(labels):  # type: ignore[arg-type]
        raise ModelError(f"{where}: labels must be unique")
    inp = _require(data, "input", dict, where)
    size = _require(inp, "size", list, f"{where} [input]")  # type: ignore[arg-type]
    channels = _require(inp, "channels", int, f"{where} [input]")  # type: ignore[arg-type]
    if channels not in (1, 3):
        raise ModelError(f"{where}: input.channels must be 1 or 3")
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):  # type: ignore[arg-type]
        raise ModelError(f"{where}: input.size must be [height, width]")
    mean = tuple(float(m) for m in inp.get("mean", [0.0] * channels))  # type: ignore[union-attr]
    std = tuple(float(s) for s in inp.get("std", [1.0] * channels))  # type: ignore[union-attr]
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ModelError(f"{where}: input.mean/std need one value per channel, std > 0")
    try:
        layout_text = inp.get("layout")  # type: ignore[union-attr]
        layout = Layout(layout_text) if layout_text is not None else detect_layout(model)
        activation_text = data.get("output", {}).get("activation")
        activation = (Activation(activation_text) if activation_text is not None
                      else _final_activation(model))
    except ValueError as exc:
        raise ModelError(f"{where}: {exc}") from exc
    if layout is None:
        raise ModelError(
            f"{where}: the graph does not show whether its image input is NCHW or NHWC; "
            'write input.layout = "NCHW" or "NHWC"')
    if activation is None:
        raise ModelError(
            f"{where}: the graph ends in raw logits, and whether they are multi-label or "
            "one label per image cannot be told from it; write [output] activation = "
            '"sigmoid" (independent labels), "softmax" (one label per image) or "none" '
            "(the outputs are the scores)")
    target = data.get("explain", {}).get("target_layer")
    accepts = _accepts(data.get("accepts", {}), where)
    codes = _codes(data.get("codes", {}), labels, where)  # type: ignore[arg-type]
    return ModelConfig(
        name=str(data.get("name", folder.name)),
        version=str(data.get("version", "1")),
        description=str(data.get("description", "")),
        labels=tuple(labels),  # type: ignore[arg-type]
        input=InputSpec(int(size[0]), int(size[1]), channels, mean, std, layout),  # type: ignore[index]
        activation=activation,
        target_layer=str(target) if target else None,
        folder=folder,
        accepts=accepts,
        codes=codes,
    )


# Code Value is SH (16 characters), Code Meaning LO (64); a designator is SH too.
_CODE_LIMITS = {"scheme": 16, "value": 16, "meaning": 64}


def _codes(table: object, labels: list[str], where: str) -> dict[str, LabelCode]:
    """``[codes]``: per label, ``{ scheme = "SCT", value = "287272002", meaning = "..." }``."""
    if not isinstance(table, dict):
        raise ModelError(f"{where}: [codes] must be a table")
    codes = {}
    for label, entry in table.items():
        if label not in labels:
            raise ModelError(f"{where}: [codes] names {label!r}, which is not one of labels")
        if not isinstance(entry, dict) or set(entry) != set(_CODE_LIMITS):
            raise ModelError(f"{where}: codes.{label!r} must be a table of scheme, value and "
                             "meaning, e.g. { scheme = \"SCT\", value = \"287272002\", "
                             "meaning = \"Cardiomegaly\" }")
        for key, limit in _CODE_LIMITS.items():
            text = entry[key]
            if not isinstance(text, str) or not text.strip() or len(text) > limit \
                    or not text.isascii() or "\\" in text:
                raise ModelError(f"{where}: codes.{label!r}.{key} must be ASCII text of 1 "
                                 f"to {limit} characters without a backslash")
        codes[label] = LabelCode(entry["scheme"].strip(), entry["value"].strip(),
                                 entry["meaning"].strip())
    return codes


def _accepts(table: object, where: str) -> Accepts:
    """``[accepts]``: lists of code strings per attribute (see :class:`Accepts`)."""
    if not isinstance(table, dict):
        raise ModelError(f"{where}: [accepts] must be a table")
    unknown = set(table) - {a.name for a in Attribute}
    if unknown:
        raise ModelError(f"{where}: [accepts] has unknown keys {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(a.name for a in Attribute)}")
    values: dict[str, frozenset[str]] = {}
    for key, listed in table.items():
        if not isinstance(listed, list) or not all(isinstance(v, str) and v.strip()
                                                   for v in listed):
            raise ModelError(f"{where}: accepts.{key} must be a list of code strings")
        values[key] = frozenset(v.strip().upper() for v in listed)
    return Accepts(**values)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve.

    ``sha256`` names its content: model.onnx's SHA-256, or for an export with external
    data files, the digest of model.onnx and those files (service.graph.weights.
    content_digest).
    """

    config: ModelConfig
    engine: Engine
    sha256: str
    load_seconds: float

    @property
    def name(self) -> str:
        return self.config.name

    # What the pipeline asks of any served model (see Ensemble): one network is an
    # ensemble of itself whose combination is the identity.
    @property
    def members(self) -> tuple[LoadedModel, ...]:
        return (self,)

    @property
    def grid(self) -> tuple[int, int]:
        """(height, width) of the network's input, where model-grid maps live."""
        return self.config.input.height, self.config.input.width

    def combine_scores(self, scores: Sequence[np.ndarray]) -> np.ndarray:
        return scores[0]

    @cached_property
    def unavailable(self) -> dict[str, str]:
        """Methods this network cannot serve, with the compiler's reason."""
        out: dict[str, str] = {}
        for name, method in METHODS.items():
            missing = self.engine.compiled.missing(method.requires)
            if missing:
                out[name] = "; ".join(f"no {cap.title}: {why}" for cap, why in missing.items())
        return out

    def combine_maps(self, maps: Sequence[RawMap]) -> RawMap:
        return maps[0]


# A served model: one network, or an ensemble of networks.
Served = LoadedModel | Ensemble


_DEFAULT_CACHE = CompileCache()


def load_model(folder: Path, *, providers: list[str], threads: int, head_batch: int,
               cache: CompileCache | None = None, image_batch: int = 8,
               conv_algo_search: str = "EXHAUSTIVE",
               lazy_sessions: bool = True) -> LoadedModel:
    """Read, compile and open one model folder.

    ``image_batch`` bounds the images per graph run (the batcher's batch size);
    ``conv_algo_search`` is cuDNN's (service.runtime.sessions.provider_options);
    ``lazy_sessions`` opens the guided and fixations graphs' sessions at their first run.

    Raises:
        ModelError: when the folder, its model.toml or its graph is unusable.
    """
    start = time.perf_counter()
    try:
        raw = (folder / "model.onnx").read_bytes()
        # The weights are held once, outside every graph the compiler makes of this one;
        # their key is the model's content digest (its external data files included).
        model, held = weights.offload(raw, folder, "model.onnx")
        digest = held.key
    except (OSError, DecodeError, ValueError, IndexError) as exc:
        raise ModelError(f"{folder.name}/model.onnx: {exc}") from exc
    config = read_config(folder, model)
    spec = config.input
    compiled = (cache or _DEFAULT_CACHE).compile(
        raw, model, layout=spec.layout, activation=config.activation.value,
        target_layer=config.target_layer,
        input_shape=image_shape(spec.layout, spec.height, spec.width, spec.channels),
        digest=digest)
    del raw  # the weights live in their own buffer now
    outputs = compiled.backbone.graph.output
    n_out = outputs[1].type.tensor_type.shape.dim[-1].dim_value if len(outputs) > 1 else 0
    if n_out and n_out != len(config.labels):
        raise CompileError(
            f"{folder.name}: the network has {n_out} outputs but model.toml lists "
            f"{len(config.labels)} labels"
        )
    try:
        engine = Engine(compiled, providers, threads, max_batch=head_batch,
                        image_batch=image_batch, conv_algo_search=conv_algo_search,
                        lazy=RARELY_USED if lazy_sessions else ())
    except ORT_ERRORS as exc:
        raise ModelError(f"{folder.name}: ONNX Runtime cannot load the graphs: {exc}") from exc
    _check_input(folder, config, engine)
    return LoadedModel(config, engine, digest, time.perf_counter() - start)


def _final_activation(model: onnx.ModelProto) -> Activation | None:
    """The activation a graph ends in (its first output's producer), None for raw logits."""
    if not model.graph.output:
        return None
    scores = model.graph.output[0].name
    producer = next((n for n in model.graph.node if scores in n.output), None)
    name = FINAL_ACTIVATIONS.get(producer.op_type) if producer is not None else None
    return Activation(name) if name is not None else None


def _check_input(folder: Path, config: ModelConfig, engine: Engine) -> None:
    """One forward pass of a blank image shaped as model.toml says, at load (the engine's
    warm-up): a wrong size, channel count or layout stops the start-up with the graph's own
    words instead of failing every request."""
    spec = config.input
    shape = ((1, spec.channels, spec.height, spec.width) if spec.layout is Layout.NCHW
             else (1, spec.height, spec.width, spec.channels))
    try:
        engine.warm_up(shape)
    except ORT_ERRORS as exc:
        raise ModelError(
            f"{folder.name}: the network does not take the input model.toml describes "
            f"({spec.layout.value} {'×'.join(map(str, shape))}): {exc}") from exc


# How long a load failure's reason may be in GET /models and in problem details.
REASON_CHARS = 500


class Repository:
    """The models being served, by name: networks (``models``) and ``ensembles``, and
    those that failed to load (``unavailable``: name → reason)."""

    def __init__(self, models: dict[str, LoadedModel], default: str,
                 ensembles: dict[str, Ensemble] | None = None,
                 unavailable: dict[str, str] | None = None) -> None:
        self.models = models
        self.ensembles = ensembles or {}
        self.default = default
        self.unavailable = dict(sorted((unavailable or {}).items()))

    @property
    def served(self) -> dict[str, Served]:
        """Every served model, networks and ensembles, sorted by name."""
        both: dict[str, Served] = {**self.models, **self.ensembles}
        return dict(sorted(both.items()))

    def get(self, name: str | None) -> Served:
        key = name or self.default
        served = self.served
        if key in self.unavailable:
            raise ModelUnavailable(f"model {key!r} failed to load: {self.unavailable[key]}")
        try:
            return served[key]
        except KeyError:
            raise UnknownModel(
                f"no model named {key[:100]!r}; available: {', '.join(served)}"
            ) from None


def model_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "model.toml").is_file())


def ensemble_folders(root: Path) -> list[Path]:
    """Folders with an ensemble.toml.

    Raises:
        ModelError: for a folder holding both a model.toml and an ensemble.toml.
    """
    found = sorted(p for p in root.iterdir() if (p / ENSEMBLE_TOML).is_file())
    for folder in found:
        if (folder / "model.toml").is_file():
            raise ModelError(f"{folder.name} holds both model.toml and {ENSEMBLE_TOML}; "
                             "a folder is either a model or an ensemble")
    return found


def load_repository(root: Path, *, default: str | None, providers: list[str], threads: int,
                    head_batch: int, cache: CompileCache | None = None, image_batch: int = 8,
                    conv_algo_search: str = "EXHAUSTIVE", lazy_sessions: bool = True
                    ) -> Repository:
    """Load every model folder under ``root``, then the ensembles of those models.

    A folder that fails to load (or an ensemble of it) is ``unavailable`` with its reason,
    and the others serve. The default, when not configured, is the first plain model by
    name, loaded or not (adding an ensemble or breaking a model never silently makes another
    network answer the requests that name none); a configured default may name an ensemble.

    Raises:
        ModelError: when the folder holds no model, none of them loads, or the configured
            default is not among them.
    """
    if not root.is_dir():
        raise ModelError(f"model repository {root} is not a folder")
    folders = model_folders(root)
    if not folders:
        raise ModelError(f"model repository {root} holds no folder with a model.toml")
    models: dict[str, LoadedModel] = {}
    unavailable: dict[str, str] = {}
    for folder in folders:
        try:
            loaded = load_model(folder, providers=providers, threads=threads,
                                head_batch=head_batch, cache=cache, image_batch=image_batch,
                                conv_algo_search=conv_algo_search,
                                lazy_sessions=lazy_sessions)
            if loaded.name in models:
                raise ModelError(f"two model folders are named {loaded.name!r}")
        except ModelError as exc:
            unavailable[folder.name] = _reason(exc)
            log.warning("model %s is unavailable: %s", folder.name, unavailable[folder.name])
            continue
        models[loaded.name] = loaded
        log.info("loaded model %s (target layer %s, providers %s) in %.2f s", loaded.name,
                 loaded.engine.split.target, ",".join(loaded.engine.providers),
                 loaded.load_seconds)
        for method, reason in loaded.unavailable.items():
            log.warning("model %s: %s is unavailable (%s)", loaded.name, method, reason)
    if not models:
        raise ModelError("no model could be loaded: " + "; ".join(
            f"{name}: {reason}" for name, reason in unavailable.items()))
    first = min([*models, *unavailable])
    failed = dict(unavailable)  # the networks that failed, which no ensemble can use
    named: list[tuple[Path, str]] = []
    for folder in ensemble_folders(root):
        try:
            named.append((folder, ensemble_name(folder)))
        except ModelError as exc:
            unavailable[folder.name] = _reason(exc)
            log.warning("ensemble %s is unavailable: %s", folder.name, unavailable[folder.name])
    # A name that is also a network's names the network (the ensemble is refused below).
    names = [name for _, name in named if name not in models]
    ensembles: dict[str, Ensemble] = {}
    for folder, ens_name in named:
        clash = ens_name in models or ens_name in ensembles or ens_name in unavailable
        try:
            if clash:
                raise ModelError(f"two model folders are named {ens_name!r}")
            broken = [m for m in _members(folder) if m in failed]
            if broken:
                raise ModelError(f"member {', '.join(broken)} is unavailable")
            ensembles[ens_name] = load_ensemble(folder, models, names)
        except ModelError as exc:
            key = folder.name if clash else ens_name  # never shadow the name that serves
            unavailable[key] = _reason(exc)
            log.warning("ensemble %s is unavailable: %s", key, unavailable[key])
            continue
        log.info("loaded ensemble %s of %s", ens_name,
                 ", ".join(ensembles[ens_name].config.members))
    repository = Repository(models, default or first, ensembles, unavailable)
    if repository.default not in repository.served and repository.default not in unavailable:
        raise ModelError(f"default model {repository.default!r} is not in "
                         f"{', '.join(repository.served)}")
    return repository


def _reason(exc: ModelError) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 1] + "…"


def _members(folder: Path) -> list[str]:
    """The member names an ensemble.toml lists (load_ensemble validates the file)."""
    try:
        data = tomllib.loads((folder / ENSEMBLE_TOML).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return []
    members = data.get("members", [])
    return [m for m in members if isinstance(m, str)] if isinstance(members, list) else []
