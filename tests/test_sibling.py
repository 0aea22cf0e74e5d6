"""The sibling test: a sender whose tensors sit consistently further from the baseline than its siblings' at the same
monitor is struck, even below the fences; honest siblings, a lone sender and banned senders are never evidence."""

import io
import math

import pytest
import torch

from sentinel.config import ConfigError, SentinelConfig
from sentinel.stats import mann_whitney_greater
from sentinel.validator import Validator

D = 16
SENDERS = ("w0", "w1", "w2")
# the defaults' ratio (1.6) suits the mesh's traffic; this synthetic stream's distances move less with noise, so the
# tests ask for a smaller ratio (which makes the honest tests harder, not easier)
SIB = dict(sibling_alpha=1e-4, sibling_ratio=1.15)


def test_mann_whitney_is_the_normal_approximation_with_tie_and_continuity_corrections():
    # x = [3, 4, 5] against y = [1, 2]: U = 6, mean 3, variance 6 / 12 * 6 = 3
    assert mann_whitney_greater([3, 4, 5], [1, 2]) == pytest.approx(0.5 * math.erfc(2.5 / math.sqrt(3) / math.sqrt(2)))
    # one tie across the samples: ranks 1, 2.5, 2.5, 4, 5; U = 11.5 - 6 = 5.5 of 6; variance 6 / 12 * (6 - 6 / 20)
    p = mann_whitney_greater([2, 4, 5], [1, 2])
    assert p == pytest.approx(0.5 * math.erfc((5.5 - 3 - 0.5) / math.sqrt(0.5 * 5.7) / math.sqrt(2)))
    assert mann_whitney_greater([1, 1, 1], [1, 1]) == 1.0  # nothing to rank
    high, low = [0.5, 0.7, 0.9, 1.1, 1.3, 0.8, 1.0, 1.2], [0.1, 0.2, 0.6, 0.3, 0.4, 0.45, 0.35, 0.25]
    assert mann_whitney_greater(high, low) < 0.001 < 0.999 < mann_whitney_greater(low, high)
    assert mann_whitney_greater([float("nan")] * 8, low) < 0.001  # a non-finite value ranks as the largest
    with pytest.raises(ValueError):
        mann_whitney_greater([], low)


def _pairs(g: torch.Generator, n: int):
    for _ in range(n):
        ref = torch.randn(2, 8, D, generator=g) + torch.linspace(-1, 1, D)
        yield ref + 0.3 * torch.randn(2, 8, D, generator=g), ref


def _warmed(senders=SENDERS, **kw) -> tuple[Validator, torch.Generator]:
    v, g = Validator(SentinelConfig(**kw)), torch.Generator().manual_seed(0)
    for i, (out, ref) in enumerate(_pairs(g, 40)):
        v.check(out, boundary=1, direction="forward", sender=senders[i % len(senders)], step=0, reference=ref,
                warmup=True)  # fmt: skip
    v.end_step(0)
    return v, g


def _run(v: Validator, g: torch.Generator, steps, senders=SENDERS, noisy="w2", extra=0.4) -> dict[str, int]:
    """Each step, two tensors from each sender; ``noisy``'s carry extra Gaussian noise (mild: never flagged here)."""
    flags = dict.fromkeys(senders, 0)
    for step in steps:
        for i, (out, ref) in enumerate(_pairs(g, 2 * len(senders))):
            sender = senders[i % len(senders)]
            if sender == noisy:
                out = out + extra * torch.randn(out.shape, generator=g)
            flags[sender] += v.check(out, boundary=1, direction="forward", sender=sender, step=step,
                                     reference=ref).tainted  # fmt: skip
        v.end_step(step)
    return flags


@pytest.mark.parametrize("alpha", [0.0, 1e-4])
def test_a_mild_offender_below_the_fences_is_banned_by_the_sibling_test(alpha):
    v, g = _warmed(**{**SIB, "sibling_alpha": alpha})
    flags = _run(v, g, range(1, 21))
    assert flags == dict.fromkeys(SENDERS, 0)  # the fences never see it
    if alpha:
        assert set(v.ledger.banned()) == {"w2"} and v.sibling_struck == v.config.ban_level
    else:
        assert not v.ledger.banned() and v.sibling_struck == 0


def test_honest_siblings_and_a_lone_sender_are_never_struck_by_it():
    v, g = _warmed(**SIB)
    _run(v, g, range(1, 31), noisy=None)
    assert v.sibling_struck == 0 and not v.ledger.banned()
    lone, g = _warmed(senders=("w2",), **SIB)
    _run(lone, g, range(1, 21), senders=("w2",))  # nobody to compare with
    assert lone.sibling_struck == 0


@pytest.mark.parametrize("needed", [3, 2])
def test_two_senders_are_not_enough_by_default(needed):
    """With two senders either could be the odd one (an attack that shrinks its tensors sits closer to the baseline
    than its honest sibling), so the test needs three (``sibling_senders``) taking part, each with ``sibling_min``
    tensors in the window."""
    v = Validator(SentinelConfig(sibling_alpha=1e-4, sibling_senders=needed))
    log = v.sibling_log[(1, "forward")] = []
    for step in range(1, 13):
        log += [(step, "low", 0.2 + 0.01 * (step % 3)), (step, "high", 0.6 + 0.01 * (step % 3))]
        log += [(step, "few", 0.2)] if step <= 11 else []  # 11 tensors: one short of sibling_min (12)
    assert v._sibling_outliers(12) == ({"high"} if needed == 2 else set())
    v.sibling_log[(1, "forward")].append((12, "few", 0.2))  # now three take part
    assert v._sibling_outliers(12) == {"high"}


def test_a_banned_sender_is_neither_tested_nor_a_sibling():
    v, g = _warmed(**SIB)
    v.ledger.record("w0", True, 0)
    for _ in range(2):
        v.ledger.record("w0", True, 0)
    assert v.ledger.is_banned("w0")
    _run(v, g, range(1, 21), noisy="w0", extra=2.0)  # the banned one's traffic stands out, but it is out already
    assert v.sibling_struck == 0 and set(v.ledger.banned()) == {"w0"}
    assert all(len(entries) > 0 for entries in v.sibling_log.values())


def test_the_sibling_window_survives_a_restart():
    """A validator restored from its saved state mid-run bans the same sender at the same step as one that ran on."""
    straight, g = _warmed(**SIB)
    _run(straight, g, range(1, 21))
    first, g = _warmed(**SIB)
    _run(first, g, range(1, 6))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    restored = Validator(first.config)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.sibling_log == first.sibling_log
    _run(restored, g, range(6, 21))
    assert restored.ledger.banned() == straight.ledger.banned() and restored.ledger.banned()
    assert restored.sibling_struck == straight.sibling_struck


def test_the_window_keeps_only_the_last_sibling_steps():
    v, g = _warmed(**SIB, sibling_steps=5)
    _run(v, g, range(1, 13))
    assert {step for entries in v.sibling_log.values() for step, _, _ in entries} == set(range(8, 13))


@pytest.mark.parametrize("bad", [dict(sibling_alpha=-0.1), dict(sibling_alpha=1.0), dict(sibling_ratio=0.9),
                                 dict(sibling_steps=0), dict(sibling_min=1), dict(sibling_senders=1)])  # fmt: skip
def test_bad_sibling_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        SentinelConfig(**bad)
