"""What every explanation method sees, and the template they share.

Methods are NumPy over captured arrays: they never touch ONNX Runtime. Everything works on
a batch: the captures hold the forward pass of B images (one per request of a batch), and a
method answers many :class:`Row` s at once — one per (image, class) asked for, across the
requests — so the graphs it re-runs (the head, its VJP, the guided graph) run once per
batch. The runtime provides those graphs as :class:`Graphs`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

from service.graph.build import Capability
from service.models.activation import Activation

if TYPE_CHECKING:
    from service.graph.fixations import FixationPlan


class Target(StrEnum):
    """Which score a method differentiates or perturbs."""

    LOGIT = "logit"
    PROBABILITY = "probability"


@dataclass(frozen=True)
class Row:
    """One map asked of a batch: which image, which class (None: class-agnostic), which score."""

    image: int
    cls: int | None
    target: Target = Target.LOGIT


class Graphs(Protocol):
    """The compiled graphs as plain functions over one batch (service.runtime.engine)."""

    def head(self, acts: np.ndarray, images: Sequence[int]) -> np.ndarray:
        """(R, C, H, W) activations → (R, K) logits; row r is a variant of the batch's image
        ``images[r]`` (a transformer's head also reads that image's prefix tokens)."""

    @property
    def pooled(self) -> bool:
        """Whether the head begins with the mean of the activations over their spatial axes
        (and reads them no other way), so that :meth:`pooled_head` can stand in for it."""

    def pooled_head(self, means: np.ndarray) -> np.ndarray:
        """(R, C) spatial means of activations → (R, K) logits: the head from that mean on
        (only where :attr:`pooled`)."""

    @property
    def pooled_vjp(self) -> bool:
        """Whether :meth:`pooled_head_vjp` can run (a pooled head the rules differentiate)."""

    def pooled_head_vjp(self, means: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """Σ_k seed[r, k]·∂logit_k/∂means[r], (R, C) (only where :attr:`pooled_vjp`)."""

    def head_vjp(self, acts: np.ndarray, seeds: np.ndarray,
                 images: Sequence[int]) -> np.ndarray:
        """Σ_k seed[r, k]·∂logit_k/∂acts[r], (R, C, H, W); ``images`` as for ``head``."""

    def guided(self, images: Sequence[int], seeds: np.ndarray) -> np.ndarray:
        """Guided-backprop Σ_k seed[r, k]·∂logit_k/∂image for the batch's images ``images[r]``
        before normalisation, channel-first (R, C, H, W) at the network's input grid."""

    def fixations(self, image: int) -> tuple[Mapping[str, np.ndarray], FixationPlan]:
        """What CNN Fixations walks for one image of the batch: the values of
        ``plan.needed`` (batch of one) and the plan."""


@dataclass(frozen=True)
class Captures:
    """A batch's forward pass, and the network's graphs to re-run parts of it.

    Attributes:
        activations: target-layer activations, (B, C, H, W).
        logits: (B, K).
        activation: how logits become probabilities.
        graphs: the compiled graphs bound to this batch.
        memo: results shared by the methods of one batch, keyed per row (CRM and
            CRM-combined mask the same copies; Guided Grad-CAM reuses Grad-CAM and the
            guided maps; the runtime leaves guided maps it computed with the forward pass).
    """

    activations: np.ndarray
    logits: np.ndarray
    activation: Activation
    graphs: Graphs
    memo: dict[object, object] = field(default_factory=dict, compare=False)

    def scores(self, logits: np.ndarray, target: Target) -> np.ndarray:
        """The differentiated/perturbed score S for (R, K) logits."""
        if target is Target.PROBABILITY:
            return self.activation.scores(logits)
        return logits

    def score_seed(self, row: Row) -> np.ndarray:
        """dS_cls/dlogits of the row's image, the seed of a vector-Jacobian product."""
        logits = self.logits[row.image]
        assert row.cls is not None, "a seed needs a class"
        if row.target is Target.PROBABILITY:
            return self.activation.score_grad(logits, row.cls)
        seed = np.zeros(logits.shape, dtype=np.float32)
        seed[row.cls] = 1.0
        return seed

    def seeds(self, rows: Sequence[Row]) -> np.ndarray:
        """(R, K): one seed per row."""
        return np.stack([self.score_seed(r) for r in rows]).astype(np.float32, copy=False)

    def missing(self, key: str, rows: Sequence[Row]) -> list[Row]:
        """The distinct rows whose ``key`` result is not in the memo yet."""
        return [r for r in dict.fromkeys(rows) if (key, r) not in self.memo]


@dataclass(frozen=True)
class RawMap:
    """A method's output before post-processing: a map on its native grid.

    ``grid`` says which grid: "feature" (the target layer's) or "model" (the input's).
    ``index`` is the explained class, or None for class-agnostic maps. CAM-type maps are
    non-negative; gradient maps are signed. ``points`` are (x, y) pixel indices on the
    model's input grid, float (N, 2), for methods that point (CNN Fixations).
    """

    values: np.ndarray
    index: int | None
    grid: str
    points: np.ndarray | None = None


class Method(ABC):
    """An explanation method. Subclasses set the class attributes and the ``maps`` hook."""

    name: ClassVar[str]
    paper: ClassVar[str]
    per_class: ClassVar[bool] = True
    grid: ClassVar[str] = "feature"
    # The compiled graphs a method runs beyond the forward ones (backbone, head); a model
    # whose compiler could not build one lists the method in ``unavailable_methods``.
    requires: ClassVar[frozenset[Capability]] = frozenset()

    def compute(self, captures: Captures, rows: Sequence[Row]) -> list[RawMap]:
        """Raw maps, one per row, in order (a class-agnostic method's have no class)."""
        return [RawMap(np.asarray(values, dtype=np.float32),
                       row.cls if self.per_class else None, self.grid)
                for values, row in zip(self.maps(captures, rows), rows, strict=True)]

    @abstractmethod
    def maps(self, captures: Captures, rows: Sequence[Row]) -> Sequence[np.ndarray]:
        """One map per row on the method's grid."""


def rows(classes: Sequence[int | None], target: Target = Target.LOGIT,
         image: int = 0) -> list[Row]:
    """The rows asking ``classes`` of one image of the batch."""
    return [Row(image, cls, target) for cls in classes]
