"""The validator: monitors for the boundaries it serves, the violation ledger, taint and replacement.

Boundary numbering: the trusted trainer's embedding is stage 0, the untrusted stages are ``1..S``, the trusted head
is stage ``S + 1``. Boundary ``b`` sits between stage ``b`` and stage ``b + 1``. Forward traffic at boundary ``b`` is
sent by stage ``b``; backward traffic at boundary ``b`` (the gradient of stage ``b + 1``'s input) is sent by stage
``b + 1``. So a flag blames the *sender*: stage ``b`` on a forward flag, stage ``b + 1`` on a backward flag.

Taint: once a micro-batch was flagged anywhere, every later check of it is a *screen*, not a detection. The tensor
is still compared with the baseline and replaced when it crosses a fence (so a second attacker on the same path
gets no free pass), but nobody is blamed and the baselines learn nothing from it: what comes after a poisoned or
replaced tensor can look anomalous through no fault of its honest sender (the cascade).

Drift guard: flagged tensors never update the baseline. If the honest traffic itself moves (a fast phase of
training), every tensor would then be flagged forever and the validator would ban the whole honest population. So
when ``drift_run`` consecutive distance flags at one monitor come from at least ``drift_senders`` distinct senders,
which an honest majority of replicas makes impossible for attackers alone (a stage has fewer attackers than that),
the validator concludes that the baseline is stale: it re-anchors the monitor on the latest tensor, rescinds the
strikes of that run (bans already made stand) and lets the monitor warm up again.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from sentinel.config import SentinelConfig
from sentinel.ledger import ViolationLedger
from sentinel.monitor import BoundaryMonitor, Observation


def blamed_stage(boundary: int, direction: str) -> int:
    """The stage that sent the tensor checked at ``boundary`` in ``direction``."""
    return boundary if direction == "forward" else boundary + 1


@dataclass
class CheckResult:
    """A validator's verdict on one tensor."""

    tainted: bool  # the tensor was replaced (or, in drop mode, the micro-batch is to be dropped)
    tensor: torch.Tensor | None  # what to pass on: the input, its replacement, or None when dropped
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    fences: dict[str, float] = field(default_factory=dict)
    blamed: bool = False  # a strike was recorded against the sender
    banned_now: bool = False  # that strike banned the sender
    seconds: float = 0.0  # CPU/GPU time the check took


class Validator:
    """Checks inter-stage tensors for a set of boundaries and keeps one ledger of the senders it has seen."""

    def __init__(self, config: SentinelConfig):
        self.config = config
        self.monitors: dict[tuple[int, str], BoundaryMonitor] = {}
        self.ledger = ViolationLedger(config.ban_level, config.forgive_after)
        self.recent: dict[tuple[int, str], deque[tuple[str, bool]]] = {}  # (sender, blamed) per monitor
        self.reanchors = 0

    def monitor(self, boundary: int, direction: str) -> BoundaryMonitor:
        key = (boundary, direction)
        if key not in self.monitors:
            self.monitors[key] = BoundaryMonitor(self.config, direction, boundary)
        return self.monitors[key]

    def check(
        self,
        tensor: torch.Tensor,
        *,
        boundary: int,
        direction: str,
        sender: str,
        step: int,
        reference: torch.Tensor | None = None,
        tainted: bool = False,
        warmup: bool = False,
    ) -> CheckResult:
        """Check one tensor sent by ``sender`` across ``boundary``.

        ``tainted``: the micro-batch was already flagged upstream (screen only, no blame, no learning).
        ``warmup``: honest warm-up, learn only; non-finite tensors are still replaced but not blamed.
        """
        start = time.perf_counter()
        mon = self.monitor(boundary, direction)
        obs: Observation = mon.observe(tensor, reference, detect=not warmup, learn=not tainted)
        blamed = banned_now = False
        if not tainted and not warmup:
            blamed = obs.flagged
            banned_now = self.ledger.record(sender, blamed, step)
            if obs.reason.startswith("distance:"):
                self._drift_guard(mon, obs, sender)
            else:
                self._recent(mon).append((sender, False))
        out: torch.Tensor | None = tensor
        if obs.flagged:
            out = None if self.config.replacement == "drop" else mon.replacement(tensor, reference)
        elapsed = time.perf_counter() - start
        return CheckResult(obs.flagged, out, obs.reason, obs.scores, obs.fences, blamed, banned_now, elapsed)

    def _recent(self, mon: BoundaryMonitor) -> deque[tuple[str, bool]]:
        key = (mon.boundary, mon.direction)
        if key not in self.recent:
            self.recent[key] = deque(maxlen=self.config.drift_run)
        return self.recent[key]

    def _drift_guard(self, mon: BoundaryMonitor, obs: Observation, sender: str) -> None:
        recent = self._recent(mon)
        recent.append((sender, True))
        if len(recent) < recent.maxlen or not all(flag for _, flag in recent):
            return
        if len({s for s, _ in recent}) < self.config.drift_senders:
            return
        for s, _ in recent:
            self.ledger.rescind(s)
        recent.clear()
        if obs.summary is not None:
            mon.reanchor(obs.summary)
        self.reanchors += 1

    def state_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "monitors": {f"{b}/{d}": m.state_dict() for (b, d), m in self.monitors.items()},
            "ledger": self.ledger.state_dict(),
        }

    def load_state_dict(self, d: dict) -> None:
        for key, state in d["monitors"].items():
            b, direction = key.split("/")
            self.monitor(int(b), direction).load_state_dict(state)
        self.ledger.load_state_dict(d["ledger"])
