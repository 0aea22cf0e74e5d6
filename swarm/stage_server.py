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
gradients accumulate; AdamW steps after ``accumulate`` backward calls, or as soon as a request of a later trainer step
arrives (a replica bypassed in some of a step's micro-batches gets fewer calls: counting alone would misalign every
later step), and on ``finish_step`` / shutdown.

Data-parallel averaging: every ``average_every`` optimizer steps (0: never) a replica runs, in the background, one
round of hivemind's ``DecentralizedAverager`` (all-reduce, equal weights) with the other replicas of its stage, keyed
by run and stage (group prefix ``{run}_stage{k}``: hivemind forbids dots in prefixes). A round is skipped when the
DHT shows no other ONLINE, non-banned replica of the stage; it is bounded by ``average_timeout``; training goes on
if it fails (logged). The replica snapshots its parameters (between computations), averages the snapshot, and adds
``average - snapshot`` to its parameters, so updates made while the round ran are kept. The result is discarded when
the group contained a peer that is not an announced ONLINE replica of the stage or that a quorum of validators has
banned, or when it is not finite. Optimizer moments are not averaged.

A replica that is not yet banned could still poison an average (the validators watch activations and gradients, not
parameters, and all-reduce shows each member only the group's sum): each round's change to a parameter tensor is
therefore clipped to ``average_clip`` (3) times what the optimizer steps since the replica's previous round could
move it by (``_clip_average``). That bounds what a poisoner gains per round; it does not make the average robust (a
median would need every member's parameters, not their sum).

The announcement (``StageAnnouncement`` in the DHT, key ``stage.{k - 1}``: the DHT numbers stages from 0 like
``manifest.layer_spans``) is refreshed every ``announce_period`` seconds and set OFFLINE on shutdown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import AsyncIterator  # noqa: UP035 (ServicerBase detects stream handlers by typing's AsyncIterator only)

import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time

from sentinel.attacks import MaliciousBehaviour
from sentinel.stats import all_finite
from swarm.dht_schema import fetch_banned, fetch_stages, publish_stage
from swarm.identity import Identity
from swarm.model import ModelConfig, Stage, resolve_config, resolve_device
from swarm.protocol import (
    BadRequest,
    Busy,
    StreamSlots,
    TensorSpec,
    answer_stream,
    check_unary_reply,
    check_unary_request,
    decode_hidden,
    encode_tensors,
    error_response,
    meta_int,
    meta_str,
    meta_verdict,
    receive_stream,
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

logger = logging.getLogger(__name__)


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
    accumulate: int = 8  # backward calls per optimizer step
    max_batch: int = 64
    device: str = "cpu"  # or "auto" (CUDA when present), "cuda", "cuda:1", ...; `join` defaults to "auto"
    compression: int = runtime_pb2.CompressionType.NONE
    announce_period: float = 10.0  # seconds; the record expires after 2 periods
    replay_window: int = 4096  # (step, micro-batch) pairs remembered to refuse a replayed backward
    trust_trainer: bool = False  # accept a trainer's verdict on a forward input at every boundary (only for
    # benchmarks of a swarm without validators, TrainerConfig.validate=False; by default only stage 1 accepts it)
    average_every: int = 4  # optimizer steps between parameter-averaging rounds with the other replicas (0: off)
    average_timeout: float = 30.0  # seconds a round may take (matchmaking, then all-reduce)
    average_matchmaking: float = 2.0  # seconds a group leader waits for the stage's other replicas to join
    max_streams: int = 8  # streamed requests in hand at once; one more is refused with Busy (memory bound)
    # a round's change to each parameter tensor is clipped in norm to average_clip x lr x sqrt(its size) x the
    # optimizer steps since this replica's previous round (at least average_every): what that many AdamW steps, which
    # move an element by about lr each, can move it by, average_clip times over (0: no clipping)
    average_clip: float = 3.0

    def __post_init__(self) -> None:
        if self.stage < 1 or self.accumulate < 1 or self.max_batch < 1 or self.announce_period <= 0:
            raise ValueError("stage, accumulate and max_batch must be >= 1 and announce_period > 0")
        if self.average_every < 0 or not 0 < self.average_matchmaking < self.average_timeout:
            raise ValueError("average_every must be >= 0 and 0 < average_matchmaking < average_timeout")
        if self.max_streams < 1:
            raise ValueError("max_streams must be >= 1")
        if self.average_clip < 0:
            raise ValueError("average_clip must be >= 0")


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
        self.optimizer_steps = 0
        self._pending_step: int | None = None  # trainer step of the gradients accumulated and not yet applied
        self._pending_calls = 0
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
        self._serving = False
        self._averager: DecentralizedAverager | None = None
        self._averaging: asyncio.Task | None = None
        self._control = None  # the running averaging step (a hivemind StepControl)
        self._average_lock = asyncio.Lock()
        self._next_average = config.average_every
        self.averaging = {"rounds": 0, "skipped": 0, "failed": 0, "rejected": 0, "clipped": 0}
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
        if self.config.average_every > 0:  # blocks the loop until its process is up (hivemind sets a signal
            self._averager = self._make_averager(dht)  # handler there, which only works in the main thread)
        await self.add_p2p_handlers(self._p2p, namespace=rpc_namespace(self.manifest.run_id))
        self._serving = True
        await self.announce(StageState.ONLINE)
        self._announcer = asyncio.create_task(self._announce_loop())

    def _make_averager(self, dht: DHT) -> DecentralizedAverager:
        c = self.config
        return DecentralizedAverager(
            [p.detach().to("cpu", copy=True) for p in self.module.parameters()], dht, start=True,
            prefix=f"{self.manifest.run_id}_stage{c.stage}", min_group_size=2,
            min_matchmaking_time=c.average_matchmaking, request_timeout=min(3.0, c.average_matchmaking),
            allreduce_timeout=c.average_timeout,
        )  # fmt: skip

    async def shutdown(self) -> None:
        if self._announcer is not None:
            self._announcer.cancel()
            self._announcer = None
        control = self._control
        if control is not None:
            control.cancel()  # unblocks the thread waiting for the round
        if self._averaging is not None:
            self._averaging.cancel()
            await asyncio.gather(self._averaging, return_exceptions=True)
            self._averaging = None
        if self._averager is not None:
            averager, self._averager = self._averager, None
            await asyncio.to_thread(averager.shutdown)
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
        """Micro-batches (forward + backward) per second; 1.0 until measured."""
        return 1.0 if not self.seconds_ema else 1.0 / self.seconds_ema

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
        while True:
            await asyncio.sleep(self.config.announce_period)
            try:
                await self.announce(StageState.ONLINE)
            except Exception as e:  # keep serving; the next period retries
                logger.warning(f"stage {self.config.stage}: announce failed: {type(e).__name__}: {e}")

    # ------------------------------------------------------------------------------------------------ handlers
    async def rpc_forward(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        return await self._serve("forward", request)

    async def rpc_backward(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        return await self._serve("backward", request)

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for part in answer_stream(requests, partial(self._serve, "forward")):
            yield part

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for part in answer_stream(requests, partial(self._serve, "backward")):
            yield part

    async def _serve(
        self, kind: str, request: runtime_pb2.ExpertRequest | AsyncIterator[runtime_pb2.ExpertRequest]
    ) -> runtime_pb2.ExpertResponse:
        """Both paths: a unary request, or the parts of a streamed one (reassembled within the stage's bounds, then
        handled by the same code). Every error becomes the typed error reply."""
        unary = isinstance(request, runtime_pb2.ExpertRequest)
        try:
            if unary:
                check_unary_request(request)
                return await self._handle(kind, request, unary=True)
            self.stream_calls[kind] += 1
            with self.streams.take():
                request = await receive_stream(request, max_tensors=1 if kind == "forward" else 2, spec=self.spec)
                return await self._handle(kind, request, unary=False)
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

    async def _handle(self, kind: str, request: runtime_pb2.ExpertRequest, *, unary: bool):
        if kind == "forward":
            return await self._forward(request, unary=unary)
        return await self._backward(request, unary=unary)

    def _checked_input(self, meta: dict, proto: runtime_pb2.Tensor) -> tuple[str, int, int, torch.Tensor]:
        run, step, mb = meta_str(meta, "run", max_len=64), meta_int(meta, "step"), meta_int(meta, "mb")
        h = decode_hidden(proto, self.spec, "input")
        check_verdict(
            meta_verdict(meta, "verdict"), manifest=self.manifest, run_id=run, step=step, microbatch=mb,
            boundary=self.config.stage - 1, direction=Direction.FORWARD, digest=tensor_digest(h),
            allow_trainer=self.config.stage == 1 or self.config.trust_trainer,
        )  # fmt: skip
        return run, step, mb, h

    async def _forward(self, request: runtime_pb2.ExpertRequest, *, unary: bool) -> runtime_pb2.ExpertResponse:
        meta = unpack_meta(request.metadata)
        (proto,) = request_tensors(request, 1)
        _, step, mb, h = self._checked_input(meta, proto)
        if unary:
            check_unary_reply(h.numel(), self.config.compression)
        self.forward_calls += 1
        out = await self._run(self._compute_forward, h, step)
        out = self._send(out, step, mb, "forward")
        return runtime_pb2.ExpertResponse(tensors=encode_tensors([out], self.config.compression))

    async def _backward(self, request: runtime_pb2.ExpertRequest, *, unary: bool) -> runtime_pb2.ExpertResponse:
        meta = unpack_meta(request.metadata)
        h_proto, g_proto = request_tensors(request, 2)
        run, step, mb, h = self._checked_input(meta, h_proto)
        g = decode_hidden(g_proto, self.spec, "grad_output")
        if g.shape != h.shape:
            raise BadRequest("grad_output must have the input's shape")
        if unary:
            check_unary_reply(h.numel(), self.config.compression)
        check_verdict(
            meta_verdict(meta, "grad_verdict"), manifest=self.manifest, run_id=run, step=step, microbatch=mb,
            boundary=self.config.stage, direction=Direction.BACKWARD, digest=tensor_digest(g), allow_trainer=True,
        )  # fmt: skip
        if (step, mb) in self._seen_backward:  # a replayed (input, gradient) pair would apply its update twice
            raise BadRequest("backward for this micro-batch was already applied")
        self._seen_backward[(step, mb)] = None
        while len(self._seen_backward) > self.config.replay_window:
            self._seen_backward.popitem(last=False)
        grad_in = await self._run(self._compute_backward, h, g, step)
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
        with torch.no_grad():
            out = self.module(h.to(self.device, torch.float32))
        self._timed(time.perf_counter() - start)
        return out.to("cpu")

    def _compute_backward(self, h: torch.Tensor, g: torch.Tensor, step: int) -> torch.Tensor:
        start = time.perf_counter()
        if self._pending_step is not None and step != self._pending_step:
            self._apply_pending()  # gradients of an earlier trainer step, fewer than `accumulate` (some bypassed)
        x = h.to(self.device, torch.float32).requires_grad_(True)
        out = self.module(x)
        torch.autograd.backward(out, g.to(self.device, out.dtype))
        self.backward_calls += 1
        self._pending_step = step
        self._pending_calls += 1
        if self._pending_calls >= self.config.accumulate:
            self._apply_pending()
        self._timed(time.perf_counter() - start)
        return x.grad.to("cpu")

    async def finish_step(self) -> None:
        """Apply the gradients accumulated so far now (normally done when the trainer's next step arrives)."""
        await self._run(self._apply_pending)

    def _apply_pending(self) -> None:
        """One optimizer step on the gradients accumulated so far (none: nothing to do).

        Steps follow the trainer's: after ``accumulate`` backward calls, or as soon as a request of a later trainer
        step arrives. Counting calls alone, a replica bypassed in some micro-batches of a step (its output replaced
        by a validator) would from then on split every later step's micro-batches across two updates."""
        if self._pending_calls:
            if self.config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer_steps += 1
        self._pending_step, self._pending_calls = None, 0

    def _timed(self, seconds: float) -> None:
        self.seconds_ema = seconds if self.seconds_ema is None else 0.9 * self.seconds_ema + 0.1 * seconds

    # ----------------------------------------------------------------------------------------------- averaging
    def _maybe_average(self) -> None:
        if self._averager is None or self.optimizer_steps < self._next_average:
            return
        if self._averaging is not None and not self._averaging.done():
            return  # the previous round is still running: this one is skipped
        self._next_average = self.optimizer_steps + self.config.average_every
        self._averaging = asyncio.create_task(self.average_now())

    async def _stage_peers(self) -> set[str]:
        """Other ONLINE replicas of this stage that no quorum of validators has banned (from the DHT)."""
        dht, run, me = self._dht, self.manifest.run_id, self.peer_id

        def read() -> set[str]:
            peers = {a.peer for a in fetch_stages(dht, run, self.config.stage - 1)
                     if a.state == StageState.ONLINE and a.peer != me}  # fmt: skip
            return peers - fetch_banned(dht, self.manifest, peers)

        return await asyncio.to_thread(read)

    async def average_now(self) -> bool:
        """One averaging round with the stage's other replicas; True if the average was applied. Never raises
        (except on cancellation): a failed round is logged and counted, and training goes on."""
        if self._averager is None or self._p2p is None:
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
        stage = self.config.stage
        if not await self._stage_peers():
            self.averaging["skipped"] += 1
            logger.debug(f"stage {stage}: no other replica to average with")
            return False
        snapshot = await self._run(self._snapshot)
        averager = self._averager
        with averager.get_tensors() as tensors:
            for tensor, value in zip(tensors, snapshot):
                tensor.copy_(value)
        group = await asyncio.to_thread(self._averager_step, averager)
        if not group:
            self.averaging["failed"] += 1
            logger.warning(f"stage {stage}: averaging round found no group within {self.config.average_timeout} s")
            return False
        members = {peer.to_base58() for peer in group} - {self.peer_id}
        outsiders = members - await self._stage_peers()  # banned, or not an announced replica of this stage
        with averager.get_tensors() as tensors:
            averaged = [t.detach().clone() for t in tensors]
        if outsiders or not all(all_finite(t) for t in averaged):
            self.averaging["rejected"] += 1
            logger.warning(f"stage {stage}: averaging result rejected (group members that are banned or not ONLINE "
                           f"replicas of this stage: {sorted(outsiders)}, or non-finite values)")  # fmt: skip
            return False
        clipped = self._clip_average(snapshot, averaged)
        if clipped:
            self.averaging["clipped"] += 1
            logger.warning(f"stage {stage}: averaging would have moved {clipped} parameter tensor(s) further than "
                           f"{self.config.average_clip}x what this replica's optimizer steps since its last round "
                           "could: clipped (a member far from the others, or a poisoned contribution)")  # fmt: skip
        await self._run(self._apply_average, snapshot, averaged)
        self.averaging["rounds"] += 1
        logger.info(f"stage {stage}: averaged parameters with {len(members)} other replica(s)")
        return True

    def _clip_average(self, snapshot: list[torch.Tensor], averaged: list[torch.Tensor]) -> int:
        """Clip, in place, each tensor's change ``averaged - snapshot`` to ``average_clip * lr * sqrt(numel) *
        steps``, ``steps`` being the optimizer steps since this replica's previous round (at least
        ``average_every``). Returns how many tensors were clipped.

        Why: all-reduce gives each replica only the sum of the group's parameters, so one member that sends
        arbitrary values (a poisoner not yet banned: the validators watch activations and gradients, not
        parameters) moves everyone's parameters by ``1/group`` of its choice. An AdamW step moves each element by
        about ``lr`` (exactly ``lr`` on the first step, and its normalised update rarely exceeds it), so replicas
        that started a round interval from the same average differ by at most ``steps * lr`` per element and an
        honest round stays well inside the bound; a poisoned one moves a tensor by at most what ``average_clip``
        times that many honest steps could."""
        if not self.config.average_clip:
            return 0
        steps = max(self.optimizer_steps - self._steps_at_round, self.config.average_every, 1)
        radius = self.config.average_clip * self.config.lr * steps
        clipped = 0
        for before, after in zip(snapshot, averaged):
            change = after - before
            bound = radius * math.sqrt(change.numel())
            norm = float(torch.linalg.vector_norm(change))
            if norm > bound:
                after.copy_(before + change * (bound / norm))
                clipped += 1
        return clipped

    def _averager_step(self, averager: DecentralizedAverager):
        """One averaging step, bounded even if the averager process hangs or dies; cancelled by ``shutdown``."""
        timeout = self.config.average_timeout
        self._control = control = averager.step(timeout=timeout, wait=False)
        try:
            return control.result(timeout=timeout + 5.0)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            control.cancel()
            return None
        finally:
            self._control = None

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().to("cpu", copy=True) for p in self.module.parameters()]

    def _apply_average(self, snapshot: list[torch.Tensor], averaged: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, before, after in zip(self.module.parameters(), snapshot, averaged):
                p.add_((after - before).to(p.device, p.dtype))
        self._steps_at_round = self.optimizer_steps

    # ---------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {
            "run_id": self.manifest.run_id,
            "span": list(self.span),
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "backward_calls": self.backward_calls,
            "optimizer_steps": self.optimizer_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["run_id"] != self.manifest.run_id or tuple(state["span"]) != self.span:
            raise ValueError("checkpoint is for another run or another stage span")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.backward_calls = int(state["backward_calls"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self._steps_at_round = self.optimizer_steps

    def save(self, path: str | Path) -> None:
        """Write the stage's state atomically (a crash never leaves half a checkpoint)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)

    def load(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

    def __repr__(self) -> str:
        return f"StageServer(stage={self.config.stage}, span={self.span}, steps={self.optimizer_steps})"
