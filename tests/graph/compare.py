"""Comparisons against stored framework references, shared by the reference-model tests
(test_zoo.py: hand-written architectures; test_exported.py: library architectures
through real exporters)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| over the whole array."""
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz, read at once (the file is closed afterwards)."""
    with np.load(path) as data:
        return dict(data)
