"""Remote-attach benchmarks of vas (two agents on one machine, over loopback) against
baselines measured in the same run.

    .venv/bin/python bench/remote.py [--quick] [--skip tcp,ray,vas] [--tls]

--tls runs the vas cluster with mutual TLS on every hop (LocalCluster(tls=True)): the
bulk channel then encrypts, and the home reads the memfd instead of sendfile()ing it.
The JSON's "vas_tls" says which it was.

Baselines (payload 1 GiB; 256 MiB with --quick):
  raw TCP over loopback, 1 stream and 4 streams: a sender process os.sendfile()s ranges
    of a memfd to this process, which recv_into()s a 1 GiB buffer (4 streams: a quarter
    on each of 4 connections, a thread each). cold = a fresh (never touched) receive
    buffer, so the receive pays the first-touch page faults; warm = the same buffer
    again. The memfd is filled before any timing. Measured twice, first and last in
    the run (this VM drifts): cold from the first pass, warm the median of the later
    rounds of both passes.
  raw TCP 32 KiB request/reply (the baseline of a lazy first touch, which fetches one
    32 KiB chunk): 1000 requests at random pages on one connection, p50 and p99.
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
feature not there yet), another VasError, a timeout, a helper process that failed
(RuntimeError) or a failed check is null, with the reason under "reasons" in the JSON.
The exit status is 1 when a check failed.
The last line printed is one JSON object with every figure and ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # remote_*.py, however started
from remote_baselines import bench_ray, bench_tcp, tcp_sender  # noqa: E402
from remote_common import GiB, MiB, med  # noqa: E402
from remote_vas import VAS_KEYS, bench_vas, vas_fill  # noqa: E402


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
    parser.add_argument("--tls", action="store_true",
                        help="run the vas cluster with mutual TLS on every hop")
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
                     "machine": os.uname().nodename, "cpus": os.cpu_count(),
                     "vas_tls": args.tls}
    reasons: dict = {}
    ok = True
    for phase, keys, run in (
            ("tcp", ["tcp_cold_gbps", "tcp_warm_gbps", "tcp4_cold_gbps", "tcp4_warm_gbps",
                     "tcp_rtt_32k_p50_us", "tcp_rtt_32k_p99_us"],
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
            ok &= bench_vas(results, reasons, size, lazy_size, repeats, touches, args.seed,
                            args.tls)
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
            for name in ("tcp", "tcp4"):
                results[f"{name}_cold_2nd_pass_gbps"] = again[f"{name}_cold_gbps"]
                results[f"{name}_warm_all_gbps"] = (tcp_first[f"{name}_warm_all_gbps"]
                                                    + again[f"{name}_warm_all_gbps"])
                results[f"{name}_warm_gbps"] = med(results[f"{name}_warm_all_gbps"])
        except Exception as exc:
            reasons["tcp_cold_2nd_pass_gbps"] = f"{type(exc).__name__}: {exc}"
    r = results
    r["eager_warm_vs_ray_warm"] = ratio(r.get("eager_warm_gbps"), r.get("ray_warm_gbps"))
    r["eager_warm_vs_tcp_warm"] = ratio(r.get("eager_warm_gbps"), r.get("tcp_warm_gbps"))
    r["eager_cold_vs_ray_cold"] = ratio(r.get("eager_cold_gbps"), r.get("ray_cold_gbps"))
    r["eager_cold_vs_tcp_cold"] = ratio(r.get("eager_cold_gbps"), r.get("tcp_cold_gbps"))
    r["eager_warm_vs_tcp4_warm"] = ratio(r.get("eager_warm_gbps"), r.get("tcp4_warm_gbps"))
    r["first_touch_p50_vs_rtt_p50"] = ratio(r.get("first_touch_p50_us"),
                                            r.get("tcp_rtt_32k_p50_us"))
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
        # issue 13
        "eager_warm_ge_95pct_tcp4_warm": at_least(r["eager_warm_vs_tcp4_warm"], 0.95),
        "eager_cold_ge_90pct_tcp_cold": at_least(r["eager_cold_vs_tcp_cold"], 0.9),
        "first_touch_p50_le_1_5x_rtt": at_most(r["first_touch_p50_vs_rtt_p50"], 1.5),
        "first_touch_p99_le_1ms": at_most(r.get("first_touch_p99_us"), 1000.0),
        "sync_1pct_warm_le_20ms": at_most(r.get("sync_warm_s"), 0.020),
    }
    moved = r.get("lazy_ttfb_loopback_bytes_per_byte")
    if moved is not None and moved >= 0.5:  # no demand paging happened: nothing to judge
        for key in ("first_touch_p50_le_500us", "first_touch_p50_le_1_5x_rtt",
                    "first_touch_p99_le_1ms"):
            r["targets"][key] = None
        reasons["first_touch_target"] = (
            f"not judged: attach(fetch='lazy') moved {moved:.0%} of the segment's size over "
            "loopback before its first byte (it fetched eagerly), so first touches were local reads")
    r["reasons"] = reasons
    r["method"] = {
        "tcp": "1 and 4 streams over 127.0.0.1, sendfile from a memfd -> recv_into; cold = "
               "fresh receive buffer (first touch), first pass; warm = same buffer again, "
               "median over a pass before Ray and a pass after vas (the VM drifts); rtt = "
               "1000 32 KiB request/replies at random pages, one connection",
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
        ("raw TCP 4 streams, cold", fmt(r.get("tcp4_cold_gbps"), "GB/s"), "baseline"),
        ("raw TCP 4 streams, warm", fmt(r.get("tcp4_warm_gbps"), "GB/s"), "baseline"),
        ("raw TCP 32 KiB req/reply", fmt(r.get("tcp_rtt_32k_p50_us"), "us", ".0f"),
         f"baseline, p50 (p99 {fmt(r.get('tcp_rtt_32k_p99_us'), 'us', '.0f')})"),
        ("Ray cross-node get, cold", fmt(r.get("ray_cold_gbps"), "GB/s"), "baseline"),
        ("Ray cross-node get, warm", fmt(r.get("ray_warm_gbps"), "GB/s"), "baseline"),
        ("eager attach, cold", fmt(r.get("eager_cold_gbps"), "GB/s"),
         f"{pct(r['eager_cold_vs_ray_cold'])} of Ray cold (>= 100%: "
         f"{flag(t['eager_cold_ge_1x_ray_cold'])}), {pct(r['eager_cold_vs_tcp_cold'])} of "
         f"TCP cold (>= 90%: {flag(t['eager_cold_ge_90pct_tcp_cold'])})"),
        ("eager attach, warm", fmt(r.get("eager_warm_gbps"), "GB/s"),
         f"{pct(r['eager_warm_vs_ray_warm'])} of Ray warm (>= 200%: "
         f"{flag(t['eager_warm_ge_2x_ray_warm'])}), {pct(r['eager_warm_vs_tcp_warm'])} of TCP "
         f"warm (>= 60%: {flag(t['eager_warm_ge_60pct_tcp_warm'])}), "
         f"{pct(r['eager_warm_vs_tcp4_warm'])} of TCP 4 streams (>= 95%: "
         f"{flag(t['eager_warm_ge_95pct_tcp4_warm'])})"),
        (f"lazy TTFB, {lazy_size // GiB} GiB seg", fmt(r.get("lazy_ttfb_ms"), "ms"),
         f"<= 20 ms: {flag(t['lazy_ttfb_le_20ms'])}"),
        ("first touch p50", fmt(r.get("first_touch_p50_us"), "us", ".0f"),
         f"<= 500 us: {flag(t['first_touch_p50_le_500us'])}, "
         f"{fmt(r['first_touch_p50_vs_rtt_p50'], 'x')} TCP req/reply (<= 1.5x: "
         f"{flag(t['first_touch_p50_le_1_5x_rtt'])})"),
        ("first touch p99", fmt(r.get("first_touch_p99_us"), "us", ".0f"),
         f"<= 1 ms: {flag(t['first_touch_p99_le_1ms'])}"),
        ("sync 1% chunks, cold", fmt(r.get("sync_cold_s"), "s", ".3f"),
         f"changed {fmt(r.get('sync_changed_bytes', max(1, size // MiB // 100) * MiB) / MiB, 'MiB', '.0f')}, loopback "
         f"{fmt(None if r.get('sync_cold_loopback_bytes') is None else r['sync_cold_loopback_bytes'] / MiB, 'MiB', '.1f')}"),
        ("sync 1% chunks, warm", fmt(r.get("sync_warm_s"), "s", ".3f"),
         f"<= 20 ms: {flag(t['sync_1pct_warm_le_20ms'])}"),
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
