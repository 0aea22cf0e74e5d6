"""
Attacks that a malicious pipeline stage applies to the tensors it sends (see shared/design/ATTACKS.md, group A).

A malicious worker computes its honest tensor h (its stage output on the forward pass, or the activation-gradient it
sends upstream on the backward pass) and sends h' = attack(h, context) instead. Everything here is pure torch: no
networking, no global state. An attack:

  - is any callable ``(h, context) -> h'`` (the :data:`Attack` type), built by :func:`make_attack` from a name
    (``"zeros"``), an id (``"A1"``) or a plugin path (``"module:function"``);
  - works for any tensor shape ``[..., D]`` on any device and dtype, and returns a new tensor of h's shape, dtype and
    device (it never modifies h in place);
  - draws all its randomness from ``context.generator`` (or from a seed derived from ``(seed, worker)`` for things that
    are fixed per attacker), so that a run is reproducible given the seeds.

:class:`MaliciousBehaviour` wraps one attack for one worker: it keeps what the attacker may learn from its own honest
computations (a per-feature std estimate and a bounded history of past tensors) and applies the attack from the onset
step on, in the chosen directions.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import itertools
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = [
    "ATTACK_IDS",
    "ATTACK_SETTINGS",
    "STRONGEST",
    "WEAKEST",
    "Attack",
    "AttackBase",
    "AttackContext",
    "AttackError",
    "Direction",
    "DIRECTIONS",
    "MaliciousBehaviour",
    "SigmaEstimator",
    "TensorHistory",
    "make_attack",
    "parse_direction",
    "parse_params",
]

Direction = Literal["forward", "backward"]
DIRECTIONS: frozenset[str] = frozenset(("forward", "backward"))


class AttackError(ValueError):
    """Raised for an unknown attack name or id, a bad or unknown parameter, a plugin that cannot be imported or is not
    callable, or an attack (usually a plugin) that returns something other than a tensor of h's shape."""


def _derive_seed(seed: int, worker: int, tag: str) -> int:
    """A 63-bit seed derived from (seed, worker, tag); stable across processes and Python versions (unlike hash())."""
    digest = hashlib.sha256(f"sentinel-attack:{tag}:{int(seed)}:{int(worker)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------------------------------------------------------------
# What the attacker knows: its own honest history and a per-feature std estimate
# ---------------------------------------------------------------------------------------------------------------------


class TensorHistory:
    """
    Bounded record of ``(step, tensor)`` that a worker computed honestly, used by replay (delay) attacks.

    record() is called by :class:`MaliciousBehaviour` with every honest tensor of one direction (only when the attack
    declares ``needs_history``); stale() is called by the attack. Contract:

      - at most one tensor per step is kept: the last one recorded at that step;
      - only the ``max_steps`` most recent steps are kept (steps ``<= newest - max_steps`` are dropped, and a record
        that old is ignored), so ``len(history) <= max_steps`` always;
      - tensors are stored as detached clones on CPU in ``storage_dtype`` (bfloat16 by default: the memory of float16
        without its underflow, which would turn typical activation-gradients (~1e-6) into zeros; pass ``None`` to keep
        the original dtype exactly); stale() casts back to the dtype and device of ``like``.
    """

    def __init__(self, max_steps: int, *, storage_dtype: torch.dtype | None = torch.bfloat16):
        if int(max_steps) < 1:
            raise AttackError(f"TensorHistory needs max_steps >= 1, got {max_steps}")
        self.max_steps = int(max_steps)
        self.storage_dtype = storage_dtype
        self._tensors: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def steps(self) -> list[int]:
        """The recorded steps, oldest first."""
        return sorted(self._tensors)

    def clear(self) -> None:
        self._tensors.clear()

    def record(self, step: int, h: torch.Tensor) -> None:
        """Store a detached CPU copy of h as the tensor of ``step`` (replacing an earlier one at the same step)."""
        step = int(step)
        newest = max(self._tensors, default=step)
        if step <= newest - self.max_steps:
            return  # older than the window: would be dropped at once
        stored = h.detach().to(device="cpu", dtype=self.storage_dtype or h.dtype, copy=True)
        self._tensors[step] = stored
        cutoff = max(newest, step) - self.max_steps
        for old in [s for s in self._tensors if s <= cutoff]:
            del self._tensors[old]

    def state_dict(self) -> dict:
        """The recorded tensors (CPU, in ``storage_dtype``; not copied) keyed by step, oldest first."""
        return {"max_steps": self.max_steps, "tensors": {s: self._tensors[s] for s in self.steps}}

    def load_state_dict(self, d: dict) -> None:
        """Restore a ``state_dict`` of a history with the same ``max_steps`` (AttackError otherwise)."""
        if int(d["max_steps"]) != self.max_steps:
            raise AttackError(f"history state keeps {d['max_steps']} steps, this history keeps {self.max_steps}")
        tensors = d["tensors"]
        if not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise AttackError("history state holds something other than tensors")
        self._tensors = {int(s): t.detach().to("cpu").clone() for s, t in sorted(tensors.items())}

    def stale(self, step: int, delta: int, like: torch.Tensor, before: int | None = None) -> torch.Tensor | None:
        """
        The tensor recorded at the latest step ``<= step - delta``; if none is that old, the OLDEST recorded one (a
        replay as stale as the history allows). Only tensors of ``like``'s shape are considered, and with ``before``
        only those of steps before it; returns None if there is none (empty history, or every recorded tensor has
        another shape or is too recent). The result is a new tensor with the dtype and device of ``like``.
        """
        candidates = sorted(s for s, t in self._tensors.items()
                            if t.shape == like.shape and (before is None or s < before))  # fmt: skip
        if not candidates:
            return None
        target = int(step) - int(delta)
        old_enough = [s for s in candidates if s <= target]
        chosen = old_enough[-1] if old_enough else candidates[0]
        return self._tensors[chosen].to(device=like.device, dtype=like.dtype, copy=True)


class SigmaEstimator:
    """
    Running per-feature (last dim) standard deviation of honest tensors, pooled over all leading dims: what an
    attacker learns from its own honest computations.

    update() is called by :class:`MaliciousBehaviour` with every honest tensor of one direction; sigma() is called to
    build the :class:`AttackContext`. It keeps an exact running mean and variance (Welford / Chan's parallel merge, in
    float64) over everything seen, so it does not track drift faster than that. Non-finite tensors are ignored.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    @staticmethod
    def _stats_dtype(device: torch.device) -> torch.dtype:
        return torch.float32 if device.type == "mps" else torch.float64

    def update(self, h: torch.Tensor) -> None:
        if h.numel() == 0 or h.dim() == 0:
            return
        rows = h.detach().reshape(-1, h.shape[-1]).to(self._stats_dtype(h.device))
        if not bool(torch.isfinite(rows).all()):
            return
        n = rows.shape[0]
        batch_mean = rows.mean(dim=0)
        batch_m2 = ((rows - batch_mean) ** 2).sum(dim=0)
        if self.mean is None or self.mean.shape != batch_mean.shape:  # first update, or the width changed: restart
            self.count, self.mean, self.m2 = n, batch_mean, batch_m2
            return
        mean, m2 = self.mean.to(batch_mean), self.m2.to(batch_m2)
        total = self.count + n
        delta = batch_mean - mean
        self.mean = mean + delta * (n / total)
        self.m2 = m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total

    def sigma(self, like: torch.Tensor) -> torch.Tensor:
        """
        Per-feature std, shape ``[D]`` (D = ``like.shape[-1]``), float32 on ``like``'s device. Before any update (or
        if the width differs) it is ``like``'s own per-feature std; with fewer than two rows it is the std over all of
        ``like``'s elements, repeated for every feature.
        """
        width = like.shape[-1] if like.dim() > 0 else 1
        if self.mean is not None and self.mean.shape[0] == width and self.count >= 2:
            return (self.m2 / (self.count - 1)).sqrt().to(device=like.device, dtype=torch.float32)
        rows = like.detach().reshape(-1, width).float()
        rows = torch.where(torch.isfinite(rows), rows, torch.zeros_like(rows))
        if rows.shape[0] >= 2:
            return rows.std(dim=0)
        value = rows.std() if rows.numel() >= 2 else torch.ones((), device=like.device)
        return value.expand(width).clone()

    def state_dict(self) -> dict:
        return {
            "count": self.count,
            "mean": None if self.mean is None else self.mean.cpu(),
            "m2": None if self.m2 is None else self.m2.cpu(),
        }

    def load_state_dict(self, d: dict) -> None:
        self.count = int(d["count"])
        self.mean = None if d["mean"] is None else d["mean"].clone()
        self.m2 = None if d["m2"] is None else d["m2"].clone()


@dataclass
class AttackContext:
    """
    What an attack may use besides h; built by :class:`MaliciousBehaviour` for every attacked tensor.

    ``sigma`` is float32 on h's device, shape ``[D]``. ``tainted`` is the one field an attack may write: set it to
    False when it passes h through unchanged (noise not applied this micro-batch, delay with an empty history), so
    that the benchmark's per-micro-batch ground truth stays exact (read back as ``MaliciousBehaviour.last_tainted``).
    """

    step: int
    microbatch: int
    direction: str
    worker: int
    sigma: torch.Tensor
    history: TensorHistory
    generator: torch.Generator
    tainted: bool = True


Attack = Callable[[torch.Tensor, AttackContext], torch.Tensor]


def _rand(shape: torch.Size, generator: torch.Generator, like: torch.Tensor, *, normal: bool) -> torch.Tensor:
    """float32 U[0,1) or N(0,1) draws of ``shape`` on like's device. Drawn on the generator's device (CPU for the
    generators made here) and moved, so that results do not depend on where h lives."""
    draw = torch.randn if normal else torch.rand
    out = draw(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return out.to(like.device)


def _add(h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """h + delta computed in at least float32 and cast back to h's dtype (a new tensor)."""
    work = torch.promote_types(h.dtype, torch.float32)
    return (h.to(work) + delta.to(work)).to(h.dtype)


def _sigma_like(context: AttackContext, h: torch.Tensor) -> torch.Tensor:
    sigma = context.sigma.to(device=h.device, dtype=torch.float32)
    if sigma.shape != h.shape[-1:]:
        raise AttackError(f"context.sigma has shape {tuple(sigma.shape)}, expected [{h.shape[-1]}]")
    return sigma


# ---------------------------------------------------------------------------------------------------------------------
# Group A attacks
# ---------------------------------------------------------------------------------------------------------------------


class AttackBase:
    """
    Base class of the built-in attacks. Subclasses set ``name`` and ``accepted`` (parameter name -> default), validate
    their parameters in __init__ (raising :class:`AttackError`), and implement __call__(h, context), which is called by
    :class:`MaliciousBehaviour` once per attacked tensor, under torch.no_grad(), with a detached h.

    ``needs_history`` tells :class:`MaliciousBehaviour` to record the worker's honest tensors in ``context.history``.
    """

    name: str = ""
    accepted: dict[str, Any] = {}
    needs_history: bool = False

    def __init__(self, *, seed: int = 0, worker: int = 0, **params: Any):
        unknown = sorted(set(params) - set(self.accepted))
        if unknown:
            raise AttackError(
                f"attack {self.name!r} got unknown parameter(s) {unknown}; accepted: {sorted(self.accepted) or 'none'}"
            )
        self.seed, self.worker = int(seed), int(worker)
        self.params = {**self.accepted, **params}

    def _number(self, key: str, *, low: float = -math.inf, high: float = math.inf) -> float:
        value = self.params[key]
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise AttackError(f"attack {self.name!r}: {key} must be a number, got {value!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise AttackError(f"attack {self.name!r}: {key} must be a finite number in [{low}, {high}], got {value}")
        return value

    def __call__(self, h: torch.Tensor, context: AttackContext) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


class ZerosAttack(AttackBase):
    """A1: h' = 0."""

    name = "zeros"
    accepted: dict[str, Any] = {}

    def __call__(self, h, context):
        return torch.zeros_like(h)


class ConstantAttack(AttackBase):
    """A2: h' = c * sigma everywhere (every leading position gets the same per-feature vector)."""

    name = "constant"
    accepted = {"c": 10.0}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.c = self._number("c")

    def __call__(self, h, context):
        value = (self.c * _sigma_like(context, h)).to(h.dtype)
        return value.expand(h.shape).contiguous()


class RandomAttack(AttackBase):
    """A3: h' ~ N(0, (a * sigma)^2), independent of h."""

    name = "random"
    accepted = {"a": 10.0}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.a = self._number("a", low=0.0)

    def __call__(self, h, context):
        noise = _rand(h.shape, context.generator, h, normal=True)
        return (noise * (self.a * _sigma_like(context, h))).to(h.dtype)


class ScalingAttack(AttackBase):
    """A4: h' = lam * h."""

    name = "scaling"
    accepted = {"lam": -1.0}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.lam = self._number("lam")

    def __call__(self, h, context):
        return h * self.lam


class RandomSignAttack(AttackBase):
    """A5: each coordinate's sign flipped independently with probability p (|h'| = |h|)."""

    name = "random_sign"
    accepted = {"p": 0.5}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.p = self._number("p", low=0.0, high=1.0)

    def __call__(self, h, context):
        flip = _rand(h.shape, context.generator, h, normal=False) < self.p
        return torch.where(flip, -h, h)


class BiasAttack(AttackBase):
    """
    A6: h' = h + b * sigma * s, where s is a +-1 pattern over the last dim. The pattern is FIXED per attacker: it is
    drawn once per width D from a seed derived from (seed, worker), not from the context's generator, so it is the
    same on every call, in both directions, and after a restart.
    """

    name = "bias"
    accepted = {"b": 3.0}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.b = self._number("b")
        self._patterns: dict[int, torch.Tensor] = {}

    def pattern(self, width: int) -> torch.Tensor:
        """The fixed +-1 pattern (float32, CPU) for features of this width."""
        if width not in self._patterns:
            gen = torch.Generator().manual_seed(_derive_seed(self.seed, self.worker, "bias"))
            bits = torch.randint(0, 2, (width,), generator=gen)
            self._patterns[width] = bits.float() * 2 - 1
        return self._patterns[width]

    def __call__(self, h, context):
        shift = self.b * _sigma_like(context, h) * self.pattern(h.shape[-1]).to(h.device)
        return _add(h, shift)


class NoiseAttack(AttackBase):
    """A7: with probability q per micro-batch (one draw from the generator per call), h' = h + N(0, (kappa*sigma)^2);
    otherwise h' = h and ``context.tainted`` is set to False."""

    name = "noise"
    accepted = {"kappa": 1.0, "q": 1.0}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.kappa = self._number("kappa", low=0.0)
        self.q = self._number("q", low=0.0, high=1.0)

    def __call__(self, h, context):
        applied = float(torch.rand((), generator=context.generator)) < self.q
        if not applied:
            context.tainted = False
            return h.clone()
        noise = _rand(h.shape, context.generator, h, normal=True) * (self.kappa * _sigma_like(context, h))
        return _add(h, noise)


class DelayAttack(AttackBase):
    """
    A8: h' = ``context.history.stale(step, delta, h)``, the honest tensor of ``delta`` steps earlier (or the oldest
    one the history holds). With nothing to replay (empty history, or no tensor of h's shape), or when the only
    tensor to replay is h itself (the attacker's first step: the history has just recorded it), h' = h and
    ``context.tainted`` is set to False.
    """

    name = "delay"
    accepted = {"delta": 100}
    needs_history = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        delta = self._number("delta", low=1)
        if delta != int(delta):
            raise AttackError(f"attack 'delay': delta must be a whole number of steps, got {delta}")
        self.delta = int(delta)

    def __call__(self, h, context):
        # only earlier steps: at the attacker's first step the history holds just h, recorded a moment ago, and
        # "replaying" it was labelled a poisoned micro-batch
        old = context.history.stale(context.step, self.delta, h, before=context.step)
        if old is None:
            context.tainted = False
            return h.clone()
        return old


class NonFiniteAttack(AttackBase):
    """
    A9: a random ``fraction`` of coordinates become non-finite (at least one when fraction > 0): NaN for
    kind="nan", +-Inf (random sign) for kind="inf", and NaN, +Inf or -Inf uniformly for kind="mixed".
    """

    name = "nonfinite"
    accepted = {"fraction": 1.0, "kind": "nan"}
    KINDS = ("nan", "inf", "mixed")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fraction = self._number("fraction", low=0.0, high=1.0)
        self.kind = str(self.params["kind"]).lower()
        if self.kind not in self.KINDS:
            kind = self.params["kind"]
            raise AttackError(f"attack 'nonfinite': kind must be one of {list(self.KINDS)}, got {kind!r}")

    def __call__(self, h, context):
        if not h.is_floating_point():
            raise AttackError(f"attack 'nonfinite' needs a floating-point tensor, got {h.dtype}")
        out = h.clone()
        if h.numel() == 0 or self.fraction == 0:
            return out
        mask = _rand(h.shape, context.generator, h, normal=False) < self.fraction
        if not bool(mask.any()):
            index = int(torch.randint(h.numel(), (), generator=context.generator))
            mask.view(-1)[index] = True
        pick = _rand(h.shape, context.generator, h, normal=False)  # drawn for every kind: same stream consumption
        nan = torch.tensor(math.nan, dtype=h.dtype, device=h.device)
        inf = torch.tensor(math.inf, dtype=h.dtype, device=h.device)
        if self.kind == "nan":
            values = nan.expand(h.shape)
        elif self.kind == "inf":
            values = torch.where(pick < 0.5, inf, -inf)
        else:
            values = torch.where(pick < 1 / 3, nan, torch.where(pick < 2 / 3, inf, -inf))
        return torch.where(mask, values, out)


_BASIC_ATTACKS: dict[str, type[AttackBase]] = {
    cls.name: cls
    for cls in (ZerosAttack, ConstantAttack, RandomAttack, ScalingAttack, RandomSignAttack, BiasAttack, NoiseAttack,
                DelayAttack)
}


class MixedAttack(AttackBase):
    """
    A10: each malicious worker draws ONE of A1..A8, with its strongest setting, deterministically from
    (seed, worker), and keeps it (``chosen`` is its name, ``inner`` the attack). ``needs_history`` follows the draw.
    """

    name = "mixed"
    accepted: dict[str, Any] = {}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        pool = [ATTACK_IDS[f"A{i}"] for i in range(1, 9)]
        self.chosen = pool[_derive_seed(self.seed, self.worker, "mixed") % len(pool)]
        self.inner = _BASIC_ATTACKS[self.chosen](seed=self.seed, worker=self.worker, **STRONGEST[self.chosen])
        self.needs_history = self.inner.needs_history

    def __call__(self, h, context):
        return self.inner(h, context)

    def __repr__(self) -> str:
        return f"MixedAttack(chosen={self.inner!r})"


ATTACK_CLASSES: dict[str, type[AttackBase]] = {**_BASIC_ATTACKS, "nonfinite": NonFiniteAttack, "mixed": MixedAttack}

ATTACK_IDS: dict[str, str] = {
    "A1": "zeros",
    "A2": "constant",
    "A3": "random",
    "A4": "scaling",
    "A5": "random_sign",
    "A6": "bias",
    "A7": "noise",
    "A8": "delay",
    "A9": "nonfinite",
    "A10": "mixed",
}

ATTACK_SETTINGS: dict[str, list[dict]] = {
    "zeros": [{}],
    "constant": [{"c": 1.0}, {"c": 10.0}],
    "random": [{"a": 1.0}, {"a": 10.0}],
    "scaling": [{"lam": -1.0}, {"lam": 0.5}, {"lam": 2.0}, {"lam": 10.0}],
    "random_sign": [{"p": 0.1}, {"p": 0.5}],
    "bias": [{"b": 0.5}, {"b": 1.0}, {"b": 3.0}],
    "noise": [{"kappa": k, "q": q} for k, q in itertools.product((0.1, 0.3, 1.0), (0.5, 1.0))],
    "delay": [{"delta": 10}, {"delta": 100}],
    "nonfinite": [{"fraction": 1e-4}, {"fraction": 1.0}],
    "mixed": [{}],
}

STRONGEST: dict[str, dict] = {
    "zeros": {},
    "constant": {"c": 10.0},
    "random": {"a": 10.0},
    "scaling": {"lam": -1.0},
    "random_sign": {"p": 0.5},
    "bias": {"b": 3.0},
    "noise": {"kappa": 1.0, "q": 1.0},
    "delay": {"delta": 100},
    "nonfinite": {"fraction": 1.0},
    "mixed": {},
}

# zeros and mixed have no setting to weaken; they are listed ({}) so that every name is a key
WEAKEST: dict[str, dict] = {
    "zeros": {},
    "constant": {"c": 1.0},
    "random": {"a": 1.0},
    "scaling": {"lam": 0.5},
    "random_sign": {"p": 0.1},
    "bias": {"b": 0.5},
    "noise": {"kappa": 0.1, "q": 0.5},
    "delay": {"delta": 10},
    "nonfinite": {"fraction": 1e-4},
    "mixed": {},
}


# ---------------------------------------------------------------------------------------------------------------------
# Building attacks from the command line
# ---------------------------------------------------------------------------------------------------------------------


class PluginAttack:
    """
    A user attack loaded from ``module:function``. Called like any attack; it checks that the plugin returned a tensor
    of h's shape (raising :class:`AttackError` otherwise) and casts it to h's dtype and device. History is recorded
    for plugins unless the plugin object has ``needs_history = False``.
    """

    def __init__(self, spec: str, fn: Callable, params: dict):
        self.name, self.spec, self.params = spec, spec, dict(params)
        self.fn = functools.partial(fn, **params) if params else fn
        self.needs_history = bool(getattr(fn, "needs_history", True))

    def __call__(self, h: torch.Tensor, context: AttackContext) -> torch.Tensor:
        return _checked(self.fn(h, context), h, self.spec)

    def __repr__(self) -> str:
        return f"PluginAttack({self.spec!r}, params={self.params!r})"


def _checked(out: Any, h: torch.Tensor, what: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise AttackError(f"attack {what!r} returned {type(out).__name__}, expected a torch.Tensor")
    if out.shape != h.shape:
        raise AttackError(f"attack {what!r} returned shape {tuple(out.shape)}, expected {tuple(h.shape)}")
    return out.to(device=h.device, dtype=h.dtype)


def _load_plugin(spec: str, params: dict) -> PluginAttack:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise AttackError(f"plugin attack must be given as 'module:function', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, but also whatever the module raises while being imported
        raise AttackError(f"cannot import plugin module {module_name!r} for attack {spec!r}: {e!r}") from e
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttackError(f"plugin module {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(obj):
        raise AttackError(f"plugin {spec!r} is not callable (it is a {type(obj).__name__})")
    if params:
        try:
            signature = inspect.signature(obj)
        except (TypeError, ValueError):
            signature = None
        if signature is not None:
            kinds = {p.kind for p in signature.parameters.values()}
            if inspect.Parameter.VAR_KEYWORD not in kinds:
                names = [n for n, p in signature.parameters.items() if p.kind != inspect.Parameter.VAR_POSITIONAL]
                unknown = sorted(set(params) - set(names[2:]))
                if unknown:
                    raise AttackError(f"plugin {spec!r} got unknown parameter(s) {unknown}; accepted: {names[2:]}")
    return PluginAttack(spec, obj, params)


def attack_name(spec: str) -> str:
    """The canonical name for a name or id ("A4", "a4", "scaling", "random-sign"); AttackError if unknown."""
    key = spec.strip()
    if key.upper() in ATTACK_IDS:
        return ATTACK_IDS[key.upper()]
    name = key.lower().replace("-", "_")
    if name in ATTACK_CLASSES:
        return name
    known = ", ".join(f"{i}={n}" for i, n in ATTACK_IDS.items())
    raise AttackError(f"unknown attack {spec!r}; known: {known}, or a plugin given as 'module:function'")


def make_attack(spec: str, params: dict | None = None, *, seed: int = 0, worker: int = 0) -> Attack:
    """
    Build the attack for one malicious worker; called once per worker when the experiment is set up.

    ``spec`` is a name ("zeros"), an id ("A1", case-insensitive) or "module:function" (a plugin, imported now).
    ``params=None`` means STRONGEST[name]; given params override the attack's defaults (its strongest setting) one by
    one. Unknown parameter names, bad values and unusable plugins raise :class:`AttackError`. ``seed`` and ``worker``
    fix what is drawn once per attacker (the bias pattern, the mixed draw).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise AttackError(f"attack spec must be a non-empty string, got {spec!r}")
    if ":" in spec:
        return _load_plugin(spec.strip(), dict(params or {}))
    name = attack_name(spec)
    chosen = dict(STRONGEST[name] if params is None else params)
    return ATTACK_CLASSES[name](seed=seed, worker=worker, **chosen)


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_params(text: str) -> dict:
    """
    Parse "lam=-1,q=0.5" into {"lam": -1.0, "q": 0.5}; "" gives {}. Numeric values become floats; anything else
    (e.g. kind=inf) stays a string. Raises AttackError on bad syntax (missing '=', bad or repeated key, empty value).
    """
    result: dict[str, Any] = {}
    if not text or not text.strip():
        return result
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not _KEY.fullmatch(key) or not value:
            raise AttackError(f"bad attack parameter {item.strip()!r} in {text!r}; expected key=value[,key=value...]")
        if key in result:
            raise AttackError(f"attack parameter {key!r} given twice in {text!r}")
        result[key] = float(value) if _NUMBER.fullmatch(value) else value
    return result


def parse_direction(text: str) -> frozenset[str]:
    """ "forward" | "backward" | "both" (case-insensitive) -> the set of attacked directions; AttackError otherwise."""
    key = str(text).strip().lower()
    if key == "both":
        return DIRECTIONS
    if key in DIRECTIONS:
        return frozenset((key,))
    raise AttackError(f"attack direction must be 'forward', 'backward' or 'both', got {text!r}")


# ---------------------------------------------------------------------------------------------------------------------
# One malicious worker
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class MaliciousBehaviour:
    """
    What one malicious worker does to the tensors it sends. apply() is called by the worker with every tensor it is
    about to send (forward activations and backward activation-gradients), after computing it honestly:

      - always, it updates this direction's :class:`SigmaEstimator` with the honest h, and this direction's
        :class:`TensorHistory` too if the attack has ``needs_history`` (delay, mixed that drew delay, plugins);
      - if ``step >= onset`` and the direction is attacked, it returns ``attack(h, context)`` (computed under
        no_grad on a detached h, checked to have h's shape, cast to h's dtype and device) and sets ``last_tainted``
        to whether the attack changed the tensor; otherwise it returns h itself and ``last_tainted`` is False.

    ``directions`` may also be given as a string ("forward", "backward", "both"). The private generator (CPU) is
    seeded from (seed, worker).
    """

    worker: int
    attack: Attack
    directions: frozenset[str]
    onset: int
    seed: int
    history_steps: int = 128
    last_tainted: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.directions, str):
            self.directions = parse_direction(self.directions)
        self.directions = frozenset(self.directions)
        if not self.directions <= DIRECTIONS:
            raise AttackError(f"directions must be a subset of {sorted(DIRECTIONS)}, got {sorted(self.directions)}")
        if not callable(self.attack):
            raise AttackError(f"attack must be callable, got {type(self.attack).__name__}")
        delta = getattr(self.attack, "delta", None) or getattr(getattr(self.attack, "inner", None), "delta", None)
        if isinstance(delta, int) and delta >= self.history_steps:
            warnings.warn(
                f"delay of {delta} steps with history_steps={self.history_steps}: replays will be at most "
                f"{self.history_steps - 1} steps stale",
                stacklevel=2,
            )
        self.generator = torch.Generator().manual_seed(_derive_seed(self.seed, self.worker, "generator"))
        self.sigma_estimators = {d: SigmaEstimator() for d in sorted(DIRECTIONS)}
        self.histories = {d: TensorHistory(self.history_steps) for d in sorted(DIRECTIONS)}

    @property
    def needs_history(self) -> bool:
        return bool(getattr(self.attack, "needs_history", False))

    def apply(self, h: torch.Tensor, *, step: int, microbatch: int, direction: str) -> torch.Tensor:
        if direction not in DIRECTIONS:
            raise AttackError(f"direction must be 'forward' or 'backward', got {direction!r}")
        honest = h.detach()
        self.sigma_estimators[direction].update(honest)
        if self.needs_history:
            self.histories[direction].record(step, honest)
        if step < self.onset or direction not in self.directions:
            self.last_tainted = False
            return h
        context = AttackContext(
            step=int(step),
            microbatch=int(microbatch),
            direction=direction,
            worker=self.worker,
            sigma=self.sigma_estimators[direction].sigma(honest),
            history=self.histories[direction],
            generator=self.generator,
        )
        with torch.no_grad():
            out = _checked(self.attack(honest, context), h, self.attack)
        self.last_tainted = bool(context.tainted)
        return out

    def state_dict(self, with_history: bool = False) -> dict:
        """Sigma estimators, the generator state and ``last_tainted``; the tensor histories only ``with_history``
        (they can be large: up to ``history_steps`` tensors per direction). Without them, after load_state_dict() a
        delay attack replays from a history that refills from that point on; with them a resumed run is exact."""
        state = {
            "worker": self.worker,
            "generator": self.generator.get_state(),
            "sigma": {d: est.state_dict() for d, est in self.sigma_estimators.items()},
            "last_tainted": self.last_tainted,
        }
        if with_history:
            state["histories"] = {d: hist.state_dict() for d, hist in self.histories.items()}
        return state

    def load_state_dict(self, d: dict) -> None:
        """Restore a ``state_dict``; histories are replaced only when the state holds them."""
        if int(d["worker"]) != self.worker:
            raise AttackError(f"state of worker {d['worker']} loaded into the behaviour of worker {self.worker}")
        self.generator.set_state(d["generator"])
        for direction, est_state in d["sigma"].items():
            self.sigma_estimators[direction].load_state_dict(est_state)
        self.last_tainted = bool(d.get("last_tainted", False))
        for direction, hist_state in d.get("histories", {}).items():
            if direction not in self.histories:
                raise AttackError(f"history state for unknown direction {direction!r}")
            self.histories[direction].load_state_dict(hist_state)
