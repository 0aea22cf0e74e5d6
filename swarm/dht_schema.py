"""The swarm's records in the hivemind DHT: key layout, the record validator every node runs, ban quorum, I/O helpers.

Key layout (all under the run's prefix; the key is hashed by hivemind, so every protection lives in the subkey)::

    sentinel.{run}.manifest              subkey [ed25519:<authority or a relay>]      SignedManifest
    sentinel.{run}.manifest.validators   subkey [ed25519:<validator>]                 SignedManifest
    sentinel.{run}.stage.{k}             subkey [ed25519:<owner>]                     StageAnnouncement
    sentinel.{run}.directory.{k}         subkey [ed25519:<validator>]                 ReplicaDirectory
    sentinel.{run}.validator.{b}         subkey [ed25519:<validator>]                 ValidatorAnnouncement
    sentinel.{run}.taint.{bucket}        subkey <step.mb.boundary.dir>[ed25519:<v>]   TaintNotice
    sentinel.{run}.strikes.{peer}        subkey [ed25519:<validator>]                 StrikeRecord
    sentinel.{run}.strike_index          subkey <sha256(peer)[:32 hex]>[ed25519:<v>]  StrikeIndexEntry

The strike index lists, per validator, the peers it bans (one entry each, written with the ban's strike record and
with the same expiration, so republished with it): how ``sentinel-node status`` finds a banned peer that no longer
announces a stage, whose strike key it could not otherwise name.

Stored value: ``msgpack([payload, signature])`` where `payload` is the msgpack of the record's wire tuple (what the
application stored) and `signature` is the subkey owner's Ed25519 signature of
``msgpack([DHT_DOMAIN_TAG, key_id, subkey_bytes, payload, float(expiration_time)])``. `key_id` is the *hashed* key
(``DHTID.generate(key).to_bytes()``) and `subkey_bytes` the msgpack of the subkey: exactly the `DHTRecord` that
hivemind hands to `sign_value` on the writer and to `validate` on every storing and reading peer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import pickle
import re
import signal
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, NamedTuple, TypeVar

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht import DHT, DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_logger
from torch import multiprocessing as torch_mp

from swarm.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity
from swarm.lifetime import die_with_parent
from swarm.records import (
    Manifest,
    RecordError,
    RecordKind,
    ReplicaDirectory,
    SignedManifest,
    StageAnnouncement,
    StrikeIndexEntry,
    StrikeRecord,
    TaintNotice,
    ValidatorAnnouncement,
    WireRecord,
    parse_record,
)

# in case hivemind was imported before the swarm package (see swarm/__init__.py): the same choice, made again
torch_mp.set_sharing_strategy(os.environ.get("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor"))

logger = get_logger(__name__)

KEY_PREFIX = "sentinel"
DEFAULT_BUCKET_SIZE = 16
DHT_DOMAIN_TAG = b"sentinel-swarm/dht/v1"
MAX_VALUE_BYTES = 64 * 1024  # one signed record; the largest (a manifest with 256+256 keys) is ~20 KiB
MAX_DISCRIMINATOR = 64
DHT_OP_TIMEOUT = 20.0  # seconds; a get/store on an overloaded DHT must not block its caller forever
DHT_POLL = 0.5  # seconds between checks that the DHT's process still runs, while waiting on it

_MARKER_PREFIX = b"[ed25519:"
_SUBKEY_RE = re.compile(rb"([0-9A-Za-z._:-]{0,%d})\[ed25519:([0-9a-f]{64})\]" % MAX_DISCRIMINATOR)
_RUN_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_KIND_VALUES = frozenset(int(kind) for kind in RecordKind)


# ------------------------------------------------------------------------------------------------------------ keys
def _run(run: str) -> str:
    if not isinstance(run, str) or not _RUN_RE.fullmatch(run):
        raise ValueError(f"invalid run id {run!r:.80}")
    return run


def _index(value: int, name: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be a non-negative int")
    return value


def manifest_key(run: str) -> str:
    return f"{KEY_PREFIX}.{_run(run)}.manifest"


def validator_manifest_key(run: str) -> str:
    """The manifest copies that the manifest's validators keep published (writable by them alone, where the manifest
    is known: see ``SentinelRecordValidator._binding``), beside ``manifest_key``, which anyone may fill."""
    return f"{KEY_PREFIX}.{_run(run)}.manifest.validators"


def stage_key(run: str, stage: int) -> str:
    return f"{KEY_PREFIX}.{_run(run)}.stage.{_index(stage, 'stage')}"


def validator_key(run: str, boundary: int) -> str:
    return f"{KEY_PREFIX}.{_run(run)}.validator.{_index(boundary, 'boundary')}"


def directory_key(run: str, stage: int) -> str:
    """The validators' directories of stage ``stage``'s replicas (``ReplicaDirectory``; 0-based like stage_key)."""
    return f"{KEY_PREFIX}.{_run(run)}.directory.{_index(stage, 'stage')}"


def taint_key(run: str, bucket: int) -> str:
    return f"{KEY_PREFIX}.{_run(run)}.taint.{_index(bucket, 'bucket')}"


def strikes_key(run: str, peer: str) -> str:
    if not isinstance(peer, str) or not 1 <= len(peer) <= 128:
        raise ValueError("peer must be a str of 1 to 128 characters")
    return f"{KEY_PREFIX}.{_run(run)}.strikes.{peer}"


def strike_index_key(run: str) -> str:
    """The run's index of banned peers (``StrikeIndexEntry``): one key, one entry per (validator, peer)."""
    return f"{KEY_PREFIX}.{_run(run)}.strike_index"


def step_bucket(step: int, size: int = DEFAULT_BUCKET_SIZE) -> int:
    """Taint notices of steps [b*size, (b+1)*size) share one key, so one `get` returns a bounded dictionary."""
    if _index(size, "size") < 1:
        raise ValueError("size must be >= 1")
    return _index(step, "step") // size


def dht_key_id(key: str) -> bytes:
    """The hashed key that hivemind stores under and that `RecordValidatorBase.validate` receives as `record.key`."""
    return DHTID.generate(source=key).to_bytes()


# --------------------------------------------------------------------------------------------- subkeys, envelope
def owner_marker(public_key: bytes) -> bytes:
    return _MARKER_PREFIX + public_key.hex().encode() + b"]"


def make_subkey(public_key: bytes, discriminator: bytes = b"") -> bytes:
    """`discriminator` (optional, [0-9A-Za-z._:-]{0,64}) goes before the owner marker: one owner, several entries."""
    subkey = discriminator + owner_marker(public_key)
    if len(public_key) != PUBLIC_KEY_BYTES or not _SUBKEY_RE.fullmatch(subkey):
        raise ValueError("invalid public key or discriminator")
    return subkey


def parse_subkey(subkey: Any) -> tuple[bytes, bytes] | None:
    """(discriminator, public key) of an application-level subkey; None if it carries no owner marker at all.

    Raises RecordError if it mentions a marker but is not exactly `discriminator + [ed25519:<64 lowercase hex>]`.
    """
    raw = subkey.encode("utf-8", "replace") if isinstance(subkey, str) else subkey
    if not isinstance(raw, bytes) or _MARKER_PREFIX not in raw:
        return None
    match = _SUBKEY_RE.fullmatch(raw) if isinstance(subkey, bytes) else None
    if match is None:
        raise RecordError("malformed owner marker in subkey")
    return match.group(1), bytes.fromhex(match.group(2).decode())


def _parse_wire_subkey(subkey_bytes: bytes) -> tuple[bytes, bytes] | None:
    """Like parse_subkey, for the msgpack-encoded subkey bytes that a DHTRecord carries."""
    if _MARKER_PREFIX not in subkey_bytes:
        return None
    try:
        subkey = MSGPackSerializer.loads(subkey_bytes)
    except Exception:
        raise RecordError("undecodable subkey") from None
    parsed = parse_subkey(subkey)
    if parsed is None:  # the marker bytes were there but not in a bytes/str subkey
        raise RecordError("owner marker in a subkey that is not bytes")
    return parsed


def dht_signing_bytes(key_id: bytes, subkey_bytes: bytes, payload: bytes, expiration_time: float) -> bytes:
    """What the owner signs: the domain tag, the hashed key, the msgpack'd subkey, the payload and the expiration."""
    return msgpack.packb([DHT_DOMAIN_TAG, key_id, subkey_bytes, payload, float(expiration_time)], use_bin_type=True)


def pack_signed_value(payload: bytes, signature: bytes) -> bytes:
    return msgpack.packb([payload, signature], use_bin_type=True)


def unpack_signed_value(value: bytes) -> tuple[bytes, bytes]:
    """(payload, signature) of a stored value; RecordError if it is not exactly that."""
    if not isinstance(value, bytes) or len(value) > MAX_VALUE_BYTES:
        raise RecordError("signed value missing or too large")
    try:
        items = msgpack.unpackb(value, raw=False)
    except Exception:
        raise RecordError("signed value is not msgpack") from None
    if type(items) is not list or len(items) != 2:
        raise RecordError("signed value must be [payload, signature]")
    payload, signature = items
    if type(payload) is not bytes or type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
        raise RecordError("signed value must be [payload bytes, 64-byte signature]")
    return payload, signature


def strike_index_discriminator(peer: str) -> bytes:
    """Tells apart one validator's strike-index entries: 32 hex digits of sha256(peer id). A peer id itself may not fit
    a discriminator ([0-9A-Za-z._:-]{0,64}): it is any string of up to 128 characters that a stage announced."""
    if not isinstance(peer, str) or not 1 <= len(peer) <= 128:
        raise RecordError("peer must be a str of 1 to 128 characters")
    digest = hashlib.sha256(b"sentinel-swarm/strike-index/v1\x00" + peer.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32].encode()


def taint_discriminator(notice: TaintNotice) -> bytes:
    """Tells apart one validator's notices in a bucket: step, micro-batch, boundary and direction."""
    return b"%d.%d.%d.%d" % (notice.step, notice.microbatch, notice.boundary, int(notice.direction))


# ---------------------------------------------------------------------------------------------------- replay guard
class ReplayGuard:
    """Highest strike step seen per (validator, peer); a record older than that is a replay and is refused.

    Equal steps are admitted: the same record is re-validated on every `get`, and a validator may re-publish its
    current record. Only the validator can sign its records, but anyone who once saw an old signed record can store
    it again: hivemind's own "highest expiration wins" rule stops that where the newer record is already stored,
    and this guard also stops it at every node that has seen the newer step (e.g. a reader served a stale replica).
    Bounded: the least recently seen pairs are forgotten beyond `max_entries`.
    """

    def __init__(self, max_entries: int = 100_000):
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._highest: OrderedDict[tuple[bytes, str], int] = OrderedDict()

    def highest(self, validator: bytes, peer: str) -> int | None:
        return self._highest.get((validator, peer))

    def admit(self, validator: bytes, peer: str, step: int) -> bool:
        """True (and remember `step`) unless `step` is older than the highest step seen for (validator, peer)."""
        key = (validator, peer)
        highest = self._highest.get(key)
        if highest is not None and step < highest:
            return False
        self._highest[key] = step if highest is None else max(step, highest)
        self._highest.move_to_end(key)
        while len(self._highest) > self.max_entries:
            self._highest.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._highest)

    def __repr__(self) -> str:
        return f"ReplayGuard({len(self)}/{self.max_entries} pairs)"


# ------------------------------------------------------------------------------------------------ record validator
class SentinelDHT(DHT):
    """hivemind's DHT, surviving a request it cannot unpickle.

    Each call from the node's process sends the DHT process a future whose pipe travels through multiprocessing's
    resource sharer (a Unix socket of the calling process). If that hand-over fails (seen once in CI: ``EOFError``
    in the sharer's handshake), hivemind's request loop, which catches ``OSError``, ``ConnectionError`` and
    ``RuntimeError`` only, lets the ``EOFError`` kill the DHT process and its p2pd: the node would lose the swarm
    over one lost request. Here that one request is dropped instead (its caller's bounded wait treats it as empty).

    It also keeps in its routing table a peer that fails one call within ``ROUTING_GRACE`` seconds of its last answer
    (``_keep_recent_peers``), and it does not outlive its node (``_bound_to_parent``): a node killed with SIGKILL (the
    OOM killer, a crash) left its DHT's process and p2pd running for good, holding the node's port, so that the node
    could not start again on it."""

    def run(self) -> None:
        self._inner_pipe = _TolerantPipe(self._inner_pipe)
        _keep_recent_peers()
        _bound_to_parent(self._orphaned)
        super().run()

    def _orphaned(self) -> None:
        """(The parent-watch thread, just before this process exits) remove the socket file of the p2pd that this
        process started: p2pd ends on its parent-death signal, and only hivemind's shutdown would remove it."""
        p2p = getattr(getattr(self, "_node", None), "p2p", None)
        if p2p is not None and getattr(p2p, "_child", None) is not None:
            with contextlib.suppress(Exception):
                os.remove(p2p._daemon_listen_maddr["unix"])

    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
        """hivemind's, then (once ready, where this DHT started its own p2pd) the path of p2pd's socket file is
        noted, for ``shutdown`` to remove it if p2pd could not: a p2pd that was killed, or that ended on its
        parent-death signal, leaves it in /tmp."""
        super().run_in_background(await_ready=await_ready, timeout=timeout)
        self._daemon_socket = None
        if await_ready and self._daemon_listen_maddr is None:
            with contextlib.suppress(Exception):
                self._daemon_socket = self.run_coroutine(_daemon_socket_path)

    def shutdown(self) -> None:
        """hivemind's shutdown, then the socket files that would stay in /tmp are removed: that of a P2P replica
        still open in this process (one that nobody released: ``release_p2p_replica``), and p2pd's own, once this
        DHT's process has ended (hivemind removes it only when it stops a p2pd that is still running)."""
        replica = getattr(self, "_p2p_replica", None)
        try:
            super().shutdown()
        finally:
            if replica is not None and replica.is_alive:
                with contextlib.suppress(Exception):
                    os.remove(replica._client_listen_maddr["unix"])
            daemon_socket = getattr(self, "_daemon_socket", None)
            if daemon_socket is not None:
                if dht_alive(self):
                    with contextlib.suppress(Exception):
                        self.join(DHT_POLL)  # ended "the hard way" (SIGTERM) just now
                if not dht_alive(self):
                    with contextlib.suppress(OSError):
                        os.remove(daemon_socket)


async def _daemon_socket_path(_dht: DHT, node: DHTNode) -> str | None:
    """(In the DHT's process) the path of the Unix socket that its p2pd listens on, None if not one."""
    try:
        return str(node.p2p.daemon_listen_maddr["unix"])
    except Exception:  # noqa: BLE001 - not a Unix socket (or no p2p): nothing to remove
        return None


PARENT_POLL = 1.0  # seconds between the DHT process's checks that its node still runs


def _bound_to_parent(orphaned: Callable[[], None] = lambda: None) -> None:
    """In the DHT's process (``SentinelDHT.run``): exit once the node that started it is gone, and start p2pd so that
    it exits with this process, however it ends, and in a session (so a process group) of its own.

    hivemind's DHT process waits on its pipe from the node forever, and p2pd runs until told to stop, so a node
    killed outright (SIGKILL) left both behind. A thread here sees the node gone (this process re-parented) within
    ``PARENT_POLL`` seconds, calls ``orphaned`` and ends the process; p2pd is started with the kernel's parent-death
    signal (SIGTERM; Linux), which covers this process being killed outright too. Its own process group keeps a
    signal to the node's group (Ctrl-C in a terminal: SIGINT) from stopping p2pd before the node has published its
    last records; the node stops it when it shuts its DHT down, and the parent-death signal when anything else ends
    this process."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL)
        logger.warning(f"the node (pid {parent}) is gone: its DHT process exits")
        orphaned()
        os._exit(0)  # p2pd receives its parent-death signal

    threading.Thread(target=watch, name="sentinel-dht-parent-watch", daemon=True).start()
    die_with_this_process = die_with_parent(signal.SIGTERM)
    if die_with_this_process is None:
        return
    spawn = asyncio.subprocess.create_subprocess_exec

    async def create_subprocess_exec(*args, **kwargs):
        if "preexec_fn" not in kwargs and "start_new_session" not in kwargs:  # (uvloop takes no process_group)
            kwargs.update(preexec_fn=die_with_this_process, start_new_session=True)
        return await spawn(*args, **kwargs)

    asyncio.subprocess.create_subprocess_exec = create_subprocess_exec  # hivemind starts p2pd through it


ROUTING_GRACE = 60.0  # seconds
_ANSWERED: dict = {}  # (in the DHT's process) peer id -> time.monotonic() of its last answer


def _answered_lately(peer_id) -> bool:
    return time.monotonic() - _ANSWERED.get(peer_id, -float("inf")) < ROUTING_GRACE


def _keep_recent_peers() -> None:
    """In this (the DHT's) process: hivemind drops a peer from the routing table, and blacklists it for 5 s (doubling
    with each failure), as soon as one call to it fails; and a get of a key whose dictionary is over hivemind's 4 MiB
    message limit fails at every node holding it (about 20 000 self-signed stage announcements, which anyone may
    publish: ``benchmarks/dht_flood.py``). One read of such a key emptied a reader's routing table, so that its every
    later read found nothing (a client-mode node is never called back: it stayed cut off), and the blacklist hid every
    other key for a while after each such read. A peer that answered within ``ROUTING_GRACE`` seconds now survives a
    failed call in both; one silent for longer is dropped and blacklisted at its next failure, as before."""
    from hivemind.dht.node import Blacklist
    from hivemind.dht.protocol import DHTProtocol

    original = DHTProtocol.update_routing_table
    if getattr(original, "sentinel_grace", False):
        return
    register_failure = Blacklist.register_failure

    async def update_routing_table(self, node_id, peer_id, responded=True):
        if responded:
            _ANSWERED[peer_id] = time.monotonic()
            if len(_ANSWERED) > 4096:  # forget the longest silent
                for peer, _ in sorted(_ANSWERED.items(), key=lambda kv: kv[1])[:1024]:
                    _ANSWERED.pop(peer, None)
        elif _answered_lately(peer_id):
            return
        return await original(self, node_id, peer_id, responded)

    def register_failure_unless_recent(self, peer) -> None:
        if not _answered_lately(peer):
            register_failure(self, peer)

    update_routing_table.sentinel_grace = True
    DHTProtocol.update_routing_table = update_routing_table
    Blacklist.register_failure = register_failure_unless_recent


class _TolerantPipe:
    """A multiprocessing Connection whose ``recv`` turns a failed unpickling (``EOFError``, ``pickle`` errors) into
    the ``OSError`` that hivemind's DHT loop logs and survives. The message's bytes are consumed either way, so the
    pipe stays in step."""

    def __init__(self, connection) -> None:
        self._connection = connection

    def recv(self):
        try:
            return self._connection.recv()
        except (EOFError, pickle.UnpicklingError, AttributeError, ImportError) as e:
            raise OSError(f"dropped a DHT request that could not be received: {type(e).__name__}: {e}") from e

    def __getattr__(self, name: str):
        return getattr(self._connection, name)


class SentinelRecordValidator(RecordValidatorBase):
    """Signs this node's records and validates everyone's; every node of a run registers the same policy.

    Holds only picklable plain data (run id, authorized keys, the local signing seed, the replay guard), so it can be
    passed to `DHT(record_validators=[...])` and `DHT.add_validators`.

    Policy for a record whose subkey carries an `[ed25519:<key>]` marker (a *protected* record):

    * the value is `[payload, signature]` and the signature of the marker's key verifies over the hashed key, the
      subkey, the payload and the expiration;
    * the payload parses as a known wire record (strict `from_tuple`) whose run is this validator's run and whose own
      key field (owner / validator) is the marker's key;
    * the record sits under the key (and discriminator) its own fields determine, so it cannot be moved elsewhere;
    * writers: manifest -> anyone (the authority or a relay), but only a manifest of this run signed inside by the
      configured authority; stage announcement -> anyone, self-signed; validator
      announcement, taint notice, strike record and strike-index entry -> an authorized validator of the manifest
      (an index entry under the run's one index key, its discriminator derived from the peer it names);
    * strike records must not be older (in steps) than the newest seen from the same validator for the same peer.

    Records without a marker would belong to other hivemind components (none of a sentinel node uses the DHT) and are
    refused unless `allow_foreign` (then still not where they would squat a key this run owns or impersonate a
    sentinel record). Readers in this module ignore unmarked entries, but hivemind answers a key with its whole
    dictionary in one message of at most 4 MiB: before 2026-11-30 foreign entries were allowed by default, and 48 of
    100 kB each under a peer's strike key, from a peer with no key of the manifest, made every fresh reader's get of
    it fail, hiding a quorum ban from trainers and stages that joined later.
    """

    def __init__(
        self,
        run_id: str,
        *,
        authority: bytes | None = None,
        validators: Iterable[bytes] = (),
        n_stages: int | None = None,
        local_seed: bytes | None = None,
        bucket_size: int = DEFAULT_BUCKET_SIZE,
        allow_foreign: bool = False,
        replay_guard_entries: int = 100_000,
    ):
        self.run_id = _run(run_id)
        self.authority = authority
        self.validators = frozenset(validators)
        self.n_stages = n_stages
        self.bucket_size = bucket_size
        self.allow_foreign = allow_foreign
        self.replay_guard = ReplayGuard(replay_guard_entries)
        self._local_seed = local_seed
        self._local_public_key = Identity.from_seed(local_seed).public_key if local_seed is not None else None
        self._signer: Ed25519PrivateKey | None = None  # built lazily from the seed, not pickled
        self._protected_keys = self._compute_protected_keys()

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, identity: Identity | None = None, **kwargs: Any
    ) -> SentinelRecordValidator:
        """The full policy once the node has a verified manifest."""
        return cls(
            manifest.run_id,
            authority=manifest.authority,
            validators=manifest.validators,
            n_stages=manifest.n_stages,
            local_seed=identity.seed() if identity is not None else None,
            **kwargs,
        )

    @classmethod
    def for_bootstrap(
        cls, run_id: str, authority: bytes, identity: Identity | None = None, **kwargs: Any
    ) -> SentinelRecordValidator:
        """Before the manifest is known: only the authority's manifest (and self-signed announcements) validate.

        Once the manifest is fetched and verified, `dht.add_validators([SentinelRecordValidator.from_manifest(...)])`
        upgrades this instance in place (see `merge_with`).
        """
        return cls(run_id, authority=authority, local_seed=identity.seed() if identity is not None else None, **kwargs)

    def _compute_protected_keys(self) -> frozenset[bytes]:
        keys = [manifest_key(self.run_id), validator_manifest_key(self.run_id),
                strike_index_key(self.run_id)]  # the index: only validators write there
        if self.n_stages is not None:
            keys += [stage_key(self.run_id, k) for k in range(self.n_stages)]
            keys += [validator_key(self.run_id, b) for b in range(self.n_stages + 1)]
            keys += [directory_key(self.run_id, k) for k in range(self.n_stages)]
        return frozenset(dht_key_id(key) for key in keys)

    @property
    def local_public_key(self) -> bytes | None:
        return self._local_public_key

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_signer"] = None
        return state

    # ---------------------------------------------------------------------------------------------- hivemind hooks
    def validate(self, record: DHTRecord) -> bool:
        try:
            self._validate(record)
            return True
        except RecordError as e:
            logger.debug(f"Rejected DHT record: {e}")
            return False
        except Exception as e:  # never let remote input crash the DHT loop
            logger.debug(f"Rejected DHT record ({type(e).__name__}): {e}")
            return False

    def sign_value(self, record: DHTRecord) -> bytes:
        """Sign records whose subkey carries this node's own marker; leave everything else unchanged."""
        if self._local_public_key is None:
            return record.value
        try:
            parsed = _parse_wire_subkey(record.subkey)
        except RecordError:
            return record.value  # validate() will refuse it
        if parsed is None or parsed[1] != self._local_public_key:
            return record.value
        if self._signer is None:
            self._signer = Ed25519PrivateKey.from_private_bytes(self._local_seed)
        signing_bytes = dht_signing_bytes(record.key, record.subkey, record.value, record.expiration_time)
        return pack_signed_value(record.value, self._signer.sign(signing_bytes))

    def strip_value(self, record: DHTRecord) -> bytes:
        """Hand the application the payload (the msgpack of the record's wire tuple) without the signature."""
        try:
            if _parse_wire_subkey(record.subkey) is None:
                return record.value
            return unpack_signed_value(record.value)[0]
        except RecordError:
            return record.value

    @property
    def priority(self) -> int:
        # like RSASignatureValidator: validate (and strip) before any validator that deserializes the value
        return 10

    def merge_with(self, other: RecordValidatorBase) -> bool:
        """Adopt a newer policy for the same run and authority (e.g. bootstrap -> full manifest); True if merged."""
        if not isinstance(other, SentinelRecordValidator) or other.run_id != self.run_id:
            return False
        if self.authority is not None and other.authority != self.authority:
            return False
        self.authority = other.authority
        self.validators = other.validators
        self.n_stages = other.n_stages
        self.bucket_size = other.bucket_size
        self.allow_foreign = other.allow_foreign
        if other._local_seed is not None:
            self._local_seed, self._local_public_key, self._signer = other._local_seed, other._local_public_key, None
        self._protected_keys = self._compute_protected_keys()
        return True

    # --------------------------------------------------------------------------------------------------- the policy
    def _validate(self, record: DHTRecord) -> None:
        parsed = _parse_wire_subkey(record.subkey)
        if parsed is None:
            self._validate_foreign(record)
            return
        discriminator, signer = parsed
        payload, signature = unpack_signed_value(record.value)
        signing_bytes = dht_signing_bytes(record.key, record.subkey, payload, record.expiration_time)
        if not Identity.verify(signer, signing_bytes, signature):
            raise RecordError("bad signature")
        try:
            wire = MSGPackSerializer.loads(payload)
        except Exception:
            raise RecordError("undecodable payload") from None
        item = parse_record(wire)
        if getattr(item, "run_id", None) != self.run_id and not isinstance(item, SignedManifest):
            raise RecordError("record is for another run")

        expected_key, expected_discriminator, owner = self._binding(item, signer, record.key)
        if owner != signer:
            raise RecordError("record's own key field is not the subkey owner")
        if record.key != dht_key_id(expected_key) or discriminator != expected_discriminator:
            raise RecordError("record is stored under a key or subkey its fields do not name")
        if isinstance(item, StrikeRecord) and not self.replay_guard.admit(signer, item.peer, item.step):
            raise RecordError("strike record older than one already seen (replay)")

    def _binding(self, item: WireRecord, signer: bytes, key: bytes) -> tuple[str, bytes, bytes]:
        """(key, discriminator, owner) that a record must have; raises RecordError if its writer may not write it.
        ``key``: the hashed key it is stored under (a manifest may sit under two)."""
        if isinstance(item, SignedManifest):
            manifest = item.manifest
            if manifest.run_id != self.run_id:
                raise RecordError("manifest is for another run")
            if self.authority is None or manifest.authority != self.authority:
                raise RecordError("manifest is not from this run's authority")
            if not item.is_self_consistent():
                raise RecordError("manifest signature does not verify")
            # the authority's signature inside is what makes a manifest; any peer may keep a copy published under its
            # own subkey (a relay: bootstrap --run-id --authority), so that joining does not need the authority up.
            # That key can be filled by anyone until it reads as nothing; the validators' copies sit under a key of
            # their own, which a node that knows the manifest lets only its validators write. A node that does not
            # know it yet (joining: for_bootstrap) reads them all the same: the authority's signature is checked
            if key == dht_key_id(validator_manifest_key(self.run_id)):
                if self.n_stages is not None and signer not in self.validators:
                    raise RecordError("writer is not an authorized validator")
                return validator_manifest_key(self.run_id), b"", signer
            return manifest_key(self.run_id), b"", signer
        if isinstance(item, StageAnnouncement):
            if self.n_stages is not None and item.stage >= self.n_stages:
                raise RecordError("stage index outside the manifest")
            return stage_key(self.run_id, item.stage), b"", item.owner
        if signer not in self.validators:
            raise RecordError("writer is not an authorized validator")
        if isinstance(item, ValidatorAnnouncement):
            if self.n_stages is not None and item.boundary > self.n_stages:
                raise RecordError("boundary outside the manifest")
            return validator_key(self.run_id, item.boundary), b"", item.validator
        if isinstance(item, TaintNotice):
            bucket = step_bucket(item.step, self.bucket_size)
            return taint_key(self.run_id, bucket), taint_discriminator(item), item.validator
        if isinstance(item, StrikeRecord):
            return strikes_key(self.run_id, item.peer), b"", item.validator
        if isinstance(item, StrikeIndexEntry):
            return strike_index_key(self.run_id), strike_index_discriminator(item.peer), item.validator
        if isinstance(item, ReplicaDirectory):
            if self.n_stages is not None and item.stage >= self.n_stages:
                raise RecordError("stage index outside the manifest")
            return directory_key(self.run_id, item.stage), b"", item.validator
        raise RecordError(f"{type(item).__name__} records are not stored in the DHT")

    def _validate_foreign(self, record: DHTRecord) -> None:
        if record.key in self._protected_keys:
            raise RecordError("unsigned record under a key owned by this run")
        try:
            wire = MSGPackSerializer.loads(record.value)
        except Exception:
            wire = None
        if type(wire) in (list, tuple) and wire and type(wire[0]) is int and wire[0] in _KIND_VALUES:
            raise RecordError("sentinel record without an owner marker")
        if not self.allow_foreign:
            raise RecordError("records without an owner marker are not allowed")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(run={self.run_id}, validators={len(self.validators)}, "
            f"manifest={'yes' if self.n_stages is not None else 'no'}, {self.replay_guard})"
        )


# ------------------------------------------------------------------------------------------------------ ban quorum
def fetch_banned(dht: DHT, manifest: Manifest, peers: Iterable[str]) -> set[str]:
    """Which of ``peers`` a quorum of the manifest's validators bans now (``banned_peers`` over their strike records
    in the DHT). Blocking: call it from a worker thread in async code."""
    peers = set(peers)
    return banned_peers(fetch_strikes_of(dht, manifest.run_id, peers), manifest) & peers


def fetch_strikes_of(dht: DHT, run: str, peers: Iterable[str]) -> list[StrikeRecord]:
    """The strike records of every peer in ``peers`` (``fetch_strikes`` of each, in one lookup). Blocking."""
    peers = sorted(set(peers))
    if not peers:
        return []
    # one lookup of every key inside the DHT's process: one get each, 3000 announced peers (anyone may announce) took
    # 8.4 s, longer than a trainer's refresh period
    keys = [strikes_key(run, p) for p in peers]
    found = _bounded(dht, dht.run_coroutine(partial(_get_many, keys), return_future=True), "get of strikes", {})
    return [r for p, key in zip(peers, keys) for r in _strikes(found.get(key), run, p)]


async def _get_many(keys: list[str], _dht: DHT, node: DHTNode) -> dict:
    """Run inside the DHT's process (``DHT.run_coroutine``): the latest value of each key, None where absent."""
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))  # DHTNode.get(latest=True)
    return {key: found.get(key) for key in keys}


def banned_peers(strike_records: Iterable[StrikeRecord], manifest: Manifest) -> set[str]:
    """Peers banned swarm-wide: at least `manifest.ban_quorum` DISTINCT authorized validators currently ban them.

    Why a quorum of distinct validators: one validator may be wrong (a noisy baseline) or malicious, and a single key
    must not be able to evict honest stages; counting keys (not records) stops one validator from voting many times.
    Why "currently": a validator's newest record for a peer (highest step) is its present opinion, so a ban it lifted
    (forgiveness) no longer counts; at equal steps a ban wins, to be deterministic whatever order records come in.
    Records from keys the manifest does not authorize, or for another run, are ignored: anyone can write a DHT record.
    Pure and deterministic: plain records in, a set of peer ids out.
    """
    latest: dict[tuple[str, bytes], tuple[int, bool]] = {}
    for record in strike_records:
        if record.run_id != manifest.run_id or not manifest.is_validator(record.validator):
            continue
        key = (record.peer, record.validator)
        candidate = (record.step, record.banned)
        if key not in latest or candidate > latest[key]:  # tuple order: newer step, then banned=True over False
            latest[key] = candidate

    votes: dict[str, int] = defaultdict(int)
    for (peer, _validator), (_step, banned) in latest.items():
        if banned:
            votes[peer] += 1
    return {peer for peer, count in votes.items() if count >= manifest.ban_quorum}


# -------------------------------------------------------------------------------------------------- DHT helpers
_T = TypeVar("_T", bound=WireRecord)


def _publish(
    dht: DHT, identity: Identity, owner: bytes, key: str, discriminator: bytes, item: WireRecord, expiration: float
) -> bool:
    """Store `item` under (key, discriminator + owner marker). `expiration` is absolute DHT time (get_dht_time()+ttl).

    The DHT's SentinelRecordValidator must hold `identity`'s seed: it signs inside the DHT process. Returns whether
    at least one peer accepted the record.
    """
    return publish_each(dht, identity, [Publication(owner, key, discriminator, item, expiration)])[0]


class Publication(NamedTuple):
    """One record for ``publish_each``: stored under ``key``, with the subkey of (``owner``, ``discriminator``), until
    ``expiration`` (absolute DHT time)."""

    owner: bytes
    key: str
    discriminator: bytes
    record: WireRecord
    expiration: float


def publish_each(dht: DHT, identity: Identity, publications: Iterable[Publication]) -> list[bool]:
    """Store every publication (``_publish`` stores one), all in flight at once (as ``_get_each`` reads), so that it
    takes about as long as the slowest store, not the sum: a store waits for every peer it asks, and a peer that
    stopped answering (frozen, or gone from a network that drops its packets) costs each store hivemind's timeout.
    Stored one after another, a validator's records took 18-28 s to publish beside one such peer, past their 20 s
    lifetime, so that it vanished from the swarm's view now and then. Whether at least one peer accepted each; a
    store that failed is False."""
    futures = []
    for owner, key, discriminator, item, expiration in publications:
        if owner != identity.public_key:
            raise ValueError("a record can only be published by the identity it names as its writer")
        subkey = make_subkey(identity.public_key, discriminator)
        futures.append((key, dht.store(key, item.to_tuple(), expiration_time=expiration, subkey=subkey,
                                       return_future=True)))  # fmt: skip
    stored = []
    for key, future in futures:
        try:
            stored.append(bool(_bounded(dht, future, f"store under {key}", False)))
        except Exception as e:  # noqa: BLE001 - one failed store (raised in the DHT's process) fails that entry only
            logger.warning(f"DHT store under {key} failed: {type(e).__name__}: {e}")
            stored.append(False)
    return stored


def latest_per_subkey(publications: Iterable[Publication]) -> list[Publication]:
    """The last publication of each (key, owner, discriminator), in the order of those last ones: a later record
    under the same subkey supersedes an earlier one (a peer's strike record, step after step)."""
    latest: dict[tuple[str, bytes, bytes], Publication] = {}
    for p in publications:
        where = (p.key, p.owner, p.discriminator)
        latest.pop(where, None)
        latest[where] = p
    return list(latest.values())


def _bounded(dht: DHT, future: Any, what: str, default: Any) -> Any:
    """The future's result, or `default` after DHT_OP_TIMEOUT seconds (the DHT is overloaded), or as soon as the DHT's
    process is seen dead (checked every DHT_POLL seconds: a dead process never answers).

    Without the bound, a thread blocked on a dead DHT's future keeps the event loop's executor from shutting down.
    """
    deadline = time.monotonic() + DHT_OP_TIMEOUT
    while True:
        try:
            return future.result(timeout=max(0.0, min(DHT_POLL, deadline - time.monotonic())))
        except (TimeoutError, concurrent.futures.TimeoutError, concurrent.futures.CancelledError) as e:
            dead = not dht_alive(dht)
            if not dead and time.monotonic() < deadline and not isinstance(e, concurrent.futures.CancelledError):
                continue
            try:
                future.cancel()
            except Exception:  # noqa: BLE001 - the DHT's pipe may be gone with its process
                pass
            why = "its process is dead" if dead else f"no answer in {DHT_OP_TIMEOUT:.0f} s ({type(e).__name__})"
            logger.warning(f"DHT {what}: {why}; treated as empty")
            return default


def dht_alive(dht: DHT) -> bool:
    """Whether the DHT's process runs; True when that cannot be told here (only its parent process can ask)."""
    try:
        return dht.is_alive()
    except (AssertionError, ValueError, AttributeError):  # multiprocessing asserts the caller is the parent
        return True


async def release_p2p_replica(dht: DHT) -> None:
    """Close the P2P replica that ``dht.replicate_p2p()`` cached in this process, if any: its client socket
    (``/tmp/hivemind-p2pclient-*.sock``) is removed only when the replica is shut down, and hivemind never shuts the
    cached one down, so each process that used it left one such file behind. The daemon is the DHT's and stays up
    (``dht.shutdown()`` stops it). Call it from the event loop that used the replica, once nothing uses it."""
    replica = getattr(dht, "_p2p_replica", None)
    if replica is None:
        return
    dht._p2p_replica = None
    try:
        await replica.shutdown()
    except Exception as e:  # noqa: BLE001 - a leftover socket file is not worth failing a shutdown for
        logger.debug(f"closing the DHT's P2P replica failed: {type(e).__name__}: {e}")


def _fetch(
    dht: DHT, key: str, parse: Callable[[Any], _T], owner_of: Callable[[_T], bytes] | None
) -> list[tuple[bytes, _T]]:
    """(owner key, record) for every protected entry under `key` that parses and names its subkey owner as writer
    (`owner_of` None: any owner, for records whose trust comes from inside them, as a relayed manifest's).

    Relies on the DHT running SentinelRecordValidator (signatures are checked there, then stripped); entries without
    an owner marker are foreign and skipped. Sorted by subkey, so the result does not depend on arrival order.
    """
    return _entries(_get(dht, key), key, parse, owner_of)


def _get(dht: DHT, key: str) -> Any:
    """The latest value of ``key`` (None if absent, or if the get failed or timed out: ``_bounded``)."""
    return _bounded(dht, dht.get(key, latest=True, return_future=True), f"get of {key}", None)


def _get_each(dht: DHT, keys: Iterable[str]) -> dict[str, Any]:
    """``_get`` of every key in ``keys``, all in flight at once (the DHT's process runs each request as a task of
    its own), so that reading them takes about as long as the slowest one, not the sum. One get per key, not one
    ``get_many``: hivemind asks a peer for all the keys of a ``get_many`` in one request, whose reply shares one 4 MiB
    limit, so a key filled by strangers (a stage's announcements: ``ReplicaDirectory``) would fail every key read
    with it, the validators' directories included."""
    futures = {key: dht.get(key, latest=True, return_future=True) for key in dict.fromkeys(keys)}
    found = {}
    for key, future in futures.items():
        try:
            found[key] = _bounded(dht, future, f"get of {key}", None)
        except Exception as e:  # noqa: BLE001 - one key's failure (raised in the DHT's process) empties that key only
            logger.warning(f"DHT get of {key} failed: {type(e).__name__}: {e}; treated as empty")
            found[key] = None
    return found


def _entries(
    found: Any, key: str, parse: Callable[[Any], _T], owner_of: Callable[[_T], bytes] | None
) -> list[tuple[bytes, _T]]:
    """``_fetch``'s parsing of what a get of ``key`` found."""
    if found is None or not isinstance(found.value, dict):
        return []
    out = []
    for subkey, entry in sorted(found.value.items(), key=lambda kv: repr(kv[0])):
        try:
            parsed = parse_subkey(subkey)
            if parsed is None:
                continue
            item = parse(entry.value)
        except RecordError as e:
            logger.debug(f"Skipping DHT entry under {key}: {e}")
            continue
        if owner_of is None or owner_of(item) == parsed[1]:
            out.append((parsed[1], item))
    return out


def publish_manifest(dht: DHT, identity: Identity, signed: SignedManifest, expiration: float) -> bool:
    """Publish the authority-signed manifest under `identity`'s subkey: the authority's own copy, or a relay's."""
    return _publish(dht, identity, identity.public_key, manifest_key(signed.manifest.run_id), b"", signed, expiration)


def fetch_manifest(dht: DHT, run: str, authority_key: bytes, digest: bytes | None = None) -> SignedManifest | None:
    """The run's manifest signed by `authority_key` (obtained out of band), verified, from whichever copy the DHT holds
    (the authority's or a relay's); with `digest`, only that manifest. Of several valid versions, the newest
    (`created_at`), so that a relay of an older one cannot hide a newer one. None if absent."""
    found = [signed for _, signed in manifest_copies(dht, run, authority_key)
             if digest is None or signed.manifest.digest() == digest]  # fmt: skip
    return max(found, key=lambda s: (s.manifest.created_at, s.manifest.digest()), default=None)


def publish_validator_manifest(dht: DHT, identity: Identity, signed: SignedManifest, expiration: float) -> bool:
    """A validator's copy of the manifest, under the key only the manifest's validators may write."""
    return publish_each(dht, identity, [validator_manifest_publication(identity, signed, expiration)])[0]


def validator_manifest_publication(identity: Identity, signed: SignedManifest, expiration: float) -> Publication:
    return Publication(identity.public_key, validator_manifest_key(signed.manifest.run_id), b"", signed, expiration)


def manifest_copies(
    dht: DHT, run: str, authority_key: bytes, *, relayed: bool = True, validators: bool = True
) -> list[tuple[bytes, SignedManifest]]:
    """Every valid published copy of the run's manifests signed by `authority_key`: (publisher's key, manifest), the
    authority's own copy and the relays' (``relayed``), then the validators' copies (``validators``)."""
    out = []
    keys = [*([manifest_key(run)] if relayed else []), *([validator_manifest_key(run)] if validators else [])]
    found = _get_each(dht, keys)  # both at once: the relays' key may be filled by strangers (a read of seconds)
    for publisher, signed in [entry for key in keys
                              for entry in _entries(found[key], key, SignedManifest.from_tuple, None)]:  # fmt: skip
        try:
            manifest = signed.verify(authority=authority_key)
        except RecordError:
            continue
        if manifest.run_id == run:
            out.append((publisher, signed))
    return out


def publish_stage(dht: DHT, identity: Identity, announcement: StageAnnouncement, expiration: float) -> bool:
    key = stage_key(announcement.run_id, announcement.stage)
    return _publish(dht, identity, announcement.owner, key, b"", announcement, expiration)


def publish_directory(dht: DHT, identity: Identity, directory: ReplicaDirectory, expiration: float) -> bool:
    return publish_each(dht, identity, [directory_publication(directory, expiration)])[0]


def directory_publication(directory: ReplicaDirectory, expiration: float) -> Publication:
    key = directory_key(directory.run_id, directory.stage)
    return Publication(directory.validator, key, b"", directory, expiration)


def fetch_directories(dht: DHT, run: str, stage: int) -> list[ReplicaDirectory]:
    """The validators' directories of stage ``stage`` (each written by an authorized validator: the DHT's record
    policy refuses anyone else's). Blocking."""
    return _directories(_get(dht, directory_key(run, stage)), run, stage)


def _directories(found: Any, run: str, stage: int) -> list[ReplicaDirectory]:
    entries = _entries(found, directory_key(run, stage), ReplicaDirectory.from_tuple, lambda d: d.validator)
    return [d for _, d in entries if d.run_id == run and d.stage == stage]


def fetch_stages(dht: DHT, run: str, stage: int) -> list[StageAnnouncement]:
    return _stages(_get(dht, stage_key(run, stage)), run, stage)


def _stages(found: Any, run: str, stage: int) -> list[StageAnnouncement]:
    entries = _entries(found, stage_key(run, stage), StageAnnouncement.from_tuple, lambda a: a.owner)
    return [a for _, a in entries if a.run_id == run and a.stage == stage]


class SwarmView(NamedTuple):
    """What ``fetch_view`` read: per stage index (0-based, as in the keys) its announcements and its validators'
    directories, per boundary its validators' announcements."""

    stages: dict[int, list[StageAnnouncement]]
    directories: dict[int, list[ReplicaDirectory]]
    validators: dict[int, list[ValidatorAnnouncement]]


def fetch_view(dht: DHT, run: str, stages: Iterable[int] = (), boundaries: Iterable[int] = ()) -> SwarmView:
    """The announcements and the validators' directories of every stage index in ``stages``, and the validator
    announcements of every boundary in ``boundaries``: ``fetch_stages``, ``fetch_directories`` and
    ``fetch_validators`` of each, read all at once (``_get_each``). A trainer's view of an S-stage run is 3S + 1 keys;
    read one after another, a flooded stage key (about 3 s a read) cost its 3 s once per flooded stage. Blocking."""
    stages, boundaries = list(dict.fromkeys(stages)), list(dict.fromkeys(boundaries))
    keys = [*(stage_key(run, k) for k in stages), *(directory_key(run, k) for k in stages),
            *(validator_key(run, b) for b in boundaries)]  # fmt: skip
    found = _get_each(dht, keys)
    return SwarmView(
        {k: _stages(found[stage_key(run, k)], run, k) for k in stages},
        {k: _directories(found[directory_key(run, k)], run, k) for k in stages},
        {b: _validators(found[validator_key(run, b)], run, b) for b in boundaries},
    )


def publish_taint(
    dht: DHT, identity: Identity, notice: TaintNotice, expiration: float, bucket_size: int = DEFAULT_BUCKET_SIZE
) -> bool:
    return publish_each(dht, identity, [taint_publication(notice, expiration, bucket_size)])[0]


def taint_publication(notice: TaintNotice, expiration: float, bucket_size: int = DEFAULT_BUCKET_SIZE) -> Publication:
    key = taint_key(notice.run_id, step_bucket(notice.step, bucket_size))
    return Publication(notice.validator, key, taint_discriminator(notice), notice, expiration)


def fetch_taints(dht: DHT, run: str, bucket: int, bucket_size: int = DEFAULT_BUCKET_SIZE) -> list[TaintNotice]:
    entries = _fetch(dht, taint_key(run, bucket), TaintNotice.from_tuple, lambda n: n.validator)
    return [n for _, n in entries if n.run_id == run and step_bucket(n.step, bucket_size) == bucket]


def publish_strike(dht: DHT, identity: Identity, record: StrikeRecord, expiration: float) -> bool:
    """Publish a strike record; a ban (``record.banned``) also gets its entry in the run's strike index, with the same
    expiration (``publish_strike_index``), so that readers find the banned peer once it stops announcing. Returns
    whether the strike record was stored (the index entry is logged if refused: a newer one may already be there)."""
    stored = publish_each(dht, identity, strike_publications(record, expiration))
    if record.banned and not stored[1]:
        logger.warning(f"strike index entry for {record.peer[:64]!r} was not stored")
    return stored[0]


def strike_publications(record: StrikeRecord, expiration: float) -> list[Publication]:
    """A strike record, and for a ban (``record.banned``) its entry in the run's strike index (``publish_strike``)."""
    out = [Publication(record.validator, strikes_key(record.run_id, record.peer), b"", record, expiration)]
    if record.banned:
        entry = StrikeIndexEntry(record.run_id, record.peer, record.validator)
        out.append(strike_index_publication(entry, expiration))
    return out


def publish_strike_index(dht: DHT, identity: Identity, entry: StrikeIndexEntry, expiration: float) -> bool:
    """Store ``entry`` under the run's strike index (``publish_strike`` does it for every ban it publishes)."""
    return publish_each(dht, identity, [strike_index_publication(entry, expiration)])[0]


def strike_index_publication(entry: StrikeIndexEntry, expiration: float) -> Publication:
    key, discriminator = strike_index_key(entry.run_id), strike_index_discriminator(entry.peer)
    return Publication(entry.validator, key, discriminator, entry, expiration)


def fetch_strike_index(dht: DHT, run: str) -> list[StrikeIndexEntry]:
    """Every validator's strike-index entries of the run: the peers they ban (one entry per validator and peer). Only
    signed entries of authorized validators survive the DHT's record validator; callers still check the writer
    against their manifest, and read the strike records themselves to decide bans: an entry is a pointer, no vote."""
    entries = _fetch(dht, strike_index_key(run), StrikeIndexEntry.from_tuple, lambda e: e.validator)
    return [e for _, e in entries if e.run_id == run]


def fetch_strikes(dht: DHT, run: str, peer: str) -> list[StrikeRecord]:
    return _strikes(_get(dht, strikes_key(run, peer)), run, peer)


def _strikes(found: Any, run: str, peer: str) -> list[StrikeRecord]:
    entries = _entries(found, strikes_key(run, peer), StrikeRecord.from_tuple, lambda r: r.validator)
    return [r for _, r in entries if r.run_id == run and r.peer == peer]


def publish_validator(dht: DHT, identity: Identity, announcement: ValidatorAnnouncement, expiration: float) -> bool:
    return publish_each(dht, identity, [validator_publication(announcement, expiration)])[0]


def validator_publication(announcement: ValidatorAnnouncement, expiration: float) -> Publication:
    key = validator_key(announcement.run_id, announcement.boundary)
    return Publication(announcement.validator, key, b"", announcement, expiration)


def fetch_validators(dht: DHT, run: str, boundary: int) -> list[ValidatorAnnouncement]:
    return _validators(_get(dht, validator_key(run, boundary)), run, boundary)


def _validators(found: Any, run: str, boundary: int) -> list[ValidatorAnnouncement]:
    entries = _entries(found, validator_key(run, boundary), ValidatorAnnouncement.from_tuple, lambda a: a.validator)
    return [a for _, a in entries if a.run_id == run and a.boundary == boundary]
