"""Pure checks of the wire protocol and routing choice (no sockets)."""

import math

import numpy as np
import pytest
import torch
from hivemind.proto import runtime_pb2

from swarm import protocol
from swarm.protocol import (
    BadRequest,
    PayloadTooLarge,
    RemoteFailure,
    TensorSpec,
    TransportError,
    Unauthorized,
    as_received,
    decode_hidden,
    encode_tensor,
    encode_tensors,
    error_from_code,
)
from swarm.records import StageAnnouncement, StageState, TaintedInput
from swarm.trainer import choose_replica, throughput_weights

SPEC = TensorSpec(d_model=8, seq_len=4, max_batch=2)
FP16 = runtime_pb2.CompressionType.FLOAT16


def test_decode_hidden_checks_before_compute():
    good = torch.randn(2, 4, 8)
    assert torch.equal(decode_hidden(encode_tensor(good), SPEC, "x"), good)
    for bad in (torch.randn(3, 4, 8), torch.randn(2, 5, 8), torch.randn(2, 4, 9), torch.randn(2, 4)):
        with pytest.raises(BadRequest):
            decode_hidden(encode_tensor(bad), SPEC, "x")
    with pytest.raises(BadRequest):
        decode_hidden(encode_tensor(torch.ones(2, 4, 8, dtype=torch.long)), SPEC, "x")
    nan = good.clone()
    nan[0, 0, 0] = math.nan
    with pytest.raises(BadRequest):
        decode_hidden(encode_tensor(nan), SPEC, "x")
    assert torch.isnan(decode_hidden(encode_tensor(nan), SPEC, "x", require_finite=False)).any()
    proto = encode_tensor(good)
    proto.buffer = proto.buffer[:-4]  # header and buffer disagree
    with pytest.raises(BadRequest):
        decode_hidden(proto, SPEC, "x")
    assert len(encode_tensors([torch.zeros(2**19 + 1)])) == 1  # over the unary limit: streamed, not refused


def test_payload_too_large_only_over_the_stream_bound(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_STREAM_TENSOR_BYTES", 4096)
    encode_tensors([torch.zeros(512), torch.zeros(512)])
    with pytest.raises(PayloadTooLarge):
        encode_tensors([torch.zeros(512), torch.zeros(513)])


def test_float16_round_trip_is_idempotent_so_verdict_digests_hold():
    x = as_received(torch.randn(2, 4, 8), FP16)
    assert torch.equal(as_received(x, FP16), x)
    assert torch.equal(decode_hidden(encode_tensor(x, FP16), SPEC, "x"), x)


def test_error_codes_map_to_types():
    assert isinstance(error_from_code("bad_request", ""), BadRequest)
    assert isinstance(error_from_code("internal", ""), RemoteFailure)
    assert isinstance(error_from_code("unauthorized", ""), Unauthorized)
    assert isinstance(error_from_code("tainted_input", ""), TaintedInput)
    assert isinstance(error_from_code("nonsense", ""), TransportError)


def test_choose_replica_weights_excludes_and_falls_back():
    def ann(peer, throughput, state=StageState.ONLINE):
        return StageAnnouncement("r", 0, peer, state, (0, 1), throughput, bytes(32))

    anns = [ann("a", 1.0), ann("b", 3.0), ann("c", 100.0, StageState.OFFLINE)]
    rng = np.random.default_rng(0)
    picks = [choose_replica(anns, set(), set(), rng).peer for _ in range(400)]
    assert set(picks) == {"a", "b"} and 0.65 < picks.count("b") / 400 < 0.85
    assert choose_replica(anns, {"b"}, set(), rng).peer == "a"
    assert choose_replica(anns, {"a", "b"}, set(), rng).peer in {"a", "b"}  # all banned: bans ignored
    assert choose_replica(anns, set(), {"a", "b"}, rng) is None


def test_unmeasured_peers_weigh_as_a_typical_measured_one():
    # 0 is announced until a peer has measured itself: it weighs the median of the measured ones, not nothing
    assert throughput_weights([2000.0, 0.0]).tolist() == [2000.0, 2000.0]
    assert throughput_weights([1000.0, 3000.0, 5000.0, 0.0]).tolist() == [1000.0, 3000.0, 5000.0, 3000.0]
    assert throughput_weights([0.0, 0.0]).tolist() == [1.0, 1.0]
    assert throughput_weights([3.0]).tolist() == [3.0]
