"""The validator: blame goes to the sender, taint screens without blame, drift is not blamed, state survives."""

import numpy as np
import pytest
import torch

from sentinel.config import ConfigError, SentinelConfig
from sentinel.validator import Validator, blamed_stage

D = 16


def pairs(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ref = torch.randn(2, 8, D, generator=g) + torch.linspace(-1, 1, D)
        yield ref + 0.3 * torch.randn(2, 8, D, generator=g), ref


def warmed(**kw) -> Validator:
    v = Validator(SentinelConfig(**kw))
    for i, (out, ref) in enumerate(pairs(0, 40)):
        v.check(out, boundary=1, direction="forward", sender=f"w{i % 4}", step=0, reference=ref, warmup=True)
    v.end_step(0)
    return v


def test_blame_goes_to_the_sender():
    assert blamed_stage(3, "forward") == 3
    assert blamed_stage(3, "backward") == 4


def test_flags_strike_at_end_of_step_and_ban():
    v = warmed(ban_level=2)
    out, ref = next(pairs(1, 1))
    for step in (1, 2):
        res = v.check(out * 0, boundary=1, direction="forward", sender="bad", step=step, reference=ref)
        assert res.tainted and res.blamed and res.tensor is not None
        assert torch.isfinite(res.tensor).all() and not torch.equal(res.tensor, out * 0)
        assert v.ledger.strikes("bad") == step - 1  # blame is settled at the end of the step
        banned = v.end_step(step)
    assert banned == ["bad"] and v.ledger.is_banned("bad")


def test_tainted_microbatch_is_screened_not_blamed():
    v = warmed()
    out, ref = next(pairs(2, 1))
    res = v.check(out * 0, boundary=1, direction="forward", sender="victim", step=1, reference=ref, tainted=True)
    assert res.tainted and not res.blamed  # still replaced, nobody blamed
    assert v.end_step(1) == [] and v.ledger.strikes("victim") == 0


@pytest.mark.parametrize("level", [0.0, 1.0])
def test_a_tainted_microbatch_that_passes_is_learnt_from_with_learn_tainted(level):
    """A screened tensor that passes the fences updates the baseline with learn_tainted (0.25 by default, 0 off) at a
    monitor with no clean traffic since the warm-up; one that crosses them does not, and neither is ever blamed."""
    v = warmed(learn_tainted=level)
    mon = v.monitor(1, "forward")
    before = mon.baseline.mean.copy()
    out, ref = next(pairs(2, 1))
    res = v.check(out, boundary=1, direction="forward", sender="w0", step=1, reference=ref, tainted=True)
    assert not res.tainted and not res.blamed
    assert (not np.array_equal(mon.baseline.mean, before)) is bool(level)
    after = mon.baseline.mean.copy()
    res = v.check(out * 0, boundary=1, direction="forward", sender="w0", step=1, reference=ref, tainted=True)
    assert res.tainted and not res.blamed and np.array_equal(mon.baseline.mean, after)
    assert v.end_step(1) == [] and v.ledger.strikes("w0") == 0


def test_learn_tainted_learns_only_at_a_monitor_starved_of_clean_traffic():
    """At 0.25: with 3 clean checks and 2 screened in the drift window (clean 3 of 5) a screened tensor is not learnt
    from; once the clean ones have left the window and screened ones make up the traffic, it is. The counts survive
    a state round trip."""
    v = warmed(learn_tainted=0.25)
    mon = v.monitor(1, "forward")
    key = (1, "forward")
    items = list(pairs(3, 12))
    for out, ref in items[:3]:
        assert not v.check(out, boundary=1, direction="forward", sender="w1", step=1, reference=ref).tainted
    v.end_step(1)
    before = mon.baseline.mean.copy()
    for out, ref in items[3:5]:
        v.check(out, boundary=1, direction="forward", sender="w2", step=2, reference=ref, tainted=True)
    assert np.array_equal(mon.baseline.mean, before) and not v._starved(key, 2)
    v.end_step(2)
    w = Validator(v.config)
    w.load_state_dict(v.state_dict())
    assert w.window_counts[key] == v.window_counts[key] == {1: [3, 0, 0], 2: [0, 0, 2]}
    step = 1 + v.config.drift_steps  # step 1's clean checks have left the window
    for out, ref in items[5:7]:
        w.check(out, boundary=1, direction="forward", sender="w2", step=step, reference=ref, tainted=True)
    assert w._starved(key, step) and not np.array_equal(w.monitor(1, "forward").baseline.mean, before)
    with pytest.raises(ConfigError):
        SentinelConfig(learn_tainted=1.5)


def test_warmup_never_blames_but_still_replaces_nan():
    v = Validator(SentinelConfig())
    out, ref = next(pairs(3, 1))
    out[0, 0, 0] = float("nan")
    res = v.check(out, boundary=2, direction="backward", sender="w", step=0, reference=ref, warmup=True)
    assert res.tainted and res.reason == "non-finite" and not res.blamed
    assert torch.isfinite(res.tensor).all()


def test_drop_mode_returns_no_tensor():
    v = warmed(replacement="drop")
    out, ref = next(pairs(4, 1))
    assert v.check(-out, boundary=1, direction="forward", sender="x", step=1, reference=ref).tensor is None


def test_mild_drift_of_a_majority_is_not_blamed():
    v = warmed(drift_senders=3)
    # everyone's residual update doubled at once: a mild shift (just over the fences), from all senders
    shifted = [(ref + 2.2 * (out - ref), ref) for out, ref in pairs(5, 8)]
    flagged = []
    for i, (out, ref) in enumerate(shifted):
        res = v.check(out, boundary=1, direction="forward", sender=f"w{i % 4}", step=1, reference=ref)
        if res.tainted:
            flagged.append(f"w{i % 4}")
            assert max(res.scores[m] / res.fences[m] for m in res.scores) < v.config.drift_max_excess
    assert len(set(flagged)) >= 3
    assert v.end_step(1) == []
    assert all(v.ledger.strikes(f"w{i}") == 0 for i in range(4))
    assert v.reanchors == 1


def test_drift_over_several_steps_is_not_blamed_but_gross_flags_are():
    v = warmed(drift_senders=3, drift_steps=4)
    shifted = [(ref + 2.2 * (out - ref), ref) for out, ref in pairs(6, 12)]
    for step, (out, ref) in enumerate(shifted[:2], start=1):  # one sender flagged per step: not yet a majority
        v.check(out, boundary=1, direction="forward", sender=f"w{step}", step=step, reference=ref)
        v.end_step(step)
    out, ref = shifted[2]
    v.check(out, boundary=1, direction="forward", sender="w3", step=3, reference=ref)
    v.check(out * 0, boundary=1, direction="forward", sender="bad", step=3, reference=ref)  # gross: never drift
    v.end_step(3)
    assert v.reanchors == 1 and v.ledger.strikes("w3") == 0 and v.ledger.strikes("bad") == 1


def test_a_minority_attacker_is_not_mistaken_for_drift():
    v = warmed(drift_senders=3, strikes_per_step=0)  # one strike per flag
    for out, ref in pairs(7, 4):
        v.check(out * 0, boundary=1, direction="forward", sender="a", step=1, reference=ref)
        v.check(out * 0, boundary=1, direction="forward", sender="b", step=1, reference=ref)
    v.end_step(1)
    assert v.ledger.strikes("a") == 4 and v.ledger.strikes("b") == 4 and v.reanchors == 0


def test_strikes_per_step_caps_a_workers_strikes_in_one_step():
    v = warmed(strikes_per_step=1, ban_level=3)
    for step in (1, 2, 3):
        for out, ref in pairs(7 + step, 3):  # three flagged tensors from "a" in each step
            assert v.check(out * 0, boundary=1, direction="forward", sender="a", step=step, reference=ref).tainted
        banned = v.end_step(step)
        assert v.ledger.strikes("a") == step  # one strike per step, however many flags
        assert banned == (["a"] if step == 3 else [])
    with pytest.raises(ConfigError):
        SentinelConfig(strikes_per_step=-1)


def test_state_round_trip():
    v = warmed()
    w = Validator(SentinelConfig())
    w.load_state_dict(v.state_dict())
    out, ref = next(pairs(8, 1))
    a = v.check(out, boundary=1, direction="forward", sender="w", step=1, reference=ref)
    b = w.check(out, boundary=1, direction="forward", sender="w", step=1, reference=ref)
    assert a.tainted == b.tainted and a.scores == b.scores



@pytest.mark.parametrize("active_majority", [False, True])
def test_drift_active_majority_counts_only_senders_still_active(active_majority):
    """Two senders at a monitor, drift needs 2. Once "bad" is banned, the lone honest sender's mild drift is drift
    with drift_active_majority (a majority of the 1 active sender), and a strike without it. (The warm-up's senders,
    last checked at step 0, are no longer active at step 50.)"""
    v = warmed(drift_senders=2, ban_level=1, drift_active_majority=active_majority, small_stage_senders=0)
    out, ref = next(pairs(9, 1))
    v.check(out, boundary=1, direction="forward", sender="honest", step=50, reference=ref)
    v.check(out * 0, boundary=1, direction="forward", sender="bad", step=50, reference=ref)  # gross: banned at once
    assert v.end_step(50) == ["bad"]
    shifted, ref = next(pairs(10, 1))
    assert v.check(ref + 2.2 * (shifted - ref), boundary=1, direction="forward", sender="honest", step=51,
                   reference=ref).tainted  # fmt: skip
    v.end_step(51)
    assert v.ledger.is_banned("honest") is not active_majority
    assert v.reanchors == (1 if active_majority else 0)


@pytest.mark.parametrize("active_majority", [False, True])
def test_a_stage_whose_attackers_were_banned_can_still_drift_by_default(active_majority):
    """A stage of 5 replicas (not small) whose 2 attackers were banned: its 3 honest replicas are what is left, and 2
    of them drifting mildly are a majority of them (drift_active_majority, the default). Counting the banned among
    the senders, drift would need 3 of 5, all 3 honest replicas within drift_steps steps; at the paper's 16 x 11
    with 8 micro-batches a step that banned every honest replica of a stage whose 5 attackers were out."""
    v = Validator(SentinelConfig(ban_level=1, drift_active_majority=active_majority))
    for i, (out, ref) in enumerate(pairs(0, 40)):
        v.check(out, boundary=1, direction="forward", sender=f"w{i % 5}", step=0, reference=ref, warmup=True)
    v.end_step(0)
    key = (1, "forward")
    out, ref = next(pairs(1, 1))
    for bad in ("w3", "w4"):
        assert v.check(out * 0, boundary=1, direction="forward", sender=bad, step=1, reference=ref).tainted
    assert sorted(v.end_step(1)) == ["w3", "w4"]
    assert not v._small_stage(key, 2) and v._drift_threshold(key, 2) == (2 if active_majority else 3)
    for sender, (out, ref) in zip(("w0", "w1"), pairs(10, 2)):
        res = v.check(ref + 2.2 * (out - ref), boundary=1, direction="forward", sender=sender, step=2, reference=ref)
        assert res.tainted and max(res.scores[m] / res.fences[m] for m in res.scores) < v.config.drift_max_excess
    assert v.end_step(2) == ([] if active_majority else ["w0", "w1"])
    assert v.reanchors == (1 if active_majority else 0)


@pytest.mark.parametrize("drift_senders", [0, 3])
def test_auto_drift_senders_is_a_majority_of_the_senders_seen(drift_senders):
    """A stage of 2 replicas, both drifting mildly: with drift_senders 0 (auto, the default) a majority of the 2
    senders seen is 2, so it is drift; a fixed 3 can never be reached by 2 replicas, and both are struck."""
    v = Validator(SentinelConfig(drift_senders=drift_senders, small_stage_senders=0, drift_active_majority=False))
    for i, (out, ref) in enumerate(pairs(0, 40)):
        v.check(out, boundary=1, direction="forward", sender=f"r{i % 2}", step=0, reference=ref, warmup=True)
    v.end_step(0)
    assert v._drift_threshold((1, "forward"), 1) == (2 if drift_senders == 0 else 3)
    flagged = set()
    for i, (out, ref) in enumerate(pairs(5, 8)):
        sender = f"r{i % 2}"
        if v.check(ref + 2.2 * (out - ref), boundary=1, direction="forward", sender=sender, step=1,
                   reference=ref).tainted:  # fmt: skip
            flagged.add(sender)
    assert flagged == {"r0", "r1"}
    v.end_step(1)
    struck = [v.ledger.strikes(w) for w in ("r0", "r1")]
    assert (struck == [0, 0] and v.reanchors == 1) if drift_senders == 0 else (min(struck) > 0 and v.reanchors == 0)


def test_auto_drift_senders_counts_recent_and_banned_senders():
    v = warmed(ban_level=1, small_stage_senders=0, drift_active_majority=False)  # the auto threshold alone
    key = (1, "forward")
    assert v._drift_threshold(key, 1) == 3  # 4 seen: 4 // 2 + 1
    assert v._drift_threshold(key, 100) == 2  # none seen within the last 16 steps: at least 2
    out, ref = next(pairs(9, 1))
    v.check(out * 0, boundary=1, direction="forward", sender="w0", step=100, reference=ref)
    for w in ("w1", "w2", "w3"):
        v.check(out, boundary=1, direction="forward", sender=w, step=100, reference=ref)
    assert v.end_step(100) == ["w0"]
    assert v._drift_threshold(key, 200) == 2  # only the banned w0 still counts: 1 // 2 + 1, at least 2
    assert v._drift_threshold(key, 101) == 3  # w0 (banned) and w1..w3 (recent)
    with pytest.raises(ConfigError):
        SentinelConfig(drift_senders=1)


def _gross_drift(v: Validator, seed: int, n: int, factor: float = 6.0):
    """Everyone's residual update grown ``factor`` times: past drift_max_excess from the old baseline, but the
    tensors agree with one another."""
    return [(ref + factor * (out - ref), ref) for out, ref in pairs(seed, n)]


@pytest.mark.parametrize("agreement", [False, True])
def test_drift_agreement_forgives_a_majority_past_a_stale_baseline(agreement):
    v = warmed(drift_senders=3, drift_agreement=agreement, ban_level=10)
    excesses = []
    for step, chunk in ((1, range(0, 2)), (2, range(2, 4))):
        for i in chunk:
            out, ref = _gross_drift(v, 20, 4)[i]
            res = v.check(out, boundary=1, direction="forward", sender=f"w{i}", step=step, reference=ref)
            assert res.tainted
            excesses.append(max(res.scores[m] / res.fences[m] for m in res.scores))
        v.end_step(step)
    assert min(excesses) > v.config.drift_max_excess  # every flag is gross: the plain guard never calls it drift
    strikes = [v.ledger.strikes(f"w{i}") for i in range(4)]
    if agreement:  # step 2 completes 3+ agreeing senders: re-anchored, that step's flags forgiven
        assert v.reanchors == 1 and strikes == [1, 1, 0, 0]
        out, ref = _gross_drift(v, 21, 1)[0]  # the new normal is accepted now
        assert not v.check(out, boundary=1, direction="forward", sender="w0", step=3, reference=ref).tainted
    else:
        assert v.reanchors == 0 and strikes == [1, 1, 1, 1]


def test_drift_agreement_strikes_what_disagrees_and_needs_a_majority():
    v = warmed(drift_senders=3, drift_agreement=True, ban_level=10)
    # two attackers sending the same gross tensor agree with each other, but they are only two senders
    for step in (1, 2):
        for out, ref in pairs(30 + step, 2):
            v.check(out * 0, boundary=1, direction="forward", sender="a", step=step, reference=ref)
            v.check(out * 0, boundary=1, direction="forward", sender="b", step=step, reference=ref)
        v.end_step(step)
    assert v.reanchors == 0 and v.ledger.strikes("a") == 4 and v.ledger.strikes("b") == 4
    # three honest senders drifting together, an attacker among them: the drift is forgiven, the attack is not
    for i, (out, ref) in enumerate(_gross_drift(v, 40, 3)):
        v.check(out, boundary=1, direction="forward", sender=f"w{i}", step=3, reference=ref)
        v.check(ref * 0 + 5.0, boundary=1, direction="forward", sender="a", step=3, reference=ref)
    v.end_step(3)
    assert v.reanchors == 1 and all(v.ledger.strikes(f"w{i}") == 0 for i in range(3))
    assert v.ledger.strikes("a") == 7


def test_drift_agreement_window_survives_a_state_round_trip():
    def run(round_trip: bool) -> tuple[int, list[int]]:
        v = warmed(drift_senders=3, drift_agreement=True, ban_level=10)
        drift = _gross_drift(v, 50, 4)
        for i in (0, 1):
            v.check(drift[i][0], boundary=1, direction="forward", sender=f"w{i}", step=1, reference=drift[i][1])
        v.end_step(1)
        if round_trip:
            w = Validator(v.config)
            w.load_state_dict(v.state_dict())
            v = w
        for i in (2, 3):
            v.check(drift[i][0], boundary=1, direction="forward", sender=f"w{i}", step=2, reference=drift[i][1])
        v.end_step(2)
        return v.reanchors, [v.ledger.strikes(f"w{i}") for i in range(4)]

    assert run(True) == run(False) == (1, [1, 1, 0, 0])


def test_drift_defer_holds_mild_flags_until_the_drift_window_has_passed():
    """With ``drift_defer``, a mild flag strikes only ``drift_steps`` steps later, unless drift is recognised at its
    monitor in the meantime (then it is forgiven); a gross flag strikes at once. The held flags survive a restart."""
    v = warmed(drift_senders=3, drift_steps=3, drift_defer=True)
    shifted = [(ref + 2.2 * (out - ref), ref) for out, ref in pairs(6, 12)]
    out, ref = shifted[0]
    assert v.check(out, boundary=1, direction="forward", sender="w1", step=1, reference=ref).tainted
    v.check(out * 0, boundary=1, direction="forward", sender="bad", step=1, reference=ref)  # gross
    v.end_step(1)
    assert v.ledger.strikes("bad") == 1 and v.ledger.strikes("w1") == 0  # w1's mild flag is held
    assert v.touched == {"w1", "bad"} and len(v.deferred) == 1
    w = Validator(v.config)  # a restart in between loses nothing
    w.load_state_dict(v.state_dict())
    assert w.deferred == v.deferred
    for step in (2, 3):  # one more mild flag from w2, then none: not a majority within the window
        if step == 2:
            out, ref = shifted[1]
            assert w.check(out, boundary=1, direction="forward", sender="w2", step=2, reference=ref).tainted
        w.end_step(step)
    assert w.ledger.strikes("w1") == 1 and w.ledger.strikes("w2") == 0  # w1's window (steps 1-3) has passed
    w.end_step(4)
    assert w.ledger.strikes("w2") == 1 and not w.deferred

    # drift recognised in time forgives what was held: w1, w2, w3 flagged mildly in consecutive steps
    v = warmed(drift_senders=3, drift_steps=3, drift_defer=True)
    for step, (out, ref) in enumerate(shifted[:3], start=1):
        assert v.check(out, boundary=1, direction="forward", sender=f"w{step}", step=step, reference=ref).tainted
        v.end_step(step)
    assert v.reanchors == 1 and not v.deferred
    assert all(v.ledger.strikes(f"w{i}") == 0 for i in (1, 2, 3))
    v.end_step(5)
    assert all(v.ledger.strikes(f"w{i}") == 0 for i in (1, 2, 3))


@pytest.mark.parametrize("min_fraction", [0.0, 0.25])
def test_rare_outliers_from_a_majority_of_senders_are_not_drift(min_fraction):
    """Two senders' gross tensors that agree with each other, among 30 clean ones at the monitor: a majority of 3
    senders, so without the fraction gate drift_agreement re-anchored the baseline on one of them (it did so in tiny
    meshes, on honest first-token gradient outliers, and the next step's whole traffic was then flagged)."""
    v = warmed(drift_senders=2, drift_agreement=True, ban_level=10, drift_min_fraction=min_fraction)
    clean = list(pairs(60, 30))
    outliers = _gross_drift(v, 61, 2)
    for i, (out, ref) in enumerate(clean):
        assert not v.check(out, boundary=1, direction="forward", sender=f"w{i % 3}", step=1, reference=ref).tainted
    for i, (out, ref) in enumerate(outliers):
        assert v.check(out, boundary=1, direction="forward", sender=f"w{i}", step=1, reference=ref).tainted
    v.end_step(1)
    strikes = [v.ledger.strikes(f"w{i}") for i in range(2)]
    if min_fraction:  # 2 flagged of 32 checked: outliers, struck; the baseline stays
        assert v.reanchors == 0 and strikes == [1, 1]
        out, ref = next(pairs(62, 1))
        assert not v.check(out, boundary=1, direction="forward", sender="w2", step=2, reference=ref).tainted
    else:
        assert v.reanchors == 1 and strikes == [0, 0]


def test_drift_fraction_gate_counts_the_window_and_survives_a_state_round_trip():
    """Flagged tensors that are a large enough part of the window's traffic are drift again; the counts of the window
    are part of the saved state (lost, the 3 gross flags below would be 3 of 3 checked, and drift)."""
    def run(clean: int, round_trip: bool) -> tuple[int, list[int]]:
        v = warmed(drift_senders=2, drift_agreement=True, ban_level=10, drift_min_fraction=0.25, drift_steps=2)
        for i, (out, ref) in enumerate(pairs(70, clean)):  # step 1: clean traffic
            v.check(out, boundary=1, direction="forward", sender=f"w{i % 3}", step=1, reference=ref)
        v.end_step(1)
        if round_trip:
            w = Validator(v.config)
            w.load_state_dict(v.state_dict())
            v = w
        for i, (out, ref) in enumerate(_gross_drift(v, 71, 3)):  # step 2: 3 agreeing gross flags
            assert v.check(out, boundary=1, direction="forward", sender=f"w{i}", step=2, reference=ref).tainted
        v.end_step(2)
        return v.reanchors, [v.ledger.strikes(f"w{i}") for i in range(3)]

    assert run(6, False) == (1, [0, 0, 0])  # 3 of 9 checked: drift
    assert run(12, True) == run(12, False) == (0, [1, 1, 1])  # 3 of 15: outliers
    with pytest.raises(ConfigError):
        SentinelConfig(drift_min_fraction=1.5)


def test_a_banned_senders_tensors_are_never_drift_evidence_nor_an_anchor():
    """A 2-replica stage with drift_active_majority (the demo's setting): once the attacker is banned, one honest
    sender is a majority of the active ones. The attacker's flagged zeros were still in the drift window, agreed with
    each other, and drift_agreement re-anchored the baseline on them (seen in a loopback swarm trace: every honest
    tensor was then flagged, and the honest replica banned)."""
    v = Validator(SentinelConfig(drift_active_majority=True, drift_agreement=True, ban_level=2))
    for i, (out, ref) in enumerate(pairs(80, 40)):
        sender = ("good", "bad")[i % 2]
        v.check(out, boundary=1, direction="forward", sender=sender, step=0, reference=ref, warmup=True)
    v.end_step(0)
    for out, ref in pairs(81, 2):
        assert v.check(out * 0, boundary=1, direction="forward", sender="bad", step=1, reference=ref).tainted
    assert v.end_step(1) == ["bad"]
    out, ref = _gross_drift(v, 82, 1)[0]  # the honest replica's traffic moved past the old baseline
    assert v.check(out, boundary=1, direction="forward", sender="good", step=2, reference=ref).tainted
    v.end_step(2)
    assert float(v.monitor(1, "forward").baseline.std.sum()) > 0  # not re-anchored on the banned sender's zeros
    out, ref = _gross_drift(v, 83, 1)[0]
    assert not v.check(out, boundary=1, direction="forward", sender="good", step=3, reference=ref).tainted


def _sibling_step(v: Validator, sibling_factor: float, factor: float, step: int = 1, sibling_step: int = 1):
    """w0 sends a tensor shifted by ``sibling_factor`` (accepted) at ``sibling_step``, then w1 one shifted by
    ``factor`` at ``step``; the shift scales the residual update, as honest drift does."""
    (out0, ref0), (out1, ref1) = pairs(5, 2)
    res0 = v.check(ref0 + sibling_factor * (out0 - ref0), boundary=1, direction="forward", sender="w0",
                   step=sibling_step, reference=ref0)  # fmt: skip
    assert not res0.tainted
    if sibling_step != step:
        v.end_step(sibling_step)
    return v.check(ref1 + factor * (out1 - ref1), boundary=1, direction="forward", sender="w1", step=step,
                   reference=ref1)  # fmt: skip


@pytest.mark.parametrize("peer", [False, True])
def test_drift_peer_forgives_a_lone_mild_flag_that_a_sibling_shares(peer):
    """Two replicas drift together; w0's tensor stays just inside the fences, w1's crosses them mildly. With
    drift_peer, w1's tensor is within the fences of w0's accepted one: replaced, but not struck."""
    v = warmed(drift_senders=2, drift_peer=peer)
    res = _sibling_step(v, 1.8, 2.2)
    assert res.tainted and res.blamed and res.tensor is not None  # replaced either way
    assert max(res.scores[m] / res.fences[m] for m in res.scores) < v.config.drift_max_excess  # mild
    v.end_step(1)
    assert v.ledger.strikes("w1") == (0 if peer else 1)
    assert v.peer_forgiven == (1 if peer else 0) and v.reanchors == 0


def test_drift_peer_strikes_what_no_sibling_shares():
    # a mild shift that the sibling's tensor does not show: as far from it as from the baseline
    v = warmed(drift_senders=2, drift_peer=True)
    assert _sibling_step(v, 1.0, 2.2).tainted
    v.end_step(1)
    assert v.ledger.strikes("w1") == 1 and v.peer_forgiven == 0


@pytest.mark.parametrize("margin", [1.0, 0.7])
def test_drift_peer_can_forgive_a_mild_shift_that_the_sibling_lacks(margin):
    """The rule's known cost, pinned so that a change to it is seen: one tensor compared with another carries the
    noise of both, so a mild shift (just over the fences) can fall within the fences of an unshifted sibling's
    tensor and go unstruck. It is still replaced. This is how drift_peer let mild attackers keep their strikes down
    (README, "Drift guard"), and why it is off by default. Narrowed to drift_peer_margin (0.7, the default) of the
    fences, this shift is struck; the test above shows a shift the sibling shares still forgiven."""
    v = warmed(drift_senders=2, drift_peer=True, drift_peer_margin=margin)
    res = _sibling_step(v, 1.0, 2.1)
    assert res.tainted and res.tensor is not None
    v.end_step(1)
    forgiven = margin == 1.0
    assert v.ledger.strikes("w1") == (0 if forgiven else 1) and v.peer_forgiven == (1 if forgiven else 0)


def test_drift_peer_never_forgives_a_gross_flag():
    v = warmed(drift_senders=2, drift_peer=True)
    (out, ref), _ = pairs(5, 2)
    v.check(ref + 1.8 * (out - ref), boundary=1, direction="forward", sender="w0", step=1, reference=ref)
    v.check(out * 0, boundary=1, direction="forward", sender="w1", step=1, reference=ref)
    v.end_step(1)
    assert v.ledger.strikes("w1") == 1 and v.peer_forgiven == 0


def test_drift_peer_ignores_stale_and_banned_siblings():
    v = warmed(drift_senders=2, drift_peer=True, drift_steps=2)
    assert _sibling_step(v, 1.8, 2.2, step=3, sibling_step=1).tainted  # w0's tensor is 2 steps old: out of window
    v.end_step(3)
    assert v.ledger.strikes("w1") == 1
    v = warmed(drift_senders=2, drift_peer=True, ban_level=2)
    for out, ref in pairs(9, 2):
        v.check(out * 0, boundary=1, direction="forward", sender="w0", step=1, reference=ref)
    v.end_step(1)
    assert v.ledger.is_banned("w0")
    assert _sibling_step(v, 1.8, 2.2, step=2, sibling_step=2).tainted  # as in the test above, but w0 is banned
    v.end_step(2)
    assert v.ledger.strikes("w1") == 1 and v.peer_forgiven == 0


def test_drift_peer_state_survives_a_round_trip():
    v = warmed(drift_senders=2, drift_peer=True)
    (out, ref), (out1, ref1) = pairs(5, 2)
    v.check(ref + 1.8 * (out - ref), boundary=1, direction="forward", sender="w0", step=1, reference=ref)
    v.end_step(1)
    w = Validator(SentinelConfig(drift_senders=2, drift_peer=True))
    w.load_state_dict(v.state_dict())
    assert w.last_accepted.keys() == v.last_accepted.keys()
    assert w.check(ref1 + 2.2 * (out1 - ref1), boundary=1, direction="forward", sender="w1", step=2,
                   reference=ref1).tainted  # fmt: skip
    w.end_step(2)
    assert w.ledger.strikes("w1") == 0 and w.peer_forgiven == 1


def _two_senders(**kw) -> Validator:
    """A monitor warmed up on the traffic of 2 senders only (a stage of 2 replicas)."""
    v = Validator(SentinelConfig(drift_senders=2, **kw))
    for i, (out, ref) in enumerate(pairs(0, 40)):
        v.check(out, boundary=1, direction="forward", sender=f"w{i % 2}", step=0, reference=ref, warmup=True)
    v.end_step(0)
    return v


@pytest.mark.parametrize("small", [0, 3])
def test_small_stage_applies_drift_peer_and_active_majority_by_default(small):
    """At a monitor with at most small_stage_senders senders (3 by default), drift_peer applies although it is off:
    w1's lone mild flag, which its sibling w0's accepted tensor shares, is not struck. With 0 it is. The same for
    drift_active_majority, turned off here."""
    v = _two_senders(small_stage_senders=small, drift_active_majority=False)
    assert not v.config.drift_peer
    assert v._small_stage((1, "forward"), 1) is bool(small)
    res = _sibling_step(v, 1.8, 2.2)
    assert res.tainted and res.blamed and res.tensor is not None  # replaced either way
    v.end_step(1)
    assert v.ledger.strikes("w1") == (0 if small else 1)
    assert v.peer_forgiven == (1 if small else 0)
    # drift_active_majority: once w0 is banned, the lone active sender w1 is a majority at a small stage
    for _ in range(v.config.ban_level):
        v.ledger.record("w0", True, 2)
    assert v.ledger.is_banned("w0")
    assert v._drift_threshold((1, "forward"), 2) == (1 if small else 2)


def test_small_stage_counts_the_senders_seen_banned_included():
    v = warmed()  # w0..w3 seen at step 0: not small
    key = (1, "forward")
    assert v._senders_seen(key, 1) == 4 and not v._small_stage(key, 1)
    assert v._senders_seen(key, 17) == 0 and not v._small_stage(key, 17)  # nobody seen within 16 steps
    out, ref = next(pairs(9, 1))
    for w in ("a", "b", "c"):
        v.check(out, boundary=1, direction="forward", sender=w, step=20, reference=ref)
    v.end_step(20)
    assert v._senders_seen(key, 21) == 3 and v._small_stage(key, 21)
    v.check(out * 0, boundary=1, direction="forward", sender="d", step=21, reference=ref)
    v.end_step(21)  # a gross flag: d struck
    assert v._senders_seen(key, 22) == 4 and not v._small_stage(key, 22)
    with pytest.raises(ConfigError):
        SentinelConfig(small_stage_senders=-1)


def test_a_lone_sender_never_re_anchors_the_baseline_on_its_own_gross_traffic():
    """A stage of one replica is small, so its drift threshold is 1 (a majority of 1 active sender). Its zeros agree
    with each other, but drift_agreement, which forgives tensors however far from the baseline, needs 2 senders
    unless a ban left this one alone: the zeros are struck, and their sender banned."""
    v = Validator(SentinelConfig(ban_level=2))
    for out, ref in pairs(80, 40):
        v.check(out, boundary=1, direction="forward", sender="only", step=0, reference=ref, warmup=True)
    v.end_step(0)
    key = (1, "forward")
    assert v._small_stage(key, 1) and v._drift_threshold(key, 1) == 1 and v._agreement_threshold(key, 1) == 2
    for out, ref in pairs(81, 2):
        assert v.check(out * 0, boundary=1, direction="forward", sender="only", step=1, reference=ref).tainted
    assert v.end_step(1) == ["only"]
    assert v.reanchors == 0


def _wide_input(v: Validator, factor: float, step: int = 1, sender: str = "w1"):
    """``sender`` does a stage's ordinary work (its input plus the usual update) on an input ``factor`` times wider
    than the stream's inputs: an unusual micro-batch, not an unusual stage."""
    ((out, ref),) = pairs(5, 1)
    return v.check(factor * ref + (out - ref), boundary=1, direction="forward", sender=sender, step=step,
                   reference=factor * ref)  # fmt: skip


@pytest.mark.parametrize("level", [0.0, 0.75])
def test_input_explains_does_not_strike_a_flag_whose_input_was_as_unusual(level):
    """An input 2-3x wider than usual makes the output of an honest stage flag (over 3x its fences at 3x); the input
    itself was as far from its own stream, so with input_explains the tensor is replaced but nobody is struck."""
    for factor in (2.0, 3.0):
        v = warmed(input_explains=level)
        res = _wide_input(v, factor)
        assert res.tainted and res.tensor is not None and res.blamed
        assert res.input_excess > 1.5
        v.end_step(1)
        assert v.ledger.strikes("w1") == (1 if not level else 0)
        assert v.input_forgiven == (1 if level else 0)


def test_input_explains_strikes_what_the_input_does_not_explain():
    """With a typical input, a mild flag (an update 2.2x its usual size) and a gross one (the output doubled) are
    struck. An unusual input does not excuse an output far beyond what it explains (zeros), nor a malformed one."""
    v = warmed()
    mild = _sibling_step(v, 1.0, 2.2)
    assert mild.tainted and mild.input_excess < v.config.input_explains
    assert max(mild.scores[m] / mild.fences[m] for m in mild.scores) < v.config.drift_max_excess
    (out, ref), (out1, ref1) = pairs(5, 2)
    assert v.check(2 * out, boundary=1, direction="forward", sender="w2", step=1, reference=ref).tainted
    v.end_step(1)
    assert v.ledger.strikes("w1") == 1 and v.ledger.strikes("w2") == 1 and v.input_forgiven == 0
    v = warmed()
    res = v.check(0 * out, boundary=1, direction="forward", sender="w1", step=1, reference=2 * ref)
    assert res.tainted and res.input_excess > 1.5
    assert max(res.scores[m] / res.fences[m] for m in res.scores) > v.config.drift_max_excess * res.input_excess
    nan = out1.clone()
    nan[0, 0, 0] = float("nan")
    assert v.check(nan, boundary=1, direction="forward", sender="w2", step=1, reference=2 * ref1).tainted
    v.end_step(1)
    assert v.ledger.strikes("w1") == 1 and v.ledger.strikes("w2") == 1 and v.input_forgiven == 0


def test_input_excess_of_an_unsettled_flag_survives_a_state_round_trip():
    v = warmed()
    res = _wide_input(v, 2.0)
    clone = Validator(v.config)
    clone.load_state_dict(v.state_dict())
    assert clone.pending[0][4].input_excess == pytest.approx(res.input_excess)
    clone.end_step(1)
    assert clone.ledger.strikes("w1") == 0 and clone.input_forgiven == 1


@pytest.mark.parametrize("cap", [0, 1])
def test_small_stage_mild_strikes_caps_a_lone_replicas_step(cap):
    """A stage of 2 replicas drifts and the trainer routes a whole step to one of them: its 4 mild flags (no sibling
    tensor of that step to compare with) were 4 strikes, a ban at ban level 3. With small_stage_mild_strikes 1 they
    are one strike; the tensors are replaced all the same, and a gross flag of the same step still strikes."""
    v = _two_senders(small_stage_mild_strikes=cap, ban_level=3)
    for out, ref in pairs(11, 4):
        res = v.check(ref + 2.8 * (out - ref), boundary=1, direction="forward", sender="w1", step=1, reference=ref)
        assert res.tainted and res.blamed and res.tensor is not None
        assert max(res.scores[m] / res.fences[m] for m in res.scores) < v.config.drift_max_excess  # mild
    banned = v.end_step(1)
    assert v.ledger.strikes("w1") == (1 if cap else 4) and banned == ([] if cap else ["w1"])
    if cap:
        out, ref = next(pairs(12, 1))
        for _ in range(2):  # gross flags are not capped
            assert v.check(out * 0, boundary=1, direction="forward", sender="w1", step=2, reference=ref).tainted
        assert v.end_step(2) == ["w1"]
    with pytest.raises(ConfigError):
        SentinelConfig(small_stage_mild_strikes=-1)
