"""A node's saved state that cannot be used (damaged, malformed, or another node's) is refused with a StateFileError
that names the file and the way out, and the file is left as it is; an intact one loads."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch

from node.common import CommandError
from node.join import _load_trainer_state
from sentinel.config import SentinelConfig
from swarm.identity import Identity
from swarm.records import Manifest
from swarm.stage_server import StageServer, StageServerConfig
from swarm.state import StateFileError, load_state_file
from swarm.validator_service import ValidatorService, ValidatorServiceConfig

AUTHORITY, VALIDATOR, TRAINER, STAGE = (Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3, 4))
MANIFEST = Manifest("state-files", "tiny", 2, [(0, 2), (2, 4)], {}, [VALIDATOR.public_key], [TRAINER.public_key], 1,
                    1.0, AUTHORITY.public_key)  # fmt: skip


def damaged(path, content: bytes | None = None):
    """``path`` cut to half its length, or overwritten with ``content``."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content is None else content)
    return path.read_bytes()


def test_a_damaged_or_malformed_validator_state_is_refused_and_kept(tmp_path):
    path = tmp_path / "validator.pt"
    good = ValidatorService(ValidatorServiceConfig(state_path=str(path)), MANIFEST, VALIDATOR, SentinelConfig())
    good.validator.ledger.record("QmBad", True, 1)
    good.save_state()
    for shutdown in (good._executor, good._publisher):
        shutdown.shutdown()
    again = ValidatorService(ValidatorServiceConfig(state_path=str(path)), MANIFEST, VALIDATOR, SentinelConfig())
    assert again.validator.ledger.strikes("QmBad") == 1  # intact: the strike survived
    for shutdown in (again._executor, again._publisher):
        shutdown.shutdown()

    kept = damaged(path)
    with pytest.raises(StateFileError, match="validator state .* cannot be read .*move it away") as info:
        ValidatorService(ValidatorServiceConfig(state_path=str(path)), MANIFEST, VALIDATOR, SentinelConfig())
    assert str(path) in str(info.value) and path.read_bytes() == kept  # named, and left as it was
    torch.save({"not": "a validator state"}, path)
    with pytest.raises(StateFileError, match="is malformed"):
        ValidatorService(ValidatorServiceConfig(state_path=str(path)), MANIFEST, VALIDATOR, SentinelConfig())
    assert isinstance(StateFileError("x"), ValueError)  # sentinel-node prints it as an error, exit status 2


def test_a_damaged_or_foreign_stage_checkpoint_is_refused(tmp_path):
    one = StageServer(StageServerConfig(stage=1), MANIFEST, STAGE)
    two = StageServer(StageServerConfig(stage=2), MANIFEST, STAGE)
    try:
        first, second = tmp_path / "stage1.pt", tmp_path / "stage2.pt"
        one.optimizer_steps = 7
        one.save(first)
        two.save(second)
        fresh = StageServer(StageServerConfig(stage=1), MANIFEST, STAGE)
        fresh.load(first)
        assert fresh.optimizer_steps == 7
        fresh._executor.shutdown()
        with pytest.raises(StateFileError, match="stage 1 checkpoint .* does not fit this node"):
            one.load(second)  # another stage's span
        kept = damaged(first)
        with pytest.raises(StateFileError, match="cannot be read"):
            one.load(first)
        assert first.read_bytes() == kept
    finally:
        one._executor.shutdown()
        two._executor.shutdown()


def test_a_damaged_or_foreign_trainer_checkpoint_is_refused(tmp_path):
    path = tmp_path / "trainer.pt"
    path.write_bytes(b"\x80\x04garbage")
    load = partial(load_state_file, path, "trainer checkpoint", weights_only=False)
    with pytest.raises(StateFileError, match="trainer checkpoint .* cannot be read"):
        load(partial(_load_trainer_state, None, MANIFEST, path))
    torch.save({"run_id": "another-run"}, path)
    with pytest.raises(CommandError, match="checkpoint of another run"):  # the caller's own error, unchanged
        load(partial(_load_trainer_state, None, MANIFEST, path))
    torch.save({"run_id": MANIFEST.run_id, "embedding": {"weight": torch.zeros(3, 2)}}, path)  # no head, wrong size
    trainer = SimpleNamespace(embedding=torch.nn.Embedding(4, 2), head=torch.nn.Linear(2, 4))
    with pytest.raises(StateFileError, match="is malformed .*RuntimeError"):
        load(partial(_load_trainer_state, trainer, MANIFEST, path))
    torch.save({"run_id": MANIFEST.run_id, "embedding": trainer.embedding.state_dict()}, path)
    with pytest.raises(StateFileError, match="is malformed .*KeyError: 'head'"):
        load(partial(_load_trainer_state, trainer, MANIFEST, path))
    with pytest.raises(FileNotFoundError):
        load_state_file(tmp_path / "none.pt", "trainer checkpoint", lambda state: state, weights_only=True)


def test_json_files_written_by_several_nodes_at_once_stay_whole(tmp_path):
    """The demo's nodes share one state folder and each keeps the run's manifest there: with one fixed temporary
    name, two writers raced and one failed its rename (seen in a demo run: the trainer died on FileNotFoundError)."""
    import json
    import stat
    import threading

    from node.common import write_json_atomic

    path, errors = tmp_path / "state" / "manifest-run.json", []

    def writer(k: int) -> None:
        try:
            for i in range(100):
                write_json_atomic(path, {"writer": k, "i": i, "pad": "x" * 4096})
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert json.loads(path.read_text())["i"] == 99  # whole, one writer's last
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_trainer_checkpoint_keeps_the_bans_it_had_seen(tmp_path):
    """Bans are for the whole run: a restarted trainer routes around the peers and keys it had seen banned, also
    those whose strike records it cannot read any more (their announcements gone, a new peer id)."""
    import numpy as np

    from node.join import _save_trainer_state
    from swarm.data import Corpus
    from swarm.local import local_manifest
    from swarm.trainer import Trainer, TrainerConfig

    manifest = local_manifest("bans", "tiny", 1, VALIDATOR, TRAINER, AUTHORITY)
    corpus = Corpus(np.random.default_rng(1).integers(0, 256, 5_000).astype(np.uint8), np.zeros(100, np.uint8), "t",
                    1, 1)  # fmt: skip
    trainer = Trainer(TrainerConfig(seed=1), manifest, TRAINER, corpus)
    trainer.banned, trainer.banned_owners = {"QmBad"}, {bytes([9]) * 32}
    path = tmp_path / "trainer.pt"
    _save_trainer_state(trainer, manifest, path, 7)
    again = Trainer(TrainerConfig(seed=1), manifest, TRAINER, corpus)
    step = load_state_file(path, "trainer checkpoint", partial(_load_trainer_state, again, manifest, path),
                           weights_only=False)  # fmt: skip
    assert step == 7 and again.banned == {"QmBad"} and again.banned_owners == {bytes([9]) * 32}
