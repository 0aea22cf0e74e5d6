"""The in-process mesh: every group-A attack is flagged and banned, honest runs ban nobody, NaN never spreads."""

import math

import pytest

from sentinel.attacks import STRONGEST
from sentinel.config import SentinelConfig
from swarm.data import load_corpus
from swarm.mesh import Mesh, MeshConfig, MeshConfigError, choose_malicious

GROUP_A = ["zeros", "constant", "random", "scaling", "random_sign", "bias", "noise", "delay", "nonfinite", "mixed"]
REPORT_KEYS = {
    "precision", "recall", "f1", "malicious", "banned", "false_bans", "time_to_ban", "taint_precision",
    "taint_recall", "val_loss", "tokens_per_s", "validator_time_fraction", "config",
}


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_bytes=2 * 2**20)


def tiny(**kw) -> MeshConfig:
    base = dict(preset="tiny", stages=2, replicas=3, malicious_fraction=1 / 6, steps=18, warmup=10,
                microbatches=6, batch_size=2, eval_every=0, eval_batches=2, lr=1e-3)
    base.update(kw)
    return MeshConfig(**base)


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("attack", GROUP_A)
def test_every_group_a_attack_is_flagged_and_banned(attack, direction, corpus):
    result = Mesh(tiny(attack=attack, attack_direction=direction, seed=1), corpus).run()
    rep = result.report
    assert len(rep["malicious"]) == 1
    assert rep["banned"] == rep["malicious"], rep["banned"]
    assert rep["f1"] == 1.0
    assert any(e.kind == "flag" and e.worker in rep["malicious"] for e in result.events)
    assert math.isfinite(rep["val_loss"])


@pytest.mark.parametrize("seed", [2, 3])
def test_a_replay_is_banned_where_fit_fences_are_wide(seed, corpus):
    """The demo's 3 x 3 shape (benchmarks/quorum.py): stage 1's fit fence is about 9 (its window still holds the
    first predictors' distances), far above fit_max_fence, and only fit sees the delay attacker's replays there (at
    about 4x). Widened 2x more they are still flagged and the attacker banned; with no fence (fit_wide_scale 0, the
    rule of the thirteenth session) its replays went on and honest workers after it were banned instead."""
    shape = dict(preset="tiny", stages=3, replicas=3, malicious_fraction=0.23, microbatches=4, batch_size=4, lr=3e-3,
                 warmup=12, steps=30, eval_every=0, attack="delay", seed=seed)  # fmt: skip
    rep = Mesh(MeshConfig(**shape), corpus).run().report
    assert len(rep["malicious"]) == 2 and "s1r2" in rep["malicious"]
    assert sorted(rep["banned"]) == sorted(rep["malicious"]) and rep["false_bans"] == []
    dropped = Mesh(MeshConfig(**shape, sentinel=SentinelConfig(fit_wide_scale=0)), corpus).run().report
    assert "s1r2" not in dropped["banned"] and dropped["false_bans"]


@pytest.mark.parametrize("seed, steps", [(3, 13), (7, 34)])
def test_an_unusual_input_does_not_ban_an_honest_replica(seed, steps):
    """Honest `tiny` 2 x 2 meshes as benchmarks/honest_small.py runs them (lr 1e-3, 8 micro-batches, warm-up 5).
    Without input_explains a replica of the last stage was banned: seed 3 for its output's l2 at steps 11-12, seed 7
    for its input gradient's gain and l2 at steps 27-33, flags that came with unusual micro-batches (inputs, or
    gradients from the head, far from their own stream). With it nobody is banned; the same tensors are replaced."""
    shape = dict(preset="tiny", stages=2, replicas=2, steps=steps, warmup=5, seed=seed, eval_every=0)
    rep = Mesh(MeshConfig(**shape)).run().report
    assert rep["false_bans"] == [] and rep["malicious"] == []
    off = Mesh(MeshConfig(**shape, sentinel=SentinelConfig(input_explains=0))).run().report
    assert off["false_bans"] and off["tainted_microbatches"] == rep["tainted_microbatches"]


@pytest.mark.parametrize("seed", [0, 1])
def test_honest_runs_ban_nobody(seed):
    # exactly the benchmark's honest setting (small, 8 stages x 4 replicas, 30 warm-up steps of 60, the default
    # corpus), where 10 of 10 seeds banned nobody and 0.35% of micro-batches were tainted (seeds 0 and 1: 3 and 2 of
    # 480); the target is under 1%. Known gaps, not hidden (README): tiny 2 x 3 meshes with small
    # micro-batches ban honest workers in some seeds, and so does 16 x 11 with 8 micro-batches a step.
    cfg = MeshConfig(preset="small", stages=8, replicas=4, steps=60, warmup=30, seed=seed, eval_every=0)
    rep = Mesh(cfg).run().report
    assert rep["banned"] == []
    assert rep["malicious"] == []
    assert rep["tainted_microbatches"] < 0.01 * rep["microbatches"]


@pytest.mark.parametrize("learn_tainted", [0.0, None])
def test_the_paper_scale_ban_front_passes_a_stage_whose_attackers_were_banned(learn_tainted):
    """The paper's 16 x 11, 37.5% `mixed` attackers, 8 micro-batches a step (benchmarks/results/paper_scale_176.md,
    about 25 s). Stage 6's 4 attackers are banned at steps 38-42; drift is then judged among the replicas left
    (drift_active_majority). Counting the banned among the senders, as before, every honest replica of stage 6 was
    banned, the stage then tainted every micro-batch, and no attacker behind it was banned (F1 0.51). With
    learn_tainted 0 (the paper's rule) this guards drift_active_majority alone: 1 honest ban, F1 0.83; with the
    default (0.25) the starved deep stages keep learning and nobody honest is banned (F1 0.97)."""
    from sentinel.config import SentinelConfig

    sentinel = SentinelConfig() if learn_tainted is None else SentinelConfig(learn_tainted=learn_tainted)
    cfg = MeshConfig(preset="tiny", stages=16, replicas=11, malicious_fraction=0.375, attack="mixed", steps=60,
                     warmup=30, seed=0, eval_every=0, sentinel=sentinel)  # fmt: skip
    rep = Mesh(cfg).run().report
    banned, malicious = set(rep["banned"]), set(rep["malicious"])
    for stage in range(1, 17):
        honest = {f"s{stage}r{r}" for r in range(11)} - malicious
        assert honest - banned, f"every honest replica of stage {stage} banned"
    assert max(int(w[1:].split("r")[0]) for w in banned & malicious) >= 10  # the ban front got past stage 6
    if learn_tainted is None:
        assert rep["false_bans"] == [] and rep["f1"] >= 0.9, (rep["false_bans"], rep["f1"])
    else:
        assert len(rep["false_bans"]) <= 2 and rep["f1"] >= 0.75, rep["false_bans"]


def test_nan_attack_never_makes_the_loss_non_finite(corpus):
    cfg = tiny(attack="nonfinite", attack_direction="both", malicious_fraction=0.34, seed=2)
    result = Mesh(cfg, corpus).run()
    assert all(math.isfinite(x) for x in result.history["loss"])
    assert math.isfinite(result.report["val_loss"])
    undefended = Mesh(tiny(attack="nonfinite", attack_direction="both", malicious_fraction=0.34, seed=2,
                           defense=False), corpus).run()
    assert not math.isfinite(undefended.report["val_loss"])  # the attack is real: without SENTINEL it wins


def test_report_keys_and_config(corpus):
    rep = Mesh(tiny(attack="zeros", steps=12, warmup=8), corpus).run().report
    assert REPORT_KEYS <= set(rep)
    assert set(rep["time_to_ban"]) == {"median", "p95", "max", "never"}
    assert rep["config"]["attack"] == "zeros" and rep["config"]["sentinel"]["beta_forward"] == 0.9
    assert rep["tokens_per_s"] > 0 and 0 <= rep["validator_time_fraction"]


def test_drop_mode_and_mesh_validation(corpus):
    from sentinel.config import SentinelConfig

    rep = Mesh(tiny(attack="scaling", sentinel=SentinelConfig(replacement="drop")), corpus).run().report
    assert rep["banned"] == rep["malicious"]
    with pytest.raises(MeshConfigError):
        tiny(stages=0)
    with pytest.raises(ValueError):
        tiny(attack_direction="sideways")


def test_choose_malicious_spreads_and_keeps_an_honest_replica():
    chosen = choose_malicious(stages=8, replicas=4, fraction=0.375, seed=0)
    assert len(chosen) == 12
    per_stage = [sum(w.startswith(f"s{s}r") for w in chosen) for s in range(1, 9)]
    assert sorted(per_stage) == [1] * 4 + [2] * 4
    assert choose_malicious(8, 4, 0.375, 0) == chosen
    assert all(n <= 1 for n in (sum(w.startswith(f"s{s}r") for w in choose_malicious(2, 2, 0.9, 0)) for s in (1, 2)))
    assert STRONGEST["scaling"] == {"lam": -1}


def test_several_validators_split_the_checks_and_ban_by_quorum(corpus):
    """Two validators, as in a swarm: each checks its share of the traffic (one check each, at random) or all of it
    (check_fanout 2, the default with quorum 2) with its own monitors and ledger; a worker is banned
    swarm-wide (and routed around) at the step the quorum's last validator bans it."""
    settings = ((1, 1), (2, 1), (2, 2))
    runs = {(q, f): Mesh(tiny(attack="zeros", seed=1, validators=2, ban_quorum=q, check_fanout=f), corpus)
            for q, f in settings}  # fmt: skip
    reports = {key: mesh.run().report for key, mesh in runs.items()}
    for (q, f), mesh in runs.items():
        a, b = mesh.validators
        assert a is not b and a.monitors and b.monitors
        seen = [sum(m.n_accepted for m in v.monitors.values()) for v in mesh.validators]
        assert all(n > 0 for n in seen), seen  # both learnt
        if f == 2:  # both saw every tensor
            assert seen[0] == seen[1]
            assert a.ledger.state_dict() == b.ledger.state_dict()  # the same evidence, the same judgement
        rep = reports[(q, f)]
        assert rep["config"]["validators"] == 2 and rep["config"]["ban_quorum"] == q
        assert rep["banned"] == rep["malicious"] and rep["false_bans"] == []
        local = {w: sorted(v.ledger.banned()[w] for v in mesh.validators if w in v.ledger.banned())
                 for w in rep["malicious"]}  # fmt: skip
        assert rep["validator_bans"] == [sorted(v.ledger.banned()) for v in mesh.validators]
        for worker, steps in local.items():
            assert len(steps) >= q and rep["ban_steps"][worker] == steps[q - 1]
            bans = [e for e in mesh.events if e.kind == "ban" and e.worker == worker]
            assert [e.step for e in bans] == [steps[q - 1]]
    # one check each: the validators split the traffic; two: each saw all of it, twice the checks
    split, both = runs[(2, 1)], runs[(2, 2)]
    assert sum(sum(m.n_accepted for m in v.monitors.values()) for v in split.validators) < both.n_checks
    assert both.n_checks > 1.5 * split.n_checks
    with pytest.raises(MeshConfigError):
        tiny(validators=2, ban_quorum=3)
    with pytest.raises(MeshConfigError):
        tiny(validators=0)
    with pytest.raises(MeshConfigError):
        tiny(validators=2, check_fanout=3)


def test_balanced_routing_shares_each_step_evenly_and_still_catches_an_attacker(corpus):
    """routing="balanced": every step, each of a stage's 3 replicas serves 2 of the 6 micro-batches (random: an
    independent draw each); a banned replica gets none. The attacker is still banned, and nobody honest."""
    mesh = Mesh(tiny(routing="balanced", attack="zeros"), corpus)
    for _ in range(5):
        mesh.plan_step()
        routes = [mesh.route(i) for i in range(6)]
        for s in range(2):
            assert sorted(r[s] for r in routes) == [0, 0, 1, 1, 2, 2]
    rep = mesh.run().report
    assert rep["banned"] == rep["malicious"] and not rep["false_bans"]
    mesh.plan_step()
    routes = [mesh.route(i) for i in range(6)]
    for worker in rep["banned"]:  # "s{stage}r{replica}"
        stage, replica = (int(x) for x in worker[1:].split("r"))
        assert replica not in {r[stage - 1] for r in routes}
    random = Mesh(tiny(), corpus)
    random.plan_step()
    assert random.plan is None and any(
        sorted(random.route(i)[0] for i in range(6)) != [0, 0, 1, 1, 2, 2] for _ in range(10)
    )
    with pytest.raises(MeshConfigError, match="routing"):
        tiny(routing="nope")
