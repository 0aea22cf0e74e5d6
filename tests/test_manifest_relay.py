"""Relaying the manifest: any peer may keep the authority-signed manifest published under its own subkey, so that
nodes can join while the authority is down; the signature inside is what every node checks. The manifest file the
authority writes loads back only when intact and signed by the expected authority."""

import dataclasses
import json
import os
import signal
import subprocess
import time

import pytest
from hivemind.utils import get_dht_time
from swarm_helpers import sentinel_node_command
from test_dht_records import AUTHORITY, MANIFEST, OUTSIDER, RUN, SIGNED_MANIFEST, reader, shutdown, signed_record
from test_dht_records import start_dht as start_test_dht

from node.common import CommandError, load_manifest_json, manifest_json
from swarm.dht_schema import SentinelRecordValidator, fetch_manifest, manifest_key, publish_manifest
from swarm.records import SignedManifest


def test_a_relayed_copy_validates_and_a_forged_one_does_not():
    policy = reader()
    assert policy.validate(signed_record(OUTSIDER, manifest_key(RUN), SIGNED_MANIFEST))  # a relay's copy
    tampered = SignedManifest(dataclasses.replace(MANIFEST, ban_quorum=1), SIGNED_MANIFEST.signature)
    assert not policy.validate(signed_record(OUTSIDER, manifest_key(RUN), tampered))
    own = dataclasses.replace(MANIFEST, authority=OUTSIDER.public_key).sign(OUTSIDER)  # self-made authority
    assert not policy.validate(signed_record(OUTSIDER, manifest_key(RUN), own))
    other_run = dataclasses.replace(MANIFEST, run_id="other").sign(AUTHORITY)
    assert not policy.validate(signed_record(OUTSIDER, manifest_key(RUN), other_run))
    # the relay's subkey must be its own: a copy under the authority's marker signed by the relay is refused
    assert not policy.validate(signed_record(OUTSIDER, manifest_key(RUN), SIGNED_MANIFEST, marker_of=AUTHORITY))


@pytest.mark.forked
@pytest.mark.timeout(90)
def test_the_manifest_outlives_the_authoritys_record_through_a_relay():
    """The authority's record expires; the relay's copy is still found. A newer manifest of the authority wins over an
    older relayed one, and a digest selects a version."""
    relay = reader_dht = authority_dht = None
    try:
        relay = start_test_dht([SentinelRecordValidator.from_manifest(MANIFEST, OUTSIDER)])
        maddrs = relay.get_visible_maddrs()
        reader_dht = start_test_dht([SentinelRecordValidator.for_bootstrap(RUN, AUTHORITY.public_key)], maddrs)
        authority_dht = start_test_dht([SentinelRecordValidator.from_manifest(MANIFEST, AUTHORITY)], maddrs)
        now = get_dht_time()
        assert publish_manifest(authority_dht, AUTHORITY, SIGNED_MANIFEST, now + 3)
        assert publish_manifest(relay, OUTSIDER, SIGNED_MANIFEST, now + 60)
        authority_dht.shutdown()
        authority_dht = None
        time.sleep(max(0.0, now + 3.5 - get_dht_time()))  # the authority's own record has expired
        assert fetch_manifest(reader_dht, RUN, AUTHORITY.public_key) == SIGNED_MANIFEST
        assert fetch_manifest(reader_dht, RUN, OUTSIDER.public_key) is None  # trust is the authority's key

        newer = dataclasses.replace(MANIFEST, created_at=MANIFEST.created_at + 1).sign(AUTHORITY)
        authority_dht = start_test_dht([SentinelRecordValidator.from_manifest(MANIFEST, AUTHORITY)], maddrs)
        assert publish_manifest(authority_dht, AUTHORITY, newer, get_dht_time() + 60)
        assert fetch_manifest(reader_dht, RUN, AUTHORITY.public_key) == newer
        assert fetch_manifest(reader_dht, RUN, AUTHORITY.public_key, MANIFEST.digest()) == SIGNED_MANIFEST
        assert fetch_manifest(reader_dht, RUN, AUTHORITY.public_key, bytes(32)) is None
    finally:
        shutdown(authority_dht, reader_dht, relay)


def test_the_manifest_file_loads_back_only_intact(tmp_path):
    path = tmp_path / "run.manifest.json"
    data = manifest_json(SIGNED_MANIFEST)
    path.write_text(json.dumps(data))
    assert load_manifest_json(path, AUTHORITY.public_key) == SIGNED_MANIFEST
    with pytest.raises(CommandError, match="not a manifest signed by authority"):
        load_manifest_json(path, OUTSIDER.public_key)
    for change in ({"ban_quorum": 1}, {"run_id": "other"}, {"signature": "00" * 64}, {"validators": ["zz"]}):
        path.write_text(json.dumps({**data, **change}))
        with pytest.raises(CommandError, match="not a manifest signed by authority"):
            load_manifest_json(path, AUTHORITY.public_key)
    path.write_text(json.dumps({**data, "digest": "00" * 32}))
    with pytest.raises(CommandError, match="digest field"):
        load_manifest_json(path, AUTHORITY.public_key)
    for text in ("{not json", "[1, 2]", json.dumps({"run_id": RUN})):
        path.write_text(text)
        with pytest.raises(CommandError, match="manifest"):
            load_manifest_json(path, AUTHORITY.public_key)
    with pytest.raises(CommandError, match="cannot read the manifest file"):
        load_manifest_json(tmp_path / "missing.json", AUTHORITY.public_key)


def _wait_for_text(path, text: str, process: subprocess.Popen, seconds: float) -> None:
    end = time.monotonic() + seconds
    while not (path.exists() and text in path.read_text()):
        assert process.poll() is None, path.read_text()[-3000:] if path.exists() else "no log"
        assert time.monotonic() < end, f"{text!r} not in {path.name} after {seconds} s"
        time.sleep(0.2)


class _Nodes:
    """`sentinel-node` processes of one test, each in its own process group with its log in ``folder``; on exit,
    whatever still runs gets SIGINT, then SIGKILL after 30 s."""

    def __init__(self, folder):
        self.folder = folder
        self.node = sentinel_node_command()
        self.env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.processes: list[subprocess.Popen] = []

    def run(self, *args: str, log: str) -> subprocess.Popen:
        with open(self.folder / log, "w") as out:
            process = subprocess.Popen([*self.node, *args], cwd=self.folder, env=self.env, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.processes.append(process)
        return process

    def authority(self, run_id: str, validator_key: str, ready) -> subprocess.Popen:
        """A `bootstrap --new-swarm` whose manifest records live 6 s (re-published every 5 s)."""
        return self.run("bootstrap", "--port", "0", "--new-swarm", "--run-id", run_id, "--stages", "2",
                        "--validator-key", validator_key, "--trainer-key", "22" * 32, "--manifest-ttl", "6",
                        "--authority-key", str(self.folder / "authority.key"), "--ready-file", str(ready),
                        log="authority.log")  # fmt: skip

    @staticmethod
    def stop(process: subprocess.Popen) -> int:
        os.killpg(process.pid, signal.SIGINT)
        return process.wait(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


@pytest.mark.forked
@pytest.mark.timeout(240)
@pytest.mark.parametrize("from_file", [False, True])
def test_nodes_still_find_the_manifest_after_the_authority_stops(tmp_path, from_file):
    """`bootstrap --run-id R --authority KEY` (fetching the manifest from the DHT, or reading the authority's
    manifest file) keeps it published: once the authority has stopped and its own record has expired, `status`
    still verifies the run's manifest."""
    with _Nodes(tmp_path) as nodes:
        ready = tmp_path / "authority.json"
        authority = nodes.authority("relayed", "11" * 32, ready)
        _wait_for_text(ready, "authority", authority, 90)
        info = json.loads(ready.read_text())
        relay_ready = tmp_path / "relay.json"
        extra = ["--manifest", info["manifest"]] if from_file else []
        relay = nodes.run("bootstrap", "--port", "0", "--initial-peers", f"@{ready}", "--run-id", "relayed",
                          "--authority", info["authority"], *extra, "--ready-file", str(relay_ready),
                          log="relay.log")  # fmt: skip
        _wait_for_text(tmp_path / "relay.log", "relaying the manifest", relay, 90)
        assert json.loads(relay_ready.read_text())["digest"] == info["digest"]
        assert nodes.stop(authority) == 0
        time.sleep(21)  # the authority's last record (6 s) and the validator's own copy (20 s) have expired by now
        status = subprocess.run([*nodes.node, "status", "--initial-peers", f"@{relay_ready}", "--run-id", "relayed",
                                 "--authority", info["authority"], "--json"], env=nodes.env, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        assert status.returncode == 0, status.stderr[-3000:]
        manifest = json.loads(status.stdout)["manifest"]
        assert manifest["run_id"] == "relayed"
        assert [c["authority"] for c in manifest["copies"]] == [False]  # the relay's copy only


def test_join_falls_back_on_a_manifest_file_only_when_it_is_this_runs(tmp_path, monkeypatch):
    """`join`: when the DHT has no manifest, the first fallback file that is this run's, signed by the authority and
    matching --manifest-digest is used; others are named in the error."""
    import argparse

    from node import join
    from node.common import StopFlag

    def no_manifest(*args, **kwargs):
        raise CommandError("no manifest in the DHT")

    monkeypatch.setattr(join, "wait_for_signed_manifest", no_manifest)
    good, other_run, tampered = tmp_path / "good.json", tmp_path / "other.json", tmp_path / "bad.json"
    good.write_text(json.dumps(manifest_json(SIGNED_MANIFEST)))
    other_run.write_text(json.dumps(manifest_json(dataclasses.replace(MANIFEST, run_id="other").sign(AUTHORITY))))
    tampered.write_text(json.dumps({**manifest_json(SIGNED_MANIFEST), "ban_quorum": 1}))
    args = argparse.Namespace(run_id=RUN, manifest_timeout=60.0, role="validator")
    stop = StopFlag()
    assert join._join_manifest(None, args, AUTHORITY.public_key, None, [tampered, other_run, good], stop) == (
        SIGNED_MANIFEST
    )
    with pytest.raises(CommandError, match="no usable manifest file") as e:
        join._join_manifest(None, args, AUTHORITY.public_key, bytes(32), [good], stop)  # another digest
    assert "is another manifest" in str(e.value)
    with pytest.raises(CommandError, match="not a manifest signed by authority"):
        join._join_manifest(None, args, OUTSIDER.public_key, None, [good], stop)
    with pytest.raises(CommandError, match="no manifest in the DHT"):
        join._join_manifest(None, args, AUTHORITY.public_key, None, [], stop)


@pytest.mark.forked
@pytest.mark.timeout(240)
def test_a_node_restarts_on_its_saved_manifest_with_the_authority_gone(tmp_path):
    """A validator with --checkpoint-dir keeps the manifest it joined with; the authority stops (no relay), its
    record expires, and the validator, restarted against another bootstrap peer, joins on the saved manifest."""
    with _Nodes(tmp_path) as nodes:
        subprocess.run([*nodes.node, "keygen", "--out", str(tmp_path / "v.key")], check=True, env=nodes.env,
                       capture_output=True, timeout=60)  # fmt: skip
        validator_key = (tmp_path / "v.key.pub").read_text().split()[0]
        ready = tmp_path / "authority.json"
        authority = nodes.authority("saved", validator_key, ready)
        _wait_for_text(ready, "authority", authority, 90)
        key = json.loads(ready.read_text())["authority"]
        plain_ready = tmp_path / "plain.json"
        plain = nodes.run("bootstrap", "--port", "0", "--initial-peers", f"@{ready}", "--ready-file",
                          str(plain_ready), log="plain.log")  # fmt: skip
        _wait_for_text(plain_ready, "maddrs", plain, 90)
        join = ["join", "--role", "validator", "--run-id", "saved", "--authority", key, "--identity",
                str(tmp_path / "v.key"), "--checkpoint-dir", str(tmp_path / "state")]  # fmt: skip
        first = nodes.run(*join, "--initial-peers", f"@{ready}", log="first.log")
        _wait_for_text(tmp_path / "first.log", "joined run", first, 90)
        assert (tmp_path / "state" / "manifest-saved.json").is_file()
        assert nodes.stop(first) == 0 and nodes.stop(authority) == 0
        time.sleep(21)  # the authority's last record (6 s) and the validator's own copy (20 s) have expired
        again = nodes.run(*join, "--initial-peers", f"@{plain_ready}", log="again.log")
        _wait_for_text(tmp_path / "again.log", "joined run", again, 120)
        assert "no manifest in the DHT" in (tmp_path / "again.log").read_text()
        assert nodes.stop(again) == 0


def test_a_relay_follows_a_newer_manifest_of_the_authority_only(monkeypatch):
    from node.bootstrap_cmd import _newer_manifest
    from swarm import dht_schema

    class Dht:
        added = []

        def add_validators(self, validators):
            self.added += validators

    newer = dataclasses.replace(MANIFEST, created_at=MANIFEST.created_at + 5).sign(AUTHORITY)
    older = dataclasses.replace(MANIFEST, created_at=MANIFEST.created_at / 2).sign(AUTHORITY)
    dht = Dht()
    for found, expected in ((None, SIGNED_MANIFEST), (older, SIGNED_MANIFEST), (SIGNED_MANIFEST, SIGNED_MANIFEST),
                            (newer, newer)):  # fmt: skip
        monkeypatch.setattr(dht_schema, "fetch_manifest", lambda *args, found=found, **kwargs: found)
        assert _newer_manifest(dht, SIGNED_MANIFEST, AUTHORITY.public_key, OUTSIDER) == expected
    assert len(dht.added) == 1 and dht.added[0].n_stages == newer.manifest.n_stages  # the policy upgraded once
