"""How logits become scores, and the derivative methods need when they explain scores."""

from __future__ import annotations

from enum import StrEnum

import numpy as np


class Activation(StrEnum):
    SIGMOID = "sigmoid"
    SOFTMAX = "softmax"
    NONE = "none"

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Scores for a (B, K) array of logits."""
        z = logits.astype(np.float64)
        if self is Activation.SIGMOID:
            out = 1.0 / (1.0 + np.exp(-z))
        elif self is Activation.SOFTMAX:
            e = np.exp(z - z.max(axis=-1, keepdims=True))
            out = e / e.sum(axis=-1, keepdims=True)
        else:
            out = z
        return out.astype(np.float32)

    def score_grad(self, logits: np.ndarray, cls: int) -> np.ndarray:
        """d score[cls] / d logits for one (K,) vector of logits."""
        p = self.scores(logits[None])[0].astype(np.float64)
        grad = np.zeros_like(p)
        if self is Activation.SIGMOID:
            grad[cls] = p[cls] * (1.0 - p[cls])
        elif self is Activation.SOFTMAX:
            grad = -p[cls] * p
            grad[cls] += p[cls]
        else:
            grad[cls] = 1.0
        return grad.astype(np.float32)
