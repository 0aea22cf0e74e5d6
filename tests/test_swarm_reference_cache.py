"""A check names its reference by digest when the validator passed that tensor on itself (loopback, forked)."""

from __future__ import annotations

import math

import pytest
import torch
from swarm_helpers import SEED, LocalSwarm, run_swarm

from swarm.protocol import BadRequest, ReferenceMissing, Unauthorized, sign_check
from swarm.records import Direction, tensor_digest
from swarm.trainer import TrainerConfig
from swarm.validator_service import ValidatorService


@pytest.mark.forked
@pytest.mark.timeout(120)
def test_references_go_by_digest_and_a_miss_falls_back_to_the_full_tensor():
    microbatches = 4
    config = TrainerConfig(seed=SEED, batch_size=2, microbatches=microbatches, warmup=100)
    swarm = LocalSwarm((1, 1), trainer_config=config)

    async def body(swarm: LocalSwarm):
        trainer, validator = swarm.trainer, swarm.validator
        assert math.isfinite(await trainer.step(0))
        # per micro-batch, 2 stages: forward checks at boundaries 1, 2 and backward checks at 1, 0. The reference of
        # the forward check at 2 is the tensor accepted at 1, that of the backward check at 0 the one accepted at 1:
        # both by digest; the other two references (the embedding's output, the head's gradient) were never checked
        assert validator.n_checks == 4 * microbatches
        assert validator.reference_hits == trainer.metrics.references_by_digest == 2 * microbatches

        # the validator forgets everything it passes on (evicted at once, or restarted between checks): the trainer,
        # which believes it holds the references, gets ReferenceMissing and every check completes in full
        validator._keep = lambda digest, tensor: None
        validator._kept.clear()
        misses = []
        original = trainer._call

        async def call(cls, peer, method, tensors, meta):
            try:
                return await original(cls, peer, method, tensors, meta)
            except ReferenceMissing:
                misses.append(method)
                raise

        trainer._call = call
        hits = validator.reference_hits
        assert math.isfinite(await trainer.step(1))
        assert trainer.metrics.step_completed == [microbatches] * 2 and trainer.metrics.dropped == 0
        assert misses == ["rpc_check"] * (2 * microbatches) and validator.reference_hits == hits
        assert validator.n_checks == 8 * microbatches

        # one tensor and no (or a malformed) reference digest: a typed BadRequest, not a crash
        x = torch.zeros(2, trainer.model_config.seq_len, trainer.model_config.d_model)
        meta = {"run": trainer.run, "step": 9, "mb": 0, "boundary": 1, "direction": 0, "sender": "s", "tainted": False,
                "warmup": True, "trainer": trainer.identity.public_key, "signature": b"x" * 64}  # fmt: skip
        peer = swarm.validator.peer_id
        for extra in ({}, {"reference_digest": b"short"}):
            with pytest.raises(BadRequest) as info:
                await original(ValidatorService, peer, "rpc_check", [x], {**meta, **extra})
            assert type(info.value) is BadRequest
        # a signed check naming a reference the validator does not hold: ReferenceMissing (unsigned: Unauthorized,
        # before the cache is looked at; see the next test)
        with pytest.raises(Unauthorized):
            await original(ValidatorService, peer, "rpc_check", [x], {**meta, "reference_digest": bytes(32)})
        signature = sign_check(trainer.identity, run_id=trainer.run, step=9, microbatch=0, boundary=1,
                               direction=Direction.FORWARD, sender="s", tainted=False, warmup=True,
                               digest=tensor_digest(x), reference_digest=bytes(32))  # fmt: skip
        with pytest.raises(ReferenceMissing):
            await original(ValidatorService, peer, "rpc_check", [x],
                           {**meta, "reference_digest": bytes(32), "signature": signature})  # fmt: skip

    run_swarm(swarm, body)


def test_an_unsigned_check_learns_nothing_of_the_references_held():
    """A check naming its reference by digest consults the validator's cache only after the trainer's signature
    verifies: before, a peer with no key got 'unauthorized' for a tensor the validator held and 'reference_missing'
    for one it did not (and bumped it in the LRU)."""
    import asyncio

    from hivemind.proto import runtime_pb2

    from sentinel.config import SentinelConfig
    from swarm.identity import Identity
    from swarm.local import local_manifest
    from swarm.protocol import encode_tensors, pack_meta, unpack_meta
    from swarm.validator_service import ValidatorServiceConfig

    validator_id, trainer_id = Identity.generate(), Identity.generate()
    manifest = local_manifest("run", "tiny", 2, validator_id, trainer_id, Identity.generate())
    service = ValidatorService(ValidatorServiceConfig(publish=False), manifest, validator_id, SentinelConfig())
    held, other = torch.randn(2, 32, 64), torch.randn(2, 32, 64)
    service._keep(tensor_digest(held), held)

    async def probe(reference: torch.Tensor, trainer: bytes) -> str:
        meta = {"run": "run", "step": 0, "mb": 0, "boundary": 1, "direction": 0, "sender": "x", "trainer": trainer,
                "reference_digest": tensor_digest(reference), "signature": b"\0" * 64}  # fmt: skip
        reply = await service._serve(runtime_pb2.ExpertRequest(tensors=encode_tensors([torch.randn(2, 32, 64)]),
                                                                metadata=pack_meta(meta)))  # fmt: skip
        return unpack_meta(reply.metadata)["error"]

    for trainer in (Identity.generate().public_key, trainer_id.public_key):  # a stranger; the trainer's key, unsigned
        assert asyncio.run(probe(held, trainer)) == asyncio.run(probe(other, trainer)) == "unauthorized"
    assert service.reference_hits == 0
