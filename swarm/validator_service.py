"""The validator role over the network: ``rpc_check`` wraps ``sentinel.validator.Validator`` and signs verdicts
(``rpc_check_stream``: the same for tensors over the unary limit, see ``swarm.protocol``).

A check request comes from an authorized trainer (it signs the request, binding the ``warmup`` and ``tainted`` flags,
which would otherwise let anyone obtain an ACCEPT without detection). The service runs ``Validator.check`` on the
tensor against its reference (forward: the sending stage's input; backward: the gradient the sending stage received)
and answers with

* ``verdict``: a signed ACCEPT for exactly the tensor to pass on: the input itself, or its replacement;
* ``taint_verdict``: when flagged, a signed TAINT for the tensor as received (evidence);
* the replacement tensor when tainted (none in "drop" mode: then the micro-batch stops).

On every taint it publishes a signed ``TaintNotice`` at once. Blame is settled per step (``Validator.end_step``, the
drift guard): the service settles step ``s`` when the first check of a later step arrives, or on ``settle()`` /
shutdown, and then publishes a signed ``StrikeRecord`` (``banned`` set once the ledger bans) for every sender that
was flagged in ``s``. Publishing runs in the background so it never delays a check. The validator's state (baselines,
ledger) is saved to ``state_path`` every ``save_every`` checks, at once on a new ban, and on shutdown, and loaded on
start; the strike records of the peers it bans are published again every ``strike_ttl / 3`` and on start.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import random
import time
from collections import OrderedDict, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator  # noqa: UP035 (ServicerBase detects stream handlers by typing's AsyncIterator only)

import torch
from hivemind import DHT
from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time

from sentinel.config import SentinelConfig
from sentinel.validator import CheckResult, Validator
from swarm.dht_schema import (
    Publication,
    directory_publication,
    latest_per_subkey,
    publish_each,
    strike_publications,
    taint_publication,
    validator_manifest_publication,
    validator_publication,
)
from swarm.identity import Identity
from swarm.lifetime import run_every
from swarm.protocol import (
    BadRequest,
    ProtocolError,
    ReferenceMissing,
    StreamSlots,
    TensorSpec,
    Unauthorized,
    answer_stream,
    as_received,
    check_request_bytes,
    check_unary_reply,
    check_unary_request,
    decode_hidden,
    encode_tensors,
    error_response,
    meta_bool,
    meta_int,
    meta_str,
    pack_meta,
    receive_stream,
    request_tensors,
    unpack_meta,
)
from swarm.records import (
    MAX_DIRECTORY,
    MAX_EVIDENCE,
    MAX_REASON,
    MAX_SCORES,
    Direction,
    Manifest,
    ReplicaDirectory,
    SignedManifest,
    StrikeRecord,
    TaintNotice,
    ValidatorAnnouncement,
    Verdict,
    sign_verdict,
    tensor_digest,
)
from swarm.stage_server import manifest_model_config, remove_rpc_handlers, rpc_namespace
from swarm.state import load_state_file, save_state_file

logger = logging.getLogger(__name__)

MAX_TAINT_EVENTS = 256  # taint events kept for operators (ValidatorService.taint_events)
MAX_CANDIDATES = 256  # replicas waiting for a probe, per stage (the oldest request goes first)
PROBE_MICROBATCH = 1 << 40  # micro-batch numbers of probes: far above any trainer's


def private_seed(identity: Identity, run_id: str, seed: int) -> int:
    """A projection seed only ``identity``'s holder can compute: HMAC-SHA256 of the run and the manifest's seed under
    its private key (the first 8 bytes)."""
    mac = hmac.new(identity.seed(), f"sentinel-projections/{run_id}/{seed}".encode(), hashlib.sha256).digest()
    return int.from_bytes(mac[:8], "little")


@dataclass
class ValidatorServiceConfig:
    boundaries: tuple[int, ...] | None = None  # None: every boundary 0..S
    max_batch: int = 64
    compression: int = runtime_pb2.CompressionType.NONE
    announce_period: float = 10.0
    directory_window: float = 300.0  # seconds a stage replica stays in this validator's directory of its stage
    # (``ReplicaDirectory``, published with each announcement) after the last output of it this validator accepted;
    # 0: no directory
    probe_period: float = 5.0  # seconds between probes of the replicas that asked to be listed (``rpc_enlist``):
    # each period, one candidate of each stage, drawn at random, runs a forward of a recent input of that stage and
    # is listed if its output passes this validator's check (0: no probes, candidates never listed)
    probe_timeout: float = 10.0  # seconds a probed replica has to answer
    taint_ttl: float = 600.0  # seconds a taint notice stays in the DHT
    strike_ttl: float = 3600.0  # seconds a strike record stays in the DHT; the records of the peers this validator
    # bans are published again every strike_ttl / 3 (and on start, from the saved state): a ban is for the whole run
    state_path: str | None = None
    save_every: int = 256  # checks between state saves (0: only on shutdown)
    publish: bool = True
    max_streams: int = 8  # streamed check requests in hand at once; one more is refused with Busy (memory bound)
    reference_cache_bytes: int = 64 * 2**20  # tensors this validator passed on (accepted or replaced), kept so that
    # the next boundary's check can name its reference by digest instead of resending it (0: off)
    # seed the monitors' random projections (the sliced-Wasserstein and fit directions) from this validator's own
    # private key and the run, not from the manifest's seed, which every peer, attackers included, can read: an
    # attacker who knows the directions can shape a tensor whose projected quantiles look normal. Stable across
    # restarts (the same key), different for every validator. On by default since fit_max_fence: private draws of
    # the demo test's swarm struck no honest peer (20 with a wide fit fence dropped, 12 with it widened 2x; before
    # the limit, 2 of 25 runs banned one on fit flags). README, "Private projections". False: the manifest's seed,
    # which every validator then shares
    private_projections: bool = True
    check_log: str | None = None  # append one JSON line per check here (an audit trail: who sent what, each
    # distance against its fence, the verdict) and one per settled step (the strikes of the senders it touched); the
    # file is buffered and complete once the service shuts down. None: off


class ValidatorService(ServicerBase):
    def __init__(
        self, config: ValidatorServiceConfig, manifest: Manifest, identity: Identity, sentinel: SentinelConfig,
        signed_manifest: SignedManifest | None = None,
    ):  # fmt: skip
        """``signed_manifest``: the authority-signed ``manifest``, which this validator then keeps published under the
        key only the manifest's validators may write (``validator_manifest_key``: the relays' key can be filled by
        anyone until it reads as nothing)."""
        if not manifest.is_validator(identity.public_key):
            raise ValueError("this identity is not an authorized validator of the manifest")
        if signed_manifest is not None and signed_manifest.manifest != manifest:
            raise ValueError("signed_manifest is not this manifest")
        self.signed_manifest = signed_manifest
        self.config = config
        self.manifest = manifest
        self.identity = identity
        if config.private_projections:
            sentinel = replace(sentinel, seed=private_seed(identity, manifest.run_id, sentinel.seed))
        self.validator = Validator(sentinel)
        n = manifest.n_stages
        self.boundaries = tuple(range(n + 1)) if config.boundaries is None else tuple(config.boundaries)
        if not all(0 <= b <= n for b in self.boundaries):
            raise ValueError(f"boundaries must be in 0..{n}")
        cfg = manifest_model_config(manifest)
        self.spec = TensorSpec(cfg.d_model, cfg.seq_len, config.max_batch)
        self.n_checks = 0
        self.stream_calls = 0  # check requests that came streamed
        self.streams = StreamSlots(config.max_streams)
        self._step: int | None = None  # highest step seen; its blame is settled when a later step starts
        self.n_tainted = 0
        # the latest taints, for operators (``sentinel-node join --role validator`` prints each one): TaintEvent
        self.taint_events: deque[TaintEvent] = deque(maxlen=MAX_TAINT_EVENTS)
        self.seconds = 0.0
        self.evidence: dict[str, deque[bytes]] = defaultdict(lambda: deque(maxlen=MAX_EVIDENCE))
        self._kept: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # digest -> tensor passed on (LRU)
        self._kept_bytes = 0
        self.reference_hits = 0  # checks whose reference came from _kept
        self._stopped = False
        self._check_log = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="validator")  # the Validator is serial
        # one publisher thread: records go out in the order they were made (a later strike must not be overtaken)
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="validator-publish")
        self._outbox: list[Publication] = []  # records made and not yet handed to the DHT (``_send``)
        self._sender: asyncio.Future | None = None
        self.n_publish_batches = 0
        self._dht: DHT | None = None
        self._p2p: P2P | None = None
        self._announcer: asyncio.Task | None = None
        self._republisher: asyncio.Task | None = None
        self._published_step: dict[str, int] = {}  # peer -> the step of the latest strike record published for it
        self._vouched: dict[int, OrderedDict[str, float]] = defaultdict(OrderedDict)  # stage -> peer -> last accepted
        # replicas nobody has routed to yet that asked to be listed (rpc_enlist): stage -> peer -> when it asked; those
        # whose probe passed: stage -> peer -> when; and the input of each stage that probes use (the latest accepted)
        self._candidates: dict[int, OrderedDict[str, float]] = defaultdict(OrderedDict)
        self._probed: dict[int, OrderedDict[str, float]] = defaultdict(OrderedDict)
        self._probe_inputs: dict[int, torch.Tensor] = {}
        self._prober: asyncio.Task | None = None
        self.probes = {"passed": 0, "failed": 0}
        self.probe_events: deque[tuple[int, str, int, bool]] = deque(maxlen=MAX_TAINT_EVENTS)  # (n, peer, stage, ok)
        self._rng = random.Random()
        self._saved_step: int | None = None  # the highest step seen before a restart (for republish_bans only)
        if config.state_path and Path(config.state_path).exists():
            # our own file, written by save_state below: its pickled deques and floats need the full unpickler
            load_state_file(config.state_path, "validator state (baselines and strikes)", self._load_state,
                            weights_only=False)  # fmt: skip
        if config.check_log:  # last: nothing above can fail and leave it open
            self._check_log = open(config.check_log, "a", buffering=1 << 16)  # noqa: SIM115 (closed on shutdown)

    def _load_state(self, state: dict) -> None:
        saved_seed = state.get("config", {}).get("seed") if isinstance(state, dict) else None
        if isinstance(saved_seed, int) and saved_seed != self.validator.config.seed:
            # its baselines were learnt on other projections (a state saved before private_projections, or under
            # another setting): new directions would make every tensor look far from them
            logger.warning("this validator's saved state was learnt on other projections (another seed): keeping "
                           "them; remove the state file to start afresh on this validator's own")  # fmt: skip
            self.validator = Validator(replace(self.validator.config, seed=saved_seed))
        self.validator.load_state_dict(state)
        service = state.get("service", {})  # absent from states saved before bans were republished
        self._saved_step = service.get("step")
        self._published_step = dict(service.get("published_step", {}))

    # ----------------------------------------------------------------------------------------------- lifecycle
    @property
    def peer_id(self) -> str:
        if self._p2p is None:
            raise RuntimeError("service not started")
        return self._p2p.peer_id.to_base58()

    async def start(self, dht: DHT) -> None:
        self._dht = dht
        self._p2p = await dht.replicate_p2p()
        await self.add_p2p_handlers(self._p2p, namespace=rpc_namespace(self.manifest.run_id))
        await self.announce()
        self._announcer = asyncio.create_task(run_every(self.config.announce_period, self.announce,
                                                        "validator: announce", logger))  # fmt: skip
        await self.republish_bans()  # a restarted validator's bans (from its saved state) are in force again at once
        self._republisher = asyncio.create_task(run_every(self.config.strike_ttl / 3, self.republish_bans,
                                                          "validator: republishing bans", logger))  # fmt: skip
        if self.config.probe_period > 0:
            self._prober = asyncio.create_task(run_every(self.config.probe_period, self.probe_candidates,
                                                         "validator: probing candidates", logger))  # fmt: skip

    async def shutdown(self) -> None:
        """Stop serving, settle and publish the last step's strikes, save the state. A second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        for task in (self._announcer, self._republisher, self._prober):
            if task is not None:
                task.cancel()
        self._announcer = self._republisher = self._prober = None
        await self.settle()
        await self.flush()
        if self._p2p is not None:
            try:
                await remove_rpc_handlers(self, self._p2p, self.manifest.run_id)
            finally:
                self._p2p = None  # the DHT's shared replica (dht.replicate_p2p caches it): not ours to close
        self._executor.shutdown(wait=True)
        self._publisher.shutdown(wait=True)
        self.save_state()
        if self._check_log is not None:
            self._check_log.close()
            self._check_log = None

    async def flush(self) -> None:
        """Wait for the DHT publications queued so far (the sender publishes until its queue is empty)."""
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)

    def save_state(self) -> None:
        if not self.config.state_path:
            return
        state = self.validator.state_dict()
        seen = max((s for s in (self._step, self._saved_step) if s is not None), default=None)
        state["service"] = {"step": seen, "published_step": dict(self._published_step)}
        save_state_file(state, self.config.state_path)

    @property
    def throughput(self) -> float:
        """Tensors checked per second of check time; 0 until measured (trainers then weigh it as a typical one)."""
        return self.n_checks / self.seconds if self.seconds > 0 else 0.0

    async def announce(self) -> None:
        if self._dht is None or not self.config.publish:
            return
        expiration = get_dht_time() + 2 * self.config.announce_period
        records = [validator_publication(ValidatorAnnouncement(self.manifest.run_id, b, self.peer_id, self.throughput,
                                                              self.identity.public_key), expiration)
                   for b in self.boundaries]  # fmt: skip
        records += [directory_publication(directory, expiration) for directory in self.directories()]
        if self.signed_manifest is not None:
            records.append(validator_manifest_publication(self.identity, self.signed_manifest, expiration))
        started = time.monotonic()
        stored = await asyncio.to_thread(publish_each, self._dht, self.identity, records)  # all at once
        took = time.monotonic() - started
        if took > self.config.announce_period / 2:  # a peer that stopped answering costs each store a timeout
            logger.warning(f"validator: announcing took {took:.1f} s ({sum(stored)} of {len(stored)} record(s) "
                           f"stored; they live {2 * self.config.announce_period:.0f} s): a peer not answering?")

    def _vouch(self, stage: int, peer: str) -> None:
        """``peer``'s output at stage ``stage`` (0-based) was accepted now."""
        seen = self._vouched[stage]
        seen[peer] = time.monotonic()
        seen.move_to_end(peer)
        self._candidates[stage].pop(peer, None)  # listed now: no probe needed
        while len(seen) > 4 * MAX_DIRECTORY:
            seen.popitem(last=False)

    def directories(self) -> list[ReplicaDirectory]:
        """This validator's directory of each stage it has accepted outputs of: the replicas whose last accepted
        output is at most ``directory_window`` seconds old, then those whose probe passed within that window
        (``probe_candidates``), none banned here; at most ``MAX_DIRECTORY`` in all, taken in that order, latest first
        (the record itself lists them sorted)."""
        if self.config.directory_window <= 0:
            return []
        since = time.monotonic() - self.config.directory_window
        out = []
        for stage in sorted(set(self._vouched) | set(self._probed)):
            peers = []
            for seen in (self._vouched.get(stage, {}), self._probed.get(stage, {})):
                peers += [p for p, t in reversed(seen.items()) if t >= since and not self.validator.ledger.is_banned(p)
                          and p not in peers]  # fmt: skip
            if peers:
                out.append(ReplicaDirectory(self.manifest.run_id, stage, peers[:MAX_DIRECTORY],
                                            self.identity.public_key))  # fmt: skip
        return out

    # ------------------------------------------------------------------------------------ enlisting, probes
    async def rpc_enlist(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A stage replica asks to be listed in this validator's directory of its stage (``StageServer.enlist``).
        The directories list the replicas whose outputs this validator accepted; one that no trainer has routed to
        yet is in none, and while strangers fill the stage's announcement key it cannot be found at all
        (``ReplicaDirectory``). The asking peer is the authenticated caller; it becomes a candidate, probed in turn
        (``probe_candidates``). Metadata: run, stage (0-based, one whose outputs this validator checks). Reply:
        ``{"listed": bool}``, whether it is listed already."""
        try:
            meta = unpack_meta(request.metadata)
            if meta_str(meta, "run", max_len=64) != self.manifest.run_id:
                raise BadRequest("enlisting for another run")
            stage = meta_int(meta, "stage", hi=self.manifest.n_stages - 1)
            if stage + 1 not in self.boundaries:
                raise BadRequest(f"this validator does not check the outputs of stage {stage + 1}")
            peer = context.remote_id.to_base58()
            if self.validator.ledger.is_banned(peer):
                raise Unauthorized("banned here")
            since = time.monotonic() - self.config.directory_window
            listed = any(seen.get(peer, -math.inf) >= since for seen in (self._vouched[stage], self._probed[stage]))
            if not listed:
                queue = self._candidates[stage]
                queue[peer] = time.monotonic()
                queue.move_to_end(peer)
                while len(queue) > MAX_CANDIDATES:
                    queue.popitem(last=False)
            return runtime_pb2.ExpertResponse(metadata=pack_meta({"listed": listed}))
        except ProtocolError as e:
            return error_response(e)

    async def probe_candidates(self) -> dict[str, bool]:
        """One probe for each stage with candidates: one of them, drawn at random, runs a forward of the latest input
        of that stage this validator has seen accepted (under its own verdict, issued to itself), and is listed in
        the directory if the output has the input's shape and passes this validator's check of that stage's outputs
        (scored only: nothing learnt, nobody struck). A candidate that fails is dropped until it asks again. Returns
        {peer: passed} of the probes made."""
        stages = [k for k, queue in self._candidates.items() if queue and k in self._probe_inputs]
        if self._p2p is None or self._step is None or not stages:
            return {}
        peers = {}
        for stage in stages:
            queue = self._candidates[stage]
            peer = self._rng.choice(list(queue))
            del queue[peer]
            if not self.validator.ledger.is_banned(peer):
                peers[peer] = stage
        results = await asyncio.gather(*(self._probe(stage, peer) for peer, stage in peers.items()))
        for (peer, stage), passed in zip(peers.items(), results):
            self.probes["passed" if passed else "failed"] += 1
            self.probe_events.append((sum(self.probes.values()), peer, stage, passed))
            if passed:
                probed = self._probed[stage]
                probed[peer] = time.monotonic()
                probed.move_to_end(peer)
                while len(probed) > MAX_DIRECTORY:
                    probed.popitem(last=False)
        return dict(zip(peers, results))

    async def _probe(self, stage: int, peer: str) -> bool:
        from hivemind.p2p import PeerID

        from swarm.protocol import call_auto, decode_reply_tensor
        from swarm.stage_server import StageServer

        run, step, x = self.manifest.run_id, self._step, self._probe_inputs[stage]
        mb = PROBE_MICROBATCH + self.probes["passed"] + self.probes["failed"]
        verdict = sign_verdict(self.identity, run_id=run, step=step, microbatch=mb, boundary=stage,
                               direction=Direction.FORWARD, verdict=Verdict.ACCEPT, digest=tensor_digest(x),
                               caller=self.peer_id)  # fmt: skip
        meta = {"run": run, "step": step, "mb": mb, "verdict": verdict.to_tuple()}
        try:
            stub = StageServer.get_stub(self._p2p, PeerID.from_base58(peer), namespace=rpc_namespace(run))
            response = await call_auto(stub, "rpc_forward", "rpc_forward_stream", [x], meta,
                                       self.config.probe_timeout, self.config.compression, self.spec)  # fmt: skip
            out = decode_reply_tensor(response, self.spec)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the probe failed
            logger.debug(f"validator: probe of {peer} (stage {stage + 1}) failed: {type(e).__name__}: {e}")
            return False
        if out.shape != x.shape:
            return False
        monitor = self.validator.monitor(stage + 1, "forward")

        def score() -> bool:
            if not monitor.ready:
                return False  # nothing to judge it by yet
            return not monitor.observe(out, x, detect=True, learn=False).flagged

        return await asyncio.get_running_loop().run_in_executor(self._executor, score)

    async def republish_bans(self) -> int:
        """Publish again the strike record of every peer this validator bans (bans last the whole run; a record
        lasts ``strike_ttl`` in the DHT). Each goes out at the latest step this validator has seen, never older than
        its last record for that peer (nodes refuse an older one as a replay). Returns how many."""
        if self._dht is None or not self.config.publish:
            return 0
        ledger = self.validator.ledger
        banned = ledger.banned()
        expiration = get_dht_time() + self.config.strike_ttl
        for peer, ban_step in sorted(banned.items()):
            step = max(ban_step or 0, self._published_step.get(peer, 0), self._step or 0, self._saved_step or 0)
            record = StrikeRecord(self.manifest.run_id, peer, ledger.strikes(peer), True, list(self.evidence[peer]),
                                  step, self.identity.public_key)  # fmt: skip
            self._published_step[peer] = step
            self._send(strike_publications(record, expiration))
        return len(banned)

    # ------------------------------------------------------------------------------------------------- handler
    async def rpc_check(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._serve(request, context.remote_id.to_base58())

    async def rpc_check_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for part in answer_stream(requests, partial(self._serve, caller=context.remote_id.to_base58())):
            yield part

    async def _serve(
        self, request: runtime_pb2.ExpertRequest | AsyncIterator[runtime_pb2.ExpertRequest], caller: str = ""
    ) -> runtime_pb2.ExpertResponse:
        """Both paths: a unary request, or the parts of a streamed one (reassembled within the service's bounds, then
        checked by the same code). Every error becomes the typed error reply. ``caller``: the requesting peer's id,
        which the verdict is issued to (only that peer can present it to a stage)."""
        unary = isinstance(request, runtime_pb2.ExpertRequest)
        try:
            if unary:
                check_unary_request(request)
                return await self._check(request, unary=True, caller=caller)
            self.stream_calls += 1
            with self.streams.take():
                request = await receive_stream(request, max_tensors=2, spec=self.spec, authorize=self._authorize)
                return await self._check(request, unary=False, caller=caller)
        except ProtocolError as e:
            logger.debug(f"validator: check rejected ({e.code}): {e}")
            return error_response(e)
        except Exception as e:
            logger.exception("validator: check failed")
            return error_response(e)

    def _request_fields(self, meta: dict) -> tuple[dict, bytes, Any]:
        """A check request's signed fields but the digests, its trainer's key and its signature; BadRequest or
        Unauthorized (an unlisted trainer) before any tensor is looked at."""
        run, step, mb = meta_str(meta, "run", max_len=64), meta_int(meta, "step"), meta_int(meta, "mb")
        if run != self.manifest.run_id:
            raise BadRequest("check for another run")
        n = self.manifest.n_stages
        direction = Direction(meta_int(meta, "direction", hi=1))
        lo, hi = (1, n) if direction == Direction.FORWARD else (0, n - 1)
        boundary = meta_int(meta, "boundary", lo=lo, hi=hi)
        if boundary not in self.boundaries:
            raise BadRequest(f"this validator does not serve boundary {boundary}")
        sender, tainted, warmup = meta_str(meta, "sender"), meta_bool(meta, "tainted"), meta_bool(meta, "warmup")
        trainer = meta.get("trainer")
        if type(trainer) is not bytes or not self.manifest.is_trainer(trainer):
            raise Unauthorized("check requests must come from an authorized trainer")
        fields = dict(run_id=run, step=step, microbatch=mb, boundary=boundary, direction=direction, sender=sender,
                      tainted=tainted, warmup=warmup)  # fmt: skip
        return fields, trainer, meta.get("signature")

    def _authorize(self, meta: dict) -> None:
        """A streamed check's signature, verified on its first part over the digests its metadata claims (the
        tensors, still to come, are checked against the signature again once in): a stranger cannot hold a slot."""
        fields, trainer, signature = self._request_fields(meta)
        digest, reference_digest = meta.get("digest"), meta.get("reference_digest")
        if any(type(d) is not bytes or len(d) != 32 for d in (digest, reference_digest)):
            raise Unauthorized("a streamed check names its tensors' digests in its metadata")
        self._verify_signature(fields, trainer, signature, digest, reference_digest)

    @staticmethod
    def _verify_signature(fields: dict, trainer: bytes, signature: Any, digest: bytes, reference_digest: bytes):
        signed = check_request_bytes(**fields, digest=digest, reference_digest=reference_digest)
        if type(signature) is not bytes or not Identity.verify(trainer, signed, signature):
            raise Unauthorized("check request signature does not verify")

    async def _check(
        self, request: runtime_pb2.ExpertRequest, *, unary: bool, caller: str = ""
    ) -> runtime_pb2.ExpertResponse:
        meta = unpack_meta(request.metadata)
        fields, trainer, signature = self._request_fields(meta)
        run, step, mb = fields["run_id"], fields["step"], fields["microbatch"]
        boundary, direction = fields["boundary"], fields["direction"]
        sender, tainted, warmup = fields["sender"], fields["tainted"], fields["warmup"]
        reference = None
        if len(request.tensors) == 1:  # the reference named by digest: one this validator passed on earlier
            (x_proto,) = request.tensors
            reference_digest = meta.get("reference_digest")
            if type(reference_digest) is not bytes or len(reference_digest) != 32:
                raise BadRequest("a check with one tensor needs a 32-byte reference_digest")
        else:
            x_proto, ref_proto = request_tensors(request, 2)
            reference = decode_hidden(ref_proto, self.spec, "reference")
            reference_digest = tensor_digest(reference)
        x = decode_hidden(x_proto, self.spec, "tensor", require_finite=False)  # flagging NaN is our job
        digest = tensor_digest(x)
        self._verify_signature(fields, trainer, signature, digest, reference_digest)
        if reference is None:  # only now: an unsigned request must not learn which tensors this validator holds
            reference = self._kept.get(reference_digest)
            if reference is None:
                raise ReferenceMissing("reference not held here (evicted or never seen): send it in full")
            self._kept.move_to_end(reference_digest)
            self.reference_hits += 1
        if reference.shape != x.shape:
            raise BadRequest("reference must have the tensor's shape")
        if unary:  # the reply may carry a replacement of x's shape
            check_unary_reply(x.numel(), self.config.compression)

        name = "forward" if direction == Direction.FORWARD else "backward"

        def run_check() -> tuple[CheckResult, list[tuple[str, int, bool]], int | None]:
            settled_step = self._step if self._step is not None and step > self._step else None
            settled = self._settle_now(settled_step) if settled_step is not None else []
            self._step = step if self._step is None else max(self._step, step)
            result = self.validator.check(
                x, boundary=boundary, direction=name, sender=sender, step=step, reference=reference,
                tainted=tainted, warmup=warmup,
            )  # fmt: skip
            return result, settled, settled_step

        res, settled, settled_step = await asyncio.get_running_loop().run_in_executor(self._executor, run_check)
        if settled:
            self._settled(settled, settled_step)
        if self._check_log is not None:
            within = res.input_excess
            self._log({"step": step, "mb": mb, "boundary": boundary, "direction": name, "sender": sender,
                       "upstream_tainted": tainted, "warmup": warmup, "tainted": res.tainted, "blamed": res.blamed,
                       "reason": res.reason, "scores": _finite(res.scores), "fences": _finite(res.fences),
                       "input_excess": within if within is not None and math.isfinite(within) else None})  # fmt: skip
        self.n_checks += 1
        self.seconds += res.seconds

        def verdict(kind: Verdict, tensor_digest_: bytes):
            return sign_verdict(
                self.identity, run_id=run, step=step, microbatch=mb, boundary=boundary, direction=direction,
                verdict=kind, digest=tensor_digest_, caller=caller,
            ).to_tuple()  # fmt: skip

        reply: dict = {"tainted": res.tainted, "reason": res.reason[:MAX_REASON], "scores": _finite(res.scores)}
        tensors: list[torch.Tensor] = []
        if not res.tainted:
            reply["verdict"] = verdict(Verdict.ACCEPT, digest)
            self._keep(digest, x)
            if direction == Direction.FORWARD and boundary >= 1:  # the output of a replica of stage `boundary`
                self._vouch(boundary - 1, sender)
                self._probe_inputs[boundary - 1] = reference  # the input it got: what probes of that stage run
        else:
            self.n_tainted += 1
            self.taint_events.append(TaintEvent(self.n_tainted, step, mb, boundary, name, sender, res.reason,
                                                res.blamed, _excess(res)))  # fmt: skip
            reply["taint_verdict"] = verdict(Verdict.TAINT, digest)
            if res.tensor is not None:
                replacement = as_received(res.tensor, self.config.compression)
                tensors.append(replacement)
                replacement_digest = tensor_digest(replacement)
                reply["verdict"] = verdict(Verdict.ACCEPT, replacement_digest)
                self._keep(replacement_digest, replacement)
            self._publish(res, run, step, mb, boundary, direction, sender, digest)
        if self.config.save_every and self.n_checks % self.config.save_every == 0:
            # on the validator's own thread, between checks: a check running meanwhile would change what is saved
            await asyncio.get_running_loop().run_in_executor(self._executor, self.save_state)
        return runtime_pb2.ExpertResponse(
            tensors=encode_tensors(tensors, self.config.compression), metadata=pack_meta(reply)
        )

    def _log(self, entry: dict) -> None:
        """One JSON line for the check log (``ValidatorServiceConfig.check_log``), timestamped."""
        if self._check_log is None:
            return
        try:
            self._check_log.write(json.dumps({"t": round(time.time(), 3), **entry}, separators=(",", ":")) + "\n")
        except OSError as exc:  # a full disk must not stop the checks
            logger.warning("check log: %s; logging stopped", exc)
            self._check_log = None

    def _keep(self, digest: bytes, tensor: torch.Tensor) -> None:
        """Remember a tensor passed on, under its digest, within ``reference_cache_bytes`` (least recent out)."""
        size = tensor.numel() * tensor.element_size()
        if size > self.config.reference_cache_bytes or digest in self._kept:
            return
        self._kept[digest] = tensor
        self._kept_bytes += size
        while self._kept_bytes > self.config.reference_cache_bytes:
            _, old = self._kept.popitem(last=False)
            self._kept_bytes -= old.numel() * old.element_size()

    # --------------------------------------------------------------------------------------------- publication
    def _publish(
        self, res: CheckResult, run: str, step: int, mb: int, boundary: int, direction: Direction, sender: str,
        digest: bytes,
    ) -> None:  # fmt: skip
        if self._dht is None or not self.config.publish:
            return
        now = get_dht_time()
        key = self.identity.public_key
        notice = TaintNotice(run, step, mb, boundary, direction, sender, digest, _finite(res.scores),
                             res.reason[:MAX_REASON], key)  # fmt: skip
        self._send([taint_publication(notice, now + self.config.taint_ttl)])
        if res.blamed:
            self.evidence[sender].append(digest)

    def _settle_now(self, step: int) -> list[tuple[str, int, bool]]:
        """Settle the blame of ``step`` (``Validator.end_step``); (sender, strikes, banned) of everyone it touched.
        Runs on the validator's executor thread. A new ban is saved at once, not at the next periodic save: a crash in
        between would forget it here (and it would no longer be published again once its record expired)."""
        if self.validator.end_step(step) and self.config.state_path:
            self.save_state()
        ledger = self.validator.ledger
        return [(s, ledger.strikes(s), ledger.is_banned(s)) for s in sorted(self.validator.touched)]

    async def settle(self) -> None:
        """Settle the current step's blame now (normally done when a later step's first check arrives) and publish
        the resulting strike records."""
        if self._step is None:
            return
        step = self._step
        settled = await asyncio.get_running_loop().run_in_executor(self._executor, self._settle_now, step)
        if settled:
            self._settled(settled, step)

    def _settled(self, settled: list[tuple[str, int, bool]], step: int) -> None:
        """Step ``step`` was settled: publish its strike records and log them (check log)."""
        self._log({"settled": step, "strikes": {s: [n, b] for s, n, b in settled}})
        if self._dht is None or not self.config.publish:
            return
        expiration = get_dht_time() + self.config.strike_ttl
        for sender, count, banned in settled:
            record = StrikeRecord(self.manifest.run_id, sender, count, banned, list(self.evidence[sender]), step,
                                  self.identity.public_key)  # fmt: skip
            self._published_step[sender] = max(step, self._published_step.get(sender, step))
            self._send(strike_publications(record, expiration))

    def _send(self, publications: list[Publication]) -> None:
        """Queue records for the DHT. One task publishes them, in the order they were made, a batch at a time: all
        that queued while the previous batch was out go at once (``publish_each``), a later record under the same
        subkey in place of an earlier one (a peer's strike record, step after step). One after another, each store
        beside a peer that stopped answering waited hivemind's timeout (about 5 s), and records queued up behind
        it faster than they went out: a ban's strike record waited behind every taint notice made before it."""
        self._outbox.extend(publications)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send_queued())

    async def _send_queued(self) -> None:
        loop = asyncio.get_running_loop()
        while self._outbox:
            batch, self._outbox = latest_per_subkey(self._outbox), []
            self.n_publish_batches += 1
            try:
                await loop.run_in_executor(self._publisher, publish_each, self._dht, self.identity, batch)
            except Exception as e:  # noqa: BLE001 - the next batch goes out all the same
                logger.warning(f"validator: publishing {len(batch)} record(s) failed: {type(e).__name__}: {e}")


@dataclass(frozen=True)
class TaintEvent:
    """One tainted check, as an operator reads it: which tensor, from whom, and why."""

    number: int  # the service's n_tainted after this taint (1, 2, ...): lets a reader tell new events from seen ones
    step: int
    microbatch: int
    boundary: int
    direction: str
    sender: str
    reason: str  # "non-finite", "shape", "distance:<metric>,...", or "upstream taint" and the like
    blamed: bool  # whether the sender is to get a strike for it (when the step settles; the drift guard may forgive)
    excess: dict[str, float]  # each distance over its fence, as score / fence

    def describe(self) -> str:
        over = ", ".join(f"{m} {r:.3g}x" for m, r in sorted(self.excess.items(), key=lambda kv: -kv[1]))
        blame = "blamed" if self.blamed else "not blamed"
        return (f"step {self.step} mb {self.microbatch} boundary {self.boundary} {self.direction} from "
                f"{self.sender}: {self.reason or 'flagged'}" + (f" ({over})" if over else "") + f"; {blame}")


def _excess(res: CheckResult) -> dict[str, float]:
    """score / fence for every distance over its (finite, positive) fence."""
    out = {}
    for m, score in res.scores.items():
        fence = res.fences.get(m)
        if fence is not None and math.isfinite(score) and math.isfinite(fence) and fence > 0 and score > fence:
            out[m] = score / fence
    return out


def _finite(scores: dict[str, float]) -> dict[str, float]:
    """Scores that fit a TaintNotice: finite floats, at most MAX_SCORES of them."""
    out = {str(k)[:64]: float(v) for k, v in scores.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    return dict(sorted(out.items())[:MAX_SCORES])
