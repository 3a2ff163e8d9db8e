"""sync() of a remote writer with and without written-page tracking (vas/written.py).

Two agents on loopback (LocalCluster), a segment homed on node1, this process a
writer on node2. Alternating (tracked, hashed, tracked, ...) attaches of the same
segment, each doing ``--rounds`` rounds of: store 1 % of the segment as scattered
1 MiB blocks through the mapping, time sync(). Then the write path: a full rewrite
of the segment through ``ndarray`` (every page stored to) and its sync, ``--rounds``
times per attach (``--rewrite``). Every round checks the home bytes by sha256 (a reader on node1).

    .venv/bin/python bench/sync.py --size-mib 1024 --rounds 4 --pairs 2
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time

import numpy as np

MiB = 1 << 20


def attach_writer(client, name: str, tracked: bool):
    from vas.core import fetch
    fetch._write_tracking_ok = None if tracked else False  # the per-process probe
    m = client.attach(name, "rw")
    assert (m._written is not None) == tracked, "tracking not as asked"
    return m


def home_digest(c1, name: str) -> str:
    with c1.attach(name, "r") as home:
        with home.buffer as view:
            return hashlib.sha256(view).hexdigest()


def one_attach(c1, c2, name: str, size: int, tracked: bool, rounds: int, rng,
               rewrite: bool) -> dict:
    m = attach_writer(c2, name, tracked)
    out = {"sync_ms": []}
    try:
        array = m.ndarray(np.uint8)
        blocks = size // MiB
        for _ in range(rounds):
            for block in rng.choice(blocks, max(1, blocks // 100), replace=False):
                array[block * MiB:(block + 1) * MiB] = rng.integers(0, 256, MiB, np.uint8)
            t0 = time.perf_counter()
            m.sync()
            out["sync_ms"].append(1e3 * (time.perf_counter() - t0))
            mine = hashlib.sha256(array).hexdigest()
            if home_digest(c1, name) != mine:
                raise AssertionError("the home bytes differ from the writer's after sync")
        out["rewrite_s"], out["rewrite_sync_s"] = [], []
        for _ in range(rounds if rewrite else 0):
            value = int(rng.integers(1, 256))
            t0 = time.perf_counter()
            array[:] = value
            out["rewrite_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            m.sync()
            out["rewrite_sync_s"].append(time.perf_counter() - t0)
            if home_digest(c1, name) != hashlib.sha256(array).hexdigest():
                raise AssertionError("the home bytes differ after the full rewrite")
        del array
    finally:
        m.detach()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4, help="syncs per attach")
    parser.add_argument("--pairs", type=int, default=2, help="tracked+hashed attach pairs")
    parser.add_argument("--rewrite", action="store_true", help="also time a full rewrite")
    parser.add_argument("--verbose", action="store_true", help="every figure, the agents' sync lines")
    args = parser.parse_args()
    import vas
    from vas.cluster import LocalCluster

    size = args.size_mib * MiB
    rng = np.random.default_rng(1)
    name = "bench/sync"
    results = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="vas-bench-sync-") as tmp:
        os.chmod(tmp, 0o755)
        with LocalCluster(tmp, nodes=2, memory=3 * size) as cluster, \
                vas.connect(cluster.nodes[0].socket) as c1, \
                vas.connect(cluster.nodes[1].socket) as c2:
            c1.create(name, size)
            try:
                for _ in range(args.pairs):
                    for tracked in (True, False):
                        results[tracked].append(one_attach(c1, c2, name, size, tracked,
                                                           args.rounds, rng, args.rewrite))
            except vas.VasError:
                for node in cluster.nodes:
                    print(f"--- {node.name} log:\n{node.tail()}", flush=True)
                raise
            if args.verbose:
                for node in cluster.nodes:
                    print("\n".join(line for line in node.tail(400).splitlines()
                                    if "sync of" in line or "publish of" in line))
    for tracked, runs in results.items():
        if args.verbose:
            print(runs)
        syncs = [ms for run in runs for ms in run["sync_ms"][1:]]  # the first is cold
        firsts = [run["sync_ms"][0] for run in runs]
        line = (f"{'tracked' if tracked else 'hashed '}: sync of 1 % of "
                f"{args.size_mib} MiB: warm median {statistics.median(syncs):.1f} ms "
                f"(range {min(syncs):.1f}-{max(syncs):.1f}, n={len(syncs)}), first "
                + ", ".join(f"{ms:.1f}" for ms in firsts) + " ms")
        if args.rewrite:
            line += ("; full rewrites " + "; ".join(" ".join(f"{x:.2f}" for x in run["rewrite_s"])
                                                    for run in runs)
                     + " s, their syncs " + "; ".join(
                         " ".join(f"{x:.2f}" for x in run["rewrite_sync_s"]) for run in runs)
                     + " s")
        print(line, flush=True)


if __name__ == "__main__":
    main()
