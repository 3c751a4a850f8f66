"""Calibration: do predicted probabilities match observed frequencies?

scikit-learn's `calibration_curve` drops empty bins and does not return the bin counts that
the expected calibration error weighs by, so the binning is done here (with the same bin
edges and the same rule for a probability on an edge, checked against it in the tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def reliability(y_true: Sequence[int] | np.ndarray, probs: np.ndarray,
                positive: int | None = None, n_bins: int = 10) -> dict:
    """Equal-width bins of confidence with the observed frequency in each, and ECE / MCE.

    Two classes: confidence is the positive class's probability and "observed" the fraction
    of positives (the usual reliability diagram). More classes: confidence is the top
    probability and "observed" the fraction predicted correctly. ECE = Σ_b (n_b / N)·|obs_b −
    conf_b|; MCE is the largest such gap over non-empty bins. Empty bins are None.
    """
    y = np.asarray(y_true, dtype=int).ravel()
    P = np.asarray(probs, dtype=float)
    if P.ndim != 2 or len(P) != len(y):
        raise ValueError(f"probs has shape {P.shape}, expected ({len(y)}, K)")
    if P.shape[1] == 2:
        pos = 1 if positive is None else int(positive)
        conf, hit = P[:, pos], (y == pos).astype(float)
        kind = "positive-class probability"
    else:
        pred = P.argmax(1)
        conf, hit = P[np.arange(len(y)), pred], (pred == y).astype(float)
        kind = "top-class probability"
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bins are (a, b], the first [0, b]: as sklearn's calibration_curve
    idx = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(idx, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_hit = np.bincount(idx, weights=hit, minlength=n_bins)
    nz = count > 0
    mean_conf = np.divide(sum_conf, count, out=np.zeros(n_bins), where=nz)
    observed = np.divide(sum_hit, count, out=np.zeros(n_bins), where=nz)
    gaps = np.abs(observed - mean_conf)
    n = len(y)
    return {
        "kind": kind,
        "n": n,
        "edges": edges.tolist(),
        "count": count.astype(int).tolist(),
        "confidence": [float(c) if k else None for c, k in zip(mean_conf, nz, strict=True)],
        "observed": [float(o) if k else None for o, k in zip(observed, nz, strict=True)],
        "ece": float((count * gaps).sum() / n) if n else None,
        "mce": float(gaps[nz].max()) if nz.any() else None,
    }
