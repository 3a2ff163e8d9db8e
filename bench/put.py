"""put_array on its home node alone: the agent copying the bytes in (``WriteFrom``) against
the client storing them through its own mapping (the path before it), alternating.

    .venv/bin/python bench/put.py [--size BYTES] [--rounds N]   # from the checkout root

One local agent (its own etcd and coordinator). Each round puts the same array twice,
once each way (the order swapped every round), checks the bytes (``checksum`` of a read
back) and deletes the dataset. The first put of the run is cold (the create allocates the
memory); from the second on the warm pool has memory of that size prepared (each delete
asks for its size), when it finished preparing in time. "store" is the old path, forced by
raising ``vas.pages.WRITE_FROM_MIN`` past the array's size in this process.

Prints a line per put (total; write, sync and detach times) and, last, one JSON object with the medians
of the warm rounds of each way and their ratio (< 1: WriteFrom is faster).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np

import vas
from remote_common import checksum
from vas import mapping, pages
from vas.cluster import LocalCluster

GiB = 1 << 30
WAYS = {"agent": pages.WRITE_FROM_MIN, "store": 1 << 62}


def timed(method: str, spent: dict[str, float]) -> None:
    """Make ``Mapping.<method>`` add its wall time to ``spent[method]``."""
    original = getattr(mapping.Mapping, method)

    def timing(self, *args):
        started = time.perf_counter()
        try:
            return original(self, *args)
        finally:
            spent[method] = spent.get(method, 0.0) + time.perf_counter() - started

    setattr(mapping.Mapping, method, timing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=GiB, help="array bytes (default 1 GiB)")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    array = np.random.default_rng(0).integers(0, 256, args.size, dtype=np.uint8)
    want = checksum(array)
    spent: dict[str, float] = {}
    for method in ("write", "sync", "detach"):
        timed(method, spent)
    warm: dict[str, list[float]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory(prefix="vas-bench-put-") as folder, \
            LocalCluster(folder, memory=4 * args.size) as cluster:
        client = vas.Client(cluster.nodes[0].socket)
        count = 0
        for round_ in range(args.rounds):
            order = list(WAYS) if round_ % 2 == 0 else list(WAYS)[::-1]
            for way in order:
                pages.WRITE_FROM_MIN = WAYS[way]
                count += 1
                name = f"bench/put/{count}"
                spent.clear()
                started = time.perf_counter()
                client.put_array(name, array)
                total = time.perf_counter() - started
                ok = checksum(client.get_array(name)) == want
                vas.datasets.WARM.clear()
                client.delete(name)
                if not ok:
                    raise SystemExit(f"put {name} ({way}): the bytes read back differ")
                if count > 2:
                    warm[way].append(total)
                phases = "  ".join(f"{method} {seconds:.3f}" for method, seconds in spent.items())
                print(f"round {round_} {way:5s} put {total:.3f} s  ({phases})"
                      f"{'  cold' if count <= 2 else ''}", flush=True)
        client.close()
    medians = {way: statistics.median(times) for way, times in warm.items() if times}
    ratio = (medians["agent"] / medians["store"]) if len(medians) == 2 else None
    print(json.dumps({"size": args.size, "warm_median_seconds": medians,
                      "agent_over_store": ratio}))


if __name__ == "__main__":
    main()
