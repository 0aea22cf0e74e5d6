"""Routing shared by the trainer (``swarm.trainer``) and the in-process mesh (``swarm.mesh``)."""

from __future__ import annotations

import numpy as np

ROUTINGS = ("balanced", "random")


def balanced_plan(weights, n: int, rng: np.random.Generator) -> list[int]:
    """``n`` draws of indices into ``weights`` by systematic sampling, shuffled: index ``i`` appears floor or ceil of
    ``n * w_i / sum(w)`` times (which draws get which index is random). One step's micro-batches over one stage's
    replicas, with ``routing="balanced"``."""
    weights = np.asarray(weights, dtype=np.float64)
    if n <= 0 or len(weights) == 0:
        return []
    edges = np.cumsum(weights)
    edges /= edges[-1]
    points = (rng.random() + np.arange(n)) / n
    picks = np.minimum(np.searchsorted(edges, points, side="right"), len(edges) - 1)
    return [int(i) for i in rng.permutation(picks)]
