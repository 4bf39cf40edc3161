"""Class-selective relevance mapping (CRM), per class and combined."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from service.methods.base import Captures, Method, Row

# Elements of masked activations held at once (float32: 64 MiB).
_COPY_BUDGET = 16 * 1024 * 1024


def masked_scores(captures: Captures, rows: Sequence[Row]) -> list[tuple[np.ndarray,
                                                                           np.ndarray]]:
    """Per row, (S, S_masked): the scores of the row's image, and for every spatial element
    (l, m) the scores after zeroing A(:, l, m) across all channels and re-evaluating the
    real head. S has shape (K,), S_masked (H, W, K).

    Each image's H·W masked copies run through the head once per batch (the memo keeps
    the logits for the other CRM rows of the image), in runs of that image's copies only:
    CRM subtracts nearly equal scores, so it would magnify the last-bit differences a
    kernel gives for other batch compositions; this way a batch-mate never changes a map.
    """
    h, w = captures.activations.shape[2:]
    for image in dict.fromkeys(r.image for r in rows):
        if ("crm", image) not in captures.memo:
            captures.memo["crm", image] = np.concatenate(
                [captures.graphs.head(copies, [image] * len(copies))
                 for copies in _masked_copies(captures.activations[image])])
    out = []
    for row in rows:
        masked = captures.memo["crm", row.image]
        base = captures.scores(captures.logits[row.image][None], row.target)[0]
        scores = captures.scores(masked, row.target)  # type: ignore[arg-type]
        out.append((base.astype(np.float64), scores.astype(np.float64).reshape(h, w, -1)))
    return out


def _masked_copies(acts: np.ndarray) -> Iterator[np.ndarray]:
    """The H·W masked copies of one image's activations (C, H, W), in chunks within the
    copy budget, so large target layers (e.g. 32×32×2048) never need all copies at once."""
    c, h, w = acts.shape
    chunk = max(1, _COPY_BUDGET // acts.size)
    for start in range(0, h * w, chunk):
        positions = np.arange(start, min(start + chunk, h * w))
        copies = np.repeat(acts[None], len(positions), axis=0)
        copies.reshape(len(positions), c, h * w)[np.arange(len(positions)), :, positions] = 0.0
        yield copies


class Crm(Method):
    """CRM for one class: map(l, m) = (S_c − S_c(l, m))².

    S_c(l, m) re-evaluates the network's real head with location (l, m) of the target layer
    zeroed across channels (all H·W copies in batched runs), so it is right for any head,
    not only a linear one.

    Kim, Rajaraman, Antani, "Visual Interpretation of Convolutional Neural Network
    Predictions in Classifying Medical Image Modalities", Diagnostics 2019, 9(2):38,
    https://doi.org/10.3390/diagnostics9020038
    """

    name = "crm"
    paper = "https://doi.org/10.3390/diagnostics9020038"

    def maps(self, captures: Captures, rows: Sequence[Row]) -> list[np.ndarray]:
        return [(base[r.cls] - masked[..., r.cls]) ** 2
                for (base, masked), r in zip(masked_scores(captures, rows), rows)]


class CrmCombined(Method):
    """CRM summed over every output node: Σ_c (S_c − S_c(l, m))²; one class-agnostic map."""

    name = "crm_combined"
    paper = Crm.paper
    per_class = False

    def maps(self, captures: Captures, rows: Sequence[Row]) -> list[np.ndarray]:
        return [((base[None, None, :] - masked) ** 2).sum(axis=-1)
                for base, masked in masked_scores(captures, rows)]


__all__ = ["Crm", "CrmCombined", "masked_scores"]
