"""CNN Fixations with a class-discriminative FC rule: ``fixations_summed``.

The walk, and every rule but one, are the authors' (``service.methods.fixations``): conv,
pooling, Add, Concat, reshapes and the FC rule on a flattened C×H×W map are unchanged.
Only an **FC layer whose input is a vector** (Gemm/MatMul after GAP, or after another FC
layer) chooses its inputs differently:

1. Each traced output neuron j carries a weight r_j: 1 at the explained logit, and below
   that the contribution it was kept for (weights ride unchanged through activations,
   reshapes and the like, add up where points meet, and are 1 after every other rule).
2. The contribution of input k to the traced set is summed over it, each neuron weighted
   by its own weight: s_k = a_k · Σ_j r_j·W[j, k].
3. The kept inputs are the smallest set, largest s_k first, whose sum reaches
   ``SHARE`` of Σ_k max(s_k, 0) (ties: the lower index first; never an s_k ≤ 0); each
   carries s_k as its weight on to the next FC layer.

At the logit (one neuron, weight 1) step 2 gives the authors' a_k·W[c, k].

Why: the authors keep every input with a_k·W[j, k] > 0 for *any* traced neuron j. Through
GAP → FC → ReLU → FC (the head chest-radiograph models have) the logit keeps half the
hidden neurons, and their union keeps nearly every channel, for every class, so the
points and boxes hardly depend on the class. Summing asks whether a channel pushes the
explained class up *through the neurons that carry it*, with each neuron counted by how
much it carries; the share keeps the channels that make up most of that evidence instead
of every channel with any. Both were chosen by measurement among seven FC rules (per
neuron or summed; all positive, 90 %, 50 % or 25 % share; ``tools/bench.py quality
--candidates``, BENCHMARKS.md "CNN Fixations that tell classes apart"). On the demo model's
held-out phantoms it points into the finding 0.884 of the time (the authors' rule: 0.178,
a random map: 0.141) and gives two findings of one phantom different points on 98 % of
the pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.graph.fixations import FixationPlan, Step
from service.methods.fixations import CHUNK, CnnFixations, Points, Weights, walk

# The share of the traced set's positive contribution the kept inputs carry (measured).
SHARE = 0.5


@dataclass(frozen=True)
class FcSelection:
    """A rule for FC layers on a vector: which inputs carry the traced neurons.

    Attributes:
        summed: sum the contributions over the traced neurons, each weighted by its own
            weight (see the module docstring); False: per traced neuron, as the authors
            do, unweighted.
        share: keep the smallest set of inputs, largest contribution first, that carries
            this share of the positive contribution (per neuron when not ``summed``);
            1: every input with a positive contribution.
    """

    summed: bool
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
            inputs = table[int(group) % len(table)].astype(np.float64)
            prefix = points[mine[0], :-1]
            if self.summed:
                summed = np.zeros(x.shape[-1])
                for lo in range(0, len(mine), per):
                    sel = mine[lo:lo + per]
                    summed += weights[sel] @ w[points[sel, -1]].astype(np.float64)
                contribution = summed * inputs
                j = np.flatnonzero(_smallest_share(contribution[None], self.share)[0])
                out_weights.append(contribution[j])
            else:
                kept = np.zeros(x.shape[-1], dtype=bool)
                for lo in range(0, len(mine), per):
                    sel = mine[lo:lo + per]
                    contribution = w[points[sel, -1]] * inputs  # exact float64 products
                    kept |= _smallest_share(contribution, self.share).any(axis=0)
                j = np.flatnonzero(kept)
            out_points.append(np.concatenate([np.repeat(prefix[None], len(j), axis=0),
                                              j[:, None]], axis=1))
        return [(step.inputs[0], np.concatenate(out_points),
                 np.concatenate(out_weights) if self.summed else None)]


def _smallest_share(contribution: np.ndarray, share: float) -> np.ndarray:
    """Per row: the smallest set of entries, largest first (ties: the lower index), whose
    sum reaches ``share`` of the row's positive total; never an entry ≤ 0. The sums run
    in that order, one entry after the other."""
    positive = contribution > 0
    if share >= 1:
        return positive
    order = np.argsort(-contribution, axis=1, kind="stable")
    ranked = np.take_along_axis(contribution, order, axis=1)
    carried = np.cumsum(np.maximum(ranked, 0), axis=1)
    before = np.concatenate([np.zeros((len(ranked), 1)), carried[:, :-1]], axis=1)
    keep = np.zeros_like(positive)
    np.put_along_axis(keep, order, (before < share * carried[:, -1:]) & (ranked > 0), axis=1)
    return keep


class SummedFixations(CnnFixations):
    """CNN Fixations whose FC layers on a vector keep the inputs carrying ``SHARE`` of the
    summed, weighted contribution to the traced neurons (the module docstring has the
    rule); every other rule, the outlier removal and the density map are the authors'.

    Mopuri, Garg, Babu, IEEE TIP 2019, https://arxiv.org/abs/1708.06670 (the walk).
    """

    name = "fixations_summed"

    def __init__(self, selection: FcSelection | None = None) -> None:
        # Other selections serve the benchmark's comparison (tools/bench.py).
        self.selection = selection or FcSelection(summed=True, share=SHARE)

    def trace(self, plan: FixationPlan, activations: Mapping[str, np.ndarray],
              classes: Sequence[int]) -> Points:
        return walk(plan, activations, classes, fc=self.selection)[plan.image]
