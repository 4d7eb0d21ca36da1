"""A ModelInferRequest read from its wire bytes: everything but the tensor data parsed by protobuf, the
data left in place as views of the received bytes (no copy of a 20 MB tensor on the event loop), and a
malformed message refused with a typed error."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import InputError
from kiln.serve.grpc import grpc_inputs
from kiln.serve.grpc_wire import split_infer_request

pytest.importorskip("grpc")
from tritonclient.grpc import service_pb2 as pb  # noqa: E402

Tensor = pb.ModelInferRequest.InferInputTensor


def request() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="digits", model_version="1", id="req-7", inputs=[
        Tensor(name="images", datatype="FP32", shape=[2, 3]),
        Tensor(name="names", datatype="BYTES", shape=[1])])
    req.parameters["priority"].int64_param = 3
    req.inputs[0].parameters["binary_data_size"].int64_param = 24
    req.outputs.add(name="logits").parameters["classification"].int64_param = 2
    req.raw_input_contents.append(np.arange(6, dtype="<f4").tobytes())
    req.raw_input_contents.append(b"\x03\x00\x00\x00abc")
    return req


def test_the_message_less_its_data_equals_protobufs_parse() -> None:
    sent = request()
    data = sent.SerializeToString()
    message, raw = split_infer_request(data)
    expected = pb.ModelInferRequest()
    expected.CopyFrom(sent)
    del expected.raw_input_contents[:]
    assert message == expected
    assert [bytes(r) for r in raw] == list(sent.raw_input_contents)


def test_the_data_is_a_view_of_the_received_bytes_not_a_copy() -> None:
    data = request().SerializeToString()
    _, raw = split_infer_request(data)
    assert all(isinstance(r, memoryview) and r.obj is data for r in raw)


def test_fields_in_any_order_and_interleaved_data_keep_their_order() -> None:
    sent = request()
    head = pb.ModelInferRequest(model_name="digits", inputs=sent.inputs[:1])
    tail = pb.ModelInferRequest(id="req-7", inputs=sent.inputs[1:])
    first = pb.ModelInferRequest(raw_input_contents=sent.raw_input_contents[:1])
    second = pb.ModelInferRequest(raw_input_contents=sent.raw_input_contents[1:])
    # data before the inputs it belongs to, and the two messages' fields interleaved: protobuf merges them
    data = b"".join(m.SerializeToString() for m in (first, head, second, tail))
    message, raw = split_infer_request(data)
    assert pb.ModelInferRequest.FromString(data).inputs == message.inputs
    assert message.model_name == "digits" and message.id == "req-7"
    assert [bytes(r) for r in raw] == list(sent.raw_input_contents)


def test_inputs_read_from_the_views_equal_those_read_from_the_parsed_message() -> None:
    sent = request()
    message, raw = split_infer_request(sent.SerializeToString())
    for a, b in zip(grpc_inputs(message, raw), grpc_inputs(sent), strict=True):
        assert (a.name, a.datatype, a.shape) == (b.name, b.datatype, b.shape)
        assert np.array_equal(a.data, b.data)


def test_a_message_of_data_alone_or_nothing_at_all_is_read() -> None:
    assert split_infer_request(b"") == (pb.ModelInferRequest(), [])
    data = pb.ModelInferRequest(raw_input_contents=[b"ab", b""]).SerializeToString()
    message, raw = split_infer_request(data)
    assert message == pb.ModelInferRequest() and [bytes(r) for r in raw] == [b"ab", b""]


def test_typed_contents_before_the_data_are_parsed_from_the_received_bytes() -> None:
    tensor = Tensor(name="images", datatype="FP32", shape=[3])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    sent = pb.ModelInferRequest(model_name="digits", inputs=[tensor])
    message, raw = split_infer_request(sent.SerializeToString())
    assert message == sent and raw == []


@pytest.mark.parametrize("data, what", [
    (b"\x3a\xff\xff\xff\xff\x0f", "past the end"),           # field 7, length 4 GB, no bytes
    (b"\x0a\x05dig", "past the end"),                        # field 1 (model_name) cut short
    (b"\x3a\x80", "varint"),                                 # a length whose varint never ends
    (b"\x0b", "wire type 3"),                                # a group (not used by this message)
    (b"\x0a\x02\xff\xfe", "malformed"),                      # model_name that is not UTF-8
])
def test_a_malformed_message_is_an_input_error(data: bytes, what: str) -> None:
    with pytest.raises(InputError, match=what):
        split_infer_request(data)
