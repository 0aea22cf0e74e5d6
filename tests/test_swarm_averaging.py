"""Data-parallel averaging between the replicas of one stage: the robust pull average (``robust_average``), the
checks on a peer's parameters (``decode_parameters``), and rounds over real P2P on 127.0.0.1 (forked, bounded)."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2
from swarm_helpers import SEED, LocalSwarm, make_manifest, run_swarm, start_dht

from swarm.identity import Identity
from swarm.protocol import TransportError, decode_parameters, encode_tensors
from swarm.records import StageState
from swarm.stage_server import StageServer, StageServerConfig, consensus_parameters, robust_average


def _params(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale for shape in ((8, 4), (4,), (3, 3, 2))]


def test_robust_average_is_the_plain_mean_when_nobody_is_clipped():
    own, peers = _params(0), [_params(1), _params(2), _params(3)]
    averaged, clipped, _ = robust_average(own, peers, [math.inf] * 3, spread=0.0)
    assert clipped == [0, 0, 0]
    for i, got in enumerate(averaged):
        torch.testing.assert_close(got, (own[i] + sum(p[i] for p in peers)) / 4, rtol=0, atol=1e-6)
    # a generous spread clips nobody either: every honest distance is within 2x the lower median here
    near = [[t + 0.01 * n for t in own] for n in (1.0, 1.2, 1.5)]
    averaged, clipped, _ = robust_average(own, near, [math.inf] * 3, spread=2.0)
    assert clipped == [0, 0, 0]
    torch.testing.assert_close(averaged[0], own[0] + 0.01 * (1.0 + 1.2 + 1.5) / 4, rtol=0, atol=1e-6)


def test_robust_average_bounds_a_poisoner():
    own = _params(0)
    honest = [[t + 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(s)) for t in own]
              for s in (1, 2, 3)]  # fmt: skip
    poisoner = [t * 1000.0 for t in own]
    averaged, clipped, _ = robust_average(own, [*honest, poisoner], [math.inf] * 3, spread=2.0)
    assert clipped == [0, 0, 0, 3]  # every tensor of the poisoner, none of the honest peers'
    for i, got in enumerate(averaged):
        distances = sorted(float((h[i] - own[i]).norm()) for h in honest)
        honest_part = own[i] + sum(h[i] - own[i] for h in honest) / 5
        # the poisoner moves the result by at most spread x the lower median distance / (peers + 1)
        lower_median = sorted([*distances, float((poisoner[i] - own[i]).norm())])[1]
        assert lower_median == distances[1]  # an honest peer's distance
        assert float((got - honest_part).norm()) <= 2.0 * lower_median / 5 * (1 + 1e-5)
    # the plain mean would have moved the parameters ~200x their own size
    plain, _, _ = robust_average(own, [*honest, poisoner], [math.inf] * 3, spread=0.0)
    assert float((plain[0] - own[0]).norm()) > 100 * float(own[0].norm())

    # one peer: no median to trust, the static bound alone applies
    bounds = [0.5, 0.25, 0.125]
    averaged, clipped, left_out = robust_average(own, [poisoner], bounds, spread=2.0)
    assert clipped == [3] and left_out == [0]
    for got, mine, bound in zip(averaged, own, bounds):
        assert float((got - mine).norm()) == pytest.approx(bound / 2, rel=1e-5)
    # ... unless the difference is beyond `reject` x the bound: then it is left out, and the replica does not move
    far = [1000.0 * float((p - o).norm()) for p, o in zip(poisoner, own)]
    averaged, clipped, left_out = robust_average(own, [poisoner], far, spread=2.0, reject=10.0)
    assert clipped == [0] and left_out == [0]  # within 10 x such a bound: averaged, unclipped
    averaged, clipped, left_out = robust_average(own, [poisoner], bounds, spread=2.0, reject=10.0)
    assert clipped == [0] and left_out == [3]
    assert all(torch.equal(got, mine) for got, mine in zip(averaged, own))
    # left out of one tensor's mean only, and of its count: the honest peers' mean stays exact
    mixed = [honest[0][0] * 1000.0, *honest[0][1:]]
    averaged, clipped, left_out = robust_average(own, [mixed, honest[1]], [1.0] * 3, spread=0.0, reject=10.0)
    assert clipped == [0, 0] and left_out == [1, 0]
    torch.testing.assert_close(averaged[0], (own[0] + honest[1][0]) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(averaged[1], (own[1] + honest[0][1] + honest[1][1]) / 3, rtol=0, atol=1e-6)


def test_consensus_parameters_trusts_a_majority_of_the_replicas_heard_never_one_peer():
    own = _params(0)
    honest = [[t + 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(s)) for t in own]
              for s in (1, 2, 3)]  # fmt: skip
    poisoner = [t * 100.0 for t in own]
    bounds = [1.0] * 3
    # one peer heard, or none: nothing is taken, whatever it serves
    for peers in ([], [honest[0]], [poisoner]):
        taken, reason = consensus_parameters(peers, bounds)
        assert taken is None and reason
    # two that agree (within the bounds): their mean; two that disagree: nothing
    taken, _ = consensus_parameters(honest[:2], bounds)
    for got, x, y in zip(taken, *honest[:2]):
        torch.testing.assert_close(got, (x + y) / 2, rtol=0, atol=0)
    taken, reason = consensus_parameters([honest[0], poisoner], bounds)
    assert taken is None and "disagree" in reason
    # three or more: the element-wise median, which a minority of poisoners cannot move outside the honest range
    for peers in ([honest[0], poisoner, honest[1]], [*honest, poisoner, [t * -50.0 for t in own]]):
        taken, reason = consensus_parameters(peers, bounds)
        assert "median" in reason
        for i, got in enumerate(taken):
            values = torch.stack([h[i] for h in honest[: 3 if len(peers) == 5 else 2]])
            assert bool((got >= values.min(0).values).all() and (got <= values.max(0).values).all())
    # an even count: the mean of the two middle values
    taken, _ = consensus_parameters([*honest, poisoner], bounds)
    for i, got in enumerate(taken):
        middle = torch.sort(torch.stack([*(h[i] for h in honest), poisoner[i]]), dim=0).values[1:3]
        torch.testing.assert_close(got, middle.mean(0), rtol=0, atol=1e-7)


def test_decode_parameters_checks_a_peer_reply():
    like = _params(0)
    good = runtime_pb2.ExpertResponse(tensors=encode_tensors(_params(1)))
    for got, want in zip(decode_parameters(good, like), _params(1)):
        assert torch.equal(got, want)
    wrong_shape = [like[0].reshape(4, 8), *like[1:]]
    nan = [like[0].clone().fill_(float("nan")), *like[1:]]
    ints = [torch.zeros(8, 4, dtype=torch.int32), *like[1:]]
    for tensors, message in ((like[:2], "expected 3 parameter tensors"), (wrong_shape, "does not match"),
                             (nan, "non-finite"), (ints, "dtype must be")):  # fmt: skip
        reply = runtime_pb2.ExpertResponse(tensors=[serialize_torch_tensor(t) for t in tensors])
        with pytest.raises(TransportError, match=message):
            decode_parameters(reply, like)


@pytest.mark.forked
@pytest.mark.timeout(150)
def test_replicas_pull_average_over_p2p_and_bound_a_poisoner():
    manifest = make_manifest(1)
    ids = [Identity.generate() for _ in range(3)]
    dhts = []
    try:
        dhts.append(start_dht(manifest, ids[0]))
        for identity in ids[1:]:
            dhts.append(start_dht(manifest, identity, dhts[0].get_visible_maddrs()))

        async def main():
            config = dict(stage=1, seed=SEED, average_every=1, average_timeout=20.0, average_clip=0.0)
            servers = [StageServer(StageServerConfig(**config), manifest, identity) for identity in ids]
            a, b, c = servers
            try:
                for server, dht in zip(servers, dhts):
                    await server.start(dht)

                def perturb(server, seed, scale):
                    with torch.no_grad():
                        for p in server.module.parameters():
                            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * scale)
                    server._version += 1  # what it serves changed (c fetched them on joining: they are cached)

                def params(server):
                    return [p.detach().clone() for p in server.module.parameters()]

                async def only(server, peers):  # the stage as `server` sees it in the DHT
                    async def view(**_):
                        return set(peers)

                    server._stage_peers = view
                    server._peer_view = (-math.inf, set())

                # two replicas: a pulls b's parameters and moves to the plain mean; then b pulls a's new ones
                await only(a, {b.peer_id})
                await only(b, {a.peer_id})
                perturb(b, 1, 0.1)
                pa, pb = params(a), params(b)
                assert await a.average_now()
                for got, x, y in zip(a.module.parameters(), pa, pb):
                    torch.testing.assert_close(got.detach(), (x + y) / 2, rtol=0, atol=1e-6)
                assert await b.average_now()
                for got, x, y in zip(b.module.parameters(), pa, pb):
                    torch.testing.assert_close(got.detach(), (y + (x + y) / 2) / 2, rtol=0, atol=1e-6)
                assert a.averaging["rounds"] == b.averaging["rounds"] == 1

                # a replica serves its parameters only to the stage's announced replicas: b no longer counts a as
                # one, so a's round hears nobody and leaves its parameters alone
                await only(b, set())
                before = params(a)
                assert not await a.average_now()
                assert a.averaging["rejected"] == 1 and a.averaging["failed"] == 1
                assert all(torch.equal(x, y) for x, y in zip(params(a), before))

                # a peer banned (or gone) while the round ran: its parameters are dropped
                await only(b, {a.peer_id})
                views = iter([{b.peer_id}, set()])

                async def banned_meanwhile(**_):
                    return next(views)

                a._stage_peers = banned_meanwhile
                assert not await a.average_now()
                assert a.averaging["rejected"] == 2 and a.averaging["failed"] == 2
                assert all(torch.equal(x, y) for x, y in zip(params(a), before))

                # three replicas, c a poisoner serving its parameters x100; the DHT's own view from here on
                for server in servers:
                    server.__dict__.pop("_stage_peers", None)
                    server._peer_view = (-math.inf, set())
                perturb(b, 2, 0.01)
                perturb(c, 3, 0.01)

                c.config.attack_averaging = 100.0  # the red-team option: c serves its parameters x100
                c._served = None
                pa, pb = params(a), params(b)
                assert await a.average_now(), a.averaging
                assert a.averaging["clipped"] == len(pa)  # every tensor of c's, none of b's
                for got, x, y in zip(a.module.parameters(), pa, pb):
                    honest_part = x + (y - x) / 3
                    bound = a.config.average_spread * float((y - x).norm()) / 3  # the lower median is b's distance
                    assert float((got.detach() - honest_part).norm()) <= bound * (1 + 1e-4)
                # replies streamed concurrently arrive whole: before streamed replies ended with an end marker (and
                # the server waited for the caller to hang up), 4 of 800 such fetches lost their last tensors
                like = params(a)
                for _ in range(150):
                    c._version += 1  # each time a fresh reply
                    await asyncio.gather(*(a._fetch_parameters(c.peer_id, like) for _ in range(4)))

                # a steady poisoner is no longer heard once clipped on most of its tensors 3 rounds running
                for _ in range(2):
                    assert await a.average_now()
                assert a.averaging["clipped"] == 3 * len(pa) and a.averaging["distrusted"] == 1
                assert await a.average_now()  # b alone is heard
                assert a.averaging["clipped"] == 3 * len(pa) and a.averaging["rounds"] == 5
                assert c.peer_id in a._unheard and b.peer_id not in a._unheard
            finally:
                for server in servers:
                    await server.shutdown()

        asyncio.run(main())
    finally:
        for dht in reversed(dhts):
            dht.shutdown()


@pytest.mark.forked
@pytest.mark.timeout(180)
def test_replicas_average_in_the_background_while_training():
    """1 stage x 2 replicas averaging every optimizer step: rounds run in the background during training (a replica
    alone in its stage skips them: tests/test_swarm_resilience.py). A round that fails on a loaded machine (its peer
    not yet announced, or past average_timeout) is counted and training goes on; the test then trains a few more steps
    to see a round succeed, rather than depend on the first ones' timing."""
    stage_config = {"average_every": 1, "average_timeout": 10.0, "accumulate": 2}
    swarm = LocalSwarm((2,), stage_config=stage_config)

    async def body(swarm: LocalSwarm):
        servers = list(swarm.servers.values())
        steps = 0
        while True:
            for _ in range(4 if steps == 0 else 1):
                await swarm.trainer.step(steps)
                steps += 1
            assert all(s.optimizer_steps >= 1 for s in servers)
            pending = [s._averaging for s in servers if s._averaging is not None]
            await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 30)
            if all(s.averaging["rounds"] >= 1 for s in servers) or steps >= 8:
                break
        assert all(s.averaging["rounds"] >= 1 for s in servers), [s.averaging for s in servers]
        assert all(s.averaging["clipped"] == 0 for s in servers), [s.averaging for s in servers]  # honest rounds
        assert all(s.averaging["rejected"] == 0 for s in servers), [s.averaging for s in servers]
        assert swarm.trainer.metrics.step_completed == [4] * steps
        # the replicas ended close: each round pulls them to their mean
        first, second = ([p.detach() for p in s.module.parameters()] for s in servers)
        gap = max(float((x - y).abs().max()) for x, y in zip(first, second))
        assert gap <= 4 * servers[0].config.lr, gap

    run_swarm(swarm, body)


@pytest.mark.forked
@pytest.mark.timeout(150)
def test_a_joining_replica_takes_its_stage_s_parameters_from_a_majority_of_its_peers():
    """1 stage x 3 replicas train; then replicas join. One that hears the honest replicas serves their average from
    its first request (JOINING, never routed to, until then); one that hears a poisoner beside one honest replica,
    or one peer alone, keeps its own parameters; one that hears all three takes their median, untouched by the
    poisoner. Then a replica knocked far from every peer takes their consensus in its next round."""
    swarm = LocalSwarm((3,), stage_config={"average_every": 1, "average_timeout": 10.0, "accumulate": 2})

    async def body(swarm: LocalSwarm):
        a, b, c = (swarm.servers[(1, r)] for r in range(3))
        assert all(s.sync is not None for s in (a, b, c))  # started with sync_on_join: c took a and b's mean
        for step in range(3):
            await swarm.trainer.step(step)
            for server in (a, b, c):
                await server.finish_step()
            await asyncio.gather(*(server.average_now() for server in (a, b, c)))
        c.config.attack_averaging = 100.0  # c now serves its parameters x100 to its peers
        c._served = None

        def params(server):
            return [p.detach().clone() for p in server.module.parameters()]

        async def join(view=None):
            identity = Identity.generate()
            dht = await asyncio.to_thread(start_dht, swarm.manifest, identity, swarm.initial_peers())
            server = StageServer(StageServerConfig(stage=1, seed=SEED, average_every=0, average_timeout=10.0),
                                 swarm.manifest, identity)  # fmt: skip
            initial = params(server)
            states = []
            real_sync = server.sync_now

            async def sync_now():  # what the DHT says of the joiner while it syncs
                from swarm.dht_schema import fetch_stages

                anns = await asyncio.to_thread(fetch_stages, dht, swarm.manifest.run_id, 0)
                states.extend(x.state for x in anns if x.peer == server.peer_id)
                return await real_sync()

            server.sync_now = sync_now
            if view is not None:
                async def only(**_):
                    return {p.peer_id for p in view}

                server._stage_peers = only
            try:
                await server.start(dht)
                return server, initial, states, params(server)
            finally:
                await server.shutdown()
                await asyncio.to_thread(dht.shutdown)

        # a and b must differ for "their mean" to say something: three replicas averaging at once from the same
        # snapshots can end identical (seen in a fresh clone's run), so b is nudged, well within what agreeing
        # replicas may differ by
        with torch.no_grad():
            for p in b.module.parameters():
                p.add_(1e-4 * torch.randn_like(p))
        b._served = None
        pa, pb = params(a), params(b)
        assert min(float((x - y).abs().max()) for x, y in zip(pa, pb)) > 0
        joiner, initial, states, got = await join(view=[a, b])
        assert states == [StageState.JOINING] and joiner.sync["synced"] and joiner.sync["peers"] == 2
        for t, x, y in zip(got, pa, pb):
            torch.testing.assert_close(t, (x + y) / 2, rtol=0, atol=1e-7)
        for view, why in (([a, c], "disagree"), ([b], "single")):
            joiner, initial, _, got = await join(view=view)
            assert not joiner.sync["synced"] and why in joiner.sync["reason"], joiner.sync
            assert all(torch.equal(x, y) for x, y in zip(got, initial))
        joiner, _, _, got = await join()  # the DHT's own view: a, b and the poisoner c
        assert joiner.sync["synced"] and joiner.sync["from"] == sorted(s.peer_id for s in (a, b, c)), joiner.sync
        for t, x, y in zip(got, pa, pb):
            assert bool((t >= torch.minimum(x, y)).all() and (t <= torch.maximum(x, y)).all())

        # a replica that finds every peer far beyond average_reject x its bound takes their consensus when they
        # agree (it is the one left behind); c is honest again, and a is knocked far off
        c.config.attack_averaging = 0.0
        c._served = None
        with torch.no_grad():
            for p in a.module.parameters():
                p.add_(1.0)
        a._version += 1
        pb, pc = params(b), params(c)
        assert await a.average_now()
        assert a.averaging["resynced"] == 1, a.averaging
        for t, x, y in zip(params(a), pb, pc):
            torch.testing.assert_close(t, (x + y) / 2, rtol=0, atol=1e-6)

    run_swarm(swarm, body)


def test_join_gpu_stage_has_an_average_every_option(tmp_path, capsys):
    from node.cli import main

    base = ["join", "--role", "gpu-stage", "--stage", "1", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--run-id", "r",
            "--authority", "00" * 32, "--identity", str(tmp_path / "s.key")]  # fmt: skip
    assert main([*base, "--average-every", "-1"]) == 2  # refused before anything starts
    message = "--average-every, --average-clip, --average-spread, --average-reject and --average-distrust must be >= 0"
    assert message in capsys.readouterr().err
    for option in ("--average-clip", "--average-spread", "--average-distrust", "--average-reject"):
        assert main([*base, option, "-1"]) == 2
        assert message in capsys.readouterr().err
    assert main([*base, "--average-peers", "0"]) == 2
    assert "--average-peers must be >= 1" in capsys.readouterr().err
    assert main([*base, "--attack-averaging", "nan"]) == 2
    assert "--attack-averaging must be a finite number" in capsys.readouterr().err
    validator = [*base[:2], "validator", *base[5:]]
    assert main([*validator, "--attack-averaging", "100"]) == 2
    assert "--attack-averaging are gpu-stage options" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["join", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--average-every N" in out and "--average-spread X" in out and "lower median" in out
    assert "--average-reject X" in out and "--no-sync" in out
    assert "--attack-averaging X RED-TEAM OPTION FOR TESTING ONLY" in out
