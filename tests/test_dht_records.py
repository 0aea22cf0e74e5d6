"""SentinelRecordValidator: pure record-level checks, then real hivemind DHTs on 127.0.0.1 (forked, 2-3 peers)."""

import dataclasses
import os
import pickle
import time

import hivemind
import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time

from swarm.dht_schema import (
    SentinelDHT,
    SentinelRecordValidator,
    _daemon_socket_path,
    banned_peers,
    dht_key_id,
    dht_signing_bytes,
    directory_key,
    fetch_manifest,
    fetch_stages,
    fetch_strike_index,
    fetch_strikes,
    fetch_taints,
    make_subkey,
    manifest_key,
    pack_signed_value,
    publish_manifest,
    publish_stage,
    publish_strike,
    publish_strike_index,
    publish_taint,
    stage_key,
    step_bucket,
    strike_index_discriminator,
    strike_index_key,
    strikes_key,
    taint_discriminator,
    taint_key,
    validator_manifest_key,
)
from swarm.identity import Identity
from swarm.records import (
    MAX_DIRECTORY,
    Direction,
    Manifest,
    RecordError,
    ReplicaDirectory,
    SignedManifest,
    StageAnnouncement,
    StageState,
    StrikeIndexEntry,
    StrikeRecord,
    TaintNotice,
)

AUTHORITY = Identity.generate()
V0, V1, V2 = (Identity.generate() for _ in range(3))
OUTSIDER = Identity.generate()
RUN = "dht-test"
MANIFEST = Manifest(
    RUN, "tiny", 2, [(0, 2), (2, 4)], {"beta_h": 0.9}, [V0.public_key, V1.public_key, V2.public_key], [], 2, 1.0,
    AUTHORITY.public_key,
)  # fmt: skip
SIGNED_MANIFEST = MANIFEST.sign(AUTHORITY)
DIGEST = bytes(range(32))
EXP = 2_000_000_000.0  # a fixed expiration for the pure tests


def strike(validator: Identity, step: int = 5, peer: str = "QmBad", banned: bool = True, count: int = 3):
    return StrikeRecord(RUN, peer, count, banned, [DIGEST], step, validator.public_key)


def index_entry(validator: Identity, peer: str = "QmBad", run: str = RUN):
    return StrikeIndexEntry(run, peer, validator.public_key)


def taint(validator: Identity, step: int = 33, microbatch: int = 1):
    return TaintNotice(
        RUN, step, microbatch, 1, Direction.FORWARD, "QmBad", DIGEST, {"l2": 4.0}, "above fence", validator.public_key
    )


def signed_record(writer: Identity, key: str, item, *, discriminator=b"", marker_of=None, expiration=EXP):
    """The DHTRecord that hivemind's store path builds and the writer's validator signs."""
    subkey = make_subkey((marker_of or writer).public_key, discriminator)
    record = DHTRecord(
        dht_key_id(key), MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(item.to_tuple()), expiration
    )
    return dataclasses.replace(
        record, value=SentinelRecordValidator.from_manifest(MANIFEST, writer).sign_value(record)
    )


def reader() -> SentinelRecordValidator:
    return SentinelRecordValidator.from_manifest(MANIFEST)


# ------------------------------------------------------------------------------------------------------ pure checks
def test_validator_accepts_genuine_records_and_strips_signature():
    records = [
        signed_record(V0, strikes_key(RUN, "QmBad"), strike(V0)),
        signed_record(V1, taint_key(RUN, step_bucket(33)), taint(V1), discriminator=taint_discriminator(taint(V1))),
        signed_record(AUTHORITY, manifest_key(RUN), SIGNED_MANIFEST),
        signed_record(OUTSIDER, stage_key(RUN, 1), StageAnnouncement(RUN, 1, "QmS", StageState.ONLINE, (2, 4), 1.0,
                                                                      OUTSIDER.public_key)),
    ]  # fmt: skip
    validator = reader()
    for record in records:
        assert validator.validate(record), record
        payload = validator.strip_value(record)
        assert payload != record.value and MSGPackSerializer.loads(payload)[0] >= 1
    assert MSGPackSerializer.loads(validator.strip_value(records[0])) == strike(V0).to_tuple()


def test_validator_rejects_forgeries():
    key = strikes_key(RUN, "QmBad")
    genuine = signed_record(V0, key, strike(V0))
    payload = MSGPackSerializer.dumps(strike(V0, count=0, banned=False).to_tuple())
    tampered = dataclasses.replace(
        genuine, value=pack_signed_value(payload, MSGPackSerializer.loads(genuine.value)[1])
    )
    forged_sig = OUTSIDER.sign(dht_signing_bytes(genuine.key, genuine.subkey, payload, EXP))
    rejected = {
        "unauthorized writer": signed_record(OUTSIDER, key, strike(OUTSIDER)),
        "tampered payload": tampered,
        "V1 marker signed by outsider": dataclasses.replace(
            signed_record(V1, key, strike(V1)), value=pack_signed_value(payload, forged_sig)
        ),
        "marker of V1, signed by V0": signed_record(V0, key, strike(V1), marker_of=V1),
        "unsigned (raw payload)": dataclasses.replace(genuine, value=payload),
        "expiration extended": dataclasses.replace(genuine, expiration_time=EXP + 1000),
        "moved to another peer's key": dataclasses.replace(genuine, key=dht_key_id(strikes_key(RUN, "QmGood"))),
        "payload names another peer": signed_record(V0, strikes_key(RUN, "QmGood"), strike(V0)),
        "payload names another validator": signed_record(V0, key, strike(V1)),
        "another run": signed_record(V0, key, dataclasses.replace(strike(V0), run_id="other")),
        "taint without discriminator": signed_record(V0, taint_key(RUN, 2), taint(V0)),
        "taint in the wrong bucket": signed_record(
            V0, taint_key(RUN, 0), taint(V0), discriminator=taint_discriminator(taint(V0))
        ),
        "manifest from another authority": signed_record(
            OUTSIDER,
            manifest_key(RUN),
            dataclasses.replace(MANIFEST, authority=OUTSIDER.public_key).sign(OUTSIDER),
        ),
        "stage announced for someone else": signed_record(
            OUTSIDER, stage_key(RUN, 0), StageAnnouncement(RUN, 0, "Q", StageState.ONLINE, (0, 2), 1.0, V0.public_key)
        ),
        "stage outside the manifest": signed_record(
            OUTSIDER,
            stage_key(RUN, 5),
            StageAnnouncement(RUN, 5, "Q", StageState.ONLINE, (0, 2), 1.0, OUTSIDER.public_key),
        ),  # fmt: skip
        "malformed marker": dataclasses.replace(genuine, subkey=MSGPackSerializer.dumps(b"[ed25519:abc]")),
        "unmarked sentinel payload": dataclasses.replace(genuine, subkey=MSGPackSerializer.dumps(b"x"), value=payload),
        "unmarked value squatting the manifest key": DHTRecord(
            dht_key_id(manifest_key(RUN)), MSGPackSerializer.dumps(None), MSGPackSerializer.dumps("squat"), EXP
        ),
        "garbage value": dataclasses.replace(genuine, value=b"\xc1garbage"),
    }
    validator = reader()
    assert validator.validate(genuine)
    for name, record in rejected.items():
        assert not validator.validate(record), name


def test_strike_index_entries_are_validated_like_strike_records():
    """The run's strike index (how status finds banned peers that announce nothing): only an authorized validator's
    signed entry, under the index key, with the discriminator of the peer it names, is accepted."""
    key = strike_index_key(RUN)
    disc = strike_index_discriminator("QmBad")
    genuine = signed_record(V0, key, index_entry(V0), discriminator=disc)
    payload = MSGPackSerializer.dumps(index_entry(V0).to_tuple())
    framed = MSGPackSerializer.dumps(index_entry(V0, peer="QmHonest").to_tuple())
    rejected = {
        "unauthorized writer": signed_record(OUTSIDER, key, index_entry(OUTSIDER), discriminator=disc),
        "unsigned (raw payload)": dataclasses.replace(genuine, value=payload),
        "payload swapped after signing": dataclasses.replace(
            genuine, value=pack_signed_value(framed, MSGPackSerializer.loads(genuine.value)[1])
        ),
        "V1 marker signed by outsider": dataclasses.replace(
            signed_record(V1, key, index_entry(V1), discriminator=disc),
            value=pack_signed_value(
                payload, OUTSIDER.sign(dht_signing_bytes(genuine.key, genuine.subkey, payload, EXP))
            ),
        ),
        "marker of V1, signed by V0": signed_record(V0, key, index_entry(V1), discriminator=disc, marker_of=V1),
        "payload names another validator": signed_record(V0, key, index_entry(V1), discriminator=disc),
        "discriminator of another peer": signed_record(
            V0, key, index_entry(V0), discriminator=strike_index_discriminator("QmHonest")
        ),
        "no discriminator": signed_record(V0, key, index_entry(V0)),
        "under a strike key": signed_record(V0, strikes_key(RUN, "QmBad"), index_entry(V0)),
        "under another run's index": signed_record(V0, strike_index_key("other"), index_entry(V0),
                                                   discriminator=disc),  # fmt: skip
        "another run": signed_record(V0, key, index_entry(V0, run="other"), discriminator=disc),
        "expiration extended": dataclasses.replace(genuine, expiration_time=EXP + 1000),
        "unmarked sentinel payload": dataclasses.replace(genuine, subkey=MSGPackSerializer.dumps(b"x"), value=payload),
        "unmarked padding": DHTRecord(dht_key_id(key), MSGPackSerializer.dumps(b"pad"),
                                      MSGPackSerializer.dumps(b"x" * 1000), EXP),  # fmt: skip
    }
    for policy in (reader(), SentinelRecordValidator.from_manifest(MANIFEST, allow_foreign=True)):
        assert policy.validate(genuine)
        assert MSGPackSerializer.loads(policy.strip_value(genuine)) == index_entry(V0).to_tuple()
        for name, record in rejected.items():
            assert not policy.validate(record), name
    # before the manifest is known there are no authorized validators: nothing is accepted there
    boot = SentinelRecordValidator.for_bootstrap(RUN, AUTHORITY.public_key)
    assert not boot.validate(genuine) and not boot.validate(rejected["unmarked padding"])
    # the discriminator fits a subkey whatever the (untrusted) peer id: up to 128 characters of anything
    for peer in ("12D3KooW" + "x" * 120, "Qm/..\u00e9 \x00", "Q"):
        disc = strike_index_discriminator(peer)
        assert reader().validate(signed_record(V0, key, index_entry(V0, peer=peer), discriminator=disc)), peer
    assert strike_index_discriminator("QmA") != strike_index_discriminator("QmB")
    with pytest.raises(RecordError):
        strike_index_discriminator("")


def test_replica_directories_are_written_by_authorized_validators_only():
    """A stage's announcement key is open to anyone (and can be filled until it reads as nothing); its directory key
    is the validators' own: only an authorized validator's signed directory, of a stage of the manifest, under that
    stage's directory key, is accepted."""
    def directory(writer: Identity, stage: int = 1, peers=("QmA", "QmB"), run: str = RUN):
        return ReplicaDirectory(run, stage, peers, writer.public_key)

    key = directory_key(RUN, 1)
    genuine = signed_record(V2, key, directory(V2))
    payload = MSGPackSerializer.dumps(directory(V2).to_tuple())
    padded = MSGPackSerializer.dumps(directory(V2, peers=("QmA", "QmB", "QmStranger")).to_tuple())
    rejected = {
        "unauthorized writer": signed_record(OUTSIDER, key, directory(OUTSIDER)),
        "unsigned (raw payload)": dataclasses.replace(genuine, value=payload),
        "peers added after signing": dataclasses.replace(
            genuine, value=pack_signed_value(padded, MSGPackSerializer.loads(genuine.value)[1])
        ),
        "payload names another validator": signed_record(V0, key, directory(V1)),
        "under another stage's key": signed_record(V2, directory_key(RUN, 0), directory(V2)),
        "under the stage's announcement key": signed_record(V2, stage_key(RUN, 1), directory(V2)),
        "a stage outside the manifest": signed_record(V2, directory_key(RUN, 2), directory(V2, stage=2)),
        "another run": signed_record(V2, key, directory(V2, run="other")),
        "unmarked padding": DHTRecord(dht_key_id(key), MSGPackSerializer.dumps(b"pad"),
                                      MSGPackSerializer.dumps(b"x" * 1000), EXP),  # fmt: skip
    }
    policy = reader()
    assert policy.validate(genuine)
    assert MSGPackSerializer.loads(policy.strip_value(genuine)) == directory(V2).to_tuple()
    for name, record in rejected.items():
        assert not policy.validate(record), name
    for bad in (("QmA", "QmA"), tuple(f"Qm{i}" for i in range(MAX_DIRECTORY + 1)), ("",), (7,)):
        with pytest.raises(RecordError):
            ReplicaDirectory(RUN, 1, bad, V2.public_key)
    assert directory(V2, peers=("QmB", "QmA")).peers == ("QmA", "QmB")  # canonical order: one signing form


def test_the_validators_manifest_copies_are_theirs_to_write_where_the_manifest_is_known():
    """The relays' manifest key can be filled by anyone (any key may publish a copy of the authority-signed
    manifest); the validators keep copies under a key of their own, which nodes that know the manifest let only its
    validators write. A node that is still joining (bootstrap policy: no validators known) reads every copy there
    whose authority signature holds, since it cannot tell the writers apart yet."""
    key = validator_manifest_key(RUN)
    by_validator = signed_record(V1, key, SIGNED_MANIFEST)
    by_outsider = signed_record(OUTSIDER, key, SIGNED_MANIFEST)
    forged = SignedManifest(MANIFEST, OUTSIDER.sign(MANIFEST.signing_bytes()))  # signed by someone else
    full, joining = reader(), SentinelRecordValidator.for_bootstrap(RUN, AUTHORITY.public_key)
    assert full.validate(by_validator) and not full.validate(by_outsider)
    assert joining.validate(by_validator) and joining.validate(by_outsider)
    for policy in (full, joining):
        assert not policy.validate(signed_record(V1, key, forged))  # the authority's signature, always
        assert not policy.validate(signed_record(V1, stage_key(RUN, 1), SIGNED_MANIFEST))  # not under another key
        assert policy.validate(signed_record(OUTSIDER, manifest_key(RUN), SIGNED_MANIFEST))  # a relay, as before
    announcement = StageAnnouncement(RUN, 1, "QmS", StageState.ONLINE, (2, 4), 1.0, V1.public_key)
    assert not full.validate(signed_record(V1, key, announcement))


def test_foreign_records_and_bootstrap_upgrade():
    foreign = DHTRecord(
        dht_key_id("averager.group"), MSGPackSerializer.dumps(b"peer"), MSGPackSerializer.dumps(1), EXP
    )
    assert not reader().validate(foreign)  # refused by default: unsigned padding could hide a key's records
    assert SentinelRecordValidator.from_manifest(MANIFEST, allow_foreign=True).validate(foreign)
    strike_key_padding = DHTRecord(dht_key_id(strikes_key(RUN, "QmVictim")), MSGPackSerializer.dumps(b"pad"),
                                   MSGPackSerializer.dumps(b"x" * 100_000), EXP)  # fmt: skip
    assert not reader().validate(strike_key_padding)

    boot = SentinelRecordValidator.for_bootstrap(RUN, AUTHORITY.public_key)
    strike_record = signed_record(V0, strikes_key(RUN, "QmBad"), strike(V0))
    assert boot.validate(signed_record(AUTHORITY, manifest_key(RUN), SIGNED_MANIFEST))
    assert not boot.validate(strike_record)  # no manifest yet: no authorized validators
    assert not boot.merge_with(SentinelRecordValidator.for_bootstrap(RUN, OUTSIDER.public_key))
    assert not boot.merge_with(SentinelRecordValidator.for_bootstrap("other", AUTHORITY.public_key))
    assert boot.merge_with(pickle.loads(pickle.dumps(SentinelRecordValidator.from_manifest(MANIFEST, V0))))
    assert boot.validate(strike_record) and boot.local_public_key == V0.public_key


def test_validator_replay_guard_and_pickling():
    key = strikes_key(RUN, "QmBad")
    validator = pickle.loads(pickle.dumps(SentinelRecordValidator.from_manifest(MANIFEST, V2)))
    assert validator.validate(signed_record(V0, key, strike(V0, step=10)))
    assert validator.validate(signed_record(V0, key, strike(V0, step=10)))  # re-read of the same record
    old = signed_record(V0, key, strike(V0, step=9), expiration=EXP + 100)  # later expiration does not help
    assert not validator.validate(old)
    assert validator.validate(signed_record(V1, key, strike(V1, step=9)))  # per validator
    assert validator.validate(signed_record(V0, key, strike(V0, step=11)))
    # signing only happens for the local identity's own marker
    unsigned = DHTRecord(dht_key_id(key), MSGPackSerializer.dumps(make_subkey(V0.public_key)), b"\x90", EXP)
    assert validator.sign_value(unsigned) == unsigned.value


# ----------------------------------------------------------------------------------------------- real DHTs
def start_dht(validators, initial_peers=(), cls=SentinelDHT, **kwargs):
    return cls(
        initial_peers=list(initial_peers),
        start=True,
        startup_timeout=30,
        record_validators=validators,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        **kwargs,
    )


def shutdown(*dhts):
    for dht in dhts:
        if dht is not None:
            dht.shutdown()


@pytest.mark.forked
@pytest.mark.timeout(60)
def test_records_travel_between_nodes_and_bootstrap_upgrade():
    writer = reader_dht = authority_dht = None
    try:
        writer = start_dht([SentinelRecordValidator.from_manifest(MANIFEST, V0)])
        # the reader starts knowing only the authority key, as a joining node does
        reader_dht = start_dht(
            [SentinelRecordValidator.for_bootstrap(RUN, AUTHORITY.public_key)], writer.get_visible_maddrs()
        )
        now = get_dht_time()

        # the DHT signs inside its own process, so the authority publishes from a node whose validator holds its seed
        authority_dht = start_dht(
            [SentinelRecordValidator.for_bootstrap(RUN, AUTHORITY.public_key, AUTHORITY)], writer.get_visible_maddrs()
        )
        assert publish_manifest(authority_dht, AUTHORITY, SIGNED_MANIFEST, now + 60)
        fetched = fetch_manifest(reader_dht, RUN, AUTHORITY.public_key)
        assert fetched == SIGNED_MANIFEST and fetched.verify(fingerprint=AUTHORITY.fingerprint) == MANIFEST
        assert fetch_manifest(reader_dht, RUN, OUTSIDER.public_key) is None

        # before the upgrade the reader refuses strike records: it does not know the validators yet. (store's bool is
        # the answer of whichever replica replied last, so it is not asserted while the replicas disagree.)
        publish_strike(writer, V0, strike(V0, step=5), now + 60)
        assert fetch_strikes(reader_dht, RUN, "QmBad") == []
        for dht, identity in [(reader_dht, V1), (authority_dht, AUTHORITY)]:
            dht.add_validators([SentinelRecordValidator.from_manifest(fetched.manifest, identity)])
        assert fetch_strikes(reader_dht, RUN, "QmBad") == [strike(V0, step=5)]
        assert banned_peers(fetch_strikes(reader_dht, RUN, "QmBad"), fetched.manifest) == set()  # 1 of 2 votes
        assert publish_strike(reader_dht, V1, strike(V1, step=6), now + 60)  # the upgrade gave it V1's key
        assert banned_peers(fetch_strikes(writer, RUN, "QmBad"), fetched.manifest) == {"QmBad"}

        notices = [taint(V0, step=33, microbatch=1), taint(V0, step=34, microbatch=0)]
        for notice in notices:
            assert publish_taint(writer, V0, notice, now + 60)
        assert sorted(fetch_taints(reader_dht, RUN, step_bucket(33)), key=lambda n: n.step) == notices
        assert fetch_taints(reader_dht, RUN, 0) == []

        stage = StageAnnouncement(RUN, 1, str(writer.peer_id), StageState.ONLINE, (2, 4), 2.5, V0.public_key)
        assert publish_stage(writer, V0, stage, now + 60)
        assert fetch_stages(reader_dht, RUN, 1) == [stage]
    finally:
        shutdown(authority_dht, reader_dht, writer)


@pytest.mark.forked
@pytest.mark.timeout(60)
def test_forged_records_are_rejected_over_the_dht():
    honest = reader_dht = attacker = None
    try:
        honest = start_dht([SentinelRecordValidator.from_manifest(MANIFEST, V0)])
        reader_dht = start_dht([SentinelRecordValidator.from_manifest(MANIFEST, V2)], honest.get_visible_maddrs())
        # the attacker runs no validators at all, so it can send any bytes it likes
        attacker = start_dht([], honest.get_visible_maddrs())
        now = get_dht_time()
        exp = now + 60
        key = strikes_key(RUN, "QmBad")
        assert publish_strike(honest, V0, strike(V0, step=5), exp)

        def raw_store(subkey_owner: Identity, signer: Identity | None, item, payload_item=None):
            subkey = make_subkey(subkey_owner.public_key)
            signed_payload = MSGPackSerializer.dumps(item.to_tuple())
            sent_payload = MSGPackSerializer.dumps((payload_item or item).to_tuple())
            if signer is None:  # unsigned: the bare payload
                return attacker.store(
                    key, (payload_item or item).to_tuple(), exp + 1, subkey=subkey, exclude_self=True
                )
            signature = signer.sign(
                dht_signing_bytes(dht_key_id(key), MSGPackSerializer.dumps(subkey), signed_payload, exp + 1)
            )
            return attacker.store(key, [sent_payload, signature], exp + 1, subkey=subkey, exclude_self=True)

        cleared = strike(V0, step=6, count=0, banned=False)
        assert not raw_store(OUTSIDER, OUTSIDER, strike(OUTSIDER))  # unauthorized key, properly signed
        assert not raw_store(V0, V0, strike(V0, step=6), payload_item=cleared)  # payload tampered after signing
        assert not raw_store(V1, OUTSIDER, strike(V1, step=6))  # V1's marker, signed by someone else
        assert not raw_store(V1, None, strike(V1, step=6))  # V1's marker, unsigned
        # an unmarked sentinel payload under the strikes key
        assert not attacker.store(key, strike(V1).to_tuple(), exp, subkey=b"mallory", exclude_self=True)

        assert fetch_strikes(reader_dht, RUN, "QmBad") == [strike(V0, step=5)]
        assert fetch_strikes(honest, RUN, "QmBad") == [strike(V0, step=5)]
    finally:
        shutdown(attacker, reader_dht, honest)


@pytest.mark.forked
@pytest.mark.timeout(60)
def test_older_strike_record_does_not_replace_newer():
    honest = reader_dht = attacker = None
    try:
        honest = start_dht([SentinelRecordValidator.from_manifest(MANIFEST, V0)])
        reader_dht = start_dht([SentinelRecordValidator.from_manifest(MANIFEST, V2)], honest.get_visible_maddrs())
        # a client-mode attacker stores nothing itself, so every store's answer comes from the honest replicas
        attacker = start_dht([], honest.get_visible_maddrs(), client_mode=True)
        now = get_dht_time()
        key, subkey = strikes_key(RUN, "QmBad"), make_subkey(V0.public_key)

        # an attacker captures V0's step-5 record (value and all) ...
        old = strike(V0, step=5, count=1, banned=False)
        old_payload = MSGPackSerializer.dumps(old.to_tuple())
        old_sig = V0.sign(dht_signing_bytes(dht_key_id(key), MSGPackSerializer.dumps(subkey), old_payload, now + 30))
        assert publish_strike(honest, V0, old, now + 30)
        # ... V0 then bans the peer at step 10
        newer = strike(V0, step=10, count=3, banned=True)
        assert publish_strike(honest, V0, newer, now + 40)
        assert fetch_strikes(reader_dht, RUN, "QmBad") == [newer]

        # replaying the captured record: refused by "highest expiration wins" and by the step guard
        assert not attacker.store(key, [old_payload, old_sig], now + 30, subkey=subkey, exclude_self=True)
        # V0's own stale record signed with a LATER expiration (e.g. a restarted validator with old state):
        # hivemind's expiration rule would take it; the step guard refuses it on every node that saw step 10
        assert not publish_strike(honest, V0, old, now + 50)
        assert fetch_strikes(reader_dht, RUN, "QmBad") == [newer]
        assert fetch_strikes(honest, RUN, "QmBad") == [newer]
    finally:
        shutdown(attacker, reader_dht, honest)


@pytest.mark.forked
@pytest.mark.timeout(90)
def test_status_lists_banned_peers_that_announce_no_stage():
    """`sentinel-node status` used to read strike records only for peers announcing a stage: a peer the quorum banned
    that then went offline (its announcement expired) vanished from its bans. Bans now go into the run's strike index
    too, and status reads it; forged index entries are refused by the DHT or, as pointers without a quorum's strike
    records, ban nobody."""
    from node.status import collect, format_status

    v0 = v1 = reader_dht = attacker = None
    try:
        v0 = start_dht([SentinelRecordValidator.from_manifest(MANIFEST, V0)])
        v1 = start_dht([SentinelRecordValidator.from_manifest(MANIFEST, V1)], v0.get_visible_maddrs())
        # status joins as a client knowing the authority only, and upgrades once it has the manifest (node/status.py)
        reader_dht = start_dht([SentinelRecordValidator.for_bootstrap(RUN, AUTHORITY.public_key)],
                               v0.get_visible_maddrs(), client_mode=True)  # fmt: skip
        reader_dht.add_validators([SentinelRecordValidator.from_manifest(MANIFEST)])
        attacker = start_dht([], v0.get_visible_maddrs(), client_mode=True)  # runs no validator: sends any bytes
        now = get_dht_time()

        for peer in ("QmOnline", "QmLeaving", "QmGone"):  # banned by the quorum (2 of V0, V1, V2)
            assert publish_strike(v0, V0, strike(V0, step=5, peer=peer), now + 60)
            assert publish_strike(v1, V1, strike(V1, step=6, peer=peer), now + 60)
        assert publish_strike(v0, V0, strike(V0, step=5, peer="QmHalf"), now + 60)  # one vote of two
        assert publish_strike(v1, V1, strike(V1, peer="QmStruck", banned=False, count=1), now + 60)  # no index entry
        assert fetch_strike_index(reader_dht, RUN) and {e.peer for e in fetch_strike_index(reader_dht, RUN)} == {
            "QmOnline", "QmLeaving", "QmGone", "QmHalf"}  # fmt: skip

        # forged index entries naming QmFramed (and strike records for it) from the attacker: all refused
        key, disc = strike_index_key(RUN), strike_index_discriminator("QmFramed")

        def raw_index(owner: Identity, signer: Identity | None, entry) -> bool:
            subkey = make_subkey(owner.public_key, disc)
            payload = MSGPackSerializer.dumps(entry.to_tuple())
            if signer is None:
                return attacker.store(key, entry.to_tuple(), now + 60, subkey=subkey, exclude_self=True)
            sig = signer.sign(dht_signing_bytes(dht_key_id(key), MSGPackSerializer.dumps(subkey), payload, now + 60))
            return attacker.store(key, [payload, sig], now + 60, subkey=subkey, exclude_self=True)

        assert not raw_index(OUTSIDER, OUTSIDER, index_entry(OUTSIDER, "QmFramed"))  # signed, but no validator's
        assert not raw_index(V0, OUTSIDER, index_entry(V0, "QmFramed"))  # V0's marker, someone else's signature
        assert not raw_index(V0, None, index_entry(V0, "QmFramed"))  # V0's marker, unsigned
        assert not attacker.store(key, index_entry(V0, "QmFramed").to_tuple(), now + 60, subkey=b"QmFramed",
                                  exclude_self=True)  # unmarked  # fmt: skip
        assert not attacker.store(key, "QmFramed", now + 60, subkey=b"pad", exclude_self=True)  # foreign padding
        # a genuine validator's pointer is no vote: QmPointer has no strike records
        assert publish_strike_index(v0, V0, index_entry(V0, "QmPointer"), now + 60)

        # QmOnline announces stage 2, QmLeaving stage 1 for 6 s only, QmGone never (any key may announce a stage: the
        # DHTs at hand sign with V0's and V1's)
        online = StageAnnouncement(RUN, 1, "QmOnline", StageState.ONLINE, (2, 4), 1.0, V0.public_key)
        leaving = StageAnnouncement(RUN, 0, "QmLeaving", StageState.ONLINE, (0, 2), 1.0, V1.public_key)
        assert publish_stage(v0, V0, online, now + 60)
        leave_at = get_dht_time() + 6
        assert publish_stage(v1, V1, leaving, leave_at)
        state = collect(reader_dht, MANIFEST)
        assert state["banned"] == ["QmGone", "QmLeaving", "QmOnline"], state
        assert state["bans"] == [{"peer": "QmGone", "online": False}, {"peer": "QmLeaving", "online": True},
                                 {"peer": "QmOnline", "online": True}]  # fmt: skip
        time.sleep(max(0.0, leave_at + 1 - get_dht_time()))  # QmLeaving's announcement expires

        state = collect(reader_dht, MANIFEST)
        assert [a["peer"] for anns in state["stages"].values() for a in anns] == ["QmOnline"], state["stages"]
        assert state["banned"] == ["QmGone", "QmLeaving", "QmOnline"], state
        assert state["bans"] == [{"peer": "QmGone", "online": False}, {"peer": "QmLeaving", "online": False},
                                 {"peer": "QmOnline", "online": True}]  # fmt: skip
        struck = {(r["peer"], r["online"]) for r in state["strikes"]}
        assert struck == {("QmGone", False), ("QmLeaving", False), ("QmOnline", True), ("QmHalf", False)}, struck
        text = format_status(state)
        assert "QmGone (offline)" in text and "QmLeaving (offline)" in text and "QmOnline (offline)" not in text
        assert "QmFramed" not in text and "QmPointer" not in text and "QmStruck" not in text
    finally:
        shutdown(attacker, reader_dht, v1, v0)


def _raise_eof():
    raise EOFError("the sharer closed the connection")  # what a failed fd hand-over raises while unpickling


class _UnreceivableRequest:
    """A request whose unpickling in the DHT process fails as a failed resource-sharer hand-over does."""

    def __reduce__(self):
        return _raise_eof, ()


@pytest.mark.forked
@pytest.mark.timeout(60)
def test_a_request_the_dht_process_cannot_receive_does_not_kill_it():
    """hivemind's own DHT process dies of it (and its p2pd with it); SentinelDHT drops that request and serves on."""
    plain = ours = None
    try:
        plain = start_dht([], cls=hivemind.DHT)
        daemon_socket = plain.run_coroutine(_daemon_socket_path)
        plain._outer_pipe.send(_UnreceivableRequest())
        plain.join(10)
        assert not plain.is_alive()  # the upstream behaviour this class exists for
        os.remove(daemon_socket)  # (left by its p2pd, which went down with it)

        ours = start_dht([SentinelRecordValidator.from_manifest(MANIFEST, V0, allow_foreign=True)])  # stores "k"
        ours._outer_pipe.send(_UnreceivableRequest())
        assert ours.store("k", 1, get_dht_time() + 60)  # later requests are served (after the loop's back-off)
        assert ours.get("k", latest=True).value == 1 and ours.is_alive()
    finally:
        shutdown(ours)
        if plain is not None and plain.is_alive():
            plain.shutdown()


@pytest.mark.forked
@pytest.mark.timeout(60)
def test_a_node_notices_its_p2p_daemon_died():
    """Killing p2pd alone left the DHT's process up: the node went on, reachable by nobody, and its supervisor never
    restarted it. check_dht now raises DHTDied (the node saves its state and exits 1) once p2pd is gone."""
    import os
    import signal
    import threading
    import time

    from node.common import DHTDied, StopFlag, check_dht

    dht = start_dht([SentinelRecordValidator.from_manifest(MANIFEST, V0)])
    try:
        check_dht(dht)
        daemon = dht._sentinel_p2pd
        assert daemon.name().startswith("p2pd")
        assert dht._daemon_socket is not None and os.path.exists(dht._daemon_socket)
        os.kill(daemon.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        with pytest.raises(DHTDied, match="p2pd"):
            while time.monotonic() < deadline:
                check_dht(dht)
                time.sleep(0.05)
        # a group signal stops p2pd and the node at once: a stop that arrives within a second is a shutdown
        stop = StopFlag()
        threading.Timer(0.3, stop.event.set).start()
        check_dht(dht, stop)
        with pytest.raises(DHTDied, match="p2pd"):
            check_dht(dht, StopFlag())
    finally:
        shutdown(dht)
    assert not os.path.exists(dht._daemon_socket)  # p2pd could not remove it, killed; the DHT's shutdown did


def test_shared_tensors_use_file_descriptors_not_the_shm_manager():
    """hivemind would switch torch to the "file_system" strategy (a torch_shm_manager daemon over a socket, whose
    breaking aborts a process from C++); the swarm package keeps torch's Linux default unless told otherwise."""
    import os

    import torch.multiprocessing as torch_mp

    import swarm.dht_schema  # noqa: F401

    expected = os.environ.get("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
    assert torch_mp.get_sharing_strategy() == expected


@pytest.mark.forked
@pytest.mark.timeout(60)
def test_a_dht_shut_down_removes_the_socket_of_a_p2p_replica_left_open():
    """hivemind never closes the P2P replica that ``dht.replicate_p2p()`` caches, and its client socket file stayed
    in /tmp for every node process (nodes now close it: ``release_p2p_replica``). One left open is removed with the
    DHT."""
    import asyncio
    import os

    from hivemind.proto import runtime_pb2

    dht = start_dht([SentinelRecordValidator.from_manifest(MANIFEST, V0)])
    try:

        async def serve() -> str:
            replica = await dht.replicate_p2p()

            async def handler(request, context):  # a streamed one: the replica listens on its socket for it
                yield request

            await replica.add_protobuf_handler("sentinel-test", handler, runtime_pb2.ExpertRequest,
                                               stream_output=True)  # fmt: skip
            return replica._client_listen_maddr["unix"]

        path = asyncio.run(serve())
        assert os.path.exists(path)
    finally:
        dht.shutdown()
    assert not os.path.exists(path)
