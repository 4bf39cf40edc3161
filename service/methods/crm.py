"""Class-selective relevance mapping (CRM), per class and combined."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.methods.base import Captures, Method, RawMap, Target

# Elements of masked activations held at once (float32: 64 MiB).
_COPY_BUDGET = 16 * 1024 * 1024


def masked_scores(captures: Captures, target: Target) -> tuple[np.ndarray, np.ndarray]:
    """(S, S_masked): scores of the image, and for every spatial element (l, m) the scores
    after zeroing A(:, l, m) across all channels and re-evaluating the real head.

    Returns S with shape (K,) and S_masked with shape (H, W, K).
    """
    key = ("crm", target)
    if key not in captures.memo:
        captures.memo[key] = _masked_scores(captures, target)
    return captures.memo[key]  # type: ignore[return-value]


def _masked_scores(captures: Captures, target: Target) -> tuple[np.ndarray, np.ndarray]:
    acts = captures.activations
    c, h, w = acts.shape
    # Masked copies are built a chunk at a time so large target layers (e.g. 32×32×2048)
    # never need all H·W copies in memory at once.
    chunk = max(1, _COPY_BUDGET // acts.size)
    parts = []
    for start in range(0, h * w, chunk):
        positions = np.arange(start, min(start + chunk, h * w))
        copies = np.repeat(acts[None], len(positions), axis=0)
        flat = copies.reshape(len(positions), c, h * w)
        flat[np.arange(len(positions)), :, positions] = 0.0
        parts.append(captures.head(copies))
    logits = np.concatenate(parts, axis=0)
    base = captures.scores(captures.logits[None], target)[0]
    masked = captures.scores(logits, target)
    return base.astype(np.float64), masked.astype(np.float64).reshape(h, w, -1)


class Crm(Method):
    """CRM for one class: map(l, m) = (S_c − S_c(l, m))².

    S_c(l, m) re-evaluates the network's real head with location (l, m) of the target layer
    zeroed across channels (all H·W copies in one batched run), so it is right for any
    head, not only a linear one.

    Kim, Rajaraman, Antani, "Visual Interpretation of Convolutional Neural Network
    Predictions in Classifying Medical Image Modalities", Diagnostics 2019, 9(2):38,
    https://doi.org/10.3390/diagnostics9020038
    """

    name = "crm"
    paper = "https://doi.org/10.3390/diagnostics9020038"

    def compute(self, captures: Captures, classes: Sequence[int],
                target: Target) -> list[RawMap]:
        base, masked = masked_scores(captures, target)
        return [RawMap(((base[c] - masked[..., c]) ** 2).astype(np.float32), c, self.grid)
                for c in classes]


class CrmCombined(Method):
    """CRM summed over every output node: Σ_c (S_c − S_c(l, m))²; one class-agnostic map."""

    name = "crm_combined"
    paper = Crm.paper
    per_class = False

    def compute(self, captures: Captures, classes: Sequence[int],
                target: Target) -> list[RawMap]:
        base, masked = masked_scores(captures, target)
        total = ((base[None, None, :] - masked) ** 2).sum(axis=-1)
        return [RawMap(total.astype(np.float32), None, self.grid)]
