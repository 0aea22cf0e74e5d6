"""Typed, strictly validated wire records: the manifest, announcements, taint notices, strikes (and their index) and
verdicts.

Every record arrives from peers we do not trust, so each one is checked field by field when it is built, whether by
application code or by `from_tuple` on bytes from the network. Anything malformed (a wrong type, a bool where an int
belongs, NaN or inf, a negative step, an oversize string or list, an unknown enum value) raises `RecordError`.

Wire format (compact, positional, msgpack-friendly, in the style of Petals' `data_structures.py`)::

    (kind, version, field_1, field_2, ...)

`kind` names the record type and `version` its layout; a new layout gets a new version, and a reader rejects versions
it does not know rather than guessing. Dicts travel as lists of (key, value) pairs sorted by key and enums as plain
ints, so the encoding of a record is canonical. `signing_bytes()` is the canonical msgpack of a domain tag, the kind,
the version and the fields (never the signature itself): a signature made for one record type can never verify as
another type, nor as a DHT record (see `dht_schema`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, TypeVar

import msgpack
import torch

from swarm.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, fingerprint

# ---------------------------------------------------------------------------------------------------------- limits
MAX_INT = 2**63 - 1  # msgpack's signed 64-bit range
MAX_RUN_ID = 64
MAX_PRESET = 64
MAX_PEER = 128
MAX_REASON = 200
MAX_SCORES = 16
MAX_SCORE_NAME = 64
MAX_EVIDENCE = 16
MAX_DIRECTORY = 64  # replicas in one validator's directory of a stage
MAX_STAGES = 1024
MAX_KEYS = 256  # validators or trainers in one manifest
MAX_CONFIG_ENTRIES = 64
MAX_CONFIG_NAME = 64
MAX_CONFIG_STR = 256
DIGEST_BYTES = 32

DOMAIN_TAG = b"sentinel-swarm/v1"
_RUN_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class RecordError(ValueError):
    """A record (from the network or from local code) is malformed. The message never echoes large input."""


class RecordKind(IntEnum):
    """The first element of every wire tuple. Also part of what gets signed (domain separation)."""

    MANIFEST = 1
    SIGNED_MANIFEST = 2
    STAGE = 3
    VALIDATOR = 4
    TAINT = 5
    STRIKE = 6
    VERDICT = 7
    STRIKE_INDEX = 8
    DIRECTORY = 9


class Verdict(IntEnum):
    ACCEPT = 0
    TAINT = 1


class Direction(IntEnum):
    FORWARD = 0
    BACKWARD = 1


class StageState(IntEnum):
    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


# ------------------------------------------------------------------------------------------------- field checkers
def _int(value: Any, name: str, *, lo: int = 0, hi: int = MAX_INT) -> int:
    if type(value) is not int:  # rejects bool, float, str, IntEnum: callers convert enums explicitly
        raise RecordError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise RecordError(f"{name} must be in [{lo}, {hi}]")
    return value


def _float(value: Any, name: str, *, lo: float | None = None) -> float:
    if type(value) not in (int, float):
        raise RecordError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise RecordError(f"{name} must be finite")
    if lo is not None and value < lo:
        raise RecordError(f"{name} must be >= {lo}")
    return value


def _bool(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise RecordError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _str(value: Any, name: str, *, max_len: int, min_len: int = 1) -> str:
    if type(value) is not str:
        raise RecordError(f"{name} must be a str, got {type(value).__name__}")
    if not min_len <= len(value) <= max_len:
        raise RecordError(f"{name} must have {min_len} to {max_len} characters")
    return value


def _run_id(value: Any, name: str = "run_id") -> str:
    _str(value, name, max_len=MAX_RUN_ID)
    if not _RUN_ID_RE.fullmatch(value):
        raise RecordError(f"{name} must match [A-Za-z0-9_-]{{1,64}}")
    return value


def _fixed_bytes(value: Any, name: str, size: int) -> bytes:
    if type(value) is not bytes:
        raise RecordError(f"{name} must be bytes, got {type(value).__name__}")
    if len(value) != size:
        raise RecordError(f"{name} must be {size} bytes")
    return value


def _key(value: Any, name: str) -> bytes:
    return _fixed_bytes(value, name, PUBLIC_KEY_BYTES)


def _digest(value: Any, name: str) -> bytes:
    return _fixed_bytes(value, name, DIGEST_BYTES)


def _seq(value: Any, name: str, *, max_len: int, length: int | None = None) -> tuple:
    if type(value) not in (list, tuple):
        raise RecordError(f"{name} must be a list, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise RecordError(f"{name} must have {length} elements")
    if len(value) > max_len:
        raise RecordError(f"{name} may have at most {max_len} elements")
    return tuple(value)


_E = TypeVar("_E", bound=IntEnum)


def _enum(value: Any, enum_cls: type[_E], name: str) -> _E:
    if isinstance(value, enum_cls):
        return value
    _int(value, name, hi=255)
    try:
        return enum_cls(value)
    except ValueError:
        raise RecordError(f"{name}: {value} is not a valid {enum_cls.__name__}") from None


def _span(value: Any, name: str) -> tuple[int, int]:
    start, end = _seq(value, name, max_len=2, length=2)
    start, end = _int(start, f"{name}.start", hi=2**31), _int(end, f"{name}.end", hi=2**31)
    if start >= end:
        raise RecordError(f"{name} must have start < end")
    return start, end


def _key_list(value: Any, name: str) -> tuple[bytes, ...]:
    keys = tuple(_key(k, f"{name}[{i}]") for i, k in enumerate(_seq(value, name, max_len=MAX_KEYS)))
    if len(set(keys)) != len(keys):
        raise RecordError(f"{name} has duplicate keys")
    return keys


def _pairs(value: Any, name: str, *, max_len: int) -> list[tuple[Any, Any]]:
    """A dict (local code) or a list of (key, value) pairs (the wire) -> list of pairs; duplicate keys rejected."""
    if isinstance(value, Mapping):
        if len(value) > max_len:
            raise RecordError(f"{name} may have at most {max_len} entries")
        return list(value.items())
    pairs = [_seq(pair, f"{name} entry", max_len=2, length=2) for pair in _seq(value, name, max_len=max_len)]
    if len({k for k, _ in pairs if isinstance(k, str)}) != len(pairs):
        raise RecordError(f"{name} has duplicate or non-str keys")
    return pairs


def _scores(value: Any, name: str = "scores") -> dict[str, float]:
    out = {
        _str(k, f"{name} key", max_len=MAX_SCORE_NAME): _float(v, f"{name}[{k!s:.32}]")
        for k, v in _pairs(value, name, max_len=MAX_SCORES)
    }
    return dict(sorted(out.items()))


def _config_value(value: Any, name: str) -> float | int | str | bool:
    if type(value) is bool:
        return value
    if type(value) is int:
        return _int(value, name, lo=-MAX_INT)
    if type(value) is float:
        return _float(value, name)
    if type(value) is str:
        return _str(value, name, max_len=MAX_CONFIG_STR, min_len=0)
    raise RecordError(f"{name} must be a float, int, str or bool, got {type(value).__name__}")


def _config(value: Any, name: str = "sentinel_config") -> dict[str, float | int | str | bool]:
    out = {
        _str(k, f"{name} key", max_len=MAX_CONFIG_NAME): _config_value(v, f"{name}[{k!s:.32}]")
        for k, v in _pairs(value, name, max_len=MAX_CONFIG_ENTRIES)
    }
    return dict(sorted(out.items()))


def _canonical(obj: Any) -> bytes:
    """Deterministic msgpack: callers pass only lists, ints, floats (always float64), str, bytes and bools."""
    return msgpack.packb(obj, use_bin_type=True)


def _wire(value: Any) -> Any:
    """Plain msgpack-able form of a field: enums -> int, tuples -> lists, dicts -> sorted [key, value] pairs."""
    if isinstance(value, bool):
        return value
    if isinstance(value, IntEnum):
        return int(value)
    if isinstance(value, Mapping):
        return [[k, _wire(v)] for k, v in sorted(value.items())]
    if isinstance(value, (list, tuple)):
        return [_wire(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------- base class
_R = TypeVar("_R", bound="WireRecord")


@dataclass(frozen=True)
class WireRecord:
    """Base of all records: positional wire tuple `(kind, version, *fields)` and canonical signing bytes.

    Subclasses declare KIND, list their fields in wire order, and normalise/validate them in `_check`, which runs on
    construction: an instance that exists is a valid record.
    """

    KIND: ClassVar[RecordKind]
    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        for name, value in self._check().items():
            object.__setattr__(self, name, value)

    def _check(self) -> dict[str, Any]:
        """Validate every field; return the normalised values (enums, tuples, sorted dicts)."""
        raise NotImplementedError

    def _fields(self) -> list[Any]:
        return [_wire(getattr(self, f.name)) for f in dataclasses.fields(self)]

    def to_tuple(self) -> tuple:
        return (int(self.KIND), self.VERSION, *self._fields())

    @classmethod
    def from_tuple(cls: type[_R], source: Any) -> _R:
        """Parse a wire tuple (or list, as msgpack may return it). Raises RecordError on anything malformed."""
        n_fields = len(dataclasses.fields(cls))
        items = _seq(source, cls.__name__, max_len=n_fields + 2, length=n_fields + 2)
        if type(items[0]) is not int or items[0] != cls.KIND:
            raise RecordError(f"not a {cls.__name__} record")
        if type(items[1]) is not int or items[1] != cls.VERSION:
            raise RecordError(f"unsupported {cls.__name__} version")
        try:
            return cls(*items[2:])
        except RecordError:
            raise
        except (TypeError, ValueError, OverflowError) as e:  # defensive: a checker missed something
            raise RecordError(f"malformed {cls.__name__}: {type(e).__name__}") from None

    def signing_bytes(self) -> bytes:
        return _canonical([DOMAIN_TAG, int(self.KIND), self.VERSION, *self._fields()])


def parse_record(source: Any) -> WireRecord:
    """Parse any wire tuple by its kind tag. Raises RecordError."""
    if type(source) not in (list, tuple) or not source or type(source[0]) is not int:
        raise RecordError("not a record tuple")
    record_cls = _BY_KIND.get(source[0])
    if record_cls is None:
        raise RecordError("unknown record kind")
    return record_cls.from_tuple(source)


# ------------------------------------------------------------------------------------------------------ manifest
@dataclass(frozen=True)
class Manifest(WireRecord):
    """What the swarm authority signs when it creates a swarm: who may validate, train, and how bans are decided.

    Nodes are given the authority's fingerprint (or key, or the manifest digest) out of band and verify the manifest
    they read from the DHT with `SignedManifest.verify`.
    """

    KIND: ClassVar[RecordKind] = RecordKind.MANIFEST

    run_id: str
    preset: str
    n_stages: int
    layer_spans: tuple[tuple[int, int], ...]  # stage k serves blocks [start, end), contiguous over the stages
    sentinel_config: dict[str, float | int | str | bool]
    validators: tuple[bytes, ...]
    trainers: tuple[bytes, ...]
    ban_quorum: int
    created_at: float  # unix seconds
    authority: bytes

    def _check(self) -> dict[str, Any]:
        n_stages = _int(self.n_stages, "n_stages", lo=1, hi=MAX_STAGES)
        spans = _seq(self.layer_spans, "layer_spans", max_len=MAX_STAGES, length=n_stages)
        spans = tuple(_span(s, f"layer_spans[{i}]") for i, s in enumerate(spans))
        for i in range(1, n_stages):
            if spans[i][0] != spans[i - 1][1]:
                raise RecordError("layer_spans must be contiguous: stage k starts where stage k-1 ends")
        validators = _key_list(self.validators, "validators")
        ban_quorum = _int(self.ban_quorum, "ban_quorum", lo=1, hi=max(1, len(validators)))
        if ban_quorum > len(validators):
            raise RecordError("ban_quorum exceeds the number of validators")
        return dict(
            run_id=_run_id(self.run_id),
            preset=_str(self.preset, "preset", max_len=MAX_PRESET),
            n_stages=n_stages,
            layer_spans=spans,
            sentinel_config=_config(self.sentinel_config),
            validators=validators,
            trainers=_key_list(self.trainers, "trainers"),
            ban_quorum=ban_quorum,
            created_at=_float(self.created_at, "created_at", lo=0.0),
            authority=_key(self.authority, "authority"),
        )

    def digest(self) -> bytes:
        """sha256 of the canonical encoding: the manifest's name, which an operator can publish out of band."""
        return hashlib.sha256(self.signing_bytes()).digest()

    def is_validator(self, public_key: bytes) -> bool:
        return public_key in self.validators

    def is_trainer(self, public_key: bytes) -> bool:
        return public_key in self.trainers

    def sign(self, identity: Identity) -> SignedManifest:
        if identity.public_key != self.authority:
            raise ValueError("only the manifest's authority can sign it")
        return SignedManifest(self, identity.sign(self.signing_bytes()))


@dataclass(frozen=True)
class SignedManifest(WireRecord):
    """A manifest with the authority's signature over `manifest.signing_bytes()`."""

    KIND: ClassVar[RecordKind] = RecordKind.SIGNED_MANIFEST

    manifest: Manifest
    signature: bytes

    def _check(self) -> dict[str, Any]:
        manifest = self.manifest
        if not isinstance(manifest, Manifest):
            manifest = Manifest.from_tuple(manifest)
        return dict(manifest=manifest, signature=_fixed_bytes(self.signature, "signature", SIGNATURE_BYTES))

    def _fields(self) -> list[Any]:
        return [list(self.manifest.to_tuple()), self.signature]

    def signing_bytes(self) -> bytes:
        return self.manifest.signing_bytes()

    def is_self_consistent(self) -> bool:
        """The signature is the manifest's own authority's. Says nothing about whether to trust that authority."""
        return Identity.verify(self.manifest.authority, self.manifest.signing_bytes(), self.signature)

    def verify(
        self, *, authority: bytes | None = None, fingerprint: str | None = None, digest: bytes | None = None
    ) -> Manifest:
        """Return the manifest if it is signed by its authority AND matches every trust anchor given.

        Give at least one anchor obtained out of band: the authority's public key, its fingerprint, or the manifest
        digest. Raises RecordError otherwise. (A 16-hex-char fingerprint is 64 bits: fine against accidents and
        casual forgery; use the full key or the digest where a determined attacker could grind keys.)
        """
        if authority is None and fingerprint is None and digest is None:
            raise ValueError("verify needs a trust anchor: authority key, fingerprint or manifest digest")
        if not self.is_self_consistent():
            raise RecordError("manifest signature does not verify")
        if authority is not None and authority != self.manifest.authority:
            raise RecordError("manifest is signed by another authority")
        if fingerprint is not None and fingerprint.lower() != _fingerprint(self.manifest.authority):
            raise RecordError("manifest authority does not match the fingerprint")
        if digest is not None and digest != self.manifest.digest():
            raise RecordError("manifest does not match the digest")
        return self.manifest


_fingerprint = fingerprint  # SignedManifest.verify's keyword shadows the module-level name


# --------------------------------------------------------------------------------------------------- DHT payloads
@dataclass(frozen=True)
class StageAnnouncement(WireRecord):
    """A stage server's heartbeat under `sentinel.{run}.stage.{k}`. Anyone may announce; it must be self-signed."""

    KIND: ClassVar[RecordKind] = RecordKind.STAGE

    run_id: str
    stage: int
    peer: str  # libp2p peer id (base58 string)
    state: StageState
    span: tuple[int, int]
    throughput: float  # micro-batches per second, >= 0
    owner: bytes

    def _check(self) -> dict[str, Any]:
        return dict(
            run_id=_run_id(self.run_id),
            stage=_int(self.stage, "stage", hi=MAX_STAGES - 1),
            peer=_str(self.peer, "peer", max_len=MAX_PEER),
            state=_enum(self.state, StageState, "state"),
            span=_span(self.span, "span"),
            throughput=_float(self.throughput, "throughput", lo=0.0),
            owner=_key(self.owner, "owner"),
        )


@dataclass(frozen=True)
class ValidatorAnnouncement(WireRecord):
    """An authorized validator's heartbeat under `sentinel.{run}.validator.{b}`: it checks boundary b."""

    KIND: ClassVar[RecordKind] = RecordKind.VALIDATOR

    run_id: str
    boundary: int
    peer: str
    throughput: float  # tensors checked per second, >= 0
    validator: bytes

    def _check(self) -> dict[str, Any]:
        return dict(
            run_id=_run_id(self.run_id),
            boundary=_int(self.boundary, "boundary", hi=MAX_STAGES),
            peer=_str(self.peer, "peer", max_len=MAX_PEER),
            throughput=_float(self.throughput, "throughput", lo=0.0),
            validator=_key(self.validator, "validator"),
        )


@dataclass(frozen=True)
class TaintNotice(WireRecord):
    """A validator's statement that one tensor was tainted (flagged and replaced)."""

    KIND: ClassVar[RecordKind] = RecordKind.TAINT

    run_id: str
    step: int
    microbatch: int
    boundary: int
    direction: Direction
    sender: str  # peer id of the stage that sent the tensor (the one blamed)
    digest: bytes  # tensor_digest of the tensor as received
    scores: dict[str, float]  # distance name -> value, finite, at most 16
    reason: str
    validator: bytes

    def _check(self) -> dict[str, Any]:
        return dict(
            run_id=_run_id(self.run_id),
            step=_int(self.step, "step"),
            microbatch=_int(self.microbatch, "microbatch"),
            boundary=_int(self.boundary, "boundary", hi=MAX_STAGES),
            direction=_enum(self.direction, Direction, "direction"),
            sender=_str(self.sender, "sender", max_len=MAX_PEER),
            digest=_digest(self.digest, "digest"),
            scores=_scores(self.scores),
            reason=_str(self.reason, "reason", max_len=MAX_REASON, min_len=0),
            validator=_key(self.validator, "validator"),
        )


@dataclass(frozen=True)
class StrikeRecord(WireRecord):
    """One validator's current strike count against one peer, as of training step `step`."""

    KIND: ClassVar[RecordKind] = RecordKind.STRIKE

    run_id: str
    peer: str
    count: int
    banned: bool
    evidence: tuple[bytes, ...]  # digests of the flagged tensors, at most 16
    step: int
    validator: bytes

    def _check(self) -> dict[str, Any]:
        evidence = _seq(self.evidence, "evidence", max_len=MAX_EVIDENCE)
        return dict(
            run_id=_run_id(self.run_id),
            peer=_str(self.peer, "peer", max_len=MAX_PEER),
            count=_int(self.count, "count"),
            banned=_bool(self.banned, "banned"),
            evidence=tuple(_digest(d, f"evidence[{i}]") for i, d in enumerate(evidence)),
            step=_int(self.step, "step"),
            validator=_key(self.validator, "validator"),
        )


@dataclass(frozen=True)
class StrikeIndexEntry(WireRecord):
    """A validator's pointer to a peer it bans: "read my strike record under `strikes.{peer}`".

    Stored under the run's one `sentinel.{run}.strike_index` key (one entry per validator and peer), so that a reader
    who does not know the peer (it no longer announces a stage: it went offline after its ban) can still find its
    strike records. It carries no verdict itself: the strike records, and the manifest's quorum over them
    (`dht_schema.banned_peers`), decide whether the peer is banned.
    """

    KIND: ClassVar[RecordKind] = RecordKind.STRIKE_INDEX

    run_id: str
    peer: str
    validator: bytes

    def _check(self) -> dict[str, Any]:
        return dict(
            run_id=_run_id(self.run_id),
            peer=_str(self.peer, "peer", max_len=MAX_PEER),
            validator=_key(self.validator, "validator"),
        )


@dataclass(frozen=True)
class ReplicaDirectory(WireRecord):
    """An authorized validator's list of the replicas of stage ``stage`` (0-based, as in StageAnnouncement) whose
    outputs it has checked and accepted lately, under `sentinel.{run}.directory.{stage}`.

    A second way to find a stage's replicas, written by the manifest's validators only: anyone may announce a replica,
    so anyone can fill a stage's announcement key, and hivemind answers a key with its whole dictionary or nothing
    (about 20 000 self-signed announcements at each node holding the key hid every replica from a fresh reader). Each
    peer listed was routed to by an authorized trainer (the check's signed ``sender``) and answered with a tensor the
    validator accepted; the list proves nothing more (bans still decide who is routed around)."""

    KIND: ClassVar[RecordKind] = RecordKind.DIRECTORY

    run_id: str
    stage: int
    peers: tuple[str, ...]  # at most MAX_DIRECTORY, distinct, sorted
    validator: bytes

    def _check(self) -> dict[str, Any]:
        peers = _seq(self.peers, "peers", max_len=MAX_DIRECTORY)
        peers = tuple(_str(p, f"peers[{i}]", max_len=MAX_PEER) for i, p in enumerate(peers))
        if len(set(peers)) != len(peers):
            raise RecordError("peers must be distinct")
        return dict(
            run_id=_run_id(self.run_id),
            stage=_int(self.stage, "stage", hi=MAX_STAGES - 1),
            peers=tuple(sorted(peers)),
            validator=_key(self.validator, "validator"),
        )


# -------------------------------------------------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class SignedVerdict(WireRecord):
    """A validator's (or, at boundary 0, the trainer's) signed statement accepting or tainting one tensor.

    Bound to the run, step, micro-batch, boundary, direction and tensor digest, so it cannot be reused for another
    tensor or replayed at another position; and to ``caller``, the peer id of the one who asked for it (the trainer,
    which sends the tensor on), so that no other peer can present it: a stage replica that had seen genuine verdicts
    in its own requests used them to open streams to other servers and stall them there, holding their stream slots.
    """

    KIND: ClassVar[RecordKind] = RecordKind.VERDICT

    run_id: str
    step: int
    microbatch: int
    boundary: int
    direction: Direction
    verdict: Verdict
    digest: bytes
    caller: str
    signer: bytes
    signature: bytes

    def _check(self) -> dict[str, Any]:
        return dict(
            run_id=_run_id(self.run_id),
            step=_int(self.step, "step"),
            microbatch=_int(self.microbatch, "microbatch"),
            boundary=_int(self.boundary, "boundary", hi=MAX_STAGES),
            direction=_enum(self.direction, Direction, "direction"),
            verdict=_enum(self.verdict, Verdict, "verdict"),
            digest=_digest(self.digest, "digest"),
            caller=_str(self.caller, "caller", max_len=MAX_PEER, min_len=0),  # "": in-process (no peer can show it)
            signer=_key(self.signer, "signer"),
            signature=_fixed_bytes(self.signature, "signature", SIGNATURE_BYTES),
        )

    def signing_bytes(self) -> bytes:
        return _canonical([DOMAIN_TAG, int(self.KIND), self.VERSION, *self._fields()[:-1]])  # all but the signature

    def signature_valid(self) -> bool:
        return Identity.verify(self.signer, self.signing_bytes(), self.signature)


_BY_KIND: dict[int, type[WireRecord]] = {
    cls.KIND: cls
    for cls in (
        Manifest,
        SignedManifest,
        StageAnnouncement,
        ValidatorAnnouncement,
        TaintNotice,
        StrikeRecord,
        StrikeIndexEntry,
        ReplicaDirectory,
        SignedVerdict,
    )
}


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """sha256 over the dtype name, the shape and the raw bytes of the contiguous CPU copy (32 bytes).

    Two tensors have the same digest iff they have the same dtype, shape and bit pattern (so -0.0 != 0.0, and NaNs
    with different payloads differ), which is what "the tensor the validator saw" means.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    header = _canonical([b"sentinel-swarm/tensor/v1", str(flat.dtype), list(tensor.shape)])
    hasher = hashlib.sha256(header)
    if flat.numel():
        hasher.update(flat.view(torch.uint8).numpy())  # the buffer itself: no copy
    return hasher.digest()


def sign_verdict(
    identity: Identity,
    *,
    run_id: str,
    step: int,
    microbatch: int,
    boundary: int,
    direction: Direction,
    verdict: Verdict,
    digest: bytes,
    caller: str,
) -> SignedVerdict:
    """``caller``: the peer id of the one the verdict is for (it alone may present it to a stage)."""
    unsigned = SignedVerdict(
        run_id, step, microbatch, boundary, direction, verdict, digest, caller, identity.public_key,
        bytes(SIGNATURE_BYTES),
    )
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signing_bytes()))


# ---------------------------------------------------------------------------------------------- rejection errors
class InputRejected(Exception):
    """A stage refuses an input tensor. `.code` is stable and travels to the remote caller, who can rebuild the
    exact subclass with `InputRejected.from_code`."""

    code: ClassVar[str] = "input_rejected"

    @staticmethod
    def from_code(code: str, message: str = "") -> InputRejected:
        cls = _REJECTION_BY_CODE.get(code, InputRejected)
        return cls(message)


class MissingVerdict(InputRejected):
    """No verdict came with the tensor."""

    code = "missing_verdict"


class MalformedVerdict(InputRejected):
    """The verdict did not parse as a SignedVerdict."""

    code = "malformed_verdict"


class ForgedVerdict(InputRejected):
    """The signature does not verify, or the signer is not authorized by the manifest for this boundary."""

    code = "forged_verdict"


class VerdictMismatch(InputRejected):
    """A genuine verdict, but for another tensor or position (digest, run, step, micro-batch, boundary or direction),
    or presented by another peer than the one it was issued to."""

    code = "verdict_mismatch"


class TaintedInput(InputRejected):
    """A genuine, matching verdict that says TAINT: the validator rejected this tensor."""

    code = "tainted_input"


_REJECTION_BY_CODE: dict[str, type[InputRejected]] = {
    cls.code: cls
    for cls in (InputRejected, MissingVerdict, MalformedVerdict, ForgedVerdict, VerdictMismatch, TaintedInput)
}


def check_verdict(
    verdict: SignedVerdict | Sequence[Any] | None,
    *,
    manifest: Manifest,
    run_id: str,
    step: int,
    microbatch: int,
    boundary: int,
    direction: Direction,
    digest: bytes | None,
    allow_trainer: bool,
    caller: str | None = None,
) -> None:
    """Accept an input tensor only with a genuine ACCEPT verdict for exactly this tensor at exactly this position.

    `verdict` may be a SignedVerdict or its wire tuple. `allow_trainer=True` also accepts the manifest's trainers as
    signers (boundary 0, where the trainer itself vouches for the embeddings). Checks run in the order
    missing -> malformed -> forged/unauthorized -> mismatch -> tainted, so a forged verdict is reported as forged
    even if it also mismatches. Returns None or raises a subclass of InputRejected. ``digest`` None: the tensor has
    not arrived yet (a streamed request's first part); everything but the digest is checked, and the caller checks
    again with the digest once it has the tensor. ``caller``: the peer presenting it, which must be the one it was
    issued to (None: not checked; every RPC handler passes the remote peer id).
    """
    if verdict is None:
        raise MissingVerdict("no verdict accompanies the tensor")
    if not isinstance(verdict, SignedVerdict):
        try:
            verdict = SignedVerdict.from_tuple(verdict)
        except RecordError as e:
            raise MalformedVerdict(f"malformed verdict: {e}") from None
    if not verdict.signature_valid():
        raise ForgedVerdict("verdict signature does not verify")
    authorized = manifest.is_validator(verdict.signer) or (allow_trainer and manifest.is_trainer(verdict.signer))
    if not authorized:
        raise ForgedVerdict(f"verdict signer {fingerprint(verdict.signer)} is not authorized for this boundary")

    expected = dict(run_id=run_id, step=step, microbatch=microbatch, boundary=boundary, direction=Direction(direction))
    for name, value in expected.items():
        if getattr(verdict, name) != value:
            raise VerdictMismatch(f"verdict is for another {name}")
    if manifest.run_id != run_id:
        raise VerdictMismatch("verdict checked against the manifest of another run")
    if digest is not None and verdict.digest != digest:
        raise VerdictMismatch("verdict is for another tensor (digest differs)")
    if caller is not None and verdict.caller != caller:
        raise VerdictMismatch("verdict was issued to another peer than the one presenting it")
    if verdict.verdict != Verdict.ACCEPT:
        raise TaintedInput(f"validator {fingerprint(verdict.signer)} tainted this tensor")
