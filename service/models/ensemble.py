"""Ensembles: a model folder with ``ensemble.toml`` naming other models of the repository.

```toml
members = ["demo-cxr", "demo-cxr-b"]   # served model names (folder names unless model.toml
                                        # sets name); at least two, all with the same labels
name = "demo-ensemble"                  # optional: the folder's name
version = "1"                           # optional
description = "..."                     # optional
```

An ensemble is served like one model. Scores are the mean of the members' scores
(probabilities). Each method's map is computed by every member on its own network, resized
to the ensemble's grid — the **first member's input grid** — max-normalised per member and
averaged (:mod:`service.methods.ensemble`); CNN Fixations points are the union of the
members' points. Members must be plain models: an ensemble of ensembles is refused (list
the networks instead), which also rules out cycles.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.errors import ModelError
from service.methods.base import RawMap
from service.methods.ensemble import mean_map, mean_scores
from service.models.spec import LabelCode

if TYPE_CHECKING:
    from service.models.repository import LoadedModel

ENSEMBLE_TOML = "ensemble.toml"


@dataclass(frozen=True)
class EnsembleConfig:
    """What ensemble.toml says, with the labels its members share."""

    name: str
    version: str
    description: str
    members: tuple[str, ...]
    labels: tuple[str, ...]
    folder: Path
    # The labels' codes its members give (model.toml [codes]); members must not disagree.
    codes: Mapping[str, LabelCode] = field(default_factory=dict)


@dataclass(frozen=True)
class Ensemble:
    """Several loaded models served as one: the pipeline's view of a model."""

    config: EnsembleConfig
    members: tuple[LoadedModel, ...]
    sha256: str

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def grid(self) -> tuple[int, int]:
        """(height, width) of the maps: the first member's input grid."""
        return self.members[0].grid

    def combine_scores(self, scores: Sequence[np.ndarray]) -> np.ndarray:
        return mean_scores(scores)

    def combine_maps(self, maps: Sequence[RawMap]) -> RawMap:
        return mean_map(maps, [m.grid for m in self.members], self.grid)


def _read(folder: Path) -> tuple[dict[str, object], bytes]:
    path = folder / ENSEMBLE_TOML
    try:
        raw = path.read_bytes()
        return tomllib.loads(raw.decode("utf-8")), raw
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{folder.name}/{ENSEMBLE_TOML}: {exc}") from exc


def load_ensemble(folder: Path, models: Mapping[str, LoadedModel],
                  ensembles: Sequence[str]) -> Ensemble:
    """Build the ensemble of ``folder`` from already loaded models.

    Args:
        folder: the folder holding ensemble.toml.
        models: the repository's plain models, by served name.
        ensembles: the names of every ensemble in the repository (to refuse nesting).

    Raises:
        ModelError: for a malformed file, fewer than two members, an unknown or repeated
            member, a member that is an ensemble, or members whose labels (or their codes)
            differ.
    """
    data, raw = _read(folder)
    where = f"{folder.name}/{ENSEMBLE_TOML}"
    name = str(data.get("name", folder.name))
    members = data.get("members")
    if not isinstance(members, list) or not all(isinstance(m, str) and m for m in members):
        raise ModelError(f'{where}: members must be a list of model names, e.g. '
                         f'members = ["a", "b"]')
    if len(members) < 2:
        raise ModelError(f"{where}: an ensemble needs at least two members")
    repeated = sorted({m for m in members if members.count(m) > 1})
    if repeated:
        raise ModelError(f"{where}: member {repeated[0]!r} is listed twice")
    for member in members:
        if member == name:
            raise ModelError(f"{where}: ensemble {name!r} lists itself as a member")
        if member in ensembles:
            raise ModelError(f"{where}: member {member!r} is itself an ensemble; ensembles of "
                             "ensembles are not supported (list its models instead)")
        if member not in models:
            raise ModelError(f"{where}: unknown member {member!r}; models: "
                             f"{', '.join(sorted(models))}")
    loaded = tuple(models[m] for m in members)
    labels = loaded[0].config.labels
    for model in loaded[1:]:
        if model.config.labels != labels:
            raise ModelError(
                f"{where}: members must have identical labels in the same order; "
                f"{loaded[0].name!r} has {', '.join(labels)} but {model.name!r} has "
                f"{', '.join(model.config.labels)}"
            )
    codes: dict[str, LabelCode] = {}
    for model in loaded:
        for label, code in model.config.codes.items():
            if codes.setdefault(label, code) != code:
                raise ModelError(f"{where}: members code label {label!r} differently "
                                 f"(model.toml [codes]); {model.name!r} has {code.scheme} "
                                 f"{code.value}, another {codes[label].scheme} "
                                 f"{codes[label].value}")
    digest = hashlib.sha256(raw)
    for model in loaded:
        digest.update(model.sha256.encode())
    config = EnsembleConfig(name=name, version=str(data.get("version", "1")),
                            description=str(data.get("description", "")),
                            members=tuple(members), labels=labels, folder=folder,
                            codes=codes)
    return Ensemble(config, loaded, digest.hexdigest())


def ensemble_name(folder: Path) -> str:
    """The served name of the ensemble in ``folder`` (for nesting checks before loading)."""
    return str(_read(folder)[0].get("name", folder.name))
