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

    Each image is evaluated on its own (the memo keeps its logits for the other CRM rows):
    CRM subtracts nearly equal scores, so it would magnify the last-bit differences a
    kernel gives for other batch compositions; this way a batch-mate never changes a map.
    """
    h, w = captures.activations.shape[2:]
    for image in dict.fromkeys(r.image for r in rows):
        if ("crm", image) not in captures.memo:
            captures.memo["crm", image] = (_pooled_logits(captures, image)
                                           if captures.graphs.pooled else
                                           _copied_logits(captures, image))
    out = []
    for row in rows:
        base_logits, masked = captures.memo["crm", row.image]  # type: ignore[misc]
        base = captures.scores(base_logits, row.target)[0]
        scores = captures.scores(masked, row.target)
        out.append((base.astype(np.float64), scores.astype(np.float64).reshape(h, w, -1)))
    return out


def _pooled_logits(captures: Captures, image: int) -> tuple[np.ndarray, np.ndarray]:
    """(the image's logits (1, K), the H·W masked copies' (H·W, K)) for a head that begins
    with the spatial mean of the activations: zeroing A(:, l, m) leaves that mean at
    (Σ A − A(:, l, m)) / HW, so the head from the mean on runs on H·W + 1 mean vectors (in
    float64 before the head, the image's own among them) instead of H·W copies of A.
    Equal to re-evaluating the whole head on each copy, up to float32 rounding (the tests'
    brute-force references)."""
    acts = captures.activations[image].astype(np.float64)
    flat = acts.reshape(acts.shape[0], -1)
    total = flat.sum(axis=1)
    means = np.concatenate([total[None], total[None] - flat.T]) / flat.shape[1]
    logits = captures.graphs.pooled_head(means)
    return logits[:1], logits[1:]


def _copied_logits(captures: Captures, image: int) -> tuple[np.ndarray, np.ndarray]:
    """(the image's logits from the forward pass (1, K), the head's on each of the H·W
    masked copies (H·W, K)), the copies in runs of this image's only."""
    masked = np.concatenate([captures.graphs.head(copies, [image] * len(copies))
                             for copies in _masked_copies(captures.activations[image])])
    return captures.logits[image][None], masked


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
    not only a linear one. Where the head begins with a spatial mean of the activations it
    runs from that mean on, on the copies' means (:func:`masked_scores`).

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
