"""Pure checks of the wire protocol and routing choice (no sockets)."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hivemind.proto import runtime_pb2

from swarm import protocol
from swarm.data import Corpus
from swarm.identity import Identity
from swarm.local import local_manifest
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
from swarm.routing import balanced_plan
from swarm.trainer import Trainer, TrainerConfig, choose_replica, throughput_weights

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


def test_an_announced_throughput_is_capped_by_its_stage_s_lower_median():
    """A peer's announcement is its own word: 1e300 drew every micro-batch of its stage, and two announcements near
    the float limit overflowed the weights (NaN probabilities, a crashed trainer)."""
    weights = throughput_weights([1e300, 100.0])
    assert weights.tolist() == [400.0, 100.0]  # the lower median, of two the honest one's
    assert throughput_weights([1e308, 1e308, 5.0, 5.0, math.inf, math.nan, -1.0]).tolist() == [20.0, 20.0, 5.0, 5.0,
                                                                                               5.0, 5.0, 5.0]
    anns = [StageAnnouncement("r", 0, peer, StageState.ONLINE, (0, 1), t, bytes(32))
            for peer, t in (("big", 1e308), ("honest", 5.0), ("other", 5.0))]
    rng = np.random.default_rng(0)
    picks = [choose_replica(anns, set(), set(), rng).peer for _ in range(600)]
    assert 0.55 < picks.count("big") / len(picks) < 0.8  # 4 : 1 : 1 (it drew every one before)


def test_balanced_plan_gives_each_its_share_rounded_and_shuffles():
    rng = np.random.default_rng(0)
    orders = set()
    for weights, n in (([1.0, 1.0], 4), ([1.0, 3.0], 4), ([1.0, 1.0, 1.0], 4), ([2.0, 1.0, 1.0, 0.5], 7), ([5.0], 3)):
        for _ in range(50):
            plan = balanced_plan(np.array(weights), n, rng)
            assert len(plan) == n
            share = n * np.array(weights) / sum(weights)
            counts = np.bincount(plan, minlength=len(weights))
            assert np.all(counts >= np.floor(share)) and np.all(counts <= np.ceil(share)), (weights, plan)
            if weights == [1.0, 1.0]:
                orders.add(tuple(plan))
    assert len(orders) > 1  # which micro-batches go where is random
    assert balanced_plan(np.array([1.0]), 0, rng) == [] and balanced_plan(np.array([]), 4, rng) == []


def test_balanced_routing_splits_each_step_and_falls_back_when_the_planned_replica_is_out():
    """With random routing a step's 4 micro-batches all went to one of 2 replicas 1 step in 8; balanced, each
    replica serves 2 each step. A planned replica that was banned or failed since the plan is replaced by a
    weighted random choice among the others."""
    trainer_key = Identity.generate()
    manifest = local_manifest("routing", "tiny", 2, Identity.generate(), trainer_key, Identity.generate())
    corpus = Corpus(np.zeros(5000, np.uint8), np.zeros(100, np.uint8), "t", 1, 1)
    anns = [StageAnnouncement("routing", 0, p, StageState.ONLINE, (0, 1), 1.0, bytes(32)) for p in ("a", "b")]
    for routing in ("balanced", "random"):
        trainer = Trainer(TrainerConfig(microbatches=4, routing=routing), manifest, trainer_key, corpus)
        trainer.stages = {1: anns}
        splits = [sorted(Counter(trainer._planned_pick(1, step, step * 4 + i)(set()) for i in range(4)).values())
                  for step in range(200)]  # fmt: skip
        if routing == "balanced":
            assert all(split == [2, 2] for split in splits)
        else:
            assert 10 < sum(split == [4] for split in splits) < 45  # about 1 in 8
    trainer = Trainer(TrainerConfig(microbatches=4), manifest, trainer_key, corpus)
    trainer.stages = {1: anns}
    planned = [trainer._planned_pick(1, 0, i)(set()) for i in range(4)]
    trainer.banned.add("a")
    assert {trainer._planned_pick(1, 0, i)(set()) for i in range(4)} == {"b"}
    assert trainer._planned_pick(1, 0, planned.index("b"))({"b"}) == "a"  # excluded after a failure: banned is used
    with pytest.raises(ValueError, match="routing"):
        Trainer(TrainerConfig(routing="nope"), manifest, trainer_key, corpus)
