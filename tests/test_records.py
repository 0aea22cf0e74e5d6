"""Pure tests of identities, wire records, verdict checks, ban quorum and the replay guard (no networking)."""

import dataclasses
import math
import os
import stat

import pytest
import torch
from hivemind.utils import MSGPackSerializer

from swarm.dht_schema import ReplayGuard, banned_peers
from swarm.identity import Identity, IdentityError, load_or_create
from swarm.records import (
    Direction,
    ForgedVerdict,
    InputRejected,
    MalformedVerdict,
    Manifest,
    MissingVerdict,
    RecordError,
    ReplicaDirectory,
    SignedManifest,
    SignedVerdict,
    StageAnnouncement,
    StageState,
    StrikeIndexEntry,
    StrikeRecord,
    TaintedInput,
    TaintNotice,
    ValidatorAnnouncement,
    Verdict,
    VerdictMismatch,
    check_verdict,
    parse_record,
    sign_verdict,
    tensor_digest,
)

AUTHORITY = Identity.generate()
VALIDATORS = [Identity.generate() for _ in range(4)]
TRAINER = Identity.generate()
OUTSIDER = Identity.generate()
RUN = "run-1"
DIGEST = bytes(range(32))


def make_manifest(**overrides) -> Manifest:
    fields = dict(
        run_id=RUN,
        preset="tiny",
        n_stages=3,
        layer_spans=[(0, 2), (2, 4), (4, 6)],
        sentinel_config={"beta_h": 0.9, "warmup": 20, "metric": "l2", "enabled": True},
        validators=[v.public_key for v in VALIDATORS],
        trainers=[TRAINER.public_key],
        ban_quorum=2,
        created_at=1_700_000_000.0,
        authority=AUTHORITY.public_key,
    )
    fields.update(overrides)
    return Manifest(**fields)


MANIFEST = make_manifest()


def make_records():
    v = VALIDATORS[0].public_key
    return [
        MANIFEST,
        MANIFEST.sign(AUTHORITY),
        StageAnnouncement(RUN, 1, "QmPeer", StageState.ONLINE, (2, 4), 3.5, OUTSIDER.public_key),
        ValidatorAnnouncement(RUN, 1, "QmValidator", 10.0, v),
        TaintNotice(RUN, 7, 3, 1, Direction.BACKWARD, "QmPeer", DIGEST, {"l1": 1.5, "swd": 0.25}, "fence", v),
        StrikeRecord(RUN, "QmPeer", 2, False, [DIGEST, bytes(32)], 7, v),
        StrikeIndexEntry(RUN, "QmPeer", v),
        ReplicaDirectory(RUN, 1, ("QmPeer", "QmOther"), v),
        sign_verdict(
            VALIDATORS[0],
            run_id=RUN,
            step=7,
            microbatch=3,
            boundary=1,
            direction=Direction.FORWARD,
            verdict=Verdict.ACCEPT,
            digest=DIGEST,
            caller="QmTrainer",
        ),
    ]


# ------------------------------------------------------------------------------------------------------- identity
def test_identity_sign_verify_and_never_raises():
    ident = Identity.generate()
    sig = ident.sign(b"data")
    assert len(ident.public_key) == 32 and len(sig) == 64 and len(ident.fingerprint) == 16
    assert ident.public_hex == ident.public_key.hex()
    assert Identity.verify(ident.public_key, b"data", sig)
    assert not Identity.verify(ident.public_key, b"other", sig)
    assert not Identity.verify(OUTSIDER.public_key, b"data", sig)
    for bad in [(b"x", b"data", sig), (ident.public_key, b"data", b"short"), (None, b"data", sig), ("k", 1, 2)]:
        assert Identity.verify(*bad) is False
    assert ident.fingerprint in repr(ident) and ident.public_hex not in repr(ident)


@pytest.mark.parametrize("fmt", ["pem", "raw"])
def test_identity_files(tmp_path, fmt):
    path = tmp_path / "id.key"
    ident = Identity.generate()
    ident.save(path, fmt=fmt)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Identity.load(path) == ident
    with pytest.raises(FileExistsError):
        Identity.generate().save(path, fmt=fmt)
    other = Identity.generate()
    other.save(path, fmt=fmt, overwrite=True)
    assert Identity.load(path) == other and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["id.key"]  # no temp files left behind


def test_identity_corrupt_files_and_load_or_create(tmp_path):
    for name, content in [
        ("short", b"abc"),
        ("pem", b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n"),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(IdentityError):
            Identity.load(tmp_path / name)
    path = tmp_path / "sub" / "node.key"
    first = load_or_create(path)
    assert load_or_create(path) == first and stat.S_IMODE(os.stat(path).st_mode) == 0o600


# -------------------------------------------------------------------------------------------------------- records
@pytest.mark.parametrize("record", make_records(), ids=lambda r: type(r).__name__)
def test_round_trip(record):
    assert type(record).from_tuple(record.to_tuple()) == record
    wire = MSGPackSerializer.loads(MSGPackSerializer.dumps(record.to_tuple()))  # what the DHT hands back
    assert type(record).from_tuple(wire) == record
    assert parse_record(list(wire)) == record
    assert record.signing_bytes() == type(record).from_tuple(wire).signing_bytes()


def test_signing_bytes_are_domain_separated():
    """The same field values under two record types never produce the same signed bytes."""
    records = [r for r in make_records() if not isinstance(r, SignedManifest)]  # it signs its manifest's bytes
    assert len({r.signing_bytes() for r in records}) == len(records)
    verdict = make_records()[-1]
    # a verdict's signature does not verify as any other record with a matching signer
    for other in make_records()[:-1]:
        assert not Identity.verify(verdict.signer, other.signing_bytes(), verdict.signature)


def _replace(wire: tuple, index: int, value) -> tuple:
    items = list(wire)
    items[index] = value
    return tuple(items)


STRIKE_WIRE = StrikeRecord(RUN, "QmPeer", 2, True, [DIGEST], 7, VALIDATORS[0].public_key).to_tuple()
TAINT_WIRE = make_records()[4].to_tuple()
MANIFEST_WIRE = MANIFEST.to_tuple()
STAGE_WIRE = make_records()[2].to_tuple()


@pytest.mark.parametrize(
    "cls, wire",
    [
        (StrikeRecord, None),
        (StrikeRecord, {"run_id": RUN}),
        (StrikeRecord, STRIKE_WIRE[:-1]),
        (StrikeRecord, STRIKE_WIRE + (1,)),
        (StrikeRecord, _replace(STRIKE_WIRE, 0, 5)),  # another kind
        (StrikeRecord, _replace(STRIKE_WIRE, 1, 2)),  # unknown version
        (StrikeRecord, _replace(STRIKE_WIRE, 2, "bad run!")),
        (StrikeRecord, _replace(STRIKE_WIRE, 2, "r" * 65)),
        (StrikeRecord, _replace(STRIKE_WIRE, 3, "p" * 129)),
        (StrikeRecord, _replace(STRIKE_WIRE, 3, b"peer")),
        (StrikeRecord, _replace(STRIKE_WIRE, 4, -1)),
        (StrikeRecord, _replace(STRIKE_WIRE, 4, 2.0)),
        (StrikeRecord, _replace(STRIKE_WIRE, 4, True)),
        (StrikeRecord, _replace(STRIKE_WIRE, 5, 1)),  # banned must be a bool
        (StrikeRecord, _replace(STRIKE_WIRE, 6, [DIGEST] * 17)),
        (StrikeRecord, _replace(STRIKE_WIRE, 6, [b"short"])),
        (StrikeRecord, _replace(STRIKE_WIRE, 6, DIGEST)),
        (StrikeRecord, _replace(STRIKE_WIRE, 7, -3)),  # negative step
        (StrikeRecord, _replace(STRIKE_WIRE, 7, 2**64)),
        (StrikeRecord, _replace(STRIKE_WIRE, 8, bytes(31))),
        (StrikeRecord, _replace(STRIKE_WIRE, 8, "ab" * 32)),
        (TaintNotice, _replace(TAINT_WIRE, 6, 2)),  # direction out of range
        (TaintNotice, _replace(TAINT_WIRE, 9, [["l1", math.nan]])),
        (TaintNotice, _replace(TAINT_WIRE, 9, [["l1", math.inf]])),
        (TaintNotice, _replace(TAINT_WIRE, 9, [["l1", "1.0"]])),
        (TaintNotice, _replace(TAINT_WIRE, 9, [["l1", 1.0], ["l1", 2.0]])),
        (TaintNotice, _replace(TAINT_WIRE, 9, [[f"s{i}", 1.0] for i in range(17)])),
        (TaintNotice, _replace(TAINT_WIRE, 9, [[1, 1.0]])),
        (TaintNotice, _replace(TAINT_WIRE, 10, "x" * 201)),
        (TaintNotice, _replace(TAINT_WIRE, 8, bytes(33))),
        (StageAnnouncement, _replace(STAGE_WIRE, 5, 7)),  # unknown state
        (StageAnnouncement, _replace(STAGE_WIRE, 6, [4, 2])),  # empty span
        (StageAnnouncement, _replace(STAGE_WIRE, 7, -1.0)),
        (StageAnnouncement, _replace(STAGE_WIRE, 7, math.nan)),
        (Manifest, _replace(MANIFEST_WIRE, 4, 0)),  # n_stages
        (Manifest, _replace(MANIFEST_WIRE, 5, [[0, 2], [3, 4], [4, 6]])),  # gap between stages
        (Manifest, _replace(MANIFEST_WIRE, 5, [[0, 2], [2, 4]])),  # fewer spans than stages
        (Manifest, _replace(MANIFEST_WIRE, 6, [["beta_h", None]])),
        (Manifest, _replace(MANIFEST_WIRE, 6, [["beta_h", math.inf]])),
        (Manifest, _replace(MANIFEST_WIRE, 7, [VALIDATORS[0].public_key] * 2)),  # duplicate validators
        (Manifest, _replace(MANIFEST_WIRE, 9, 0)),  # ban_quorum
        (Manifest, _replace(MANIFEST_WIRE, 9, 5)),  # ban_quorum > validators
        (Manifest, _replace(MANIFEST_WIRE, 10, math.nan)),
        (SignedManifest, (2, 1, MANIFEST_WIRE, b"sig")),
        (SignedManifest, (2, 1, _replace(MANIFEST_WIRE, 9, 0), bytes(64))),
        (SignedVerdict, _replace(make_records()[-1].to_tuple(), 7, 2)),  # unknown verdict
    ],
)
def test_malformed_tuples_raise_record_error(cls, wire):
    with pytest.raises(RecordError):
        cls.from_tuple(wire)


def test_constructor_validates_and_record_error_is_value_error():
    with pytest.raises(RecordError):
        StrikeRecord(RUN, "QmPeer", -1, True, [], 0, VALIDATORS[0].public_key)
    with pytest.raises(ValueError):
        TaintNotice(RUN, 1, 0, 0, Direction.FORWARD, "p", DIGEST, {"x": float("nan")}, "", bytes(32))
    with pytest.raises(RecordError):
        parse_record((99, 1))


# ------------------------------------------------------------------------------------------------------- manifest
def test_manifest_signature_digest_and_trust_anchors():
    signed = MANIFEST.sign(AUTHORITY)
    assert signed.verify(authority=AUTHORITY.public_key) == MANIFEST
    assert signed.verify(fingerprint=AUTHORITY.fingerprint.upper()) == MANIFEST
    assert signed.verify(digest=MANIFEST.digest()) == MANIFEST
    assert len(MANIFEST.digest()) == 32 and MANIFEST.digest() == make_manifest().digest()
    # dict order does not change the canonical encoding
    reordered = make_manifest(sentinel_config=dict(reversed(list(MANIFEST.sentinel_config.items()))))
    assert reordered.digest() == MANIFEST.digest()
    assert make_manifest(ban_quorum=3).digest() != MANIFEST.digest()

    with pytest.raises(ValueError):
        signed.verify()  # no trust anchor: refuse rather than trust whoever signed
    with pytest.raises(RecordError):
        signed.verify(authority=OUTSIDER.public_key)
    with pytest.raises(RecordError):
        signed.verify(fingerprint=OUTSIDER.fingerprint)
    with pytest.raises(RecordError):
        signed.verify(digest=make_manifest(ban_quorum=3).digest())
    tampered = SignedManifest(make_manifest(ban_quorum=1), signed.signature)
    with pytest.raises(RecordError):
        tampered.verify(authority=AUTHORITY.public_key)
    # someone else's self-consistent manifest naming themselves as authority fails the anchor
    rogue = make_manifest(authority=OUTSIDER.public_key).sign(OUTSIDER)
    assert rogue.is_self_consistent()
    with pytest.raises(RecordError):
        rogue.verify(fingerprint=AUTHORITY.fingerprint)
    with pytest.raises(ValueError):
        MANIFEST.sign(OUTSIDER)

    assert MANIFEST.is_validator(VALIDATORS[1].public_key) and not MANIFEST.is_validator(TRAINER.public_key)
    assert MANIFEST.is_trainer(TRAINER.public_key) and not MANIFEST.is_trainer(OUTSIDER.public_key)


# ------------------------------------------------------------------------------------------------------- verdicts
def test_tensor_digest_binds_dtype_shape_and_bytes():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_digest(t) == tensor_digest(t.clone()) == tensor_digest(t.t().contiguous().t())
    assert tensor_digest(t) != tensor_digest(t.reshape(4, 3))
    assert tensor_digest(t) != tensor_digest(t.double())
    assert tensor_digest(t) != tensor_digest(t + 1e-6 * (t == 5))
    assert tensor_digest(torch.tensor(0.0)) != tensor_digest(torch.tensor(-0.0))
    assert len(tensor_digest(torch.zeros(2, dtype=torch.bfloat16))) == 32
    assert tensor_digest(torch.zeros(0)) != tensor_digest(torch.zeros(0, 2))


POSITION = dict(run_id=RUN, step=10, microbatch=2, boundary=1, direction=Direction.FORWARD)


def _verdict(signer=VALIDATORS[0], verdict=Verdict.ACCEPT, digest=DIGEST, caller="QmTrainer", **position):
    return sign_verdict(signer, **{**POSITION, **position}, verdict=verdict, digest=digest, caller=caller)


def _check(verdict, allow_trainer=False, caller="QmTrainer", **position):
    check_verdict(verdict, manifest=MANIFEST, **{**POSITION, **position}, digest=DIGEST, allow_trainer=allow_trainer,
                  caller=caller)  # fmt: skip


def test_check_verdict_accepts_genuine_verdicts():
    _check(_verdict())
    _check(_verdict().to_tuple())  # wire form
    _check(_verdict(signer=TRAINER, boundary=0), allow_trainer=True, boundary=0)


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: None, MissingVerdict),
        (lambda: (7, 1, "junk"), MalformedVerdict),
        (lambda: dataclasses.replace(_verdict(), signature=bytes(64)), ForgedVerdict),
        (lambda: dataclasses.replace(_verdict(), digest=bytes(32)), ForgedVerdict),  # tampered after signing
        (lambda: dataclasses.replace(_verdict(verdict=Verdict.TAINT), verdict=Verdict.ACCEPT), ForgedVerdict),
        (lambda: _verdict(signer=OUTSIDER), ForgedVerdict),  # valid signature, unauthorized signer
        (lambda: _verdict(signer=TRAINER), ForgedVerdict),  # trainers only where allow_trainer
        (lambda: _verdict(signer=AUTHORITY), ForgedVerdict),
        (lambda: _verdict(digest=bytes(32)), VerdictMismatch),
        (lambda: _verdict(step=9), VerdictMismatch),  # replayed from an earlier step
        (lambda: _verdict(microbatch=3), VerdictMismatch),
        (lambda: _verdict(boundary=2), VerdictMismatch),
        (lambda: _verdict(direction=Direction.BACKWARD), VerdictMismatch),
        (lambda: _verdict(run_id="other-run"), VerdictMismatch),
        (lambda: _verdict(caller="QmAnotherReplica"), VerdictMismatch),  # issued to the trainer, shown by another
        (lambda: dataclasses.replace(_verdict(), caller="QmTrainer2"), ForgedVerdict),  # rebound after signing
        (lambda: _verdict(verdict=Verdict.TAINT), TaintedInput),
    ],
)
def test_check_verdict_rejections_are_typed(make, error):
    with pytest.raises(error) as info:
        _check(make())
    assert isinstance(info.value, InputRejected)
    rebuilt = InputRejected.from_code(info.value.code, str(info.value))  # what a remote caller does
    assert type(rebuilt) is error


def test_rejection_codes_are_distinct_and_stable():
    codes = {cls.code for cls in (MissingVerdict, MalformedVerdict, ForgedVerdict, VerdictMismatch, TaintedInput)}
    assert codes == {"missing_verdict", "malformed_verdict", "forged_verdict", "verdict_mismatch", "tainted_input"}
    assert type(InputRejected.from_code("no-such-code")) is InputRejected


# -------------------------------------------------------------------------------------------------------- ban quorum
def _strike(validator, peer="QmBad", banned=True, step=5, run=RUN):
    return StrikeRecord(run, peer, 3, banned, [], step, validator.public_key)


def test_ban_quorum_arithmetic():
    v0, v1, v2, _ = VALIDATORS
    assert MANIFEST.ban_quorum == 2
    assert banned_peers([], MANIFEST) == set()
    assert banned_peers([_strike(v0)], MANIFEST) == set()  # quorum - 1
    assert banned_peers([_strike(v0), _strike(v1)], MANIFEST) == {"QmBad"}  # quorum
    assert banned_peers([_strike(v0), _strike(v0, step=6), _strike(v0, step=7)], MANIFEST) == set()  # one voter
    assert banned_peers([_strike(v0), _strike(OUTSIDER), _strike(TRAINER), _strike(AUTHORITY)], MANIFEST) == set()
    assert banned_peers([_strike(v0), _strike(v1, banned=False)], MANIFEST) == set()
    assert banned_peers([_strike(v0), _strike(v1, run="other")], MANIFEST) == set()
    assert banned_peers([_strike(v0), _strike(v1), _strike(v2, peer="QmOther")], MANIFEST) == {"QmBad"}


def test_ban_quorum_uses_each_validators_latest_record():
    v0, v1, _, _ = VALIDATORS
    lifted = [_strike(v0), _strike(v1, step=5), _strike(v1, banned=False, step=9)]  # v1 forgave at step 9
    assert banned_peers(lifted, MANIFEST) == set()
    assert banned_peers(list(reversed(lifted)), MANIFEST) == set()  # order does not matter
    renewed = [_strike(v0), _strike(v1, banned=False, step=5), _strike(v1, step=9)]
    assert banned_peers(renewed, MANIFEST) == {"QmBad"}
    tie = [_strike(v0), _strike(v1, banned=False), _strike(v1)]  # same step: the ban wins, deterministically
    assert banned_peers(tie, MANIFEST) == banned_peers(list(reversed(tie)), MANIFEST) == {"QmBad"}


def test_replay_guard():
    guard = ReplayGuard(max_entries=2)
    v, w = VALIDATORS[0].public_key, VALIDATORS[1].public_key
    assert guard.highest(v, "p") is None
    assert guard.admit(v, "p", 10)
    assert guard.admit(v, "p", 10)  # the same record again (every get re-validates)
    assert not guard.admit(v, "p", 9)  # older: replay
    assert guard.admit(v, "p", 11) and guard.highest(v, "p") == 11
    assert not guard.admit(v, "p", 10)
    assert guard.admit(w, "p", 1) and guard.admit(v, "q", 1)  # keyed by (validator, peer)
    assert len(guard) == 2  # bounded: the least recently seen pair was forgotten
