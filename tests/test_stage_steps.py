"""When a stage server applies its gradients (no network): one AdamW update per trainer step, stragglers and a
restarted trainer's redos answered without being applied, and checkpoints taken while it serves that hold one
consistent step."""

import asyncio
import threading

import pytest
import torch
from swarm_helpers import CORPUS

from swarm.identity import Identity
from swarm.local import local_manifest
from swarm.stage_server import StageServer, StageServerConfig
from swarm.trainer import NoRoute, Trainer, TrainerConfig

MANIFEST = local_manifest("steps", "tiny", 1, Identity.generate(), Identity.generate(), Identity.generate())
D, T = 64, 32


def server(**config) -> StageServer:
    torch.manual_seed(0)
    return StageServer(StageServerConfig(stage=1, average_every=0, **config), MANIFEST, Identity.generate())


def tensors(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, T, D, generator=gen), 1e-2 * torch.randn(2, T, D, generator=gen)) for _ in range(n)]


def params(s: StageServer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in s.module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def stage():
    s = server()
    yield s
    s._executor.shutdown()


def test_one_update_per_trainer_step_however_many_micro_batches(stage):
    """12 micro-batches of step 0 (more than the old default of 8 calls per update) make one update, applied when
    step 1's first request arrives; the same gradients summed in one update give the same weights."""
    data = tensors(12)
    for h, g in data:
        stage._compute_backward(h, g, 0)
    assert stage.optimizer_steps == 0 and stage.backward_calls == 12
    stage._compute_forward(data[0][0], 1)
    assert stage.optimizer_steps == 1 and stage._applied_step == 0

    reference = server(accumulate=12)  # the same 12 calls, stepped by count: the same single update
    try:
        for h, g in data:
            reference._compute_backward(h, g, 0)
        assert reference.optimizer_steps == 1
        assert same(params(stage), params(reference))
    finally:
        reference._executor.shutdown()


def test_accumulate_still_steps_after_that_many_calls():
    s = server(accumulate=2)
    try:
        for h, g in tensors(4):
            s._compute_backward(h, g, 0)
        assert s.optimizer_steps == 2
    finally:
        s._executor.shutdown()
    with pytest.raises(ValueError):
        StageServerConfig(stage=1, accumulate=-1)


def test_a_straggler_of_a_step_the_replica_moved_past_is_answered_not_applied(stage):
    """A backward of step 0 arriving after step 1's forward (its call timed out, the trainer retried it elsewhere and
    went on) gets the input's gradient, and neither joins step 1's update nor makes one of its own."""
    data = tensors(4)
    for h, g in data[:3]:
        stage._compute_backward(h, g, 0)
    stage._compute_forward(data[0][0], 1)  # step 0 applied, on its 3 micro-batches
    assert stage.optimizer_steps == 1
    before = params(stage)
    h, g = data[3]
    expected = stage._compute_input_grad(h, g)
    answer, applied = stage._compute_backward(h, g, 0)
    assert not applied and torch.equal(answer, expected) and stage.backward_stale == 1
    assert all(p.grad is None for p in stage.module.parameters())  # nothing pending
    stage._compute_forward(data[1][0], 1)
    assert stage.optimizer_steps == 1 and same(params(stage), before)
    # step 1's own backwards accumulate as usual, and a straggler among them leaves them alone
    stage._compute_backward(*data[0], 1)
    grads = [p.grad.clone() for p in stage.module.parameters()]
    stage._compute_backward(*data[2], 0)
    assert stage.backward_stale == 2 and same([p.grad for p in stage.module.parameters()], grads)
    assert stage._pending_step == 1 and stage._pending_calls == 1


def test_a_redone_step_is_not_applied_again_after_a_restart(stage, tmp_path):
    """The stage applied steps 0 and 1 and saved; a trainer restarted from its checkpoint of step 0 redoes step 1
    (other tensors: its embedding moved back) and then goes on with step 2. The restored stage answers step 1
    without applying it, and applies step 2."""
    data = tensors(3)
    for step, (h, g) in enumerate(data[:2]):
        stage._compute_backward(h, g, step)
    stage._apply_pending()  # finish_step at shutdown
    assert stage.optimizer_steps == 2 and stage._applied_step == 1
    stage.save(tmp_path / "stage.pt")

    restored = server()
    try:
        restored.load(tmp_path / "stage.pt")
        before = params(restored)
        redo_h, redo_g = data[2]
        restored._compute_forward(redo_h, 1)
        _, applied = restored._compute_backward(redo_h, redo_g, 1)
        assert not applied and restored.backward_stale == 1
        assert restored._pending_step is None and same(params(restored), before)
        _, applied = restored._compute_backward(*data[0], 2)
        assert applied and restored._pending_step == 2
        restored._apply_pending()
        assert restored.optimizer_steps == 3 and not same(params(restored), before)
    finally:
        restored._executor.shutdown()


def test_a_checkpoint_taken_while_serving_holds_one_step(tmp_path):
    """``save_serving`` copies the state between computations: while the compute thread takes an update per call
    (``accumulate=1``), every checkpoint's AdamW step counts agree with each other and with ``optimizer_steps``.
    (Saved from another thread, as ``join`` did before, about a third of them mixed two steps.)"""
    s = server(accumulate=1)
    (h, g), path = tensors(1)[0], tmp_path / "stage.pt"
    stop = threading.Event()

    def train():
        step = 0
        while not stop.is_set():
            s._executor.submit(s._compute_backward, h, g, step).result()
            step += 1

    async def save_many() -> list[dict]:
        states = []
        for _ in range(25):
            await s.save_serving(path)
            states.append(torch.load(path, weights_only=True))
            await asyncio.sleep(0.001)
        return states

    worker = threading.Thread(target=train)
    worker.start()
    try:
        states = asyncio.run(save_many())
    finally:
        stop.set()
        worker.join()
        s._executor.shutdown()
    checked = 0
    for state in states:
        counts = {float(v["step"]) for v in state["optimizer"]["state"].values()}
        if counts:
            checked += 1
            assert counts == {float(state["optimizer_steps"])}, (counts, state["optimizer_steps"])
    assert checked >= 20
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failed_trainer_step_puts_its_batches_back():
    """A step that fails (a micro-batch found no replica) leaves the sampler where it was, so the checkpoint saved
    with the unfinished step's number redoes it on the same data, not on the next step's."""
    trainer_id = Identity.generate()
    manifest = local_manifest("steps", "tiny", 2, Identity.generate(), trainer_id, Identity.generate())
    config = TrainerConfig(seed=1, batch_size=2, microbatches=4)
    trainer, reference = Trainer(config, manifest, trainer_id, CORPUS), Trainer(config, manifest, trainer_id, CORPUS)

    async def failing(step, mb, batch=None):
        await asyncio.sleep(0)
        if mb == 2:
            raise NoRoute("no replica left")
        return 1.0

    trainer.microbatch = failing
    with pytest.raises(NoRoute):
        asyncio.run(trainer.step(0))
    assert trainer.sampler.n_sampled == 0
    assert torch.equal(trainer.sampler.sample()[0], reference.sampler.sample()[0])
