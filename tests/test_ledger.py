"""The violation ledger's arithmetic, exactly as documented in sentinel/ledger.py."""

import pytest

from sentinel.ledger import ViolationLedger


def test_ban_at_level():
    led = ViolationLedger(ban_level=3, forgive_after=100)
    assert not led.record("w", True, step=5)
    assert not led.record("w", True, step=6)
    assert led.record("w", True, step=7)  # the third strike bans
    assert led.is_banned("w") and led.banned() == {"w": 7}
    assert not led.record("w", True, step=8)  # already banned: no second ban event
    assert led.banned() == {"w": 7}


def test_forgiveness_wipes_after_a_clean_run():
    led = ViolationLedger(ban_level=3, forgive_after=4)
    led.record("w", True, 0)
    led.record("w", True, 0)
    for _ in range(3):
        led.record("w", False, 1)
    assert led.strikes("w") == 2  # 3 clean < 4
    led.record("w", False, 1)
    assert led.strikes("w") == 0  # the 4th clean one wipes
    led.record("w", True, 2)
    led.record("w", True, 2)
    assert not led.is_banned("w")


def test_a_flag_restarts_the_clean_run():
    led = ViolationLedger(ban_level=3, forgive_after=4)
    led.record("w", True, 0)
    for _ in range(3):
        led.record("w", False, 0)
    led.record("w", True, 0)  # clean run back to 0 before it reached 4
    for _ in range(3):
        led.record("w", False, 0)
    assert led.strikes("w") == 2
    assert led.record("w", True, 9)
    assert led.banned() == {"w": 9}


def test_workers_are_independent():
    led = ViolationLedger(ban_level=2, forgive_after=10)
    led.record("a", True, 0)
    led.record("b", True, 0)
    assert not led.is_banned("a") and not led.is_banned("b")
    assert led.record("a", True, 1) and not led.is_banned("b")


def test_state_round_trip_and_validation():
    led = ViolationLedger(ban_level=2, forgive_after=10)
    led.record("a", True, 0)
    led.record("a", True, 3)
    other = ViolationLedger(1, 1)
    other.load_state_dict(led.state_dict())
    assert other.banned() == {"a": 3} and other.ban_level == 2
    with pytest.raises(ValueError):
        ViolationLedger(0, 10)
