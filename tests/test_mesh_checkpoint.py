"""Mesh checkpoints: a run resumed from a checkpoint (extended, or interrupted by Ctrl-C) ends bit-identical to an
uninterrupted one; foreign, malformed or mismatched checkpoints are refused; `simulate --checkpoint/--resume`."""

import copy
import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from synthetic_corpus import synthetic_corpus

from node.cli import main
from sentinel.config import SentinelConfig
from sentinel.validator import Validator
from swarm.data import load_corpus
from swarm.mesh import CheckpointError, Mesh, MeshConfig, MeshInterrupted

# seed 24 on the synthetic corpus (the same on every Python, unlike the default corpus, the standard library's source):
# the delay attacker (s2r0) is flagged before and after step 4 and banned after it, the drift guard re-anchors, and
# the fence windows are full by step 4 (so their cached fences matter): all of it must survive
SENTINEL = SentinelConfig(window=4, min_window=4)


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus()


def tiny(**kw) -> MeshConfig:
    base = dict(preset="tiny", stages=2, replicas=3, malicious_fraction=1 / 6, steps=8, warmup=3, microbatches=2,
                batch_size=2, eval_every=2, eval_batches=2, seed=24, attack="delay", device="cpu", sentinel=SENTINEL)
    base.update(kw)
    return MeshConfig(**base)


@pytest.fixture(scope="module")
def straight(corpus):
    mesh = Mesh(tiny(), corpus)
    at_step_4 = {}

    def snapshot(step, info):
        if step == 3:
            at_step_4.update(copy.deepcopy(mesh.state_dict()))

    result = mesh.run(snapshot)
    mesh.at_step_4 = at_step_4
    return mesh, result


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler (the one Mesh.run holds Ctrl-C under), whatever the test runner installed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def assert_same_state(a, b, where="state"):
    """Equal nested checkpoint states: tensors bit for bit, NaN equal to NaN."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def assert_same_run(mesh, result, ref_mesh, ref_result):
    rep, ref = result.report, ref_result.report
    for key in ("val_loss", "banned", "ban_steps", "false_bans", "tainted_microbatches", "poisoned_microbatches",
                "taint_precision", "taint_recall", "microbatches", "malicious"):
        assert rep[key] == ref[key], key
    assert result.history == ref_result.history
    assert result.events == ref_result.events
    for p, q in zip(mesh.params, ref_mesh.params, strict=True):
        assert torch.equal(p, q)
    assert mesh.sampler.state_dict() == ref_mesh.sampler.state_dict()
    assert mesh.route_rng.bit_generator.state == ref_mesh.route_rng.bit_generator.state
    assert mesh.validator.reanchors == ref_mesh.validator.reanchors
    assert mesh.validator.recent_flags == ref_mesh.validator.recent_flags
    assert mesh.validator.ledger.state_dict() == ref_mesh.validator.ledger.state_dict()
    assert mesh.validator.monitors.keys() == ref_mesh.validator.monitors.keys()
    for key, mon in mesh.validator.monitors.items():
        ref_mon = ref_mesh.validator.monitors[key]
        assert np.array_equal(mon.baseline.quantiles, ref_mon.baseline.quantiles)
        assert mon.n_accepted == ref_mon.n_accepted
        for m, fence in mon.fences.items():  # the window and when its fence was last computed
            assert list(fence.values) == list(ref_mon.fences[m].values)
            assert (fence._cached, fence._stale) == (ref_mon.fences[m]._cached, ref_mon.fences[m]._stale), (key, m)


def test_the_reference_run_exercises_the_state(straight):
    mesh, result = straight
    assert result.report["banned"] == ["s2r0"] == result.report["malicious"]
    assert {e.step for e in result.events if e.kind == "flag"} & {0, 1, 2, 3}
    assert result.report["ban_steps"]["s2r0"] > 4
    replayed = mesh.behaviours["s2r0"].histories["forward"].steps  # the delay attack's own honest tensors
    assert mesh.validator.reanchors > 0 and min(replayed) < 4 < max(replayed)
    assert all(len(mon.fences["l2"]) == 4 for mon in mesh.validator.monitors.values())
    assert [s for s, _ in result.history["val"]] == [2, 4, 6, 8] and math.isfinite(result.report["val_loss"])


def test_extended_run_resumes_exactly(straight, corpus, tmp_path):
    path = tmp_path / "mesh.pt"
    first = Mesh(tiny(steps=4), corpus)
    first.run(checkpoint=path, checkpoint_every=3)  # saved after step 3, then at the end (step 4)
    assert not os.path.exists(f"{path}.tmp")
    state = torch.load(path, weights_only=True)  # plain data: no code runs when it is read
    assert state["step"] == 4 and state["config"]["steps"] == 4

    steps_run = []
    mesh = Mesh(tiny(steps=8), corpus)
    result = mesh.run(lambda step, info: steps_run.append(step), checkpoint=path, resume=True)
    assert steps_run == [4, 5, 6, 7]
    assert_same_run(mesh, result, *straight)
    assert torch.load(path, weights_only=True)["step"] == 8


def test_interrupted_run_resumes_exactly(straight, corpus, tmp_path, default_sigint):
    path = tmp_path / "sub" / "mesh.pt"

    def ctrl_c(step, info):
        if step == 3:  # Ctrl-C in the middle of the run: held until the step ends, then saved
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(MeshInterrupted) as caught:
        Mesh(tiny(), corpus).run(ctrl_c, checkpoint=path, checkpoint_every=100)
    assert isinstance(caught.value, KeyboardInterrupt)
    assert caught.value.step == 4 and caught.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    mesh = Mesh(tiny(), corpus)
    assert mesh.load_checkpoint(path) == 4
    loaded, expected = mesh.state_dict(), straight[0].at_step_4
    del loaded["timing"], expected["timing"]
    assert_same_state(loaded, expected)  # everything but the timings, as the uninterrupted run had it
    result = mesh.run(checkpoint=path)  # already loaded: continues from completed_steps
    assert_same_run(mesh, result, *straight)


def test_validator_state_keeps_the_drift_guard(straight):
    validator = straight[0].validator
    copy = Validator(validator.config)
    copy.load_state_dict(validator.state_dict())
    assert copy.reanchors == validator.reanchors > 0
    assert copy.recent_flags == validator.recent_flags
    assert copy.ledger.state_dict() == validator.ledger.state_dict()
    for key, mon in validator.monitors.items():
        for m, fence in mon.fences.items():
            assert copy.monitors[key].fences[m].fence() == fence.fence()
            assert copy.monitors[key].fences[m]._stale == fence._stale


def test_foreign_or_mismatched_checkpoints_are_refused(corpus, tmp_path):
    path = tmp_path / "mesh.pt"
    mesh = Mesh(tiny(steps=4), corpus)
    mesh.run(checkpoint=path)
    with pytest.raises(CheckpointError, match="seed: 24 -> 3"):
        Mesh(tiny(seed=3), corpus).load_checkpoint(path)
    with pytest.raises(CheckpointError, match="sentinel.fence_k"):
        Mesh(tiny(sentinel=SentinelConfig(window=4, min_window=4, fence_k=3.0)), corpus).load_checkpoint(path)
    with pytest.raises(CheckpointError, match="past this run's 2 steps"):
        Mesh(tiny(steps=2), corpus).load_checkpoint(path)
    other = load_corpus(max_bytes=2**20)
    with pytest.raises(CheckpointError, match="another corpus"):
        Mesh(tiny(), other).load_checkpoint(path)

    state = torch.load(path, weights_only=True)
    del state["optimizer"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing"):
        Mesh(tiny(), corpus).load_checkpoint(tmp_path / "missing.pt")
    state = torch.load(path, weights_only=True)
    state["sampler"] = {"nonsense": 1}
    torch.save(state, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match="malformed"):
        Mesh(tiny(), corpus).load_checkpoint(tmp_path / "damaged.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a mesh checkpoint"):
        Mesh(tiny(), corpus).load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        Mesh(tiny(), corpus).load_checkpoint(tmp_path / "garbage.pt")
    with pytest.raises(FileNotFoundError):
        Mesh(tiny(), corpus).load_checkpoint(tmp_path / "absent.pt")


def test_simulate_checkpoint_and_resume(tmp_path, capsys):
    data = tmp_path / "corpus.txt"  # a small corpus keeps the three CLI runs to about a second
    data.write_bytes(b"".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n".encode() for i in range(4000)))
    ckpt, first, resumed, straight = (tmp_path / n for n in ("ck.pt", "r1.json", "r2.json", "r3.json"))
    common = ["simulate", "--preset", "tiny", "--stages", "2", "--replicas", "3", "--malicious-fraction", "0.17",
              "--attack", "delay", "--warmup", "3", "--microbatches", "2", "--batch-size", "2", "--eval-every", "0",
              "--seed", "1", "--data", str(data), "--quiet", "--threads", "1"]
    assert main([*common, "--steps", "4", "--checkpoint", str(ckpt), "--checkpoint-every", "2",
                 "--report", str(first)]) == 0
    assert json.loads(first.read_text())["config"]["steps"] == 4
    capsys.readouterr()

    assert main([*common, "--steps", "6", "--checkpoint", str(ckpt)]) == 2  # never overwritten without --resume
    assert "--resume" in capsys.readouterr().err

    assert main([*common, "--steps", "6", "--checkpoint", str(ckpt), "--resume", "--report", str(resumed)]) == 0
    assert f"resumed from {ckpt} at step 4 of 6" in capsys.readouterr().err
    report = json.loads(resumed.read_text())
    assert report["config"]["steps"] == 6 and report["microbatches"] == 12
    assert report["history"]["defended"]["step"] == list(range(6))

    assert main([*common, "--steps", "6", "--report", str(straight)]) == 0
    reference = json.loads(straight.read_text())
    for key in ("val_loss", "banned", "tainted_microbatches", "poisoned_microbatches"):
        assert report[key] == reference[key], key
    assert report["history"]["defended"]["loss"] == reference["history"]["defended"]["loss"]

    assert main([*common, "--steps", "3", "--checkpoint", str(ckpt), "--resume"]) == 2  # it is at step 6
    assert "past this run's 3 steps" in capsys.readouterr().err


def test_a_run_with_several_validators_resumes_exactly(corpus, tmp_path):
    config = dict(validators=2, ban_quorum=2)
    ref_mesh = Mesh(tiny(**config), corpus)
    ref_result = ref_mesh.run()
    path = tmp_path / "mesh.pt"
    Mesh(tiny(steps=4, **config), corpus).run(checkpoint=path)
    assert len(torch.load(path, weights_only=True)["validator"]) == 2
    mesh = Mesh(tiny(**config), corpus)
    result = mesh.run(checkpoint=path, resume=True)
    assert_same_run(mesh, result, ref_mesh, ref_result)
    assert result.report["validator_bans"] == ref_result.report["validator_bans"]
    for v, ref in zip(mesh.validators, ref_mesh.validators, strict=True):
        assert v.ledger.state_dict() == ref.ledger.state_dict()
    assert mesh.validator_rng.bit_generator.state == ref_mesh.validator_rng.bit_generator.state
    with pytest.raises(CheckpointError, match="validators"):  # one validator's run cannot resume it
        Mesh(tiny(), corpus).load_checkpoint(path)


def test_a_checkpoint_from_before_several_validators_still_resumes(corpus, tmp_path):
    path = tmp_path / "old.pt"
    Mesh(tiny(steps=4), corpus).run(checkpoint=path)
    state = torch.load(path, weights_only=True)
    for key in ("validators", "ban_quorum", "check_fanout"):  # what a checkpoint of the previous version lacks
        del state["config"][key]
    del state["validator_rng"]
    torch.save(state, path)
    mesh = Mesh(tiny(steps=5), corpus)
    assert mesh.load_checkpoint(path) == 4
    assert mesh.run().report["config"]["validators"] == 1
