"""`sentinel-node keygen`, the manifest and join commands of `bootstrap --new-swarm`, and clear argument errors."""

import json
import os
import stat

import pytest

from node.cli import main
from node.common import (
    CommandError,
    build_manifest,
    join_commands,
    manifest_json,
    parse_key_hex,
    parse_overrides,
    sentinel_from_manifest,
    sentinel_to_config,
)
from sentinel.config import SentinelConfig
from swarm.identity import Identity, fingerprint
from swarm.model import resolve_config

AUTHORITY, VALIDATOR, TRAINER = (Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3))
PEERS = ["/ip4/127.0.0.1/tcp/31337/p2p/QmBootstrap"]


def test_keygen_writes_an_owner_only_identity_and_refuses_to_overwrite(tmp_path, capsys):
    path = tmp_path / "keys" / "node.key"
    assert main(["keygen", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    identity = Identity.load(path)
    assert identity.public_hex in out and identity.fingerprint in out
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    before = path.read_bytes()
    assert main(["keygen", "--out", str(path)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert path.read_bytes() == before  # untouched
    assert main(["keygen", "--out", str(path), "--force"]) == 0
    assert Identity.load(path) != identity
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_keygen_raw_format_and_directory_error(tmp_path, capsys):
    path = tmp_path / "raw.key"
    assert main(["keygen", "--out", str(path), "--format", "raw"]) == 0
    assert len(path.read_bytes()) == 32
    assert main(["keygen", "--out", str(tmp_path)]) == 2
    assert "directory" in capsys.readouterr().err


def _manifest(**kwargs):
    defaults = dict(run_id="run-1", preset="tiny", n_stages=3, validators=[VALIDATOR.public_key],
                    trainers=[TRAINER.public_key], ban_quorum=1, created_at=1000.0)  # fmt: skip
    return build_manifest(AUTHORITY, **{**defaults, **kwargs})


def test_bootstrap_manifest_is_signed_and_complete():
    signed = _manifest(sentinel=SentinelConfig(ban_level=2, drift_senders=2))
    m = signed.verify(authority=AUTHORITY.public_key)
    assert signed.verify(fingerprint=fingerprint(AUTHORITY.public_key)) == m
    assert m.run_id == "run-1" and m.n_stages == 3 and m.preset == "tiny"
    n_layers = resolve_config("tiny", 3).n_layers
    assert m.layer_spans[0][0] == 0 and m.layer_spans[-1][1] == n_layers
    assert all(a[1] == b[0] for a, b in zip(m.layer_spans, m.layer_spans[1:]))
    assert m.validators == (VALIDATOR.public_key,) and m.trainers == (TRAINER.public_key,) and m.ban_quorum == 1
    sentinel = sentinel_from_manifest(m)
    assert sentinel == SentinelConfig(ban_level=2, drift_senders=2)  # round trip, metrics included
    assert sentinel_from_manifest(_manifest().manifest) == SentinelConfig()
    assert isinstance(sentinel_to_config(SentinelConfig())["metrics"], str)


def test_bootstrap_manifest_rejects_bad_settings():
    with pytest.raises(CommandError, match="ban-quorum"):
        _manifest(ban_quorum=2)
    with pytest.raises(CommandError, match="validator-key"):
        _manifest(validators=[])
    with pytest.raises(ValueError, match="preset"):
        _manifest(preset="nope")


def test_join_commands_are_a_pure_function_of_the_manifest():
    signed = _manifest()
    m = signed.manifest
    commands = join_commands(m, PEERS)
    assert commands == join_commands(m, PEERS)  # deterministic
    assert set(commands) == {"gpu-stage", "validator", "trainer"}
    for role, argv in commands.items():
        assert argv[:4] == ["sentinel-node", "join", "--role", role]
        assert argv[argv.index("--initial-peers") + 1] == PEERS[0]
        assert argv[argv.index("--run-id") + 1] == "run-1"
        assert argv[argv.index("--authority") + 1] == AUTHORITY.public_hex
        assert argv[argv.index("--manifest-digest") + 1] == m.digest().hex()
        assert "--identity" in argv
    assert commands["gpu-stage"][-2:] == ["--stage", "1"]
    # the printed commands parse with the real CLI
    from node.cli import build_parser

    for argv in commands.values():
        args = build_parser().parse_args(argv[1:])
        assert args.run_id == "run-1" and args.initial_peers == PEERS
    other = _manifest(run_id="run-2").manifest
    assert join_commands(other, PEERS) != commands


def test_key_and_override_parsing():
    assert parse_key_hex(VALIDATOR.public_hex) == VALIDATOR.public_key
    with pytest.raises(CommandError, match="64 hex"):
        parse_key_hex("abcd")
    with pytest.raises(CommandError, match="not a hex"):
        parse_key_hex("zz" * 32)
    assert parse_overrides(["ban_level=2", "fence_k=4.5", "replacement=drop", "x=true"]) == {
        "ban_level": 2, "fence_k": 4.5, "replacement": "drop", "x": True,
    }  # fmt: skip
    with pytest.raises(CommandError, match="KEY=VALUE"):
        parse_overrides(["ban_level"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bootstrap", "--new-swarm", "--authority-key", "/tmp/x.key"], "--run-id"),
        (["bootstrap", "--new-swarm", "--run-id", "r"], "--authority-key"),
        (["bootstrap", "--validator-key", "00" * 32], "need --new-swarm"),
        (["bootstrap", "--run-id", "r"], "needs both --run-id and --authority"),
        (["bootstrap", "--authority", "00" * 32], "needs both --run-id and --authority"),
        (["bootstrap", "--new-swarm", "--run-id", "r", "--authority-key", "{tmp}/a.key", "--authority", "00" * 32],
         "not with --new-swarm"),
        (["bootstrap", "--run-id", "r", "--authority", "00" * 32, "--manifest", "{tmp}/missing.json"],
         "cannot read the manifest file"),
        (["bootstrap", "--new-swarm", "--run-id", "r", "--authority-key", "{tmp}/a.key", "--validator-key", "12"],
         "64 hex"),
        (["bootstrap", "--new-swarm", "--run-id", "r", "--authority-key", "{tmp}/a.key", "--validator-key", "00" * 32,
          "--trainer-key", "11" * 32, "--sentinel", "no_such_setting=1"], "unknown --sentinel"),
        (["join", "--role", "gpu-stage", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--run-id", "r", "--authority",
          "00" * 32, "--identity", "{tmp}/s.key"], "--stage K"),
        (["join", "--role", "validator", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--run-id", "r", "--authority",
          "00" * 32, "--identity", "{tmp}/v.key", "--attack", "zeros"], "gpu-stage options"),
        (["join", "--role", "gpu-stage", "--stage", "1", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--run-id", "r",
          "--authority", "00" * 32, "--identity", "{tmp}/s.key", "--attack", "no_such_attack"], "unknown attack"),
        (["join", "--role", "validator", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--run-id", "r", "--authority",
          "beef", "--identity", "{tmp}/v.key"], "64 hex"),
        (["join", "--role", "gpu-stage", "--stage", "1", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--run-id", "r",
          "--authority", "00" * 32, "--identity", "{tmp}/s.key", "--device", "tpu9"], "--device: unknown device"),
        (["join", "--role", "gpu-stage", "--stage", "1", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--run-id", "r",
          "--authority", "00" * 32, "--identity", "{tmp}/s.key", "--device", "cuda:99"], "--device: device 'cuda:99'"),
        (["join", "--role", "trainer", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--run-id", "r", "--authority",
          "00" * 32, "--identity", "{tmp}/missing.key"], "keygen"),
        (["join", "--role", "trainer", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--run-id", "r", "--authority",
          "00" * 32, "--identity", "{tmp}/t.key", "--checkpoint-every", "-1"], "--checkpoint-every"),
        (["join", "--role", "trainer", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--run-id", "r", "--authority",
          "00" * 32, "--identity", "{tmp}/t.key", "--hedge-after", "nan"], "--hedge-after >= 0"),
        (["join", "--role", "validator", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--run-id", "r", "--authority",
          "00" * 32, "--identity", "{tmp}/v.key", "--manifest", "{tmp}/missing.json"], "--manifest"),
        (["demo", "--stages", "1", "--replicas", "1", "--attackers", "1"], "honest replica"),
        (["demo", "--validators", "1", "--ban-quorum", "2"], "--ban-quorum"),
        (["demo", "--attack", "no_such_attack"], "unknown attack"),
        (["demo", "--steps", "3"], "warm-up"),
        (["demo", "--sentinel", "no_such_setting=1"], "unknown --sentinel"),
        (["demo", "--sentinel", "seed=1", "--sentinel", "fit_max_fence=-1"], "fit_max_fence"),
        (["demo", "--sentinel", "seed"], "KEY=VALUE"),
        (["demo", "--microbatches", "0"], "--microbatches must be >= 1"),  # was a ZeroDivisionError traceback
        (["demo", "--batch-size", "0", "--max-inflight", "0"], "--batch-size, --max-inflight must be >= 1"),
        (["demo", "--attackers", "-1"], "--attackers must be >= 0"),
        (["demo", "--sentinel", "ban_level=2.5"], "ban_level takes a int"),  # was signed into the manifest
        (["demo", "--sentinel", "ban_level=abc"], "ban_level takes a int"),
        (["bootstrap", "--new-swarm", "--run-id", "r", "--authority-key", "{tmp}/a.key", "--validator-key",
          "@{tmp}/ready.json", "--trainer-key", "11" * 32], "ready file"),  # was read as the authority's key
        (["keygen", "--out", "{tmp}/afile/x.key"], "afile"),  # a folder that is a file: was a traceback
        (["join", "--role", "trainer", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--run-id", "r", "--authority",
          "00" * 32, "--identity", "{tmp}"], "directory"),  # an identity path that is a folder: was a traceback
    ],
)  # fmt: skip
def test_argument_errors_are_clear_and_start_nothing(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "ready.json").write_text(json.dumps({"maddrs": ["/ip4/127.0.0.1/tcp/1"], "authority": "00" * 32}))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"sentinel-node {argv[0]}: error:" in err and message in err, err
    assert not list(tmp_path.glob("*.key")) or argv[0] == "join"  # no authority key created on an error


@pytest.mark.parametrize(
    "argv",
    [
        ["join", "--initial-peers", "x", "--run-id", "r", "--authority", "00", "--identity", "k"],  # no --role
        ["join", "--role", "nope", "--initial-peers", "x", "--run-id", "r", "--authority", "00", "--identity", "k"],
        ["keygen"],  # no --out
        ["status", "--run-id", "r", "--authority", "00"],  # no --initial-peers
    ],
)
def test_missing_or_invalid_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_stage_help_marks_attack_as_red_team(capsys):
    with pytest.raises(SystemExit):
        main(["join", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "RED-TEAM OPTION FOR TESTING ONLY" in out


def test_status_text_view_marks_banned_replicas():
    from node.status import format_status

    state = {
        "manifest": {"run_id": "r", "preset": "tiny", "n_stages": 1, "layer_spans": [[0, 4]], "validators": 1,
                     "trainers": 1, "ban_quorum": 1, "authority": "aa" * 32, "digest": "bb" * 32,
                     "copies": [{"publisher": "dd" * 8, "authority": False, "digest": "bb" * 32}]},
        "stages": {"1": [{"peer": "PeerGood", "state": "ONLINE", "throughput": 2.5, "span": [0, 4]},
                         {"peer": "PeerBad", "state": "ONLINE", "throughput": 2.0, "span": [0, 4]}]},
        "validators": {"0": [{"peer": "PeerValidator", "throughput": 9.0, "key": "cc" * 8}], "1": []},
        "strikes": [{"peer": "PeerBad", "validator": "cc" * 8, "count": 3, "banned": True, "step": 7}],
        "banned": ["PeerBad"],
    }  # fmt: skip
    text = format_status(state)
    assert "PeerBad" in text and "BANNED" in text.split("PeerBad")[1].splitlines()[0]
    assert "BANNED" not in text.split("PeerGood")[1].splitlines()[0]
    assert "boundary 1: validators NONE" in text and "banned by quorum (1): ['PeerBad']" in text
    assert "published by 1 relay(s) (the authority is not publishing it)" in text
    state["manifest"]["copies"].append({"publisher": "aa" * 8, "authority": True, "digest": "bb" * 32})
    assert "published by the authority and 1 relay(s)\n" in format_status(state)
    assert "(offline)" not in text
    assert "  listed by 0 validator(s) as answering lately\n" in text  # a state without directories (older JSON)
    # the validators' directories: a replica they list that no announcement shows (its stage key unreadable)
    state["directories"] = {"1": [{"validator": "cc" * 8, "peers": ["PeerGood", "PeerHidden"]}]}
    assert "  listed by 1 validator(s) as answering lately; not announced: ['PeerHidden']\n" in format_status(state)


def test_status_text_view_marks_banned_peers_that_went_offline():
    """A banned peer that announces no stage any more (found through the strike index) is listed as offline, and so
    is one whose last announcement says OFFLINE."""
    from node.status import format_status

    state = {
        "manifest": {"run_id": "r", "preset": "tiny", "n_stages": 1, "layer_spans": [[0, 4]], "validators": 1,
                     "trainers": 1, "ban_quorum": 1, "authority": "aa" * 32, "digest": "bb" * 32, "copies": []},
        "stages": {"1": [{"peer": "PeerBad", "state": "ONLINE", "throughput": 2.0, "span": [0, 4]},
                         {"peer": "PeerStopping", "state": "OFFLINE", "throughput": 0.0, "span": [0, 4]}]},
        "validators": {"0": [], "1": []},
        "strikes": [{"peer": p, "validator": "cc" * 8, "count": 3, "banned": True, "step": 7, "online": p == "PeerBad"}
                    for p in ("PeerBad", "PeerGone", "PeerStopping")],
        "banned": ["PeerBad", "PeerGone", "PeerStopping"],
        "bans": [{"peer": "PeerBad", "online": True}, {"peer": "PeerGone", "online": False},
                 {"peer": "PeerStopping", "online": False}],
    }  # fmt: skip
    text = format_status(state)
    assert "banned by quorum (1): ['PeerBad', 'PeerGone', 'PeerStopping']\n" in text
    assert "\n  PeerGone (offline)" in text and "\n  PeerStopping (offline)" in text
    assert "PeerBad (offline)" not in text
    assert "\n  PeerGone (offline) by cccccccccccccccc: 3 strike(s)" in text


def test_at_path_arguments_read_pub_files_and_ready_files(tmp_path, capsys):
    import json

    from node.common import expand_peers

    key = tmp_path / "v.key"
    assert main(["keygen", "--out", str(key)]) == 0
    capsys.readouterr()
    assert parse_key_hex(f"@{key}.pub") == Identity.load(key).public_key
    ready = tmp_path / "bootstrap.json"
    ready.write_text(json.dumps({"maddrs": PEERS, "authority": AUTHORITY.public_hex}))
    assert parse_key_hex(f"@{ready}") == AUTHORITY.public_key
    assert expand_peers([f"@{ready}", "/ip4/1.2.3.4/tcp/1/p2p/QmX"]) == [*PEERS, "/ip4/1.2.3.4/tcp/1/p2p/QmX"]
    with pytest.raises(CommandError, match="cannot read"):
        expand_peers([f"@{tmp_path / 'missing.json'}"])


def test_a_trainer_step_that_finds_no_route_is_retried_until_the_swarm_timeout(monkeypatch):
    """join --role trainer used to exit at the first NoRoute (e.g. 50 announced peers that never answer, drawn before
    the honest replicas for a call's 3 attempts). The step is retried after a fresh DHT view until --swarm-timeout."""
    import asyncio

    import node.join as join
    from node.common import CommandError, StopFlag
    from swarm.trainer import NoRoute

    monkeypatch.setattr(join, "check_dht", lambda dht, stop=None: None)

    class Trainer:
        def __init__(self, failures: int):
            self.failures, self.calls, self.refreshes = failures, 0, 0

        async def step(self, step: int) -> float:
            self.calls += 1
            if self.calls <= self.failures:
                raise NoRoute("no peer answered after 3 failure(s)")
            return 1.5

        async def refresh(self) -> None:
            self.refreshes += 1

    trainer = Trainer(failures=2)
    assert asyncio.run(join._step_with_retries(trainer, 7, 5.0, StopFlag(), None, wait=0.05)) == 1.5
    assert trainer.calls == 3 and trainer.refreshes == 2
    with pytest.raises(CommandError, match="step 8 found no route"):
        asyncio.run(join._step_with_retries(Trainer(failures=1000), 7, 0.3, StopFlag(), None, wait=0.05))
    stopped = StopFlag()
    stopped.event.set()
    assert asyncio.run(join._step_with_retries(Trainer(failures=1), 7, 5.0, stopped, None, wait=0.05)) is None


def test_a_restarted_authority_keeps_its_swarm_s_manifest(tmp_path, capsys):
    """`bootstrap --new-swarm` run again with the same command (a restart of the authority) used to sign a new
    manifest, overwrite the file relays start from, and strand every printed join command (they pin the digest).
    It now resumes with the manifest in the file; with other settings it refuses, saying how to start afresh."""
    from node.bootstrap_cmd import _new_swarm
    from node.cli import build_parser

    def args(*extra):
        return build_parser().parse_args(["bootstrap", "--new-swarm", "--run-id", "r1", "--authority-key",
                                          str(tmp_path / "authority.key"), "--validator-key", VALIDATOR.public_hex,
                                          "--trainer-key", TRAINER.public_hex, *extra])  # fmt: skip

    first = _new_swarm(args())
    (tmp_path / "r1.manifest.json").write_text(json.dumps(manifest_json(first)))
    again = _new_swarm(args())
    assert again.manifest.digest() == first.manifest.digest()
    assert "resuming run 'r1'" in capsys.readouterr().out
    with pytest.raises(CommandError, match="other settings"):
        _new_swarm(args("--stages", "3"))
    (tmp_path / "r1.manifest.json").write_text("{}")
    with pytest.raises(CommandError, match="move it away"):
        _new_swarm(args())


def test_a_port_with_a_listener_is_refused_before_p2pd_starts():
    """p2pd listens with SO_REUSEPORT: a second node on a port in use came up and the kernel split the connections
    between the two peers. A listener like p2pd's (SO_REUSEADDR and SO_REUSEPORT) now stops the second node at once."""
    import socket

    from node.common import check_ports_free

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        for maddr in (f"/ip4/127.0.0.1/tcp/{port}", f"/ip4/0.0.0.0/tcp/{port}"):
            with pytest.raises(CommandError, match=f"port {port} .* is in use"):
                check_ports_free([maddr])
    check_ports_free([f"/ip4/127.0.0.1/tcp/{port}", "/ip4/127.0.0.1/tcp/0", "/dns4/example.org/tcp/31337"])
