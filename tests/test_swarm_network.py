"""Stage server, validator service and trainer over real hivemind P2P on 127.0.0.1 (forked, 2-4 peers, bounded)."""

import asyncio
import json
import math

import hivemind
import numpy as np
import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from sentinel.attacks import MaliciousBehaviour, make_attack
from sentinel.config import SentinelConfig
from swarm.data import BatchSampler, Corpus
from swarm.dht_schema import (
    banned_peers,
    fetch_strike_index,
    fetch_strikes,
    fetch_taints,
    step_bucket,
)
from swarm.identity import Identity
from swarm.local import start_local_dht
from swarm.model import build_pipeline
from swarm.protocol import BadRequest, call, encode_tensors, pack_meta
from swarm.records import Direction, ForgedVerdict, Manifest, MissingVerdict, Verdict, VerdictMismatch, sign_verdict
from swarm.records import tensor_digest as digest
from swarm.stage_server import StageServer, StageServerConfig, manifest_model_config, rpc_namespace
from swarm.trainer import Trainer, TrainerConfig
from swarm.validator_service import ValidatorService, ValidatorServiceConfig

RUN = "net-test"
AUTHORITY, VALIDATOR, TRAINER, OUTSIDER = (Identity.generate() for _ in range(4))
STAGE_IDS = (Identity.generate(), Identity.generate())  # a stage's DHT signs its announcements with its identity
MANIFEST = Manifest(
    RUN, "tiny", 2, [(0, 2), (2, 4)], {}, [VALIDATOR.public_key], [TRAINER.public_key], 1, 1.0, AUTHORITY.public_key
)
CFG = manifest_model_config(MANIFEST)
SEED = 3
CORPUS = Corpus(np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint8), np.zeros(100, np.uint8), "t", 1, 1)


def start_dht(identity, initial_peers=()):
    return start_local_dht(MANIFEST, identity, initial_peers)


def forward_request(h, verdict, step=0, mb=0):
    meta = {"run": RUN, "step": step, "mb": mb, "verdict": None if verdict is None else verdict.to_tuple()}
    return runtime_pb2.ExpertRequest(tensors=encode_tensors([h]), metadata=pack_meta(meta))


def trainer_verdict(signer, h, step=0, mb=0, caller="QmTrainer"):
    return sign_verdict(
        signer, run_id=RUN, step=step, microbatch=mb, boundary=0, direction=Direction.FORWARD,
        verdict=Verdict.ACCEPT, digest=digest(h), caller=caller,
    )  # fmt: skip


def test_each_validator_projects_on_directions_of_its_own_that_the_manifest_does_not_reveal():
    """With private_projections (the default) the sliced-Wasserstein directions are seeded from the validator's
    private key, not the manifest's public seed: different for two validators, the same for one validator restarted;
    without it the manifest's."""
    other = Identity.generate()
    manifest = Manifest(RUN, "tiny", 2, [(0, 2), (2, 4)], {}, [VALIDATOR.public_key, other.public_key],
                        [TRAINER.public_key], 1, 1.0, AUTHORITY.public_key)  # fmt: skip
    sentinel = SentinelConfig(seed=7)

    def directions(identity, **config):
        service = ValidatorService(ValidatorServiceConfig(**config), manifest, identity, sentinel)
        try:
            return service.validator.config.seed, service.validator.monitor(1, "forward").projections(64, "cpu")
        finally:
            service._executor.shutdown()
            service._publisher.shutdown()

    seed_a, a = directions(VALIDATOR, private_projections=True)
    seed_b, b = directions(other, private_projections=True)
    seed_again, again = directions(VALIDATOR, private_projections=True)
    seed_default, default = directions(VALIDATOR)  # the default: private
    seed_public, public = directions(VALIDATOR, private_projections=False)  # the manifest's seed
    assert seed_default == seed_a and torch.equal(default, a)
    assert seed_a != seed_b and not torch.allclose(a, b)
    assert seed_a == seed_again and torch.equal(a, again)
    assert seed_public == 7 and seed_a != 7 and not torch.allclose(a, public)


def test_a_validator_state_learnt_on_other_projections_keeps_them(tmp_path, caplog):
    """A state saved on the manifest's directions (before private projections) is loaded with those directions:
    its baselines are quantiles along them, and new ones would make every tensor look far away."""
    state = tmp_path / "validator.pt"
    sentinel = SentinelConfig(seed=7)
    old = ValidatorService(ValidatorServiceConfig(state_path=str(state), private_projections=False), MANIFEST,
                           VALIDATOR, sentinel)  # fmt: skip
    x = torch.randn(2, 8, CFG.d_model)
    for step in range(3):
        old.validator.check(x + 0.01 * step, boundary=1, direction="forward", sender="s", step=step, warmup=True)
    old.save_state()
    baseline = old.validator.monitor(1, "forward").baseline.quantiles.copy()
    new = ValidatorService(ValidatorServiceConfig(state_path=str(state), private_projections=True), MANIFEST,
                           VALIDATOR, sentinel)  # fmt: skip
    assert new.validator.config.seed == 7 and "other projections" in caplog.text
    monitor = new.validator.monitor(1, "forward")
    assert np.array_equal(monitor.baseline.quantiles, baseline)
    assert torch.equal(monitor.projections(CFG.d_model, "cpu"), old.validator.monitor(1, "forward").projections(
        CFG.d_model, "cpu"))  # fmt: skip
    for service in (old, new):
        service._executor.shutdown()
        service._publisher.shutdown()


@pytest.mark.forked
@pytest.mark.timeout(90)
def test_stage_server_rejects_unvalidated_inputs_with_distinct_codes():
    server_dht = client_dht = None
    try:
        server_dht = start_dht(STAGE_IDS[0])
        client_dht = start_dht(TRAINER, server_dht.get_visible_maddrs())

        async def main():
            server = StageServer(StageServerConfig(stage=1, seed=SEED), MANIFEST, STAGE_IDS[0])
            await server.start(server_dht)
            try:
                p2p = await client_dht.replicate_p2p()
                stub = StageServer.get_stub(p2p, PeerID.from_base58(server.peer_id), namespace=rpc_namespace(RUN))
                me = p2p.peer_id.to_base58()
                h = torch.randn(2, 8, CFG.d_model)
                with pytest.raises(MissingVerdict):
                    await call(stub.rpc_forward, forward_request(h, None), 10)
                with pytest.raises(ForgedVerdict):  # well signed, but by a key the manifest does not authorize
                    await call(stub.rpc_forward, forward_request(h, trainer_verdict(OUTSIDER, h, caller=me)), 10)
                with pytest.raises(VerdictMismatch):  # genuine verdict, for another tensor
                    await call(stub.rpc_forward, forward_request(h, trainer_verdict(TRAINER, h + 1, caller=me)), 10)
                with pytest.raises(VerdictMismatch):  # genuine verdict, for another micro-batch
                    await call(stub.rpc_forward, forward_request(h, trainer_verdict(TRAINER, h, mb=1, caller=me)), 10)
                with pytest.raises(VerdictMismatch, match="another peer"):  # genuine, but issued to another peer
                    await call(stub.rpc_forward, forward_request(h, trainer_verdict(TRAINER, h, caller="QmElse")), 10)
                bad = torch.randn(2, 8, CFG.d_model + 1)
                with pytest.raises(BadRequest):
                    await call(stub.rpc_forward, forward_request(bad, trainer_verdict(TRAINER, bad, caller=me)), 10)
                nan = h.clone()
                nan[0, 0, 0] = math.nan
                with pytest.raises(BadRequest):
                    await call(stub.rpc_forward, forward_request(nan, trainer_verdict(TRAINER, nan, caller=me)), 10)
                reply = await call(stub.rpc_forward, forward_request(h, trainer_verdict(TRAINER, h, caller=me)), 10)
                out = hivemind.compression.deserialize_torch_tensor(reply.tensors[0])
                with torch.no_grad():
                    assert torch.equal(out, server.module(h))
                assert server.rejected == {"missing_verdict": 1, "forged_verdict": 1, "verdict_mismatch": 3,
                                           "bad_request": 2}  # fmt: skip
            finally:
                await server.shutdown()

        asyncio.run(main())
    finally:
        for dht in (client_dht, server_dht):
            if dht is not None:
                dht.shutdown()


async def _swarm(dhts, *, attack=None, sentinel=None, trainer_config=None, validator_config=None):
    """2 stages x 1 replica + 1 validator + trainer, each on its own DHT (dhts: stage1, stage2, validator, trainer)."""
    stages = [
        StageServer(StageServerConfig(stage=k, seed=SEED, accumulate=100), MANIFEST, STAGE_IDS[k - 1],
                    attack=attack if k == 1 else None)
        for k in (1, 2)
    ]  # fmt: skip
    validator = ValidatorService(validator_config or ValidatorServiceConfig(), MANIFEST, VALIDATOR,
                                 sentinel or SentinelConfig())  # fmt: skip
    trainer = Trainer(trainer_config or TrainerConfig(seed=SEED, batch_size=2), MANIFEST, TRAINER, CORPUS)
    for service, dht in zip((*stages, validator), dhts):
        await service.start(dht)
    await trainer.start(dhts[3])
    return stages, validator, trainer


def _start_four():
    first = start_dht(STAGE_IDS[0])
    peers = first.get_visible_maddrs()
    return [first, start_dht(STAGE_IDS[1], peers), start_dht(VALIDATOR, peers), start_dht(TRAINER, peers)]


@pytest.mark.forked
@pytest.mark.timeout(90)
def test_end_to_end_microbatch_matches_local_model():
    dhts = []
    try:
        dhts = _start_four()

        async def main():
            stages, validator, trainer = await _swarm(dhts)
            try:
                assert all(len(trainer.stages[k]) == 1 for k in (1, 2)) and len(trainer.validators[1]) == 1
                loss = await trainer.microbatch(step=0, mb=0)
                # the same seed, data and model, in one process
                emb, local_stages, head = build_pipeline(CFG, 2, SEED)
                x, y = BatchSampler(CORPUS.train, 2, CFG.seq_len, SEED).sample()
                local_loss = head(local_stages[1](local_stages[0](emb(x))), y)
                local_loss.backward()
                assert loss == pytest.approx(float(local_loss), abs=1e-6)
                torch.testing.assert_close(trainer.embedding.tok.weight.grad, emb.tok.weight.grad)
                for server, local in zip(stages, local_stages):
                    assert server.backward_calls == 1
                    for p, q in zip(server.module.parameters(), local.parameters()):
                        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
                assert trainer.metrics.tainted == 0 and validator.n_checks == 4 and validator.n_tainted == 0
            finally:
                for service in (*stages, validator):
                    await service.shutdown()
                await trainer.shutdown()

        asyncio.run(main())
    finally:
        for dht in reversed(dhts):
            dht.shutdown()


@pytest.mark.forked
@pytest.mark.timeout(90)
def test_forward_attacker_is_tainted_replaced_struck_and_banned(tmp_path):
    dhts = []
    check_log = tmp_path / "checks.jsonl"
    try:
        dhts = _start_four()
        attack = MaliciousBehaviour(worker=0, attack=make_attack("nonfinite"), directions="forward", onset=0, seed=0)

        async def main():
            stages, validator, trainer = await _swarm(dhts, attack=attack, sentinel=SentinelConfig(ban_level=2),
                                                      validator_config=ValidatorServiceConfig(check_log=str(check_log)))
            try:
                losses = [await trainer.microbatch(step=s, mb=s) for s in (0, 1)]
                assert all(math.isfinite(loss) for loss in losses)  # the replacement flowed on to stage 2 and head
                assert trainer.metrics.tainted == 2 and validator.n_tainted == 2
                assert stages[0].backward_calls == 0 and stages[1].backward_calls == 2  # stage 1 bypassed backward
                await validator.settle()  # blame of the last step is settled when asked (or when a later step starts)
                await validator.flush()
                bad = stages[0].peer_id
                notices = fetch_taints(dhts[3], RUN, step_bucket(0))
                assert {(n.sender, n.boundary, n.direction) for n in notices} == {(bad, 1, Direction.FORWARD)}
                strikes = fetch_strikes(dhts[3], RUN, bad)
                assert banned_peers(strikes, MANIFEST) == {bad}, strikes
                await trainer.refresh()
                assert trainer.banned == {bad}
                # what an operator sees: each taint with its reason, and the check log (written on shutdown)
                events = list(validator.taint_events)
                assert [(e.number, e.step, e.boundary, e.direction, e.sender, e.reason, e.blamed) for e in events] == [
                    (1, 0, 1, "forward", bad, "non-finite", True), (2, 1, 1, "forward", bad, "non-finite", True)]
                assert events[0].describe().startswith(f"step 0 mb 0 boundary 1 forward from {bad}: non-finite")
                await validator.shutdown()
                lines = [json.loads(line) for line in check_log.read_text().splitlines()]
                checks = [e for e in lines if "step" in e]
                assert len(checks) == validator.n_checks
                assert [(e["step"], e["boundary"], e["direction"]) for e in checks if e["tainted"]] == [
                    (0, 1, "forward"), (1, 1, "forward")]
                assert all(e["sender"] == bad and e["reason"] == "non-finite" for e in checks if e["tainted"])
                assert [(e["settled"], e["strikes"]) for e in lines if "settled" in e] == [
                    (0, {bad: [1, False]}), (1, {bad: [2, True]})]
            finally:
                for service in (*stages, validator):
                    await service.shutdown()
                await trainer.shutdown()

        asyncio.run(main())
    finally:
        for dht in reversed(dhts):
            dht.shutdown()


@pytest.mark.forked
@pytest.mark.timeout(120)
def test_a_validator_keeps_its_bans_in_the_dht_past_the_strike_records_lifetime(tmp_path):
    """A strike record lasts strike_ttl in the DHT, a ban the whole run: the validator publishes its bans again every
    strike_ttl / 3, and on start from its saved state. Here strike_ttl is 3 s: the ban is still read 8 s after it was
    published (a record that was not published again has expired by then), and a validator restarted from its state
    publishes it at once, at a step no older than its last record (nodes refuse an older one as a replay)."""
    validator_dht = reader_dht = None
    state = tmp_path / "validator.pt"
    config = ValidatorServiceConfig(strike_ttl=3.0, announce_period=1.0, state_path=str(state))
    try:
        validator_dht = start_dht(VALIDATOR)
        reader_dht = start_dht(OUTSIDER, validator_dht.get_visible_maddrs())

        def read() -> tuple[set[str], list]:
            records = fetch_strikes(reader_dht, RUN, "QmBad") + fetch_strikes(reader_dht, RUN, "QmNotBanned")
            return banned_peers(records, MANIFEST), records

        async def main():
            service = ValidatorService(config, MANIFEST, VALIDATOR, SentinelConfig(ban_level=1))
            await service.start(validator_dht)
            for peer, flagged in (("QmBad", True), ("QmNotBanned", False)):
                service.validator.ledger.record(peer, flagged, 4)
            service._step = 4
            service._settled([("QmBad", 1, True), ("QmNotBanned", 0, False)], 4)  # as a settled step publishes them
            await service.flush()
            banned, _ = await asyncio.to_thread(read)
            assert banned == {"QmBad"}
            await asyncio.sleep(8)  # past the records' lifetime
            banned, records = await asyncio.to_thread(read)
            assert banned == {"QmBad"} and {r.peer for r in records} == {"QmBad"}, records  # the other one expired
            assert all(r.step >= 4 and r.banned for r in records)
            # the ban's entry in the run's strike index (how status finds it once QmBad stops announcing) is
            # republished with it; the peer that was struck but not banned has none
            index = await asyncio.to_thread(fetch_strike_index, reader_dht, RUN)
            assert [(e.peer, e.validator) for e in index] == [("QmBad", VALIDATOR.public_key)], index
            await service.shutdown()
            await asyncio.sleep(4)  # nobody republishes now: the ban expires from the DHT
            assert await asyncio.to_thread(read) == (set(), [])
            assert await asyncio.to_thread(fetch_strike_index, reader_dht, RUN) == []  # and so does its index entry

            again = ValidatorService(config, MANIFEST, VALIDATOR, SentinelConfig(ban_level=1))
            assert again.validator.ledger.is_banned("QmBad") and again._published_step["QmBad"] >= 4
            await again.start(validator_dht)  # publishes its bans at once
            await again.flush()
            banned, records = await asyncio.to_thread(read)
            assert banned == {"QmBad"} and records[0].step >= 4
            await again.shutdown()

        asyncio.run(main())
    finally:
        for dht in (reader_dht, validator_dht):
            if dht is not None:
                dht.shutdown()


def test_a_replayed_backward_is_answered_but_applied_once_and_so_is_a_redo():
    """The stage's replay guard (no network). A signed (input, gradient) pair for a (step, micro-batch) is applied
    once; replayed, it is answered with the same input gradient but changes nothing (a trainer restarted from a
    checkpoint may resend exactly that, and needs the answer). A redo with another gradient or another input (a
    restarted trainer whose weights moved: the same micro-batch of data) is answered and not applied either (before
    2026-11-30 it was: the micro-batch counted twice); another micro-batch of the step is applied."""
    server = StageServer(StageServerConfig(stage=2, seed=SEED, accumulate=100), MANIFEST, STAGE_IDS[1])

    def verdict(signer, boundary, direction, tensor, step, mb):
        return sign_verdict(signer, run_id=RUN, step=step, microbatch=mb, boundary=boundary, direction=direction,
                            verdict=Verdict.ACCEPT, digest=digest(tensor), caller="QmTrainer").to_tuple()  # fmt: skip

    def request(h, g, step=5, mb=3):
        meta = {"run": RUN, "step": step, "mb": mb, "verdict": verdict(VALIDATOR, 1, Direction.FORWARD, h, step, mb),
                "grad_verdict": verdict(TRAINER, 2, Direction.BACKWARD, g, step, mb)}  # fmt: skip
        return runtime_pb2.ExpertRequest(tensors=encode_tensors([h, g]), metadata=pack_meta(meta))

    async def serve(req):
        from swarm.protocol import unpack_meta

        reply = await server._serve("backward", req)
        assert "error" not in unpack_meta(reply.metadata), unpack_meta(reply.metadata)
        return torch.tensor(np.frombuffer(reply.tensors[0].buffer, np.float32))

    def grads():
        return [None if p.grad is None else p.grad.clone() for p in server.module.parameters()]

    async def main():
        h, g = torch.randn(2, 8, CFG.d_model), torch.randn(2, 8, CFG.d_model)
        first = await serve(request(h, g))
        after_first = grads()
        again = await serve(request(h, g))  # a replay, or a restarted trainer's identical redo
        assert torch.equal(again, first)
        assert all(torch.equal(x, y) for x, y in zip(grads(), after_first))  # not accumulated twice
        await serve(request(h, torch.randn(2, 8, CFG.d_model)))  # a redo with another gradient
        await serve(request(torch.randn(2, 8, CFG.d_model), g))  # ... with another input
        assert all(torch.equal(x, y) for x, y in zip(grads(), after_first))
        await serve(request(torch.randn(2, 8, CFG.d_model), torch.randn(2, 8, CFG.d_model), mb=4))  # the next one
        assert not all(torch.equal(x, y) for x, y in zip(grads(), after_first))
        assert server.backward_calls == 2 and server.backward_replays == 3

    try:
        asyncio.run(main())
    finally:
        server._executor.shutdown()


def test_a_validator_saves_a_new_ban_at_once(tmp_path):
    """A ban is written to the validator's state as soon as it is settled, not at the next periodic save (here:
    never, save_every 0): a crash in between would have forgotten it, and with it its republication. A settled step
    with no new ban writes nothing."""
    state = tmp_path / "validator.pt"
    config = ValidatorServiceConfig(state_path=str(state), save_every=0)
    service = ValidatorService(config, MANIFEST, VALIDATOR, SentinelConfig(ban_level=1))

    async def main():
        x = torch.full((2, 8, CFG.d_model), float("nan"))  # non-finite: flagged and blamed, warmed up or not
        res = service.validator.check(x, boundary=1, direction="forward", sender="QmBad", step=4, reference=x)
        assert res.blamed
        service._step = 4
        await service.settle()  # step 4's blame: a strike, and at ban level 1 a ban
        assert state.exists()
        state.unlink()
        service._step = 5
        await service.settle()  # nothing new to settle
        assert not state.exists()

    try:
        asyncio.run(main())
    finally:
        service._executor.shutdown()
        service._publisher.shutdown()
    service.save_state()
    again = ValidatorService(config, MANIFEST, VALIDATOR, SentinelConfig(ban_level=1))
    assert again.validator.ledger.is_banned("QmBad") and again.validator.ledger.banned() == {"QmBad": 4}
    again._executor.shutdown()
    again._publisher.shutdown()


def test_validator_publishes_what_queued_meanwhile_as_one_batch_the_latest_strike_of_a_peer_only():
    """While one batch of the validator's records is out (each store beside a peer that stopped answering waits
    hivemind's timeout), what it makes queues, and goes out as the next batch, all at once, with a peer's later
    strike record in place of its earlier one. Before, one thread stored them one after another: a ban's strike record
    waited behind every taint notice made before it, about 5 s each beside such a peer."""
    import concurrent.futures
    import threading

    from swarm.dht_schema import strike_publications, taint_publication
    from swarm.records import StrikeRecord, TaintNotice

    release = threading.Event()
    stores: list[list[str]] = [[]]  # the keys of each batch, as the DHT received them

    class SlowDHT:
        def store(self, key, value, expiration_time, subkey, return_future):
            kind = "strike_index" if key.endswith(".strike_index") else "strikes" if ".strikes." in key else "taint"
            stores[-1].append(f"{kind}:{value[-2] if kind == 'strikes' else ''}")
            future = concurrent.futures.Future()
            if len(stores) == 1:  # the first batch waits for a peer that does not answer
                threading.Thread(target=lambda: (release.wait(10), future.set_result(True)), daemon=True).start()
            else:
                future.set_result(True)
            return future

        def is_alive(self):
            return True

    service = ValidatorService(ValidatorServiceConfig(), MANIFEST, VALIDATOR, SentinelConfig())
    key = VALIDATOR.public_key
    now = hivemind.utils.get_dht_time()

    def taint(step: int) -> TaintNotice:
        return TaintNotice(RUN, step, 0, 1, Direction.FORWARD, "QmSender", bytes(32), {"l2": 1.0}, "distance:l2", key)

    def strike(step: int, count: int, banned: bool) -> StrikeRecord:
        return StrikeRecord(RUN, "QmSender", count, banned, [], step, key)

    async def main() -> None:
        service._dht = SlowDHT()
        service._send([taint_publication(taint(1), now + 60)])
        await asyncio.sleep(0.3)  # the first batch is out, waiting
        assert len(stores[0]) == 1 and service.n_publish_batches == 1
        stores.append([])
        service._send([taint_publication(taint(2), now + 60)])
        service._send(strike_publications(strike(2, 2, False), now + 60))
        service._send([taint_publication(taint(3), now + 61)])
        service._send(strike_publications(strike(3, 3, True), now + 61))  # the ban: its record and its index entry
        await asyncio.sleep(0.3)
        assert stores[1] == [] and service.n_publish_batches == 1  # queued behind the first batch
        release.set()
        await service.flush()

    try:
        asyncio.run(main())
    finally:
        service._executor.shutdown(wait=True)
        service._publisher.shutdown(wait=True)
    assert service.n_publish_batches == 2
    assert stores[0] == ["taint:"]
    # one batch: both taints, the peer's step-3 strike record only (its step-2 one superseded), the ban's index entry
    assert sorted(stores[1]) == sorted(["taint:", "taint:", "strikes:3", "strike_index:"]), stores[1]
