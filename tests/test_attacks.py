import math
import textwrap

import pytest
import torch

from sentinel.attacks import (
    ATTACK_IDS,
    ATTACK_SETTINGS,
    STRONGEST,
    WEAKEST,
    AttackContext,
    AttackError,
    MaliciousBehaviour,
    SigmaEstimator,
    TensorHistory,
    make_attack,
    parse_direction,
    parse_params,
)

D = 16
ALL_CELLS = [(name, setting) for name, settings in ATTACK_SETTINGS.items() for setting in settings] + [
    ("nonfinite", {"fraction": 0.5, "kind": "inf"}),
    ("nonfinite", {"fraction": 0.5, "kind": "mixed"}),
]


def make_context(h, *, seed=0, sigma=None, step=5, history=None, microbatch=0, direction="forward"):
    if sigma is None:
        sigma = torch.linspace(0.5, 2.0, h.shape[-1])
    return AttackContext(
        step=step,
        microbatch=microbatch,
        direction=direction,
        worker=3,
        sigma=sigma,
        history=history if history is not None else TensorHistory(8),
        generator=torch.Generator().manual_seed(seed),
    )


def sample(*shape, seed=1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# defining property of each attack
# ---------------------------------------------------------------------------------------------------------------------


def test_zeros():
    h = sample(2, 3, D)
    out = make_attack("zeros")(h, make_context(h))
    assert out.shape == h.shape and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("c", [1.0, 10.0])
def test_constant_is_c_sigma(c):
    h = sample(2, 3, D)
    ctx = make_context(h)
    out = make_attack("constant", {"c": c})(h, ctx)
    assert torch.allclose(out, (c * ctx.sigma).expand_as(h))


@pytest.mark.parametrize("a", [1.0, 10.0])
def test_random_is_independent_of_h_with_std_a_sigma(a):
    attack = make_attack("random", {"a": a})
    h1, h2 = sample(64, 32, D, seed=1), 100 * sample(64, 32, D, seed=2)
    out1, out2 = attack(h1, make_context(h1, seed=7)), attack(h2, make_context(h2, seed=7))
    assert torch.equal(out1, out2)  # same generator state -> same output whatever h is
    sigma = make_context(h1).sigma
    std = out1.reshape(-1, D).std(dim=0)
    assert torch.allclose(std, a * sigma, rtol=0.1)
    assert out1.reshape(-1, D).mean(dim=0).abs().max() < 0.15 * a * sigma.max()


@pytest.mark.parametrize("lam", [-1.0, 0.5, 2.0, 10.0])
def test_scaling_is_exact(lam):
    h = sample(2, 3, D)
    assert torch.equal(make_attack("scaling", {"lam": lam})(h, make_context(h)), h * lam)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_random_sign_flips_p_and_keeps_magnitude(p):
    h = sample(32, 32, D)
    out = make_attack("random_sign", {"p": p})(h, make_context(h))
    assert torch.equal(out.abs(), h.abs())
    flipped = (torch.sign(out) != torch.sign(h)).float().mean().item()
    assert abs(flipped - p) < 0.03


@pytest.mark.parametrize("b", [0.5, 1.0, 3.0])
def test_bias_pattern_is_fixed_per_attacker(b):
    attack = make_attack("bias", {"b": b}, seed=4, worker=2)
    patterns = []
    for seed in range(3):
        h = sample(4, 5, D, seed=seed)
        ctx = make_context(h, seed=seed)
        s = (attack(h, ctx) - h) / (b * ctx.sigma)
        assert torch.allclose(s.abs(), torch.ones_like(s), atol=1e-5)
        assert torch.allclose(s, s[0, 0].expand_as(s), atol=1e-5)  # one pattern over the last dim
        patterns.append(torch.sign(s[0, 0]))
    assert all(torch.equal(patterns[0], p) for p in patterns)
    again = make_attack("bias", {"b": b}, seed=4, worker=2)  # rebuilt (e.g. after a restart): same pattern
    h = sample(4, 5, D)
    ctx = make_context(h)
    assert torch.equal(torch.sign(again(h, ctx) - h)[0, 0], patterns[0])
    others = {tuple(make_attack("bias", seed=4, worker=w).pattern(64).tolist()) for w in range(4)}
    assert len(others) > 1


def test_noise_applied_with_probability_q():
    attack = make_attack("noise", {"kappa": 0.3, "q": 0.5})
    behaviour = MaliciousBehaviour(worker=1, attack=attack, directions=frozenset({"forward"}), onset=0, seed=11)
    h = sample(2, 4, D)
    applied = []
    for mb in range(400):
        out = behaviour.apply(h, step=mb // 4, microbatch=mb, direction="forward")
        applied.append(not torch.equal(out, h))
        assert behaviour.last_tainted == applied[-1]
    rate = sum(applied) / len(applied)
    assert abs(rate - 0.5) < 0.08  # 400 Bernoulli(0.5) draws: std 0.025
    always = make_attack("noise", {"kappa": 0.1, "q": 1.0})
    assert all(not torch.equal(always(h, make_context(h, seed=s)), h) for s in range(20))


@pytest.mark.parametrize("kappa", [0.1, 0.3, 1.0])
def test_noise_scale_is_kappa_sigma(kappa):
    h = sample(64, 32, D)
    ctx = make_context(h)
    residual = make_attack("noise", {"kappa": kappa, "q": 1.0})(h, ctx) - h
    assert torch.allclose(residual.reshape(-1, D).std(dim=0), kappa * ctx.sigma, rtol=0.1)


def test_delay_replays_delta_steps_back_and_falls_back_to_oldest():
    history = TensorHistory(50)
    tensors = {step: torch.full((2, D), float(step)) for step in range(20, 60)}
    for step, t in tensors.items():
        history.record(step, t)
    attack = make_attack("delay", {"delta": 10})
    like = torch.zeros(2, D)
    assert torch.equal(attack(like, make_context(like, step=59, history=history)), tensors[49])
    far = make_attack("delay", {"delta": 100})
    for max_steps, oldest in [(100, 0.0), (50, 9.0)]:
        history = TensorHistory(max_steps)
        for step in range(0, 60, 3):  # gaps: the latest step <= step - delta is used
            history.record(step, torch.full((2, D), float(step)))
        assert attack(like, make_context(like, step=59, history=history))[0, 0].item() == 48.0
        assert far(like, make_context(like, step=59, history=history))[0, 0].item() == oldest  # the oldest recorded
    ctx = make_context(like, step=59, history=TensorHistory(4))
    assert torch.equal(far(like, ctx), like) and ctx.tainted is False  # nothing to replay


def test_delay_through_behaviour_replays_honest_tensors():
    behaviour = MaliciousBehaviour(
        worker=0, attack=make_attack("A8", {"delta": 10}), directions=parse_direction("both"), onset=30, seed=0
    )
    for step in range(40):
        for direction in ("forward", "backward"):
            sign = 1.0 if direction == "forward" else -1.0
            h = torch.full((2, 3, D), sign * step)
            out = behaviour.apply(h, step=step, microbatch=step, direction=direction)
            expected = h if step < 30 else torch.full((2, 3, D), sign * (step - 10))
            assert torch.equal(out, expected)


def test_delay_at_an_attackers_first_step_is_no_replay_and_not_labelled_one():
    """From step 0 (no honest history yet), the history holds only the tensor just recorded: the replay is h itself,
    which the benchmark's ground truth counted as a poisoned micro-batch."""
    behaviour = MaliciousBehaviour(worker=0, attack=make_attack("delay", {"delta": 2}), directions=parse_direction(
        "forward"), onset=0, seed=0)  # fmt: skip
    labels = []
    for step in range(4):
        h = torch.full((2, 3, D), float(step))
        out = behaviour.apply(h, step=step, microbatch=step, direction="forward")
        labels.append(behaviour.last_tainted)
        replayed = {0: step, 1: 0, 2: 0, 3: 1}[step]  # delta 2 back, or the oldest earlier step
        assert torch.equal(out, torch.full_like(h, float(replayed)))
    assert labels == [False, True, True, True]


@pytest.mark.parametrize("fraction", [1e-4, 0.3, 1.0])
def test_nonfinite_fraction(fraction):
    h = sample(8, 16, D)
    out = make_attack("nonfinite", {"fraction": fraction})(h, make_context(h))
    bad = ~torch.isfinite(out)
    assert torch.isnan(out[bad]).all()
    assert torch.equal(out[~bad], h[~bad])
    if fraction == 1.0:
        assert bad.all()
    elif fraction == 1e-4:
        assert 1 <= bad.sum() <= 3  # 2048 coordinates: at least one is forced
    else:
        assert abs(bad.float().mean().item() - fraction) < 0.05


@pytest.mark.parametrize("kind", ["inf", "mixed"])
def test_nonfinite_kinds(kind):
    h = sample(8, 16, D)
    out = make_attack("nonfinite", {"fraction": 1.0, "kind": kind})(h, make_context(h))
    assert not torch.isfinite(out).any()
    assert torch.isinf(out).any() and (out == math.inf).any() and (out == -math.inf).any()
    assert torch.isnan(out).any() == (kind == "mixed")


def test_mixed_is_deterministic_per_seed_and_worker():
    chosen = {w: make_attack("mixed", seed=3, worker=w).chosen for w in range(40)}
    assert chosen == {w: make_attack("A10", seed=3, worker=w).chosen for w in range(40)}
    assert len(set(chosen.values())) > 3  # different workers draw different attacks
    assert set(chosen.values()) <= {ATTACK_IDS[f"A{i}"] for i in range(1, 9)}
    assert chosen != {w: make_attack("mixed", seed=4, worker=w).chosen for w in range(40)}
    for w in range(40):
        attack = make_attack("mixed", seed=3, worker=w)
        assert attack.needs_history == (attack.chosen == "delay")
        assert attack.inner.params == {**attack.inner.accepted, **STRONGEST[attack.chosen]}
    h = sample(2, 3, D)
    w = next(w for w, name in chosen.items() if name == "scaling")
    assert torch.equal(make_attack("mixed", seed=3, worker=w)(h, make_context(h)), -h)


# ---------------------------------------------------------------------------------------------------------------------
# contracts shared by every attack
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,setting", ALL_CELLS)
@pytest.mark.parametrize("shape", [(D,), (3, D), (2, 3, D)])
def test_attack_contract(name, setting, shape):
    attack = make_attack(name, setting, seed=1, worker=2)
    history = TensorHistory(8)
    history.record(1, sample(*shape, seed=9))
    h = sample(*shape)
    before = h.clone()
    out = attack(h, make_context(h, seed=5, history=history))
    assert torch.equal(h, before)  # not modified in place
    assert out.shape == h.shape and out.dtype == h.dtype and out.device == h.device
    if name != "zeros":
        assert out.data_ptr() != h.data_ptr()
    again = attack(h, make_context(h, seed=5, history=history))  # deterministic given the generator
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(again))
    assert torch.equal(torch.isnan(out), torch.isnan(again))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", list(STRONGEST))
def test_attacks_follow_dtype(name, dtype):
    h = sample(2, 3, D, dtype=dtype)
    behaviour = MaliciousBehaviour(worker=1, attack=make_attack(name), directions=frozenset({"backward"}), onset=0,
                                   seed=0)
    for step in range(3):
        out = behaviour.apply(h, step=step, microbatch=step, direction="backward")
        assert out.dtype == dtype and out.shape == h.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(STRONGEST))
def test_attacks_on_cuda_match_cpu(name):
    h = sample(2, 3, D)
    behaviours = [
        MaliciousBehaviour(worker=1, attack=make_attack(name, seed=2, worker=1), directions=frozenset({"forward"}),
                           onset=1, seed=2)
        for _ in range(2)
    ]
    for step in range(3):
        cpu = behaviours[0].apply(h, step=step, microbatch=step, direction="forward")
        gpu = behaviours[1].apply(h.cuda(), step=step, microbatch=step, direction="forward")
        assert gpu.is_cuda
        assert torch.allclose(torch.nan_to_num(cpu), torch.nan_to_num(gpu.cpu()), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# MaliciousBehaviour
# ---------------------------------------------------------------------------------------------------------------------


def test_behaviour_honest_before_onset_and_in_unattacked_direction():
    behaviour = MaliciousBehaviour(worker=2, attack=make_attack("A4"), directions=parse_direction("forward"), onset=5,
                                   seed=0)
    h = sample(2, 3, D)
    for step in range(10):
        assert behaviour.apply(h, step=step, microbatch=step, direction="backward") is h
        assert behaviour.last_tainted is False
        out = behaviour.apply(h, step=step, microbatch=step, direction="forward")
        if step < 5:
            assert out is h and not behaviour.last_tainted
        else:
            assert torch.equal(out, -h) and behaviour.last_tainted
    with pytest.raises(AttackError):
        behaviour.apply(h, step=0, microbatch=0, direction="sideways")


def test_behaviour_records_history_only_when_needed():
    h = sample(2, D)
    plain = MaliciousBehaviour(worker=0, attack=make_attack("zeros"), directions="both", onset=0, seed=0)
    delayed = MaliciousBehaviour(worker=0, attack=make_attack("delay"), directions="both", onset=0, seed=0)
    for step in range(5):
        plain.apply(h, step=step, microbatch=step, direction="forward")
        delayed.apply(h, step=step, microbatch=step, direction="forward")
    assert len(plain.histories["forward"]) == 0
    assert len(delayed.histories["forward"]) == 5 and len(delayed.histories["backward"]) == 0


def test_behaviour_sigma_is_learned_from_honest_tensors():
    seen = []
    behaviour = MaliciousBehaviour(
        worker=0, attack=lambda h, ctx: ctx.sigma.expand_as(h).clone(), directions="forward", onset=3, seed=0
    )
    for step in range(4):
        h = sample(8, D, seed=step) * (step + 1)
        seen.append(h)
        out = behaviour.apply(h, step=step, microbatch=step, direction="forward")
    assert torch.allclose(out[0], torch.cat(seen).std(dim=0), rtol=1e-4)


def test_behaviour_state_dict_round_trip():
    def run(behaviour, steps):
        return [behaviour.apply(sample(2, D, seed=s), step=s, microbatch=s, direction="forward") for s in steps]

    kwargs = dict(worker=4, directions="forward", onset=0, seed=9)
    first = MaliciousBehaviour(attack=make_attack("random", {"a": 1.0}), **kwargs)
    run(first, range(3))
    state = first.state_dict()
    expected = run(first, range(3, 6))
    second = MaliciousBehaviour(attack=make_attack("random", {"a": 1.0}), **kwargs)
    second.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, run(second, range(3, 6))))


def test_behaviour_rejects_wrong_shape():
    behaviour = MaliciousBehaviour(worker=0, attack=lambda h, ctx: h[..., :-1], directions="both", onset=0, seed=0)
    with pytest.raises(AttackError, match="shape"):
        behaviour.apply(sample(2, D), step=0, microbatch=0, direction="forward")


# ---------------------------------------------------------------------------------------------------------------------
# history and sigma
# ---------------------------------------------------------------------------------------------------------------------


def test_tensor_history_is_bounded_and_keeps_last_per_step():
    history = TensorHistory(16)
    for step in range(100):
        for mb in range(3):
            history.record(step, torch.full((2, D), step + mb / 4))
        assert len(history) <= 16
    assert history.steps == list(range(84, 100))
    like = torch.zeros(2, D, dtype=torch.float64)
    out = history.stale(99, 5, like)
    assert out.dtype == torch.float64 and out[0, 0].item() == 94.5  # the last micro-batch of step 94
    history.record(10, torch.zeros(2, D))  # older than the window: ignored
    assert 10 not in history.steps and len(history) == 16
    assert history.stale(99, 5, torch.zeros(3, D)) is None
    assert TensorHistory(4).stale(0, 1, like) is None
    with pytest.raises(AttackError):
        TensorHistory(0)


def test_tensor_history_keeps_small_gradients():
    history = TensorHistory(4)
    grad = sample(4, D) * 1e-7
    history.record(0, grad)
    assert torch.allclose(history.stale(5, 1, grad), grad, rtol=1e-2)
    assert history._tensors[0].device.type == "cpu"


def test_sigma_estimator_matches_pooled_std():
    est = SigmaEstimator()
    first = sample(3, D, seed=5)
    assert torch.allclose(est.sigma(first), first.std(dim=0))  # before any update: h's own std
    chunks = [sample(2, 5, D, seed=s) * (s + 1) + s for s in range(4)]
    for chunk in chunks:
        est.update(chunk)
    pooled = torch.cat([c.reshape(-1, D) for c in chunks])
    assert torch.allclose(est.sigma(first), pooled.std(dim=0), rtol=1e-5)
    est.update(torch.full((2, D), math.nan))  # ignored
    assert torch.allclose(est.sigma(first), pooled.std(dim=0), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# building attacks
# ---------------------------------------------------------------------------------------------------------------------


def test_ids_and_names_resolve():
    assert len(ATTACK_IDS) == 10 and set(ATTACK_IDS.values()) == set(ATTACK_SETTINGS) == set(STRONGEST)
    assert set(WEAKEST) == set(STRONGEST)
    for attack_id, name in ATTACK_IDS.items():
        by_id, by_lower, by_name = make_attack(attack_id), make_attack(attack_id.lower()), make_attack(name)
        assert type(by_id) is type(by_lower) is type(by_name)
        assert by_id.params == by_name.params
        assert STRONGEST[name] in ATTACK_SETTINGS[name] and WEAKEST[name] in ATTACK_SETTINGS[name]
    assert make_attack("scaling").lam == -1.0 and make_attack("scaling", WEAKEST["scaling"]).lam == 0.5
    assert make_attack("random-sign").p == 0.5
    with pytest.raises(AttackError, match="unknown attack"):
        make_attack("A11")
    with pytest.raises(AttackError):
        make_attack("nope")


def test_unknown_or_bad_params_raise():
    with pytest.raises(AttackError, match="accepted.*lam"):
        make_attack("scaling", {"lambda": 2})
    for name, params in [
        ("random_sign", {"p": 1.5}),
        ("noise", {"q": -0.1}),
        ("delay", {"delta": 2.5}),
        ("delay", {"delta": 0}),
        ("nonfinite", {"kind": "zero"}),
        ("constant", {"c": "ten"}),
        ("random", {"a": math.inf}),
        ("zeros", {"x": 1}),
    ]:
        with pytest.raises(AttackError):
            make_attack(name, params)


def test_parse_params_and_direction():
    assert parse_params("lam=-1,q=0.5") == {"lam": -1.0, "q": 0.5}
    assert parse_params("") == {} and parse_params("  ") == {}
    assert parse_params(" fraction = 1e-4 , kind=inf") == {"fraction": 1e-4, "kind": "inf"}
    assert make_attack("delay", parse_params("delta=10")).delta == 10
    for bad in ["lam", "lam=", "=1", "lam=1,,q=2", "lam=1,lam=2", "1x=2"]:
        with pytest.raises(AttackError):
            parse_params(bad)
    assert parse_direction("both") == {"forward", "backward"}
    assert parse_direction("Forward") == {"forward"} and parse_direction("backward") == {"backward"}
    with pytest.raises(AttackError):
        parse_direction("up")


def test_example_plugin_loads_by_module_function():
    attack = make_attack("sentinel.example_plugin:flip_half")
    h = sample(2, 3, D)
    out = attack(h, make_context(h))
    assert torch.equal(out[..., : D // 2], -h[..., : D // 2]) and torch.equal(out[..., D // 2 :], h[..., D // 2 :])
    assert attack.needs_history is False


def test_plugins_with_params_and_bad_plugins(tmp_path, monkeypatch):
    (tmp_path / "my_attacks_for_test.py").write_text(
        textwrap.dedent(
            """
            import torch
            NOT_CALLABLE = 3
            def shift(h, context, amount=1.0):
                return h + amount
            def truncate(h, context):
                return h[..., :-1]
            def anything(h, context, **kw):
                return h * kw.get("k", 1.0)
            """
        )
    )
    (tmp_path / "broken_attacks_for_test.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    h = sample(2, D)
    assert torch.equal(make_attack("my_attacks_for_test:shift", {"amount": 2.0})(h, make_context(h)), h + 2.0)
    assert torch.equal(make_attack("my_attacks_for_test:shift")(h, make_context(h)), h + 1.0)
    assert torch.equal(make_attack("my_attacks_for_test:anything", {"k": 3.0})(h, make_context(h)), h * 3.0)
    with pytest.raises(AttackError, match="amount"):
        make_attack("my_attacks_for_test:shift", {"amont": 2.0})
    with pytest.raises(AttackError, match="shape"):
        make_attack("my_attacks_for_test:truncate")(h, make_context(h))
    for bad in [
        "no_such_module_for_sentinel:fn",
        "my_attacks_for_test:missing",
        "my_attacks_for_test:NOT_CALLABLE",
        "broken_attacks_for_test:fn",
        "my_attacks_for_test:",
        ":shift",
    ]:
        with pytest.raises(AttackError):
            make_attack(bad)
