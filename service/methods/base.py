"""What every explanation method sees, and the template they share.

Methods are NumPy over captured arrays: they never touch ONNX Runtime. When a method needs
to re-evaluate the network's head or its gradient (CRM, Grad-CAM), it calls the plain
functions in :class:`Captures`, which the runtime provides.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from service.models.activation import Activation

if TYPE_CHECKING:
    from service.graph.fixations import FixationPlan


class Target(StrEnum):
    """Which score a method differentiates or perturbs."""

    LOGIT = "logit"
    PROBABILITY = "probability"


@dataclass(frozen=True)
class Captures:
    """One image's forward pass, and the head as callables.

    Attributes:
        activations: target-layer activations, (C, H, W).
        logits: (K,).
        activation: how logits become probabilities.
        head: (B, C, H, W) activations → (B, K) logits.
        head_vjp: activations (B, C, H, W) and seeds (B, K) → Σ_k seed·∂logit_k/∂A, (B, C, H, W);
            None when the model has no head VJP graph (an op of its head has no rule).
        guided: seeds (B, K) → guided-backprop Σ_k seed·∂logit_k/∂image for the image before
            normalisation, channel-first (B, C, H, W) at the network's input grid; None when
            the model has no guided graph.
        fixations: () → (the values of ``plan.needed`` for this image, the plan): what CNN
            Fixations walks; None when the model has no fixations graph.
    """

    activations: np.ndarray
    logits: np.ndarray
    activation: Activation
    head: Callable[[np.ndarray], np.ndarray]
    head_vjp: Callable[[np.ndarray, np.ndarray], np.ndarray] | None
    guided: Callable[[np.ndarray], np.ndarray] | None = None
    fixations: Callable[[], tuple[Mapping[str, np.ndarray], FixationPlan]] | None = None
    # Results shared by methods within one request (CRM and CRM-combined mask the same copies).
    memo: dict[object, object] = field(default_factory=dict, compare=False)

    def scores(self, logits: np.ndarray, target: Target) -> np.ndarray:
        """The differentiated/perturbed score S for (B, K) logits."""
        if target is Target.PROBABILITY:
            return self.activation.scores(logits)
        return logits

    def score_seed(self, cls: int, target: Target) -> np.ndarray:
        """dS_cls/dlogits, the seed of the head's vector-Jacobian product."""
        if target is Target.PROBABILITY:
            return self.activation.score_grad(self.logits, cls)
        seed = np.zeros(self.logits.shape, dtype=np.float32)
        seed[cls] = 1.0
        return seed


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
    """An explanation method. Subclasses set the class attributes and one hook."""

    name: ClassVar[str]
    paper: ClassVar[str]
    per_class: ClassVar[bool] = True
    grid: ClassVar[str] = "feature"
    # The compiled graphs a method runs beyond the forward ones (backbone, head); a model
    # whose compiler could not build one lists the method in ``unavailable_methods``.
    needs_head_vjp: ClassVar[bool] = False
    needs_guided: ClassVar[bool] = False
    needs_fixations: ClassVar[bool] = False

    @abstractmethod
    def compute(self, captures: Captures, classes: Sequence[int],
                target: Target) -> list[RawMap]:
        """Raw maps: one per class in ``classes`` (or one in all for class-agnostic methods)."""
