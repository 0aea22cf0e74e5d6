"""A check names its reference by digest when the validator passed that tensor on itself (loopback, forked)."""

from __future__ import annotations

import math

import pytest
import torch
from swarm_helpers import SEED, LocalSwarm, run_swarm

from swarm.protocol import BadRequest, ReferenceMissing
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
        with pytest.raises(ReferenceMissing):
            await original(ValidatorService, peer, "rpc_check", [x], {**meta, "reference_digest": bytes(32)})

    run_swarm(swarm, body)
