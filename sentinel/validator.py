"""The validator: monitors for the boundaries it serves, the violation ledger, taint and replacement.

Boundary numbering: the trusted trainer's embedding is stage 0, the untrusted stages are ``1..S``, the trusted head
is stage ``S + 1``. Boundary ``b`` sits between stage ``b`` and stage ``b + 1``. Forward traffic at boundary ``b`` is
sent by stage ``b``; backward traffic at boundary ``b`` (the gradient of stage ``b + 1``'s input) is sent by stage
``b + 1``. So a flag blames the *sender*: stage ``b`` on a forward flag, stage ``b + 1`` on a backward flag.

Taint: once a micro-batch was flagged anywhere, every later check of it is a *screen*, not a detection. The tensor
is still compared with the baseline and replaced when it crosses a fence (so a second attacker on the same path
gets no free pass), but nobody is blamed: what comes after a poisoned or replaced tensor can look anomalous through
no fault of its honest sender (the cascade). Nor do the baselines learn from it (the paper's rule), unless the
monitor is starved of clean traffic (``learn_tainted``, 0.25 by default; 0 is the paper's rule): then a screened tensor
that passes is learnt from, so that a deep stage's baseline keeps up with the model while most micro-batches reaching
it are tainted.

Drift guard: flagged tensors never update the baseline, so if the honest traffic itself jumps (every optimizer step
changes every replica's weights at once), every tensor would be flagged from then on and the whole honest population
banned. Blame is therefore settled once per step (``end_step``): if the tensors flagged at one monitor during the last
``drift_steps`` steps came from at least ``drift_senders`` distinct senders (a majority of a stage's replicas: under
the threat model attackers are a minority of every stage, so they alone cannot reach it; by default the majority of
the senders the monitor has seen lately, see ``_drift_threshold``), the monitor
concludes that the honest distribution moved. It drops the current step's strikes at that monitor (earlier steps'
strikes stand) and re-anchors its baseline on the least anomalous flagged tensor, keeping its fences. Only *mild*
flags (every distance below ``drift_max_excess`` times its fence) count as drift: honest drift crosses a fence by a
little, the group-A attacks by 5 to 200 times, and a re-anchor on an attacker's tensor would poison the baseline.
Otherwise every flag becomes a strike. A banned sender's flagged tensors are never evidence of drift nor an anchor.
Taint and replacement are immediate either way; only blame waits for the end of the step. The window of several
steps matters: a slow honest drift flags one or two replicas per step, never a majority in any single step, yet all
of them within a few steps.

Input explains (``input_explains``): a flag whose reference (the stage's input, or the gradient it received) was
itself far from the references seen before is not struck, unless the flag goes well beyond what that explains: an
unusual micro-batch makes every honest stage's output unusual, and the sender is blamed only for what its input does
not explain. The tensor is replaced either way.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from sentinel.config import SentinelConfig
from sentinel.ledger import ViolationLedger
from sentinel.monitor import BoundaryMonitor, Observation
from sentinel.stats import Summary, distances, mann_whitney_greater


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
    blamed: bool = False  # the sender is to get a strike when the step's blame is settled (``end_step``)
    seconds: float = 0.0  # CPU/GPU time the check took
    input_excess: float | None = None  # the reference's distance from its own stream, over its fences (input_explains)


class Validator:
    """Checks inter-stage tensors for a set of boundaries and keeps one ledger of the senders it has seen."""

    def __init__(self, config: SentinelConfig):
        self.config = config
        self.monitors: dict[tuple[int, str], BoundaryMonitor] = {}
        self.ledger = ViolationLedger(config.ban_level, config.forgive_after)
        self.pending: list[tuple[int, str, str, float, Observation]] = []  # (boundary, direction, sender, excess, obs)
        self.reanchors = 0
        self.recent_flags: dict[tuple[int, str], list[tuple[int, str]]] = {}  # monitor -> [(step, sender)]
        self.last_seen: dict[tuple[int, str], dict[str, int]] = {}  # monitor -> sender -> last step it was checked
        # drift_agreement: monitor -> [(step, sender, summary)] of distance flags within the drift window
        self.recent_summaries: dict[tuple[int, str], list[tuple[int, str, Summary]]] = {}
        # drift_defer: mild flags not yet struck, (step, boundary, direction, sender)
        self.deferred: list[tuple[int, int, str, str]] = []
        # monitor -> step -> [tensors checked for blame, of them flagged (drift_min_fraction), tensors of tainted
        # micro-batches screened (learn_tainted)], within the drift window
        self.window_counts: dict[tuple[int, str], dict[int, list[int]]] = {}
        self.touched: set[str] = set()  # senders whose ledger the last end_step changed or may have changed
        # drift_peer: monitor -> sender -> (step, summary) of its latest tensor accepted there
        self.last_accepted: dict[tuple[int, str], dict[str, tuple[int, Summary]]] = {}
        self.peer_forgiven = 0  # mild flags that drift_peer did not strike
        self.input_forgiven = 0  # flags that input_explains did not strike
        # sibling test: monitor -> [(step, sender, distance over fence)] of the tensors checked for blame there within
        # the last sibling_steps steps; and the strikes it gave
        self.sibling_log: dict[tuple[int, str], list[tuple[int, str, float]]] = {}
        self.sibling_struck = 0

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

        ``tainted``: the micro-batch was already flagged upstream: screen only, no blame, and learnt from only if it
        passes at a monitor starved of clean traffic (``learn_tainted``).
        ``warmup``: honest warm-up, learn only; non-finite tensors are still replaced but not blamed.
        """
        start = time.perf_counter()
        mon = self.monitor(boundary, direction)
        self.last_seen.setdefault((boundary, direction), {})[sender] = step
        window = self.window_counts.setdefault((boundary, direction), {})
        counts = [0, 0, 0] if warmup else window.setdefault(step, [0, 0, 0])  # checked, flagged, screened
        learn = not tainted
        if tainted and not warmup:
            counts[2] += 1
            learn = self._starved((boundary, direction), step)
        obs: Observation = mon.observe(tensor, reference, detect=not warmup, learn=learn, sender=sender)
        blamed = False
        if not tainted and not warmup:
            counts[0] += 1
            counts[1] += obs.flagged
            if self.config.sibling_alpha:
                self._log_sibling((boundary, direction), step, sender, obs)
            if obs.flagged:
                blamed = True
                excess = max((obs.scores[m] / obs.fences[m] for m in obs.scores), default=float("inf"))
                self.pending.append((boundary, direction, sender, excess, obs))
            else:
                self.ledger.record(sender, False, step)
                if (self.config.drift_peer or self.config.small_stage_senders) and obs.summary is not None:
                    self.last_accepted.setdefault((boundary, direction), {})[sender] = (step, obs.summary)
        out: torch.Tensor | None = tensor
        if obs.flagged:
            out = None if self.config.replacement == "drop" else mon.replacement(tensor, reference)
        elapsed = time.perf_counter() - start
        return CheckResult(obs.flagged, out, obs.reason, obs.scores, obs.fences, blamed, elapsed, obs.input_excess)

    def end_step(self, step: int) -> list[str]:
        """Settle the blame of the step's flags (see the drift guard above). Returns the workers banned now.

        With ``drift_defer``, a mild flag is held (``deferred``) and struck only at the end of step
        ``its step + drift_steps - 1`` if drift was not recognised at its monitor by then; drift recognised there
        in time forgives it (all mild flags of the window with a plain majority; those within the agreeing group with
        ``drift_agreement``). ``touched`` names the senders whose strikes this call may have changed."""
        by_monitor: dict[tuple[int, str], list[tuple[str, float, Observation]]] = {}
        for boundary, direction, sender, excess, obs in self.pending:
            by_monitor.setdefault((boundary, direction), []).append((sender, excess, obs))
        self.touched = {sender for _, _, sender, _, _ in self.pending}
        self.pending = []
        banned = []
        struck: dict[str, int] = {}  # strikes given to each sender in this step
        mild_struck: dict[str, int] = {}  # of them, for mild flags at small stages (small_stage_mild_strikes)
        cap = self.config.strikes_per_step
        mild_cap = self.config.small_stage_mild_strikes

        def strike(sender: str) -> None:
            if cap and struck.get(sender, 0) >= cap:
                return  # strikes count steps of misbehaviour, not micro-batches (see strikes_per_step)
            struck[sender] = struck.get(sender, 0) + 1
            if self.ledger.record(sender, True, step):
                banned.append(sender)
                for monitor in self.monitors.values():
                    monitor.forget(sender)

        for key in list(self.window_counts):
            counts = {s: c for s, c in self.window_counts[key].items() if s > step - self.config.drift_steps}
            self.window_counts[key] = counts
        for key, flags in by_monitor.items():
            # only mild distance flags can be drift: NaN, wrong shapes and gross outliers are never forgiven here
            mild = [f for f in flags if self._mild(f[2], f[1])]
            # a banned sender's tensors are never evidence of drift, nor an anchor for the baseline (as in the window
            # of _agreed_drift)
            live_mild = [f for f in mild if not self.ledger.is_banned(f[0])]
            recent = [(s, w) for s, w in self.recent_flags.get(key, [])
                      if s > step - self.config.drift_steps and not self.ledger.is_banned(w)]  # fmt: skip
            recent += [(step, sender) for sender, _, _ in live_mild]
            self.recent_flags[key] = recent
            small = self._small_stage(key, step)
            threshold = self._drift_threshold(key, step)
            bulk = self._bulk_flagged(key)
            if live_mild and len({w for _, w in recent}) >= threshold:
                if bulk:
                    self._reanchor(key, min(live_mild, key=lambda f: f[1])[2].summary)
                flags = [f for f in flags if not any(f is m for m in mild)]
                self._forgive_deferred(key, None)
            elif self.config.drift_agreement and bulk:
                flags = self._agreed_drift(key, step, flags, self._agreement_threshold(key, threshold))
            for sender, excess, obs in flags:
                if self._input_explains(obs, excess):
                    self.input_forgiven += 1
                    continue
                mild_flag = self._mild(obs, excess)
                if mild_flag and (self.config.drift_peer or small) and self._peer_agrees(key, step, sender, obs):
                    self.peer_forgiven += 1
                    continue
                if self.config.drift_defer and mild_flag:
                    self.deferred.append((step, key[0], key[1], sender))
                elif mild_flag and small and mild_cap:
                    if mild_struck.get(sender, 0) < mild_cap:
                        mild_struck[sender] = mild_struck.get(sender, 0) + 1
                        strike(sender)
                else:
                    strike(sender)
        if self.config.sibling_alpha:
            for sender in self._sibling_outliers(step):
                self.sibling_struck += 1
                self.touched.add(sender)
                strike(sender)
        if self.deferred:  # mild flags whose window passed without drift at their monitor
            due = step - self.config.drift_steps + 1
            for _, _, _, sender in (d for d in self.deferred if d[0] <= due):
                self.touched.add(sender)
                strike(sender)
            self.deferred = [d for d in self.deferred if d[0] > due]
        return banned

    def _log_sibling(self, key: tuple[int, str], step: int, sender: str, obs: Observation) -> None:
        """Keep the checked tensor's largest distance over its fence for the sibling test (a flag without distances,
        a non-finite tensor or a wrong shape, counts as infinitely far); nothing while the monitor has no fences."""
        fences = obs.fences
        if obs.scores and fences and all(math.isfinite(f) and f > 0 for f in fences.values()):
            excess = max(obs.scores[m] / fences[m] for m in obs.scores)
        elif obs.flagged and not obs.scores:
            excess = math.inf
        else:
            return
        self.sibling_log.setdefault(key, []).append((step, sender, float(excess)))

    def _sibling_outliers(self, step: int) -> set[str]:
        """The sibling test (``SentinelConfig.sibling_alpha``): the non-banned senders that, at some monitor, sat
        consistently further from the baseline than every other non-banned sender there within the last
        ``sibling_steps`` steps. Only senders with ``sibling_min`` tensors in the window take part, and only at a
        monitor with ``sibling_senders`` of them: with two, either could be the odd one (an attack that shrinks
        its tensors sits *closer* to the baseline than its honest sibling). Prunes the log to the window."""
        cfg, out = self.config, set()
        for key in list(self.sibling_log):
            entries = [e for e in self.sibling_log[key] if e[0] > step - cfg.sibling_steps]
            self.sibling_log[key] = entries
            by_sender: dict[str, list[float]] = {}
            for _, sender, excess in entries:
                if not self.ledger.is_banned(sender):
                    by_sender.setdefault(sender, []).append(excess)
            counted = {w: xs for w, xs in by_sender.items() if len(xs) >= cfg.sibling_min}
            if len(counted) < cfg.sibling_senders:
                continue
            medians = {w: float(np.median(xs)) for w, xs in counted.items()}
            for sender, mine in counted.items():
                if any(medians[sender] < cfg.sibling_ratio * m for w, m in medians.items() if w != sender):
                    continue
                others = [x for w, xs in counted.items() if w != sender for x in xs]
                if mann_whitney_greater(mine, others) < cfg.sibling_alpha:
                    out.add(sender)
        return out

    def _bulk_flagged(self, key: tuple[int, str]) -> bool:
        """Whether the tensors flagged at monitor ``key`` within the drift window are at least ``drift_min_fraction``
        of those checked there for blame (honest drift moves the bulk of the traffic; outliers are rare)."""
        counts = self.window_counts.get(key, {}).values()
        checked, flagged = sum(c[0] for c in counts), sum(c[1] for c in counts)
        return flagged >= self.config.drift_min_fraction * checked

    def _starved(self, key: tuple[int, str], step: int) -> bool:
        """``learn_tainted``: whether monitor ``key`` saw too little clean traffic within the drift window to keep its
        baseline up to date: the tensors it checked for blame are fewer than ``learn_tainted`` of all it checked."""
        level = self.config.learn_tainted
        if not level:
            return False
        recent = step - self.config.drift_steps
        counts = [c for s, c in self.window_counts.get(key, {}).items() if s > recent]
        clean, screened = sum(c[0] for c in counts), sum(c[2] for c in counts)
        return clean < level * (clean + screened)

    def _mild(self, obs: Observation, excess: float) -> bool:
        """A distance flag that honest drift could explain: every distance under ``drift_max_excess`` x its fence."""
        return obs.reason.startswith("distance:") and excess < self.config.drift_max_excess

    def _input_explains(self, obs: Observation, excess: float) -> bool:
        """``input_explains``: whether the flag's reference was unusual enough to explain it (see the config)."""
        level, within = self.config.input_explains, obs.input_excess
        if not level or within is None or within < level or not obs.reason.startswith("distance:"):
            return False
        return excess < self.config.drift_max_excess * max(1.0, within)

    def _peer_agrees(self, key: tuple[int, str], step: int, sender: str, obs: Observation) -> bool:
        """``drift_peer``: whether the flagged tensor (its summary in ``obs``) would pass the monitor's fences,
        narrowed to ``drift_peer_margin`` of them, with the latest accepted tensor of another non-banned sender, from
        the last ``drift_steps`` steps, as the baseline.

        A lone honest replica can cross a fence first while its stage drifts: its siblings' traffic moved as well,
        but stayed just inside. An attack is as far from a sibling's honest tensor as from the baseline, so it stays
        flagged (and mild attacks that this lets through are still replaced; only their strikes are lost)."""
        if obs.summary is None:
            return False
        monitor = self.monitors[key]
        fences = {m: monitor.fence(m) * self.config.drift_peer_margin for m in monitor.metrics}
        for peer, (seen, summary) in self.last_accepted.get(key, {}).items():
            if peer == sender or seen <= step - self.config.drift_steps or self.ledger.is_banned(peer):
                continue
            if summary.mean.shape != obs.summary.mean.shape:
                continue
            scale = monitor.token_scale(_fewest(obs.summary, summary))
            if not monitor.decide(distances(obs.summary, summary, monitor.metrics),
                                  {m: f * scale for m, f in fences.items()})[0]:  # fmt: skip
                return True
        return False

    def _forgive_deferred(self, key: tuple[int, str], within: set[tuple[int, str]] | None) -> None:
        """Drift recognised at monitor ``key``: drop its deferred flags (only those whose (step, sender) is in
        ``within``, when given)."""
        keep = []
        for entry in self.deferred:
            if (entry[1], entry[2]) == key and (within is None or (entry[0], entry[3]) in within):
                self.touched.add(entry[3])
                continue
            keep.append(entry)
        self.deferred = keep

    def _agreed_drift(self, key: tuple[int, str], step: int, flags: list, threshold: int) -> list:
        """``drift_agreement``: the flags of this step that remain to be struck at monitor ``key``.

        The distance flags of the last ``drift_steps`` steps (this one included) are drift if those of ``threshold``
        distinct senders agree with one of them, the *anchor*: taken as the baseline, it puts each of their tensors
        within ``drift_max_excess`` x the monitor's fences on every distance. Attackers are a minority of a stage, so
        such a majority holds honest senders, and a flagged tensor far from theirs (an attack) stays outside it. The
        baseline re-anchors on the anchor that gathers the most senders (then the smallest total excess); this
        step's flags of tensors within it are forgiven, the others struck."""
        window = [e for e in self.recent_summaries.get(key, []) if e[0] > step - self.config.drift_steps]
        window += [(step, sender, obs.summary) for sender, _, obs in flags
                   if obs.reason.startswith("distance:") and obs.summary is not None]  # fmt: skip
        window = [e for e in window if not self.ledger.is_banned(e[1])]  # never evidence, never an anchor
        self.recent_summaries[key] = window
        if len({sender for _, sender, _ in window}) < threshold:
            return flags
        monitor = self.monitors[key]
        fences = {m: max(monitor.fence(m), 1e-12) for m in monitor.metrics}

        def excess(s: Summary, anchor: Summary) -> float:
            scores = distances(s, anchor, monitor.metrics)
            return max(scores[m] / fences[m] for m in scores) / monitor.token_scale(_fewest(s, anchor))

        best: tuple[int, float, Summary, set[int]] | None = None  # (senders, total excess, anchor, ids within)
        for _, _, anchor in window:
            within = [(w, e, id(s)) for _, w, s in window if (e := excess(s, anchor)) <= self.config.drift_max_excess]
            senders = len({w for w, _, _ in within})
            total = sum(e for _, e, _ in within)
            if best is None or (senders, -total) > (best[0], -best[1]):
                best = (senders, total, anchor, {i for _, _, i in within})
        if best is None or best[0] < threshold:
            return flags
        self._reanchor(key, best[2])
        self._forgive_deferred(key, {(st, w) for st, w, s in window if id(s) in best[3]})
        return [f for f in flags if id(f[2].summary) not in best[3]]

    def _reanchor(self, key: tuple[int, str], summary: Summary | None) -> None:
        """Drift recognised at monitor ``key``: the baseline moves to ``summary``, the drift windows start over."""
        if summary is not None:
            self.monitors[key].reanchor(summary)
        self.reanchors += 1
        self.recent_flags[key] = []
        self.recent_summaries.pop(key, None)

    def _drift_threshold(self, key: tuple[int, str], step: int) -> int:
        """Distinct flagged senders that make drift at monitor ``key``: ``drift_senders``, or with 0 (auto) a majority
        of the senders seen there within the last ``4 x drift_steps`` steps, the banned ones included (at least 2;
        the mesh's ``replicas // 2 + 1`` once all were seen); then capped by ``drift_active_majority`` (or at a small
        stage, ``small_stage_senders``)."""
        threshold = self.config.drift_senders
        horizon = step - 4 * self.config.drift_steps
        seen = self.last_seen.get(key, {})
        if threshold == 0:
            threshold = max(2, self._senders_seen(key, step) // 2 + 1)
        if self.config.drift_active_majority or self._small_stage(key, step):
            active = [w for w, last in seen.items() if last > horizon and not self.ledger.is_banned(w)]
            threshold = min(threshold, len(active) // 2 + 1)
        return threshold

    def _agreement_threshold(self, key: tuple[int, str], threshold: int) -> int:
        """The senders ``drift_agreement`` needs at monitor ``key``: ``threshold``, but at least 2 unless a sender seen
        there was banned. The rule forgives tensors however far from the baseline, so one sender's word is enough
        only for the survivor of a stage whose other replicas were banned (the demo's 2-replica stage once its
        attacker is out); a stage that only ever had one sender (one replica) would otherwise let it re-anchor the
        baseline on its own traffic, attack included."""
        if threshold >= 2 or any(self.ledger.is_banned(w) for w in self.last_seen.get(key, {})):
            return threshold
        return 2

    def _senders_seen(self, key: tuple[int, str], step: int) -> int:
        """Distinct senders checked at monitor ``key`` within the last ``4 x drift_steps`` steps, banned ones included
        (however long ago they were seen)."""
        horizon = step - 4 * self.config.drift_steps
        return sum(1 for w, last in self.last_seen.get(key, {}).items() if last > horizon or self.ledger.is_banned(w))

    def _small_stage(self, key: tuple[int, str], step: int) -> bool:
        """Whether monitor ``key`` watches a small stage (``small_stage_senders``): ``drift_active_majority`` and
        ``drift_peer`` then apply there whatever their settings."""
        return 0 < self._senders_seen(key, step) <= self.config.small_stage_senders

    def state_dict(self) -> dict:
        """Everything the validator learnt: monitors, ledger and the drift guard's state (``recent_flags``,
        ``reanchors``, and the step's unsettled flags, ``pending``, empty between ``end_step`` and the next check).

        Plain dicts, lists, numbers, strings and CPU tensors (loadable with ``torch.load(..., weights_only=True)``).
        CPU tensors are not copied: save (or deep-copy) the state before checking more tensors."""
        return {
            "config": self.config.to_dict(),
            "monitors": {f"{b}/{d}": m.state_dict() for (b, d), m in self.monitors.items()},
            "ledger": self.ledger.state_dict(),
            "reanchors": self.reanchors,
            "recent_flags": {
                f"{b}/{d}": [[step, sender] for step, sender in flags] for (b, d), flags in self.recent_flags.items()
            },
            "last_seen": {f"{b}/{d}": dict(seen) for (b, d), seen in self.last_seen.items()},
            "deferred": [list(entry) for entry in self.deferred],
            "last_accepted": {
                f"{b}/{d}": [[sender, seen, summary.state_dict()] for sender, (seen, summary) in peers.items()]
                for (b, d), peers in self.last_accepted.items()
            },
            "peer_forgiven": self.peer_forgiven,
            "input_forgiven": self.input_forgiven,
            "sibling_log": {
                f"{b}/{d}": [[step, sender, excess] for step, sender, excess in entries]
                for (b, d), entries in self.sibling_log.items()
            },
            "sibling_struck": self.sibling_struck,
            "window_counts": {
                f"{b}/{d}": [[step, *c] for step, c in counts.items()] for (b, d), counts in self.window_counts.items()
            },
            "recent_summaries": {
                f"{b}/{d}": [[step, sender, summary.state_dict()] for step, sender, summary in entries]
                for (b, d), entries in self.recent_summaries.items()
            },
            "pending": [
                {
                    "boundary": boundary,
                    "direction": direction,
                    "sender": sender,
                    "excess": excess,
                    "flagged": obs.flagged,
                    "reason": obs.reason,
                    "scores": dict(obs.scores),
                    "fences": dict(obs.fences),
                    "summary": None if obs.summary is None else obs.summary.state_dict(),
                    "input_excess": obs.input_excess,
                }
                for boundary, direction, sender, excess, obs in self.pending
            ],
        }

    def load_state_dict(self, d: dict) -> None:
        """Restore a ``state_dict`` (summaries live on the host, whatever device the checked tensors use).

        A state without the drift guard's keys (an older format) restores monitors and ledger only."""
        for key, state in d["monitors"].items():
            self.monitor(*_monitor_key(key)).load_state_dict(state)
        self.ledger.load_state_dict(d["ledger"])
        self.reanchors = int(d.get("reanchors", 0))
        self.last_seen = {
            _monitor_key(key): {str(w): int(last) for w, last in seen.items()}
            for key, seen in d.get("last_seen", {}).items()
        }
        self.recent_summaries = {
            _monitor_key(key): [
                (int(step), str(sender), Summary.from_state_dict(summary)) for step, sender, summary in entries
            ]
            for key, entries in d.get("recent_summaries", {}).items()
        }
        self.recent_flags = {
            _monitor_key(key): [(int(step), str(sender)) for step, sender in flags]
            for key, flags in d.get("recent_flags", {}).items()
        }
        self.deferred = [(int(st), int(b), str(di), str(w)) for st, b, di, w in d.get("deferred", [])]
        self.last_accepted = {
            _monitor_key(key): {str(w): (int(seen), Summary.from_state_dict(summary)) for w, seen, summary in peers}
            for key, peers in d.get("last_accepted", {}).items()
        }
        self.peer_forgiven = int(d.get("peer_forgiven", 0))
        self.input_forgiven = int(d.get("input_forgiven", 0))
        self.sibling_log = {
            _monitor_key(key): [(int(step), str(sender), float(excess)) for step, sender, excess in entries]
            for key, entries in d.get("sibling_log", {}).items()
        }
        self.sibling_struck = int(d.get("sibling_struck", 0))
        self.window_counts = {
            _monitor_key(key): {int(row[0]): [int(c) for c in (*row[1:], 0, 0)[:3]] for row in rows}
            for key, rows in d.get("window_counts", {}).items()  # rows of older states have no screened count
        }
        self.pending = []
        for p in d.get("pending", []):
            summary = None if p["summary"] is None else Summary.from_state_dict(p["summary"])
            within = p.get("input_excess")
            obs = Observation(bool(p["flagged"]), str(p["reason"]), dict(p["scores"]), dict(p["fences"]), summary,
                              None if within is None else float(within))  # fmt: skip
            self.pending.append((int(p["boundary"]), str(p["direction"]), str(p["sender"]), float(p["excess"]), obs))


def _monitor_key(key: str) -> tuple[int, str]:
    """A monitor's (boundary, direction) from its ``"<boundary>/<direction>"`` key in a state dict."""
    b, direction = key.split("/")
    return int(b), direction


def _fewest(a: Summary, b: Summary) -> int | None:
    """The smaller token count of two summaries compared with each other (the noisier one sets the fences'
    ``token_scale``); the one count there is when only one has it, None when neither has."""
    counts = [t for t in (a.tokens, b.tokens) if t is not None]
    return min(counts) if counts else None
