"""Remote-attach benchmarks of vas (two agents on one machine, over loopback) against
baselines measured in the same run.

    .venv/bin/python bench/remote.py [--quick] [--skip tcp,ray,vas]

Baselines (payload 1 GiB; 256 MiB with --quick):
  raw TCP, one stream over loopback: a sender process os.sendfile()s a memfd to this
    process, which recv_into()s a 1 GiB buffer. cold = a fresh (never touched) receive
    buffer, so the receive pays the first-touch page faults; warm = the same buffer
    again. The memfd is filled before any timing. Measured twice, first and last in
    the run (this VM drifts): cold from the first pass, warm the median of the later
    rounds of both passes.
  Ray cross-node ray.get: a ray.cluster_utils.Cluster with a head and one worker node
    (num_cpus=1, small object stores). An actor pinned on node A returns a fresh 1 GiB
    numpy array each round (stored in A's object store); an actor pinned on node B times
    only its ray.get() of that object (pull into B's store + zero-copy deserialise).
    cold = the first round of a fresh cluster; warm = the median of the later rounds
    (a new object each round, so every round really moves the bytes; B's store memory
    and the A<->B connections are warm by then).

vas figures (node1 is the home, this process is a client of node2):
  eager remote attach GB/s: a 1 GiB segment created on node1 and filled by a process
    attached to node1; this process times c.attach(name, "r", fetch="eager") via node2.
    cold = the first remote attach of the run; warm = the median of later rounds, each
    with a fresh segment (so every round moves every byte; node2's agent, its channel
    to node1 and any receive pool it keeps are warm). The bytes are verified by a CRC
    of 8 bytes of every page against the writer's.
  lazy attach time to first byte of a 4 GiB segment (1 GiB with --quick): from calling
    c.attach(name, fetch="lazy") until its first byte has been read.
  first touch of a random page, p50/p99: 200 pages of that lazy mapping, each in a
    different 2 MiB region (so no read-ahead of a previous touch serves it), read one
    by one as view[i]; every byte read is checked against the page's stamp.
  sync() of 1 % changed 1 MiB chunks of a 1 GiB segment: node2 attaches "rw" (lazy),
    overwrites 1 % of its 1 MiB chunks at random, and times m.sync(); the home copy is
    then read on node1 and compared. Bytes moved: the Mapping exposes no counter, so the
    loopback interface's byte count during sync() is reported (all loopback traffic in
    that window, an upper bound). cold = first sync, warm = median of later ones.

A vas figure whose call raises vas.Unavailable or NotImplementedError (the remote
feature not there yet), another VasError, a timeout or a failed check is null, with
the reason under "reasons" in the JSON. The exit status is 1 when a check failed.
The last line printed is one JSON object with every figure and ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

GiB = 1 << 30
MiB = 1 << 20
PAGE = 4096
STAMP_MUL = np.uint64(0x9E3779B97F4A7C15)


# -- helpers ------------------------------------------------------------------------------

class PhaseTimeout(Exception):
    """A phase ran past its deadline."""


class CheckFailed(Exception):
    """The bytes read back are not the bytes written."""


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """Raise PhaseTimeout in this (main) thread if the block runs longer than ``seconds``."""
    def expired(signum, frame):
        raise PhaseTimeout(f"{what} took longer than {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stamps(first_page: int, count: int, seed: int) -> np.ndarray:
    """The 8-byte stamp at the start of each page: position- and seed-dependent."""
    pages = np.arange(first_page, first_page + count, dtype=np.uint64)
    return pages * STAMP_MUL + np.uint64(seed)


def stamp_byte(page: int, seed: int) -> int:
    """The first byte of page ``page`` (little-endian low byte of its stamp)."""
    return int(stamps(page, 1, seed)[0] & np.uint64(0xFF))


def fill(array: np.ndarray, seed: int) -> None:
    """Fill a page-aligned uint8 array (size a multiple of 1 MiB) with the bench pattern:
    a random 1 MiB block repeated, then each page's first 8 bytes set to its stamp."""
    block = np.random.default_rng(seed).integers(0, 256, MiB, dtype=np.uint8)
    array.reshape(-1, MiB)[:] = block
    array.view(np.uint64).reshape(-1, PAGE // 8)[:, 0] = stamps(0, array.size // PAGE, seed)


def checksum(array: np.ndarray) -> int:
    """CRC32 of 8 bytes every 512 of every page (reads every page, 1/512 of the bytes)."""
    sample = np.ascontiguousarray(array.reshape(-1, PAGE)[:, ::512])
    return zlib.crc32(sample.tobytes())


def lo_bytes() -> int:
    """Bytes sent on the loopback interface so far (0 when /proc/net/dev is unreadable)."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    return int(rest.split()[8])  # transmit bytes
    except OSError:
        pass
    return 0


def fresh_buffer(size: int) -> np.ndarray:
    """A private anonymous page-aligned buffer, not touched yet (default page size policy)."""
    return np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)


def gbps(size: int, seconds: float) -> float:
    return size / seconds / 1e9


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


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
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--tcp-sender",
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
    import ray
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


# -- vas figures --------------------------------------------------------------------------

def vas_fill(name: str, seed: int) -> int:
    """Child process (on $VAS_NODE): fill segment ``name`` with the pattern; print its CRC."""
    import vas
    with vas.connect() as c, c.attach(name, "rw") as m:
        array = m.ndarray(np.uint8)
        fill(array, seed)
        print(json.dumps({"crc": checksum(array)}), flush=True)
        del array
    return 0


def run_writer(env: dict, name: str, seed: int, timeout: float) -> int:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--vas-fill", name,
                          "--seed", str(seed)], env={**os.environ, **env},
                         cwd="/", check=True, capture_output=True, text=True, timeout=timeout)
    return json.loads(out.stdout.strip().splitlines()[-1])["crc"]


def detach_quietly(mapping) -> None:
    """Detach, never masking the exception that got us here (a leftover view -> Busy)."""
    import vas
    with contextlib.suppress(vas.VasError):
        mapping.detach()


def delete_quietly(client, name: str) -> None:
    import vas
    for force in (False, True):
        try:
            client.delete(name, force=force)
            return
        except vas.NotFound:
            return
        except vas.VasError:
            continue


def bench_eager(out: dict, c1, c2, env1: dict, size: int, repeats: int, seed: int) -> None:
    rates = []
    for r in range(1 + repeats):
        name = f"bench/remote/eager{r}"
        c1.create(name, size)
        try:
            want = run_writer(env1, name, seed + r, 300)
            with deadline(300, f"eager attach round {r}"):
                lo0 = lo_bytes()
                t0 = time.perf_counter()
                m = c2.attach(name, "r", fetch="eager")
                seconds = time.perf_counter() - t0
                lo1 = lo_bytes()
            try:
                got = checksum(np.frombuffer(m.buffer, dtype=np.uint8))
            finally:
                detach_quietly(m)
            if got != want:
                raise CheckFailed(f"eager attach round {r}: bytes on node2 differ from node1's")
            rates.append(gbps(size, seconds))
            if r == 0:
                out["eager_cold_gbps"] = rates[0]
                out["eager_cold_loopback_bytes_per_byte"] = (lo1 - lo0) / size if lo1 else None
            else:
                out["eager_warm_gbps"] = med(rates[1:])
                out["eager_warm_all_gbps"] = rates[1:]
        finally:
            delete_quietly(c1, name)


def bench_lazy(out: dict, c1, c2, env1: dict, size: int, touches: int, seed: int) -> None:
    name = "bench/remote/lazy"
    c1.create(name, size)
    try:
        run_writer(env1, name, seed, 600)
        with deadline(120, "lazy attach"):
            lo0 = lo_bytes()
            t0 = time.perf_counter()
            m = c2.attach(name, "r", fetch="lazy")
            t1 = time.perf_counter()
            first = m.buffer[0]
            t2 = time.perf_counter()
            lo1 = lo_bytes()
        try:
            if first != stamp_byte(0, seed):
                raise CheckFailed("lazy attach: first byte differs from node1's")
            out["lazy_attach_call_ms"] = (t1 - t0) * 1e3
            out["lazy_ttfb_ms"] = (t2 - t0) * 1e3
            # Loopback bytes up to the first byte, per segment byte: near 1 means the
            # "lazy" attach copied the whole segment, and the first touches below then
            # time local reads, not demand paging.
            out["lazy_ttfb_loopback_bytes_per_byte"] = (lo1 - lo0) / size if lo1 else None
            region = 2 * MiB
            rng = np.random.default_rng(seed)
            regions = rng.choice(np.arange(1, size // region), size=touches, replace=False)
            pages = [int(g) * (region // PAGE) + int(rng.integers(0, region // PAGE))
                     for g in regions]
            lat, bad, view = [], 0, m.buffer
            with deadline(120, "first touches"):
                for page in pages:
                    i = page * PAGE
                    t0 = time.perf_counter_ns()
                    value = view[i]
                    lat.append((time.perf_counter_ns() - t0) / 1e3)
                    bad += value != stamp_byte(page, seed)
            if bad:
                raise CheckFailed(f"first touch: {bad} of {touches} pages differ from node1's")
            out["first_touch_p50_us"] = statistics.median(lat)
            out["first_touch_p99_us"] = percentile(lat, 0.99)
            out["first_touch_max_us"] = max(lat)
        finally:
            view = None  # a live view pins the mapping: drop it before detach
            detach_quietly(m)
    finally:
        delete_quietly(c1, name)


def bench_sync(out: dict, c1, c2, env1: dict, size: int, rounds: int, seed: int) -> None:
    name = "bench/remote/sync"
    c1.create(name, size)
    chunks = size // MiB
    per_round = max(1, chunks // 100)
    times, moved = [], []
    out["sync_changed_bytes"] = per_round * MiB
    array = home_array = None
    try:
        run_writer(env1, name, seed, 300)
        rng = np.random.default_rng(seed + 1)
        order = rng.permutation(chunks)
        with deadline(300, "remote rw attach"):
            m = c2.attach(name, "rw")
        try:
            array = m.ndarray(np.uint8)
            for r in range(rounds):
                picked = sorted(int(x) for x in order[r * per_round:(r + 1) * per_round])
                data = rng.integers(0, 256, (len(picked), MiB), dtype=np.uint8)
                for k, chunk in enumerate(picked):
                    array[chunk * MiB:(chunk + 1) * MiB] = data[k]
                with deadline(120, f"sync round {r}"):
                    lo0 = lo_bytes()
                    t0 = time.perf_counter()
                    m.sync()
                    times.append(time.perf_counter() - t0)
                    moved.append(lo_bytes() - lo0)
                with c1.attach(name, "r") as home:  # the home copy now has the writes?
                    home_array = home.ndarray(np.uint8)
                    for k, chunk in enumerate(picked):
                        if not np.array_equal(home_array[chunk * MiB:(chunk + 1) * MiB], data[k]):
                            raise CheckFailed(f"sync round {r}: chunk {chunk} not on node1")
                    home_array = None
                out["sync_cold_s"], out["sync_cold_loopback_bytes"] = times[0], moved[0]
                if r:
                    out["sync_warm_s"] = med(times[1:])
                    out["sync_warm_loopback_bytes"] = med(moved[1:])
        finally:
            array = home_array = None  # views pin the mapping: drop them before detach
            detach_quietly(m)
    finally:
        delete_quietly(c1, name)


VAS_KEYS = {
    "eager": ["eager_cold_gbps", "eager_warm_gbps"],
    "lazy": ["lazy_ttfb_ms", "lazy_attach_call_ms", "first_touch_p50_us", "first_touch_p99_us"],
    "sync": ["sync_cold_s", "sync_warm_s", "sync_cold_loopback_bytes"],
}


def guarded(results: dict, reasons: dict, keys: list[str], fn) -> bool:
    """Run one group of figures; on a known failure null its figures with a reason.
    False when a check failed or something unexpected happened (exit status 1)."""
    import vas
    partial: dict = {}
    try:
        fn(partial)
        results.update(partial)
        return True
    except (vas.Unavailable, NotImplementedError) as exc:
        reason, ok = f"{type(exc).__name__}: {exc}", True
    except (vas.VasError, PhaseTimeout, CheckFailed, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None)
        tail = f" ({detail.strip().splitlines()[-1]})" if detail and detail.strip() else ""
        reason, ok = f"{type(exc).__name__}: {exc}{tail}", False
    results.update(partial)  # figures measured before the failure stand
    for key in keys:
        if results.get(key) is None:
            results[key] = None
            reasons[key] = reason
    return ok


def bench_vas(results: dict, reasons: dict, size: int, lazy_size: int, repeats: int,
              touches: int, seed: int) -> bool:
    import vas
    from vas.cluster import LocalCluster

    ok = True
    memory = lazy_size + 3 * size
    with tempfile.TemporaryDirectory(prefix="vas-bench-") as tmp:
        os.chmod(tmp, 0o755)
        with LocalCluster(tmp, nodes=2, memory=memory) as cluster:
            env1 = {**cluster.env(), "VAS_NODE": cluster.nodes[0].socket}
            with vas.connect(cluster.nodes[0].socket) as c1, \
                    vas.connect(cluster.nodes[1].socket) as c2:
                ok &= guarded(results, reasons, VAS_KEYS["eager"],
                              lambda out: bench_eager(out, c1, c2, env1, size, repeats, seed))
                ok &= guarded(results, reasons, VAS_KEYS["lazy"],
                              lambda out: bench_lazy(out, c1, c2, env1, lazy_size, touches, seed))
                ok &= guarded(results, reasons, VAS_KEYS["sync"],
                              lambda out: bench_sync(out, c1, c2, env1, size, 1 + repeats, seed))
    return ok


# -- report -------------------------------------------------------------------------------

def ratio(a, b):
    return a / b if a is not None and b else None


def at_least(value, bound):
    return None if value is None else bool(value >= bound)


def at_most(value, bound):
    return None if value is None else bool(value <= bound)


def fmt(value, unit: str, spec: str = ".2f") -> str:
    return "n/a" if value is None else f"{value:{spec}} {unit}"


def pct(value) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def flag(value) -> str:
    return {None: "n/a", True: "PASS", False: "FAIL"}[value]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="256 MiB payload, 1 GiB lazy segment, fewer rounds")
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: tcp,ray,vas")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tcp-sender", metavar="PORT_FILE", help=argparse.SUPPRESS)
    parser.add_argument("--vas-fill", metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tcp_sender:
        return tcp_sender(args.tcp_sender, args.size, args.seed)
    if args.vas_fill:
        return vas_fill(args.vas_fill, args.seed)

    size = 256 * MiB if args.quick else GiB
    lazy_size = GiB if args.quick else 4 * GiB
    repeats = 2 if args.quick else 3
    touches = 200
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    store = 2 * GiB + GiB // 2  # per Ray node: one 1 GiB object plus room for the next

    results: dict = {"payload_bytes": size, "lazy_segment_bytes": lazy_size,
                     "warm_rounds": repeats, "first_touch_pages": touches,
                     "machine": os.uname().nodename, "cpus": os.cpu_count()}
    reasons: dict = {}
    ok = True
    for phase, keys, run in (
            ("tcp", ["tcp_cold_gbps", "tcp_warm_gbps"],
             lambda: bench_tcp(size, repeats, args.seed)),
            ("ray", ["ray_cold_gbps", "ray_warm_gbps"],
             lambda: bench_ray(size, repeats, args.seed, store, 180))):
        if phase in skip:
            results.update(dict.fromkeys(keys))
            reasons.update(dict.fromkeys(keys, "skipped (--skip)"))
            continue
        try:
            results.update(run())
        except Exception as exc:  # a baseline that fails is reported, not fatal
            ok = False
            results.update(dict.fromkeys(keys))
            reasons.update(dict.fromkeys(keys, f"{type(exc).__name__}: {exc}"))
    vas_keys = [k for keys in VAS_KEYS.values() for k in keys]
    tcp_first = dict(results) if "tcp" not in skip else {}
    if "vas" in skip:
        results.update(dict.fromkeys(vas_keys))
        reasons.update(dict.fromkeys(vas_keys, "skipped (--skip)"))
    else:
        try:
            ok &= bench_vas(results, reasons, size, lazy_size, repeats, touches, args.seed)
        except Exception as exc:  # the cluster itself did not start
            ok = False
            for key in vas_keys:
                if results.get(key) is None:
                    results[key] = None
                    reasons[key] = f"{type(exc).__name__}: {exc}".splitlines()[0]

    # This VM's speed drifts by up to 2x within a minute: measure raw TCP again after the
    # vas phase and take the warm baseline over both passes (cold stays the first pass's).
    if "tcp" not in skip and tcp_first.get("tcp_warm_all_gbps"):
        try:
            again = bench_tcp(size, repeats, args.seed + 1)
            results["tcp_cold_2nd_pass_gbps"] = again["tcp_cold_gbps"]
            results["tcp_warm_all_gbps"] = tcp_first["tcp_warm_all_gbps"] + again["tcp_warm_all_gbps"]
            results["tcp_warm_gbps"] = med(results["tcp_warm_all_gbps"])
        except Exception as exc:
            reasons["tcp_cold_2nd_pass_gbps"] = f"{type(exc).__name__}: {exc}"
    r = results
    r["eager_warm_vs_ray_warm"] = ratio(r.get("eager_warm_gbps"), r.get("ray_warm_gbps"))
    r["eager_warm_vs_tcp_warm"] = ratio(r.get("eager_warm_gbps"), r.get("tcp_warm_gbps"))
    r["eager_cold_vs_ray_cold"] = ratio(r.get("eager_cold_gbps"), r.get("ray_cold_gbps"))
    r["eager_cold_vs_tcp_cold"] = ratio(r.get("eager_cold_gbps"), r.get("tcp_cold_gbps"))
    r["ray_warm_vs_tcp_warm"] = ratio(r.get("ray_warm_gbps"), r.get("tcp_warm_gbps"))
    r["sync_cold_moved_vs_size"] = ratio(r.get("sync_cold_loopback_bytes"), size)
    r["sync_warm_moved_vs_size"] = ratio(r.get("sync_warm_loopback_bytes"), size)
    r["targets"] = {
        "eager_warm_ge_2x_ray_warm": at_least(r["eager_warm_vs_ray_warm"], 2.0),
        "eager_warm_ge_60pct_tcp_warm": at_least(r["eager_warm_vs_tcp_warm"], 0.6),
        "eager_cold_ge_1x_ray_cold": at_least(r["eager_cold_vs_ray_cold"], 1.0),
        "lazy_ttfb_le_20ms": at_most(r.get("lazy_ttfb_ms"), 20.0),
        "first_touch_p50_le_500us": at_most(r.get("first_touch_p50_us"), 500.0),
        "sync_1pct_moves_le_2pct": at_most(r["sync_cold_moved_vs_size"], 0.02),
    }
    moved = r.get("lazy_ttfb_loopback_bytes_per_byte")
    if moved is not None and moved >= 0.5:  # no demand paging happened: nothing to judge
        r["targets"]["first_touch_p50_le_500us"] = None
        reasons["first_touch_target"] = (
            f"not judged: attach(fetch='lazy') moved {moved:.0%} of the segment's size over "
            "loopback before its first byte (it fetched eagerly), so first touches were local reads")
    r["reasons"] = reasons
    r["method"] = {
        "tcp": "1 stream over 127.0.0.1, sendfile from a memfd -> recv_into; cold = fresh "
               "receive buffer (first touch), first pass; warm = same buffer again, median "
               "over a pass before Ray and a pass after vas (the VM drifts)",
        "ray": "2-node ray.cluster_utils.Cluster; actor on A returns a fresh numpy array each "
               "round, actor on B times ray.get; cold = first round, warm = median of later",
        "eager": "node1 home, this process on node2 times attach(fetch='eager'); fresh "
                 "segment each round; cold = first, warm = median of later",
        "lazy": "attach(fetch='lazy') call to first byte read; first touches = 200 random "
                "pages in distinct 2 MiB regions, timed view[i] one by one",
        "sync": "remote rw (lazy) writer overwrites 1% of 1 MiB chunks, times m.sync(); bytes "
                "= loopback tx bytes in that window (all traffic, upper bound)",
    }

    t = r["targets"]
    rows = [
        ("raw TCP loopback, cold", fmt(r.get("tcp_cold_gbps"), "GB/s"), "baseline"),
        ("raw TCP loopback, warm", fmt(r.get("tcp_warm_gbps"), "GB/s"), "baseline"),
        ("Ray cross-node get, cold", fmt(r.get("ray_cold_gbps"), "GB/s"), "baseline"),
        ("Ray cross-node get, warm", fmt(r.get("ray_warm_gbps"), "GB/s"), "baseline"),
        ("eager attach, cold", fmt(r.get("eager_cold_gbps"), "GB/s"),
         f"{pct(r['eager_cold_vs_ray_cold'])} of Ray cold (>= 100%: "
         f"{flag(t['eager_cold_ge_1x_ray_cold'])})"),
        ("eager attach, warm", fmt(r.get("eager_warm_gbps"), "GB/s"),
         f"{pct(r['eager_warm_vs_ray_warm'])} of Ray warm (>= 200%: "
         f"{flag(t['eager_warm_ge_2x_ray_warm'])}), {pct(r['eager_warm_vs_tcp_warm'])} of TCP "
         f"warm (>= 60%: {flag(t['eager_warm_ge_60pct_tcp_warm'])})"),
        (f"lazy TTFB, {lazy_size // GiB} GiB seg", fmt(r.get("lazy_ttfb_ms"), "ms"),
         f"<= 20 ms: {flag(t['lazy_ttfb_le_20ms'])}"),
        ("first touch p50", fmt(r.get("first_touch_p50_us"), "us", ".0f"),
         f"<= 500 us: {flag(t['first_touch_p50_le_500us'])}"),
        ("first touch p99", fmt(r.get("first_touch_p99_us"), "us", ".0f"), ""),
        ("sync 1% chunks, cold", fmt(r.get("sync_cold_s"), "s", ".3f"),
         f"changed {fmt(r.get('sync_changed_bytes', max(1, size // MiB // 100) * MiB) / MiB, 'MiB', '.0f')}, loopback "
         f"{fmt(None if r.get('sync_cold_loopback_bytes') is None else r['sync_cold_loopback_bytes'] / MiB, 'MiB', '.1f')}"),
        ("sync 1% chunks, warm", fmt(r.get("sync_warm_s"), "s", ".3f"), ""),
    ]
    print(f"payload {size / GiB:g} GiB, lazy segment {lazy_size / GiB:g} GiB, "
          f"warm = median of {repeats} later rounds, {os.cpu_count()} CPUs, loopback only")
    print(f"{'figure':<28}{'value':>13}   vs")
    for name, value, base in rows:
        print(f"{name:<28}{value:>13}   {base}")
    for key, reason in reasons.items():
        print(f"  {key}: {'' if key.endswith('_target') else 'null - '}{reason}")
    print(json.dumps(results), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
