"""The monitor: warm-up, fences, flagged tensors never update the baseline, hard checks, replacement, state."""

import numpy as np
import pytest
import torch

from sentinel.config import ConfigError, SentinelConfig
from sentinel.monitor import BoundaryMonitor, InvalidTensor, TukeyFence

D = 16


def stream(seed: int, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ref = torch.randn(4, 8, D, generator=g) + torch.linspace(-1, 1, D)
        out = ref + 0.3 * torch.randn(4, 8, D, generator=g)
        yield out, ref


def warmed(config: SentinelConfig | None = None, direction: str = "forward") -> BoundaryMonitor:
    mon = BoundaryMonitor(config or SentinelConfig(), direction, boundary=1)
    for out, ref in stream(0, 40):
        assert not mon.observe(out, ref, detect=False).flagged
    return mon


def test_tukey_fence_arithmetic():
    f = TukeyFence(window=8, k=2.0, min_iqr_fraction=0.0)
    assert f.fence() == float("inf")
    for v in [1, 2, 3, 4, 5]:
        f.add(v)
    # numpy percentiles of 1..5: q1=2, q3=4 -> 4 + 2*2
    assert f.fence() == pytest.approx(8.0)
    g = TukeyFence(window=4, k=3.0, min_iqr_fraction=0.5)
    for v in [2, 2, 2, 2, 2, 100]:  # window keeps the last 4 values
        g.add(v)
    assert len(g) == 4
    h = TukeyFence(window=4, k=3.0, min_iqr_fraction=0.5, floor=10.0)
    for v in [1, 1, 1, 1]:
        h.add(v)
    assert h.fence() == 10.0  # flat window: 1 + 3 * 0.5 = 2.5, raised to the floor


def test_no_flags_during_warmup_or_before_min_window():
    mon = BoundaryMonitor(SentinelConfig(min_window=16), "forward", 1)
    for i, (out, ref) in enumerate(stream(0, 10)):
        assert not mon.observe(torch.zeros_like(out) if i > 3 else out, ref).flagged
    assert not mon.ready


def test_honest_traffic_is_accepted_and_attacks_flagged():
    mon = warmed()
    honest_flags = sum(mon.observe(out, ref).flagged for out, ref in stream(1, 64))
    assert honest_flags == 0
    out, ref = next(stream(2, 1))
    for attacked in (torch.zeros_like(out), -out, 3 * out, out + 3 * out.std(), torch.randn_like(out) * 10):
        assert mon.observe(attacked, ref).flagged


def test_flagged_tensors_never_update_the_baseline():
    mon = warmed()
    before = mon.baseline.clone()
    n, windows = mon.n_accepted, {m: list(f.values) for m, f in mon.fences.items()}
    out, ref = next(stream(3, 1))
    obs = mon.observe(out * 10, ref)
    assert obs.flagged
    assert mon.n_accepted == n
    assert np.array_equal(mon.baseline.mean, before.mean) and np.array_equal(mon.baseline.std, before.std)
    assert {m: list(f.values) for m, f in mon.fences.items()} == windows


def test_learn_false_screens_without_learning():
    mon = warmed()
    n = mon.n_accepted
    out, ref = next(stream(4, 1))
    assert not mon.observe(out, ref, learn=False).flagged
    assert mon.n_accepted == n


def test_non_finite_and_malformed_are_always_flagged():
    mon = BoundaryMonitor(SentinelConfig(), "backward", 0)
    out, ref = next(stream(0, 1))
    bad = out.clone()
    bad[0, 0, 0] = float("nan")
    assert mon.observe(bad, ref, detect=False).reason == "non-finite"
    bad[0, 0, 0] = float("inf")
    assert mon.observe(bad, ref).reason == "non-finite"
    assert torch.isfinite(out * 1e30).all() and mon.observe(out * 1e30, ref, detect=False).reason == "non-finite"
    assert mon.observe(out[:, :4], ref).reason == "shape"
    with pytest.raises(InvalidTensor):
        mon.observe(out.long(), ref)
    assert mon.baseline is None  # nothing was learned from any of it


def test_replacements_bypass_the_stage():
    mon = warmed()
    out, ref = next(stream(5, 1))
    rep = mon.replacement(out, ref)
    assert rep.shape == out.shape and torch.isfinite(rep).all()
    # forward: the input plus the typical residual update (here ~0): close to the input, token by token
    assert torch.allclose(rep, ref + torch.from_numpy(mon.baseline.residual), atol=1e-6)
    back = warmed(direction="backward")
    rep_b = back.replacement(out, ref)
    assert torch.allclose(rep_b / ref, torch.full_like(ref, rep_b[0, 0, 0].item() / ref[0, 0, 0].item()), atol=1e-4)
    assert back.replacement(out).shape == out.shape  # no reference: the EMA mean at every token


def test_state_round_trip():
    mon = warmed()
    clone = BoundaryMonitor(SentinelConfig(), "forward", 1)
    clone.load_state_dict(mon.state_dict())
    for out, ref in stream(6, 5):
        a, b = mon.observe(out, ref), clone.observe(out, ref)
        assert a.flagged == b.flagged and a.scores == pytest.approx(b.scores)


def test_input_excess_measures_the_reference_against_its_own_stream():
    """Every check with a reference also measures how far that reference (the stage's input) is from the references
    seen before (l1 and l2, over their own fences): ordinary inputs stay under 1, an input whose spread doubled (or
    whose features all shifted) is far over, whatever the checked tensor does. It survives a state round trip, and a
    state without it (older format) starts the input stream over."""
    mon = warmed()
    typical = [mon.observe(out, ref).input_excess for out, ref in stream(7, 20)]
    assert all(e is not None and e < 1 for e in typical)
    out, ref = next(stream(8, 1))
    wide = mon.observe(2 * out, 2 * ref)  # the stage did its ordinary work on an unusual input
    assert wide.input_excess > 2
    shifted = mon.observe(out + 1.0, ref + 1.0)
    assert shifted.input_excess > 2
    assert mon.observe(out, None).input_excess is None  # no reference, nothing to measure
    clone = BoundaryMonitor(SentinelConfig(), "forward", 1)
    clone.load_state_dict(mon.state_dict())
    assert clone.observe(2 * out, 2 * ref).input_excess == pytest.approx(mon.observe(2 * out, 2 * ref).input_excess)
    old = {k: v for k, v in mon.state_dict().items() if not k.startswith("input_")}
    fresh = BoundaryMonitor(SentinelConfig(), "forward", 1)
    fresh.load_state_dict(old)
    assert fresh.observe(out, ref).input_excess is None and fresh.input_baseline is not None


def test_config_validation():
    with pytest.raises(ConfigError):
        SentinelConfig(beta_forward=1.0)
    with pytest.raises(ConfigError):
        SentinelConfig(metrics=("l2", "nope"))
    with pytest.raises(ConfigError):
        SentinelConfig(combine="vote")
    with pytest.raises(ConfigError):
        SentinelConfig.from_dict({"fence": 3})
    for bad in ({"fit_every": 0}, {"fit_decay": 1.0}, {"fit_ridge": 0.0}, {"fit_tokens": 0}, {"fit_refit": 0},
                {"input_explains": -0.5}, {"drift_peer_margin": 0.0}, {"drift_peer_margin": 1.5}):
        with pytest.raises(ConfigError):
            SentinelConfig(**bad)
    assert SentinelConfig.from_dict(SentinelConfig().to_dict()) == SentinelConfig()


def test_sign_flip_is_measured_on_gradients_only_when_asked():
    """A gradient stream with a strong common mean (every feature sign-stable) whose mean then flips, watched by l2
    (blind to means) and sign_flip: flagged on sign_flip when it is measured on gradients (``sign_flip_backward``),
    accepted by default, where gradients have no sign_flip; activations keep theirs."""
    g = torch.Generator().manual_seed(0)
    direction = torch.linspace(0.5, 1.5, D) * torch.where(torch.arange(D) % 2 == 0, 1.0, -1.0)

    def grad(sign: float) -> torch.Tensor:
        return sign * direction + 0.5 * torch.randn(4, 8, D, generator=g)

    for sign_flip_backward, expect in ((True, True), (False, False)):
        config = SentinelConfig(metrics=("l2", "sign_flip"), sign_flip_backward=sign_flip_backward)
        mon = BoundaryMonitor(config, "backward", boundary=1)
        assert ("sign_flip" in mon.fences) is sign_flip_backward
        for _ in range(40):
            assert not mon.observe(grad(1.0), detect=False).flagged
        assert not any(mon.observe(grad(1.0)).flagged for _ in range(8))
        flipped = mon.observe(-direction + 0.5 * torch.randn(4, 8, D, generator=g))
        assert ("sign_flip" in flipped.scores) is sign_flip_backward
        assert flipped.flagged is expect
        if expect:
            assert flipped.reason == "distance:sign_flip" and flipped.scores["sign_flip"] == 1.0
    assert "sign_flip" in BoundaryMonitor(SentinelConfig(), "forward", boundary=1).fences
    restored = BoundaryMonitor(SentinelConfig(metrics=("l2", "sign_flip")), "backward", boundary=1)
    restored.load_state_dict(mon.state_dict())  # a state saved with gradient sign_flip (the loop's last monitor)
    assert set(restored.fences) == {"l2"} and len(restored.fences["l2"]) == len(mon.fences["l2"])
    with pytest.raises(ConfigError):  # would leave gradients with no distance at all
        SentinelConfig(metrics=("sign_flip",))
    assert SentinelConfig(metrics=("sign_flip",), sign_flip_backward=True).metrics_for("backward") == ("sign_flip",)


def test_a_lone_distance_flags_only_beyond_solo_excess():
    """With combine="any": two distances over their fences flag; one alone flags only beyond solo_excess x fence."""
    mon = BoundaryMonitor(SentinelConfig(solo_excess_backward=2.5), "backward", boundary=1)
    fences = {"l1": 1.0, "l2": 1.0, "gain": 1.0}
    assert mon.decide({"l1": 0.5, "l2": 2.4, "gain": 0.1}, fences) == (False, "")
    assert mon.decide({"l1": 0.5, "l2": 2.6, "gain": 0.1}, fences) == (True, "distance:l2")
    assert mon.decide({"l1": 1.1, "l2": 1.2, "gain": 0.1}, fences) == (True, "distance:l1,l2")
    forward = BoundaryMonitor(SentinelConfig(solo_excess_forward=1.0), "forward", boundary=1)
    assert forward.decide({"l1": 0.5, "l2": 1.01, "gain": 0.1}, fences) == (True, "distance:l2")  # plain OR
    with pytest.raises(ConfigError):
        SentinelConfig(solo_excess_backward=0.5)


def test_a_state_of_the_older_format_loads():
    """Before the residual mean moved into the baseline, states kept it beside it (``residual_mean``)."""
    mon = warmed()
    state = mon.state_dict()
    old = {**state, "baseline": {k: v for k, v in state["baseline"].items() if k != "residual"},
           "residual_mean": torch.from_numpy(mon.baseline.residual.copy())}  # fmt: skip
    loaded = BoundaryMonitor(SentinelConfig(), "forward", 1)
    loaded.load_state_dict(old)
    assert np.array_equal(loaded.baseline.residual, mon.baseline.residual)
    out, ref = next(stream(5, 1))
    assert torch.equal(loaded.replacement(out, ref), mon.replacement(out, ref))


def test_fit_joins_once_there_is_a_predictor_and_flags_only_after_a_window():
    """The first accepted tensor trains the predictor, the second gives the baseline a fit; from the third on the
    distance is measured, and its fence stays infinite until its window holds min_window - 1 distances."""
    config = SentinelConfig()
    mon = BoundaryMonitor(config, "forward", 1)
    seen = []
    for out, ref in stream(7, 24):
        obs = mon.observe(out, ref)
        seen.append(("fit" in obs.scores, obs.fences.get("fit")))
    assert [present for present, _ in seen[:3]] == [False, False, True] and all(p for p, _ in seen[2:])
    windows = [i - 2 for i in range(2, 24)]  # distances in the fit window when tensor i is checked
    fences = [fence for _, fence in seen[2:]]
    assert all((fence == float("inf")) == (n < config.min_window - 1) for n, fence in zip(windows, fences))
    no_fit = BoundaryMonitor(SentinelConfig(metrics=("l1", "cosine")), "forward", 1)
    assert no_fit.predictor is None and "fit" not in no_fit.state_dict()["fences"]


def churning(seed: int, n: int = 64):
    """A stage whose map changes from one tensor to the next (a model learning fast): its output is its input
    scaled by a random factor of either sign, so no linear map learnt from earlier tensors predicts the next."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ref = torch.randn(4, 8, D, generator=g) + torch.linspace(-1, 1, D)
        sign = 1 if torch.rand((), generator=g) < 0.5 else -1
        scale = float(torch.empty(()).uniform_(0.2, 3.0, generator=g))
        yield sign * scale * ref + 0.1 * torch.randn(4, 8, D, generator=g), ref


def test_a_wide_fit_fence_is_widened_more():
    """fit_max_fence (0.5): a wider fit fence (here above 1: honest fits shifting by more than the projections' whole
    variance) is widened fit_wide_scale (2) times more, so fit flags only far beyond it; with fit_wide_scale 0 it is
    no fence at all, while the other distances keep theirs. A stage that a linear map describes keeps its fit fence
    (under 0.5), and so does the churning stage with no limit."""

    def churned(**overrides) -> BoundaryMonitor:
        mon = BoundaryMonitor(SentinelConfig(**overrides), "forward", 1)
        for out, ref in churning(0, 40):
            mon.observe(out, ref, detect=False)
        return mon

    unlimited = churned(fit_max_fence=0)
    plain = unlimited.fence("fit")
    assert 1.0 < plain < float("inf")
    assert churned().fence("fit") == pytest.approx(2 * plain)
    assert churned(fit_wide_scale=3).fence("fit") == pytest.approx(3 * plain)
    none = churned(fit_wide_scale=0)
    assert none.fence("fit") == float("inf") and none.fence("l2") < float("inf")
    out, ref = next(churning(1, 1))
    obs = none.observe(out, ref)
    assert obs.scores["fit"] > 0 and "fit" not in obs.reason
    steady = warmed().fence("fit")
    assert steady < 0.5 and steady == pytest.approx(warmed(SentinelConfig(fit_max_fence=0)).fence("fit"))
    for bad in ({"fit_max_fence": -1}, {"fit_wide_scale": 0.5}, {"fit_wide_scale": float("nan")}):
        with pytest.raises(ConfigError):
            SentinelConfig(**bad)


def gradients(seed: int, n: int = 64):
    """Gradient-like traffic: heavy-tailed token norms (log-normal scales, some tokens 4-10x the median), the
    reference's per-token scale inherited by the checked tensor."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        scale = torch.exp(0.7 * torch.randn(4, 8, 1, generator=g))
        ref = scale * (torch.randn(4, 8, D, generator=g) + torch.linspace(-1, 1, D))
        yield ref + 0.3 * scale * torch.randn(4, 8, D, generator=g), ref


@pytest.mark.parametrize("clip", [0.0, 4.0])
def test_token_clip_keeps_one_outlier_gradient_token_from_deciding_the_tensor(clip):
    """A gradient whose one token the stage amplified 40x (honest gradients have such tokens): with the default token
    clip the tensor is accepted, without it l2 and gain cross their fences; whole-tensor attacks are flagged either
    way."""
    mon = BoundaryMonitor(SentinelConfig(token_clip_backward=clip), "backward", boundary=1)
    for out, ref in gradients(0, 48):
        mon.observe(out, ref, detect=False)
    assert sum(mon.observe(out, ref).flagged for out, ref in gradients(1, 32)) == 0
    out, ref = next(gradients(2, 1))
    spiked = out.clone()
    spiked[0, 0] *= 40.0
    obs = mon.observe(spiked, ref)
    if clip:
        assert not obs.flagged
    else:
        assert obs.flagged and {"l2", "gain"} <= set(obs.reason.removeprefix("distance:").split(","))
    for attacked in (torch.zeros_like(out), -out, 3 * out, out + 3 * out.std(), torch.randn_like(out) * 10):
        assert mon.observe(attacked, ref).flagged
    with pytest.raises(ConfigError):
        SentinelConfig(token_clip_backward=0.5)


def stage_like(seed: int, n: int, batch: int = 4, dim: int = 64):
    """A residual stage's traffic: the output is the input plus a fixed linear map of it and a little noise."""
    weights = torch.randn(dim, dim, generator=torch.Generator().manual_seed(99)) / dim**0.5
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ref = torch.randn(batch, 32, dim, generator=g) + 0.5
        yield ref + 0.3 * ref @ weights + 0.05 * torch.randn(batch, 32, dim, generator=g), ref


def test_fewer_tokens_widen_the_fences_instead_of_flagging_honest_tensors():
    """Fences learnt on 4 x 32-token tensors: honest 1 x 32 tensors are compared with fences widened by sqrt(4) (with
    fences unwidened, most were flagged: their statistics are twice as noisy), attacks on them are still flagged, a
    full-size tensor meets the fences unwidened, and what the small tensors add to the windows is on the 4 x 32
    scale."""

    def learnt() -> BoundaryMonitor:
        mon = BoundaryMonitor(SentinelConfig(), "forward", boundary=1)
        for i, (out, ref) in enumerate(stage_like(0, 40)):
            mon.observe(out, ref, detect=i >= 20)
        return mon

    mon = learnt()
    assert mon.tokens == 128 and mon.token_scale(32) == pytest.approx(2.0) and mon.token_scale(128) == 1.0
    before = {m: mon.fence(m) for m in ("l1", "l2")}
    small = list(stage_like(1, 30, batch=1))
    assert sum(mon.observe(out, ref).flagged for out, ref in small) <= 1
    for m in ("l1", "l2"):  # the windows stayed on the 128-token scale: not doubled by 30 tensors of 32 tokens
        assert mon.fence(m) < 1.4 * before[m]
    out, ref = small[0]
    for attacked in (torch.zeros_like(out), -out, 3 * out, out + 0.5, torch.randn_like(out) * 10):
        assert mon.observe(attacked, ref).flagged
    full_out, full_ref = next(stage_like(2, 1))
    fence = mon.fence("l1")
    assert mon.observe(full_out, full_ref).fences["l1"] == fence
    plain = learnt()  # the same monitor with fences that ignore the token count (as before this rule)
    plain.token_scale = lambda tokens: 1.0
    assert sum(plain.observe(out, ref).flagged for out, ref in small) >= 15


def test_gradients_of_fewer_tokens_are_summarised_at_the_first_gradients_scale():
    """A mean loss gives each token a gradient proportional to 1 / tokens: honest gradients of one sequence out of
    four are 4x larger, which is no rescaling attack; a rescaled one still is."""
    mon = BoundaryMonitor(SentinelConfig(), "backward", boundary=1)
    for out, ref in gradients(0, 48):
        mon.observe(out, ref, detect=False)
    assert mon.gradient_tokens == 32
    small = [(4 * out[:1], 4 * ref[:1]) for out, ref in gradients(1, 24)]
    assert sum(mon.observe(out, ref).flagged for out, ref in small) == 0
    out, ref = small[0]
    assert mon.observe(3 * out, ref).flagged and mon.observe(torch.zeros_like(out), ref).flagged
    clone = BoundaryMonitor(SentinelConfig(), "backward", boundary=1)
    clone.load_state_dict(mon.state_dict())
    assert (clone.tokens, clone.gradient_tokens) == (mon.tokens, mon.gradient_tokens)
    assert clone.observe(out, ref).scores == pytest.approx(mon.observe(out, ref).scores)


def test_upper_spread_caps_q3_by_the_lower_half():
    plain = TukeyFence(window=8, k=1.0, min_iqr_fraction=0.0)
    capped = TukeyFence(window=8, k=1.0, min_iqr_fraction=0.0, upper_spread=2.0)
    for v in [1, 2, 3, 4, 20, 20, 20, 20]:  # a top half filled by one sender: Q3 = 20
        plain.add(v)
        capped.add(v)
    # numpy: q1 = 2.75, median = 12, q3 = 20; capped q3 = 12 + 2 * (12 - 2.75) = 30.5 -> not binding here
    assert capped.fence() == plain.fence() == pytest.approx(20 + (20 - 2.75))
    for v in [1, 2, 3, 4, 5, 20, 20, 20]:  # the top quarter and a bit: q1 = 2.75, median = 4.5, q3 = 20
        plain.add(v)
        capped.add(v)
    assert plain.fence() == pytest.approx(20 + (20 - 2.75))
    assert capped.fence() == pytest.approx(4.5 + 2 * 1.75 + (4.5 + 2 * 1.75 - 2.75))  # q3 capped at 8
    with pytest.raises(ConfigError):
        SentinelConfig(fence_upper_spread=-1)
    with pytest.raises(ConfigError):
        SentinelConfig(median_baseline=2)


def ratchet(config: SentinelConfig, steps: int = 40) -> tuple[float, float]:
    """Three senders at one forward monitor; from step 10 the third sets its tensors' mean to the baseline's plus a
    bias along a fixed +-1 pattern, sized (reading the monitor: an upper bound on what an attacker knows) at 0.8 x
    the l1 fence. Returns the l1 fence at the end over the fence at step 9, and the baseline's mean along the pattern.
    """
    from sentinel.validator import Validator

    g = torch.Generator().manual_seed(0)
    dim = 32
    weights = torch.randn(dim, dim, generator=g) / dim**0.5
    pattern = (torch.randint(0, 2, (dim,), generator=g) * 2 - 1).float()
    validator = Validator(config)
    mon = validator.monitor(1, "forward")
    start = None
    for step in range(steps):
        for mb in range(6):
            sender = f"s{mb % 3}"
            ref = torch.randn(4, 16, dim, generator=g) + 0.5
            x = ref + 0.3 * ref @ weights + 0.05 * torch.randn(4, 16, dim, generator=g)
            if sender == "s2" and step >= 10:
                shift = 0.8 * mon.fence("l1") * float(mon.baseline.std.sum()) / dim
                x = x - x.mean(dim=(0, 1)) + torch.from_numpy(mon.baseline.mean) + shift * pattern
            validator.check(x, boundary=1, direction="forward", sender=sender, step=step, reference=ref,
                            warmup=step < 6)  # fmt: skip
        validator.end_step(step)
        if step == 9:
            start = mon.fence("l1")
    return mon.fence("l1") / start, float(mon.baseline.mean @ pattern.numpy()) / dim


def test_a_median_baseline_and_capped_fences_stop_the_fence_ratchet():
    """An attacker under the fences drags one EMA of all traffic towards itself, the honest tensors' distances and
    with them the fences grow, and it moves further (README, "Fence ratchet"): the l1 fence grew 4.5x in 30 steps.
    With per-sender EMAs and their median as the baseline, and Q3 capped at the median plus 4x the window's lower
    spread, it grew 2.9x in 30 steps and no further (2.6x after 70)."""
    grown, _ = ratchet(SentinelConfig())
    assert grown > 4.0
    robust = SentinelConfig(median_baseline=3, fence_upper_spread=4.0)
    for steps in (40, 80):
        grown, along = ratchet(robust, steps)
        assert grown < 3.2 and abs(along) < 0.2


def test_median_baseline_state_and_forgetting():
    config = SentinelConfig(median_baseline=3)
    mon = BoundaryMonitor(config, "forward", boundary=1)
    for i, (out, ref) in enumerate(stream(0, 30)):
        mon.observe(out, ref, detect=False, sender=f"s{i % 3}")
    assert set(mon.senders) == {"s0", "s1", "s2"} and mon.pooled is not None
    clone = BoundaryMonitor(config, "forward", boundary=1)
    clone.load_state_dict(mon.state_dict())
    assert set(clone.senders) == set(mon.senders)
    np.testing.assert_allclose(clone.baseline.mean, mon.baseline.mean)
    for i, (out, ref) in enumerate(stream(6, 5)):
        a, b = mon.observe(out, ref, sender=f"s{i % 3}"), clone.observe(out, ref, sender=f"s{i % 3}")
        assert a.flagged == b.flagged and a.scores == pytest.approx(b.scores)
    mon.forget("s2")  # two senders left, under median_baseline: the pooled EMA is the baseline
    assert "s2" not in mon.senders
    np.testing.assert_allclose(mon.baseline.mean, mon.pooled.mean)
