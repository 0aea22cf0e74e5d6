"""Configuration of the SENTINEL method: one small dataclass, every value configurable, paper defaults where known."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

DIRECTIONS = ("forward", "backward")
ALL_METRICS = ("l1", "l2", "sign_flip", "wasserstein", "cosine", "gain", "fit")
COMBINE_MODES = ("any", "mean")
REPLACEMENT_MODES = ("baseline", "drop")


class ConfigError(ValueError):
    """A configuration value is out of its valid range."""


@dataclass(frozen=True)
class SentinelConfig:
    """Hyperparameters of the validator's monitor, ledger and taint handling.

    Units: ``window``, ``min_window`` and ``forgive_after`` count *checked tensors* (one per micro-batch per
    boundary and direction), never steps.
    """

    beta_forward: float = 0.9  # EMA decay of the activation baseline (paper: beta_h = 0.9)
    beta_backward: float = 0.8  # EMA decay of the gradient baseline (paper: beta_g = 0.8)
    metrics: tuple[str, ...] = ALL_METRICS  # which distances are computed and fenced
    sign_flip_backward: bool = False  # also measure sign_flip on gradients. Off: gradients rarely have sign-stable
    # features (none after the warm-up in honest small 4 x 2 meshes; 0.1 a check in the demo's tiny 2 x 2), and when
    # a fast-learning tiny stage's input gradient had 4-32 of them they flipped together, honestly, at 3-4x the
    # fence: gross, struck at once. Activations have many (57 of 64 on tiny) and honest flips stay under 0.25
    # (README, "sign_flip on activations only")
    combine: str = "any"  # "any": flag if any distance crosses its fence (but see solo_excess_*); "mean": mean of
    # distance/fence > 1
    # with combine="any": a distance that crosses its fence ALONE flags only beyond solo_excess x its fence; two or
    # more distances across their fences always flag. 1.0 = plain OR. Backward traffic (gradients) has heavy-tailed
    # honest outliers on a single distance (measured: see README), forward traffic does not, and mild attacks such
    # as noise on activations move a single distance by a little, hence different defaults
    solo_excess_forward: float = 1.0
    solo_excess_backward: float = 1.6
    # a checked tensor's tokens count in its summary (and in the fit predictor's sums) with their norms capped at this
    # multiple of the tensor's median token norm, the reference's tokens scaled alike; the tensor passed on is
    # unchanged. 0: off. Gradients are heavy-tailed per token (honest tokens at 10-60x the median norm: the
    # loss is much larger at some tokens, and the attention sink gathers gradient from every later position), and
    # one such token decided a whole tensor's l2 and gain (4-40x their fences); activations are not (at most 2.4x
    # measured), hence backward only (README, "Token clipping")
    token_clip_forward: float = 0.0
    token_clip_backward: float = 4.0
    fence_k: float = 6.0  # Tukey fence multiplier: Q3 + k * IQR
    window: int = 128  # accepted distances kept per (boundary, direction, metric) for the fence
    min_window: int = 16  # accepted observations needed before a monitor may flag (a late joiner warms itself)
    min_iqr_fraction: float = 0.1  # IQR floor, as a fraction of the window's median (a flat window is no licence)
    fence_upper_spread: float = 0.0  # a full window's Q3 is capped at median + this x (median - Q1): senders that
    # fill the top of a window with distances just under the fence cannot lift Q3 (and the fence) past what the
    # window's lower half supports. 0: off (plain Tukey). Against the fence ratchet, with median_baseline (README,
    # "Fence ratchet")
    median_baseline: int = 0  # with at least this many senders holding a baseline at a monitor (each updated within
    # its last `window` accepted tensors), the baseline is the coordinate-wise median of per-sender EMAs, which a
    # minority of senders cannot move; with fewer, one EMA of all accepted traffic (the paper's). 0: always the
    # paper's. Needs 3 or more (README, "Fence ratchet")
    # absolute fence floors, in each metric's own scale-free unit: e.g. a 5% change of the output/input norm ratio
    # (gain) or a 0.1 change of the mean token cosine is never worth a strike, however quiet the window was
    floor_l1: float = 0.0
    floor_l2: float = 0.0
    floor_sign_flip: float = 0.25
    floor_wasserstein: float = 0.0
    floor_cosine: float = 0.1
    floor_gain: float = 0.05
    floor_fit: float = 0.1
    # the "fit" distance's linear predictor (sentinel.stats.LinearPredictor): every fit_every-th accepted tensor
    # (fit_tokens of its tokens) updates its sums, decayed by fit_decay per update; re-solved every fit_refit updates
    fit_every: int = 4
    fit_tokens: int = 64
    fit_decay: float = 0.9
    fit_refit: int = 4
    fit_ridge: float = 1e-3  # x the mean diagonal of the Gram matrix
    fit_max_fence: float = 0.5  # a fit fence (widened) above this is widened fit_wide_scale times more: honest fits
    # that shift by half the projections' variance from one tensor to the next mean the linear map describes the
    # stage poorly (a model learning fast: the demo's tiny at lr 3e-3 had fit fences of 1-70), and the fence's tail
    # tainted honest tensors at 1.0-2.8x it; a replayed tensor (delay) still lands at 3.9-4.4x. On small 8 x 4 the
    # attacks fit is for shift it by 0.3-0.6, against fences of 0.15-0.42 (README, "fit"). 0: no limit
    fit_wide_scale: float = 2.0  # see fit_max_fence; 0: no fence at all there (fit flags nothing), which let delay
    # attackers through in tiny 3 x 3 meshes (README, "Where fit's fence is wide")
    fit_fence_scale: float = 1.5  # fit's Tukey fence is widened by this factor: on honest drift fit rose with l2 by
    # 1.0-1.4x its plain fence and, as the second distance over, tainted honest micro-batches (README, "fit")
    n_projections: int = 16  # sliced-Wasserstein random directions, private to each validator
    n_quantiles: int = 16  # quantile levels per projection
    ban_level: int = 3  # strikes that ban a worker
    forgive_after: int = 100  # consecutive clean checked tensors that wipe a worker's strikes
    strikes_per_step: int = 0  # at most this many strikes per worker per step; 0: one per flag (the paper). 1 helps
    # large meshes where a drifting stage's replica can draw several of a step's micro-batches (README, "Ledger")
    drift_senders: int = 0  # flags from this many distinct senders at one monitor within drift_steps steps mean
    # honest drift (a majority of a stage's replicas: attackers are a minority of every stage). 0 (auto): a majority
    # of the senders seen at the monitor within the last 4 x drift_steps steps, banned ones included (at least 2):
    # a validator in a swarm does not know a stage's size in advance, and sizes change. The mesh, which knows it,
    # sets replicas // 2 + 1 (at least 2), the same number once every replica has been seen
    drift_steps: int = 4
    drift_active_majority: bool = True  # lower drift_senders to a majority of the senders still active at a monitor
    # (checked within the last 4 x drift_steps steps and not banned): once a stage's attackers are banned, its honest
    # remainder can still be recognised as drifting (attackers stay a minority of what is left). Without it, a stage of
    # 11 with 5 attackers banned needed all 6 honest replicas flagged within drift_steps steps: at the paper's 16 x 11
    # with 8 micro-batches a step, every honest replica of one stage was banned (README, "Drift guard")
    drift_max_excess: float = 3.0  # only flags with every distance below this multiple of its fence can be drift
    drift_agreement: bool = True  # also call it drift when the flagged tensors of drift_senders distinct senders
    # (within drift_steps steps, however far from the baseline) agree with ONE of them: each within drift_max_excess x
    # the fences when that one is taken as the baseline. Re-anchors on it. For a baseline gone stale, whose honest
    # traffic has moved past drift_max_excess (README, "Drift guard")
    drift_min_fraction: float = 0.25  # drift (either rule) also needs the flagged tensors to be at least this
    # fraction of the tensors checked for blame at the monitor within the drift window: honest drift moves the bulk
    # of the traffic, while two rare honest outliers from two senders (a sequence's first token, whose gradient the
    # attention sink can amplify 10x) are not drift, and re-anchoring on one of them flagged the next step's whole
    # traffic (README, "Drift guard"). 0: off
    drift_defer: bool = False  # a mild flag (one drift could explain) becomes a strike only once drift_steps steps
    # have passed without drift being recognised at its monitor; drift recognised there in time forgives it. Gross
    # flags strike at once. For large meshes, where a replica can collect a ban's worth of strikes early in a drift,
    # before a majority of its stage has been seen (README, "Drift guard")
    drift_peer: bool = False  # a mild flag is not struck when the tensor is within the fences of the latest tensor
    # that another (non-banned) sender had accepted at the same monitor within drift_steps steps, that tensor taken as
    # the baseline: its sender shifted as an honest sibling did. For stages of 2-3 replicas, whose honest drift rarely
    # flags a majority of them within drift_steps steps (README, "Drift guard"). The tensor is replaced all the same.
    # Off by default: a mild attack can also fall within an honest sibling's fences, and on small 8 x 4 it let more
    # weak attackers go unbanned (on in the demo)
    drift_peer_margin: float = 0.7  # drift_peer forgives a flag only when the tensor lies within this fraction of
    # the fences of the sibling's tensor: one tensor compared with another carries the noise of both, and within the
    # whole fences let mild attacks pass as drift (noise in the demo's 3 x 3 mesh: 9 of 24 attackers banned at 1.0,
    # 14 at 0.7; README, "Drift guard"). 1: the fences themselves
    small_stage_senders: int = 3  # at a monitor whose senders (seen within the last 4 x drift_steps steps, banned
    # ones included) number at most this, drift_active_majority and drift_peer apply whatever their settings: a stage
    # of 1-3 replicas drifts with too few senders for a majority to show, and honest tiny meshes banned 12 of 16
    # replicas in 200 steps without them (README, "Drift guard"). Stages of more replicas keep the settings. 0: never
    small_stage_mild_strikes: int = 0  # at a small stage (small_stage_senders), a sender's mild flags (those drift
    # could explain) of one step give it at most this many strikes; gross flags always strike. One step's tensors
    # from one replica come from one set of weights: when the trainer routes a whole step to one of a stage's 2
    # replicas while the stage drifts, its 4 mild flags were 4 strikes, a ban, before the sibling was seen drifting
    # (the README demo, about 1 run in 20; README, "Drift guard"). 0: no cap
    sibling_alpha: float = 1e-4  # the sibling test: at the end of each step, each sender at a monitor is compared with
    # the other (non-banned) senders there over the last sibling_steps steps: its checked tensors' distances over
    # their fences (flagged or not) against theirs. A sender whose median is at least sibling_ratio x each of theirs,
    # with a one-sided Mann-Whitney p-value (against all of theirs) below this, gets one strike that step. Honest
    # replicas of a stage see the same traffic and stay alike; a mild attacker sits below the fences (its accepted
    # tensors widen them) yet far above its siblings: noise in the demo's 3 x 3 mesh (README, "Sibling test"). 0: off
    sibling_ratio: float = 1.6
    sibling_steps: int = 24
    sibling_min: int = 12  # a sender takes part with at least this many checked tensors within sibling_steps steps
    sibling_senders: int = 3  # ... and only at a monitor where at least this many senders take part: with two,
    # either could be the odd one (scaling by 0.5 sits closer to the baseline than its honest sibling, which the test
    # then banned in the 2 x 2 mesh)
    input_explains: float = 0.75  # a flag is not struck (the tensor is still replaced) when the tensor's reference,
    # the stage's input or the gradient it received, was itself at least this fraction of its own fences from its
    # stream's baseline (l1 or l2, ``Observation.input_excess``), and every distance of the flag is below
    # drift_max_excess x its fence, times that excess where it is above 1: an unusual micro-batch makes every honest
    # stage's output unusual, and the sender is blamed only for what its input does not explain (README, "Input
    # explains"). 0: off
    learn_tainted: float = 0.25  # learn from a tensor of a micro-batch already tainted upstream (still only screened,
    # never blamed) when it passes the fences and the monitor is starved of clean traffic: the tensors it checked for
    # blame within the last drift_steps steps are fewer than this fraction of all it checked there (1: at every
    # monitor; 0: never, the paper's rule). Where most micro-batches are tainted (16 x 11, 37.5% attackers, 8
    # micro-batches a step) a deep stage's baseline otherwise stops learning while the model trains and its honest
    # traffic drifts out of it. 0.25 was measured on the paper's scale, small 8 x 4 (strong, weak, honest), the
    # demo's shapes in the mesh and the demo swarm itself; 1 costs the demo's shape honest bans (README, "Taint scope")
    replacement: str = "baseline"  # tainted tensor: "baseline" replacement or "drop" the micro-batch
    seed: int = 0  # seeds the validator-private projections

    def __post_init__(self) -> None:
        for name in ("beta_forward", "beta_backward"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown or not self.metrics:
            raise ConfigError(f"metrics must be a non-empty subset of {ALL_METRICS}, got {self.metrics}")
        if not self.metrics_for("backward"):
            raise ConfigError("metrics must name a distance besides sign_flip, or set sign_flip_backward: gradients "
                              "would go unchecked")
        if self.combine not in COMBINE_MODES:
            raise ConfigError(f"combine must be one of {COMBINE_MODES}, got {self.combine!r}")
        if self.replacement not in REPLACEMENT_MODES:
            raise ConfigError(f"replacement must be one of {REPLACEMENT_MODES}, got {self.replacement!r}")
        if self.solo_excess_forward < 1 or self.solo_excess_backward < 1:
            raise ConfigError("solo_excess_forward and solo_excess_backward must be >= 1")
        for name in ("token_clip_forward", "token_clip_backward"):
            clip = getattr(self, name)
            if clip != 0 and not clip >= 1:  # also refuses NaN
                raise ConfigError(f"{name} must be 0 (off) or >= 1, got {clip}")
        if self.fence_k <= 0:
            raise ConfigError(f"fence_k must be positive, got {self.fence_k}")
        if self.window < 4 or not 1 <= self.min_window <= self.window:
            raise ConfigError(f"need window >= 4 and 1 <= min_window <= window, got {self.window}, {self.min_window}")
        if self.n_projections < 1 or self.n_quantiles < 2:
            raise ConfigError("need n_projections >= 1 and n_quantiles >= 2")
        if self.strikes_per_step < 0:
            raise ConfigError("strikes_per_step must be >= 0 (0: no cap)")
        if self.ban_level < 1 or self.forgive_after < 1:
            raise ConfigError("need ban_level >= 1 and forgive_after >= 1")
        if self.drift_senders == 1 or self.drift_senders < 0 or self.drift_steps < 1 or self.drift_max_excess <= 1:
            raise ConfigError("need drift_senders 0 (auto) or >= 2, drift_steps >= 1 and drift_max_excess > 1")
        if not 0.0 <= self.learn_tainted <= 1.0:
            raise ConfigError(f"learn_tainted must be within [0, 1] (0: never), got {self.learn_tainted}")
        if not 0.0 <= self.sibling_alpha < 1.0 or not self.sibling_ratio >= 1.0:
            raise ConfigError("need 0 <= sibling_alpha < 1 (0: off) and sibling_ratio >= 1")
        if self.sibling_steps < 1 or self.sibling_min < 2 or self.sibling_senders < 2:
            raise ConfigError("need sibling_steps >= 1, sibling_min >= 2 and sibling_senders >= 2")
        if self.small_stage_mild_strikes < 0:
            raise ConfigError(f"small_stage_mild_strikes must be >= 0 (0: no cap), got "
                              f"{self.small_stage_mild_strikes}")
        if self.small_stage_senders < 0:
            raise ConfigError(f"small_stage_senders must be >= 0 (0: never), got {self.small_stage_senders}")
        if not 0.0 <= self.drift_min_fraction <= 1.0:
            raise ConfigError(f"drift_min_fraction must be in [0, 1], got {self.drift_min_fraction}")
        if self.fit_every < 1 or self.fit_tokens < 1 or self.fit_refit < 1 or not 0.0 <= self.fit_decay < 1.0:
            raise ConfigError("need fit_every, fit_tokens, fit_refit >= 1 and fit_decay in [0, 1)")
        if not self.fit_max_fence >= 0:
            raise ConfigError(f"fit_max_fence must be >= 0 (0: no limit), got {self.fit_max_fence}")
        if self.fit_wide_scale != 0 and not self.fit_wide_scale >= 1:  # also refuses NaN
            raise ConfigError(f"fit_wide_scale must be 0 (no fence) or >= 1, got {self.fit_wide_scale}")
        if not 0 < self.drift_peer_margin <= 1:
            raise ConfigError(f"drift_peer_margin must be in (0, 1], got {self.drift_peer_margin}")
        if not self.input_explains >= 0:
            raise ConfigError(f"input_explains must be >= 0 (0: off), got {self.input_explains}")
        if self.fit_ridge <= 0 or self.fit_fence_scale < 1:
            raise ConfigError("fit_ridge must be positive and fit_fence_scale >= 1")
        if self.min_iqr_fraction < 0:
            raise ConfigError("min_iqr_fraction must be >= 0")
        if not self.fence_upper_spread >= 0:
            raise ConfigError(f"fence_upper_spread must be >= 0 (0: off), got {self.fence_upper_spread}")
        if self.median_baseline != 0 and self.median_baseline < 3:
            raise ConfigError(f"median_baseline must be 0 (off) or >= 3, got {self.median_baseline}")

    def beta(self, direction: str) -> float:
        if direction == "forward":
            return self.beta_forward
        if direction == "backward":
            return self.beta_backward
        raise ConfigError(f"direction must be one of {DIRECTIONS}, got {direction!r}")

    def metrics_for(self, direction: str) -> tuple[str, ...]:
        """The distances measured on ``direction``'s tensors: ``metrics``, without ``sign_flip`` on gradients unless
        ``sign_flip_backward``."""
        self.beta(direction)  # validates the direction
        if direction == "backward" and not self.sign_flip_backward:
            return tuple(m for m in self.metrics if m != "sign_flip")
        return self.metrics

    def solo_excess(self, direction: str) -> float:
        """How far (x its fence) one distance must go to flag on its own, for ``direction``."""
        self.beta(direction)  # validates the direction
        return self.solo_excess_forward if direction == "forward" else self.solo_excess_backward

    def token_clip(self, direction: str) -> float:
        """The token-norm cap (x the median token norm) of ``direction``'s summaries; 0: none."""
        self.beta(direction)  # validates the direction
        return self.token_clip_forward if direction == "forward" else self.token_clip_backward

    def fence_floor(self, metric: str) -> float:
        return float(getattr(self, f"floor_{metric}"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["metrics"] = list(self.metrics)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SentinelConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown sentinel settings: {sorted(unknown)}")
        d = dict(d)
        if "metrics" in d:
            d["metrics"] = tuple(d["metrics"])
        return cls(**d)
