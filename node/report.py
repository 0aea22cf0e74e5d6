"""Reports and plots of experiment runs: JSON that survives NaN, and a PNG of losses and detection events."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from node.common import write_text_atomic


def json_safe(value: Any) -> Any:
    """Replace non-finite floats by None (strict JSON has no NaN) and tuples by lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write atomically (``write_text_atomic``), so a crash never leaves half a report behind."""
    write_text_atomic(path, json.dumps(json_safe(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def _smooth(values: list[float], span: int = 5) -> list[float]:
    out, acc = [], None
    alpha = 2 / (span + 1)
    for v in values:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        acc = v if acc is None else acc + alpha * (v - acc)
        out.append(acc)
    return out


def plot_runs(path: str | os.PathLike, runs: dict[str, Any], workers: list[str], malicious: list[str], onset: int):
    """Loss curves of each run (``runs``: label -> MeshResult) and the defended run's flag/ban timeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_events) = plt.subplots(
        2, 1, figsize=(10, 9), gridspec_kw={"height_ratios": [1, max(1.0, len(workers) / 24)]}
    )
    colors = {"defended": "tab:blue", "clean": "tab:green", "undefended": "tab:red"}
    order = sorted(runs, key=lambda label: {"clean": 0, "undefended": 1}.get(label, 2))  # defended drawn on top
    for label in order:
        result = runs[label]
        h = result.history
        color = colors.get(label)
        ax_loss.plot(h["step"], _smooth(h["loss"]), label=f"{label} (train)", color=color, alpha=0.8)
        if h["val"]:
            vs, vl = zip(*h["val"])
            ax_loss.plot(vs, vl, "o--", color=color, label=f"{label} (val)", markersize=4)
    ax_loss.axvline(onset, color="gray", linestyle=":", label="attack onset")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats/byte)")
    ax_loss.set_title("Training and validation loss")
    finite = [v for r in runs.values() for v in r.history["loss"] if math.isfinite(v)]
    if finite:
        ax_loss.set_ylim(0, min(max(finite), 8.0) * 1.05)
    ax_loss.legend(fontsize=8, ncol=2)

    defended = runs.get("defended")
    index = {w: i for i, w in enumerate(workers)}
    if defended is not None:
        flags = [(e.step, index[e.worker]) for e in defended.events if e.kind == "flag"]
        bans = [(e.step, index[e.worker]) for e in defended.events if e.kind == "ban"]
        if flags:
            ax_events.scatter(*zip(*flags), s=6, color="tab:orange", label="flag (strike)")
        if bans:
            ax_events.scatter(*zip(*bans), s=60, marker="X", color="black", label="ban")
    ax_events.axvline(onset, color="gray", linestyle=":")
    ax_events.set_yticks(range(len(workers)))
    ax_events.set_yticklabels(workers, fontsize=max(3, min(8, 400 // max(1, len(workers)))))
    for tick, w in zip(ax_events.get_yticklabels(), workers):
        if w in malicious:
            tick.set_color("tab:red")
    ax_events.set_ylim(-1, len(workers))
    steps = defended.history["step"] if defended is not None else [0]
    ax_events.set_xlim(-1, (steps[-1] if steps else 0) + 1)
    ax_events.set_xlabel("step")
    ax_events.set_title("Flags and bans per worker (malicious workers in red)")
    if defended is not None and defended.events:
        ax_events.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
