"""Scoring a defence (ATTACKS.md, "What a defence is scored on"): pure functions over plain data."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping


def precision_recall_f1(predicted: Iterable[str], actual: Iterable[str]) -> dict[str, float]:
    """Set precision/recall/F1. Conventions for empty sets: with nothing to find and nothing predicted, all are 1.0
    (a perfect honest run); predicting something when nothing was there gives precision 0."""
    pred, act = set(predicted), set(actual)
    tp = len(pred & act)
    precision = tp / len(pred) if pred else 1.0
    recall = tp / len(act) if act else 1.0
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of an already sorted, non-empty list."""
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def time_to_ban(ban_steps: Mapping[str, int], malicious: Iterable[str], onset: int) -> dict[str, float | int | None]:
    """Steps from attack onset to each malicious worker's ban (a ban at the onset step counts as 0 steps).

    ``never`` counts malicious workers that were not banned; they are left out of the median/p95/max.
    """
    delays = sorted(max(0, ban_steps[w] - onset) for w in malicious if w in ban_steps)
    never = sum(1 for w in malicious if w not in ban_steps)
    if not delays:
        return {"median": None, "p95": None, "max": None, "never": never}
    return {
        "median": _percentile(delays, 50),
        "p95": _percentile(delays, 95),
        "max": float(delays[-1]),
        "never": never,
    }


def taint_scores(tainted: Iterable[int], poisoned: Iterable[int]) -> dict[str, float]:
    """Per-micro-batch precision/recall of taint flags against the micro-batches an attacker actually altered."""
    r = precision_recall_f1((str(t) for t in tainted), (str(p) for p in poisoned))
    return {"taint_precision": r["precision"], "taint_recall": r["recall"]}
