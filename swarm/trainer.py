"""The trainer: holds the data, the embedding and the head, and routes each micro-batch through the swarm.

The data path of one micro-batch mirrors ``swarm.mesh.Mesh.microbatch`` over the network:

1. embed the tokens and sign an ACCEPT verdict for boundary 0 (the trainer vouches for its own embeddings);
2. for each stage ``k``: pick a replica, ``forward(h, verdict)``, ask a validator of boundary ``k`` (or, with a ban
   quorum above 1, that many validators at once: ``check_fanout``) to check the output against ``h``, and pass on
   what the validator returns (the output, or a tainting validator's replacement) with its verdict;
3. the head computes the loss; its gradient is signed by the trainer at boundary ``S``, backward;
4. in reverse, ``backward(h_k, verdict, g, grad_verdict)`` and a validator check at boundary ``k - 1`` of the
   returned gradient against ``g``. A stage whose forward output was replaced is bypassed (the gradient passes
   through unchanged, as in the mesh); the trainer re-signs that gradient for the boundary below, which the stage
   servers accept from a trainer.

Routing: among the ONLINE announcements of a stage (and the replicas that the validators' directories list,
``ReplicaDirectory``: anyone can fill a stage's announcement key until it reads as nothing), weighted by throughput
(``throughput_weights``: a peer that has not measured itself yet weighs as the lower median measured one, and none more
than 4 times that), with the replicas that have not answered this trainer yet sharing ``explore`` times the weight of
those that have, excluding peers that a quorum of validators has banned (``fetch_banned``), peers announced only by
keys that announced a banned peer, peers that sent a malformed reply (all of these: unless nothing else is left) and
peers that failed during this micro-batch; the view is refreshed from the DHT every ``refresh_period`` seconds (in the
background, once there is one). With ``routing="balanced"`` (the default) each step's micro-batches are shared among a
stage's replicas in proportion to those weights (``swarm.routing.balanced_plan``); retries, and a planned replica
banned or failed since, fall back to the weighted random choice. Transport failures are retried on another replica, at
most ``max_retries`` times per call for replicas that have answered before and ``max_unproven_tries`` for others (plus
up to ``max_fast_failures`` that fail within ``fast_failure`` seconds: peer ids nobody serves, which announcing costs
nothing); a bad request or a rejected input is never retried. Forwards are hedged (``hedge_after``): one not answered
within a few times the stage's usual latency (2 s at least) is tried on another replica beside it, and the first answer
is taken, so that a peer that accepts calls and never answers costs a call that long, not ``rpc_timeout``; backwards,
which apply gradients, are not. A peer that failed a call is avoided for ``failure_ban`` seconds (doubling with each
consecutive failure, up to ``failure_ban_max``; cleared by a success), like Petals' ``Blacklist``: a replica that died
without announcing OFFLINE stays in the DHT until its record expires, and without this every micro-batch would pay one
failed call for it. Avoided peers are still used when nothing else is left (they may be back).

A replica that dies between the forward and the backward of a micro-batch loses nothing: backward is stateless (the
server recomputes the forward from the stage input the trainer kept) and every replica of stage ``k`` serves the same
layer span, so the backward goes to another replica of the same stage with the same input. No re-forward is needed
(Petals re-forwards only because its servers' spans need not align). The gradient then comes from the survivor's
parameters at that input; with data-parallel averaging the replicas stay close, so this is the usual small staleness.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from hivemind import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm.data import BatchSampler, Corpus, load_corpus
from swarm.dht_schema import fetch_banned, fetch_view
from swarm.identity import Identity
from swarm.model import Embedding, Head
from swarm.protocol import (
    Busy,
    CheckReply,
    ReferenceMissing,
    RemoteFailure,
    TensorSpec,
    TransportError,
    as_received,
    call_auto,
    decode_reply_tensor,
    sign_check,
    unpack_meta,
    verdict_from_meta,
)
from swarm.records import (
    Direction,
    ReplicaDirectory,
    SignedVerdict,
    StageAnnouncement,
    StageState,
    ValidatorAnnouncement,
    Verdict,
    sign_verdict,
    tensor_digest,
)
from swarm.routing import ROUTINGS, balanced_plan
from swarm.stage_server import StageServer, manifest_model_config, rpc_namespace
from swarm.validator_service import ValidatorService

logger = logging.getLogger(__name__)


MAX_HELD_DIGESTS = 1024  # per validator; a digest it has evicted costs one ReferenceMissing round trip


class NoRoute(TransportError):
    """No reachable, non-banned replica (or validator) answered within the retry budget."""


class MalformedReply(TransportError):
    """A reply no honest peer sends: a tensor whose shape is not its request's. The call is retried on another peer and
    the trainer routes to that peer from then on only when no other replica is left (``Trainer.misbehaved``); the
    validators never see the tensor (their check needs the reference's shape), so it would otherwise cost the peer
    nothing and stop the trainer."""


@dataclass
class TrainerConfig:
    seed: int = 0  # model init and data order
    batch_size: int = 4
    microbatches: int = 1  # per optimizer step
    lr: float = 3e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup: int = 0  # steps of honest warm-up announced to validators
    compression: int = runtime_pb2.CompressionType.NONE
    rpc_timeout: float = 30.0
    max_retries: int = 2  # extra attempts on other replicas after a transport failure
    # of a replica that has answered this trainer before: failures of never-heard ones (a dead peer's stale record,
    # an announcement of a peer that never answers) count against max_unproven_tries instead, so that a crowd of
    # those cannot use up a call's retries before an honest replica is drawn
    max_unproven_tries: int = 8
    # ... of which failures within fast_failure seconds (a peer id nobody serves fails to dial at once: 0.00-0.03 s on
    # loopback) count apart, up to max_fast_failures a call: announcing is free, so 200 announcements of peers that
    # do not exist took 8 of 202 draws a call and a cold-started trainer 15 step attempts (51 s) to find the 2 honest
    # replicas among them. A peer that accepts the call and never answers costs rpc_timeout and counts as a try
    fast_failure: float = 1.0
    max_fast_failures: int = 256
    # hedged forwards: a stage forward not answered within max(hedge_after, hedge_factor x the 90th percentile of
    # that stage's recent forward latencies) seconds is tried on another replica beside it, and so on, up to
    # max_hedged at once; the first answer is taken (a forward changes nothing at the server; backwards, which apply
    # gradients, are never hedged). A peer that accepts calls and never answers then costs hedge_after seconds, not
    # rpc_timeout: with 24 of them beside 2 honest replicas a cold trainer's first 3 steps took 4.3 s, against
    # 120 s unhedged (benchmarks/stalling_peers.py). hedge_after 0: off
    hedge_after: float = 2.0
    hedge_factor: float = 3.0
    max_hedged: int = 8
    max_background: int = 16  # hedged attempts that lost and run on to learn their outcome (past it: cancelled)
    explore: float = 0.1  # the share of a stage's traffic (its routing weight) offered to replicas that have not yet
    # answered this trainer, once some have: anyone may announce a replica, and announcements of peers that never
    # answer would otherwise draw traffic in proportion to their number (each such draw costs a failed call)
    refresh_period: float = 5.0  # seconds between DHT refreshes of the routing view
    taint_scope: str = "microbatch"  # as in MeshConfig: "microbatch" tells later validators the micro-batch is tainted
    validate: bool = True  # False: no validator checks, the trainer vouches for every tensor itself (benchmarks of
    # the defence's cost only; stage servers accept that only with StageServerConfig.trust_trainer)
    failure_ban: float = 15.0  # seconds a peer that failed a call is avoided (doubled per consecutive failure)
    failure_ban_max: float = 300.0
    busy_backoff: float = 1.0  # seconds a peer that answered Busy (at its stream limit: healthy, just full) is avoided
    reference_by_digest: bool = True  # name a check's reference by digest when that validator passed it on itself
    check_fanout: int = 0  # validators (distinct) that check each tensor at once; it is tainted if any taints it.
    # 0: the manifest's ban quorum. One each would spread the evidence: each validator would learn and keep strikes
    # from its share of the traffic alone, while the quorum needs each of them to reach a ban (README, "Several
    # validators": with 2 validators and quorum 2, one check each banned later and missed most noise attackers)
    max_inflight: int = 4  # micro-batches of one step driven through the swarm concurrently (pipelining: one
    # micro-batch's validator check overlaps another's stage compute); 1 = strictly one after another
    routing: str = "balanced"  # "balanced": each step's micro-batches are shared among a stage's replicas in
    # proportion to their weights (each gets floor or ceil of its share; which micro-batches, at random); "random":
    # an independent weighted draw per micro-batch, which sent all 4 of a step to one of 2 replicas 1 step in 8. Then
    # the step waits on one replica while the other idles, and its validator sees no sibling's tensor of that step to
    # tell a stage's drift from one replica's fault (README, "Routing")


def choose_replica(
    announcements: Sequence[StageAnnouncement], banned: set[str], exclude: set[str], rng: np.random.Generator,
    avoid: set[str] | frozenset[str] = frozenset(),
    weigh: Callable[[Sequence[StageAnnouncement]], np.ndarray] | None = None,
) -> StageAnnouncement | None:
    """Weighted random choice among ONLINE, non-banned, non-excluded, non-avoided replicas (``weigh(allowed)``; by
    default their ``throughput_weights``).

    Fallbacks, in order: a non-banned replica that is avoided (it failed recently, it may be back), then a banned one
    (as in the mesh: routing through a banned replica, whose output the validators still check, beats stopping
    training). Excluded replicas (failed during this call) are never chosen.
    """
    allowed = routable(announcements, banned, exclude, avoid)
    if not allowed:
        return None
    weights = throughput_weights([a.throughput for a in allowed]) if weigh is None else weigh(allowed)
    return allowed[int(rng.choice(len(allowed), p=weights / weights.sum()))]


def routable(
    announcements: Sequence[StageAnnouncement], banned: set[str], exclude: set[str],
    avoid: set[str] | frozenset[str] = frozenset(),
) -> list[StageAnnouncement]:
    """The replicas ``choose_replica`` draws from: the first non-empty of its tiers (see there)."""
    online = [a for a in announcements if a.state == StageState.ONLINE and a.peer not in exclude]
    tiers = (
        [a for a in online if a.peer not in banned and a.peer not in avoid],
        [a for a in online if a.peer not in banned],
        [a for a in online if a.peer not in avoid],
        online,
    )
    return next((tier for tier in tiers if tier), [])


def preferring(first: str, pick: Callable[[set[str]], str | None]) -> Callable[[set[str]], str | None]:
    """A ``pick`` for ``Trainer._with_retries`` that offers ``first`` (unless excluded, and only once), then defers
    to ``pick``."""
    pending = [first]

    def choose(exclude: set[str]) -> str | None:
        if pending and pending[0] not in exclude:
            return pending.pop()
        return pick(exclude)

    return choose


MAX_THROUGHPUT = 1e9  # micro-batches (or checks) a second: more than any peer does; an announcement above is clamped
THROUGHPUT_CAP = 4.0  # a peer weighs at most this many times the lower median of its stage's measured throughputs


def throughput_weights(throughputs: Sequence[float]) -> np.ndarray:
    """Routing weights from announced throughputs. A peer that has not measured itself yet announces 0 and weighs the
    lower median of those that have (1 each when none has): weighted by a placeholder against measured peers
    (thousands of checks a second), a new validator drew almost no traffic, never measured itself, and warmed its
    monitors on the live traffic after the honest warm-up was over (README, "Failover and data parallelism in the
    swarm", "Routing weights").

    An announcement is its peer's own word, so no weight exceeds ``THROUGHPUT_CAP`` times that lower median (the
    lower one: with two peers, the other's): one peer announcing 1e300 drew every micro-batch of its stage, and
    announcements near the float limit overflowed the weights' sum (NaN probabilities, a crashed trainer)."""
    values = [min(float(t), MAX_THROUGHPUT) if math.isfinite(t) and t > 0 else 0.0 for t in throughputs]
    measured = sorted(t for t in values if t > 0)
    fill = measured[(len(measured) - 1) // 2] if measured else 1.0
    return np.array([min(t, THROUGHPUT_CAP * fill) if t > 0 else fill for t in values], dtype=np.float64)


def _log_failed_refresh(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        e = task.exception()
        logger.warning(f"background refresh of the routing view failed: {type(e).__name__}: {e}")


@dataclass
class TrainerMetrics:
    microbatches: int = 0  # started
    completed: int = 0  # forward and backward done (a tainted micro-batch counts; a dropped one does not)
    tainted: int = 0
    dropped: int = 0
    retries: int = 0  # calls that failed and were retried on another peer
    busy: int = 0  # of those, refused with Busy
    hedged: int = 0  # attempts started beside a running one (hedged forwards)
    references_by_digest: int = 0  # checks whose reference went by digest (the validator held it)
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    step_completed: list[int] = field(default_factory=list)  # completed micro-batches of each optimizer step
    stage_calls: Counter = field(default_factory=Counter)  # peer -> successful forward/backward calls


class Trainer:
    def __init__(self, config: TrainerConfig, manifest, identity: Identity, corpus: Corpus | None = None):
        if not manifest.is_trainer(identity.public_key):
            raise ValueError("this identity is not an authorized trainer of the manifest")
        self.config = config
        self.manifest = manifest
        self.identity = identity
        self.run = manifest.run_id
        self.n_stages = manifest.n_stages
        self.model_config = manifest_model_config(manifest)
        self.embedding = Embedding(self.model_config, seed=config.seed)
        self.head = Head(self.model_config, seed=config.seed)
        self.params = [*self.embedding.parameters(), *self.head.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        corpus = corpus if corpus is not None else load_corpus()
        self.sampler = BatchSampler(corpus.train, config.batch_size, self.model_config.seq_len, config.seed)
        self.spec = TensorSpec(self.model_config.d_model, self.model_config.seq_len, max(64, config.batch_size))
        self.rng = np.random.default_rng([config.seed, 11])
        self.metrics = TrainerMetrics()
        self.stages: dict[int, list[StageAnnouncement]] = {}
        self.validators: dict[int, list[ValidatorAnnouncement]] = {}
        self.banned: set[str] = set()
        self.banned_owners: set[bytes] = set()  # keys that announced a banned peer (see ``refresh``)
        self.misbehaved: set[str] = set()  # peers that sent a MalformedReply: routed to last, with the banned ones
        self.proven: set[str] = set()  # peers that have answered a call (routing prefers them: ``explore``)
        self._refreshed_at = -math.inf
        self._held: dict[str, OrderedDict[bytes, None]] = {}  # validator peer -> digests it passed on (recent)
        self._down: dict[str, tuple[float, int]] = {}  # peer -> (avoided until (monotonic), consecutive failures)
        self._dht: DHT | None = None
        self._p2p: P2P | None = None
        self._refreshing: asyncio.Future | None = None
        self._plans: dict[tuple[int, int], list[str]] = {}  # (step, stage) -> the step's replica per micro-batch
        self._latency: dict[int, deque[float]] = {}  # stage -> seconds of its recent answered forwards
        self._background: set[asyncio.Future] = set()  # hedged attempts that lost, running on (``_learn``)
        if config.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {config.routing!r}")
        if not 0.0 < config.explore <= 1.0 or config.max_retries < 0 or config.max_unproven_tries < 1:
            # (max_unproven_tries 0 would end every call before its first attempt: no peer is proven at first)
            raise ValueError("explore must be in (0, 1], max_retries >= 0 and max_unproven_tries >= 1")
        if config.fast_failure < 0 or config.max_fast_failures < 0:
            raise ValueError("fast_failure and max_fast_failures must be >= 0")
        if (not config.hedge_after >= 0 or not config.hedge_factor >= 0 or config.max_hedged < 1
                or config.max_background < 0):  # fmt: skip
            raise ValueError("hedge_after and hedge_factor must be >= 0, max_hedged >= 1 and max_background >= 0")

    async def start(self, dht: DHT) -> None:
        self._dht = dht
        self._p2p = await dht.replicate_p2p()
        await self.refresh()

    async def shutdown(self) -> None:
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)
        background = list(self._background)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        self._p2p = None  # the DHT's shared replica (dht.replicate_p2p caches it): not ours to close

    # ------------------------------------------------------------------------------------------------- routing
    async def refresh(self) -> None:
        """Re-read stage and validator announcements and the strike records of every announced stage peer (a peer
        once banned by the quorum stays banned for this trainer).

        Concurrent callers (micro-batches in flight) share one read."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._read_routing())
        await asyncio.shield(self._refreshing)

    async def _read_routing(self) -> None:
        dht = self._dht

        def read():
            view = fetch_view(dht, self.run, range(self.n_stages), range(self.n_stages + 1))  # 3S + 1 keys at once
            stages = {k + 1: anns for k, anns in view.stages.items()}
            directories = {k + 1: dirs for k, dirs in view.directories.items()}
            validators = view.validators
            peers = {a.peer for anns in stages.values() for a in anns}
            peers |= {p for dirs in directories.values() for d in dirs for p in d.peers}
            return stages, directories, validators, fetch_banned(dht, self.manifest, peers)

        stages, directories, self.validators, banned = await asyncio.to_thread(read)
        # bans are for the whole run: one seen stays, whatever a later read misses (a DHT read that timed out, a
        # record not yet published again, the peer's announcement gone for a while)
        self.banned |= banned
        # ... and for the identity (owner key) that announced a banned peer: restarted under a new peer id (strikes
        # are per peer id) with the same key, a banned replica came back clean (the operator review). A fresh key
        # is a new volunteer, to be caught again. An announcement does not prove that its key controls the peer id
        # it names, so a peer is banned by key only when every key announcing it is banned: a stranger whose key got
        # banned (by announcing a banned peer) and then announced an honest replica got that replica banned (the
        # docs audit), while the replica's own key, announcing it too, now keeps it in
        announcers: dict[str, set[bytes]] = {}
        for anns in stages.values():
            for a in anns:
                announcers.setdefault(a.peer, set()).add(a.owner)
        self.banned_owners |= {owner for peer, owners in announcers.items() if peer in self.banned for owner in owners}
        self.banned |= {peer for peer, owners in announcers.items() if owners <= self.banned_owners}
        self.stages = {k: self._with_directories(k, stages[k], directories[k]) for k in stages}
        self._refreshed_at = time.monotonic()

    def _with_directories(
        self, k: int, announced: list[StageAnnouncement], directories: list[ReplicaDirectory]
    ) -> list[StageAnnouncement]:
        """Stage ``k``'s announcements, and an ONLINE entry (throughput 0: weighed as a typical replica) for each
        replica that only the validators' directories list: anyone can fill a stage's announcement key until a fresh
        reader gets nothing from it (``ReplicaDirectory``), while the directories are the manifest's validators' own.
        A listed replica that is gone fails its first call and is avoided like any other."""
        known = {a.peer for a in announced}
        span = tuple(self.manifest.layer_spans[k - 1])
        extra = {}
        for d in directories:
            for peer in d.peers:
                if peer not in known and peer not in extra:
                    extra[peer] = StageAnnouncement(self.run, k - 1, peer, StageState.ONLINE, span, 0.0, d.validator)
        return [*announced, *(extra[p] for p in sorted(extra))]

    async def _maybe_refresh(self) -> None:
        """A refresh once the view is ``refresh_period`` old: awaited while there is no view yet, else run in the
        background while micro-batches route on the current view (a read of a key filled by strangers takes seconds,
        ``ReplicaDirectory``, and every micro-batch used to wait for it)."""
        if time.monotonic() - self._refreshed_at <= self.config.refresh_period:
            return
        if not any(self.stages.values()):
            await self.refresh()
        elif self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._read_routing())
            self._refreshing.add_done_callback(_log_failed_refresh)

    async def _with_retries(self, pick, attempt, hedge_after: float = 0.0):
        """``attempt(peer)`` on distinct peers from ``pick(exclude)`` until one answers: at most ``1 + max_retries``
        failures of peers that have answered this trainer before, and ``max_unproven_tries`` of others (failures of
        those within ``fast_failure`` seconds counted apart, up to ``max_fast_failures``).

        ``hedge_after`` > 0 (stage forwards, which change nothing at the server): an attempt that has not answered
        within that many seconds is not waited for alone; the next peer is tried beside it, and so on every
        ``hedge_after`` seconds, up to ``max_hedged`` attempts at once (never on a banned, misbehaving or recently
        failed peer, which only a call with nothing else left goes to), and the first answer is taken. A peer that
        accepts calls and never answers then costs a call ``hedge_after`` seconds instead of ``rpc_timeout``. The
        attempts that lose run on in the background (``_learn``): a slow honest replica becomes proven, a staller
        fails at its ``rpc_timeout`` and is avoided like any failed peer."""
        c = self.config
        exclude: set[str] = set()
        last: Exception | None = None
        failed = {True: 0, False: 0}  # by whether the peer had answered before
        fast = 0  # failures of unproven peers within fast_failure seconds, counted apart
        running: dict[asyncio.Future, tuple[str, bool, float]] = {}  # attempt -> (peer, proven then, started)
        exhausted = False  # pick had no peer left while attempts were running: wait for one of them

        def may_start() -> bool:  # another attempt, within the budget
            return (not exhausted and failed[True] <= c.max_retries and failed[False] < c.max_unproven_tries
                    and fast < c.max_fast_failures)  # fmt: skip

        def hedge_in() -> float | None:  # seconds until the next hedge is due; None: none will be
            if hedge_after <= 0 or not 0 < len(running) < c.max_hedged or not may_start():
                return None
            return max(started for _, _, started in running.values()) + hedge_after - time.monotonic()

        try:
            while True:
                due = hedge_in()
                if may_start() and (not running or (due is not None and due <= 0)):
                    if running:  # a hedge goes only to a peer in good standing, never to the last resorts
                        peer = pick(exclude | self.shunned | self.avoided())
                    else:
                        peer = pick(exclude)
                        if peer is None and exclude:
                            await self.refresh()
                            peer = pick(exclude)
                    if peer is None:
                        exhausted = True
                    else:
                        if running:
                            self.metrics.hedged += 1
                        exclude.add(peer)
                        running[asyncio.ensure_future(attempt(peer))] = (peer, peer in self.proven, time.monotonic())
                        continue
                if not running:
                    break
                due = hedge_in()
                done, _ = await asyncio.wait(running, timeout=None if due is None else max(0.0, due),
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                for task in done:
                    peer, proven, started = running.pop(task)
                    exhausted = False  # a failure below may leave room for another pick (after a refresh)
                    try:
                        result = task.result()
                    except (Busy, TransportError, RemoteFailure) as e:
                        self.metrics.retries += 1
                        last = e
                        self._failed(peer, e)
                        if not isinstance(e, Busy) and not proven and time.monotonic() - started < c.fast_failure:
                            fast += 1
                        else:  # (Busy: healthy but full, and an attempt all the same)
                            failed[proven] += 1
                        continue
                    self._answered(peer)
                    for other, (other_peer, _, _) in running.items():
                        self._learn(other, other_peer)
                    running.clear()
                    return peer, result
        finally:  # an error not retried, or this call cancelled: stop what still runs
            for task in running:
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # retrieved: done beside the one that raised, it is dropped
        raise NoRoute(f"no peer answered after {sum(failed.values()) + fast} failure(s): {last}")

    def _answered(self, peer: str) -> None:
        self._down.pop(peer, None)
        self.proven.add(peer)

    def _failed(self, peer: str, e: Exception) -> None:
        """Book a failed call of ``peer``: Busy (healthy but full) sidesteps it for ``busy_backoff`` seconds, a
        MalformedReply shuns it, any other failure avoids it (``_mark_failed``)."""
        if isinstance(e, Busy):
            logger.info(f"{peer[:12]}... is busy ({e}); trying another peer")
            self.metrics.busy += 1
            _, failures = self._down.get(peer, (0.0, 0))
            self._down[peer] = (time.monotonic() + self.config.busy_backoff, failures)
            return
        if isinstance(e, MalformedReply):
            logger.warning(f"{peer[:12]}... sent a malformed reply ({e}); routing around it from now on")
            self.misbehaved.add(peer)
        elif peer in self.avoided():  # tried again as the least bad peer left: said once, not at every try
            logger.debug(f"call to {peer[:12]}... failed again ({type(e).__name__}: {e})")
        else:
            logger.warning(f"call to {peer[:12]}... failed ({type(e).__name__}: {e}); trying another peer")
        self._mark_failed(peer)

    def _learn(self, task: asyncio.Future, peer: str) -> None:
        """A hedged attempt that lost the race runs on in the background, and its outcome is booked like any call's
        (proven, or failed and avoided); its result is dropped. At most ``max_background`` at once: past that it is
        cancelled (and the peer booked as failed: it did not answer within ``hedge_after``)."""
        if len(self._background) >= self.config.max_background:
            task.cancel()
            self._mark_failed(peer)
            return

        def booked(t: asyncio.Future) -> None:
            self._background.discard(t)
            if t.cancelled():
                return
            e = t.exception()
            if e is None:
                self._answered(peer)
            elif isinstance(e, (Busy, TransportError, RemoteFailure)):
                self._failed(peer, e)
            else:
                logger.warning(f"background call to {peer[:12]}... raised {type(e).__name__}: {e}")

        self._background.add(task)
        task.add_done_callback(booked)

    def _hedge_delay(self, k: int) -> float:
        """Seconds after which a forward at stage ``k`` is hedged (``TrainerConfig.hedge_after``); 0: never."""
        c = self.config
        if c.hedge_after <= 0:
            return 0.0
        seen = self._latency.get(k)
        return max(c.hedge_after, c.hedge_factor * float(np.percentile(seen, 90))) if seen else c.hedge_after

    def _mark_failed(self, peer: str) -> None:
        _, failures = self._down.get(peer, (0.0, 0))
        ban = min(self.config.failure_ban * 2.0**failures, self.config.failure_ban_max)
        self._down[peer] = (time.monotonic() + ban, failures + 1)

    @property
    def shunned(self) -> set[str]:
        """Peers routed to only when no other replica is left: banned by the quorum, or seen misbehaving here."""
        return self.banned | self.misbehaved

    def avoided(self) -> set[str]:
        """Peers avoided after recent failures (still used when nothing else is left)."""
        now = time.monotonic()
        return {peer for peer, (until, _) in self._down.items() if until > now}

    def _pick_stage(self, k: int, exclude: set[str]) -> str | None:
        chosen = choose_replica(self.stages.get(k, []), self.shunned, exclude, self.rng, self.avoided(),
                                self._routing_weights)  # fmt: skip
        return None if chosen is None else chosen.peer

    def _routing_weights(self, allowed: Sequence[StageAnnouncement]) -> np.ndarray:
        """``throughput_weights``, with the replicas that have not answered this trainer yet (when some have) sharing
        ``explore`` times the weight of those that have: announcing is free, answering is not."""
        weights = throughput_weights([a.throughput for a in allowed])
        known = np.array([a.peer in self.proven for a in allowed])
        if known.any() and not known.all():
            scale = self.config.explore * weights[known].sum() / weights[~known].sum()
            weights = np.where(known, weights, weights * scale)
        return weights

    def _planned_pick(self, k: int, step: int, mb: int) -> Callable[[set[str]], str | None]:
        """The ``pick`` of micro-batch ``mb``'s forward at stage ``k``: with balanced routing, its replica in the
        step's plan (made on first use from the routing view of that moment), unless that one has since been banned,
        failed or is avoided; then, and for retries, a weighted random choice."""
        if self.config.routing != "balanced":
            return lambda ex: self._pick_stage(k, ex)
        plan = self._plans.get((step, k))
        if plan is None:
            allowed = routable(self.stages.get(k, []), self.shunned, set(), self.avoided())
            weights = self._routing_weights(allowed)
            n = max(1, self.config.microbatches)
            plan = [allowed[i].peer for i in balanced_plan(weights, n, self.rng)]
            self._plans = {key: p for key, p in self._plans.items() if key[0] >= step - 1}  # older steps are done
            self._plans[(step, k)] = plan
        planned = plan[mb % len(plan)] if plan else None

        def pick(exclude: set[str]) -> str | None:
            if planned is None or planned in exclude or planned in self.shunned or planned in self.avoided():
                return self._pick_stage(k, exclude)
            return planned

        return pick

    def _pick_validator(self, boundary: int, exclude: set[str]) -> str | None:
        available = [a for a in self.validators.get(boundary, []) if a.peer not in exclude]
        avoid = self.avoided()
        candidates = [a for a in available if a.peer not in avoid] or available
        if not candidates:
            return None
        weights = throughput_weights([a.throughput for a in candidates])
        return candidates[int(self.rng.choice(len(candidates), p=weights / weights.sum()))].peer

    # ------------------------------------------------------------------------------------------------- the RPCs
    def _stub(self, cls, peer: str):
        return cls.get_stub(self._p2p, PeerID.from_base58(peer), namespace=rpc_namespace(self.run))

    async def _call(self, cls, peer: str, method: str, tensors: list[torch.Tensor], meta: dict):
        """``method`` on ``peer``: unary, or ``{method}_stream`` when the tensors exceed the unary limit."""
        c = self.config
        return await call_auto(self._stub(cls, peer), method, f"{method}_stream", tensors, meta, c.rpc_timeout,
                               c.compression, self.spec)  # fmt: skip

    async def _stage_call(self, peer: str, method: str, tensors: list[torch.Tensor], meta: dict) -> torch.Tensor:
        response = await self._call(StageServer, peer, method, tensors, meta)
        out = decode_reply_tensor(response, self.spec)
        if out.shape != tensors[0].shape:  # forward: the output of a stage; backward: its input's gradient
            raise MalformedReply(f"{method} reply of shape {tuple(out.shape)} for input {tuple(tensors[0].shape)}")
        self.metrics.stage_calls[peer] += 1
        return out

    async def _check(
        self, peer: str, tensor: torch.Tensor, reference: torch.Tensor, *, step: int, mb: int, boundary: int,
        direction: Direction, sender: str, tainted: bool,
    ) -> CheckReply:  # fmt: skip
        warmup = step < self.config.warmup
        compression = self.config.compression
        tensor, reference = as_received(tensor, compression), as_received(reference, compression)
        digest = tensor_digest(tensor)
        fields = dict(run_id=self.run, step=step, microbatch=mb, boundary=boundary, direction=direction,
                      sender=sender, tainted=tainted, warmup=warmup, digest=digest,
                      reference_digest=tensor_digest(reference))  # fmt: skip
        meta = {"run": self.run, "step": step, "mb": mb, "boundary": boundary, "direction": int(direction),
                "sender": sender, "tainted": tainted, "warmup": warmup, "trainer": self.identity.public_key,
                "signature": sign_check(self.identity, **fields), "digest": digest,
                "reference_digest": fields["reference_digest"]}  # fmt: skip
        reference_digest = fields["reference_digest"]
        held = self._held.setdefault(peer, OrderedDict())
        response = None
        if self.config.reference_by_digest and reference_digest in held:  # this validator passed it on itself
            try:
                response = await self._call(ValidatorService, peer, "rpc_check", [tensor],
                                            {**meta, "reference_digest": reference_digest})  # fmt: skip
                self.metrics.references_by_digest += 1
            except ReferenceMissing:  # evicted there: send it in full
                held.pop(reference_digest, None)
        if response is None:
            response = await self._call(ValidatorService, peer, "rpc_check", [tensor, reference], meta)
        reply = unpack_meta(response.metadata)
        verdict = verdict_from_meta(reply, "verdict")
        tainted_now = reply.get("tainted") is True
        out = decode_reply_tensor(response, self.spec) if tainted_now and response.tensors else None
        if not tainted_now:
            out = tensor
        if out is not None and out.shape != tensor.shape:
            raise MalformedReply(f"a replacement of shape {tuple(out.shape)} for a tensor of {tuple(tensor.shape)}")
        expected = None if out is None else digest if out is tensor else tensor_digest(out)
        if out is not None and (verdict is None or verdict.digest != expected or verdict.verdict != Verdict.ACCEPT):
            raise TransportError("validator reply carries no matching ACCEPT verdict")
        if out is not None and self.config.reference_by_digest:
            held[expected] = None  # the validator keeps what it passes on: the next boundary can name it
            while len(held) > MAX_HELD_DIGESTS:
                held.popitem(last=False)
        reason = reply.get("reason", "")
        return CheckReply(tainted_now, out, verdict, verdict_from_meta(reply, "taint_verdict"),
                          reason if isinstance(reason, str) else "")  # fmt: skip

    async def _validated(
        self, tensor: torch.Tensor, reference: torch.Tensor, *, boundary: int, **fields
    ) -> CheckReply:  # fmt: skip
        """The check of ``tensor`` at ``boundary`` by one validator, or, with a fan-out K > 1 (``check_fanout``, by
        default the manifest's ban quorum), by K distinct validators at once, each with its own retries on validators
        outside the K. The tensor is tainted if any of them taints it, and the first such reply (its replacement and
        verdicts) is what passes on; each validator learns from and keeps strikes on every tensor it was sent.
        NoRoute only if none answered."""

        async def check(peer: str) -> CheckReply:
            return await self._check(peer, tensor, reference, boundary=boundary, **fields)

        fanout = min(self.config.check_fanout or self.manifest.ban_quorum, len(self.validators.get(boundary, [])))
        if fanout <= 1:
            return (await self._with_retries(lambda ex: self._pick_validator(boundary, ex), check))[1]
        chosen: list[str] = []
        while len(chosen) < fanout and (peer := self._pick_validator(boundary, set(chosen))) is not None:
            chosen.append(peer)
        if not chosen:
            raise NoRoute(f"no validator announced for boundary {boundary}")

        async def one(peer: str) -> CheckReply:  # retries go to validators outside the K
            pick = preferring(peer, lambda ex: self._pick_validator(boundary, ex | set(chosen)))
            return (await self._with_retries(pick, check))[1]

        results = await asyncio.gather(*(one(peer) for peer in chosen), return_exceptions=True)
        replies = []
        for result in results:
            if isinstance(result, asyncio.CancelledError):
                raise result
            if not isinstance(result, BaseException):
                replies.append(result)
        if not replies:
            raise next(r for r in results if isinstance(r, BaseException))
        return next((r for r in replies if r.tainted), replies[0])

    def _trainer_verdict(self, tensor: torch.Tensor, *, step: int, mb: int, boundary: int, direction: Direction):
        return sign_verdict(
            self.identity, run_id=self.run, step=step, microbatch=mb, boundary=boundary, direction=direction,
            verdict=Verdict.ACCEPT, digest=tensor_digest(tensor), caller=self.peer_id,
        )  # fmt: skip

    @property
    def peer_id(self) -> str:
        """This trainer's peer id (the one its verdicts are issued to; "" before ``start``)."""
        return "" if self._p2p is None else self._p2p.peer_id.to_base58()

    def _screen(self, tainted: bool) -> bool:
        """What the mesh passes as ``tainted`` to the validator (see MeshConfig.taint_scope)."""
        return tainted and self.config.taint_scope == "microbatch"

    async def _forward_hop(
        self, k: int, inp: torch.Tensor, inp_verdict: SignedVerdict, *, step: int, mb: int, tainted: bool
    ) -> tuple[str, CheckReply]:
        """Stage ``k``'s forward of ``inp`` on some replica, then a validator's check of its output at boundary k."""
        meta = {"run": self.run, "step": step, "mb": mb, "verdict": inp_verdict.to_tuple()}

        async def timed(p: str) -> tuple[torch.Tensor, float]:
            started = time.monotonic()
            return await self._stage_call(p, "rpc_forward", [inp], meta), time.monotonic() - started

        peer, (out, seconds) = await self._with_retries(self._planned_pick(k, step, mb), timed, self._hedge_delay(k))
        self._latency.setdefault(k, deque(maxlen=32)).append(seconds)
        if not self.config.validate:
            out = as_received(out, self.config.compression)
            return peer, CheckReply(False, out, self._trainer_verdict(out, step=step, mb=mb, boundary=k,
                                                                      direction=Direction.FORWARD))  # fmt: skip
        reply = await self._validated(out, inp, boundary=k, step=step, mb=mb, direction=Direction.FORWARD, sender=peer,
                                      tainted=self._screen(tainted))  # fmt: skip
        return peer, reply

    # ---------------------------------------------------------------------------------------- one micro-batch
    async def microbatch(
        self, step: int, mb: int, batch: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> float | None:
        """Forward and backward of one micro-batch (``batch``, or the sampler's next); gradients accumulate. Returns
        its loss (None if dropped)."""
        await self._maybe_refresh()
        x, y = self.sampler.sample() if batch is None else batch
        self.metrics.microbatches += 1
        emb_out = self.embedding(x)
        h = as_received(emb_out, self.config.compression)
        verdict: SignedVerdict = self._trainer_verdict(h, step=step, mb=mb, boundary=0, direction=Direction.FORWARD)
        tainted = False
        saved: list[tuple[torch.Tensor, SignedVerdict, str, bool]] = []  # (input, its verdict, peer, replaced)
        for k in range(1, self.n_stages + 1):
            inp, inp_verdict = h, verdict
            peer, reply = await self._forward_hop(k, inp, inp_verdict, step=step, mb=mb, tainted=tainted)
            if reply.tensor is None:  # drop mode: the micro-batch stops here
                self.metrics.dropped += 1
                return None
            tainted = tainted or reply.tainted
            saved.append((inp, inp_verdict, peer, reply.tainted))
            h, verdict = reply.tensor, reply.verdict

        h_head = h.clone().requires_grad_(True)
        loss = self.head(h_head, y)
        (loss / self.config.microbatches).backward()
        g = as_received(h_head.grad, self.config.compression)
        g_verdict = self._trainer_verdict(g, step=step, mb=mb, boundary=self.n_stages, direction=Direction.BACKWARD)
        for k in range(self.n_stages, 0, -1):
            inp, inp_verdict, peer, replaced = saved[k - 1]
            if replaced:  # bypassed: the gradient passes straight through; the trainer vouches for it one boundary on
                g_verdict = self._trainer_verdict(g, step=step, mb=mb, boundary=k - 1, direction=Direction.BACKWARD)
                continue
            meta = {"run": self.run, "step": step, "mb": mb, "verdict": inp_verdict.to_tuple(),
                    "grad_verdict": g_verdict.to_tuple()}  # fmt: skip
            # the replica that ran the forward first, then any other
            pick = preferring(peer, lambda ex, k=k: self._pick_stage(k, ex))
            sender, grad_in = await self._with_retries(
                pick, lambda p, inp=inp, g=g, meta=meta: self._stage_call(p, "rpc_backward", [inp, g], meta)
            )
            if not self.config.validate:
                g = as_received(grad_in, self.config.compression)
                g_verdict = self._trainer_verdict(g, step=step, mb=mb, boundary=k - 1, direction=Direction.BACKWARD)
                continue
            reply = await self._validated(grad_in, g, boundary=k - 1, step=step, mb=mb, direction=Direction.BACKWARD,
                                          sender=sender, tainted=self._screen(tainted))  # fmt: skip
            if reply.tensor is None:  # drop mode: upstream stages get nothing from this micro-batch
                self.metrics.dropped += 1
                return float(loss.detach())
            tainted = tainted or reply.tainted
            g, g_verdict = reply.tensor, reply.verdict
        emb_out.backward(g)
        if tainted:
            self.metrics.tainted += 1
        self.metrics.completed += 1
        return float(loss.detach())

    async def evaluate(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], step: int) -> float:
        """Mean loss of forward-only passes of ``batches`` through the swarm, validated like training traffic (no
        backward, no update). ``step`` names the passes in verdicts: use a step after the last trained one."""
        await self._maybe_refresh()
        losses = []
        for mb, (x, y) in enumerate(batches):
            with torch.no_grad():
                h = as_received(self.embedding(x), self.config.compression)
            verdict = self._trainer_verdict(h, step=step, mb=mb, boundary=0, direction=Direction.FORWARD)
            tainted = False
            for k in range(1, self.n_stages + 1):
                _, reply = await self._forward_hop(k, h, verdict, step=step, mb=mb, tainted=tainted)
                if reply.tensor is None:  # drop mode
                    break
                tainted = tainted or reply.tainted
                h, verdict = reply.tensor, reply.verdict
            else:
                with torch.no_grad():
                    losses.append(float(self.head(h, y)))
        return float(np.mean(losses)) if losses else math.nan

    async def step(self, step: int) -> float:
        """One optimizer step of the trainer's own parameters over ``microbatches`` micro-batches; mean loss. A step
        that fails (no replica left for a micro-batch) puts its batches back: the sampler is where it was before the
        step, so the trainer's checkpoint (saved with the step count before it) redoes this step on the same data."""
        self.optimizer.zero_grad(set_to_none=True)
        sampler_state = self.sampler.state_dict()
        try:
            return await self._step(step)
        except BaseException:
            self.sampler.load_state_dict(sampler_state)
            self.optimizer.zero_grad(set_to_none=True)
            raise

    async def _step(self, step: int) -> float:
        completed = self.metrics.completed
        m = self.config.microbatches
        batches = [self.sampler.sample() for _ in range(m)]  # drawn in order: the data does not depend on timing
        if self.config.max_inflight <= 1:
            results = [await self.microbatch(step, step * m + i, batches[i]) for i in range(m)]
        else:
            gate = asyncio.Semaphore(self.config.max_inflight)

            async def one(i: int) -> float | None:
                async with gate:
                    return await self.microbatch(step, step * m + i, batches[i])

            tasks = [asyncio.create_task(one(i)) for i in range(m)]
            try:
                results = await asyncio.gather(*tasks)
            except BaseException:  # a failed micro-batch fails the step: stop the others before raising
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        losses = [loss for loss in results if loss is not None]
        self.metrics.step_completed.append(self.metrics.completed - completed)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        mean = float(np.mean(losses)) if losses else math.nan
        self.metrics.losses.append(mean)
        return mean
