"""CNN Fixations with a class-discriminative FC rule (draft)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.graph.fixations import FixationPlan, Step
from service.methods.fixations import CHUNK, CnnFixations, Points, Weights, walk


@dataclass(frozen=True)
class FcSelection:
    """Which inputs of a vector FC layer carry the traced neurons.

    Attributes:
        weighting: "contribution": the inputs' contributions are summed over the traced
            neurons, each weighted by its own weight; "gradient": the same with weights
            divided by ...; None: per neuron, as the authors do.
        share: keep the smallest set of inputs carrying this share of the positive
            contribution (1: every positive one).
    """

    weighting: str | None
    share: float

    def __call__(self, step: Step, points: Points, weights: Weights,
                 acts: Mapping[str, np.ndarray]) -> list[tuple[str, Points, Weights | None]]:
        x = acts[step.inputs[0]]
        w = step.weight
        assert w is not None
        table = x.reshape(-1, x.shape[-1])
        rows = np.ravel_multi_index(tuple(points[:, 1:-1].T), x.shape[:-1])
        groups = points[:, 0] * len(table) + rows  # one per (tag, input row)
        per = max(1, CHUNK // x.shape[-1])
        out_points, out_weights = [], []
        for group in np.unique(groups):
            mine = np.flatnonzero(groups == group)
            tag, row = divmod(int(group), len(table))
            inputs = table[row].astype(np.float64)
            prefix = points[mine[0], :-1]
            if self.weighting is None:
                for lo in range(0, len(mine), per):
                    sel = mine[lo:lo + per]
                    contribution = w[points[sel, -1]] * inputs
                    keep = _share(contribution, self.share)
                    j = np.flatnonzero(keep.any(axis=0))
                    out_points.append(np.concatenate(
                        [np.repeat(prefix[None], len(j), axis=0), j[:, None]], axis=1))
                continue
            summed = np.zeros(x.shape[-1])
            for lo in range(0, len(mine), per):
                sel = mine[lo:lo + per]
                summed += weights[sel] @ w[points[sel, -1]].astype(np.float64)
            contribution = summed * inputs
            j = np.flatnonzero(_share(contribution[None], self.share)[0])
            out_points.append(np.concatenate(
                [np.repeat(prefix[None], len(j), axis=0), j[:, None]], axis=1))
            out_weights.append(contribution[j] if self.weighting == "contribution"
                               else summed[j])
        return [(step.inputs[0], np.concatenate(out_points),
                 None if self.weighting is None else np.concatenate(out_weights))]


def _share(contribution: np.ndarray, share: float) -> np.ndarray:
    """Per row: the smallest set of entries, largest first, whose sum reaches ``share`` of
    the row's positive total (ties: the lower index first); never a non-positive entry."""
    positive = contribution > 0
    if share >= 1:
        return positive
    order = np.argsort(-contribution, axis=1, kind="stable")
    ranked = np.take_along_axis(contribution, order, axis=1)
    before = np.cumsum(np.maximum(ranked, 0), axis=1) - np.maximum(ranked, 0)
    total = np.maximum(contribution, 0).sum(axis=1, keepdims=True)
    keep_ranked = (before < share * total) & (ranked > 0)
    keep = np.zeros_like(positive)
    np.put_along_axis(keep, order, keep_ranked, axis=1)
    return keep


class SummedFixations(CnnFixations):
    """draft"""

    name = "fixations_summed"

    def __init__(self, selection: FcSelection | None = None) -> None:
        self.selection = selection or FcSelection("contribution", 0.5)

    def trace(self, plan: FixationPlan, activations: Mapping[str, np.ndarray],
              classes: Sequence[int]) -> Points:
        return walk(plan, activations, classes, fc=self.selection)[plan.image]
