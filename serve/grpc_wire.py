"""A gRPC ``ModelInferRequest`` read from its wire bytes with its tensor data left in place.

grpcio hands the servicer the message as one ``bytes`` object. Parsed by protobuf as it is, every
``raw_input_contents`` element is copied into the parsed message and copied again each time it is read
(upb returns a new ``bytes`` per subscript): a 20 MB request was copied three times on the event loop,
about 40 ms of a frozen loop per request on this machine, before its first length was checked.
:func:`split_infer_request` walks the message's top-level fields (a few: the tensors' data is one
length-delimited field per input, skipped over, not read), parses everything except the data with
protobuf, and returns the data as ``memoryview`` slices of the received bytes, which
:func:`kiln.serve.v2_tensors.from_raw` checks and reads without a copy.

Concatenated protobuf encodings merge field by field (the encoding's documented rule), so the message
parsed from the other fields' bytes, in their order, is the message the client sent less field 7.
"""

from __future__ import annotations

from typing import Any

from tritonclient.grpc import service_pb2 as pb

from kiln.errors import InputError

# ModelInferRequest.raw_input_contents (inference.GRPCInferenceService, grpc_service.proto).
RAW_INPUT_CONTENTS = 7
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_PAST_END = "malformed ModelInferRequest: a field runs past the end of the message"


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    """The base-128 varint at ``pos`` and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise InputError("malformed ModelInferRequest: a varint runs past the message")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def split_infer_request(data: bytes) -> tuple[Any, list[memoryview]]:
    """The request without its ``raw_input_contents``, and those contents as views of ``data``."""
    view = memoryview(data)
    kept: list[list[int]] = []  # [start, end) of the other fields, contiguous ones merged
    raw: list[memoryview] = []
    pos, end = 0, len(view)
    while pos < end:
        start = pos
        key, pos = _varint(view, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, pos = _varint(view, pos)
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        elif wire == _LEN:
            size, pos = _varint(view, pos)
            if field == RAW_INPUT_CONTENTS:
                if pos + size > end:
                    raise InputError(_PAST_END)
                raw.append(view[pos:pos + size])
                pos += size
                continue
            pos += size
        else:
            raise InputError(
                f"malformed ModelInferRequest: wire type {wire} of field {field} is not used by it")
        if pos > end:
            raise InputError(_PAST_END)
        if kept and kept[-1][1] == start:
            kept[-1][1] = pos
        else:
            kept.append([start, pos])
    # Clients write the fields in number order, the data last: the rest is then one slice, parsed without a
    # copy (typed contents, field 5, can be as large as raw data). Otherwise its pieces are joined.
    rest = view[kept[0][0]:kept[0][1]] if len(kept) == 1 else b"".join(view[a:b] for a, b in kept)
    try:
        request = pb.ModelInferRequest.FromString(rest)
    except Exception as exc:  # protobuf's DecodeError
        raise InputError(f"malformed ModelInferRequest: {exc}") from None
    return request, raw


__all__ = ["RAW_INPUT_CONTENTS", "split_infer_request"]
