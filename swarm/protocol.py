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

Errors never travel as Python exceptions: a service answers ``meta {"error": code, "message": text}`` and the
client raises the matching typed error, so a caller can tell apart

* :class:`BadRequest` (``code == "bad_request"``): the request itself was malformed (shape, dtype, size, NaN...);
* an :class:`~swarm.records.InputRejected` subclass (its own code): the tensor lacked a valid verdict;
* :class:`RemoteFailure` (``"internal"``): the server failed while handling a well-formed request;
* :class:`TransportError`: nothing usable came back (dial failure, timeout, handler crash, garbage reply).

Size limit (v1): hivemind's unary messages are capped at 4 MiB; a request whose tensors exceed
:data:`MAX_UNARY_TENSOR_BYTES` (2 MiB, hivemind's own switch-to-streaming threshold) raises :class:`PayloadTooLarge`
on the client before anything is sent, and a server refuses such requests with ``bad_request``. Streaming
(``split_for_streaming``) is not implemented yet: use smaller micro-batches or FLOAT16 on the wire.

Wire compression: only ``NONE`` and ``FLOAT16``. A verdict is bound to the digest of the tensor *as the receiver
decodes it*, so whoever signs a verdict first passes the tensor through :func:`as_received` (FLOAT16 rounding is
idempotent, so the same bits arrive however often the tensor is re-sent).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2

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

MAX_UNARY_TENSOR_BYTES = 2 * 2**20  # sum of serialized tensor buffers in one request
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


class PayloadTooLarge(BadRequest):
    """The tensors exceed the unary message budget (streaming is not implemented in v1)."""


class RemoteFailure(ProtocolError):
    """The server failed while handling a well-formed request."""

    code = "internal"


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
    if code == RemoteFailure.code:
        return RemoteFailure(message)
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
    """Serialize for one unary message; PayloadTooLarge if the buffers exceed MAX_UNARY_TENSOR_BYTES."""
    encoded = [encode_tensor(t, compression) for t in tensors]
    total = sum(len(t.buffer) for t in encoded)
    if total > MAX_UNARY_TENSOR_BYTES:
        raise PayloadTooLarge(
            f"{total} bytes of tensors exceed the {MAX_UNARY_TENSOR_BYTES}-byte unary limit; "
            "streaming is not implemented: use smaller micro-batches or FLOAT16"
        )
    return encoded


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
    if proto.compression not in ALLOWED_COMPRESSION:
        raise BadRequest(f"{name}: compression must be NONE or FLOAT16")
    if proto.dtype not in FLOAT_DTYPES:
        raise BadRequest(f"{name}: dtype must be one of {sorted(FLOAT_DTYPES)}")
    shape = tuple(proto.size)
    if len(shape) != 3 or shape[2] != spec.d_model:
        raise BadRequest(f"{name}: shape must be [B, T, {spec.d_model}]")
    batch, length, _ = shape
    if not 1 <= batch <= spec.max_batch or not 1 <= length <= spec.seq_len:
        raise BadRequest(f"{name}: need 1 <= B <= {spec.max_batch} and 1 <= T <= {spec.seq_len}")
    numel = math.prod(shape)
    per_value = _WIRE_BYTES[proto.compression] or FLOAT_DTYPES[proto.dtype]
    if len(proto.buffer) != numel * per_value:
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


def request_tensors(request: runtime_pb2.ExpertRequest, count: int) -> Sequence[runtime_pb2.Tensor]:
    if len(request.tensors) != count:
        raise BadRequest(f"expected {count} tensor(s), got {len(request.tensors)}")
    if sum(len(t.buffer) for t in request.tensors) > MAX_UNARY_TENSOR_BYTES:
        raise BadRequest("tensors exceed the unary size limit")
    return request.tensors


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


async def call(stub_method: Any, request: runtime_pb2.ExpertRequest, timeout: float) -> runtime_pb2.ExpertResponse:
    """One unary RPC; raises the typed error a server answered, or TransportError if nothing usable came back."""
    try:
        response = await stub_method(request, timeout=timeout)
    except (P2PDaemonError, P2PHandlerError, asyncio.TimeoutError, ConnectionError, OSError) as e:
        raise TransportError(f"{type(e).__name__}: {str(e)[:200]}") from None
    try:
        meta = unpack_meta(response.metadata)
    except BadRequest as e:
        raise TransportError(f"bad reply: {e}") from None
    if "error" in meta:
        code, message = meta.get("error"), meta.get("message", "")
        raise error_from_code(code if isinstance(code, str) else "", message if isinstance(message, str) else "")
    return response


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
