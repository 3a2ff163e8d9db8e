"""The baselines of bench/remote.py, measured in the same run as vas: raw TCP over
loopback and Ray's cross-node ray.get (remote.py's docstring says how each is timed).

``tcp_sender`` is the TCP baseline's child process (remote.py --tcp-sender).
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from remote_common import (PAGE, REMOTE, CheckFailed, checksum, deadline, fill, fresh_buffer,
                           gbps, import_ray, med, percentile, stamps)

#: A request to tcp_sender: offset and length of the range wanted.
RANGE = struct.Struct("!QQ")
#: Connections of the multi-stream baseline.
MAX_STREAMS = 4
#: The round-trip baseline of a lazy first touch: one 32 KiB chunk, asked RTT_COUNT times.
RTT_BYTES = 32 * 1024
RTT_COUNT = 1000


# -- raw TCP baseline ---------------------------------------------------------------------

def tcp_sender(port_file: str, size: int, seed: int, host: str = "127.0.0.1") -> int:
    """Child process: serve ranges of ``size`` pattern bytes from a memfd on ``host``.

    Writes {"port", "crc"} (the pattern's checksum) to ``port_file`` once listening. Every
    connection is served by a thread of its own: each request is two network-order
    uint64s, offset and length, answered by os.sendfile of that range; a connection ends
    at EOF (or a bad range). Runs until killed."""
    fd = os.memfd_create("bench-tcp")
    os.ftruncate(fd, size)
    with mmap.mmap(fd, size) as buf:
        array = np.frombuffer(buf, dtype=np.uint8)
        fill(array, seed)
        crc = checksum(array)
        del array
    listener = socket.create_server((host, 0))
    with open(port_file + ".tmp", "w") as f:
        json.dump({"port": listener.getsockname()[1], "crc": crc}, f)
    os.rename(port_file + ".tmp", port_file)

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                request = recv_exactly(conn, RANGE.size)
                if request is None:
                    return
                offset, length = RANGE.unpack(request)
                if offset + length > size:
                    return
                end = offset + length
                while offset < end:
                    offset += os.sendfile(conn.fileno(), fd, offset, end - offset)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes from ``sock``; None at EOF before them."""
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            return None
        data += more
    return data


def wait_for_port(port_file: str, child: subprocess.Popen) -> dict:
    """The {"port", "crc"} a tcp_sender child wrote (call within a deadline)."""
    while not os.path.exists(port_file):
        if child.poll() is not None:
            raise RuntimeError(f"TCP sender exited with {child.returncode}")
        time.sleep(0.02)
    with open(port_file) as f:
        return json.load(f)


def receive_range(sock: socket.socket, view: memoryview, offset: int) -> None:
    """Ask the sender for ``len(view)`` bytes at ``offset`` and receive them into ``view``."""
    sock.sendall(RANGE.pack(offset, len(view)))
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got)
        if n == 0:
            raise RuntimeError("TCP sender closed the connection")
        got += n


def connect(address: tuple[str, int], count: int) -> list[socket.socket]:
    """``count`` connections to a tcp_sender (TCP_NODELAY: the round trips are small)."""
    conns = [socket.create_connection(address, timeout=120) for _ in range(count)]
    for conn in conns:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conns


def receive_bulk(conns: list[socket.socket], buf: np.ndarray) -> dict:
    """Receive the sender's whole payload into ``buf``, split in equal ranges over
    ``conns`` (a thread each): {"start", "end"} (time.monotonic, one clock for every
    process of the machine), "cpu", the CPU seconds this process used meanwhile, and
    "crc", the checksum of what arrived."""
    view, part = memoryview(buf), buf.size // len(conns)
    bounds = [(i * part, buf.size if i == len(conns) - 1 else (i + 1) * part)
              for i in range(len(conns))]
    failures: list[BaseException] = []

    def stream(conn: socket.socket, lo: int, hi: int) -> None:
        try:
            receive_range(conn, view[lo:hi], lo)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
            failures.append(exc)

    threads = [threading.Thread(target=stream, args=(conn, lo, hi))
               for conn, (lo, hi) in zip(conns, bounds)]
    cpu, start = time.process_time(), time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    end, cpu = time.monotonic(), time.process_time() - cpu
    if failures:
        raise failures[0]
    return {"start": start, "end": end, "cpu": cpu, "crc": checksum(buf)}


def round_trips(conn: socket.socket, size: int, count: int, nbytes: int, seed: int,
                offsets_seed: int) -> dict:
    """``count`` requests of ``nbytes`` at random pages of the payload, one at a time:
    {"us": each request-to-last-byte time, "bad": replies whose first page stamp (of the
    pattern of ``seed``) was wrong}. The offsets are drawn with ``offsets_seed``."""
    rng = np.random.default_rng(offsets_seed)
    pages = rng.integers(0, (size - nbytes) // PAGE, count)
    reply = bytearray(nbytes)
    view = memoryview(reply)
    times, bad = [], 0
    for page in pages:
        t0 = time.perf_counter_ns()
        receive_range(conn, view, int(page) * PAGE)
        times.append((time.perf_counter_ns() - t0) / 1e3)
        bad += bytes(reply[:8]) != stamps(int(page), 1, seed).tobytes()
    return {"us": times, "bad": bad}


def bench_tcp(size: int, repeats: int, seed: int) -> dict:
    """Raw TCP over loopback: 1 and 4 streams (cold into a fresh buffer, then ``repeats``
    warm rounds into the same one, alternating) and RTT_COUNT 32 KiB round trips."""
    with tempfile.TemporaryDirectory(prefix="vas-bench-tcp-") as tmp:
        port_file = os.path.join(tmp, "port")
        child = subprocess.Popen([sys.executable, REMOTE, "--tcp-sender",
                                  port_file, "--size", str(size), "--seed", str(seed)],
                                 cwd="/")
        conns = []
        try:
            with deadline(300, "raw TCP"):
                sender = wait_for_port(port_file, child)
                conns = connect(("127.0.0.1", sender["port"]), MAX_STREAMS)
                rates: dict[str, list[float]] = {}
                for temp, rounds in (("cold", 1), ("warm", repeats)):
                    for _ in range(rounds):
                        for streams in (1, MAX_STREAMS):
                            if temp == "cold":
                                buf = None  # unmap the previous one first
                                buf = fresh_buffer(size)  # first touch of every page
                            got = receive_bulk(conns[:streams], buf)
                            if got["crc"] != sender["crc"]:
                                raise CheckFailed("raw TCP: received bytes differ from the "
                                                  "sent ones")
                            rates.setdefault(f"{streams}_{temp}", []).append(
                                gbps(size, got["end"] - got["start"]))
                del buf
                rtt = round_trips(conns[0], size, RTT_COUNT, RTT_BYTES, seed, seed + 1)
                if rtt["bad"]:
                    raise CheckFailed(f"raw TCP: {rtt['bad']} of {RTT_COUNT} replies had "
                                      "wrong bytes")
        finally:
            for conn in conns:
                conn.close()
            child.kill()  # it serves until killed
            child.wait()
    out = {"tcp_rtt_32k_p50_us": med(rtt["us"]), "tcp_rtt_32k_p99_us": percentile(rtt["us"], 0.99)}
    for streams, name in ((1, "tcp"), (MAX_STREAMS, f"tcp{MAX_STREAMS}")):
        out[f"{name}_cold_gbps"] = rates[f"{streams}_cold"][0]
        out[f"{name}_warm_gbps"] = med(rates[f"{streams}_warm"])
        out[f"{name}_warm_all_gbps"] = rates[f"{streams}_warm"]
    return out


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
