"""Streamed RPCs for tensors over the unary limit: the reassembly bounds (no sockets), then a loopback swarm whose
unary limit is lowered so that the tiny preset's tensors go through ``*_stream`` (forked, bounded)."""

import asyncio
import math
import time
from functools import partial

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from swarm_helpers import SEED, LocalSwarm, local_reference

from swarm import local, protocol
from swarm.identity import Identity
from swarm.protocol import (
    BadRequest,
    TensorSpec,
    Unauthorized,
    call,
    call_auto,
    encode_tensor,
    gather_stream,
    pack_meta,
    receive_stream,
    sign_check,
    split_message,
    unpack_meta,
)
from swarm.records import Direction, ForgedVerdict, Verdict, VerdictMismatch, sign_verdict, tensor_digest
from swarm.stage_server import StageServer, rpc_namespace
from swarm.trainer import TrainerConfig
from swarm.validator_service import ValidatorService, ValidatorServiceConfig

CHUNK = 1024
NONE = runtime_pb2.CompressionType.NONE
FP16 = runtime_pb2.CompressionType.FLOAT16
UINT8 = runtime_pb2.CompressionType.UNIFORM_8BIT
Req = runtime_pb2.ExpertRequest


def _aiter(parts, pulled=None):
    async def gen():
        for part in parts:
            if pulled is not None:
                pulled.append(part)
            yield part

    return gen()


def _gather(parts, *, max_tensors=2, max_tensor_bytes=8 * CHUNK, pulled=None, end_marker=False):
    return asyncio.run(gather_stream(_aiter(parts, pulled), Req, max_tensors=max_tensors,
                                     max_tensor_bytes=max_tensor_bytes, end_marker=end_marker))  # fmt: skip


def _rejects(parts, match, **kwargs):
    with pytest.raises(BadRequest, match=match):
        _gather(parts, **kwargs)


@pytest.mark.timeout(30)
def test_gather_stream_round_trip_and_bounds(monkeypatch):
    monkeypatch.setattr(protocol, "STREAM_CHUNK_BYTES", CHUNK)
    a, b = torch.randn(2, 4, 100), torch.randn(1, 3, 7)  # 3200 bytes: 4 chunks (the last one short); 42: one
    request = Req(tensors=[encode_tensor(a), encode_tensor(b, FP16)], metadata=pack_meta({"k": 1}))
    parts = list(split_message(request))
    assert len(parts) == 5 and parts[0].metadata and not any(p.metadata for p in parts[1:])
    assert all(len(p.tensors) == 1 and len(p.tensors[0].buffer) <= CHUNK for p in parts)
    assert _gather(parts) == request  # field for field, buffers joined
    empty = runtime_pb2.ExpertResponse(metadata=pack_meta({"error": "bad_request"}))
    assert list(split_message(empty)) == [empty]  # an error reply is one part

    def header(size, **fields):
        return Req(tensors=[runtime_pb2.Tensor(size=size, dtype="float32", buffer=b"\0" * 8, **fields)])

    def part(**fields):
        return Req(tensors=[runtime_pb2.Tensor(**fields)])

    # a hostile header is refused on the first part: nothing after it is read, nothing of its size is allocated
    pulled = []
    huge = header([2**20, 2**20, 64], chunks=2**30)
    _rejects([huge, *(part(buffer=b"\0" * CHUNK) for _ in range(50))], "size", pulled=pulled)
    assert len(pulled) == 1
    _rejects([header([3, 1024], chunks=12)], "size")  # 12 KiB: over max_tensor_bytes (8 KiB)
    _rejects([Req(tensors=[runtime_pb2.Tensor(size=[2], dtype="int64", chunks=1, buffer=b"\0" * 16)])], "dtype")
    _rejects([Req(tensors=[runtime_pb2.Tensor(size=[2], dtype="float32", compression=UINT8, chunks=1)])], "compr")
    _rejects([header([0, 4], chunks=0)], "size")  # empty tensor
    _rejects(parts[:1] + [parts[0]] + parts[2:], "metadata")  # parts disagree: metadata (and a header) again
    _rejects([header([2, 1024], chunks=3), *parts[1:4]], "chunk count")  # disagrees with the declared size
    _rejects(parts[:1] + [part(buffer=b"\0" * CHUNK, size=[5])] + parts[2:], "continuation")  # with a header
    _rejects(parts[:1] + [part(buffer=b"\0" * 10)] + parts[2:], "chunk length")  # short chunk
    _rejects(parts[:3], "ended inside")
    _rejects(parts + [Req()], "one tensor chunk")  # a later part without a chunk
    # a reply ends at its end marker (an empty part): read no further; without it, it was cut short
    replied = list(protocol.reply_parts(Req(tensors=request.tensors, metadata=request.metadata)))
    assert replied[:-1] == parts and replied[-1] == Req()
    pulled = []
    assert _gather([*replied, *parts], end_marker=True, pulled=pulled) == request and len(pulled) == len(replied)
    _rejects(parts, "before its end marker", end_marker=True)  # whole tensors, but no marker: truncated
    _rejects(parts[:4], "before its end marker", end_marker=True)  # the first tensor whole, the second lost
    _rejects([*parts[:3], Req()], "ended inside", end_marker=True)
    error = list(protocol.reply_parts(empty))
    assert len(error) == 2 and asyncio.run(gather_stream(_aiter(error), type(empty), max_tensors=1,
                                                         max_tensor_bytes=CHUNK, end_marker=True)) == empty
    _rejects(parts, "more than 1 tensor", max_tensors=1)
    _rejects([], "empty")
    one = list(split_message(Req(tensors=[encode_tensor(torch.ones(256))])))  # 1 KiB: one part
    _rejects([Req(metadata=b"m"), *one, *one], "parts", max_tensors=1, max_tensor_bytes=CHUNK)  # 2 allowed
    monkeypatch.setattr(protocol, "MAX_STREAM_TENSOR_BYTES", 3220)
    _rejects(parts, "size")  # 3200 + 42 bytes: the running total over the hard bound

    async def slow():  # a stream that never completes: the server stops waiting
        yield parts[0]
        await asyncio.sleep(30)

    monkeypatch.setattr(protocol, "STREAM_RECEIVE_TIMEOUT", 0.2)
    with pytest.raises(BadRequest, match="did not arrive"):
        asyncio.run(receive_stream(slow(), max_tensors=2, spec=TensorSpec(100, 4, 2)))


@pytest.mark.timeout(30)
def test_call_auto_streams_when_request_or_reply_exceeds_the_unary_limit(monkeypatch):
    """The switch, with an in-process stub: a reply at 4 bytes a value also counts (a FLOAT16 request under the limit
    may get a float32 reply over it)."""
    monkeypatch.setattr(protocol, "STREAM_CHUNK_BYTES", CHUNK)
    monkeypatch.setattr(protocol, "MAX_UNARY_TENSOR_BYTES", 4096)
    spec = TensorSpec(d_model=64, seq_len=32, max_batch=4)
    used = []

    def reply_for(request):
        return runtime_pb2.ExpertResponse(tensors=request.tensors[:1], metadata=pack_meta({"n": len(request.tensors)}))

    class Stub:
        async def rpc_x(self, request, timeout=None):
            used.append("unary")
            return reply_for(request)

        async def rpc_x_stream(self, parts):
            used.append("stream")
            request = await receive_stream(parts, max_tensors=2, spec=spec)
            return _aiter(list(protocol.reply_parts(reply_for(request))))

    async def go(tensors, compression=NONE):
        response = await call_auto(Stub(), "rpc_x", "rpc_x_stream", tensors, {}, 5, compression, spec)
        assert unpack_meta(response.metadata) == {"n": len(tensors)}
        return protocol.decode_reply_tensor(response, spec)

    small, big = torch.randn(1, 4, 64), torch.randn(2, 32, 64)  # 1 KiB and 16 KiB in float32
    assert torch.equal(asyncio.run(go([small, small])), small) and used == ["unary"]
    assert torch.equal(asyncio.run(go([big, big])), big) and used[-1] == "stream"
    half = torch.randn(1, 24, 64)  # 3 KiB in FLOAT16 (fits), but its float32 reply would be 6 KiB
    out = asyncio.run(go([half], FP16))
    assert used[-1] == "stream" and torch.equal(out, protocol.as_received(half, FP16))


async def _assert_microbatch_matches_local(swarm, servers, *, loss_tol: float) -> None:
    """One micro-batch through the swarm gives the local model's loss and the same gradients everywhere."""
    trainer = swarm.trainer
    loss = await trainer.microbatch(step=0, mb=0)
    local_loss, emb, local_stages = local_reference(swarm)
    assert loss == pytest.approx(local_loss, abs=loss_tol)
    torch.testing.assert_close(trainer.embedding.tok.weight.grad, emb.tok.weight.grad)
    for server, local_stage in zip(servers, local_stages):
        for p, q in zip(server.module.parameters(), local_stage.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.forked
@pytest.mark.timeout(120)
def test_streamed_training_matches_local_model(monkeypatch):
    """Every hidden state of the tiny preset (2 x 32 x 64 float32 = 16 KiB) exceeds a 4 KiB unary limit, so every
    forward, backward and check is streamed (4 chunks a tensor); the swarm still computes exactly the local model's
    loss and gradients, and trains without losing a micro-batch."""
    monkeypatch.setattr(protocol, "MAX_UNARY_TENSOR_BYTES", 4096)
    monkeypatch.setattr(protocol, "STREAM_CHUNK_BYTES", 4096)
    swarm = LocalSwarm((1, 1), trainer_config=TrainerConfig(seed=SEED, batch_size=2, microbatches=4),
                       stage_config={"accumulate": 100, "average_every": 0})  # fmt: skip

    async def body(swarm):
        trainer, validator = swarm.trainer, swarm.validator
        servers = [swarm.servers[(1, 0)], swarm.servers[(2, 0)]]
        await _assert_microbatch_matches_local(swarm, servers, loss_tol=1e-6)
        assert all(s.stream_calls == {"forward": 1, "backward": 1} for s in servers)
        assert validator.stream_calls == validator.n_checks == 4

        losses = [await trainer.step(s) for s in (1, 2)]
        assert all(math.isfinite(x) for x in losses)
        assert trainer.metrics.step_completed == [4, 4] and trainer.metrics.completed == 9
        assert trainer.metrics.dropped == trainer.metrics.retries == trainer.metrics.tainted == 0
        assert all(s.stream_calls == {"forward": 9, "backward": 9} and s.rejected == {} for s in servers)
        assert validator.stream_calls == validator.n_checks == 36

    swarm.run(body)


@pytest.mark.forked
@pytest.mark.timeout(120)
def test_real_limits_carry_a_hidden_state_over_4_mib(monkeypatch):
    """No lowered limit: a 640 x 32 x 64 float32 hidden state (5 MiB, over hivemind's 4 MiB unary cap; 10 MiB for a
    backward or a check) travels in 1 MiB chunks and the swarm computes the local model's loss and gradients."""
    assert protocol.MAX_UNARY_TENSOR_BYTES == 2 * 2**20 and protocol.STREAM_CHUNK_BYTES == 2**20
    batch = 640
    # LocalSwarm builds ValidatorServiceConfig() with its defaults (max_batch 64): admit the wide batch
    monkeypatch.setattr(local, "ValidatorServiceConfig", partial(ValidatorServiceConfig, max_batch=batch))
    swarm = LocalSwarm((1, 1), trainer_config=TrainerConfig(seed=SEED, batch_size=batch, microbatches=1),
                       stage_config={"accumulate": 100, "average_every": 0, "max_batch": batch})  # fmt: skip

    async def body(swarm):
        servers = [swarm.servers[(1, 0)], swarm.servers[(2, 0)]]
        await _assert_microbatch_matches_local(swarm, servers, loss_tol=1e-5)
        assert all(s.stream_calls == {"forward": 1, "backward": 1} for s in servers)
        assert swarm.validator.stream_calls == swarm.validator.n_checks == 4

    swarm.run(body)


async def _raw_stream(stub_method, parts):
    """Send hand-made parts; the reply parts, up to its end marker (which must come), then hang up."""
    replies = await stub_method(_aiter(parts))
    try:
        return await asyncio.wait_for(_collect(replies), 10)
    finally:
        await replies.aclose()


async def _collect(replies):
    parts = []
    async for part in replies:
        if parts and not part.tensors and not part.metadata:
            return parts  # the end marker (protocol.reply_parts)
        parts.append(part)
    raise AssertionError(f"the reply stream ended without its end marker after {len(parts)} part(s)")


@pytest.mark.forked
@pytest.mark.timeout(120)
def test_streamed_requests_get_the_same_typed_errors(monkeypatch):
    """A forged verdict (stage) and a forged check signature (validator) are refused with the same typed error
    whether the request came unary or streamed; hostile streams and oversize unary requests get BadRequest."""
    monkeypatch.setattr(protocol, "STREAM_CHUNK_BYTES", 4096)
    outsider = Identity.generate()
    swarm = LocalSwarm((1, 1), stage_config={"average_every": 0})

    async def body(swarm):
        server, validator, run = swarm.servers[(1, 0)], swarm.validator, swarm.run_id
        p2p = await swarm.dhts["trainer"].replicate_p2p()
        stage = StageServer.get_stub(p2p, PeerID.from_base58(server.peer_id), namespace=rpc_namespace(run))
        checker = ValidatorService.get_stub(p2p, PeerID.from_base58(validator.peer_id), namespace=rpc_namespace(run))
        spec = swarm.trainer.spec
        h = torch.randn(2, 32, spec.d_model)
        me = p2p.peer_id.to_base58()
        forged = sign_verdict(outsider, run_id=run, step=0, microbatch=0, boundary=0, direction=Direction.FORWARD,
                              verdict=Verdict.ACCEPT, digest=tensor_digest(h), caller=me)  # fmt: skip
        meta = {"run": run, "step": 0, "mb": 0, "verdict": forged.to_tuple()}
        fields = dict(run_id=run, step=0, microbatch=0, boundary=1, direction=Direction.FORWARD, sender="x",
                      tainted=False, warmup=False, digest=tensor_digest(h), reference_digest=tensor_digest(h))
        check_meta = {"run": run, "step": 0, "mb": 0, "boundary": 1, "direction": 0, "sender": "x", "tainted": False,
                      "warmup": False, "trainer": outsider.public_key, "signature": sign_check(outsider, **fields)}

        async def both_paths(limit):
            monkeypatch.setattr(protocol, "MAX_UNARY_TENSOR_BYTES", limit)
            with pytest.raises(ForgedVerdict):
                await call_auto(stage, "rpc_forward", "rpc_forward_stream", [h], meta, 10, NONE, spec)
            with pytest.raises(Unauthorized):
                await call_auto(checker, "rpc_check", "rpc_check_stream", [h, h], check_meta, 10, NONE, spec)

        await both_paths(2 * 2**20)  # unary
        assert server.stream_calls == {} and validator.stream_calls == 0
        await both_paths(4096)  # streamed
        assert server.stream_calls == {"forward": 1} and validator.stream_calls == 1
        assert server.rejected == {"forged_verdict": 2} and server.forward_calls == 0 and validator.n_checks == 0

        # a stranger's stream is refused at its first part (its verdict checked before its tensors are read): it
        # cannot hold a stream slot by sending one part and stalling
        stalled = Req(metadata=pack_meta(meta), tensors=[runtime_pb2.Tensor(
            size=[2, 32, spec.d_model], dtype="float32", chunks=4, buffer=b"\0" * 4096)])  # fmt: skip
        start = time.monotonic()
        replies = await _raw_stream(stage.rpc_forward_stream, [stalled])
        assert unpack_meta(replies[0].metadata)["error"] == ForgedVerdict.code and time.monotonic() - start < 5
        assert server.rejected == {"forged_verdict": 3}

        # nor can a peer presenting a genuine verdict issued to another (a stage replica that saw one in its own
        # requests): refused at the first part too
        issued_elsewhere = sign_verdict(swarm.trainer.identity, run_id=run, step=0, microbatch=0, boundary=0,
                                        direction=Direction.FORWARD, verdict=Verdict.ACCEPT, digest=tensor_digest(h),
                                        caller="QmTheTrainer")  # fmt: skip
        stalled = Req(metadata=pack_meta({**meta, "verdict": issued_elsewhere.to_tuple()}), tensors=stalled.tensors)
        start = time.monotonic()
        replies = await _raw_stream(stage.rpc_forward_stream, [stalled])
        assert unpack_meta(replies[0].metadata)["error"] == VerdictMismatch.code and time.monotonic() - start < 5
        assert server.rejected == {"forged_verdict": 3, "verdict_mismatch": 1}

        # the shape checks of streams from a caller with a genuine verdict
        genuine = sign_verdict(swarm.trainer.identity, run_id=run, step=0, microbatch=0, boundary=0,
                               direction=Direction.FORWARD, verdict=Verdict.ACCEPT, digest=tensor_digest(h), caller=me)
        meta = {**meta, "verdict": genuine.to_tuple()}
        # a unary request over the limit is refused, not served
        request = Req(tensors=[encode_tensor(h)], metadata=pack_meta(meta))
        with pytest.raises(BadRequest, match="unary size limit"):
            await call(stage.rpc_forward, request, 10)
        # hostile streams: a header declaring more than the spec admits; a second tensor on a forward
        huge = Req(metadata=pack_meta(meta), tensors=[runtime_pb2.Tensor(
            size=[10**6, 32, spec.d_model], dtype="float32", chunks=10**6, buffer=b"\0" * 4096)])  # fmt: skip
        twice = [*split_message(request), *split_message(Req(tensors=[encode_tensor(h)]))]
        for parts in ([huge], twice):
            replies = await _raw_stream(stage.rpc_forward_stream, parts)
            assert len(replies) == 1 and unpack_meta(replies[0].metadata)["error"] == BadRequest.code
        # a long stream (100 x 32 x 64 float32: 200 parts) refused at its first part while the client is still
        # sending: the typed error comes back at once (not a broken pipe, not a timeout)
        wide = torch.randn(100, 32, spec.d_model)
        start = time.monotonic()
        with pytest.raises(BadRequest, match="size"):
            await call_auto(stage, "rpc_forward", "rpc_forward_stream", [wide], meta, 10, NONE,
                            TensorSpec(spec.d_model, spec.seq_len, 128))  # fmt: skip
        assert time.monotonic() - start < 5
        assert server.rejected == {"forged_verdict": 3, "verdict_mismatch": 1, "bad_request": 4}

    swarm.run(body)


@pytest.mark.forked
@pytest.mark.timeout(120)
def test_a_server_refuses_streams_over_its_limit_with_busy(monkeypatch):
    """With ``max_streams=1``, a second streamed request while one is still arriving is refused at once with the
    typed Busy error (which the trainer retries elsewhere); the first is then served, and the slot comes back."""
    monkeypatch.setattr(protocol, "STREAM_CHUNK_BYTES", 4096)
    monkeypatch.setattr(protocol, "MAX_UNARY_TENSOR_BYTES", 4096)  # the tiny preset's hidden states go streamed
    swarm = LocalSwarm((1,), stage_config={"average_every": 0, "max_streams": 1})

    async def body(swarm):
        server, run, trainer = swarm.servers[(1, 0)], swarm.run_id, swarm.trainer
        p2p = await swarm.dhts["trainer"].replicate_p2p()
        stage = StageServer.get_stub(p2p, PeerID.from_base58(server.peer_id), namespace=rpc_namespace(run))
        spec = trainer.spec
        h = torch.randn(2, 32, spec.d_model)

        def meta(mb):
            verdict = trainer._trainer_verdict(h, step=0, mb=mb, boundary=0, direction=Direction.FORWARD)
            return {"run": run, "step": 0, "mb": mb, "verdict": verdict.to_tuple()}

        parts = list(split_message(Req(tensors=[encode_tensor(h)], metadata=pack_meta(meta(0)))))
        assert len(parts) > 2
        release = asyncio.Event()

        async def stalled():  # the first part, then nothing until released
            yield parts[0]
            await release.wait()
            for part in parts[1:]:
                yield part

        first = asyncio.create_task(_collect(await stage.rpc_forward_stream(stalled())))
        deadline = time.monotonic() + 10
        while server.streams.active < 1:
            assert time.monotonic() < deadline, "the first stream never reached the server"
            await asyncio.sleep(0.02)
        start = time.monotonic()
        with pytest.raises(protocol.Busy):
            await call_auto(stage, "rpc_forward", "rpc_forward_stream", [h], meta(1), 10, NONE, spec)
        assert time.monotonic() - start < 5 and server.streams.refused == 1 and server.forward_calls == 0

        release.set()
        replies = await asyncio.wait_for(first, 10)
        reply = await gather_stream(_aiter(replies), runtime_pb2.ExpertResponse, max_tensors=1,
                                    max_tensor_bytes=2**20)  # fmt: skip
        assert "error" not in unpack_meta(reply.metadata) and len(reply.tensors) == 1
        assert server.streams.active == 0 and server.forward_calls == 1
        again = await call_auto(stage, "rpc_forward", "rpc_forward_stream", [h], meta(2), 10, NONE, spec)
        assert len(again.tensors) >= 1 and server.forward_calls == 2 and server.streams.refused == 1

    swarm.run(body)
