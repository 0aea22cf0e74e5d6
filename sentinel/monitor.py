"""The per-(boundary, direction) monitor: EMA baseline, adaptive Tukey fences, honest warm-up.

One ``BoundaryMonitor`` watches one stream of tensors (say, the forward activations crossing boundary 3). For each
tensor it computes the summary, measures the configured distances to the EMA baseline, compares each to a Tukey
upper fence (Q3 + k * IQR) over a window of recently *accepted* distances, and decides. Flagged tensors never touch
the baseline or the fences, so an attacker cannot drag the baseline towards its own traffic.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from sentinel.config import SentinelConfig
from sentinel.stats import (
    LinearPredictor,
    Summary,
    clip_tokens,
    distances,
    host_array,
    make_projections,
    mean_shift,
    spread_shift,
    summarize,
)

INPUT_METRICS = ("l1", "l2")  # what a reference's distance from its own stream is measured on (input_excess)


def _percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values, interpolated linearly exactly as ``numpy.percentile``'s default (the same
    float arithmetic, so fences are bit-identical to numpy's) at a few microseconds instead of ~100."""
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    t = pos - lo
    a, b = ordered[lo], ordered[hi]
    diff = b - a
    return b - diff * (1.0 - t) if t >= 0.5 else a + diff * t


class TukeyFence:
    """Upper Tukey fence over a sliding window of accepted distances.

    ``fence = max(Q3 + k * max(IQR, min_iqr_fraction * median), floor)``, Q3 optionally capped, once the window
    is full, at ``median + upper_spread * (median - Q1)`` (``SentinelConfig.fence_upper_spread``). The IQR floor
    matters for distances that are almost constant on honest traffic: without it a window of near-identical values
    yields a fence so tight that ordinary numerical noise crosses it. The absolute ``floor`` is a tolerance in the
    metric's own scale-free unit (all our distances are relative), below which no deviation is worth a strike.
    """

    def __init__(self, window: int, k: float, min_iqr_fraction: float, floor: float = 0.0, upper_spread: float = 0.0):
        self.values: deque[float] = deque(maxlen=window)
        self.upper_spread = upper_spread  # Q3 <= median + upper_spread * (median - Q1) when set (see fence())
        self._sorted: list[float] = []  # the window's values in order, kept in step with `values`
        self.k = k
        self.min_iqr_fraction = min_iqr_fraction
        self.floor = floor
        self._cached: float | None = None
        self._stale = 0  # values added since the cached fence was computed

    def __len__(self) -> int:
        return len(self.values)

    def add(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value):  # would break the sorted mirror's order; never a useful honest sample
            return
        if len(self.values) == self.values.maxlen:
            del self._sorted[bisect.bisect_left(self._sorted, self.values[0])]
        self.values.append(value)
        bisect.insort(self._sorted, value)
        self._stale += 1
        # quartiles of a window of up to 128 values barely move with one new value: recompute every few additions
        # (always while the window is young)
        if self._stale >= self.REFRESH or len(self.values) < self.values.maxlen:
            self._cached = None

    REFRESH = 8

    def load(self, values) -> None:
        """Replace the window (restoring a saved state)."""
        self.values.clear()
        self.values.extend(float(v) for v in values)
        self._sorted = sorted(self.values)
        self._cached = None

    def state_dict(self) -> dict:
        """The window and the cached fence with its staleness: after ``load_state_dict`` the fence is recomputed
        exactly when it would have been without the round trip (``load`` alone recomputes it at once)."""
        return {"values": list(self.values), "cached": self._cached, "stale": self._stale}

    def load_state_dict(self, d: dict) -> None:
        self.load(d["values"])
        self._cached = None if d["cached"] is None else float(d["cached"])
        self._stale = int(d["stale"])

    def fence(self) -> float:
        if not self.values:
            return math.inf
        if self._cached is None:
            self._stale = 0
            q1, median, q3 = (_percentile(self._sorted, q) for q in (0.25, 0.5, 0.75))
            if self.upper_spread and len(self.values) == self.values.maxlen:
                # the lower half, which distances placed at the top of the window cannot reach while they are under
                # half of it, bounds the upper quartile (floored like the IQR, so a flat lower half is no licence).
                # Only over a full window: a young one holds the warm-up's fast drift, skewed upwards, and capped it
                # banned honest replicas (README, "Fence ratchet")
                lower = max(median - q1, 0.5 * self.min_iqr_fraction * abs(median))
                q3 = min(q3, median + self.upper_spread * lower)
            iqr = max(q3 - q1, self.min_iqr_fraction * abs(median), 1e-9)
            self._cached = max(float(q3 + self.k * iqr), self.floor)
        return self._cached

    def __repr__(self) -> str:
        return f"TukeyFence(n={len(self)}, fence={self.fence():.4g}, k={self.k})"


class InvalidTensor(ValueError):
    """A checked tensor is malformed: wrong shape against its reference, or not floating point."""


@dataclass
class Observation:
    """What the monitor concluded about one tensor."""

    flagged: bool
    reason: str  # "" when accepted; "non-finite", "shape", or "distance:<metric>,..." when flagged
    scores: dict[str, float] = field(default_factory=dict)
    fences: dict[str, float] = field(default_factory=dict)
    summary: Summary | None = None
    # how far the reference (the stage's input, or the gradient it received) was from its own stream's baseline: the
    # larger of its l1 and l2 distances, each over its fence (None until the monitor has fences for its references)
    input_excess: float | None = None


class BoundaryMonitor:
    """EMA baseline and fences for one (boundary, direction) stream."""

    def __init__(self, config: SentinelConfig, direction: str, boundary: int):
        self.config = config
        self.direction = direction
        self.boundary = boundary
        self.beta = config.beta(direction)
        self.token_clip = config.token_clip(direction)
        self.metrics = config.metrics_for(direction)  # the distances measured and fenced here
        self.baseline: Summary | None = None  # its ``residual`` (EMA of mean(x - reference)) shapes replacements
        # median_baseline: one EMA of all accepted traffic (the baseline while fewer senders hold their own), and one
        # per sender with the count of accepted tensors at the monitor when it was last updated
        self.pooled: Summary | None = None
        self.senders: dict[str, tuple[Summary, int]] = {}
        self.fences = {
            m: TukeyFence(config.window, config.fence_k, config.min_iqr_fraction, config.fence_floor(m),
                          config.fence_upper_spread)  # fmt: skip
            for m in self.metrics
        }
        self.n_accepted = 0
        # the token count the fences are learnt at: the most tokens of an accepted tensor (``token_scale``)
        self.tokens: int | None = None
        # backward: the token count of the first gradient learnt from, whose scale every gradient is summarised at
        self.gradient_tokens: int | None = None
        # the references' own stream (input_excess): an EMA of their per-feature mean and std, and fences over their
        # l1 and l2 distances to it. Learnt from every reference of a check that learns (an honest sender's output,
        # or the trusted trainer's), whether or not the checked tensor was flagged
        self.input_baseline: tuple[np.ndarray, np.ndarray] | None = None  # (mean, std)
        self.input_fences = {
            m: TukeyFence(config.window, config.fence_k, config.min_iqr_fraction) for m in INPUT_METRICS
        }
        self._projections: torch.Tensor | None = None
        c = config
        self.predictor = (LinearPredictor(c.fit_every, c.fit_refit, c.fit_decay, c.fit_tokens, c.fit_ridge)
                          if "fit" in c.metrics else None)  # fmt: skip

    @property
    def ready(self) -> bool:
        """Whether enough honest traffic has been seen for this monitor to flag anything on distance."""
        return self.baseline is not None and self.n_accepted >= self.config.min_window

    def projections(self, dim: int, device: torch.device) -> torch.Tensor:
        if self._projections is None or self._projections.shape[0] != dim:
            # private to this validator: seeded by its own seed and the stream it watches
            tag = f"{self.config.seed}/{self.boundary}/{self.direction}".encode()
            seed = int.from_bytes(hashlib.sha256(tag).digest()[:4], "little")
            self._projections = make_projections(dim, self.config.n_projections, seed)
        if self._projections.device != device:
            self._projections = self._projections.to(device)
        return self._projections

    def observe(
        self,
        x: torch.Tensor,
        reference: torch.Tensor | None = None,
        *,
        detect: bool = True,
        learn: bool = True,
        sender: str | None = None,
    ) -> Observation:
        """Check ``x`` and, if it is accepted and ``learn`` is set, fold it into the baseline.

        ``detect=False`` is the honest warm-up (and the taint skip): distances are measured but nothing is flagged
        on distance. Non-finite or malformed tensors are always flagged: no baseline is needed to reject a NaN.
        With a token clip for this direction (``SentinelConfig.token_clip``), the summary and the predictor see ``x``
        and ``reference`` through ``clip_tokens``; ``x`` itself is not changed. With a reference, ``input_excess``
        measures the reference against the references seen before (``_input_excess``), whatever ``x`` does.
        ``sender`` names who sent ``x``: with ``median_baseline`` its accepted tensors update its own EMA.
        """
        if not x.is_floating_point():
            raise InvalidTensor(f"expected a floating-point tensor, got {x.dtype}")
        if reference is not None and reference.shape != x.shape:
            return Observation(True, "shape")
        if x.numel() == 0 or x.dim() < 2:
            return Observation(True, "shape")
        if self.direction == "backward":
            x, reference = self._gradient_scale(x, reference, learn)
        if self.token_clip:
            x, reference = clip_tokens(x, reference, self.token_clip)
        projections = self.projections(x.shape[-1], x.device)
        predictor = None if self.predictor is None or reference is None else self.predictor.matrix(x.device)
        if predictor is not None and predictor.shape[0] != x.shape[-1] + 1:
            predictor = None  # learnt on another width: the baseline's shape check below decides
        summary = summarize(x, projections, self.config.n_quantiles, reference, predictor)
        if not summary.finite():  # a NaN or an infinity anywhere in x makes its per-feature means non-finite
            return Observation(True, "non-finite")
        if self.baseline is None:
            if learn:
                self._accept(summary, None, x, reference, sender)
            return Observation(False, "", summary=summary)
        if self.baseline.mean.shape != summary.mean.shape:
            return Observation(True, "shape")
        scores = distances(summary, self.baseline, self.metrics)
        scale = self.token_scale(summary.tokens)
        fences = {m: self.fence(m) * scale for m in scores}
        flagged, reason = False, ""
        if detect and self.ready:
            flagged, reason = self.decide(scores, fences)
        input_excess = self._input_excess(summary, learn, scale)
        if not flagged and learn:
            self._accept(summary, {m: v / scale for m, v in scores.items()}, x, reference, sender)
        return Observation(flagged, reason, scores, fences, summary, input_excess)

    def _gradient_scale(
        self, x: torch.Tensor, reference: torch.Tensor | None, learn: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A gradient (and its reference) as the monitor summarises it: on the scale of ``gradient_tokens`` tokens.

        The trainer's loss is a mean over the micro-batch's tokens, so each token's gradient is proportional to
        ``1 / tokens``: a micro-batch of 1 x 32 tokens carries gradients 4x those of 4 x 32, which the spread and
        quantile distances flagged as a rescaling (an honest 3 x 2 mesh switched to --batch-size 1 had 11 of 13
        backward flags on l2 and wasserstein). Multiplying by ``tokens / gradient_tokens`` undoes it; a gradient
        with as many tokens as the first one learnt from is summarised as it is."""
        tokens = x.numel() // x.shape[-1]
        if self.gradient_tokens is None:
            if learn:
                self.gradient_tokens = tokens
            return x, reference
        if tokens == self.gradient_tokens:
            return x, reference
        factor = tokens / self.gradient_tokens
        return x.detach().float() * factor, None if reference is None else reference.detach().float() * factor

    def _input_excess(self, summary: Summary, learn: bool, scale: float = 1.0) -> float | None:
        """The reference's distance from its stream's baseline over the fences (``Observation.input_excess``); with
        ``learn``, the reference is then folded into that stream. Its ``l1`` and ``l2`` distances are taken on the
        differences that the EMA update then reuses. ``scale``: ``token_scale`` of the reference's token count (the
        checked tensor's), which widens the fences and shrinks what the window learns alike."""
        if summary.ref_mean is None or summary.ref_std is None:
            return None
        if self.input_baseline is not None and self.input_baseline[0].shape != summary.ref_mean.shape:
            self.input_baseline = None  # another width: start over
            for fence in self.input_fences.values():
                fence.load([])
        if self.input_baseline is None:
            if learn:
                self.input_baseline = (summary.ref_mean.copy(), summary.ref_std.copy())
            return None
        mean, std = self.input_baseline
        shift, spread = summary.ref_mean - mean, summary.ref_std - std
        scores = {"l1": mean_shift(shift, std), "l2": spread_shift(spread, std)}
        fences = self.input_fences
        excess = None
        if all(len(f) >= self.config.min_window - 1 for f in fences.values()):
            excess = max(scores[m] / max(fences[m].fence() * scale, 1e-12) for m in INPUT_METRICS)
        if learn:
            for m, value in scores.items():
                fences[m].add(value / scale)
            weight = np.float32(1.0 - self.beta)
            mean += weight * shift
            std += weight * spread
        return excess

    def token_scale(self, tokens: int | None) -> float:
        """How much wider the fences are for a tensor of ``tokens`` tokens: ``sqrt(self.tokens / tokens)`` when it
        has fewer than the fences were learnt at (``self.tokens``), else 1.

        Every distance compares statistics estimated over the tensor's tokens, whose sampling noise grows as
        ``1 / sqrt(tokens)``: fences learnt on 4 x 32-token micro-batches flagged 18 of 20 honest 1 x 32 ones (a
        review's script; a trainer with a smaller --batch-size than the others would have framed every stage it
        used). The distances of such a tensor are compared with fences widened by this factor and, if it is
        accepted, enter the windows divided by it: what the windows hold stays on the scale of ``self.tokens``
        tokens. A tensor with as many tokens as the fences were learnt at (every tensor, when all micro-batches have
        one shape) is checked exactly as before. The token count is the trainer's choice (a stage's output and
        gradient must match their reference's shape), so a sender cannot widen its own fences."""
        if tokens is None or self.tokens is None or tokens >= self.tokens:
            return 1.0
        return math.sqrt(self.tokens / max(tokens, 1))

    def decide(self, scores: dict[str, float], fences: dict[str, float]) -> tuple[bool, str]:
        """Whether ``scores`` (distances to the baseline) flag against ``fences``, and the reason."""
        over = [m for m in scores if scores[m] > fences[m]]
        if self.config.combine == "any":
            solo = self.config.solo_excess(self.direction)
            flagged = len(over) >= 2 or any(scores[m] > solo * fences[m] for m in over)
        else:  # "mean": the average of each distance relative to its own fence
            ratio = sum(scores[m] / max(fences[m], 1e-12) for m in scores) / len(scores)
            flagged = ratio > 1.0
        return flagged, ("distance:" + ",".join(over) if flagged else "")

    def fence(self, metric: str) -> float:
        """``metric``'s fence (``fit``'s widened by ``fit_fence_scale``, and by ``fit_wide_scale`` more above
        ``fit_max_fence``); infinite until its window holds ``min_window - 1`` distances (every distance has as many
        once the monitor is ``ready``, except ``fit``, which starts with the predictor)."""
        fence = self.fences[metric]
        if len(fence) < self.config.min_window - 1:
            return math.inf
        if metric != "fit":
            return fence.fence()
        value = fence.fence() * self.config.fit_fence_scale
        # a fit fence this wide says the predictor describes the honest traffic poorly (it shifts by more than
        # fit_max_fence of its variance between tensors): fit flags only far beyond it, until the window narrows
        if self.config.fit_max_fence and value > self.config.fit_max_fence:
            return value * self.config.fit_wide_scale if self.config.fit_wide_scale else math.inf
        return value

    def _accept(
        self,
        summary: Summary,
        scores: dict[str, float] | None,
        x: torch.Tensor,
        reference: torch.Tensor | None,
        sender: str | None = None,
    ) -> None:
        if self.predictor is not None and reference is not None:
            solves = self.predictor.solves
            self.predictor.update(x, reference, self.projections(x.shape[-1], x.device))
            if self.predictor.solves != solves and self.baseline is not None and self.predictor.expected is not None:
                # a new M changes what every later tensor's fit measures: the baseline restarts from what the new
                # M leaves of the traffic it was fitted on (an EMA of fits under older Ms would flag the change)
                for base in self._baselines():
                    base.fit = self.predictor.expected
                summary.fit = None  # measured under the old M: not folded in below
        if scores is not None:
            for m, value in scores.items():
                self.fences[m].add(value)
        if summary.tokens is not None and (self.tokens is None or summary.tokens > self.tokens):
            self.tokens = summary.tokens
        self.n_accepted += 1
        if not self.config.median_baseline:
            if self.baseline is None:
                self.baseline = summary.clone()
            else:
                self.baseline.lerp_(summary, 1.0 - self.beta)
            return
        if self.pooled is None:
            self.pooled = summary.clone()
        else:
            self.pooled.lerp_(summary, 1.0 - self.beta)
        if sender is not None:
            own = self.senders.get(sender)
            if own is None:  # a newcomer starts from the pooled EMA, as one EMA of all traffic would have
                own = (self.pooled.clone(), 0)
            else:
                # weighted as if the EMA had decayed once for every tensor accepted here since its sender's last:
                # each sender's EMA keeps the pooled one's time constant, and does not lag a drifting stage more
                # than it because its sender has a third of the traffic
                own[0].lerp_(summary, 1.0 - self.beta ** (self.n_accepted - own[1]))
            self.senders[sender] = (own[0], self.n_accepted)
        self.baseline = self._combined()

    def _baselines(self) -> list[Summary]:
        """Every EMA the monitor keeps: the baseline, and with ``median_baseline`` the pooled and per-sender ones."""
        found = [b for b in (self.baseline, self.pooled) if b is not None]
        return found + [b for b, _ in self.senders.values()]

    def _combined(self) -> Summary | None:
        """``median_baseline``: the coordinate-wise median of the per-sender EMAs updated within the last ``window``
        accepted tensors, when at least ``median_baseline`` of them are; else the pooled EMA. Senders not updated
        for ``4 x window`` accepted tensors are dropped (gone, banned or always flagged).

        Why: every accepted tensor moves an EMA of all traffic, and an attacker that stays under the fences moves it
        towards itself; honest tensors then sit further from the baseline, their distances widen the fences, and the
        attacker moves further (README, "Fence ratchet"). A median over senders is moved by none of a minority."""
        recent = self.n_accepted - self.config.window
        for sender in [w for w, (_, seen) in self.senders.items() if seen <= self.n_accepted - 4 * self.config.window]:
            del self.senders[sender]
        live = [b for b, seen in self.senders.values() if seen > recent]
        if len(live) < self.config.median_baseline:
            return None if self.pooled is None else self.pooled.clone()
        return _median_summary(live)

    def forget(self, sender: str) -> None:
        """Drop ``sender``'s own EMA (``median_baseline``; a banned sender is no longer part of the median)."""
        if self.senders.pop(sender, None) is not None:
            self.baseline = self._combined()

    def reanchor(self, summary: Summary) -> None:
        """Move the baseline to ``summary`` after honest drift; the fences (honest variability) are kept.

        Called by the validator's drift guard when a majority of a stage's senders stopped matching the baseline.
        With ``median_baseline`` every EMA moves there.
        """
        self.baseline = summary.clone()
        if self.config.median_baseline:
            self.pooled = summary.clone()
            self.senders = {w: (summary.clone(), seen) for w, (_, seen) in self.senders.items()}

    def replacement(self, like: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """A harmless stand-in for a tainted tensor, derived from the baseline: the stage is bypassed.

        Forward: the stage's input plus the baseline's mean residual update, as if the stage had done its typical
        average work. Backward: the gradient the sender received, rescaled by the baseline's typical gain, as if
        the gradient had only taken the residual path through the stage. Both keep every token's own content, so
        what follows sees an in-distribution tensor (no cascade). With no reference, the baseline mean at every
        token (the paper's EMA replacement).
        """
        dtype, device = like.dtype, like.device
        if self.baseline is None:
            return torch.zeros_like(like) if reference is None else reference.detach().clone()
        if reference is not None and self.direction == "forward" and self.baseline.residual is not None:
            out = reference.detach().float() + torch.from_numpy(self.baseline.residual).to(device)
        elif reference is not None and self.direction == "backward" and self.baseline.gain is not None:
            out = reference.detach().float() * math.exp(self.baseline.gain)
        else:
            out = torch.from_numpy(self.baseline.mean).to(device).expand(like.shape)
        return out.to(dtype).clone()

    def state_dict(self) -> dict:
        """Baseline (with its residual mean), fence windows (``fences``) and their cached fences (``fence_cache``),
        as CPU tensors and plain values."""
        return {
            "baseline": None if self.baseline is None else self.baseline.state_dict(),
            "fences": {m: list(f.values) for m, f in self.fences.items()},
            "fence_cache": {m: {"cached": f._cached, "stale": f._stale} for m, f in self.fences.items()},
            "n_accepted": self.n_accepted,
            "tokens": self.tokens,
            "pooled": None if self.pooled is None else self.pooled.state_dict(),
            "senders": {w: {"baseline": b.state_dict(), "seen": seen} for w, (b, seen) in self.senders.items()},
            "gradient_tokens": self.gradient_tokens,
            "predictor": None if self.predictor is None else self.predictor.state_dict(),
            "input_baseline": None if self.input_baseline is None else {
                "mean": torch.from_numpy(self.input_baseline[0].copy()),
                "std": torch.from_numpy(self.input_baseline[1].copy()),
            },
            "input_fences": {m: f.state_dict() for m, f in self.input_fences.items()},
        }

    def load_state_dict(self, d: dict) -> None:
        """Restore a ``state_dict``. Older formats load too: a state without ``fence_cache`` (its fences are then
        recomputed at once), and one that kept the residual mean beside the baseline (``residual_mean``)."""
        self.baseline = None if d["baseline"] is None else Summary.from_state_dict(d["baseline"])
        if self.baseline is not None and d.get("residual_mean") is not None:
            self.baseline.residual = host_array(d["residual_mean"])
        cache = d.get("fence_cache", {})
        for m, values in d["fences"].items():
            if m in self.fences:
                if m in cache:
                    self.fences[m].load_state_dict({"values": values, **cache[m]})
                else:
                    self.fences[m].load(values)
        self.n_accepted = int(d["n_accepted"])
        tokens = d.get("tokens")  # absent from older states: learnt again from the next accepted tensor
        self.tokens = None if tokens is None else int(tokens)
        pooled = d.get("pooled")  # absent from older states: the pooled EMA starts from the baseline
        if pooled is not None:
            self.pooled = Summary.from_state_dict(pooled)
        else:
            self.pooled = None if self.baseline is None or not self.config.median_baseline else self.baseline.clone()
        self.senders = {str(w): (Summary.from_state_dict(e["baseline"]), int(e["seen"]))
                        for w, e in d.get("senders", {}).items()}  # fmt: skip
        tokens = d.get("gradient_tokens")
        self.gradient_tokens = None if tokens is None else int(tokens)
        if self.predictor is not None and d.get("predictor") is not None:
            self.predictor.load_state_dict(d["predictor"])
        base = d.get("input_baseline")  # absent from older states: the input stream starts over
        self.input_baseline = None if base is None else (host_array(base["mean"]), host_array(base["std"]))
        for m, fence in self.input_fences.items():
            state = d.get("input_fences", {}).get(m)
            if state is not None:
                fence.load_state_dict(state)
            else:
                fence.load([])

    def __repr__(self) -> str:
        return (
            f"BoundaryMonitor(boundary={self.boundary}, direction={self.direction}, beta={self.beta}, "
            f"accepted={self.n_accepted}, ready={self.ready})"
        )


def _median_summary(summaries: list[Summary]) -> Summary:
    """The coordinate-wise median of ``summaries`` (each array and scalar statistic, over those that have it)."""

    def scalar(name: str) -> float | None:
        values = [getattr(s, name) for s in summaries if getattr(s, name) is not None]
        return float(np.median(values)) if values else None

    def array(name: str) -> np.ndarray | None:
        values = [getattr(s, name) for s in summaries if getattr(s, name) is not None]
        return np.median(np.stack(values), axis=0).astype(np.float32) if values else None

    return Summary(array("mean"), array("std"), array("quantiles"), scalar("cosine"), scalar("gain"),
                   array("residual"), scalar("fit"))  # fmt: skip
