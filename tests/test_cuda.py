"""The CUDA paths against the CPU ones: a validator's verdicts, the mesh, a mesh checkpoint, and stage servers
serving from the GPU (the check's summary: tests/test_stats.py). Skipped without CUDA (CI has none); run on a GPU
machine with ``pytest tests/test_cuda.py tests/test_stats.py``."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sentinel.config import SentinelConfig
from sentinel.validator import Validator
from swarm.data import load_corpus
from swarm.mesh import Mesh, MeshConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

D = 48
TESTS = Path(__file__).resolve().parent


def _stream(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` honest (output, reference) pairs: a fixed linear map of the reference plus noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, D, generator=g) / D**0.5
    out = []
    for _ in range(n):
        ref = torch.randn(2, 16, D, generator=g)
        out.append((ref + ref @ w + 0.1 * torch.randn(2, 16, D, generator=g), ref))
    return out


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_bytes=2 * 2**20)


def test_validator_gives_the_same_verdicts_on_cuda_and_cpu():
    """One stream of honest and attacked tensors, checked by a CPU and a CUDA validator: the same flags, the same
    strikes and bans, and replacements on the tensor's own device."""
    cpu, gpu = Validator(SentinelConfig()), Validator(SentinelConfig())
    stream = _stream(40, seed=1)
    flags = {"cpu": [], "cuda": []}
    for step, (x, ref) in enumerate(stream):
        warm = step < 20
        if step >= 25 and step % 3 == 0:
            x = -x  # sign flip from a poisoning sender
        for name, v, dev in (("cpu", cpu, "cpu"), ("cuda", gpu, "cuda")):
            r = v.check(x.to(dev), boundary=1, direction="forward", sender="s1r0", step=step, reference=ref.to(dev),
                        warmup=warm)  # fmt: skip
            flags[name].append(r.tainted)
            if r.tainted:
                assert r.tensor.device.type == dev and r.tensor.shape == x.shape
            v.end_step(step)
    assert flags["cpu"] == flags["cuda"]
    assert sum(flags["cpu"]) >= 4  # the flips were flagged
    assert cpu.ledger.state_dict() == gpu.ledger.state_dict()


def test_clip_tokens_on_cuda_matches_cpu():
    """The token clip of gradient summaries (sentinel.stats.clip_tokens) on the device against the CPU path."""
    from sentinel.stats import clip_tokens

    x, ref = _stream(1, seed=2)[0]
    x[1, 5] *= 60.0
    cx, cref = clip_tokens(x, ref, 4.0)
    gx, gref = clip_tokens(x.cuda(), ref.cuda(), 4.0)
    assert gx.device.type == "cuda" and not torch.equal(cx, x)
    assert torch.allclose(gx.cpu(), cx, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gref.cpu(), cref, rtol=1e-5, atol=1e-6)


def _tiny(**kw) -> MeshConfig:
    base = dict(preset="tiny", stages=2, replicas=3, malicious_fraction=1 / 6, steps=18, warmup=10, microbatches=6,
                batch_size=2, eval_every=0, eval_batches=2, lr=1e-3, seed=1)  # fmt: skip
    base.update(kw)
    return MeshConfig(**base)


@pytest.mark.parametrize("attack,direction", [("random_sign", "forward"), ("scaling", "backward"), ("mixed", "both")])
def test_mesh_on_cuda_bans_the_attacker_like_on_cpu(attack, direction, corpus):
    reports = {
        dev: Mesh(_tiny(attack=attack, attack_direction=direction, device=dev), corpus).run().report
        for dev in ("cpu", "cuda")
    }
    gpu, cpu = reports["cuda"], reports["cpu"]
    assert gpu["config"]["device"] == "cuda"
    assert gpu["banned"] == gpu["malicious"] == cpu["malicious"] and gpu["f1"] == 1.0
    assert gpu["banned"] == cpu["banned"] and not gpu["false_bans"]
    assert gpu["val_loss"] == pytest.approx(cpu["val_loss"], rel=0.02)


def test_mesh_checkpoint_on_cuda_resumes(corpus, tmp_path):
    """A CUDA mesh saved mid-run and resumed (CUDA RNG state included) ends where the uninterrupted run ends:
    the same bans and taints, the loss within float noise (CUDA kernels need not be bit-reproducible)."""
    cfg = _tiny(attack="delay", steps=10, warmup=4, device="cuda")
    full = Mesh(cfg, corpus)
    state = {}

    def snapshot(step, info):
        if step == 5:
            state.update(copy.deepcopy(full.state_dict()))

    ref = full.run(snapshot).report
    resumed = Mesh(cfg, corpus)
    resumed.load_state_dict(state)
    rep = resumed.run().report
    assert rep["banned"] == ref["banned"] and rep["tainted_microbatches"] == ref["tainted_microbatches"]
    assert rep["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-3)


def _stage_servers_match_local(device: str) -> None:
    from swarm_helpers import SEED, LocalSwarm, local_reference

    from swarm.trainer import TrainerConfig

    config = TrainerConfig(seed=SEED, batch_size=2)
    swarm = LocalSwarm((1, 1), stage_config={"device": device, "accumulate": 100}, trainer_config=config)

    async def body(s):
        stages = [s.servers[(k, 0)] for k in (1, 2)]
        assert all(st.device.type == device for st in stages)
        loss = await s.trainer.microbatch(step=0, mb=0)
        local_loss, _, local = local_reference(s)
        assert loss == pytest.approx(local_loss, rel=1e-4)
        for server, module in zip(stages, local):
            assert server.backward_calls == 1
            for p, q in zip(server.module.parameters(), module.parameters()):
                assert p.grad.device.type == device
                torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-3, atol=1e-5)

    swarm.run(body)


@pytest.mark.timeout(180)
def test_stage_servers_on_cuda_match_the_local_model():
    """Two stage servers on the GPU behind a validator, over hivemind P2P on 127.0.0.1: the trainer's loss and every
    gradient match the same model run on the CPU in one process. In a fresh interpreter, not a fork: CUDA does not
    survive a fork of a process that has used it, as this one has."""
    code = "from test_cuda import _stage_servers_match_local as run; run('cuda'); print('stage servers on cuda: ok')"
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", code], cwd=TESTS.parent, env=env, capture_output=True, text=True,
                          timeout=170)  # fmt: skip
    assert done.returncode == 0 and "stage servers on cuda: ok" in done.stdout, done.stdout + done.stderr[-5000:]
