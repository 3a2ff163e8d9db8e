"""The agent tests' client of the local protocol, and the helpers around it.

``LOCAL_CLIENT`` is a few lines over vas.core.wire and local_pb2, so the tests that use
it pin the local protocol itself; ``child`` runs it with more code in a new Python, so
child processes run the same client. Children that must act as another uid import
everything first and then drop privileges: SO_PEERCRED records the identity at connect().
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap

import waiting
from vas import _native
from vas.cluster import NodeProcess
from vas.core import errors

MiB = 1 << 20
PS = _native.PAGE_SIZE
WAIT = 20.0  # seconds: bound of every wait for a condition
wait_for = functools.partial(waiting.wait_for, timeout=WAIT)
PYTHON = [sys.executable]

# The tiny local-protocol client used by the tests and by their child processes.
LOCAL_CLIENT = textwrap.dedent('''
    import itertools, os, socket
    from vas.core import errors, wire
    from vas.proto import LOCAL_PROTOCOL, local_pb2, coordinator_pb2

    class Local:
        """One connection to an agent; ``call`` raises the vas exception of a failed request."""

        def __init__(self, path):
            self.sock = wire.new_socket()
            self.sock.connect(path)
            self.ids = itertools.count(1)

        def close(self):
            self.sock.close()

        def call(self, **body):
            request = local_pb2.LocalRequest(id=next(self.ids), **body)
            wire.send_message(self.sock, request)
            response, fds = wire.recv_message(self.sock, local_pb2.LocalResponse)
            assert response is not None, "agent closed the connection"
            assert response.id == request.id, (response.id, request.id)
            if response.code:
                for fd in fds:
                    os.close(fd)
                raise errors.from_number(response.code, response.message)
            return response, fds

        def hello(self):
            return self.call(hello=local_pb2.HelloRequest(protocol=LOCAL_PROTOCOL))[0].hello

        def create(self, name, size, mode=0o600, ttl=0.0, exist_ok=False):
            return self.call(create=local_pb2.CreateRequest(
                name=name, size=size, mode=mode, ttl_seconds=ttl, exist_ok=exist_ok))[0].segment

        def attach(self, name, mode="r"):
            """-> (AttachResponse, fd). Claims write-protect support for "rw" (a home
            "rw" attach is refused without) but never registers a mapping
            (RegisterFaults): these tests exercise the lock, not its revocation."""
            response, fds = self.call(attach=local_pb2.AttachRequest(
                name=name, mode=mode, write_protect_support=mode == "rw"))
            assert len(fds) == 1, fds
            return response.attach, fds[0]

        def detach(self, attachment_id):
            self.call(detach=local_pb2.DetachRequest(attachment_id=attachment_id))

        def stat(self, name):
            return self.call(stat=coordinator_pb2.GetSegmentRequest(name=name))[0].segment

        def delete(self, name, force=False):
            return self.call(delete=local_pb2.DeleteRequest(name=name, force=force))[0].segment
''')
namespace: dict = {}
exec(LOCAL_CLIENT, namespace)
Local = namespace["Local"]


# ---------------------------------------------------------------- processes

def start_node(coordinator: str, directory: str, node_id: str, memory: int) -> NodeProcess:
    return NodeProcess(directory, coordinator, node_id=node_id, memory=memory).start()


def connect(node: NodeProcess) -> Local:
    return Local(node.socket)


def child(code: str, *args: str, timeout: float = 60, pass_fds=()) -> dict:
    """Run LOCAL_CLIENT + ``code`` in a new Python (given the fds ``pass_fds``); it
    prints one JSON line, returned parsed."""
    proc = subprocess.run([*PYTHON, "-c", LOCAL_CLIENT + textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout, cwd="/",
                          pass_fds=pass_fds)
    assert proc.returncode == 0, f"child failed ({proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gone(client, name: str) -> bool:
    try:
        client.stat(name)
    except errors.NotFound:
        return True
    return False


def used(client) -> int:
    return client.hello().node.memory_used
