"""Resilience of the swarm over real hivemind P2P on 127.0.0.1 (in-process services, one DHT each; forked, bounded):
a stage replica that dies mid-run costs no micro-batch, and an attacking replica is banned swarm-wide and routed
around while training goes on."""

from __future__ import annotations

import asyncio
import copy
import functools
import math
import os
import time
from collections import deque

import numpy as np
import psutil
import pytest
import torch
from hivemind.utils import get_dht_time
from swarm_helpers import CORPUS, RUN, SEED, LocalSwarm, run_swarm, start_dht

from sentinel.attacks import MaliciousBehaviour, make_attack
from sentinel.config import SentinelConfig
from swarm.dht_schema import (
    DHT_OP_TIMEOUT,
    SentinelDHT,
    SentinelRecordValidator,
    SwarmView,
    banned_peers,
    fetch_manifest,
    fetch_stages,
    fetch_strikes,
    fetch_view,
    manifest_copies,
    release_p2p_replica,
)
from swarm.identity import Identity
from swarm.local import flood_manifest_key, flood_stage_key, local_manifest
from swarm.protocol import Busy, TransportError
from swarm.records import ReplicaDirectory, StageAnnouncement, StageState
from swarm.stage_server import StageServer, StageServerConfig
from swarm.trainer import NoRoute, Trainer, TrainerConfig, choose_replica


def _view_of(monkeypatch, stages=lambda k: [], directories=lambda k: []) -> None:
    """The trainer's DHT read of its routing view, replaced: ``stages(k)`` and ``directories(k)`` for each stage
    index k (0-based), no validators."""
    import swarm.trainer as trainer_module

    def fetch_view(dht, run, stage_indices, boundaries):
        stage_indices, boundaries = list(stage_indices), list(boundaries)
        return SwarmView({k: stages(k) for k in stage_indices}, {k: directories(k) for k in stage_indices},
                         {b: [] for b in boundaries})  # fmt: skip

    monkeypatch.setattr(trainer_module, "fetch_view", fetch_view)


def test_choose_replica_prefers_healthy_then_recently_failed_then_banned():
    anns = [StageAnnouncement("r", 0, peer, StageState.ONLINE, (0, 1), 1.0, bytes(32)) for peer in "abc"]
    rng = np.random.default_rng(0)
    pick = lambda banned, exclude, avoid: {choose_replica(anns, banned, exclude, rng, avoid).peer for _ in range(50)}  # noqa: E731
    assert pick(set(), set(), {"a"}) == {"b", "c"}  # a failed recently: avoided
    assert pick({"c"}, set(), {"a"}) == {"b"}
    assert pick({"c"}, {"b"}, {"a"}) == {"a"}  # a recently failed honest replica beats a banned one
    assert pick({"b", "c"}, {"a"}, {"a"}) == {"b", "c"}  # only banned ones left: bans ignored, as in the mesh
    assert choose_replica(anns, set(), {"a", "b", "c"}, rng, {"a"}) is None  # excluded (failed in this call): never


@pytest.mark.forked
@pytest.mark.timeout(120)
def test_replica_killed_mid_microbatch_loses_no_step():
    """2 stages x 2 replicas. At step 2 the stage-1 replica that just served a forward dies before that micro-batch's
    backward: the backward goes to the other replica (stateless recompute from the kept input), later forwards that
    still pick the dead replica (its ONLINE record outlives it) are retried there, and it is then avoided. When the
    last replica of the stage dies too, the step fails fast (bounded retries)."""
    steps, microbatches = 5, 4
    config = TrainerConfig(seed=SEED, batch_size=2, microbatches=microbatches, warmup=100, rpc_timeout=10.0,
                           max_inflight=1)  # the kill is timed against one micro-batch at a time
    swarm = LocalSwarm((2, 2), trainer_config=config)

    async def body(swarm: LocalSwarm):
        trainer = swarm.trainer
        assert all(len(trainer.stages[k]) == 2 for k in (1, 2))
        stage1 = {swarm.servers[(1, r)].peer_id: (1, r) for r in range(2)}
        killed: list = []
        armed = [False]
        original = trainer._stage_call

        async def stage_call(peer, method, tensors, meta):
            out = await original(peer, method, tensors, meta)
            if armed[0] and not killed and method == "rpc_forward" and peer in stage1:
                killed.append(peer)
                await swarm.kill(stage1[peer])  # before this micro-batch's backward reaches it
            return out

        trainer._stage_call = stage_call
        losses = []
        for step in range(steps):
            armed[0] = step >= 2
            losses.append(await trainer.step(step))
        assert len(killed) == 1
        dead_peer = killed[0]
        _, r = stage1[dead_peer]
        dead, alive = swarm.servers[(1, r)], swarm.servers[(1, 1 - r)]

        # every step ran all its micro-batches; nothing was dropped, tainted or lost
        assert len(trainer.metrics.losses) == steps and all(math.isfinite(x) for x in losses)
        assert trainer.metrics.step_completed == [microbatches] * steps
        assert trainer.metrics.completed == trainer.metrics.microbatches == steps * microbatches
        assert trainer.metrics.dropped == 0 and trainer.metrics.tainted == 0
        # a reroute happened: at least the backward of the micro-batch the dead replica had forwarded
        assert trainer.metrics.retries >= 1 and dead_peer in trainer.avoided()
        # each stage did exactly one backward per micro-batch, over its replicas (the dead one's forward included)
        for k in (1, 2):
            assert sum(swarm.servers[(k, r)].backward_calls for r in range(2)) == steps * microbatches
        # the dead replica served its last forward at step 2 and no backward for it; the survivor took the rest
        assert dead.forward_calls >= 1 and dead.forward_calls + alive.forward_calls >= steps * microbatches
        assert dead.backward_calls == dead.forward_calls - 1
        assert trainer.metrics.stage_calls[dead_peer] == dead.forward_calls + dead.backward_calls
        assert swarm.validator.n_checks == 4 * steps * microbatches  # 2 forward + 2 backward checks each

        # retries are bounded: with every replica of stage 1 dead the step fails fast with NoRoute, it does not hang
        await swarm.kill((1, 1 - r))
        start = time.monotonic()
        with pytest.raises(NoRoute):
            await trainer.step(steps)
        assert time.monotonic() - start < 30

    run_swarm(swarm, body)


@pytest.mark.forked
@pytest.mark.timeout(120)
def test_attacking_replica_is_banned_swarm_wide_and_routed_around():
    """Stage 1 has an honest replica and an attacker (non-finite forward outputs from step 4, after
    an honest warm-up long enough for every monitor to see 16 tensors). The validator taints,
    strikes and bans it; the ban is visible from any peer's DHT; the trainer then sends it nothing while steps keep
    completing."""
    microbatches = 4
    attack = MaliciousBehaviour(worker=0, attack=make_attack("nonfinite"), directions="forward", onset=4, seed=0)
    # a small learning rate keeps honest traffic stationary: this test is about routing, not about drift (with one
    # honest replica per stage the drift guard, which needs 2 replicas flagged together, cannot forgive drift)
    config = TrainerConfig(seed=SEED, batch_size=2, microbatches=microbatches, warmup=4, lr=1e-4)
    swarm = LocalSwarm((2, 1), attackers={(1, 0): attack}, sentinel=SentinelConfig(ban_level=2, drift_senders=2),
                       trainer_config=config, stage_config={"lr": 1e-4})  # fmt: skip

    async def body(swarm: LocalSwarm):
        trainer = swarm.trainer
        bad = swarm.servers[(1, 0)].peer_id
        honest = swarm.servers[(1, 1)]
        step = 0
        while bad not in trainer.banned:  # strikes of step s are settled when step s + 1's first check arrives
            assert step < 12, "the attacker was never banned"
            await trainer.step(step)
            await trainer.refresh()  # as `join --role trainer` does after every step
            step += 1
        ban_step = step
        assert trainer.banned == {bad}
        # swarm-wide: any peer reading the DHT (here the honest replica's own node) sees the quorum ban
        strikes = await asyncio.to_thread(fetch_strikes, swarm.dhts[(1, 1)], RUN, bad)
        assert banned_peers(strikes, swarm.manifest) == {bad}
        calls_at_ban = (swarm.servers[(1, 0)].forward_calls, trainer.metrics.stage_calls[bad])
        honest_before = honest.forward_calls
        assert trainer.metrics.tainted >= 2  # its outputs were tainted and replaced before the ban

        tainted = trainer.metrics.tainted
        for step in range(ban_step, ban_step + 3):
            loss = await trainer.step(step)
            await trainer.refresh()
            assert math.isfinite(loss)
        # after the ban: nothing routed to the attacker, every micro-batch completed on the honest replica, clean
        assert (swarm.servers[(1, 0)].forward_calls, trainer.metrics.stage_calls[bad]) == calls_at_ban
        assert honest.forward_calls - honest_before == 3 * microbatches
        assert trainer.metrics.step_completed[ban_step:] == [microbatches] * 3
        assert trainer.metrics.tainted == tainted and trainer.metrics.dropped == 0
        assert trainer.banned == {bad}  # and no honest peer
        # stage 2 has one replica: its averaging rounds (every 4 optimizer steps by default) are skipped, not waited on
        lone = swarm.servers[(2, 0)]
        assert lone.averaging["skipped"] >= 1 and lone.averaging["rounds"] == lone.averaging["failed"] == 0

    run_swarm(swarm, body)


@pytest.mark.forked
@pytest.mark.timeout(120)
def test_pipelined_microbatches_overlap_and_a_failed_one_cancels_the_step():
    """With max_inflight=4 the micro-batches of a step really are in flight together (more than one stage or
    validator call open at once), every one completes, and the data order is the sequential one. When one
    micro-batch fails for good, the step raises that error and cancels the others (none is left running)."""
    microbatches = 4
    config = TrainerConfig(seed=SEED, batch_size=2, microbatches=microbatches, warmup=100, max_inflight=4)
    swarm = LocalSwarm((1, 1), trainer_config=config)

    async def body(swarm: LocalSwarm):
        trainer = swarm.trainer
        open_calls, peak = [0], [0]
        original = trainer._stage_call

        async def stage_call(peer, method, tensors, meta):
            open_calls[0] += 1
            peak[0] = max(peak[0], open_calls[0])
            try:
                return await original(peer, method, tensors, meta)
            finally:
                open_calls[0] -= 1

        trainer._stage_call = stage_call
        probe = copy.deepcopy(trainer.sampler)
        expected = [probe.sample() for _ in range(2 * microbatches)]  # the order a sequential run draws
        seen = []
        microbatch = trainer.microbatch

        async def recording(step, mb, batch=None):
            seen.append((mb, batch[0].clone()))
            return await microbatch(step, mb, batch)

        trainer.microbatch = recording
        for step in range(2):
            assert math.isfinite(await trainer.step(step))
        assert peak[0] > 1, "micro-batches never overlapped"
        assert trainer.metrics.step_completed == [microbatches] * 2 and trainer.metrics.dropped == 0
        for mb, x in seen:  # micro-batch i of step s got the (s * M + i)-th batch of the sequential order
            assert torch.equal(x, expected[mb][0])

        cancelled, running = [], set()

        async def failing(step, mb, batch=None):
            running.add(mb)
            try:
                if mb % microbatches == 1:
                    await asyncio.sleep(0.05)
                    raise NoRoute("test: no replica left")
                await asyncio.sleep(1.0)  # still in flight when the other one fails
                return await microbatch(step, mb, batch)
            except asyncio.CancelledError:
                cancelled.append(mb % microbatches)
                raise
            finally:
                running.discard(mb)

        trainer.microbatch = failing
        with pytest.raises(NoRoute):
            await trainer.step(2)
        assert sorted(cancelled) == [0, 2, 3] and not running  # the others were cancelled and have finished

    run_swarm(swarm, body)


@pytest.mark.forked
@pytest.mark.timeout(120)
def test_nodes_whose_dht_died_still_shut_down_and_save_their_state(tmp_path):
    """A DHT process (and its p2pd) can die under a running node. The node's shutdown then neither waits out the DHT
    timeout on each record it publishes nor fails on handlers it cannot unregister: it finishes, and the validator
    still saves its state (strikes and baselines are not lost)."""
    swarm = LocalSwarm((1, 1), trainer_config=TrainerConfig(seed=SEED, batch_size=2, microbatches=2, warmup=100))

    async def body(swarm: LocalSwarm):
        trainer = swarm.trainer
        for step in range(2):
            assert math.isfinite(await trainer.step(step))
        state = tmp_path / "validator.pt"
        swarm.validator.config.state_path = str(state)
        for name in ((1, 0), "validator"):
            dht = swarm.dhts[name]
            daemons = psutil.Process(dht.pid).children(recursive=True)  # its p2pd
            for proc in daemons:
                proc.kill()
            psutil.wait_procs(daemons, timeout=10)
            dht.kill()  # SIGKILL; left to multiprocessing to reap, as a process that died on its own would be
            dht.join(10)
        server = swarm.servers[(1, 0)]
        start = time.monotonic()
        await server.shutdown()  # announces OFFLINE (to a dead DHT), then unregisters its handlers (dead daemon)
        await swarm.validator.shutdown()  # settles and publishes its strikes, unregisters, saves its state
        assert time.monotonic() - start < DHT_OP_TIMEOUT  # a dead DHT is noticed, not waited on
        saved = torch.load(state, weights_only=True)
        assert sum(m["n_accepted"] for m in saved["monitors"].values()) == swarm.validator.n_checks == 2 * 2 * 4

    run_swarm(swarm, body)


@pytest.mark.forked
@pytest.mark.timeout(120)
def test_a_trainer_restarted_from_an_older_checkpoint_redoes_its_steps():
    """A trainer that crashed after step 2 with a checkpoint of step 0 (``join --checkpoint-every``) redoes steps 1
    and 2 under the same step and micro-batch numbers, on stage servers that applied the first ones. The stages
    answer every redo (before 2026-11-29 they refused them as replays and the restarted trainer could not train at
    all) and apply none of them (before 2026-11-30 a redo with other tensors was applied a second time); step 3
    trains as usual."""
    config = TrainerConfig(seed=SEED, batch_size=2, microbatches=2, warmup=100)
    swarm = LocalSwarm((1, 1), trainer_config=config)

    async def body(swarm: LocalSwarm):
        trainer = swarm.trainer
        await trainer.step(0)
        saved = copy.deepcopy({"embedding": trainer.embedding.state_dict(), "head": trainer.head.state_dict(),
                               "optimizer": trainer.optimizer.state_dict(), "sampler": trainer.sampler.state_dict()})
        for step in (1, 2):
            await trainer.step(step)
        trainer.embedding.load_state_dict(saved["embedding"])  # the restart, from the checkpoint of step 0
        trainer.head.load_state_dict(saved["head"])
        trainer.optimizer.load_state_dict(saved["optimizer"])
        trainer.sampler.load_state_dict(saved["sampler"])
        for step in (1, 2, 3):
            assert math.isfinite(await trainer.step(step))
        assert trainer.metrics.step_completed == [2] * 6 and trainer.metrics.dropped == 0
        assert all(server.rejected == {} for server in swarm.servers.values())
        servers = swarm.servers.values()
        assert sum(server.backward_calls for server in servers) == 2 * 2 * 4  # steps 0, 1, 2 and 3, once each
        # the redos of steps 1 and 2, answered as micro-batches seen already (they are in the stages' replay window;
        # past it, step 1's would be answered as a step applied)
        assert sum(server.backward_replays + server.backward_stale for server in servers) == 2 * 2 * 2
        assert all(server.optimizer_steps == 3 for server in servers)  # steps 0-2; step 3's waits for step 4

    run_swarm(swarm, body)


class RecordingDHT:
    """A DHT whose every get and store is answered at once (an exception for keys containing ``fail``), and which
    records, in ``events``, when each was issued and when its result was waited for."""

    def __init__(self, fail: str, result):
        self.events: list[str] = []
        self.fail, self.value = fail, result

    def _future(self, what: str, key: str):
        import concurrent.futures

        self.events.append(f"{what} {key}")
        future = concurrent.futures.Future()
        if self.fail in key:
            future.set_exception(RuntimeError("refused"))
        else:
            future.set_result(self.value)
        original = future.result

        def result(timeout=None):
            self.events.append(f"wait {key}")
            return original(timeout)

        future.result = result
        return future

    def get(self, key, latest, return_future):
        assert latest and return_future
        return self._future("get", key)

    def store(self, key, value, expiration_time, subkey, return_future):
        assert return_future
        return self._future("store", key)

    def is_alive(self):
        return True


def test_the_view_is_read_with_every_get_in_flight_at_once():
    """fetch_view reads its 3S + 1 keys all at once (a flooded stage key takes seconds to fail, and one after
    another a trainer paid that once per flooded stage), one get per key (a get_many shares one reply limit at each
    peer: a flooded key would fail the others with it), and a get that failed leaves its key empty, not the view."""
    dht = RecordingDHT(fail=".stage.1", result=None)
    view = fetch_view(dht, RUN, range(2), range(3))
    events = dht.events
    gets = [e for e in events if e.startswith("get ")]
    assert len(gets) == 7 and len(set(gets)) == 7  # 2 stage keys, 2 directories, 3 validator boundaries
    assert events[:7] == gets  # every get issued before the first wait
    assert view == SwarmView({0: [], 1: []}, {0: [], 1: []}, {0: [], 1: [], 2: []})


def test_a_ban_the_trainer_has_seen_stays_whatever_a_later_read_misses(monkeypatch):
    """Bans are for the whole run: a peer once banned by the quorum stays out of the trainer's routing when a later
    DHT read does not show it (a read that timed out, a record not yet published again)."""
    import swarm.trainer as trainer_module

    trainer_id = Identity.generate()
    manifest = local_manifest(RUN, "tiny", 1, Identity.generate(), trainer_id, Identity.generate())
    trainer = Trainer(TrainerConfig(seed=SEED), manifest, trainer_id, CORPUS)
    reads = iter([{"QmBad"}, set(), {"QmWorse"}])
    _view_of(monkeypatch)
    monkeypatch.setattr(trainer_module, "fetch_banned", lambda dht, manifest, peers: next(reads))
    for expected in ({"QmBad"}, {"QmBad"}, {"QmBad", "QmWorse"}):
        asyncio.run(trainer.refresh())
        assert trainer.banned == expected


def test_a_banned_replica_restarted_under_a_new_peer_id_with_its_key_stays_banned(monkeypatch):
    """Strikes are per peer id, and a node without a fixed libp2p identity gets a new one on every restart: a banned
    replica restarted with the same --identity came back unbanned (the operator review). The trainer now bans the
    key that announced a banned peer too; another key is another volunteer."""
    import swarm.trainer as trainer_module

    trainer_id = Identity.generate()
    manifest = local_manifest(RUN, "tiny", 1, Identity.generate(), trainer_id, Identity.generate())
    trainer = Trainer(TrainerConfig(seed=SEED), manifest, trainer_id, CORPUS)
    bad_key, good_key = bytes([1]) * 32, bytes([2]) * 32

    def announce(*peers):
        return [StageAnnouncement(RUN, 0, peer, StageState.ONLINE, (0, 1), 1.0, owner) for peer, owner in peers]

    views = iter([(announce(("QmBad", bad_key), ("QmGood", good_key)), {"QmBad"}),
                  (announce(("QmReborn", bad_key), ("QmGood", good_key)), set())])  # fmt: skip
    view = {}
    _view_of(monkeypatch, lambda k: view["stages"], lambda k: view.get("directories", []))
    monkeypatch.setattr(trainer_module, "fetch_banned", lambda dht, manifest, peers: view["banned"])
    for expected in ({"QmBad"}, {"QmBad", "QmReborn"}):
        view["stages"], view["banned"] = next(views)
        asyncio.run(trainer.refresh())
        assert trainer.banned == expected
    assert trainer.banned_owners == {bad_key}
    assert {trainer._pick_stage(1, set()) for _ in range(20)} == {"QmGood"}
    # a stranger cannot turn this against an honest replica: its key, banned for announcing a banned peer, also
    # announces QmGood, which QmGood's own key announces too: not banned
    stranger = bytes([3]) * 32
    view["stages"] = announce(("QmBad", stranger), ("QmGood", stranger), ("QmGood", good_key))
    view["banned"] = set()
    asyncio.run(trainer.refresh())
    assert stranger in trainer.banned_owners and "QmGood" not in trainer.banned


def test_replicas_listed_only_by_the_validators_directories_are_routed_to(monkeypatch):
    """Anyone can fill a stage's announcement key until a fresh reader gets nothing from it (about 20 000 self-signed
    announcements at each node holding it: benchmarks/dht_flood.py). The validators' directories list the replicas
    whose outputs they accepted, and only the manifest's validators can write them: a trainer whose read of the
    announcements came back empty routes to those replicas, checks them for bans like any other, and does not ban
    by key for them (the directory's writer is not the replica's announcer)."""
    import swarm.trainer as trainer_module

    trainer_id, validator = Identity.generate(), Identity.generate()
    manifest = local_manifest(RUN, "tiny", 1, validator, trainer_id, Identity.generate())
    trainer = Trainer(TrainerConfig(seed=SEED), manifest, trainer_id, CORPUS)
    asked: list[set[str]] = []

    def banned(dht, manifest, peers):
        asked.append(set(peers))
        return {"QmListedBad"} & set(peers)

    directory = ReplicaDirectory(RUN, 0, ("QmListed", "QmListedBad"), validator.public_key)
    _view_of(monkeypatch, lambda k: [], lambda k: [directory])  # the flooded key: nothing read
    monkeypatch.setattr(trainer_module, "fetch_banned", banned)
    asyncio.run(trainer.refresh())
    listed = {a.peer: a for a in trainer.stages[1]}
    assert set(listed) == {"QmListed", "QmListedBad"} and asked == [{"QmListed", "QmListedBad"}]
    assert all(a.state == StageState.ONLINE and a.span == tuple(manifest.layer_spans[0]) for a in listed.values())
    assert trainer.banned == {"QmListedBad"} and trainer.banned_owners == set()  # the validator's key: not banned
    assert {trainer._pick_stage(1, set()) for _ in range(20)} == {"QmListed"}
    # announced and listed: one entry, the announcement's
    ann = StageAnnouncement(RUN, 0, "QmListed", StageState.ONLINE, (0, 1), 7.0, bytes([9]) * 32)
    _view_of(monkeypatch, lambda k: [ann], lambda k: [directory])
    asyncio.run(trainer.refresh())
    assert [a for a in trainer.stages[1] if a.peer == "QmListed"] == [ann] and len(trainer.stages[1]) == 2


def test_busy_peer_is_sidestepped_briefly_and_a_failed_one_for_longer():
    """A Busy answer (a healthy peer at its stream limit) costs that peer ``busy_backoff`` seconds of avoidance and
    no failure count; a transport failure costs ``failure_ban`` seconds, doubling."""
    trainer_id = Identity.generate()
    manifest = local_manifest(RUN, "tiny", 1, Identity.generate(), trainer_id, Identity.generate())
    trainer = Trainer(TrainerConfig(seed=SEED, busy_backoff=1.0, failure_ban=15.0), manifest, trainer_id, CORPUS)
    order = iter(["full", "dead", "good"])
    answers = {"full": Busy("2 streams in hand"), "dead": TransportError("connection refused")}

    async def attempt(peer):
        if peer in answers:
            raise answers[peer]
        return "ok"

    start = time.monotonic()
    peer, result = asyncio.run(trainer._with_retries(lambda exclude: next(order), attempt))
    assert (peer, result) == ("good", "ok") and trainer.metrics.retries == 2 and trainer.metrics.busy == 1
    (busy_until, busy_failures), (dead_until, dead_failures) = trainer._down["full"], trainer._down["dead"]
    assert busy_failures == 0 and busy_until - start <= 1.0 + (time.monotonic() - start)
    assert dead_failures == 1 and dead_until - start >= 15.0 - 1e-6
    assert trainer.avoided() == {"full", "dead"}


def test_a_peer_failing_again_while_avoided_is_warned_of_once(caplog):
    """A peer tried again while it is avoided (the least bad one left: the only honest replica of a stage beside
    banned ones) fails fast, again and again; the trainer logged a warning at every try (about 60 in 5 s with the
    demo's only honest stage-1 replica frozen). It warns once per avoidance now, and again once it has expired."""
    import logging

    trainer_id = Identity.generate()
    manifest = local_manifest(RUN, "tiny", 1, Identity.generate(), trainer_id, Identity.generate())
    trainer = Trainer(TrainerConfig(seed=SEED, failure_ban=15.0), manifest, trainer_id, CORPUS)
    with caplog.at_level(logging.DEBUG, logger="swarm.trainer"):
        for _ in range(5):
            trainer._failed("frozen", TransportError("all dials failed"))
        trainer._down["frozen"] = (time.monotonic() - 1.0, trainer._down["frozen"][1])  # its avoidance expired
        trainer._failed("frozen", TransportError("all dials failed"))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "frozen" in r.getMessage()]
    quiet = [r for r in caplog.records if r.levelno == logging.DEBUG and "failed again" in r.getMessage()]
    assert len(warned) == 2 and len(quiet) == 4
    assert trainer._down["frozen"][1] == 6  # every failure still counts


def test_replicas_that_never_answered_get_a_bounded_share_and_their_own_retry_budget():
    """Anyone may announce a replica. 50 announcements of peers that never answer used to draw 50 of every 52
    micro-batches and use up a call's 3 attempts (NoRoute, the trainer stopped). Replicas that have answered this
    trainer now carry the traffic, the others share ``explore`` (10%) of it, and their failures count against
    ``max_unproven_tries`` (8), not ``max_retries``. (``fast_failure`` 0: every failure here counts as a slow one;
    the next test has the fast ones.)"""
    trainer_id = Identity.generate()
    manifest = local_manifest(RUN, "tiny", 1, Identity.generate(), trainer_id, Identity.generate())
    trainer = Trainer(TrainerConfig(seed=SEED, routing="random", fast_failure=0.0), manifest, trainer_id, CORPUS)
    peers = ["good0", "good1", *[f"fake{i}" for i in range(50)]]
    trainer.stages = {1: [StageAnnouncement(RUN, 0, p, StageState.ONLINE, (0, 1), 1.0, bytes(32)) for p in peers]}
    picks = [trainer._pick_stage(1, set()) for _ in range(1000)]
    assert sum(p.startswith("fake") for p in picks) > 900  # nobody has answered yet: all alike
    trainer.proven |= {"good0", "good1"}
    picks = [trainer._pick_stage(1, set()) for _ in range(1000)]
    assert 50 < sum(p.startswith("fake") for p in picks) < 160  # 10% in expectation

    order = iter([*[f"fake{i}" for i in range(7)], "good0"])

    async def attempt(peer):
        if peer.startswith("fake"):
            raise TransportError("dial failed")
        return "ok"

    assert asyncio.run(trainer._with_retries(lambda exclude: next(order), attempt)) == ("good0", "ok")
    endless = (f"fake{i}" for i in range(50))
    with pytest.raises(NoRoute, match="8 failure"):
        asyncio.run(trainer._with_retries(lambda exclude: next(endless), attempt))
    proven_then_down = iter(["good0", "good1", "fake40", "good0"])
    trainer._down.clear()

    async def down(peer):
        raise TransportError("connection refused")

    with pytest.raises(NoRoute):  # 3 failures of replicas that had answered: max_retries (2) used up
        asyncio.run(trainer._with_retries(lambda exclude: next(proven_then_down), down))
    with pytest.raises(ValueError, match="max_unproven_tries"):  # 0 would end every call before its first attempt
        Trainer(TrainerConfig(seed=SEED, max_unproven_tries=0), manifest, trainer_id, CORPUS)


def test_peers_that_fail_to_dial_at_once_do_not_use_up_the_unproven_tries():
    """A peer id that nobody serves fails to dial at once, and announcing one is free: 1000 such announcements left a
    cold-started trainer without a route for its whole --swarm-timeout (120 s; a review's script). Failures within
    ``fast_failure`` seconds count apart, up to ``max_fast_failures`` a call; slow ones (a peer that accepts the call
    and never answers) still count against ``max_unproven_tries``."""
    trainer_id = Identity.generate()
    manifest = local_manifest(RUN, "tiny", 1, Identity.generate(), trainer_id, Identity.generate())
    trainer = Trainer(TrainerConfig(seed=SEED, max_fast_failures=300), manifest, trainer_id, CORPUS)
    order = iter([*[f"fake{i}" for i in range(290)], "good"])

    async def attempt(peer):
        if peer.startswith("fake"):
            raise TransportError("P2PDaemonError: failed to find any peer in table")
        if peer.startswith("slow"):
            await asyncio.sleep(0.05)
            raise TransportError("timed out")
        return "ok"

    assert asyncio.run(trainer._with_retries(lambda exclude: next(order), attempt)) == ("good", "ok")
    assert trainer.metrics.retries == 290 and "good" in trainer.proven
    endless = (f"fake{i}" for i in range(1000))
    with pytest.raises(NoRoute, match="300 failure"):  # bounded all the same
        asyncio.run(trainer._with_retries(lambda exclude: next(endless), attempt))
    slow = Trainer(TrainerConfig(seed=SEED, fast_failure=0.01), manifest, trainer_id, CORPUS)
    mixed = iter([*[f"slow{i}" for i in range(7)], *[f"fake{i}" for i in range(100)], "slow7", "good"])
    with pytest.raises(NoRoute, match="108 failure"):  # 8 slow ones end it, whatever the fast ones between
        asyncio.run(slow._with_retries(lambda exclude: next(mixed), attempt))
    with pytest.raises(ValueError, match="fast_failure"):
        Trainer(TrainerConfig(seed=SEED, fast_failure=-1.0), manifest, trainer_id, CORPUS)


@pytest.mark.forked
@pytest.mark.timeout(150)
def test_announced_replicas_that_accept_calls_and_never_answer_cost_a_hedge_each():
    """Three strangers announce replicas of stage 1 beside its one honest replica; each accepts every call (over real
    P2P) and never answers. A cold-started trainer routes to all four alike, and used to wait ``rpc_timeout`` on each
    staller it drew. Hedged forwards try the next replica after ``hedge_after`` instead: every micro-batch completes
    while no call to a staller has even timed out yet (rpc_timeout 60 s), and no staller counts as having answered."""
    microbatches = 4
    config = TrainerConfig(seed=SEED, batch_size=2, microbatches=microbatches, warmup=100, rpc_timeout=60.0,
                           hedge_after=0.5)  # fmt: skip
    swarm = LocalSwarm((1,), trainer_config=config, stallers={1: 3})

    async def body(swarm: LocalSwarm):
        trainer = swarm.trainer
        stallers = {server.peer_id for server in swarm.stallers}
        assert {a.peer for a in trainer.stages[1]} == {swarm.servers[(1, 0)].peer_id, *stallers}
        started = time.monotonic()
        for step in range(2):
            await trainer.step(step)
        elapsed = time.monotonic() - started
        assert trainer.metrics.step_completed == [microbatches] * 2
        assert all(math.isfinite(x) for x in trainer.metrics.losses)
        assert trainer.metrics.hedged >= 1  # the plan of step 0 gave stallers micro-batches (all four alike)
        assert elapsed < config.rpc_timeout and trainer.metrics.retries == 0  # no staller's call ended yet
        assert swarm.servers[(1, 0)].peer_id in trainer.proven and not trainer.proven & stallers
        assert len(trainer._background) >= 1  # the stallers' calls, still waiting
        assert swarm.servers[(1, 0)].backward_calls == 2 * microbatches  # backwards: never hedged, never repeated
        sockets.extend(dht._p2p_replica._client_listen_maddr["unix"] for dht in swarm.dhts.values()
                       if dht._p2p_replica is not None)  # fmt: skip
        # (a replica listens on its socket once it serves handlers: the stage servers' and the validator's)
        assert sum(os.path.exists(path) for path in sockets) == 5

    sockets: list[str] = []
    run_swarm(swarm, body)
    # each node's P2P replica was closed with it: hivemind never closes the one it caches, which left a
    # /tmp/hivemind-p2pclient-*.sock file behind for every node process (release_p2p_replica)
    assert not any(os.path.exists(path) for path in sockets)


@pytest.mark.forked
@pytest.mark.timeout(180)
def test_a_flooded_stage_key_hides_no_replica_from_a_trainer_that_joins_later():
    """Anyone may announce a replica, and hivemind answers a key with its whole dictionary or not at all: 20 000
    self-signed announcements (each under a fresh key, stored through the DHT protocol at every node, which checks
    each signature) make a fresh reader's get of the stage key fail, and that failure used to empty its routing
    table and blacklist its peers, so its reads of every other key failed too. A trainer that joins now (client mode:
    it stores nothing) still finds the honest replica in the validator's directory and trains through it, and a
    replica that joins after the flood is found too: it asks the validator to list it, and its probe passes."""
    config = TrainerConfig(seed=SEED, batch_size=2, microbatches=2, warmup=100)
    swarm = LocalSwarm((1,), trainer_config=config, stage_config={"average_every": 0},
                       validator_config={"probe_period": 0})  # fmt: skip
    late: dict = {}
    newcomer_id = Identity.generate()

    def join_late():  # before the flood: a node that joined the DHT earlier and reads the key only now
        late["dht"] = start_dht(swarm.manifest, swarm.trainer_identity, swarm.initial_peers(), client_mode=True)
        late["newcomer"] = start_dht(swarm.manifest, newcomer_id, swarm.initial_peers())

    async def body(swarm: LocalSwarm):
        honest = swarm.servers[(1, 0)].peer_id
        for step in range(8):  # the validator accepts the replica's outputs (its directory lists it), 16 of them:
            await swarm.trainer.step(step)  # its check of that stage's outputs is ready (probes need it)
        await swarm.validator.announce()
        flood = functools.partial(flood_stage_key, run=RUN, stage=0, n=20_000, expiration=get_dht_time() + 600,
                                  span=tuple(swarm.manifest.layer_spans[0]))  # fmt: skip
        accepted = await asyncio.to_thread(swarm.dhts["trainer"].run_coroutine, flood)
        assert accepted >= 2 * 20_000  # by the stage server's and the validator's nodes
        dht = late["dht"]
        assert await asyncio.to_thread(fetch_stages, dht, RUN, 0) == []  # the announcements: unreadable
        # read with the other keys of the trainer's view, one get each: none of them fails with it
        view = await asyncio.to_thread(fetch_view, dht, RUN, [0], [0, 1])
        assert view.stages[0] == [] and [p for d in view.directories[0] for p in d.peers] == [honest]
        assert all(len(view.validators[b]) == 1 for b in (0, 1))
        newcomer = StageServer(StageServerConfig(stage=1, seed=SEED, average_every=0), swarm.manifest, newcomer_id)
        trainer = Trainer(config, swarm.manifest, swarm.trainer_identity, CORPUS)
        try:
            # its node holds the flooded key: it reads 20 000 strangers' announcements, and asks the replica the
            # validator's directory lists for its parameters first (it asked strangers that never answer, for 93 s;
            # one replica's word is not taken, by design: averaging brings it to the stage's parameters)
            await newcomer.start(late["newcomer"])  # (its own announcement is lost in the flood)
            assert newcomer.sync["from"] == [honest], newcomer.sync
            await newcomer._enlisting
            assert await swarm.validator.probe_candidates() == {newcomer.peer_id: True}
            await swarm.validator.announce()
            await trainer.start(dht)
            assert {a.peer for a in trainer.stages[1]} == {honest, newcomer.peer_id}  # from the directory
            await trainer.step(8)
            assert trainer.metrics.step_completed == [2] and sum(trainer.metrics.stage_calls.values()) == 4
        finally:
            await trainer.shutdown()
            await newcomer.shutdown()
            await release_p2p_replica(dht)
            await release_p2p_replica(late["newcomer"])

    try:
        swarm.run(body, after_dhts=join_late)
    finally:
        for dht in late.values():
            dht.shutdown()


@pytest.mark.forked
@pytest.mark.timeout(180)
def test_a_flooded_manifest_key_hides_no_manifest_from_a_node_that_joins_later():
    """Any key may publish a copy of the authority-signed manifest under the run's manifest key (that is what a relay
    does), so 12 000 such copies fill it until a fresh reader gets nothing from it, and a node could no longer join
    without a manifest file. The validators keep their copies under a key only they may write: a node that joins
    after the flood (client mode, with the bootstrap policy of a node that does not know the manifest yet) reads the
    manifest there."""
    swarm = LocalSwarm((1,), stage_config={"average_every": 0})
    late: dict = {}

    def join_late():
        policy = SentinelRecordValidator.for_bootstrap(RUN, swarm.authority.public_key)
        late["dht"] = SentinelDHT(initial_peers=swarm.initial_peers(), start=True, startup_timeout=30,
                                  host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[policy],
                                  client_mode=True)  # fmt: skip

    async def body(swarm: LocalSwarm):
        authority = swarm.authority.public_key
        flood = functools.partial(flood_manifest_key, signed=swarm.signed_manifest.to_tuple(), n=12_000,
                                  expiration=get_dht_time() + 600)  # fmt: skip
        accepted = await asyncio.to_thread(swarm.dhts["trainer"].run_coroutine, flood)
        assert accepted >= 2 * 12_000  # by the stage server's and the validator's nodes
        dht = late["dht"]
        relayed = await asyncio.to_thread(manifest_copies, dht, RUN, authority, validators=False)
        assert relayed == []  # the relays' key: unreadable
        found = await asyncio.to_thread(fetch_manifest, dht, RUN, authority)
        assert found == swarm.signed_manifest  # the validator's copy
        kept = await asyncio.to_thread(manifest_copies, dht, RUN, authority, relayed=False)
        assert [publisher for publisher, _ in kept] == [swarm.validator_identity.public_key]

    try:
        swarm.run(body, after_dhts=join_late)
    finally:
        if "dht" in late:
            late["dht"].shutdown()


def test_a_peer_that_never_answers_is_hedged_past_and_its_outcome_learnt_later():
    """A peer that accepts a call and never answers cost the call ``rpc_timeout`` (30 s) before the next replica was
    tried, up to 8 of them. A hedged call (stage forwards: ``hedge_after``) tries the next peer beside it once
    ``hedge_after`` seconds have passed, takes the first answer, and lets the others run on: their failure (here, a
    simulated rpc_timeout) is booked when it comes, and avoids them as any failure does."""
    trainer_id = Identity.generate()
    manifest = local_manifest(RUN, "tiny", 1, Identity.generate(), trainer_id, Identity.generate())
    trainer = Trainer(TrainerConfig(seed=SEED), manifest, trainer_id, CORPUS)
    events: list[str] = []
    release = asyncio.Event()  # the stallers' "rpc_timeout": they fail when it is set

    async def attempt(peer):
        events.append(f"start {peer}")
        if peer.startswith("stall"):
            await release.wait()
            events.append(f"fail {peer}")
            raise TransportError("timed out")
        return peer.upper()

    async def body():
        order = iter([f"stall{i}" for i in range(5)] + ["good"])
        peer, result = await trainer._with_retries(lambda exclude: next(order), attempt, hedge_after=0.01)
        assert (peer, result) == ("good", "GOOD")
        assert not any(e.startswith("fail") for e in events)  # nobody waited for a staller's timeout
        assert trainer.metrics.hedged == 5 and trainer.metrics.retries == 0 and len(trainer._background) == 5
        assert trainer.proven == {"good"} and trainer.avoided() == set()
        release.set()
        while trainer._background:
            await asyncio.sleep(0.01)
        assert trainer.avoided() == {f"stall{i}" for i in range(5)}  # booked when their calls failed

        # at most max_hedged at once; then the call waits for one of them to end
        capped = Trainer(TrainerConfig(seed=SEED, max_hedged=3), manifest, trainer_id, CORPUS)
        release.clear()
        events.clear()
        order = iter([f"stall{i}" for i in range(5, 10)] + ["good"])
        call = asyncio.ensure_future(capped._with_retries(lambda exclude: next(order), attempt, hedge_after=0.01))
        await asyncio.sleep(0.3)
        assert events == ["start stall5", "start stall6", "start stall7"] and not call.done()
        release.set()  # the three fail, and so do the next two (released too); then the good one
        assert await call == ("good", "GOOD") and capped.metrics.retries == 5
        # a cancelled call stops its attempts, and a trainer's shutdown those running on in the background
        release.clear()
        events.clear()
        order = iter([f"stall{i}" for i in range(10, 13)])
        call = asyncio.ensure_future(capped._with_retries(lambda exclude: next(order), attempt, hedge_after=0.01))
        await asyncio.sleep(0.1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert not capped._background and not any(e.startswith("fail") for e in events)
        order = iter(["stall13", "good"])
        assert await capped._with_retries(lambda exclude: next(order), attempt, hedge_after=0.01) == ("good", "GOOD")
        assert len(capped._background) == 1
        await capped.shutdown()
        assert not capped._background and "fail stall13" not in events

    asyncio.run(body())
    # a hedge never goes to a peer routed to only as a last resort (banned, misbehaving, recently failed): with only
    # such peers left beside a slow one, the call waits for the slow one
    trainer = Trainer(TrainerConfig(seed=SEED), manifest, trainer_id, CORPUS)
    trainer.banned, trainer.misbehaved = {"banned"}, {"malformed"}
    trainer._mark_failed("failed")
    candidates = ["slow", "banned", "malformed", "failed"]

    async def slow(peer):
        events.append(f"start {peer}")
        await asyncio.sleep(0.2)
        return peer

    events.clear()
    pick = lambda exclude: next((p for p in candidates if p not in exclude), None)  # noqa: E731
    assert asyncio.run(trainer._with_retries(pick, slow, hedge_after=0.01)) == ("slow", "slow")
    assert events == ["start slow"] and trainer.metrics.hedged == 0
    # unhedged (backwards, validator checks): the next peer only after a failure, as before
    trainer = Trainer(TrainerConfig(seed=SEED), manifest, trainer_id, CORPUS)
    events.clear()
    release.set()
    order = iter(["stall20", "good"])
    assert asyncio.run(trainer._with_retries(lambda exclude: next(order), attempt)) == ("good", "GOOD")
    assert events == ["start stall20", "fail stall20", "start good"] and trainer.metrics.hedged == 0
    with pytest.raises(ValueError, match="max_hedged"):
        Trainer(TrainerConfig(seed=SEED, max_hedged=0), manifest, trainer_id, CORPUS)


def test_the_hedge_waits_for_a_multiple_of_the_stage_s_recent_latency():
    """A slow stage is not hedged at every call: the hedge comes after ``hedge_factor`` times the 90th percentile of
    its recent forwards, and never before ``hedge_after``."""
    trainer_id = Identity.generate()
    manifest = local_manifest(RUN, "tiny", 2, Identity.generate(), trainer_id, Identity.generate())
    trainer = Trainer(TrainerConfig(seed=SEED, hedge_after=2.0, hedge_factor=3.0), manifest, trainer_id, CORPUS)
    assert trainer._hedge_delay(1) == 2.0  # nothing measured yet
    trainer._latency[1] = deque([0.01] * 30, maxlen=32)
    trainer._latency[2] = deque([1.5] * 30, maxlen=32)
    assert trainer._hedge_delay(1) == 2.0 and trainer._hedge_delay(2) == pytest.approx(4.5)
    off = Trainer(TrainerConfig(seed=SEED, hedge_after=0.0), manifest, trainer_id, CORPUS)
    off._latency[1] = deque([1.5], maxlen=32)
    assert off._hedge_delay(1) == 0.0


def test_a_stage_reply_of_the_wrong_shape_is_retried_elsewhere_and_its_sender_shunned(monkeypatch):
    """A stage that answers with a tensor of another shape than its input (fewer sequences, shorter ones) used to stop
    the trainer: the validator refuses such a check (BadRequest) and nothing retried it, so the step failed and the
    sender was never blamed. It is a MalformedReply now: retried on another replica, and the sender is routed to
    only when no other replica is left."""
    trainer_id = Identity.generate()
    manifest = local_manifest(RUN, "tiny", 1, Identity.generate(), trainer_id, Identity.generate())
    trainer = Trainer(TrainerConfig(seed=SEED), manifest, trainer_id, CORPUS)
    h = torch.randn(2, 32, 64)
    replies = {"short": torch.zeros(1, 32, 64), "good": torch.ones(2, 32, 64)}

    async def call(cls, peer, method, tensors, meta):
        from hivemind.proto import runtime_pb2

        from swarm.protocol import encode_tensors

        return runtime_pb2.ExpertResponse(tensors=encode_tensors([replies[peer]]))

    monkeypatch.setattr(trainer, "_call", call)
    order = iter(["short", "good"])
    peer, out = asyncio.run(trainer._with_retries(lambda exclude: next(order),
                                                  lambda p: trainer._stage_call(p, "rpc_forward", [h], {})))
    assert peer == "good" and torch.equal(out, replies["good"]) and trainer.metrics.retries == 1
    assert trainer.misbehaved == {"short"} and "short" in trainer.shunned and trainer.banned == set()
    anns = [StageAnnouncement(RUN, 0, p, StageState.ONLINE, (0, 1), 1.0, bytes(32)) for p in ("short", "good")]
    trainer.stages = {1: anns}
    assert {trainer._pick_stage(1, set()) for _ in range(20)} == {"good"}


@pytest.mark.forked
@pytest.mark.timeout(150)
def test_each_check_can_go_to_several_validators_and_any_taint_wins():
    """Two validators and check_fanout=2: both check every tensor (each sees all the evidence, not half of it). One
    of them is made lax here (it accepts everything, as a careless or malicious validator might): the attacker's
    non-finite outputs are still tainted and replaced, by the other's verdict, and the other bans it (quorum 1)."""
    from sentinel.validator import CheckResult

    microbatches = 4
    attack = MaliciousBehaviour(worker=0, attack=make_attack("nonfinite"), directions="forward", onset=4, seed=0)
    config = TrainerConfig(seed=SEED, batch_size=2, microbatches=microbatches, warmup=4, lr=1e-4, check_fanout=2)
    swarm = LocalSwarm((2, 1), attackers={(1, 0): attack}, sentinel=SentinelConfig(ban_level=2, drift_senders=2),
                       trainer_config=config, stage_config={"lr": 1e-4}, validators=2, ban_quorum=1)  # fmt: skip

    async def body(swarm: LocalSwarm):
        trainer, (strict, lax) = swarm.trainer, swarm.validators
        bad = swarm.servers[(1, 0)].peer_id
        real = lax.validator.check

        def accept_everything(x, **kw):
            res = real(x, **kw)
            return CheckResult(False, x, seconds=res.seconds)

        lax.validator.check = accept_everything
        step = 0
        while bad not in trainer.banned:
            assert step < 12, "the attacker was never banned"
            await trainer.step(step)
            await trainer.refresh()
            step += 1
        routed = trainer.metrics.stage_calls[bad]  # its forward calls: each one after the onset was attacked
        # every check went to both: 2 forward and 2 backward a micro-batch, less the backward check of each replaced
        # (bypassed) output
        assert strict.n_checks == lax.n_checks == 4 * step * microbatches - trainer.metrics.tainted
        assert lax.n_tainted == 0 and strict.n_tainted >= 2
        assert trainer.metrics.tainted == strict.n_tainted  # the strict verdict won every time
        assert all(math.isfinite(x) for x in trainer.metrics.losses)  # no NaN got through the lax validator
        assert routed >= 2 and trainer.banned == {bad}

    run_swarm(swarm, body)


@pytest.mark.forked
@pytest.mark.timeout(180)
def test_a_replica_no_trainer_has_used_is_listed_once_its_probe_passes():
    """A validator's directory listed only the replicas whose outputs it had accepted, so while strangers fill a
    stage's announcement key, a replica that joined later could not be found by anyone. A replica now asks the
    validators of its outputs to list it (``StageServer.enlist``); each probes one candidate per stage at a time
    with a forward of a recent input of that stage (``ValidatorService.probe_candidates``), and lists it if the
    output passes its check. Here an honest newcomer is listed beside the replica in use, and a newcomer that
    corrupts its outputs is not; neither probe teaches the validator anything or strikes anyone."""
    config = TrainerConfig(seed=SEED, batch_size=2, microbatches=4, warmup=100)
    swarm = LocalSwarm((1,), trainer_config=config, stage_config={"average_every": 0},
                       validator_config={"probe_period": 0})  # fmt: skip
    late: dict = {}
    identities = {"honest": Identity.generate(), "corrupt": Identity.generate()}

    def join_late():
        for name, identity in identities.items():
            late[name] = start_dht(swarm.manifest, identity, swarm.initial_peers())

    async def body(swarm: LocalSwarm):
        in_use = swarm.servers[(1, 0)].peer_id
        for step in range(5):  # 20 accepted outputs of stage 1: the validator's monitor of them is ready
            await swarm.trainer.step(step)
        validator = swarm.validator
        monitor = validator.validator.monitor(1, "forward")
        assert monitor.ready
        corrupt = MaliciousBehaviour(worker=0, attack=make_attack("random"), directions="forward", onset=0, seed=0)
        servers = {name: StageServer(StageServerConfig(stage=1, seed=SEED, average_every=0), swarm.manifest,
                                     identities[name], attack=corrupt if name == "corrupt" else None)
                   for name in identities}  # fmt: skip
        try:
            for name, server in servers.items():
                await server.start(late[name])
                await server._enlisting
            assert {len(q) for q in validator._candidates.values()} == {2}
            accepted, checks = monitor.n_accepted, validator.n_checks
            results = {**await validator.probe_candidates(), **await validator.probe_candidates()}
            assert results == {servers["honest"].peer_id: True, servers["corrupt"].peer_id: False}
            assert monitor.n_accepted == accepted and validator.n_checks == checks  # scored only
            assert not validator.validator.ledger.banned() and validator.probes == {"passed": 1, "failed": 1}
            assert {peer: ok for _, peer, stage, ok in validator.probe_events if stage == 0} == results  # (for join)
            (directory,) = validator.directories()
            assert set(directory.peers) == {in_use, servers["honest"].peer_id}
            await validator.announce()
            view = await asyncio.to_thread(fetch_view, swarm.dhts["trainer"], RUN, [0])
            assert [d.peers for d in view.directories[0]] == [directory.peers]
            assert await servers["honest"].enlist() == {validator.peer_id: True}  # listed: not queued again
            assert not any(validator._candidates.values())
        finally:
            for server in servers.values():
                await server.shutdown()
            for dht in late.values():
                await release_p2p_replica(dht)

    try:
        swarm.run(body, after_dhts=join_late)
    finally:
        for dht in late.values():
            dht.shutdown()


def test_enlist_requests_are_checked_and_their_queue_is_bounded():
    """``rpc_enlist`` takes untrusted metadata from any peer: another run, a stage out of range or one whose outputs
    this validator does not check, and bytes that are not msgpack get BadRequest; a banned peer gets Unauthorized; a
    replica listed already is told so and not queued; the candidates of a stage are bounded (the oldest go)."""
    from hivemind.proto import runtime_pb2

    from swarm.protocol import BadRequest, Unauthorized, pack_meta, unpack_meta
    from swarm.validator_service import MAX_CANDIDATES, ValidatorService, ValidatorServiceConfig

    validator_id = Identity.generate()
    manifest = local_manifest(RUN, "tiny", 2, validator_id, Identity.generate(), Identity.generate())
    service = ValidatorService(ValidatorServiceConfig(), manifest, validator_id, SentinelConfig())
    only_input = ValidatorService(ValidatorServiceConfig(boundaries=(0,)), manifest, validator_id, SentinelConfig())

    class Caller:  # what rpc_enlist reads of hivemind's P2PContext: the authenticated peer
        def __init__(self, peer: str):
            self.remote_id = type("PeerID", (), {"to_base58": lambda _: peer})()

    def enlist(meta, peer: str = "QmNew", to: ValidatorService = service, raw: bytes | None = None) -> dict:
        request = runtime_pb2.ExpertRequest(metadata=pack_meta(meta) if raw is None else raw)
        return unpack_meta(asyncio.run(to.rpc_enlist(request, Caller(peer))).metadata)

    assert enlist({"run": RUN, "stage": 1}) == {"listed": False} and list(service._candidates[1]) == ["QmNew"]
    for meta, to, raw in [({"run": "other", "stage": 0}, service, None), ({"run": RUN, "stage": 2}, service, None),
                          ({"run": RUN, "stage": -1}, service, None), ({"run": RUN, "stage": "0"}, service, None),
                          ({"run": RUN}, service, None), ({"run": RUN, "stage": 0}, only_input, None),
                          ({}, service, b"\xc1garbage")]:  # fmt: skip
        assert enlist(meta, to=to, raw=raw)["error"] == BadRequest.code, meta
    service.validator.ledger.ban_level = 1
    service.validator.ledger.record("QmBanned", True, 0)
    assert enlist({"run": RUN, "stage": 0}, "QmBanned")["error"] == Unauthorized.code
    service._vouch(0, "QmUsed")
    assert enlist({"run": RUN, "stage": 0}, "QmUsed") == {"listed": True} and "QmUsed" not in service._candidates[0]
    for i in range(MAX_CANDIDATES + 10):
        enlist({"run": RUN, "stage": 0}, f"QmSybil{i}")
    queue = service._candidates[0]
    assert len(queue) == MAX_CANDIDATES and next(iter(queue)) == "QmSybil10"


def test_records_are_published_with_every_store_in_flight_at_once():
    """publish_each issues every store before it waits for the first (a peer that stopped answering costs each store
    a timeout: one after another, a validator's round outlasted its records), and a store that failed in the DHT's
    process is False for that entry only."""
    from swarm.dht_schema import directory_publication, publish_each, validator_publication
    from swarm.records import ValidatorAnnouncement

    identity = Identity.generate()
    dht = RecordingDHT(fail=".directory.", result=True)
    announcements = [ValidatorAnnouncement(RUN, b, "QmValidator", 1.0, identity.public_key) for b in range(3)]
    expiration = get_dht_time() + 20
    entries = [validator_publication(a, expiration) for a in announcements]
    entries.append(directory_publication(ReplicaDirectory(RUN, 0, ("QmReplica",), identity.public_key), expiration))
    assert ".directory." in entries[-1].key
    stored = publish_each(dht, identity, entries)
    assert stored == [True, True, True, False]
    assert [e.split()[0] for e in dht.events] == ["store"] * 4 + ["wait"] * 4
    with pytest.raises(ValueError):  # only the identity a record names as its writer may publish it
        publish_each(dht, Identity.generate(), entries[:1])


@pytest.mark.forked
@pytest.mark.timeout(180)
def test_validators_stay_in_the_view_beside_a_peer_that_stopped_answering():
    """A DHT peer that stops answering (frozen, or gone from a network that drops its packets: here SIGSTOP of its
    DHT's process and p2pd) costs every store that asks it hivemind's timeout. The validator published its 6 records
    one after another, 18-28 s a round against their 20 s lifetime, and vanished from the swarm's view now and then
    (seen in the compose swarm after its trainer left; `sentinel-node status` listed no validator). They now go out
    all at once, every announce_period start to start, and the view keeps them throughout."""
    import signal

    from swarm.local import start_local_dht

    hung: list = []
    misses: list[tuple[float, list[int]]] = []

    def start_hung_peer():
        hung.append(start_local_dht(swarm.manifest, Identity.generate(), swarm.initial_peers()))

    async def body(swarm: LocalSwarm):
        reader = swarm.dhts["trainer"]
        view = await asyncio.to_thread(fetch_view, reader, RUN, range(2), range(3))
        assert all(view.validators[b] for b in range(3)), view.validators
        await asyncio.sleep(3)  # the peer is in the others' routing tables by now (it joined before they started)
        frozen = [psutil.Process(hung[0].pid), *psutil.Process(hung[0].pid).children(recursive=True)]
        assert any(p.name() == "p2pd" for p in frozen)
        for p in frozen:
            p.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            while time.monotonic() - started < 45:  # over two lifetimes of the records (20 s)
                view = await asyncio.to_thread(fetch_view, reader, RUN, range(2), range(3))
                missing = [b for b in range(3) if not view.validators[b]]
                if missing:
                    misses.append((round(time.monotonic() - started, 1), missing))
                await asyncio.sleep(2)
        finally:
            for p in frozen:
                p.send_signal(signal.SIGCONT)

    swarm = LocalSwarm((1, 1), trainer_config=TrainerConfig(seed=SEED, batch_size=2, microbatches=2))
    try:
        swarm.run(body, after_dhts=start_hung_peer)
    finally:
        for dht in hung:
            dht.shutdown()
    assert not misses, f"the validator was missing from the view at (seconds, boundaries) {misses}"
