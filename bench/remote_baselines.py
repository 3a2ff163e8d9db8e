"""The baselines of bench/remote.py, measured in the same run as vas: raw TCP over
loopback and Ray's cross-node ray.get (remote.py's docstring says how each is timed).

``tcp_sender`` is the TCP baseline's child process (remote.py --tcp-sender).
"""
from __future__ import annotations

import contextlib
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from remote_common import (REMOTE, CheckFailed, import_ray, checksum, deadline, fill, fresh_buffer, gbps,
                           med)


# -- raw TCP baseline ---------------------------------------------------------------------

def tcp_sender(port_file: str, size: int, seed: int) -> int:
    """Child process: serve ``size`` bytes from a memfd on every b"g" request."""
    fd = os.memfd_create("bench-tcp")
    os.ftruncate(fd, size)
    with mmap.mmap(fd, size) as buf:
        fill(np.frombuffer(buf, dtype=np.uint8), seed)
        del buf
    listener = socket.create_server(("127.0.0.1", 0))
    with open(port_file + ".tmp", "w") as f:
        f.write(str(listener.getsockname()[1]))
    os.rename(port_file + ".tmp", port_file)
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        request = conn.recv(1)
        if request != b"g":
            return 0
        offset = 0
        while offset < size:
            offset += os.sendfile(conn.fileno(), fd, offset, size - offset)


def bench_tcp(size: int, repeats: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="vas-bench-tcp-") as tmp:
        port_file = os.path.join(tmp, "port")
        child = subprocess.Popen([sys.executable, REMOTE, "--tcp-sender",
                                  port_file, "--size", str(size), "--seed", str(seed)],
                                 cwd="/")
        try:
            with deadline(120, "raw TCP"):
                while not os.path.exists(port_file):
                    if child.poll() is not None:
                        raise RuntimeError(f"TCP sender exited with {child.returncode}")
                    time.sleep(0.02)
                with open(port_file) as f:
                    port = int(f.read())
                sock = socket.create_connection(("127.0.0.1", port))

                def receive(buf: np.ndarray) -> float:
                    view = memoryview(buf)
                    t0 = time.perf_counter()
                    sock.sendall(b"g")
                    got = 0
                    while got < size:
                        n = sock.recv_into(view[got:], size - got)
                        if n == 0:
                            raise RuntimeError("TCP sender closed the connection")
                        got += n
                    return time.perf_counter() - t0

                expected = np.empty(size, dtype=np.uint8)
                fill(expected, seed)
                want = checksum(expected)
                del expected
                cold_buf = fresh_buffer(size)
                cold = gbps(size, receive(cold_buf))  # first touch of every page
                if checksum(cold_buf) != want:
                    raise CheckFailed("raw TCP: received bytes differ from the sent ones")
                warm = [gbps(size, receive(cold_buf)) for _ in range(repeats)]
                if checksum(cold_buf) != want:
                    raise CheckFailed("raw TCP: received bytes differ from the sent ones")
                sock.sendall(b"q")
                sock.close()
                del cold_buf
        finally:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return {"tcp_cold_gbps": cold, "tcp_warm_gbps": med(warm), "tcp_warm_all_gbps": warm}


# -- Ray baseline -------------------------------------------------------------------------

def bench_ray(size: int, repeats: int, seed: int, store: int, timeout: float) -> dict:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray = import_ray()
    from ray.cluster_utils import Cluster

    cluster = None
    try:
        with deadline(timeout, "Ray cluster start"):
            common = {"num_cpus": 1, "object_store_memory": store, "include_dashboard": False}
            cluster = Cluster(initialize_head=True,
                              head_node_args={**common, "resources": {"a": 1}})
            cluster.add_node(**common, resources={"b": 1})
            ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
            cluster.wait_for_nodes()

        @ray.remote(num_cpus=0, resources={"a": 1})
        class Producer:
            def node(self):
                return ray.get_runtime_context().get_node_id()

            def make(self, seed):
                array = np.empty(size, dtype=np.uint8)
                fill(array, seed)
                return array  # > 100 KiB: stored in this node's object store

        @ray.remote(num_cpus=0, resources={"b": 1})
        class Consumer:
            def node(self):
                return ray.get_runtime_context().get_node_id()

            def fetch(self, boxed):
                t0 = time.perf_counter()
                array = ray.get(boxed[0])
                seconds = time.perf_counter() - t0
                crc = checksum(array)
                del array
                return seconds, crc

        with deadline(timeout, "Ray actors start"):
            producer, consumer = Producer.remote(), Consumer.remote()
            nodes = ray.get([producer.node.remote(), consumer.node.remote()], timeout=timeout)
            if nodes[0] == nodes[1]:
                raise RuntimeError("Ray placed both actors on one node")
        rates = []
        expected = np.empty(size, dtype=np.uint8)
        for r in range(1 + repeats):
            fill(expected, seed + r)
            want = checksum(expected)
            with deadline(timeout, f"Ray round {r}"):
                ref = producer.make.remote(seed + r)
                ray.wait([ref], fetch_local=False, timeout=timeout)  # produced on A first
                seconds, crc = ray.get(consumer.fetch.remote([ref]), timeout=timeout)
            del ref
            if crc != want:
                raise CheckFailed(f"Ray round {r}: bytes on node B differ from node A's")
            rates.append(gbps(size, seconds))
        del expected
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.shutdown()
    return {"ray_cold_gbps": rates[0], "ray_warm_gbps": med(rates[1:]),
            "ray_warm_all_gbps": rates[1:]}
