"""Multi-host benchmarks of vas across network namespaces (veth + bridge, as separate
machines would be), against raw TCP baselines over the same links in the same run.

    sudo .venv/bin/python bench/netns.py [--quick] [--size BYTES] [--readers 3]
        [--rate 2gbit] [--skip eager,touch,shaped,fanout | --only fanout-unlimited]
        [--no-quiet]

Needs root (namespaces, veths, tc). vas.netns builds a bridge and 1 + --readers
namespaces named with this process's pid (``vas-<pid>-a`` is the home, b, c, ... the
readers), runs etcd and a coordinator on the bridge IP and one agent per namespace
(``--metrics-port 0``), and tears it all down on exit, exception, Ctrl-C or SIGTERM.
This process is a client of every agent (Unix sockets reach across namespaces); the
agents move the bytes between namespaces. Every segment is made on the home and filled
by a child process (remote.py --vas-fill); a reader's copy is checked against it (CRC of
8 bytes of every page, remote_common.checksum), so a fast wrong answer fails the run.

The raw TCP baseline (bench/netns_tcp.py): a sender in the home's namespace serves
ranges of a memfd holding the same pattern by sendfile; receivers in the readers'
namespaces ask for them, and check the CRC of what they got.

Phases (--skip any of them, or run --only some; "fanout" is both fan-out steps,
"fanout-shaped" and "fanout-unlimited" one each):
  eager    a 1 GiB (--size; 256 MiB with --quick) eager attach on reader b. cold = the
           first fetch of a freshly started reader agent (b is restarted before each
           cold round if it fetched anything since it started),
           raw TCP cold = received into a fresh, never touched buffer; warm = later
           rounds (a fresh segment each, so every round moves every byte; the agent's
           memory, the TCP receive buffer are warm). Rounds alternate vas, TCP 1 stream,
           TCP 4 streams. Also: the bytes the home sent per payload byte (its
           vas_node_sent_bytes_total, all paths but "local", read before and after).
  touch    lazy attach of a --size segment (at least 512 MiB) on reader b, its first
           byte and 200 first touches of random pages in distinct 2 MiB regions
           (remote_vas.bench_lazy);
           baseline: 32 KiB request/reply round trips on one TCP connection b <- a at
           random pages (half before, half after the touches).
  shaped   as eager, with what the home sends limited by tc tbf at --rate (2gbit);
           baseline raw TCP 1 stream over the same shaped link.
  fanout   --readers readers attach one fresh segment eagerly at the same moment
           (a thread each): total seconds from the first attach call to the last
           return, bytes the home sent / payload, and the CPU seconds every agent used
           meanwhile (before the CRC checks); against one reader alone (the
           readers take turns) in the same rounds. Once over the shaped home link,
           once unlimited (after a round not counted, so every reader is warm);
           unlimited also raw TCP one sender -> all receivers at once vs -> one
           receiver, with 1 stream per receiver and with 4 (MAX_STREAMS, the shape
           of a vas fetch: 4 connections per reader), and the CPU seconds the sender
           and the receivers used (each receiver's while it received).

Every timed round, of vas or raw TCP, starts once every agent is idle (Bench.quiet:
after a transfer an agent prepares warm memory for the next one and punches freed
memory out, ~1 CPU-s a GiB that would otherwise run beside the next round; --no-quiet
starts at once, as before; "rounds_not_quiet" counts the rounds that waited in vain).
Each phase runs 3 rounds (2 with --quick). Each round's figures are kept ("..._all"); a
figure is their median, with the range in the table. This VM is noisy (2 vCPUs shared,
and it may hand freed memory back to its host, which makes "warm" memory cold again):
compare figures of the same run only. A phase that fails keeps the figures of its rounds
before the failure, nulls the others and says why under "reasons", and every agent's last
log lines go to stderr. The last line printed is one JSON object with every figure,
ratio and issue 13 target. Exit status: 0, 1 when a phase failed, 2 when namespaces
cannot be made here, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench modules, however started
from netns_tcp import RawTcp, tcp_receiver  # noqa: E402
from remote_baselines import MAX_STREAMS, RTT_BYTES, RTT_COUNT, tcp_sender  # noqa: E402
from remote_common import (GiB, MiB, CheckFailed, PhaseTimeout, checksum, cpu_seconds,  # noqa: E402
                           gbps, med, percentile)
from remote_vas import (bench_lazy, delete_quietly, detach_quietly, eager_round,  # noqa: E402
                        guarded, run_writer, wait_until_empty)

ENTRY = os.path.abspath(__file__)
PHASES = ("eager", "touch", "shaped", "fanout")
STEPS = ("eager", "touch", "shaped", "fanout-shaped", "fanout-unlimited")  # PHASES' steps
HOME, FIRST = 0, 1  # the home's namespace index, the reader used alone
TOUCHES = 200
MAX_ROUND_S = 600  # the slowest round: 1 GiB at 2 gbit is 4.3 s; 3 readers 13 s
#: An agent is idle when it used at most this much CPU time (s) in QUIET_WINDOW s...
QUIET_CPU, QUIET_WINDOW = 0.02, 0.2
#: ... and a round waits at most this long for every agent to be idle.
QUIET_MAX_S = 30


# -- the cluster ---------------------------------------------------------------------------

class Bench:
    """The hosts, the raw TCP peers and what every phase uses."""

    def __init__(self, hosts, tcp: RawTcp, size: int, repeats: int, seed: int,
                 wait_quiet: bool = True):
        self.hosts, self.tcp, self.size, self.repeats, self.seed = hosts, tcp, size, repeats, seed
        self.wait_quiet = wait_quiet  # --no-quiet: False
        self.readers = list(range(1, len(hosts.nodes)))
        self.home_env = {"VAS_NODE": hosts.nodes[HOME].socket}
        self.home_metrics = hosts.nodes[HOME].metrics_url()
        if self.home_metrics is None:
            raise RuntimeError(f"the home agent logged no metrics URL:\n{hosts.nodes[HOME].tail()}")
        self.rounds = 0  # segments made so far: each gets its own name
        self.used: set[int] = set()  # readers that fetched since their agent started
        self.unquiet = 0  # rounds started although some agent never went idle (quiet)

    def socket(self, host: int) -> str:
        return self.hosts.nodes[host].socket

    def name(self) -> str:
        self.rounds += 1
        return f"bench/netns/{self.rounds}"

    def home_sent(self) -> int:
        """Bytes of segments the home agent sent to other nodes so far: its
        vas_node_sent_bytes_total over every path but "local" (mapped, not sent)."""
        with urllib.request.urlopen(self.home_metrics, timeout=10) as reply:
            families = text_string_to_metric_families(reply.read().decode())
        return int(sum(sample.value for family in families for sample in family.samples
                       if sample.name == "vas_node_sent_bytes_total"
                       and sample.labels.get("path") != "local"))

    def fresh(self, host: int) -> None:
        """Make reader ``host``'s agent cold: a new process (nothing held, no prepared
        memory) unless it has fetched nothing since it started."""
        if host in self.used:
            node = self.hosts.nodes[host]
            node.stop()
            node.start()
            self.used.discard(host)

    def settle(self) -> None:
        """Wait until every reader holds nothing (replicas of deleted segments are
        freed in the background, which must not be timed in the next round)."""
        for host in self.readers:
            wait_until_empty(self.socket(host))

    def quiet(self) -> None:
        """Wait until no agent uses CPU (at most QUIET_CPU s in a QUIET_WINDOW), for
        QUIET_MAX_S at most: after a transfer an agent prepares warm memory for the next
        one (~1 CPU-s a GiB) and punches freed memory out, and a round of vas or raw
        TCP timed meanwhile shares the 2 CPUs with that work (raw TCP 1 -> 1 right after
        3 vas readers competed with three agents preparing a GiB each). Rounds that
        found no quiet moment are counted in ``self.unquiet``."""
        if not self.wait_quiet:
            return
        ends = time.monotonic() + QUIET_MAX_S
        pids = [node.proc.pid for node in self.hosts.nodes]
        before = [cpu_seconds(pid) for pid in pids]
        while time.monotonic() < ends:
            time.sleep(QUIET_WINDOW)
            now = [cpu_seconds(pid) for pid in pids]
            if max(b - a for a, b in zip(before, now)) <= QUIET_CPU:
                return
            before = now
        self.unquiet += 1

    def tcp_bulk(self, hosts: list[int], streams: int, fresh: bool) -> tuple[float, float]:
        """A raw TCP round (RawTcp.bulk) once the agents are idle: seconds, CPU seconds."""
        self.quiet()
        return self.tcp.bulk(hosts, streams, fresh=fresh, seconds=MAX_ROUND_S)

    def eager(self, host: int, seed: int) -> tuple[float, int]:
        """One eager attach of a fresh segment on reader ``host``: seconds, home bytes."""
        import vas
        self.settle()
        self.used.add(host)
        with vas.connect(self.socket(HOME)) as home, vas.connect(self.socket(host)) as reader:
            return eager_round(home, reader, self.home_env, self.name(), self.size, seed,
                               counter=self.home_sent, quiet=self.quiet)

    def agents_cpu(self) -> float:
        """CPU seconds every agent process used so far (all threads)."""
        return sum(cpu_seconds(node.proc.pid) for node in self.hosts.nodes)

    def together(self, readers: list[int], seed: int) -> tuple[float, int, float]:
        """``readers`` attach one fresh segment eagerly at the same moment (a thread
        each); the seconds from the first attach call to the last return, the bytes
        the home sent and the CPU seconds all agents used meanwhile. Every reader's
        bytes are checked afterwards."""
        import vas
        self.settle()
        self.used.update(readers)
        name = self.name()
        with vas.connect(self.socket(HOME)) as home:
            home.create(name, self.size)
            try:
                want = run_writer(self.home_env, name, seed, 300)
                self.quiet()
                before = self.home_sent()
                seconds, cpu = attach_at_once([self.socket(r) for r in readers], name, want,
                                              self.agents_cpu)
                return seconds, self.home_sent() - before, cpu
            finally:
                delete_quietly(home, name)


def attach_at_once(sockets: list[str], name: str, want: int,
                   cpu: Callable[[], float]) -> tuple[float, float]:
    """Eager attaches of ``name`` through each agent socket, started together by a
    barrier; seconds from the first start to the last end, and what ``cpu()`` (CPU
    seconds so far) grew by from before the start to after the last end. The CRCs are
    taken after that (so checking does not slow the others, and the agents' background
    work meanwhile is not counted)."""
    import vas
    clients = [vas.connect(path) for path in sockets]
    spans: list = [None] * len(clients)
    mappings: list = [None] * len(clients)
    failures: list[BaseException] = []
    barrier = threading.Barrier(len(clients))

    def attach(i: int) -> None:
        try:
            barrier.wait(60)
            start = time.monotonic()
            mappings[i] = clients[i].attach(name, "r", fetch="eager")
            spans[i] = (start, time.monotonic())
        except BaseException as exc:  # noqa: BLE001 - raised in the bench's thread below
            failures.append(exc)

    threads = [threading.Thread(target=attach, args=(i,), daemon=True)
               for i in range(len(clients))]
    try:
        used = cpu()
        for thread in threads:
            thread.start()
        ends = time.monotonic() + MAX_ROUND_S
        for thread in threads:
            thread.join(max(0.0, ends - time.monotonic()))
        used = cpu() - used
        if any(thread.is_alive() for thread in threads):
            raise PhaseTimeout(f"{len(clients)} eager attaches of {name} took longer than "
                               f"{MAX_ROUND_S} s")
        if failures:
            raise failures[0]
        for i, mapping in enumerate(mappings):
            if checksum(np.frombuffer(mapping.buffer, dtype=np.uint8)) != want:
                raise CheckFailed(f"eager attach of {name} through {sockets[i]}: bytes "
                                  "differ from the home's")
        return max(end for _, end in spans) - min(start for start, _ in spans), used
    finally:
        for mapping in mappings:
            if mapping is not None:
                detach_quietly(mapping)
        for client in clients:
            client.close()


# -- phases --------------------------------------------------------------------------------

def stats(out: dict, key: str, values: list[float]) -> None:
    """``key`` = the median of ``values``, ``key``_all = every value."""
    out[key] = med(values)
    out[f"{key}_all"] = values


def eager_phase(out: dict, bench: Bench, streams: tuple[int, ...], prefix: str) -> None:
    """Cold then warm rounds, alternating vas and raw TCP (see the module docstring)."""
    size = bench.size
    for temp in ("cold", "warm"):
        vas_rates, sent = [], []
        tcp_rates: dict[int, list[float]] = {k: [] for k in streams}
        for r in range(bench.repeats):
            if temp == "cold":
                bench.fresh(FIRST)
            seconds, moved = bench.eager(FIRST, bench.seed + r)
            vas_rates.append(gbps(size, seconds))
            sent.append(moved / size)
            for k in streams:
                seconds, _ = bench.tcp_bulk([FIRST], k, fresh=temp == "cold")
                tcp_rates[k].append(gbps(size, seconds))
            stats(out, f"{prefix}_{temp}_gbps", vas_rates)
            stats(out, f"{prefix}_{temp}_home_sent_per_byte", sent)
            for k in streams:
                stats(out, f"{prefix}_tcp{k}_{temp}_gbps", tcp_rates[k])


def lazy_size(size: int) -> int:
    """The lazy segment: the payload, but room for TOUCHES distinct 2 MiB regions."""
    return max(size, 512 * MiB)


def touch_phase(out: dict, bench: Bench) -> None:
    import vas
    half = RTT_COUNT // 2
    rtt = bench.tcp.round_trips(FIRST, half, RTT_BYTES, bench.seed, 120)
    bench.settle()
    bench.used.add(FIRST)
    with vas.connect(bench.socket(HOME)) as home, vas.connect(bench.socket(FIRST)) as reader:
        bench_lazy(out, home, reader, bench.home_env, lazy_size(bench.size), TOUCHES, bench.seed,
                   counter=bench.home_sent, counted="home_sent")
    rtt += bench.tcp.round_trips(FIRST, half, RTT_BYTES, bench.seed + 1, 120)
    out["tcp_rtt_32k_p50_us"] = med(rtt)
    out["tcp_rtt_32k_p99_us"] = percentile(rtt, 0.99)


def fanout_phase(out: dict, bench: Bench, prefix: str, unlimited: bool) -> None:
    """One reader alone (the readers take turns) and all at once, alternating; on an
    unlimited link raw TCP too, after a round of each that is not counted (so every
    reader's agent and receive buffer is warm; a shaped link is slower than either)."""
    alone, together, sent_alone, sent_together = [], [], [], []
    cpu_alone, cpu_together = [], []
    tcp_alone: dict[int, list[float]] = {k: [] for k in (1, MAX_STREAMS)}
    tcp_together: dict[int, list[float]] = {k: [] for k in (1, MAX_STREAMS)}
    tcp_cpu_alone: dict[int, list[float]] = {k: [] for k in (1, MAX_STREAMS)}
    tcp_cpu_together: dict[int, list[float]] = {k: [] for k in (1, MAX_STREAMS)}
    readers = bench.readers
    if unlimited:
        bench.together(readers, bench.seed)
        for k in tcp_alone:
            bench.tcp_bulk(readers, k, fresh=False)
    for r in range(bench.repeats):
        one = readers[r % len(readers)]
        seconds, moved, cpu = bench.together([one], bench.seed + r)
        alone.append(seconds)
        sent_alone.append(moved / bench.size)
        cpu_alone.append(cpu)
        seconds, moved, cpu = bench.together(readers, bench.seed + r)
        together.append(seconds)
        sent_together.append(moved / bench.size)
        cpu_together.append(cpu)
        for k in tcp_alone if unlimited else ():
            for hosts, times, cpus in (([one], tcp_alone, tcp_cpu_alone),
                                       (readers, tcp_together, tcp_cpu_together)):
                seconds, cpu = bench.tcp_bulk(hosts, k, fresh=False)
                times[k].append(seconds)
                cpus[k].append(cpu)
        stats(out, f"{prefix}_one_reader_s", alone)
        stats(out, f"{prefix}_readers_s", together)
        stats(out, f"{prefix}_one_reader_home_sent_per_byte", sent_alone)
        stats(out, f"{prefix}_readers_home_sent_per_byte", sent_together)
        stats(out, f"{prefix}_one_reader_cpu_s", cpu_alone)
        stats(out, f"{prefix}_readers_cpu_s", cpu_together)
        for k in tcp_alone if unlimited else ():
            stats(out, f"{prefix}_{tcp_key(k)}_one_receiver_s", tcp_alone[k])
            stats(out, f"{prefix}_{tcp_key(k)}_receivers_s", tcp_together[k])
            stats(out, f"{prefix}_{tcp_key(k)}_one_receiver_cpu_s", tcp_cpu_alone[k])
            stats(out, f"{prefix}_{tcp_key(k)}_receivers_cpu_s", tcp_cpu_together[k])


def tcp_key(streams: int) -> str:
    """The raw TCP fan-out figures' infix: "tcp" for 1 stream per receiver (the figure's
    old name, kept), "tcp4" for 4."""
    return "tcp" if streams == 1 else f"tcp{streams}"


PHASE_KEYS = {  # the figures each phase nulls when it fails or is skipped
    "eager": ["eager_cold_gbps", "eager_warm_gbps", "eager_tcp1_cold_gbps",
              "eager_tcp1_warm_gbps", "eager_tcp4_cold_gbps", "eager_tcp4_warm_gbps"],
    "touch": ["first_touch_p50_us", "first_touch_p99_us", "tcp_rtt_32k_p50_us",
              "tcp_rtt_32k_p99_us"],
    "shaped": ["shaped_cold_gbps", "shaped_warm_gbps", "shaped_tcp1_cold_gbps",
               "shaped_tcp1_warm_gbps"],
    "fanout-shaped": ["fanout_shaped_one_reader_s", "fanout_shaped_readers_s",
                      "fanout_shaped_readers_home_sent_per_byte", "fanout_shaped_readers_cpu_s"],
    "fanout-unlimited": ["fanout_one_reader_s", "fanout_readers_s",
                         "fanout_readers_home_sent_per_byte", "fanout_readers_cpu_s",
                         "fanout_tcp_one_receiver_s",
                         "fanout_tcp_receivers_s", "fanout_tcp4_one_receiver_s",
                         "fanout_tcp4_receivers_s", "fanout_tcp_receivers_cpu_s",
                         "fanout_tcp4_receivers_cpu_s"],
}


def run_phases(results: dict, reasons: dict, bench: Bench, run: set[str], rate: str) -> bool:
    """Each step of ``run`` (names of STEPS) in turn, the others nulled as skipped;
    False when one failed."""
    def shaped(fn):
        def run(out: dict) -> None:
            with bench.hosts.shaped(HOME, rate):
                fn(out)
        return run

    steps = {
        "eager": lambda out: eager_phase(out, bench, (1, MAX_STREAMS), "eager"),
        "touch": lambda out: touch_phase(out, bench),
        "shaped": shaped(lambda out: eager_phase(out, bench, (1,), "shaped")),
        "fanout-shaped": shaped(lambda out: fanout_phase(out, bench, "fanout_shaped",
                                                          unlimited=False)),
        "fanout-unlimited": lambda out: fanout_phase(out, bench, "fanout", unlimited=True),
    }
    ok = True
    for step, fn in steps.items():
        keys = PHASE_KEYS[step]
        if step not in run:
            results.update(dict.fromkeys(keys))
            reasons.update(dict.fromkeys(keys, "skipped (--skip, --only)"))
            continue
        print(f"-- {step}", file=sys.stderr, flush=True)
        # Every feature measured here is built: Unavailable is a failure too.
        if not guarded(results, reasons, keys, fn, missing_ok=False):
            ok = False
            for node in bench.hosts.nodes:  # the logs go with the namespaces
                print(f"-- {step} failed; last lines of {node.name}'s log:\n{node.tail(20)}",
                      file=sys.stderr, flush=True)
    return ok


# -- report --------------------------------------------------------------------------------

def ratio(a, b):
    return a / b if a is not None and b else None


def at_most(value, bound):
    return None if value is None else bool(value <= bound)


def at_least(value, bound):
    return None if value is None else bool(value >= bound)


def add_ratios(r: dict) -> None:
    r["eager_warm_vs_tcp4_warm"] = ratio(r.get("eager_warm_gbps"), r.get("eager_tcp4_warm_gbps"))
    r["eager_warm_vs_tcp1_warm"] = ratio(r.get("eager_warm_gbps"), r.get("eager_tcp1_warm_gbps"))
    r["eager_cold_vs_tcp1_cold"] = ratio(r.get("eager_cold_gbps"), r.get("eager_tcp1_cold_gbps"))
    r["eager_cold_vs_tcp4_cold"] = ratio(r.get("eager_cold_gbps"), r.get("eager_tcp4_cold_gbps"))
    r["first_touch_p50_vs_rtt_p50"] = ratio(r.get("first_touch_p50_us"),
                                            r.get("tcp_rtt_32k_p50_us"))
    r["shaped_warm_vs_tcp1_warm"] = ratio(r.get("shaped_warm_gbps"),
                                          r.get("shaped_tcp1_warm_gbps"))
    r["shaped_cold_vs_tcp1_cold"] = ratio(r.get("shaped_cold_gbps"),
                                          r.get("shaped_tcp1_cold_gbps"))
    for prefix in ("fanout_shaped", "fanout"):
        r[f"{prefix}_readers_vs_one"] = ratio(r.get(f"{prefix}_readers_s"),
                                              r.get(f"{prefix}_one_reader_s"))
    for k in (1, MAX_STREAMS):
        r[f"fanout_{tcp_key(k)}_receivers_vs_one"] = ratio(
            r.get(f"fanout_{tcp_key(k)}_receivers_s"), r.get(f"fanout_{tcp_key(k)}_one_receiver_s"))
    r["targets"] = {  # issue 13's acceptance
        "eager_warm_ge_95pct_tcp4_warm": at_least(r["eager_warm_vs_tcp4_warm"], 0.95),
        "eager_cold_ge_90pct_tcp1_cold": at_least(r["eager_cold_vs_tcp1_cold"], 0.9),
        "first_touch_p50_le_1_5x_rtt": at_most(r["first_touch_p50_vs_rtt_p50"], 1.5),
        "first_touch_p99_le_1ms": at_most(r.get("first_touch_p99_us"), 1000.0),
        "fanout_shaped_le_1_5x_one": at_most(r["fanout_shaped_readers_vs_one"], 1.5),
        "fanout_shaped_home_sent_le_1_3x": at_most(
            r.get("fanout_shaped_readers_home_sent_per_byte"), 1.3),
        # Against raw TCP with one stream per receiver (issue 13's words) and with 4 per
        # receiver (as many as a vas fetch opens: its one reader alone is as fast).
        "fanout_ratio_le_tcp_ratio": at_most(
            r["fanout_readers_vs_one"], r["fanout_tcp_receivers_vs_one"])
        if r["fanout_tcp_receivers_vs_one"] is not None else None,
        "fanout_ratio_le_tcp4_ratio": at_most(
            r["fanout_readers_vs_one"], r["fanout_tcp4_receivers_vs_one"])
        if r["fanout_tcp4_receivers_vs_one"] is not None else None,
    }


def spread(r: dict, key: str, unit: str, scale: float = 1.0, spec: str = ".2f") -> str:
    """``median [min-max] unit`` of ``key`` (and its ``key``_all), or n/a."""
    value = r.get(key)
    if value is None:
        return "n/a"
    every = r.get(f"{key}_all") or [value]
    if len(every) == 1:
        return f"{value * scale:{spec}} {unit}"
    return (f"{value * scale:{spec}} [{min(every) * scale:{spec}}-"
            f"{max(every) * scale:{spec}}] {unit}")


def times(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def flag(value) -> str:
    return {None: "n/a", True: "PASS", False: "FAIL"}[value]


def table(r: dict, readers: int, rate: str) -> list[tuple[str, str, str, str]]:
    t = r["targets"]
    return [
        ("eager warm", spread(r, "eager_warm_gbps", "GB/s"),
         f"TCP 4 streams {spread(r, 'eager_tcp4_warm_gbps', 'GB/s')}, "
         f"1 stream {spread(r, 'eager_tcp1_warm_gbps', 'GB/s')}",
         f"{times(r['eager_warm_vs_tcp4_warm'])} of 4 streams (>= 0.95: "
         f"{flag(t['eager_warm_ge_95pct_tcp4_warm'])})"),
        ("eager cold", spread(r, "eager_cold_gbps", "GB/s"),
         f"TCP 4 streams {spread(r, 'eager_tcp4_cold_gbps', 'GB/s')}, "
         f"1 stream {spread(r, 'eager_tcp1_cold_gbps', 'GB/s')}",
         f"{times(r['eager_cold_vs_tcp1_cold'])} of 1 stream (>= 0.9: "
         f"{flag(t['eager_cold_ge_90pct_tcp1_cold'])})"),
        ("first touch p50", spread(r, "first_touch_p50_us", "us", spec=".0f"),
         f"TCP 32 KiB req/reply p50 {spread(r, 'tcp_rtt_32k_p50_us', 'us', spec='.0f')}",
         f"{times(r['first_touch_p50_vs_rtt_p50'])} (<= 1.5: "
         f"{flag(t['first_touch_p50_le_1_5x_rtt'])})"),
        ("first touch p99", spread(r, "first_touch_p99_us", "us", spec=".0f"),
         f"TCP 32 KiB req/reply p99 {spread(r, 'tcp_rtt_32k_p99_us', 'us', spec='.0f')}",
         f"<= 1 ms: {flag(t['first_touch_p99_le_1ms'])}"),
        (f"eager warm, {rate} home", spread(r, "shaped_warm_gbps", "GB/s"),
         f"TCP 1 stream {spread(r, 'shaped_tcp1_warm_gbps', 'GB/s')}",
         times(r["shaped_warm_vs_tcp1_warm"])),
        (f"eager cold, {rate} home", spread(r, "shaped_cold_gbps", "GB/s"),
         f"TCP 1 stream {spread(r, 'shaped_tcp1_cold_gbps', 'GB/s')}",
         times(r["shaped_cold_vs_tcp1_cold"])),
        (f"{readers} readers, {rate} home", spread(r, "fanout_shaped_readers_s", "s"),
         f"one reader {spread(r, 'fanout_shaped_one_reader_s', 's')}",
         f"{times(r['fanout_shaped_readers_vs_one'])} (<= 1.5: "
         f"{flag(t['fanout_shaped_le_1_5x_one'])})"),
        ("  home sent / payload", spread(r, "fanout_shaped_readers_home_sent_per_byte", "x"),
         f"one reader {spread(r, 'fanout_shaped_one_reader_home_sent_per_byte', 'x')}",
         f"<= 1.3: {flag(t['fanout_shaped_home_sent_le_1_3x'])}"),
        ("  agents' CPU time", spread(r, "fanout_shaped_readers_cpu_s", "s"),
         f"one reader {spread(r, 'fanout_shaped_one_reader_cpu_s', 's')}", ""),
        (f"{readers} readers, unlimited", spread(r, "fanout_readers_s", "s"),
         f"one reader {spread(r, 'fanout_one_reader_s', 's')}",
         times(r["fanout_readers_vs_one"])),
        ("  home sent / payload", spread(r, "fanout_readers_home_sent_per_byte", "x"),
         f"one reader {spread(r, 'fanout_one_reader_home_sent_per_byte', 'x')}", ""),
        ("  agents' CPU time", spread(r, "fanout_readers_cpu_s", "s"),
         f"one reader {spread(r, 'fanout_one_reader_cpu_s', 's')}", ""),
        (f"  raw TCP 1 -> {readers}, 1 stream", spread(r, "fanout_tcp_receivers_s", "s"),
         f"1 -> 1 {spread(r, 'fanout_tcp_one_receiver_s', 's')}",
         f"{times(r['fanout_tcp_receivers_vs_one'])} (vas ratio <= it: "
         f"{flag(t['fanout_ratio_le_tcp_ratio'])})"),
        ("    its CPU time", spread(r, "fanout_tcp_receivers_cpu_s", "s"),
         f"1 -> 1 {spread(r, 'fanout_tcp_one_receiver_cpu_s', 's')}", ""),
        (f"  raw TCP 1 -> {readers}, 4 streams", spread(r, "fanout_tcp4_receivers_s", "s"),
         f"1 -> 1 {spread(r, 'fanout_tcp4_one_receiver_s', 's')}",
         f"{times(r['fanout_tcp4_receivers_vs_one'])} (vas ratio <= it: "
         f"{flag(t['fanout_ratio_le_tcp4_ratio'])})"),
        ("    its CPU time", spread(r, "fanout_tcp4_receivers_cpu_s", "s"),
         f"1 -> 1 {spread(r, 'fanout_tcp4_one_receiver_cpu_s', 's')}", ""),
    ]


def steps_to_run(skip: str, only: str) -> set[str]:
    """The STEPS to run for ``--skip`` and ``--only`` (comma-separated names of PHASES or
    STEPS; "fanout" names both fan-out steps). ValueError for an unknown name.

    >>> sorted(steps_to_run("", "fanout"))
    ['fanout-shaped', 'fanout-unlimited']
    >>> sorted(steps_to_run("eager,touch,fanout-shaped", ""))
    ['fanout-unlimited', 'shaped']
    """
    run = set(STEPS)
    for flag_name, names in (("--skip", skip), ("--only", only)):
        named = {name.strip() for name in names.split(",") if name.strip()}
        if named - set(PHASES + STEPS):
            raise ValueError(f"{flag_name}: unknown phases {sorted(named - set(PHASES + STEPS))}; "
                             f"phases are {','.join(PHASES + STEPS[3:])}")
        steps = {step for step in STEPS if step in named or step.split("-")[0] in named}
        if named:
            run = run - steps if flag_name == "--skip" else steps
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, help="payload bytes (default 1 GiB; 256 MiB "
                        "with --quick); a multiple of 1 MiB")
    parser.add_argument("--quick", action="store_true", help="256 MiB, 2 rounds")
    parser.add_argument("--readers", type=int, default=3,
                        help="reader namespaces, all used by the fan-out (default 3)")
    parser.add_argument("--rate", default="2gbit",
                        help="tc rate of the shaped home link (default 2gbit)")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--skip", default="",
                        help=f"comma-separated phases to skip: {','.join(PHASES + STEPS[3:])}")
    chosen.add_argument("--only", default="",
                        help=f"comma-separated phases to run, no other: "
                             f"{','.join(PHASES + STEPS[3:])}")
    parser.add_argument("--no-quiet", action="store_true",
                        help="start each timed round at once, not after every agent went "
                             "idle (its background memory work done), as before")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--tcp-sender", metavar="PORT_FILE", help=argparse.SUPPRESS)
    parser.add_argument("--tcp-host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--tcp-receiver", metavar="HOST:PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.size or (256 * MiB if args.quick else GiB)
    if args.tcp_sender:
        return tcp_sender(args.tcp_sender, size, args.seed, args.tcp_host)
    if args.tcp_receiver:
        return tcp_receiver(args.tcp_receiver, size, args.seed)
    try:
        run = steps_to_run(args.skip, args.only)
    except ValueError as exc:
        parser.error(str(exc))
    if size <= 0 or size % MiB:
        parser.error(f"--size must be a positive multiple of 1 MiB ({MiB}), not {size}")
    if not re.fullmatch(r"\d+(\.\d+)?[kmgt]?(bit|bps)", args.rate):
        parser.error(f"--rate must be a tc rate such as 2gbit or 500mbit, not {args.rate!r}")
    if not 1 <= args.readers <= 8:
        parser.error(f"--readers must be 1..8, not {args.readers}")
    repeats = 2 if args.quick else 3
    # SIGTERM (a killed run, a CI timeout) tears down like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    from vas.netns import NetnsUnavailable, start_hosts
    results: dict = {"payload_bytes": size, "readers": args.readers, "rate": args.rate,
                     "rounds": repeats, "first_touch_pages": TOUCHES,
                     "rtt_bytes": RTT_BYTES, "rtt_count": RTT_COUNT,
                     "machine": os.uname().nodename, "cpus": os.cpu_count()}
    reasons: dict = {}
    # A segment, the next one, and room while the last one is freed.
    memory = 2 * size + lazy_size(size)
    try:
        with tempfile.TemporaryDirectory(prefix="vas-bench-netns-") as tmp, \
                start_hosts(1 + args.readers, memory, node_args=["--metrics-port", "0"]) as hosts:
            tcp = RawTcp(hosts, HOME, list(range(1, 1 + args.readers)), ENTRY, size,
                         args.seed, tmp)
            try:
                bench = Bench(hosts, tcp, size, repeats, args.seed, not args.no_quiet)
                ok = run_phases(results, reasons, bench, run, args.rate)
                results["rounds_not_quiet"] = bench.unquiet if bench.wait_quiet else None
            finally:
                tcp.close()
    except NetnsUnavailable as exc:
        print(f"bench/netns.py: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, after the teardown
        print("bench/netns.py: interrupted (namespaces and processes removed)",
              file=sys.stderr)
        return 130
    add_ratios(results)
    results["reasons"] = reasons
    print(f"payload {size / GiB:g} GiB, {args.readers} readers, {repeats} rounds each "
          f"(median [min-max]), home link shaped to {args.rate} where said, "
          f"{os.cpu_count()} CPUs, network namespaces on one machine")
    print(f"{'figure':<26}{'vas':>26}   {'baseline':<52} ratio")
    for name, ours, base, note in table(results, args.readers, args.rate):
        print(f"{name:<26}{ours:>26}   {base:<52} {note}")
    for key, reason in reasons.items():
        print(f"  {key}: {'null - ' if results.get(key) is None else ''}{reason}")
    print(json.dumps(results), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
