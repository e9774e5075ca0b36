"""Small statistics shared by the protocol and DreamBench++ code: Pearson r and Fisher-z means."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def pearson(x: Iterable[float], y: Iterable[float]) -> float:
    """Pearson correlation of two equally long sequences (float64); NaN when undefined.

    Undefined means fewer than 2 pairs or a constant side (zero variance). NaNs in the
    inputs are not dropped: drop missing pairs before calling.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson needs two 1-D sequences of equal length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    if denominator == 0:
        return float("nan")
    return float(np.clip((dx * dy).sum() / denominator, -1.0, 1.0))


def fisher_z_mean(rs: Iterable[float], clip: float) -> float:
    """Combine correlations: clip each to [-clip, clip], average their atanh, map back with tanh.

    ``clip`` is part of the definition (0.999 for MTG, 0.9999 for DreamBench++ MH).
    NaN correlations are refused rather than skipped: decide about them before calling.
    """
    rs = np.asarray(list(rs), dtype=np.float64)
    if len(rs) == 0:
        raise ValueError("fisher_z_mean of no correlations")
    if np.isnan(rs).any():
        raise ValueError(f"fisher_z_mean got undefined (NaN) correlations: {rs.tolist()}")
    return float(np.tanh(np.arctanh(np.clip(rs, -clip, clip)).mean()))
