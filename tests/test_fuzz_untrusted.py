"""Untrusted input, fuzzed: mutated record tuples, verdicts, signed DHT values, RPC metadata and tensor headers from a
peer never raise anything but the typed errors the callers handle (RecordError, InputRejected, BadRequest). Seeded
and bounded (a few thousand cases, about a second); a failure prints the seed and the input that escaped."""

from __future__ import annotations

import dataclasses
import random

import msgpack
import pytest
import torch
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer

from swarm.dht_schema import (
    SentinelRecordValidator,
    dht_key_id,
    directory_key,
    make_subkey,
    stage_key,
    strike_index_discriminator,
    strike_index_key,
    strikes_key,
)
from swarm.identity import Identity
from swarm.protocol import BadRequest, TensorSpec, decode_hidden, encode_tensor, meta_bool, meta_int, unpack_meta
from swarm.records import (
    Direction,
    InputRejected,
    Manifest,
    RecordError,
    ReplicaDirectory,
    StageAnnouncement,
    StageState,
    StrikeIndexEntry,
    StrikeRecord,
    TaintNotice,
    ValidatorAnnouncement,
    Verdict,
    check_verdict,
    parse_record,
    sign_verdict,
)

AUTHORITY, VALIDATOR, TRAINER = (Identity.generate() for _ in range(3))
RUN = "fuzz"
DIGEST = bytes(range(32))
MANIFEST = Manifest(RUN, "tiny", 2, [(0, 2), (2, 4)], {"beta_forward": 0.9, "ban_level": 3}, [VALIDATOR.public_key],
                    [TRAINER.public_key], 1, 1.0, AUTHORITY.public_key)  # fmt: skip

# values a hostile peer may put anywhere: wrong types, extremes, non-finite floats, oversized strings and bytes
POOL = [None, True, False, 0, -1, 1, 7, 2**31, 2**63 - 1, 2**64, -(2**63), 0.0, -0.0, 1.5, 1e308, float("nan"),
        float("inf"), float("-inf"), "", "x", "x" * 5000, "\x00", "\u00e9", b"", b"\x00", bytes(32), bytes(33),
        b"\xff" * 64, bytes(5000), [], [1], [[1, 2]], [["a", 1]], [["a", float("nan")]], {}, {"a": 1}, {1: 2},
        [None] * 40]  # fmt: skip


def records() -> list:
    v = VALIDATOR.public_key
    verdict = sign_verdict(VALIDATOR, run_id=RUN, step=3, microbatch=1, boundary=1, direction=Direction.FORWARD,
                           verdict=Verdict.ACCEPT, digest=DIGEST, caller="QmTrainer")  # fmt: skip
    return [
        MANIFEST,
        MANIFEST.sign(AUTHORITY),
        StageAnnouncement(RUN, 1, "QmPeer", StageState.ONLINE, (2, 4), 3.5, TRAINER.public_key),
        ValidatorAnnouncement(RUN, 1, "QmValidator", 10.0, v),
        TaintNotice(RUN, 7, 3, 1, Direction.BACKWARD, "QmPeer", DIGEST, {"l1": 1.5}, "fence", v),
        StrikeRecord(RUN, "QmPeer", 2, False, [DIGEST], 7, v),
        StrikeIndexEntry(RUN, "QmPeer", v),
        ReplicaDirectory(RUN, 1, ("QmPeer", "QmOther"), v),
        verdict,
    ]


def mutate(rng: random.Random, wire: list) -> list:
    """One structural mutation of a wire tuple: a field or a nested element replaced, a field dropped, added or
    swapped; sometimes twice."""
    items = list(wire)
    for _ in range(rng.choice((1, 1, 2))):
        if not items:
            return [rng.choice(POOL)]
        i = rng.randrange(len(items))
        op = rng.randrange(5)
        if op == 0:
            items[i] = rng.choice(POOL)
        elif op == 1 and isinstance(items[i], (list, tuple)) and items[i]:
            inner = list(items[i])
            j = rng.randrange(len(inner))
            inner[j] = mutate(rng, inner[j]) if isinstance(inner[j], (list, tuple)) and rng.random() < 0.5 \
                else rng.choice(POOL)  # fmt: skip
            items[i] = inner
        elif op == 2:
            del items[i]
        elif op == 3:
            items.insert(i, rng.choice(POOL))
        else:
            j = rng.randrange(len(items))
            items[i], items[j] = items[j], items[i]
    return items


def flip_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    op = rng.randrange(3)
    if op == 0 and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif op == 1 and data:
        del data[rng.randrange(len(data)):]
    else:
        data[rng.randrange(len(data) + 1):rng.randrange(len(data) + 1)] = rng.randbytes(rng.randint(1, 16))
    return bytes(data)


@pytest.mark.parametrize("seed", range(3))
def test_mutated_record_tuples_raise_only_record_error(seed):
    rng = random.Random(seed)
    for record in records():
        wire = list(record.to_tuple())
        for _ in range(150):
            bad = mutate(rng, wire)
            candidates = [bad]
            try:  # as it arrives: msgpack'd (a map with int keys does not decode; the DHT path refuses it earlier)
                candidates.append(MSGPackSerializer.loads(MSGPackSerializer.dumps(bad)))
            except (ValueError, OverflowError):  # nor does an int past 64 bits pack
                pass
            for candidate in candidates:
                try:
                    parsed = parse_record(candidate)
                except RecordError:
                    continue
                except Exception as e:  # pragma: no cover - the failure this test exists to show
                    pytest.fail(f"seed {seed}: {type(e).__name__}: {e} from {candidate!r:.300}")
                assert type(parsed) is type(record)  # a mutation that still parses is a valid record of its kind


@pytest.mark.parametrize("seed", range(3))
def test_mutated_verdicts_are_rejected_with_a_typed_error(seed):
    rng = random.Random(seed)
    verdict = records()[-1]
    where = dict(manifest=MANIFEST, run_id=RUN, step=3, microbatch=1, boundary=1, direction=Direction.FORWARD,
                 digest=DIGEST, allow_trainer=False)  # fmt: skip
    check_verdict(verdict.to_tuple(), **where)  # the genuine one passes
    for _ in range(300):
        bad = mutate(rng, list(verdict.to_tuple()))
        try:
            check_verdict(bad, **where)
        except InputRejected:
            continue
        except Exception as e:  # pragma: no cover
            pytest.fail(f"seed {seed}: {type(e).__name__}: {e} from {bad!r:.300}")
        # it passed: then it must be the genuine verdict (a mutation that changed nothing the signature covers)
        assert bad[2:] == list(verdict.to_tuple())[2:], bad


def signed(writer: Identity, key: str, item, discriminator: bytes = b"") -> DHTRecord:
    record = DHTRecord(dht_key_id(key), MSGPackSerializer.dumps(make_subkey(writer.public_key, discriminator)),
                       MSGPackSerializer.dumps(item.to_tuple()), 2_000_000_000.0)  # fmt: skip
    policy = SentinelRecordValidator.from_manifest(MANIFEST, writer)
    return dataclasses.replace(record, value=policy.sign_value(record))


@pytest.mark.parametrize("seed", range(2))
def test_corrupted_signed_dht_values_raise_only_record_error(seed):
    """What a DHT node receives from a peer: the signed value, the subkey and the key, with bytes flipped, cut or
    inserted. The validator's policy (``_validate``, under ``validate``'s catch-all) refuses with RecordError."""
    rng = random.Random(seed)
    genuine = [
        signed(VALIDATOR, strikes_key(RUN, "QmBad"), StrikeRecord(RUN, "QmBad", 3, True, [DIGEST], 5,
                                                                   VALIDATOR.public_key)),
        signed(TRAINER, stage_key(RUN, 1), StageAnnouncement(RUN, 1, "QmPeer", StageState.ONLINE, (2, 4), 1.0,
                                                               TRAINER.public_key)),
        signed(VALIDATOR, strike_index_key(RUN), StrikeIndexEntry(RUN, "QmBad", VALIDATOR.public_key),
               strike_index_discriminator("QmBad")),
        signed(VALIDATOR, directory_key(RUN, 1), ReplicaDirectory(RUN, 1, ("QmPeer",), VALIDATOR.public_key)),
    ]  # fmt: skip
    for record in genuine:
        policy = SentinelRecordValidator.from_manifest(MANIFEST)
        assert policy.validate(record)
        for _ in range(200):
            field = rng.choice(("value", "subkey", "key"))
            bad = dataclasses.replace(record, **{field: flip_bytes(rng, getattr(record, field))})
            try:
                SentinelRecordValidator.from_manifest(MANIFEST)._validate(bad)
            except RecordError:
                continue
            except Exception as e:  # pragma: no cover
                pytest.fail(f"seed {seed}: {type(e).__name__}: {e} from {field} {getattr(bad, field)!r:.300}")


@pytest.mark.parametrize("seed", range(2))
def test_garbage_rpc_metadata_raises_only_bad_request(seed):
    rng = random.Random(seed)
    genuine = msgpack.packb({"run": RUN, "step": 3, "microbatch": 1, "tainted": False}, use_bin_type=True)
    for _ in range(400):
        raw = flip_bytes(rng, genuine) if rng.random() < 0.7 else rng.randbytes(rng.randint(0, 64))
        try:
            meta = unpack_meta(raw)
            meta_int(meta, "step")
            meta_bool(meta, "tainted")
        except BadRequest:
            continue
        except Exception as e:  # pragma: no cover
            pytest.fail(f"seed {seed}: {type(e).__name__}: {e} from {raw!r:.300}")


@pytest.mark.parametrize("seed", range(2))
def test_hostile_tensor_headers_raise_only_bad_request(seed):
    """A tensor proto whose dtype, shape, compression or buffer lie: refused before anything is allocated for it."""
    rng = random.Random(seed)
    spec = TensorSpec(d_model=8, seq_len=16, max_batch=4)
    genuine = encode_tensor(torch.randn(2, 5, 8))
    decode_hidden(genuine, spec, "hidden")
    sizes = [[2, 5, 8], [], [0, 5, 8], [2**32 - 1, 5, 8], [2**30, 2**30, 8], [2**31 - 1, 1, 8], [2, 5, 8, 1],
             [5, 2, 8], [2, 5, 7], [4, 16, 8]]  # fmt: skip
    for _ in range(300):
        proto = type(genuine)()
        proto.CopyFrom(genuine)
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(4)
            if op == 0:
                dtypes = ["float32", "float16", "bfloat16", "int64", "bool", "", "float32\x00", "x" * 300]
                proto.dtype = rng.choice(dtypes)
            elif op == 1:
                del proto.size[:]
                proto.size.extend(rng.choice(sizes))
            elif op == 2:
                proto.compression = rng.choice([0, 1, 2, 3, 4, 99])
            else:
                proto.buffer = flip_bytes(rng, proto.buffer)
        try:
            tensor = decode_hidden(proto, spec, "hidden")
        except BadRequest:
            continue
        except Exception as e:  # pragma: no cover
            pytest.fail(f"seed {seed}: {type(e).__name__}: {e} from dtype {proto.dtype!r:.40} size {list(proto.size)} "
                        f"compression {proto.compression} buffer {len(proto.buffer)} bytes")  # fmt: skip
        assert tensor.shape[2] == 8 and tensor.is_floating_point() and bool(torch.isfinite(tensor).all())


def garble_request(rng: random.Random, meta: dict, tensors: list, d_model: int, extra_keys: tuple = (),
                   tuple_keys: tuple = ()) -> tuple[dict, list]:  # fmt: skip
    """One mutation of a request: a metadata field (or one of ``extra_keys``) dropped or replaced, a verdict tuple
    under ``tuple_keys`` mutated in place, or a tensor dropped, added or given a lying header. ``meta`` is changed in
    place; the tensors come back as a new list."""
    tensors = list(tensors)
    if rng.random() < 0.6:
        key = rng.choice([*meta, *extra_keys])
        if rng.random() < 0.2:
            meta.pop(key, None)
        elif key in tuple_keys and rng.random() < 0.5:
            meta[key] = mutate(rng, meta[key])
        else:
            meta[key] = rng.choice(POOL)
        return meta, tensors
    op = rng.randrange(3)
    if op == 0:
        return meta, tensors[: rng.randrange(len(tensors))]
    if op == 1:
        return meta, [*tensors, encode_tensor(torch.randn(2, 5, d_model))]
    i = rng.randrange(len(tensors))
    proto = type(tensors[i])()
    proto.CopyFrom(tensors[i])
    proto.size[0] = rng.choice([0, 1, 3, 2**20])
    proto.buffer = flip_bytes(rng, proto.buffer)
    tensors[i] = proto
    return meta, tensors


def test_the_validator_service_answers_hostile_check_requests_with_typed_errors():
    """The whole check handler (``ValidatorService._serve``, no network): a genuine signed request gets a verdict;
    requests with metadata fields replaced, dropped or added, and tensors dropped, added or with lying headers, get a
    typed error reply, never the catch-all ``internal`` one that an unexpected exception would produce."""
    import asyncio

    from hivemind.proto import runtime_pb2

    from sentinel.config import SentinelConfig
    from swarm.protocol import pack_meta, sign_check
    from swarm.records import tensor_digest
    from swarm.stage_server import manifest_model_config
    from swarm.validator_service import ValidatorService, ValidatorServiceConfig

    rng = random.Random(0)
    service = ValidatorService(ValidatorServiceConfig(), MANIFEST, VALIDATOR, SentinelConfig())
    d_model = manifest_model_config(MANIFEST).d_model
    x, ref = torch.randn(2, 5, d_model), torch.randn(2, 5, d_model)
    fields = dict(run_id=RUN, step=3, microbatch=1, boundary=1, direction=Direction.FORWARD, sender="QmPeer",
                  tainted=False, warmup=True, digest=tensor_digest(x),
                  reference_digest=tensor_digest(ref))  # fmt: skip
    meta = {"run": RUN, "step": 3, "mb": 1, "boundary": 1, "direction": 0, "sender": "QmPeer", "tainted": False,
            "warmup": True, "trainer": TRAINER.public_key, "signature": sign_check(TRAINER, **fields)}  # fmt: skip
    tensors = [encode_tensor(x), encode_tensor(ref)]

    def request(meta: dict, tensors: list) -> runtime_pb2.ExpertRequest:
        return runtime_pb2.ExpertRequest(metadata=pack_meta(meta), tensors=tensors)

    async def main() -> list[tuple[str, str]]:
        genuine = unpack_meta((await service._serve(request(meta, tensors))).metadata)
        assert "error" not in genuine and genuine.get("verdict") is not None, genuine
        internal = []
        for _ in range(300):
            bad_meta, bad_tensors = garble_request(rng, dict(meta), tensors, d_model, ("reference_digest", "extra"))
            try:
                reply = unpack_meta((await service._serve(request(bad_meta, bad_tensors))).metadata)
            except (ValueError, OverflowError, TypeError):  # the metadata itself does not pack: it cannot be sent
                continue
            if reply.get("error") == "internal":
                internal.append((reply.get("message"), repr(bad_meta)[:300]))
        return internal

    try:
        internal = asyncio.run(main())
    finally:
        service._executor.shutdown(wait=True)
        service._publisher.shutdown(wait=True)
    assert not internal, internal[:3]


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_the_stage_server_answers_hostile_requests_with_typed_errors(kind):
    """The stage's request handler (``StageServer._serve``, no network), as above: a genuine request (stage 1, inputs
    vouched for by the trainer, the gradient by the validator) is served; mutated ones get typed error replies."""
    import asyncio

    from hivemind.proto import runtime_pb2

    from swarm.protocol import pack_meta
    from swarm.records import tensor_digest
    from swarm.stage_server import StageServer, StageServerConfig, manifest_model_config

    rng = random.Random(1)
    server = StageServer(StageServerConfig(stage=1, seed=0), MANIFEST, Identity.generate())
    d_model = manifest_model_config(MANIFEST).d_model
    h, g = torch.randn(2, 5, d_model), torch.randn(2, 5, d_model)

    def verdict(signer: Identity, boundary: int, direction: Direction, tensor: torch.Tensor, mb: int) -> list:
        return list(sign_verdict(signer, run_id=RUN, step=3, microbatch=mb, boundary=boundary, direction=direction,
                                 verdict=Verdict.ACCEPT, digest=tensor_digest(tensor),
                                 caller="QmTrainer").to_tuple())  # fmt: skip

    def genuine(mb: int) -> tuple[dict, list]:
        meta = {"run": RUN, "step": 3, "mb": mb, "verdict": verdict(TRAINER, 0, Direction.FORWARD, h, mb)}
        if kind == "backward":
            meta["grad_verdict"] = verdict(VALIDATOR, 1, Direction.BACKWARD, g, mb)
            return meta, [encode_tensor(h), encode_tensor(g)]
        return meta, [encode_tensor(h)]

    async def serve(meta: dict, tensors: list) -> dict:
        request = runtime_pb2.ExpertRequest(metadata=pack_meta(meta), tensors=tensors)
        return unpack_meta((await server._serve(kind, request)).metadata)

    async def main() -> list:
        reply = await serve(*genuine(0))
        assert "error" not in reply, reply
        internal = []
        for i in range(200):
            meta, tensors = genuine(i + 1)  # a fresh micro-batch each time, as a replay is answered without an update
            meta, tensors = garble_request(rng, meta, tensors, d_model, ("extra",), ("verdict", "grad_verdict"))
            try:
                reply = await serve(meta, tensors)
            except (ValueError, OverflowError, TypeError):  # the metadata itself does not pack: it cannot be sent
                continue
            if reply.get("error") == "internal":
                internal.append((reply.get("message"), repr(meta)[:300]))
        return internal

    try:
        internal = asyncio.run(main())
    finally:
        server._executor.shutdown(wait=True)
    assert not internal, internal[:3]


@pytest.mark.parametrize("seed", range(2))
def test_hostile_replies_raise_only_typed_errors_at_the_caller(seed):
    """What a trainer (or an averaging replica) reads back from a peer: the reply's metadata (an error code, a
    verdict) and its tensor, each garbled. Only ProtocolError or InputRejected subclasses come out."""
    from hivemind.proto import runtime_pb2

    from swarm.protocol import ProtocolError, _checked_reply, decode_reply_tensor, pack_meta, verdict_from_meta

    rng = random.Random(seed)
    spec = TensorSpec(d_model=8, seq_len=16, max_batch=4)
    verdict = list(records()[-1].to_tuple())
    good = {"verdict": verdict, "tainted": False, "reason": ""}
    tensor = encode_tensor(torch.randn(2, 5, 8))
    for _ in range(300):
        meta = dict(good)
        op = rng.randrange(4)
        if op == 0:
            meta["error"], meta["message"] = rng.choice([*POOL, "bad_request", "forged_verdict", "internal"]), \
                rng.choice(POOL)  # fmt: skip
        elif op == 1:
            meta["verdict"] = mutate(rng, verdict)
        elif op == 2:
            meta[rng.choice(["verdict", "tainted", "reason"])] = rng.choice(POOL)
        try:
            raw = pack_meta(meta)
        except (ValueError, OverflowError, TypeError):
            continue
        if op == 3:
            raw = flip_bytes(rng, raw)
        proto = type(tensor)()
        proto.CopyFrom(tensor)
        if rng.random() < 0.5:
            proto.buffer = flip_bytes(rng, proto.buffer)
        response = runtime_pb2.ExpertResponse(metadata=raw, tensors=[proto] if rng.random() < 0.8 else [])
        try:
            checked = _checked_reply(response)
            reply = unpack_meta(checked.metadata)
            verdict_from_meta(reply, "verdict")
            decode_reply_tensor(checked, spec)
        except (ProtocolError, InputRejected):
            continue
        except Exception as e:  # pragma: no cover
            pytest.fail(f"seed {seed}: {type(e).__name__}: {e} from {meta!r:.300}")
