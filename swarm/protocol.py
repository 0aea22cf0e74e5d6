"""The wire protocol between trainer, stage servers and validators: typed messages over hivemind ``ServicerBase``.

Every RPC carries a ``runtime_pb2.ExpertRequest`` (tensors + msgpack ``metadata``) and answers a
``runtime_pb2.ExpertResponse``. This module owns the (de)serialisation and the explicit checks that run on every
remote input BEFORE any compute; the services (``stage_server``, ``validator_service``) only see typed values.

Messages (metadata keys in brackets)::

    forward   tensors [h]            meta {run, step, mb, verdict}                 -> [out]
    backward  tensors [h, grad_out]  meta {run, step, mb, verdict, grad_verdict}   -> [grad_in]
    check     tensors [x, reference] meta {run, step, mb, boundary, direction, sender, tainted, warmup,
                                           trainer, signature}                     -> [] or [replacement],
                                                                                      meta {verdict, taint_verdict,
                                                                                            tainted, reason, scores}
    parameters tensors []            meta {run, stage}                             -> streamed [every parameter
                                                                                      of the stage, in order]

Errors never travel as Python exceptions: a service answers ``meta {"error": code, "message": text}`` and the
client raises the matching typed error, so a caller can tell apart

* :class:`BadRequest` (``code == "bad_request"``): the request itself was malformed (shape, dtype, size, NaN...);
* an :class:`~swarm.records.InputRejected` subclass (its own code): the tensor lacked a valid verdict;
* :class:`RemoteFailure` (``"internal"``): the server failed while handling a well-formed request;
* :class:`TransportError`: nothing usable came back (dial failure, timeout, handler crash, garbage reply).

Sizes: hivemind's unary messages are capped at 4 MiB, so a message whose tensors exceed
:data:`MAX_UNARY_TENSOR_BYTES` (2 MiB, hivemind's own switch-to-streaming threshold) is streamed instead:
``forward_stream``, ``backward_stream`` and ``check_stream`` carry the same request and reply as their unary twins,
cut into parts (:func:`split_message`): the first part holds the metadata, and every tensor is split by hivemind's
``split_for_streaming`` into chunks of :data:`STREAM_CHUNK_BYTES`, one chunk per part. :func:`call_auto` picks unary
or stream per call: it streams when the request's tensors, or the largest reply the call can get (one tensor like the
first request tensor, 4 bytes a value), exceed the unary threshold. A streamed reply comes back the same way, then
an end marker (an empty part: :func:`reply_parts`), after which the caller hangs up; the server holds the stream open
until it does, for at most :data:`REPLY_LINGER` seconds (hivemind ends a reply stream by closing it, and replies cut
short by that close were measured on loopback; a reply without its marker is a transport error). Both
sides reassemble with :func:`gather_stream`, which checks every part against its bounds as it arrives (the tensor
headers' compression, dtype and declared size, at most ``max_tensors`` tensors of at most ``max_tensor_bytes`` each
(servers derive it from their :class:`TensorSpec`: ``max_batch * seq_len * d_model * 4``), at most
:data:`MAX_STREAM_TENSOR_BYTES` in all, exact chunk framing, metadata on the first part only, a bounded part count)
and raises :class:`BadRequest` before the rest of an oversized or inconsistent stream is read or allocated. The
reassembled request then goes through exactly the same handler code, checks and typed errors as a unary one; an
error is answered as a one-part stream holding the usual error metadata. A unary request over the threshold is
refused (``bad_request``), and so is one whose reply could not fit a unary message (checked before computing).
:class:`PayloadTooLarge` is left for tensors over :data:`MAX_STREAM_TENSOR_BYTES`, raised by the client before
anything is sent. The thresholds are read at call time, so a test may lower them on both sides of a loopback swarm.
A server gives a stream :data:`STREAM_RECEIVE_TIMEOUT` seconds to arrive whole; after refusing a stream early it
reads and drops the rest for up to :data:`STREAM_DRAIN_TIMEOUT` seconds (see :func:`answer_stream`). Limit: hivemind
reads each stream frame whole before a handler sees it (its stream framing has no size cap, unlike the 4 MiB of
unary messages), so a part bigger than a chunk is refused only once it has been read.

Wire compression: only ``NONE`` and ``FLOAT16``. A verdict is bound to the digest of the tensor *as the receiver
decodes it*, so whoever signs a verdict first passes the tensor through :func:`as_received` (FLOAT16 rounding is
idempotent, so the same bits arrive however often the tensor is re-sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import torch
from google.protobuf.message import DecodeError
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from sentinel.stats import all_finite
from swarm.identity import Identity
from swarm.records import (
    DOMAIN_TAG,
    Direction,
    InputRejected,
    RecordError,
    SignedVerdict,
    tensor_digest,
)

MAX_UNARY_TENSOR_BYTES = 2 * 2**20  # sum of serialized tensor buffers in one unary message; above: streamed
STREAM_CHUNK_BYTES = 2**20  # tensor bytes per streamed part
MAX_STREAM_TENSOR_BYTES = 2**30  # sum of serialized tensor buffers in one streamed message (hard bound)
STREAM_RECEIVE_TIMEOUT = 120.0  # seconds a server waits for a whole streamed request
STREAM_DRAIN_TIMEOUT = 5.0  # seconds a server reads (and drops) the rest of a stream it refused early
REPLY_LINGER = 60.0  # seconds a server keeps a streamed reply open after its end marker, for the caller to hang up
MAX_METADATA_BYTES = 16 * 2**10
MAX_BATCH = 1024  # sequences per micro-batch
MAX_SENDER = 128
ALLOWED_COMPRESSION = (runtime_pb2.CompressionType.NONE, runtime_pb2.CompressionType.FLOAT16)
FLOAT_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 4}  # bf16 travels as fp32 (hivemind's legacy default)
_WIRE_BYTES = {runtime_pb2.CompressionType.NONE: None, runtime_pb2.CompressionType.FLOAT16: 2}


# ------------------------------------------------------------------------------------------------------------ errors
class ProtocolError(Exception):
    """Base of the errors a client can tell apart. ``code`` crosses the wire."""

    code: ClassVar[str] = "protocol_error"


class BadRequest(ProtocolError):
    """The request is malformed (shape, dtype, size, non-finite values, bad metadata). Not the server's fault."""

    code = "bad_request"


class ReferenceMissing(BadRequest):
    """A check named its reference by digest, and the validator no longer holds that tensor: send it in full."""

    code = "reference_missing"


class PayloadTooLarge(BadRequest):
    """The tensors exceed :data:`MAX_STREAM_TENSOR_BYTES`, the hard bound of one (streamed) message."""


class RemoteFailure(ProtocolError):
    """The server failed while handling a well-formed request."""

    code = "internal"


class Busy(ProtocolError):
    """The server is already reassembling as many streamed requests as it admits at once: try another peer."""

    code = "busy"


class Unauthorized(ProtocolError):
    """The caller may not make this request (e.g. a check request not signed by an authorized trainer)."""

    code = "unauthorized"


class TransportError(ProtocolError):
    """No usable reply: the peer is unreachable, timed out, crashed in its handler or answered garbage."""

    code = "transport"


def error_from_code(code: str, message: str) -> Exception:
    """The typed exception for an error code received from a server."""
    if code == BadRequest.code:
        return BadRequest(message)
    if code == ReferenceMissing.code:
        return ReferenceMissing(message)
    if code == RemoteFailure.code:
        return RemoteFailure(message)
    if code == Busy.code:
        return Busy(message)
    if code == Unauthorized.code:
        return Unauthorized(message)
    rejected = InputRejected.from_code(code, message)
    if type(rejected) is InputRejected and code != InputRejected.code:
        return TransportError(f"unknown error code from server: {code!r:.40}")
    return rejected


def error_response(error: Exception) -> runtime_pb2.ExpertResponse:
    """What a service answers for an error: only its code and a short message (never a traceback)."""
    if isinstance(error, (ProtocolError, InputRejected)):
        code, message = error.code, str(error)[:200]
    else:
        code, message = RemoteFailure.code, type(error).__name__
    return runtime_pb2.ExpertResponse(metadata=pack_meta({"error": code, "message": message}))


# ------------------------------------------------------------------------------------------------------- metadata
def pack_meta(meta: dict[str, Any]) -> bytes:
    return msgpack.packb(meta, use_bin_type=True)


def unpack_meta(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_METADATA_BYTES:
        raise BadRequest("metadata too large")
    try:
        meta = msgpack.unpackb(raw, raw=False, strict_map_key=True) if raw else {}
    except Exception:
        raise BadRequest("metadata is not msgpack") from None
    if type(meta) is not dict:
        raise BadRequest("metadata must be a map")
    return meta


def meta_int(meta: dict, name: str, *, lo: int = 0, hi: int = 2**63 - 1) -> int:
    value = meta.get(name)
    if type(value) is not int or not lo <= value <= hi:
        raise BadRequest(f"metadata field {name!r} must be an int in [{lo}, {hi}]")
    return value


def meta_bool(meta: dict, name: str) -> bool:
    value = meta.get(name, False)
    if type(value) is not bool:
        raise BadRequest(f"metadata field {name!r} must be a bool")
    return value


def meta_str(meta: dict, name: str, *, max_len: int = MAX_SENDER) -> str:
    value = meta.get(name)
    if type(value) is not str or not 1 <= len(value) <= max_len:
        raise BadRequest(f"metadata field {name!r} must be a str of 1 to {max_len} characters")
    return value


def meta_verdict(meta: dict, name: str) -> Any:
    """The raw verdict tuple (checked later by ``check_verdict``, which tells missing from malformed)."""
    value = meta.get(name)
    if value is not None and type(value) not in (list, tuple):
        raise BadRequest(f"metadata field {name!r} must be a verdict tuple")
    return value


def verdict_from_meta(meta: dict, name: str) -> SignedVerdict | None:
    """A verdict in a validator's *response* (client side): parsed strictly, TransportError if malformed."""
    value = meta.get(name)
    if value is None:
        return None
    try:
        return SignedVerdict.from_tuple(value)
    except RecordError as e:
        raise TransportError(f"malformed verdict in reply: {e}") from None


# -------------------------------------------------------------------------------------------------------- tensors
def as_received(tensor: torch.Tensor, compression: int = runtime_pb2.CompressionType.NONE) -> torch.Tensor:
    """The tensor exactly as a receiver decodes it (CPU, detached): what a verdict's digest must cover."""
    tensor = tensor.detach().to("cpu")
    if compression == runtime_pb2.CompressionType.NONE:
        return tensor.contiguous()
    return deserialize_torch_tensor(serialize_torch_tensor(tensor, compression))


def encode_tensor(tensor: torch.Tensor, compression: int = runtime_pb2.CompressionType.NONE) -> runtime_pb2.Tensor:
    if compression not in ALLOWED_COMPRESSION:
        raise ValueError("only CompressionType.NONE and FLOAT16 are supported on the wire")
    return serialize_torch_tensor(tensor.detach().to("cpu"), compression)


def encode_tensors(
    tensors: Sequence[torch.Tensor], compression: int = runtime_pb2.CompressionType.NONE
) -> list[runtime_pb2.Tensor]:
    """Serialize for one message (unary or streamed); PayloadTooLarge over MAX_STREAM_TENSOR_BYTES."""
    encoded = [encode_tensor(t, compression) for t in tensors]
    total = tensor_bytes(encoded)
    if total > MAX_STREAM_TENSOR_BYTES:
        raise PayloadTooLarge(f"{total} bytes of tensors exceed the {MAX_STREAM_TENSOR_BYTES}-byte limit of a message")
    return encoded


def tensor_bytes(protos: Sequence[runtime_pb2.Tensor]) -> int:
    """The serialized tensor buffers' total length: what the unary and stream limits count."""
    return sum(len(t.buffer) for t in protos)


def wire_nbytes(proto: runtime_pb2.Tensor, name: str) -> int:
    """The buffer length a tensor header implies; BadRequest for a compression or dtype the protocol refuses."""
    if proto.compression not in ALLOWED_COMPRESSION:
        raise BadRequest(f"{name}: compression must be NONE or FLOAT16")
    if proto.dtype not in FLOAT_DTYPES:
        raise BadRequest(f"{name}: dtype must be one of {sorted(FLOAT_DTYPES)}")
    return math.prod(proto.size) * (_WIRE_BYTES[proto.compression] or FLOAT_DTYPES[proto.dtype])


@dataclass(frozen=True)
class TensorSpec:
    """What a service accepts: ``[B, T, d_model]`` with ``1 <= B <= max_batch`` and ``1 <= T <= seq_len``."""

    d_model: int
    seq_len: int
    max_batch: int = MAX_BATCH


def decode_hidden(
    proto: runtime_pb2.Tensor, spec: TensorSpec, name: str, *, require_finite: bool = True
) -> torch.Tensor:
    """Validate a serialized hidden-state tensor, then decode it. Raises BadRequest; never asserts.

    Checks run on the proto first (compression, dtype, shape, buffer length), so nothing is allocated for a
    hostile header; then the decoded values for finiteness (unless ``require_finite=False``, for validators, whose
    job is to flag non-finite tensors).
    """

    def check_shape(shape: tuple[int, ...]) -> None:
        if len(shape) != 3 or shape[2] != spec.d_model:
            raise BadRequest(f"{name}: shape must be [B, T, {spec.d_model}]")
        batch, length, _ = shape
        if not 1 <= batch <= spec.max_batch or not 1 <= length <= spec.seq_len:
            raise BadRequest(f"{name}: need 1 <= B <= {spec.max_batch} and 1 <= T <= {spec.seq_len}")

    return _decode_checked(proto, name, check_shape, require_finite=require_finite)


def _decode_checked(
    proto: runtime_pb2.Tensor, name: str, check_shape: Callable[[tuple[int, ...]], None], *, require_finite: bool
) -> torch.Tensor:
    """Decode ``proto`` after checking its header (compression, dtype, ``check_shape`` on its declared shape, buffer
    length); then that the decoded tensor matches its header and, with ``require_finite``, is finite. BadRequest."""
    nbytes = wire_nbytes(proto, name)
    shape = tuple(proto.size)
    check_shape(shape)
    if len(proto.buffer) != nbytes:
        raise BadRequest(f"{name}: buffer length does not match shape and dtype")
    try:
        tensor = deserialize_torch_tensor(proto)
    except Exception:
        raise BadRequest(f"{name}: undecodable tensor") from None
    if tuple(tensor.shape) != shape or not tensor.is_floating_point():
        raise BadRequest(f"{name}: decoded tensor does not match its header")
    if require_finite and not all_finite(tensor):
        raise BadRequest(f"{name}: non-finite values")
    return tensor


def decode_parameters(reply: runtime_pb2.ExpertResponse, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A peer's parameters from its ``parameters`` reply, checked like any remote input (:func:`_decode_checked`):
    one float tensor per tensor of ``like``, each of its shape, finite. TransportError otherwise (the peer is no more
    trusted than a caller)."""
    if len(reply.tensors) != len(like):
        raise TransportError(f"expected {len(like)} parameter tensors, got {len(reply.tensors)}")
    out = []
    for i, (proto, mine) in enumerate(zip(reply.tensors, like)):
        name, want = f"parameter {i}", tuple(mine.shape)

        def exact(shape: tuple[int, ...], name: str = name, want: tuple[int, ...] = want) -> None:
            if shape != want:
                raise BadRequest(f"{name}: shape {shape} does not match {want}")

        try:
            tensor = _decode_checked(proto, name, exact, require_finite=True)
        except BadRequest as e:
            raise TransportError(str(e)) from None
        out.append(tensor.to(mine.dtype))
    return out


def max_hidden_bytes(spec: TensorSpec) -> int:
    """The largest serialized hidden-state tensor ``spec`` admits (``[max_batch, seq_len, d_model]``, 4 bytes a value):
    the per-tensor bound of a streamed message."""
    return spec.max_batch * spec.seq_len * spec.d_model * max(FLOAT_DTYPES.values())


def request_tensors(request: runtime_pb2.ExpertRequest, count: int) -> Sequence[runtime_pb2.Tensor]:
    if len(request.tensors) != count:
        raise BadRequest(f"expected {count} tensor(s), got {len(request.tensors)}")
    return request.tensors


def check_unary_request(request: runtime_pb2.ExpertRequest) -> None:
    """A unary request must fit the unary budget (a larger one belongs on the ``*_stream`` RPC)."""
    if tensor_bytes(request.tensors) > MAX_UNARY_TENSOR_BYTES:
        raise BadRequest("tensors exceed the unary size limit: use the stream RPC")


def check_unary_reply(numel: int, compression: int) -> None:
    """Before computing a unary request's reply (one tensor of ``numel`` values, sent with ``compression``): refuse
    it if it could not travel as a unary message. :func:`call_auto` never sends such a request."""
    if numel * (_WIRE_BYTES[compression] or 4) > MAX_UNARY_TENSOR_BYTES:
        raise BadRequest("the reply would exceed the unary size limit: use the stream RPC")


# ------------------------------------------------------------------------------------------------------ streaming
def split_message(message: runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse) -> Iterator:
    """The parts of a streamed message (parts have the message's type): the first carries the metadata, each part at
    most one chunk of :data:`STREAM_CHUNK_BYTES` of one tensor; a message without tensors is one part."""
    cls = type(message)
    chunks = (chunk for t in message.tensors for chunk in split_for_streaming(t, STREAM_CHUNK_BYTES))
    first = next(chunks, None)
    yield cls(metadata=message.metadata, tensors=[] if first is None else [first])
    for chunk in chunks:
        yield cls(tensors=[chunk])


def reply_parts(message: runtime_pb2.ExpertResponse) -> Iterator[runtime_pb2.ExpertResponse]:
    """The parts of a streamed reply: :func:`split_message`'s, then the end marker (an empty part).

    Why a marker: hivemind ends a reply stream by closing it, and a caller cannot tell that close from one that cut
    the stream short. Measured on loopback: with 4 streamed replies of a stage's 28 parameter tensors in flight at
    once between two peers, 4 of 800 arrived with their last tensors missing and no error (the server had written
    them; closing the stream right after dropped them). So a reply ends with the marker, the caller stops reading
    there and hangs up, and the server keeps the stream open until it does (:data:`REPLY_LINGER` at most): no data is
    in flight when the stream closes, and a reply without its marker is a transport error."""
    yield from split_message(message)
    yield type(message)()


async def linger() -> None:
    """A streamed reply's last act on the server: wait for the caller to hang up, which cancels this (hivemind stops
    the handler once the caller has closed its end), for at most :data:`REPLY_LINGER` seconds."""
    await asyncio.sleep(REPLY_LINGER)


async def gather_stream(
    parts: AsyncIterator, cls: type, *, max_tensors: int, max_tensor_bytes: int, end_marker: bool = False,
    on_metadata: Callable[[bytes], None] | None = None,
):
    """Reassemble a message of type ``cls`` from the parts of :func:`split_message`, checking bounds as parts arrive.

    With ``end_marker`` (replies, :func:`reply_parts`) the message ends at its end marker, an empty part after the
    first, and nothing after it is read; a stream that ends before it raises BadRequest. Without (requests, which
    hivemind ends with an explicit end-of-stream message), at the end of the stream.

    BadRequest, raised before reading further parts, for: an empty stream; more than ``1 + max_tensors *
    ceil(max_tensor_bytes / STREAM_CHUNK_BYTES)`` parts; metadata after the first part; a part with several chunks, or
    a later part with none; more than ``max_tensors`` tensors; a tensor header with a refused compression or dtype, an
    empty or over-``max_tensor_bytes`` size, a running total over :data:`MAX_STREAM_TENSOR_BYTES`, or a chunk count
    that disagrees with its size; a continuation chunk carrying header fields; a chunk whose length is not
    ``min(STREAM_CHUNK_BYTES, bytes left)``; a stream ending inside a tensor. Shapes, values and the tensor count a
    request needs are checked afterwards by the same code as a unary request's. ``on_metadata(metadata)`` runs on the
    first part, before any other is read (a server's authorization: whatever it raises ends the stream there).
    """
    chunk_bytes = STREAM_CHUNK_BYTES
    max_parts = 1 + max_tensors * max(1, math.ceil(max_tensor_bytes / chunk_bytes))
    metadata, done, n_parts, total = b"", [], 0, 0
    header: runtime_pb2.Tensor | None = None
    pieces: list[bytes] = []
    expected = received = 0
    ended = False
    async for part in parts:
        n_parts += 1
        if end_marker and n_parts > 1 and not part.tensors and not part.metadata:
            ended = True
            break
        if n_parts > max_parts:
            raise BadRequest(f"stream has more than {max_parts} parts")
        if n_parts == 1:
            metadata = part.metadata
            if on_metadata is not None:
                on_metadata(metadata)
        elif part.metadata:
            raise BadRequest("only the first part of a stream may carry metadata")
        if len(part.tensors) > 1 or (n_parts > 1 and not part.tensors):
            raise BadRequest("a streamed part must carry one tensor chunk")
        for chunk in part.tensors:
            if header is None:  # a new tensor: its header is checked before any of its chunks are kept
                if len(done) >= max_tensors:
                    raise BadRequest(f"stream carries more than {max_tensors} tensor(s)")
                expected = wire_nbytes(chunk, "streamed tensor")
                if not 0 < expected <= max_tensor_bytes or total + expected > MAX_STREAM_TENSOR_BYTES:
                    raise BadRequest(f"streamed tensor size {expected}: need 0 < size <= {max_tensor_bytes} bytes, "
                                     f"at most {MAX_STREAM_TENSOR_BYTES} in all")  # fmt: skip
                if chunk.chunks != math.ceil(expected / chunk_bytes):
                    raise BadRequest("streamed tensor's chunk count disagrees with its size")
                header, pieces, received, total = chunk, [], 0, total + expected
            elif chunk.size or chunk.dtype or chunk.chunks or chunk.compression or chunk.requires_grad:
                raise BadRequest("a continuation chunk carries tensor header fields")
            if len(chunk.buffer) != min(chunk_bytes, expected - received):
                raise BadRequest("streamed chunk length disagrees with its tensor's header")
            pieces.append(chunk.buffer)
            received += len(chunk.buffer)
            if received == expected:
                done.append(runtime_pb2.Tensor(
                    compression=header.compression, size=header.size, dtype=header.dtype,
                    requires_grad=header.requires_grad, buffer=b"".join(pieces),
                ))  # fmt: skip
                header, pieces = None, []
    if n_parts == 0:
        raise BadRequest("empty stream")
    if header is not None:
        raise BadRequest("stream ended inside a tensor")
    if end_marker and not ended:
        raise BadRequest("stream ended before its end marker")
    return cls(metadata=metadata, tensors=done)


# ------------------------------------------------------------------------------------------- check authorization
def check_request_bytes(
    *, run_id: str, step: int, microbatch: int, boundary: int, direction: Direction, sender: str, tainted: bool,
    warmup: bool, digest: bytes, reference_digest: bytes | None,
) -> bytes:
    """What a trainer signs to ask a validator for a check. Binding ``warmup`` and ``tainted`` matters: either flag
    makes the validator sign ACCEPT without blaming, so an unauthenticated caller could launder a tensor with it."""
    return msgpack.packb(
        [DOMAIN_TAG, b"check", run_id, step, microbatch, boundary, int(direction), sender, tainted, warmup, digest,
         reference_digest],
        use_bin_type=True,
    )  # fmt: skip


# -------------------------------------------------------------------------------------------------------- server
class StreamSlots:
    """At most ``limit`` streamed requests in hand at once on one server, from their first part to their reply.

    Each may hold up to its ``max_tensors`` x the TensorSpec's bound in memory while it arrives, so without a limit a
    peer opening many streams at once could exhaust the server's memory. One over the limit is refused at once with
    :class:`Busy` (the caller retries elsewhere) rather than queued. For one event loop (no locking)."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"the stream limit must be >= 1, got {limit}")
        self.limit = limit
        self.active = 0
        self.refused = 0

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        if self.active >= self.limit:
            self.refused += 1
            raise Busy(f"already handling {self.active} streamed request(s), the most this server admits")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


async def receive_stream(
    parts: AsyncIterator[runtime_pb2.ExpertRequest], *, max_tensors: int, spec: TensorSpec,
    authorize: Callable[[dict], None] | None = None,
) -> runtime_pb2.ExpertRequest:
    """A server's side of a streamed request: reassembled by :func:`gather_stream` with at most ``max_tensors``
    hidden states within ``spec``, within STREAM_RECEIVE_TIMEOUT seconds (else BadRequest).

    ``authorize(metadata)`` runs as soon as the first part is in, before the tensors are read: a stream slot (and up
    to a request's worth of memory) is held only by a caller that shows its signed authority first. Without it, eight
    strangers' streams that sent one part and stalled held every slot of a server for up to 120 s."""
    timeout = STREAM_RECEIVE_TIMEOUT
    check = None if authorize is None else (lambda metadata: authorize(unpack_meta(metadata)))
    gathering = gather_stream(parts, runtime_pb2.ExpertRequest, max_tensors=max_tensors,
                              max_tensor_bytes=max_hidden_bytes(spec), on_metadata=check)  # fmt: skip
    try:
        return await asyncio.wait_for(gathering, timeout)
    except asyncio.TimeoutError:
        raise BadRequest(f"streamed request did not arrive within {timeout} s") from None


async def answer_stream(
    requests: AsyncIterator[runtime_pb2.ExpertRequest],
    handle: Callable[[AsyncIterator[runtime_pb2.ExpertRequest]], Awaitable[runtime_pb2.ExpertResponse]],
) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """A server's streamed RPC: the parts of ``await handle(requests)`` (the reply, or the error reply).

    A request refused before it was read whole (by :func:`gather_stream`'s bounds) is then read to its end and
    dropped, for at most STREAM_DRAIN_TIMEOUT seconds (a caller that got the error reply hangs up at once): closing
    a stream whose input is still arriving resets it, and the reset can discard the error reply before the caller
    reads it (seen on loopback: ``ConnectionResetError`` instead of ``BadRequest``).
    """
    for part in reply_parts(await handle(requests)):
        yield part

    async def drain() -> None:
        async for _ in requests:
            pass

    try:
        await asyncio.wait_for(drain(), STREAM_DRAIN_TIMEOUT)
    except asyncio.TimeoutError:
        pass
    await linger()


# -------------------------------------------------------------------------------------------------------- client
@dataclass
class CheckReply:
    """A validator's answer. ``tensor`` is what to pass on (the input or its replacement; None when dropped) and
    ``verdict`` the signed ACCEPT for exactly that tensor; ``taint_verdict`` the signed TAINT of the original."""

    tainted: bool
    tensor: torch.Tensor | None
    verdict: SignedVerdict | None
    taint_verdict: SignedVerdict | None = None
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)


_TRANSPORT_ERRORS = (P2PDaemonError, P2PHandlerError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                     ConnectionError, OSError)  # fmt: skip


def _checked_reply(response: runtime_pb2.ExpertResponse) -> runtime_pb2.ExpertResponse:
    """The reply itself, or the typed error it carries (TransportError if its metadata is unreadable)."""
    try:
        meta = unpack_meta(response.metadata)
    except BadRequest as e:
        raise TransportError(f"bad reply: {e}") from None
    if "error" in meta:
        code, message = meta.get("error"), meta.get("message", "")
        raise error_from_code(code if isinstance(code, str) else "", message if isinstance(message, str) else "")
    return response


async def call(stub_method: Any, request: runtime_pb2.ExpertRequest, timeout: float) -> runtime_pb2.ExpertResponse:
    """One unary RPC; raises the typed error a server answered, or TransportError if nothing usable came back."""
    try:
        response = await stub_method(request, timeout=timeout)
    except _TRANSPORT_ERRORS as e:
        raise TransportError(f"{type(e).__name__}: {str(e)[:200]}") from None
    return _checked_reply(response)


async def call_stream(
    stub_method: Any, request: runtime_pb2.ExpertRequest, timeout: float, spec: TensorSpec
) -> runtime_pb2.ExpertResponse:
    """One streamed RPC: ``request`` goes out in parts, the reply is reassembled (at most one tensor within
    ``spec``); typed errors as :func:`call`. The whole exchange is bounded by ``timeout``."""

    async def parts() -> AsyncIterator[runtime_pb2.ExpertRequest]:
        for part in split_message(request):
            yield part

    return await call_reply_stream(stub_method, parts(), timeout, max_tensors=1,
                                   max_tensor_bytes=max_hidden_bytes(spec))  # fmt: skip


async def read_reply_stream(
    replies: AsyncIterator[runtime_pb2.ExpertResponse], *, max_tensors: int, max_tensor_bytes: int
) -> runtime_pb2.ExpertResponse:
    """A streamed reply, reassembled by :func:`gather_stream` within the bounds given; the typed error it carries
    (raised from its first part, without waiting for the stream to close), or TransportError for a malformed one.
    Closes ``replies`` either way."""
    try:
        first = await anext(replies, None)
        if first is None:
            raise TransportError("empty reply stream")
        _checked_reply(first)

        async def rest():
            yield first
            async for part in replies:
                yield part

        try:
            return await gather_stream(rest(), runtime_pb2.ExpertResponse, max_tensors=max_tensors,
                                       max_tensor_bytes=max_tensor_bytes, end_marker=True)  # fmt: skip
        except BadRequest as e:
            raise TransportError(f"bad reply stream: {e}") from None
    finally:
        await replies.aclose()


async def call_reply_stream(
    stub_method: Any, request: runtime_pb2.ExpertRequest | AsyncIterator[runtime_pb2.ExpertRequest], timeout: float,
    *, max_tensors: int, max_tensor_bytes: int,
) -> runtime_pb2.ExpertResponse:  # fmt: skip
    """One RPC with a streamed reply, reassembled by :func:`read_reply_stream`: ``request`` is a unary request
    (``parameters``) or the parts of a streamed one (:func:`call_stream`). Bounded by ``timeout`` in all; typed errors
    as :func:`call`."""

    async def exchange() -> runtime_pb2.ExpertResponse:
        return await read_reply_stream(await stub_method(request), max_tensors=max_tensors,
                                       max_tensor_bytes=max_tensor_bytes)  # fmt: skip

    try:
        return await asyncio.wait_for(exchange(), timeout)
    except (*_TRANSPORT_ERRORS, DecodeError, TypeError) as e:  # hivemind's stream reader on a garbage frame
        raise TransportError(f"{type(e).__name__}: {str(e)[:200]}") from None


async def call_auto(
    stub: Any, unary_name: str, stream_name: str, tensors: Sequence[torch.Tensor], meta: dict[str, Any],
    timeout: float, compression: int, spec: TensorSpec,
) -> runtime_pb2.ExpertResponse:  # fmt: skip
    """Call ``stub.<unary_name>`` when the tensors and the largest possible reply fit a unary message, else
    ``stub.<stream_name>``. Every reply of this protocol carries at most one tensor no larger than the first request
    tensor, so its bound is that tensor's size at 4 bytes a value. PayloadTooLarge over MAX_STREAM_TENSOR_BYTES."""
    request = runtime_pb2.ExpertRequest(tensors=encode_tensors(tensors, compression), metadata=pack_meta(meta))
    reply_bytes = tensors[0].numel() * 4 if tensors else 0
    if max(tensor_bytes(request.tensors), reply_bytes) <= MAX_UNARY_TENSOR_BYTES:
        return await call(getattr(stub, unary_name), request, timeout)
    return await call_stream(getattr(stub, stream_name), request, timeout, spec)


def decode_reply_tensor(response: runtime_pb2.ExpertResponse, spec: TensorSpec, *, index: int = 0) -> torch.Tensor:
    """A tensor from a reply, checked like a request's (the replying peer is no more trusted than a caller).

    Non-finite values are allowed: a malicious stage's NaN output is the validator's to flag, not a transport error.
    """
    if len(response.tensors) <= index:
        raise TransportError("reply is missing a tensor")
    try:
        return decode_hidden(response.tensors[index], spec, "reply", require_finite=False)
    except BadRequest as e:
        raise TransportError(f"bad reply tensor: {e}") from None


def sign_check(identity: Identity, **fields: Any) -> bytes:
    return identity.sign(check_request_bytes(**fields))


def digest_or_none(tensor: torch.Tensor | None) -> bytes | None:
    return None if tensor is None else tensor_digest(tensor)
