"""The fence ratchet: an attacker that stays just under the fences, and what it does to them.

Three senders at one forward monitor (synthetic residual-stage traffic, D = 64); from step 10 the third adds a bias
along a fixed +-1 pattern, sized by bisection on a copy of the validator's monitor (oracle knowledge of its state:
an upper bound on what an attacker knows) so that its largest distance over its fence is ``--ratio`` x the honest
senders' recent median (1.5: under the sibling test's 1.6 and under the fences). Prints, every 10 steps, the bias,
the baseline's mean along the pattern, the l1 fence and the ledger (README, "Fence ratchet").

    python benchmarks/fence_ratchet.py                                    # the defaults: the fence grows ~50x
    python benchmarks/fence_ratchet.py --median-baseline 3 --fence-upper-spread 4
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sentinel.config import SentinelConfig  # noqa: E402
from sentinel.validator import Validator  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=1.5, help="the attacker's excess over the honest senders' median")
    p.add_argument("--steps", type=int, default=70)
    p.add_argument("--median-baseline", type=int, default=0)
    p.add_argument("--fence-upper-spread", type=float, default=0.0)
    args = p.parse_args()
    torch.manual_seed(0)
    dim = 64
    weights = torch.randn(dim, dim) / dim**0.5
    pattern = (torch.randint(0, 2, (dim,)) * 2 - 1).float()
    config = SentinelConfig(median_baseline=args.median_baseline, fence_upper_spread=args.fence_upper_spread)
    validator = Validator(config)
    honest_excess: list[float] = []
    bias = 0.0
    for step in range(args.steps):
        for mb in range(6):
            sender = f"s{mb % 3}"
            ref = torch.randn(4, 32, dim) + 0.5
            x = ref + 0.3 * ref @ weights + 0.05 * torch.randn(4, 32, dim)
            attack = sender == "s2" and step >= 10
            if attack:
                target = args.ratio * float(np.median(honest_excess[-24:]))
                lo, hi = 0.0, 50.0
                for _ in range(25):  # the largest bias whose excess stays within the target
                    mid = (lo + hi) / 2
                    probe = copy.deepcopy(validator.monitor(1, "forward"))
                    obs = probe.observe(x + mid * pattern, ref, detect=False, learn=False)
                    excess = max(obs.scores[m] / probe.fence(m) for m in obs.scores)
                    lo, hi = (mid, hi) if excess <= target else (lo, mid)
                x, bias = x + lo * pattern, lo
            res = validator.check(x, boundary=1, direction="forward", sender=sender, step=step, reference=ref,
                                  warmup=step < 6)  # fmt: skip
            fences = list(res.fences.values())
            if not attack and step >= 6 and fences and all(np.isfinite(fences)):
                honest_excess.append(max(res.scores[m] / res.fences[m] for m in res.scores))
        validator.end_step(step)
        if step % 10 == 9 or step == args.steps - 1:
            mon = validator.monitor(1, "forward")
            along = float(mon.baseline.mean @ pattern.numpy()) / dim
            strikes = {w: r.total_strikes for w, r in validator.ledger.workers.items()}
            print(f"step {step:3d}: attacker bias/feature {bias:6.3f}, baseline along the pattern {along:6.3f}, "
                  f"l1 fence {mon.fence('l1'):.3f}, strikes {strikes}, banned {validator.ledger.banned() or '-'}")


if __name__ == "__main__":
    main()
