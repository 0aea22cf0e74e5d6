"""A stage server: one untrusted pipeline stage served over hivemind P2P (``rpc_forward`` / ``rpc_backward``).

Pipeline stage ``k`` (1..S) holds blocks ``manifest.layer_spans[k - 1]``. Its input crosses boundary ``k - 1`` and
its output boundary ``k`` (see ``sentinel.validator``). It computes only on inputs that come with a verdict:

* forward: the input ``h`` needs a signed ACCEPT for (run, step, micro-batch, boundary ``k - 1``, forward,
  digest of ``h``) from an authorized validator, or from an authorized trainer when ``k == 1`` (the embeddings);
* backward: the same for ``h``, plus a signed ACCEPT for the gradient ``grad_out`` at (boundary ``k``, backward)
  from a validator or a trainer. Trainers may vouch for a gradient at any boundary because the trainer computes the
  head's gradient itself and re-signs the gradient it routes around a bypassed stage (see ``swarm.trainer``).

Backward is stateless: it recomputes the forward pass from ``h``, so it may go to any replica of the stage. Parameter
gradients accumulate; AdamW steps every ``accumulate`` backward calls. Data-parallel averaging across the replicas of
a stage is NOT implemented yet (each replica trains on what it is routed); see the report in the module's tests.

The announcement (``StageAnnouncement`` in the DHT, key ``stage.{k - 1}``: the DHT numbers stages from 0 like
``manifest.layer_spans``) is refreshed every ``announce_period`` seconds and set OFFLINE on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from hivemind import DHT
from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time

from sentinel.attacks import MaliciousBehaviour
from swarm.dht_schema import publish_stage
from swarm.identity import Identity
from swarm.model import ModelConfig, Stage, resolve_config
from swarm.protocol import (
    BadRequest,
    TensorSpec,
    decode_hidden,
    encode_tensors,
    error_response,
    meta_int,
    meta_str,
    meta_verdict,
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


@dataclass
class StageServerConfig:
    stage: int  # 1..S
    seed: int = 0  # model init seed, the same on every node of the run
    lr: float = 3e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    accumulate: int = 8  # backward calls per optimizer step
    max_batch: int = 64
    device: str = "cpu"
    compression: int = runtime_pb2.CompressionType.NONE
    announce_period: float = 10.0  # seconds; the record expires after 2 periods
    replay_window: int = 4096  # (step, micro-batch) pairs remembered to refuse a replayed backward

    def __post_init__(self) -> None:
        if self.stage < 1 or self.accumulate < 1 or self.max_batch < 1 or self.announce_period <= 0:
            raise ValueError("stage, accumulate and max_batch must be >= 1 and announce_period > 0")


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
        self.device = torch.device(config.device)
        start, end = manifest.layer_spans[config.stage - 1]
        self.span = (start, end)
        self.module = Stage(self.model_config, start, end, seed=config.seed).to(self.device)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.spec = TensorSpec(self.model_config.d_model, self.model_config.seq_len, config.max_batch)
        self.backward_calls = 0
        self.optimizer_steps = 0
        self.rejected: dict[str, int] = {}
        self.seconds_ema: float | None = None  # seconds per forward+backward of one micro-batch
        self._seen_backward: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage{config.stage}")  # serial
        self._dht: DHT | None = None
        self._p2p: P2P | None = None
        self._announcer: asyncio.Task | None = None

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
        await self.announce(StageState.ONLINE)
        self._announcer = asyncio.create_task(self._announce_loop())

    async def shutdown(self) -> None:
        if self._announcer is not None:
            self._announcer.cancel()
            self._announcer = None
        if self._p2p is not None:
            try:
                await self.announce(StageState.OFFLINE)
                await self.remove_p2p_handlers(self._p2p, namespace=rpc_namespace(self.manifest.run_id))
            finally:
                self._p2p = None  # the DHT's shared replica (dht.replicate_p2p caches it): not ours to close
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

    async def _serve(self, kind: str, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        try:
            if kind == "forward":
                return await self._forward(request)
            return await self._backward(request)
        except (BadRequest, InputRejected) as e:
            self.rejected[e.code] = self.rejected.get(e.code, 0) + 1
            logger.debug(f"stage {self.config.stage}: {kind} rejected ({e.code}): {e}")
            return error_response(e)
        except Exception as e:
            logger.exception(f"stage {self.config.stage}: {kind} failed")
            return error_response(e)

    def _checked_input(self, meta: dict, proto: runtime_pb2.Tensor) -> tuple[str, int, int, torch.Tensor]:
        run, step, mb = meta_str(meta, "run", max_len=64), meta_int(meta, "step"), meta_int(meta, "mb")
        h = decode_hidden(proto, self.spec, "input")
        check_verdict(
            meta_verdict(meta, "verdict"), manifest=self.manifest, run_id=run, step=step, microbatch=mb,
            boundary=self.config.stage - 1, direction=Direction.FORWARD, digest=tensor_digest(h),
            allow_trainer=self.config.stage == 1,
        )  # fmt: skip
        return run, step, mb, h

    async def _forward(self, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        meta = unpack_meta(request.metadata)
        (proto,) = request_tensors(request, 1)
        _, step, mb, h = self._checked_input(meta, proto)
        out = await self._run(self._compute_forward, h)
        out = self._send(out, step, mb, "forward")
        return runtime_pb2.ExpertResponse(tensors=encode_tensors([out], self.config.compression))

    async def _backward(self, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        meta = unpack_meta(request.metadata)
        h_proto, g_proto = request_tensors(request, 2)
        run, step, mb, h = self._checked_input(meta, h_proto)
        g = decode_hidden(g_proto, self.spec, "grad_output")
        if g.shape != h.shape:
            raise BadRequest("grad_output must have the input's shape")
        check_verdict(
            meta_verdict(meta, "grad_verdict"), manifest=self.manifest, run_id=run, step=step, microbatch=mb,
            boundary=self.config.stage, direction=Direction.BACKWARD, digest=tensor_digest(g), allow_trainer=True,
        )  # fmt: skip
        if (step, mb) in self._seen_backward:  # a replayed (input, gradient) pair would apply its update twice
            raise BadRequest("backward for this micro-batch was already applied")
        self._seen_backward[(step, mb)] = None
        while len(self._seen_backward) > self.config.replay_window:
            self._seen_backward.popitem(last=False)
        grad_in = await self._run(self._compute_backward, h, g)
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

    def _compute_forward(self, h: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        with torch.no_grad():
            out = self.module(h.to(self.device, torch.float32))
        self._timed(time.perf_counter() - start)
        return out.to("cpu")

    def _compute_backward(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        x = h.to(self.device, torch.float32).requires_grad_(True)
        out = self.module(x)
        torch.autograd.backward(out, g.to(self.device, out.dtype))
        self.backward_calls += 1
        if self.backward_calls % self.config.accumulate == 0:
            if self.config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer_steps += 1
        self._timed(time.perf_counter() - start)
        return x.grad.to("cpu")

    def _timed(self, seconds: float) -> None:
        self.seconds_ema = seconds if self.seconds_ema is None else 0.9 * self.seconds_ema + 0.1 * seconds

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
