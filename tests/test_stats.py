"""Each distance's defining behaviour on synthetic tensors."""

import math
import pickle

import pytest
import torch

from sentinel.stats import DISTANCES, LinearPredictor, clip_tokens, distances, make_projections, summarize

D = 32


def _honest(seed: int, n: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    means = torch.linspace(-2, 2, D)  # features with strong, sign-stable means
    return means + torch.randn(n, D, generator=g)


@pytest.fixture()
def proj():
    return make_projections(D, 8, seed=3)


def test_identical_summaries_have_zero_distance(proj):
    x = _honest(0)
    s = summarize(x, proj, 16, reference=x * 0.9)
    for name, value in distances(s, s, tuple(DISTANCES)).items():
        assert value == pytest.approx(0.0, abs=1e-6), name


def test_honest_resample_is_close_and_attacks_are_far(proj):
    base = summarize(_honest(0), proj, 16)
    other = summarize(_honest(1), proj, 16)
    zeros = summarize(torch.zeros(512, D), proj, 16)
    flipped = summarize(-_honest(1), proj, 16)
    for name in ("l1", "l2", "wasserstein"):
        honest = DISTANCES[name](other, base)
        assert honest < 0.15, name
        assert DISTANCES[name](zeros, base) > 5 * honest, name
    assert DISTANCES["sign_flip"](other, base) == 0.0
    assert DISTANCES["sign_flip"](flipped, base) > 0.9


def test_l2_is_normalised_and_scale_free(proj):
    x = _honest(0)
    s1, b1 = summarize(x * 2, proj, 8), summarize(x, proj, 8)
    s2, b2 = summarize(x * 200, proj, 8), summarize(x * 100, proj, 8)
    assert DISTANCES["l2"](s1, b1) == pytest.approx(DISTANCES["l2"](s2, b2), rel=1e-4)
    assert DISTANCES["l2"](s1, b1) == pytest.approx(1.0, rel=1e-4)  # ||2u - u|| / ||u||


def test_sign_flip_ignores_noise_features(proj):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(512, D, generator=g)  # zero-mean features: no feature is sign-stable
    base = summarize(noise, proj, 8)
    assert DISTANCES["sign_flip"](summarize(-noise, proj, 8), base) == 0.0


def test_cosine_and_gain_need_a_reference(proj):
    x = _honest(0)
    ref = x + 0.1 * _honest(5)
    base = summarize(x, proj, 8, reference=ref)
    assert base.cosine is not None and base.cosine > 0.9
    assert base.gain is not None
    scaled = summarize(0.5 * x, proj, 8, reference=ref)
    assert DISTANCES["gain"](scaled, base) == pytest.approx(math.log(2), rel=1e-3)
    assert DISTANCES["cosine"](scaled, base) == pytest.approx(0.0, abs=1e-5)  # scaling keeps the direction
    stale = summarize(_honest(9) - torch.linspace(-2, 2, D), proj, 8, reference=ref)  # unrelated tokens
    assert DISTANCES["cosine"](stale, base) > 0.5
    no_ref = summarize(x, proj, 8)
    assert DISTANCES["cosine"](no_ref, base) == 0.0 and DISTANCES["gain"](no_ref, base) == 0.0


def test_wasserstein_sees_variance_change_that_means_do_not(proj):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, D, generator=g)
    base = summarize(x, proj, 16)
    noisy = summarize(x + torch.randn(4096, D, generator=g), proj, 16)  # same means, variance doubled
    resample = DISTANCES["wasserstein"](summarize(torch.randn(4096, D, generator=g), proj, 16), base)
    assert DISTANCES["wasserstein"](noisy, base) > 4 * resample
    assert DISTANCES["l2"](noisy, base) > 4 * DISTANCES["l2"](
        summarize(torch.randn(4096, D, generator=g), proj, 16), base
    )


def test_projections_are_private_and_unit():
    a, b = make_projections(D, 8, seed=1), make_projections(D, 8, seed=2)
    assert torch.allclose(a.norm(dim=0), torch.ones(8))
    assert not torch.allclose(a, b)
    assert torch.equal(a, make_projections(D, 8, seed=1))


def test_linear_predictor_learns_a_stage_and_sees_what_breaks_it(proj):
    """The predictor learns x = f(reference) when f is close to linear: the unexplained fraction is then small, and
    random sign flips of 10% of x's elements (a change the cosine hardly sees) make it large."""
    g = torch.Generator().manual_seed(4)
    w = torch.eye(D) + 0.3 * torch.randn(D, D, generator=g) / math.sqrt(D)  # residual path + a linear update
    predictor = LinearPredictor(every=1, refit=2, decay=0.9, tokens=64, ridge=1e-3)

    def stage(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ref = _honest(int(torch.randint(0, 10**6, (1,), generator=g)), n)
        return torch.tanh(ref @ w / 2) * 2 + 0.05 * torch.randn(n, D, generator=g), ref  # mildly non-linear

    assert predictor.matrix(torch.device("cpu")) is None
    for _ in range(12):
        predictor.update(*stage(256), proj)
    m = predictor.matrix(torch.device("cpu"))
    assert m.shape == (D + 1, proj.shape[1])
    x, ref = stage(256)
    honest = summarize(x, proj, 8, reference=ref, predictor=m)
    flips = torch.where(torch.rand(x.shape, generator=g) < 0.1, -1.0, 1.0)
    attacked = summarize(x * flips, proj, 8, reference=ref, predictor=m)
    assert honest.fit < 0.1 and attacked.fit > honest.fit + 0.2
    assert predictor.expected == pytest.approx(honest.fit, abs=0.03)  # in-sample: where the baseline restarts
    assert DISTANCES["fit"](attacked, honest) == pytest.approx(attacked.fit - honest.fit)
    assert summarize(x, proj, 8, reference=ref).fit is None  # no predictor, no fit
    assert "fit" not in distances(summarize(x, proj, 8, reference=ref), honest, ("l1", "fit"))  # not applicable


def test_linear_predictor_state_round_trip(proj):
    g = torch.Generator().manual_seed(5)
    a = LinearPredictor(every=2, refit=3, decay=0.8, tokens=32, ridge=1e-3)
    b = LinearPredictor(every=2, refit=3, decay=0.8, tokens=32, ridge=1e-3)
    batches = [(_honest(i, 128) * 0.5 + 0.1 * torch.randn(128, D, generator=g), _honest(i, 128)) for i in range(20)]
    for x, ref in batches[:9]:  # mid-way through a fold: the pending sums must survive too
        a.update(x, ref, proj)
    b.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    for x, ref in batches[9:]:
        a.update(x, ref, proj)
        b.update(x, ref, proj)
    assert torch.equal(a.weights, b.weights) and a.offered == b.offered == 20


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


@pytest.mark.parametrize("where", ["cpu", CUDA])
def test_host_and_device_summaries_agree(proj, where):
    """``summarize`` runs in numpy on CPU and in torch on a GPU: both implementations (the torch one on CPU, and on
    CUDA where there is one) give the same statistics, and both make a non-finite tensor's summary non-finite."""
    from sentinel.stats import _summarize_device, _summarize_host

    def on_device(x, projections, n_quantiles, *args):
        moved = (None if a is None else a.to(where) for a in args)
        return _summarize_device(x.to(where), projections.to(where), n_quantiles, *moved)

    g = torch.Generator().manual_seed(6)
    ref = _honest(7, 300).reshape(3, 100, D)
    x = ref + 0.3 * torch.randn(ref.shape, generator=g)
    m = 0.1 * torch.randn(D + 1, proj.shape[1], generator=g)
    for args in ((None, None), (ref, None), (ref, m)):
        host, device = _summarize_host(x, proj, 16, *args), on_device(x, proj, 16, *args)
        for name in ("mean", "std", "quantiles", "residual", "ref_mean", "ref_std"):
            a, b = getattr(host, name), getattr(device, name)
            assert (a is None) == (b is None), name
            if a is not None:
                assert a.dtype == b.dtype and a.shape == b.shape and torch.allclose(
                    torch.from_numpy(a), torch.from_numpy(b), rtol=1e-4, atol=1e-5
                ), name
        for name in ("cosine", "gain", "fit"):
            a, b = getattr(host, name), getattr(device, name)
            assert a == (None if b is None else pytest.approx(b, rel=1e-4, abs=1e-6)), name
    flat = ref.reshape(-1, D)  # the reference's own statistics, for the monitor's input stream
    assert torch.allclose(torch.from_numpy(host.ref_mean), flat.mean(0), atol=1e-5)
    assert torch.allclose(torch.from_numpy(host.ref_std), flat.std(0, correction=0), rtol=1e-4, atol=1e-5)
    assert host.clone().ref_mean is None and "ref_mean" not in host.state_dict()  # of one tensor only
    poisoned = x.clone()
    poisoned[1, 5, 3] = float("nan")
    for impl in (_summarize_host, on_device):
        assert not impl(poisoned, proj, 16, ref, m).finite()
        assert impl(x, proj, 16, ref, m).finite()
    half = x.half()  # a half-precision tensor is summarised in float32
    assert summarize(half, proj, 16).mean.dtype == summarize(x, proj, 16).mean.dtype


def test_linear_predictor_loads_the_older_state_format(proj):
    """A state saved when the predictor kept ``gram``, ``cross`` and ``second`` (and its pending sums as a tuple)
    apart loads into the one moment matrix and goes on exactly as the state it was made from."""
    g = torch.Generator().manual_seed(8)
    a = LinearPredictor(every=1, refit=3, decay=0.8, tokens=32, ridge=1e-3)
    batches = [(_honest(i, 128) * 0.5 + 0.1 * torch.randn(128, D, generator=g), _honest(i, 128)) for i in range(10)]
    for x, ref in batches[:5]:
        a.update(x, ref, proj)
    state = a.state_dict()
    split = state["split"]

    def blocks(t):
        return t[:split, :split], t[:split, split:], t[split:, split:]

    gram, cross, second = blocks(state["moments"])
    old = {"gram": gram, "cross": cross, "second": second, "weights": state["weights"], "expected": state["expected"],
           "solves": state["solves"], "offered": state["offered"], "sums": blocks(state["sums"]),
           "rows": state["rows"], "pending": state["pending"]}  # fmt: skip
    b = LinearPredictor(every=1, refit=3, decay=0.8, tokens=32, ridge=1e-3)
    b.load_state_dict(old)
    for x, ref in batches[5:]:
        a.update(x, ref, proj)
        b.update(x, ref, proj)
    assert torch.allclose(a.weights, b.weights, rtol=1e-9, atol=1e-12) and a.expected == pytest.approx(b.expected)


def test_clip_tokens_caps_outlier_tokens_and_scales_the_reference_alike():
    g = torch.Generator().manual_seed(7)
    ref = torch.randn(2, 8, 16, generator=g)
    x = ref + 0.1 * torch.randn(2, 8, 16, generator=g)
    same_x, same_ref = clip_tokens(x, ref, 4.0)
    assert same_x is x and same_ref is ref  # nothing over the cap: the inputs themselves
    x[1, 3] *= 50.0
    norms = x.norm(dim=-1).flatten()
    cap = 4.0 * float(norms.square().median().sqrt())
    cx, cref = clip_tokens(x, ref, 4.0)
    assert float(cx[1, 3].norm()) == pytest.approx(cap, rel=1e-5)
    factor = cap / float(x[1, 3].norm())
    assert torch.allclose(cref[1, 3], ref[1, 3] * factor)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, 3] = False
    assert torch.equal(cx[keep], x[keep]) and torch.equal(cref[keep], ref[keep])
    assert x[1, 3].norm() > cap  # the inputs are not modified
    # non-finite stays non-finite: an infinite token becomes NaN, a NaN clips nothing
    x[0, 0, 0] = float("inf")
    assert not torch.isfinite(clip_tokens(x, ref, 4.0)[0]).all()
    x[0, 0, 0] = float("nan")
    assert not torch.isfinite(clip_tokens(x, ref, 4.0)[0]).all()
    # all zeros (a zeros attack) stays all zeros
    z = torch.zeros(2, 8, 16)
    assert torch.equal(clip_tokens(z, ref, 4.0)[0], z)


def test_a_token_whose_squared_norm_overflows_is_not_clipped_away():
    """One gradient element of 1e20 (finite) made its token's squared norm overflow float32: the clip factor was
    sqrt(limit / inf) = 0, the token vanished from the summaries, and the validator accepted and passed on a tensor
    holding values up to 3.4e38. Now it comes back unclipped and its summary is not finite: flagged, as forward."""
    g = torch.Generator().manual_seed(7)
    ref = torch.randn(2, 8, 16, generator=g)
    for value in (1e20, 3e38):
        x = ref + 0.1 * torch.randn(2, 8, 16, generator=g)
        x[1, 3, 5] = value
        cx, cref = clip_tokens(x, ref, 4.0)
        assert cx is x and cref is ref
        assert not summarize(cx, make_projections(16, 4, seed=0), 8, reference=cref).finite()
