"""
An example plugin attack: any importable callable ``(h, context) -> h'`` can be used as an attack, e.g.

    --attack sentinel.example_plugin:flip_half

A plugin is called once per attacked tensor (after the onset step, in the attacked directions) with the honest,
detached tensor h of shape ``[..., D]`` and a :class:`sentinel.attacks.AttackContext` (step, micro-batch id,
direction, worker id, per-feature sigma estimate, the worker's own honest history, its private generator). It must
return a tensor of h's shape and must not modify h in place. Parameters given with the attack
(``make_attack(spec, params)``) are passed as keyword arguments. Setting ``needs_history = False`` on the callable
tells the worker not to record its honest history (plugins get it recorded by default).
"""

import torch

from sentinel.attacks import AttackContext


def flip_half(h: torch.Tensor, context: AttackContext) -> torch.Tensor:
    """Negate the first half (``D // 2``) of the features; the rest pass through unchanged."""
    out = h.clone()
    half = h.shape[-1] // 2
    out[..., :half] = -h[..., :half]
    return out


flip_half.needs_history = False
