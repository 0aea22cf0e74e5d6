"""A stage server: one untrusted pipeline stage served over hivemind P2P (``rpc_forward`` / ``rpc_backward``, and
``rpc_forward_stream`` / ``rpc_backward_stream`` for tensors over the unary limit: see ``swarm.protocol``).

Pipeline stage ``k`` (1..S) holds blocks ``manifest.layer_spans[k - 1]``. Its input crosses boundary ``k - 1`` and
its output boundary ``k`` (see ``sentinel.validator``). It computes only on inputs that come with a verdict:

* forward: the input ``h`` needs a signed ACCEPT for (run, step, micro-batch, boundary ``k - 1``, forward,
  digest of ``h``) from an authorized validator, or from an authorized trainer when ``k == 1`` (the embeddings);
* backward: the same for ``h``, plus a signed ACCEPT for the gradient ``grad_out`` at (boundary ``k``, backward)
  from a validator or a trainer. Trainers may vouch for a gradient at any boundary because the trainer computes the
  head's gradient itself and re-signs the gradient it routes around a bypassed stage (see ``swarm.trainer``).

Backward is stateless: it recomputes the forward pass from ``h``, so it may go to any replica of the stage. Parameter
gradients accumulate over the backward calls of one trainer step, and AdamW steps as soon as a request of a later
trainer step arrives (the trainer starts a step only when the last one's micro-batches are all done), on
``finish_step`` and at shutdown: one stage update per trainer step, however many of its micro-batches this replica
got (``accumulate`` > 0 also steps after that many calls). A backward of a step this replica has moved past (it
applied that step, or saw a later one: a straggler whose call timed out and was retried elsewhere, or a restarted
trainer redoing steps from its checkpoint) is answered with its input's gradient and not applied
(``backward_stale``): applied, it would count twice, or land alone in a later update.

Data-parallel averaging, robust to a poisoner: every ``average_every`` optimizer steps (0: never) a replica runs, in
the background, one round of pull averaging with the other replicas of its stage. It fetches the parameters of up to
``average_peers`` of the stage's other ONLINE, non-banned replicas (the DHT's view; ``rpc_parameters``, a streamed
reply), and moves to a clipped mean centred on its own parameters (``robust_average``). A round is skipped when the
DHT shows no other such replica; it is bounded by ``average_timeout``; training goes on if it fails (logged). The
replica snapshots its parameters (between computations), averages the snapshot, and adds ``average - snapshot`` to
its parameters, so updates made while the round ran are kept. A peer's parameters are dropped when they do not match
the stage's shapes or are not finite, and when the peer is no longer an ONLINE, non-banned replica once they arrived.
Optimizer moments are not averaged. A replica serves its parameters only to announced replicas of its stage.

Why not all-reduce (hivemind's ``DecentralizedAverager``, used before): it shows each member only the group's sum, so
one member sending arbitrary values (a poisoner not yet banned, or one that never attacks the pipeline at all: the
validators watch activations and gradients, not parameters) moves everyone by ``1/group`` of its choice, and
nothing can tell which member did it. Pulling every member's parameters costs ``average_peers`` times a stage's size
per round instead of about twice, and it lets each replica clip every peer's contribution on its own:

* ``average_clip``: a peer's difference from this replica, per parameter tensor, is clipped in norm to
  ``average_clip x lr x sqrt(size) x steps`` (``steps``: optimizer steps since this replica's previous round, at least
  ``average_every``): what that many AdamW steps (each moves an element by about ``lr``) could move it by,
  ``average_clip`` times over. Honest replicas that started a round interval from the same average stay well inside.
* ``average_spread``: with two or more peers, also to ``average_spread`` times the lower median of the peers'
  distances. The stage's replicas have an honest majority, so that median is an honest replica's distance, and a
  poisoner's pull is bounded by what honest disagreement is, however large the static bound.

With ``n`` peers heard, a poisoner moves this replica by at most ``1 / (n + 1)`` of that radius per round, and honest
peers' parameters are averaged exactly (unclipped, the result is the plain mean of this replica and its peers). A
difference beyond ``average_reject`` (10) x the static bound is left out of its tensor's mean instead of clipped in
(where no majority tells whom to believe, a 2-replica stage, a clipped pull still moved the honest replica half the
bound towards a poisoner every round). A steady poisoner would still drag a replica round after round, so a peer
clipped (or left out) on most of its tensors in ``average_distrust`` (3) consecutive rounds is not heard for the next
``average_distrust_rounds`` (20). A replica that finds every one of 2 or more peers that far, and they agree, is the
one left behind: it takes their ``consensus_parameters``.

Joining: a replica that starts announces itself JOINING (trainers route only to ONLINE replicas), takes its stage's
``consensus_parameters`` from the ONLINE replicas (``sync_now``: the element-wise median of 3 or more, the mean of 2
that agree, never one peer's word), then announces ONLINE (``sync_on_join``; resumed from a checkpoint or not).

The announcement (``StageAnnouncement`` in the DHT, key ``stage.{k - 1}``: the DHT numbers stages from 0 like
``manifest.layer_spans``) is refreshed every ``announce_period`` seconds and set OFFLINE on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator  # noqa: UP035 (ServicerBase detects stream handlers by typing's AsyncIterator only)

import torch
from hivemind import DHT
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time

from sentinel.attacks import MaliciousBehaviour
from swarm.dht_schema import fetch_banned, fetch_view, publish_stage
from swarm.identity import Identity
from swarm.lifetime import run_every
from swarm.model import ModelConfig, Stage, resolve_config, resolve_device
from swarm.protocol import (
    BadRequest,
    Busy,
    ProtocolError,
    StreamSlots,
    TensorSpec,
    Unauthorized,
    answer_stream,
    call,
    call_reply_stream,
    check_unary_reply,
    check_unary_request,
    decode_hidden,
    decode_parameters,
    encode_tensors,
    error_response,
    linger,
    meta_int,
    meta_str,
    meta_verdict,
    pack_meta,
    receive_stream,
    reply_parts,
    request_tensors,
    unpack_meta,
)
from swarm.records import (
    Direction,
    InputRejected,
    Manifest,
    StageAnnouncement,
    StageState,
    check_verdict,
    tensor_digest,
)
from swarm.state import load_state_file, save_state_file

logger = logging.getLogger(__name__)

ENLIST_TIMEOUT = 10.0  # seconds a validator has to answer an enlist request
MAX_ENLIST = 16  # validators asked at once
MAX_UNLISTED_PEERS = 64  # announced replicas that no validator's directory lists, taken into a view of the stage


def manifest_model_config(manifest: Manifest) -> ModelConfig:
    """The model every node of the run builds: the manifest's preset with n_layers from its layer spans."""
    return resolve_config(manifest.preset, manifest.n_stages, n_layers=manifest.layer_spans[-1][1])


def rpc_namespace(run_id: str) -> str:
    """Handlers of one run live under their own protocol names, so two runs on one peer cannot mix requests."""
    return f"sentinel.{run_id}"


async def remove_rpc_handlers(servicer: ServicerBase, p2p: P2P, run_id: str) -> bool:
    """Unregister ``servicer``'s handlers of the run from ``p2p``. False (and a warning) when the p2p daemon is
    already gone, e.g. its DHT process died: there is nothing left to unregister, and the caller's shutdown must go on
    (save its state, stop its threads) rather than fail."""
    try:
        await servicer.remove_p2p_handlers(p2p, namespace=rpc_namespace(run_id))
        return True
    except (OSError, ConnectionError) as e:  # ConnectionRefusedError / FileNotFoundError on the daemon's socket
        logger.warning("p2p daemon unreachable while removing %s's handlers (%s); continuing the shutdown",
                       type(servicer).__name__, e)  # fmt: skip
        return False


@dataclass
class StageServerConfig:
    stage: int  # 1..S
    seed: int = 0  # model init seed, the same on every node of the run
    lr: float = 3e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    accumulate: int = 0  # also step after this many backward calls of one trainer step (0: only on the trainer's next
    # step; a value below the micro-batches a replica gets per step splits each trainer step into several updates)
    max_batch: int = 64
    device: str = "cpu"  # or "auto" (CUDA when present), "cuda", "cuda:1", ...; `join` defaults to "auto"
    compression: int = runtime_pb2.CompressionType.NONE
    announce_period: float = 10.0  # seconds; the record expires after 2 periods
    replay_window: int = 4096  # backward requests remembered by (step, micro-batch) so that a second backward of
    # one micro-batch is not applied twice: it would count double. It is still answered, with the input's gradient
    # computed without touching the parameters' (idempotent): an exact replay, or a restarted trainer's redo of the
    # step it crashed in (other tensors, if its weights moved; the same micro-batch of data all the same). Backward
    # calls of steps this replica has moved past are answered and not applied in any case (module docstring)
    trust_trainer: bool = False  # accept a trainer's verdict on a forward input at every boundary (only for
    # benchmarks of a swarm without validators, TrainerConfig.validate=False; by default only stage 1 accepts it)
    average_every: int = 4  # optimizer steps between parameter-averaging rounds with the other replicas (0: off)
    average_timeout: float = 30.0  # seconds a round may take (fetching the peers' parameters)
    average_peers: int = 8  # at most this many other replicas, chosen at random, are heard per round
    max_streams: int = 8  # streamed requests in hand at once; one more is refused with Busy (memory bound)
    # each peer's difference from this replica, per parameter tensor, is clipped in norm to average_clip x lr x
    # sqrt(its size) x the optimizer steps since this replica's previous round (at least average_every): what that
    # many AdamW steps, which move an element by about lr each, can move it by, average_clip times over (0: no bound)
    average_clip: float = 3.0
    # with 2 or more peers, also to average_spread x the lower median of the peers' distances (0: no such bound)
    average_spread: float = 2.0
    # a peer's difference longer than average_reject x the average_clip bound is left out of that tensor's mean
    # altogether instead of clipped into it: no honest replica that averages with its stage is that far (one that
    # joined late takes the stage's parameters on joining), and with no honest majority to tell whom to believe (a
    # 2-replica stage) a clipped pull still moved an honest replica by half the bound towards a poisoner (0: never)
    average_reject: float = 10.0
    # a peer whose contribution was clipped on more than half its tensors in this many consecutive rounds is not heard
    # for the next average_distrust_rounds rounds of this replica (0: always heard)
    average_distrust: int = 3
    average_distrust_rounds: int = 20
    # on start, a replica announces itself JOINING and takes its stage's current parameters from the other ONLINE,
    # non-banned replicas before it serves (``sync_now``): a volunteer joining a running swarm, or one restarting
    # from an old checkpoint, then serves the trained stage at once instead of its initial (or stale) weights
    sync_on_join: bool = True
    # once serving, and every announce_period, ask the validators of its outputs to list this replica in their
    # directories (``enlist``; they probe it first): how a replica is found while strangers fill its stage's
    # announcement key (``ReplicaDirectory``)
    enlist: bool = True
    attack_averaging: float = 0.0  # RED-TEAM, for testing only: serve the other replicas this many times this
    # replica's parameters (0: honest); what it computes and sends down the pipeline stays honest

    def __post_init__(self) -> None:
        if self.stage < 1 or self.accumulate < 0 or self.max_batch < 1 or self.announce_period <= 0:
            raise ValueError("stage and max_batch must be >= 1, accumulate >= 0 and announce_period > 0")
        if self.average_every < 0 or self.average_timeout <= 0 or self.average_peers < 1:
            raise ValueError("average_every must be >= 0, average_timeout > 0 and average_peers >= 1")
        if self.max_streams < 1:
            raise ValueError("max_streams must be >= 1")
        if min(self.average_clip, self.average_spread, self.average_distrust, self.average_reject) < 0:
            raise ValueError("average_clip, average_spread, average_reject and average_distrust must be >= 0")
        if self.average_distrust_rounds < 1:
            raise ValueError("average_distrust_rounds must be >= 1")
        if not math.isfinite(self.attack_averaging):
            raise ValueError("attack_averaging must be finite")


class StageServer(ServicerBase):
    """Serves one stage. ``await start(dht)`` attaches to the DHT's p2pd; ``await shutdown()`` detaches (the DHT
    stays up: whoever created it closes it)."""

    def __init__(
        self,
        config: StageServerConfig,
        manifest: Manifest,
        identity: Identity,
        *,
        attack: MaliciousBehaviour | None = None,
    ):
        if not 1 <= config.stage <= manifest.n_stages:
            raise ValueError(f"stage must be in 1..{manifest.n_stages}")
        self.config = config
        self.manifest = manifest
        self.identity = identity
        self.attack = attack
        self.model_config = manifest_model_config(manifest)
        self.device = resolve_device(config.device)
        start, end = manifest.layer_spans[config.stage - 1]
        self.span = (start, end)
        self.module = Stage(self.model_config, start, end, seed=config.seed).to(self.device)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.spec = TensorSpec(self.model_config.d_model, self.model_config.seq_len, config.max_batch)
        self.forward_calls = 0
        self.backward_calls = 0
        self.backward_replays = 0  # backward requests answered without an update: their (step, micro-batch) was seen
        self.backward_stale = 0  # ... and of a step this replica had moved past (see the module's docstring)
        self.optimizer_steps = 0
        self._pending_step: int | None = None  # trainer step of the gradients accumulated and not yet applied
        self._pending_calls = 0
        self._applied_step = -1  # the latest trainer step whose gradients went into the weights
        self._forward_step = -1  # the latest trainer step of a forward computed here
        self._stopped = False
        self.rejected: dict[str, int] = {}
        self.stream_calls: Counter[str] = Counter()  # "forward" / "backward" requests that came streamed
        self.streams = StreamSlots(config.max_streams)
        self.seconds_ema: float | None = None  # seconds per forward+backward of one micro-batch
        self._seen_backward: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage{config.stage}")  # serial
        self._dht: DHT | None = None
        self._p2p: P2P | None = None
        self._announcer: asyncio.Task | None = None
        self._enlisting: asyncio.Task | None = None
        self._listed: set[str] = set()  # the replicas of this stage the validators' directories listed, last read
        self._serving = False
        self._averaging: asyncio.Task | None = None
        self._average_lock = asyncio.Lock()
        self._next_average = config.average_every
        # rounds applied, skipped (no other replica), failed (no peer answered usably); peers' parameters rejected
        # (wrong shapes, not finite, or the peer left or was banned meanwhile); (peer, tensor) contributions clipped
        # distrusted: times a peer was left out for being clipped on most of its tensors round after round
        # left out: (peer, tensor) contributions too far to be clipped in (average_reject); resynced: rounds in which
        # every peer heard was that far from this replica, and it took their consensus instead (see _average_round)
        self.averaging = {"rounds": 0, "skipped": 0, "failed": 0, "rejected": 0, "clipped": 0, "left_out": 0,
                          "distrusted": 0, "resynced": 0}  # fmt: skip
        # what sync_now did on start: None (not tried), or {"peers": replicas heard, "synced": whether their
        # parameters were taken, "reason": why not, "change": largest relative change of a parameter tensor}
        self.sync: dict | None = None
        self._heavy_clips: dict[str, int] = {}  # peer -> consecutive rounds with most of its tensors clipped
        self._unheard: dict[str, int] = {}  # peer -> rounds of this replica left before it is heard again
        self._served: tuple[int, list] | None = None  # (version, encoded parameters) last served to a peer
        self._version = 0  # bumped whenever the parameters change (optimizer step, applied average, load)
        self._peer_view: tuple[float, set[str]] = (-math.inf, set())  # (time, stage peers) for rpc_parameters
        self._peer_view_lock = asyncio.Lock()
        self._serve_lock = asyncio.Lock()
        self._rng = random.Random()
        self._steps_at_round = 0  # optimizer steps when the last round was applied (or the state loaded)

    # ----------------------------------------------------------------------------------------------- lifecycle
    @property
    def peer_id(self) -> str:
        if self._p2p is None:
            raise RuntimeError("server not started")
        return self._p2p.peer_id.to_base58()

    async def start(self, dht: DHT) -> None:
        self._dht = dht
        self._p2p = await dht.replicate_p2p()
        await self.add_p2p_handlers(self._p2p, namespace=rpc_namespace(self.manifest.run_id))
        self._serving = True
        if self.config.sync_on_join:
            await self.announce(StageState.JOINING)  # the other replicas serve their parameters to it; no trainer
            await self.sync_now()  # routes to it yet
        await self.announce(StageState.ONLINE)
        self._announcer = asyncio.create_task(self._announce_loop())
        self._enlisting = asyncio.create_task(self._enlist_quietly()) if self.config.enlist else None

    async def shutdown(self) -> None:
        for task in (self._announcer, self._enlisting):
            if task is not None:
                task.cancel()
        self._announcer = self._enlisting = None
        if self._averaging is not None:
            self._averaging.cancel()
            await asyncio.gather(self._averaging, return_exceptions=True)
            self._averaging = None
        if self._p2p is not None:
            try:
                if self._serving:
                    self._serving = False
                    await self.announce(StageState.OFFLINE)
                    await remove_rpc_handlers(self, self._p2p, self.manifest.run_id)
            finally:
                self._p2p = None  # the DHT's shared replica (dht.replicate_p2p caches it): not ours to close
        if not self._stopped:  # shutdown may be called twice (a test's kill, then the swarm's stop)
            self._stopped = True
            await self.finish_step()  # the last step's gradients go into the weights (and the state saved after)
            self._executor.shutdown(wait=True)

    @property
    def throughput(self) -> float:
        """Micro-batches (forward + backward) per second; 0 until measured (trainers then weigh it as a typical
        replica)."""
        return 0.0 if not self.seconds_ema else 1.0 / self.seconds_ema

    def announcement(self, state: StageState) -> StageAnnouncement:
        return StageAnnouncement(
            self.manifest.run_id, self.config.stage - 1, self.peer_id, state, self.span, self.throughput,
            self.identity.public_key,
        )  # fmt: skip

    async def announce(self, state: StageState) -> bool:
        if self._dht is None:
            return False
        expiration = get_dht_time() + 2 * self.config.announce_period
        return await asyncio.to_thread(publish_stage, self._dht, self.identity, self.announcement(state), expiration)

    async def _announce_loop(self) -> None:
        """Announce ONLINE every ``announce_period`` seconds, start to start (``run_every``: a slow store does not
        push the next one past the record's lifetime), and enlist beside it."""
        await run_every(self.config.announce_period, self._announce_round, f"stage {self.config.stage}: announce",
                        logger)  # fmt: skip

    async def _announce_round(self) -> None:
        if self.config.enlist and (self._enlisting is None or self._enlisting.done()):
            self._enlisting = asyncio.create_task(self._enlist_quietly())  # beside: announcing must not wait
        await self.announce(StageState.ONLINE)

    async def _enlist_quietly(self) -> None:
        try:
            await self.enlist()
        except Exception as e:  # noqa: BLE001 - the next period asks again
            logger.warning(f"stage {self.config.stage}: enlisting failed: {type(e).__name__}: {e}")

    async def enlist(self) -> dict[str, bool | None]:
        """Ask the validators that check this stage's outputs (boundary ``stage``; their announcements' key only the
        manifest's validators may write) to list this replica in their directories: a replica no trainer has routed
        to yet is in none, and while strangers fill the stage's announcement key it could not be found at all
        (``ReplicaDirectory``). Each validator probes it in turn (``ValidatorService.probe_candidates``). Returns
        {validator peer: listed already (None: no answer)}."""
        from swarm.validator_service import ValidatorService  # (it imports this module)

        if self._dht is None or self._p2p is None:
            return {}
        run, boundary = self.manifest.run_id, self.config.stage
        view = await asyncio.to_thread(fetch_view, self._dht, run, (), [boundary])
        peers = sorted({a.peer for a in view.validators[boundary] if self.manifest.is_validator(a.validator)})
        meta = {"run": run, "stage": self.config.stage - 1}

        async def ask(peer: str) -> bool | None:
            stub = ValidatorService.get_stub(self._p2p, PeerID.from_base58(peer), namespace=rpc_namespace(run))
            try:
                response = await call(stub.rpc_enlist, runtime_pb2.ExpertRequest(metadata=pack_meta(meta)),
                                      ENLIST_TIMEOUT)  # fmt: skip
                return unpack_meta(response.metadata).get("listed") is True
            except Exception as e:  # noqa: BLE001 - a validator down or refusing: the next period asks again
                logger.debug(f"stage {self.config.stage}: enlisting with {peer} failed: {type(e).__name__}: {e}")
                return None

        return dict(zip(peers, await asyncio.gather(*(ask(p) for p in peers[:MAX_ENLIST]))))

    # ------------------------------------------------------------------------------------------------ handlers
    async def rpc_forward(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        return await self._serve("forward", request, context.remote_id.to_base58())

    async def rpc_backward(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        return await self._serve("backward", request, context.remote_id.to_base58())

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for part in answer_stream(requests, partial(self._serve, "forward",
                                                          caller=context.remote_id.to_base58())):  # fmt: skip
            yield part

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for part in answer_stream(requests, partial(self._serve, "backward",
                                                          caller=context.remote_id.to_base58())):  # fmt: skip
            yield part

    async def _serve(
        self,
        kind: str,
        request: runtime_pb2.ExpertRequest | AsyncIterator[runtime_pb2.ExpertRequest],
        caller: str | None = None,
    ) -> runtime_pb2.ExpertResponse:
        """Both paths: a unary request, or the parts of a streamed one (reassembled within the stage's bounds, then
        handled by the same code). Every error becomes the typed error reply. ``caller``: the requesting peer's id,
        which every verdict must have been issued to (the RPC handlers pass it; None, in-process only: not checked)."""
        unary = isinstance(request, runtime_pb2.ExpertRequest)
        try:
            if unary:
                check_unary_request(request)
                return await self._handle(kind, request, unary=True, caller=caller)
            self.stream_calls[kind] += 1
            with self.streams.take():
                request = await receive_stream(request, max_tensors=1 if kind == "forward" else 2, spec=self.spec,
                                               authorize=partial(self._authorize, kind, caller))  # fmt: skip
                return await self._handle(kind, request, unary=False, caller=caller)
        except Busy as e:
            logger.debug(f"stage {self.config.stage}: {kind} refused: {e}")
            return error_response(e)
        except (BadRequest, InputRejected) as e:
            self.rejected[e.code] = self.rejected.get(e.code, 0) + 1
            logger.debug(f"stage {self.config.stage}: {kind} rejected ({e.code}): {e}")
            return error_response(e)
        except Exception as e:
            logger.exception(f"stage {self.config.stage}: {kind} failed")
            return error_response(e)

    async def _handle(self, kind: str, request: runtime_pb2.ExpertRequest, *, unary: bool, caller: str | None):
        if kind == "forward":
            return await self._forward(request, unary=unary, caller=caller)
        return await self._backward(request, unary=unary, caller=caller)

    def _authorize(self, kind: str, caller: str | None, meta: dict) -> None:
        """A streamed request's verdicts, checked on its first part (all but the digests: the tensors are still to
        come, and are checked in full once in): a stranger, or a peer presenting verdicts issued to another, cannot
        hold a stream slot."""
        self._check_verdict(meta, Direction.FORWARD, None, caller)
        if kind == "backward":
            self._check_verdict(meta, Direction.BACKWARD, None, caller)

    @staticmethod
    def _position(meta: dict) -> tuple[str, int, int]:
        return meta_str(meta, "run", max_len=64), meta_int(meta, "step"), meta_int(meta, "mb")

    def _check_verdict(self, meta: dict, direction: Direction, digest: bytes | None, caller: str | None) -> None:
        """The verdict on this stage's input (FORWARD: boundary ``stage - 1``, ``verdict``) or on the gradient it got
        (BACKWARD: boundary ``stage``, ``grad_verdict``) at the request's (run, step, micro-batch), issued to
        ``caller``; ``digest`` None: all but the digest (the tensor is still to come)."""
        run, step, mb = self._position(meta)
        forward = direction == Direction.FORWARD
        check_verdict(
            meta_verdict(meta, "verdict" if forward else "grad_verdict"), manifest=self.manifest, run_id=run,
            step=step, microbatch=mb, boundary=self.config.stage - 1 if forward else self.config.stage,
            direction=direction, digest=digest,
            allow_trainer=not forward or self.config.stage == 1 or self.config.trust_trainer, caller=caller,
        )  # fmt: skip

    def _checked_input(
        self, meta: dict, proto: runtime_pb2.Tensor, caller: str | None
    ) -> tuple[int, int, torch.Tensor]:
        _, step, mb = self._position(meta)
        h = decode_hidden(proto, self.spec, "input")
        self._check_verdict(meta, Direction.FORWARD, tensor_digest(h), caller)
        return step, mb, h

    async def _forward(
        self, request: runtime_pb2.ExpertRequest, *, unary: bool, caller: str | None = None
    ) -> runtime_pb2.ExpertResponse:
        meta = unpack_meta(request.metadata)
        (proto,) = request_tensors(request, 1)
        step, mb, h = self._checked_input(meta, proto, caller)
        if unary:
            check_unary_reply(h.numel(), self.config.compression)
        self.forward_calls += 1
        out = await self._run(self._compute_forward, h, step)
        out = self._send(out, step, mb, "forward")
        return runtime_pb2.ExpertResponse(tensors=encode_tensors([out], self.config.compression))

    async def _backward(
        self, request: runtime_pb2.ExpertRequest, *, unary: bool, caller: str | None = None
    ) -> runtime_pb2.ExpertResponse:
        meta = unpack_meta(request.metadata)
        h_proto, g_proto = request_tensors(request, 2)
        step, mb, h = self._checked_input(meta, h_proto, caller)
        g = decode_hidden(g_proto, self.spec, "grad_output")
        if g.shape != h.shape:
            raise BadRequest("grad_output must have the input's shape")
        if unary:
            check_unary_reply(h.numel(), self.config.compression)
        self._check_verdict(meta, Direction.BACKWARD, tensor_digest(g), caller)
        seen = (step, mb)
        if seen in self._seen_backward:  # a micro-batch's gradient applied twice would count double: answer it only
            self.backward_replays += 1
            grad_in = await self._run(self._compute_input_grad, h, g)
        else:
            self._seen_backward[seen] = None
            while len(self._seen_backward) > self.config.replay_window:
                self._seen_backward.popitem(last=False)
            grad_in, applied = await self._run(self._compute_backward, h, g, step)
            if applied:
                self._maybe_average()
        grad_in = self._send(grad_in, step, mb, "backward")
        return runtime_pb2.ExpertResponse(tensors=encode_tensors([grad_in], self.config.compression))

    def _send(self, tensor: torch.Tensor, step: int, mb: int, direction: str) -> torch.Tensor:
        """Red-team hook: a malicious server corrupts what it sends (computed honestly first)."""
        if self.attack is None:
            return tensor
        return self.attack.apply(tensor, step=step, microbatch=mb, direction=direction)

    # ------------------------------------------------------------------------------------------------- compute
    async def _run(self, fn, *args) -> torch.Tensor:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _compute_forward(self, h: torch.Tensor, step: int) -> torch.Tensor:
        start = time.perf_counter()
        if self._pending_step is not None and step > self._pending_step:
            self._apply_pending()  # the trainer moved on: the last step's gradients are all in
        self._forward_step = max(self._forward_step, step)
        with torch.no_grad():
            out = self.module(h.to(self.device, torch.float32))
        self._timed(time.perf_counter() - start)
        return out.to("cpu")

    def _compute_backward(self, h: torch.Tensor, g: torch.Tensor, step: int) -> tuple[torch.Tensor, bool]:
        """The input's gradient, and whether the parameters' gradients were taken into the pending update (False for
        a backward of a step this replica has moved past: see the module's docstring)."""
        if step <= self._applied_step or step < self._forward_step or (
            self._pending_step is not None and step < self._pending_step
        ):
            self.backward_stale += 1
            if self.backward_stale == 1 or self.backward_stale % 100 == 0:
                logger.info(f"stage {self.config.stage}: a backward of step {step} arrived after this replica moved "
                            f"past it (applied step {self._applied_step}); answered, not applied "
                            f"({self.backward_stale} so far)")  # fmt: skip
            return self._compute_input_grad(h, g), False
        start = time.perf_counter()
        if self._pending_step is not None and step != self._pending_step:
            self._apply_pending()  # the gradients of an earlier trainer step
        x = h.to(self.device, torch.float32).requires_grad_(True)
        out = self.module(x)
        torch.autograd.backward(out, g.to(self.device, out.dtype))
        self.backward_calls += 1
        self._pending_step = step
        self._pending_calls += 1
        if 0 < self.config.accumulate <= self._pending_calls:
            self._optimizer_step()  # the step stays open: its later micro-batches still count
            self._pending_calls = 0
        self._timed(time.perf_counter() - start)
        return x.grad.to("cpu"), True

    def _compute_input_grad(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The gradient of the stage's input only, for a replayed backward: the parameters' gradients, the pending
        update and the step bookkeeping are left as they are."""
        x = h.to(self.device, torch.float32).requires_grad_(True)
        out = self.module(x)
        (grad,) = torch.autograd.grad(out, x, g.to(self.device, out.dtype))
        return grad.to("cpu")

    async def finish_step(self) -> None:
        """Apply the gradients accumulated so far now (normally done when the trainer's next step arrives)."""
        await self._run(self._apply_pending)

    def _apply_pending(self) -> None:
        """One optimizer step on the gradients accumulated so far (none: nothing to do).

        Steps follow the trainer's: as soon as a request of a later trainer step arrives (or after ``accumulate``
        backward calls, when set). Counting calls alone, a replica bypassed in some micro-batches of a step (its
        output replaced by a validator) would from then on split every later step's micro-batches across two
        updates."""
        if self._pending_calls:
            self._optimizer_step()
        if self._pending_step is not None:
            self._applied_step = max(self._applied_step, self._pending_step)
        self._pending_step, self._pending_calls = None, 0

    def _optimizer_step(self) -> None:
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        self._version += 1

    def _timed(self, seconds: float) -> None:
        self.seconds_ema = seconds if self.seconds_ema is None else 0.9 * self.seconds_ema + 0.1 * seconds

    # ----------------------------------------------------------------------------------------------- averaging
    async def rpc_parameters(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """This replica's parameters, in ``module.parameters()`` order, for another replica's averaging round:
        streamed (a stage's parameters exceed a unary message), and only to announced, non-banned replicas of this
        stage (``Unauthorized`` otherwise)."""
        for part in reply_parts(await self._serve_parameters(request, context)):
            yield part
        await linger()

    async def _serve_parameters(self, request: runtime_pb2.ExpertRequest, context: P2PContext):
        try:
            if request.tensors:
                raise BadRequest("a parameters request carries no tensors")
            meta = unpack_meta(request.metadata)
            run, stage = meta_str(meta, "run", max_len=64), meta_int(meta, "stage")
            if run != self.manifest.run_id or stage != self.config.stage:
                raise BadRequest(f"this peer serves stage {self.config.stage} of another run, or another stage")
            if not await self._is_stage_peer(context.remote_id.to_base58()):
                raise Unauthorized("parameters are served only to the announced, non-banned replicas of this stage")
            return runtime_pb2.ExpertResponse(tensors=await self._encoded_parameters())
        except ProtocolError as e:
            logger.debug(f"stage {self.config.stage}: parameters request refused ({e.code}): {e}")
            return error_response(e)
        except Exception as e:
            logger.exception(f"stage {self.config.stage}: parameters request failed")
            return error_response(e)

    async def _encoded_parameters(self) -> list[runtime_pb2.Tensor]:
        """The current parameters, serialized once per version (several peers of a round ask at about once)."""
        async with self._serve_lock:  # concurrent requests share one snapshot and one encoding
            if self._served is None or self._served[0] != self._version:
                version, snapshot = await self._run(self._versioned_snapshot)
                if self.config.attack_averaging:  # red team: a poisoner's parameters
                    snapshot = [t * self.config.attack_averaging for t in snapshot]
                self._served = (version, encode_tensors(snapshot))
            return self._served[1]

    def _versioned_snapshot(self) -> tuple[int, list[torch.Tensor]]:
        return self._version, self._snapshot()

    async def _is_stage_peer(self, peer: str) -> bool:
        """Whether ``peer`` is an announced ONLINE or JOINING, non-banned replica of this stage. The DHT's view is
        cached for a few seconds (at most one lookup a second for an unknown peer)."""
        async with self._peer_view_lock:  # the peers of a round ask at about once: one DHT lookup serves them all
            seen, peers = self._peer_view
            age = time.monotonic() - seen
            if age > min(5.0, self.config.announce_period) or (peer not in peers and age > 1.0):
                peers = await self._stage_peers(joining=True, keep=peer)
                self._peer_view = (time.monotonic(), peers)
        return peer in peers

    def _maybe_average(self) -> None:
        if self.config.average_every <= 0 or self.optimizer_steps < self._next_average:
            return
        if self._averaging is not None and not self._averaging.done():
            return  # the previous round is still running: this one is skipped
        self._next_average = self.optimizer_steps + self.config.average_every
        self._averaging = asyncio.create_task(self.average_now())

    def _choose(self, peers: list[str], n: int) -> list[str]:
        """Up to ``n`` of ``peers`` at random, those the validators' directories list first (replicas whose outputs
        a validator accepted lately, or whose probe passed), then the others: anyone may announce a replica."""
        listed = [p for p in peers if p in self._listed]
        rest = [p for p in peers if p not in self._listed]
        chosen = self._rng.sample(listed, min(len(listed), n))
        return chosen + self._rng.sample(rest, min(len(rest), n - len(chosen)))

    async def _stage_peers(self, *, joining: bool = False, keep: str | None = None) -> set[str]:
        """Other ONLINE (and, with ``joining``, JOINING) replicas of this stage that no quorum of validators has
        banned (from the DHT), and those the validators' directories list (``ReplicaDirectory``: the announcements'
        key can be filled by anyone until it reads as nothing). Of the announced replicas that no directory lists, at
        most ``MAX_UNLISTED_PEERS`` drawn at random, and ``keep`` (a peer asking for parameters) whatever the draw:
        a replica whose DHT node holds a key filled with 20 000 strangers' announcements read them all, checked each
        for bans (33 s) and, joining, tried to take parameters from strangers that never answer (93 s, and it served
        its own); ``_choose`` prefers the listed ones."""
        dht, run, me = self._dht, self.manifest.run_id, self.peer_id
        states = (StageState.ONLINE, StageState.JOINING) if joining else (StageState.ONLINE,)

        def read() -> set[str]:
            view = fetch_view(dht, run, [self.config.stage - 1])
            announced = view.stages[self.config.stage - 1]
            peers = {a.peer for a in announced if a.state in states}
            listed = {p for d in view.directories[self.config.stage - 1] for p in d.peers}
            self._listed = listed
            unlisted = sorted(peers - listed - {me, keep})
            if len(unlisted) > MAX_UNLISTED_PEERS:  # strangers filling the key (a node holding it reads them all)
                peers -= set(unlisted) - set(random.sample(unlisted, MAX_UNLISTED_PEERS))
            peers |= listed - {a.peer for a in announced}  # only where no announcement was read (as the trainer)
            peers.discard(me)
            return peers - fetch_banned(dht, self.manifest, peers)

        return await asyncio.to_thread(read)

    async def sync_now(self) -> bool:
        """Take the stage's current parameters from its other ONLINE, non-banned replicas, as a joining replica does
        before it serves (``StageServerConfig.sync_on_join``): up to ``average_peers`` of them are heard, and their
        ``consensus_parameters`` replace this replica's (its optimizer state stays). True if taken. Never raises
        (except on cancellation): without a consensus the replica keeps its own parameters, and averaging brings it
        closer round by round. ``self.sync`` records what happened."""
        stage, c = self.config.stage, self.config
        self.sync = {"peers": 0, "synced": False, "reason": "", "change": 0.0}
        try:
            peers = sorted(await self._stage_peers())
            if not peers:
                self.sync["reason"] = "no other replica online"
                logger.info(f"stage {stage}: no other replica to take parameters from: serving its own")
                return False
            chosen = self._choose(peers, c.average_peers)
            snapshot = await self._run(self._snapshot)
            heard: dict[str, list[torch.Tensor]] = {}
            for attempt in range(2):  # a peer may not have seen this replica's JOINING announcement yet (its view
                wanted = [p for p in chosen if p not in heard]  # of the stage is cached for about a second)
                fetched = await asyncio.gather(*(self._fetch_parameters(p, snapshot) for p in wanted),
                                               return_exceptions=True)  # fmt: skip
                refused = False
                for peer, result in zip(wanted, fetched):
                    if isinstance(result, asyncio.CancelledError):
                        raise result
                    if isinstance(result, BaseException):
                        refused = refused or isinstance(result, Unauthorized)
                        if attempt or not isinstance(result, Unauthorized):
                            logger.warning(f"stage {stage}: no usable parameters from {peer} to join with: "
                                           f"{type(result).__name__}: {result}")  # fmt: skip
                    else:
                        heard[peer] = result
                if not refused or attempt:
                    break
                await asyncio.sleep(1.5)
            for peer in set(heard) - await self._stage_peers():  # banned, or gone, meanwhile
                del heard[peer]
            self.sync["peers"] = len(heard)
            self.sync["from"] = sorted(heard)
            taken, reason = consensus_parameters(list(heard.values()), self._agreement_bounds(snapshot))
            if taken is None:
                self.sync["reason"] = reason
                level = logging.WARNING if len(heard) >= 2 else logging.INFO  # >= 2 heard: they disagree
                logger.log(level, f"stage {stage}: kept its own parameters on joining: {reason}")
                return False
            change = max(float(torch.linalg.vector_norm(t - s) / max(float(torch.linalg.vector_norm(s)), 1e-12))
                         for t, s in zip(taken, snapshot))  # fmt: skip
            await self._run(self._take_parameters, taken)
            self.sync.update(synced=True, change=change, reason=reason)
            logger.info(f"stage {stage}: took the parameters of {len(heard)} replica(s) on joining "
                        f"({reason}; largest relative change of a tensor {change:.3g})")  # fmt: skip
            return True
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.sync["reason"] = f"{type(e).__name__}: {e}"
            logger.warning(f"stage {stage}: could not take its peers' parameters: {type(e).__name__}: {e}")
            return False

    def _agreement_bounds(self, snapshot: list[torch.Tensor]) -> list[float]:
        """Per tensor, how far two honest replicas of this stage may be apart: each moved for ``average_every``
        optimizer steps since their last common average, ``average_clip`` x lr x sqrt(size) per step at most."""
        radius = 2 * max(self.config.average_clip, 1.0) * self.config.lr * max(self.config.average_every, 1)
        return [radius * math.sqrt(t.numel()) for t in snapshot]

    async def average_now(self) -> bool:
        """One averaging round with the stage's other replicas; True if the average was applied. Never raises
        (except on cancellation): a failed round is logged and counted, and training goes on."""
        if self._p2p is None or self._dht is None:
            return False
        async with self._average_lock:
            try:
                return await self._average_round()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.averaging["failed"] += 1
                logger.warning(f"stage {self.config.stage}: averaging failed: {type(e).__name__}: {e}")
                return False

    async def _average_round(self) -> bool:
        stage, c = self.config.stage, self.config
        self._unheard = {peer: left - 1 for peer, left in self._unheard.items() if left > 1}
        peers = sorted(await self._stage_peers() - set(self._unheard))
        if not peers:
            self.averaging["skipped"] += 1
            logger.debug(f"stage {stage}: no other replica to average with")
            return False
        chosen = self._choose(peers, c.average_peers)
        snapshot = await self._run(self._snapshot)
        fetched = await asyncio.gather(*(self._fetch_parameters(peer, snapshot) for peer in chosen),
                                       return_exceptions=True)  # fmt: skip
        heard: dict[str, list[torch.Tensor]] = {}
        for peer, result in zip(chosen, fetched):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                self.averaging["rejected"] += 1
                logger.warning(f"stage {stage}: no usable parameters from {peer}: {type(result).__name__}: {result}")
            else:
                heard[peer] = result
        left = set(heard) - await self._stage_peers()  # banned, or no longer an ONLINE replica, while the round ran
        for peer in left:
            del heard[peer]
            self.averaging["rejected"] += 1
        if left:
            logger.warning(f"stage {stage}: parameters of {sorted(left)} dropped: banned, or no longer ONLINE "
                           "replicas of this stage")  # fmt: skip
        if not heard:
            self.averaging["failed"] += 1
            logger.warning(f"stage {stage}: averaging round heard no usable peer within {c.average_timeout} s")
            return False
        averaged, clipped, left_out = robust_average(snapshot, list(heard.values()), self._clip_bounds(snapshot),
                                                     c.average_spread, reject=c.average_reject)  # fmt: skip
        n = len(snapshot)
        if len(heard) >= 2 and all(2 * k > n for k in left_out):
            # every peer is too far to be averaged with: this replica is the one left behind (a long partition, say)
            # or the peers collude; if they agree among themselves, take their consensus, as on joining
            taken, reason = consensus_parameters(list(heard.values()), self._agreement_bounds(snapshot))
            if taken is not None:
                await self._run(self._apply_average, snapshot, taken)  # keeps updates made while the round ran
                self.averaging["resynced"] += 1
                logger.warning(f"stage {stage}: every replica heard was far from this one: took {reason}")
                return True
        if any(clipped) or any(left_out):
            self.averaging["clipped"] += sum(clipped)
            self.averaging["left_out"] += sum(left_out)
            named = {peer: f"{k} clipped, {m} left out" for peer, k, m in zip(heard, clipped, left_out) if k or m}
            logger.warning(f"stage {stage}: parameter tensors of {named} were far from this replica and the others "
                           "(a poisoner, or a replica left behind)")  # fmt: skip
        self._distrust({peer: k + m for peer, k, m in zip(heard, clipped, left_out)}, n)
        await self._run(self._apply_average, snapshot, averaged)
        self.averaging["rounds"] += 1
        logger.info(f"stage {stage}: averaged parameters with {len(heard)} other replica(s)")
        return True

    def _distrust(self, clipped: dict[str, int], n_tensors: int) -> None:
        """Count, per peer heard, consecutive rounds with more than half its tensors clipped; at ``average_distrust``
        the peer is not heard for ``average_distrust_rounds`` rounds. Each clipped round still moves this replica
        by up to ``1 / (n + 1)`` of the radius towards a poisoner, and a steady one would drag it round after round;
        an honest replica clipped this often is far behind (it rejoined, say) and loses nothing by not being heard
        for a while: it still hears the others and catches up."""
        if not self.config.average_distrust:
            return
        for peer, n in clipped.items():
            if 2 * n <= n_tensors:
                self._heavy_clips.pop(peer, None)
                continue
            self._heavy_clips[peer] = self._heavy_clips.get(peer, 0) + 1
            if self._heavy_clips[peer] >= self.config.average_distrust:
                del self._heavy_clips[peer]
                self._unheard[peer] = self.config.average_distrust_rounds
                self.averaging["distrusted"] += 1
                logger.warning(f"stage {self.config.stage}: {peer}'s parameters were clipped on most tensors "
                               f"{self.config.average_distrust} rounds running: not heard for the next "
                               f"{self.config.average_distrust_rounds} rounds")  # fmt: skip

    async def _fetch_parameters(self, peer: str, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """``peer``'s parameters, checked against the shapes of ``like`` (this replica's) and for finiteness."""
        stub = StageServer.get_stub(self._p2p, PeerID.from_base58(peer), namespace=rpc_namespace(self.manifest.run_id))
        request = runtime_pb2.ExpertRequest(metadata=pack_meta({"run": self.manifest.run_id,
                                                                "stage": self.config.stage}))  # fmt: skip
        reply = await call_reply_stream(stub.rpc_parameters, request, self.config.average_timeout,
                                        max_tensors=len(like), max_tensor_bytes=max(4 * t.numel() for t in like))
        return decode_parameters(reply, like)

    def _clip_bounds(self, snapshot: list[torch.Tensor]) -> list[float]:
        """Per tensor, ``average_clip x lr x sqrt(size) x steps`` (steps: optimizer steps since this replica's
        previous round, at least ``average_every``); infinite when ``average_clip`` is 0."""
        if not self.config.average_clip:
            return [math.inf] * len(snapshot)
        steps = max(self.optimizer_steps - self._steps_at_round, self.config.average_every, 1)
        radius = self.config.average_clip * self.config.lr * steps
        return [radius * math.sqrt(t.numel()) for t in snapshot]

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().to("cpu", copy=True) for p in self.module.parameters()]

    def _apply_average(self, snapshot: list[torch.Tensor], averaged: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, before, after in zip(self.module.parameters(), snapshot, averaged):
                p.add_((after - before).to(p.device, p.dtype))
        self._steps_at_round = self.optimizer_steps
        self._version += 1

    def _take_parameters(self, taken: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, t in zip(self.module.parameters(), taken):
                p.copy_(t)
        self._steps_at_round = self.optimizer_steps
        self._version += 1

    # ---------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {
            "run_id": self.manifest.run_id,
            "span": list(self.span),
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "backward_calls": self.backward_calls,
            "optimizer_steps": self.optimizer_steps,
            "applied_step": self._applied_step,
            "forward_step": self._forward_step,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["run_id"] != self.manifest.run_id or tuple(state["span"]) != self.span:
            raise ValueError("checkpoint is for another run or another stage span")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.backward_calls = int(state["backward_calls"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self._applied_step = int(state.get("applied_step", -1))  # absent from checkpoints before 2026-11-30
        self._forward_step = int(state.get("forward_step", -1))
        self._steps_at_round = self.optimizer_steps
        self._version += 1

    def save(self, path: str | Path) -> None:
        """Write the stage's state atomically (a crash never leaves half a checkpoint). Only while no computation
        runs (before ``start``, after ``shutdown``); a serving stage saves with :meth:`save_serving`."""
        save_state_file(self.state_dict(), path)

    async def save_serving(self, path: str | Path) -> None:
        """Save while serving: the state is copied between computations, on the stage's compute thread (the
        optimizer step, averaging and syncing change the tensors in place there; saved from another thread they
        could mix two steps' parameters and moments in one file), then written on another thread."""
        if self._stopped:
            return self.save(path)
        snapshot = await self._run(lambda: _cpu_copy(self.state_dict()))
        await asyncio.to_thread(save_state_file, snapshot, path)

    def load(self, path: str | Path) -> None:
        """Load a checkpoint written by :meth:`save`; StateFileError if it is unreadable or not this stage's. Read on
        the CPU: loading copies the values to the parameters' device, and AdamW's step counters stay on the CPU, as a
        fresh optimizer keeps them (on a GPU they would cost a device sync per parameter per step)."""
        load_state_file(path, f"stage {self.config.stage} checkpoint", self.load_state_dict, weights_only=True,
                        map_location="cpu")  # fmt: skip

    def __repr__(self) -> str:
        return f"StageServer(stage={self.config.stage}, span={self.span}, steps={self.optimizer_steps})"


def _cpu_copy(state: Any) -> Any:
    """A copy of a (nested) state dict whose tensors are detached CPU copies: it no longer changes with the stage."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu_copy(v) for v in state)
    return state


def consensus_parameters(
    peers: Sequence[Sequence[torch.Tensor]], bounds: Sequence[float]
) -> tuple[list[torch.Tensor] | None, str]:
    """The parameters a joining replica takes from the other replicas it heard (lists of tensors in the same order),
    or None, with the reason either way.

    * three or more: the element-wise median (the mean of the two middle values for an even count). A minority of
      poisoners cannot move an element outside the range of the honest replicas' values for it;
    * two: their mean, if they agree (every tensor's difference within ``bounds[i]``: honest replicas that average
      with each other stay that close); otherwise None, since nothing tells which of the two to believe;
    * one: None. A lone peer's word could be a poisoner's (a stage's replicas are trusted as a majority only), and
      the joiner's own parameters are safe: averaging brings them to the stage's round by round."""
    if len(peers) < 2:
        return None, "a single replica heard: one peer's word is not taken" if peers else "no replica heard"
    if len(peers) == 2:
        a, b = peers
        for i, (x, y) in enumerate(zip(a, b)):
            if float(torch.linalg.vector_norm(x - y)) > bounds[i]:
                return None, "the two replicas heard disagree: nothing tells which to believe"
        return [(x + y) / 2 for x, y in zip(a, b)], "the mean of the two replicas heard, which agree"
    taken = []
    for tensors in zip(*peers):
        stacked, _ = torch.sort(torch.stack(list(tensors)), dim=0)
        n = stacked.shape[0]
        taken.append(stacked[n // 2] if n % 2 else (stacked[n // 2 - 1] + stacked[n // 2]) / 2)
    return taken, f"the element-wise median of the {len(peers)} replicas heard"


def robust_average(
    own: Sequence[torch.Tensor], peers: Sequence[Sequence[torch.Tensor]], bounds: Sequence[float], spread: float,
    *, reject: float = 0.0,
) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """The mean of ``own`` and ``peers`` (lists of tensors in the same order), centred on ``own`` and clipped: per
    tensor ``i``, ``own[i] + sum_j clip(peers[j][i] - own[i]) / (len(peers) + 1)``, where ``clip`` scales a
    difference down to norm ``radius_i`` when it is longer: ``radius_i = bounds[i]``, and, with two or more peers and
    ``spread > 0``, at most ``spread`` times the lower median of the peers' distances for that tensor (an honest one's,
    when the stage's replicas have an honest majority). Unclipped, that is the plain mean. With ``reject > 0``, a
    difference longer than ``reject x bounds[i]`` is left out of tensor ``i``'s mean (and of its count).

    Returns the averaged tensors and, per peer, how many of its tensors were clipped, and how many left out.

    One attacker among ``n`` peers moves the result by at most ``radius_i / (n + 1)``. A known limit: attackers
    that are half of the peers can send this replica's own parameters back, making the lower median 0 and stalling the
    average (never poisoning it)."""
    averaged, clipped, left_out = [], [0] * len(peers), [0] * len(peers)
    for i, mine in enumerate(own):
        diffs = [theirs[i] - mine for theirs in peers]
        norms = [float(torch.linalg.vector_norm(d)) for d in diffs]
        radius = bounds[i]
        if spread > 0 and len(norms) >= 2:
            radius = min(radius, spread * sorted(norms)[(len(norms) - 1) // 2])
        total, count = torch.zeros_like(mine), 1
        for j, (diff, norm) in enumerate(zip(diffs, norms)):
            if reject > 0 and norm > reject * bounds[i]:
                left_out[j] += 1
                continue
            if norm > radius:
                diff = diff * (radius / norm)
                clipped[j] += 1
            total += diff
            count += 1
        averaged.append(mine + total / count)
    return averaged, clipped, left_out
