"""vas.core.metrics.RpcMetrics on a real in-process gRPC server: each call counted once,
under its final status, for unary and streamed responses."""
from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest

from vas.core.metrics import RPC_HANDLED, RPC_SECONDS, RpcMetrics
from waiting import wait_for

SERVICE = "vas.test.Probe"
_raw = dict(request_deserializer=None, response_serializer=None)


def _ok(request, context):
    return request


def _not_found(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


def _crash(request, context):
    raise RuntimeError("bug")


def _stream(request, context):
    for _ in range(3):
        yield b"x"
    if request == b"fail":
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many")


_release = threading.Event()


def _endless(request, context):
    yield b"first"
    _release.wait(10)
    while context.is_active():
        yield b"more"


@pytest.fixture(scope="module")
def channel():
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=(RpcMetrics(),))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Ok": grpc.unary_unary_rpc_method_handler(_ok),
        "NotFound": grpc.unary_unary_rpc_method_handler(_not_found),
        "Crash": grpc.unary_unary_rpc_method_handler(_crash),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "Endless": grpc.unary_stream_rpc_method_handler(_endless),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan
    server.stop(0)


def handled(method: str, code: str) -> float:
    return RPC_HANDLED.labels(SERVICE, method, code)._value.get()


def call(channel, method: str, request: bytes = b"hi", stream: bool = False):
    path = f"/{SERVICE}/{method}"
    if stream:
        return list(channel.unary_stream(path)(request, timeout=10))
    return channel.unary_unary(path)(request, timeout=10)


def test_unary_codes(channel):
    assert call(channel, "Ok") == b"hi"
    for method, code in (("NotFound", grpc.StatusCode.NOT_FOUND),
                         ("Crash", grpc.StatusCode.UNKNOWN)):
        with pytest.raises(grpc.RpcError) as info:
            call(channel, method)
        assert info.value.code() == code
    assert (handled("Ok", "OK"), handled("NotFound", "NOT_FOUND"),
            handled("Crash", "UNKNOWN")) == (1, 1, 1)
    assert handled("NotFound", "OK") == 0
    count = [s.value for m in RPC_SECONDS.collect() for s in m.samples
             if s.name.endswith("_count") and s.labels["grpc_method"] == "Ok"]
    assert count == [1]


def test_streams_count_once_when_they_end(channel):
    assert call(channel, "Stream", stream=True) == [b"x"] * 3
    with pytest.raises(grpc.RpcError) as info:
        call(channel, "Stream", b"fail", stream=True)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (handled("Stream", "OK"), handled("Stream", "RESOURCE_EXHAUSTED")) == (1, 1)


def test_a_stream_the_client_cancels_counts_as_cancelled(channel):
    replies = channel.unary_stream(f"/{SERVICE}/Endless")(b"", timeout=10)
    assert next(replies) == b"first"
    replies.cancel()
    _release.set()
    wait_for(lambda: handled("Endless", "CANCELLED") == 1, what="the cancelled stream's count")
    assert handled("Endless", "OK") == 0
