"""A bare Python gRPC server whose only work per call is one etcd transaction.

bench/local.py measures it beside the coordinator: it is the cheapest a Python gRPC
service in front of etcd can be on this machine (the create+delete path of vas
is client -> agent -> coordinator -> etcd; this keeps only the coordinator hop and its
one etcd call). Run as ``python bench/forwarder.py ETCD_HOST:PORT``: prints its port,
then serves until killed. ``call(target, n)`` makes one call (alternately a
put-if-absent and a delete of key n, as the create+delete benchmark does).
"""
from __future__ import annotations

import sys
from concurrent import futures

import grpc
from etcd3 import etcdrpc

_METHOD = "/bench.Forwarder/Txn"


def _txn(key: bytes, create: bool) -> etcdrpc.TxnRequest:
    if create:
        return etcdrpc.TxnRequest(
            compare=[etcdrpc.Compare(key=key, target=etcdrpc.Compare.CREATE,
                                     result=etcdrpc.Compare.EQUAL, create_revision=0)],
            success=[etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=b"x"))])
    return etcdrpc.TxnRequest(
        success=[etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key))])


def serve(etcd_target: str) -> None:
    kv = etcdrpc.KVStub(grpc.insecure_channel(etcd_target))

    def forward(request: bytes, context) -> bytes:
        # request: b"c" or b"d" followed by the key
        kv.Txn(_txn(request[1:], request[:1] == b"c"), timeout=10)
        return b""

    handler = grpc.method_handlers_generic_handler("bench.Forwarder", {
        "Txn": grpc.unary_unary_rpc_method_handler(forward)})
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


class Client:
    """Calls a forwarder: ``create(key)`` and ``delete(key)``, one etcd txn each."""

    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._call = self.channel.unary_unary(_METHOD)

    def create(self, key: str) -> None:
        self._call(b"c" + key.encode(), timeout=10)

    def delete(self, key: str) -> None:
        self._call(b"d" + key.encode(), timeout=10)

    def close(self) -> None:
        self.channel.close()


if __name__ == "__main__":
    serve(sys.argv[1])
