"""One dataset, many Ray tasks on several nodes, and a second driver that reads it
after the first has exited; an Arrow table read by tasks too.

    .venv/bin/python examples/ray_shared_dataset.py                    # a local 2-node Ray cluster
    .venv/bin/python examples/ray_shared_dataset.py --address HOST:PORT   # a running one

Without --address it makes a two-node Ray cluster on this machine
(ray.cluster_utils.Cluster), runs the two drivers against it, then stops vas and the
cluster. With --address it uses that cluster, starts vas there if it is not running
(vas.ray.start is idempotent) and leaves both running.

Driver 1 starts vas, puts a float64 array and an Arrow table, runs tasks on every
node that checksum (SHA-256) the array's bytes and every column of the table (each
task reads zero-copy from its own node's agent), prints the results and exits.
Driver 2, a new process started after driver 1 has exited, finds the same datasets
by name and runs the tasks again. Every checksum must equal the one of the original
data, made again from its seed: any wrong byte on any node prints WRONG and fails.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys

import numpy as np

ARRAY = "example/points"
TABLE = "example/events"


def make_data(rows: int):
    import pyarrow as pa

    rng = np.random.default_rng(42)
    points = rng.random(rows)
    events = pa.table({"id": np.arange(rows // 4), "value": rng.random(rows // 4),
                       "kind": [("click", "view", "buy")[i % 3] for i in range(rows // 4)]})
    return points, events


def checksums(points, events) -> tuple[str, str]:
    """SHA-256 of the array's bytes, and of the table's values column by column (strings
    each followed by a NUL), as 12 hex digits each: the same for the same data however it
    is laid out or chunked."""
    table = hashlib.sha256()
    for column in events.columns:
        for chunk in column.chunks:
            values = chunk.to_numpy(zero_copy_only=False)
            table.update(("\0".join(values) + "\0").encode() if values.dtype == object
                         else values.tobytes())
    return hashlib.sha256(points.data).hexdigest()[:12], table.hexdigest()[:12]


def run_tasks(label: str) -> None:
    import ray

    import vas.ray

    @ray.remote
    def summarize(points_ref, events_ref):
        points = points_ref.get()             # zero-copy ndarray from this node's agent
        events = events_ref.get()             # zero-copy pyarrow.Table
        node = ray.get_runtime_context().get_node_id()
        return (node[:8], not points.flags.writeable) + checksums(points, events)

    points_ref, events_ref = vas.ray.ref(ARRAY), vas.ray.ref(TABLE)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    tasks = [summarize.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
             .remote(points_ref, events_ref) for n in nodes for _ in range(2)]
    # and one where the data's home copy is
    tasks.append(summarize.options(scheduling_strategy=vas.ray.node_affinity(points_ref))
                 .remote(points_ref, events_ref))
    want = checksums(*make_data(points_ref.shape[0]))
    for node, read_only, points_digest, events_digest in ray.get(tasks):
        ok = read_only and (points_digest, events_digest) == want
        print(f"{label}: task on node {node}: sha256(points)={points_digest} "
              f"sha256(events)={events_digest} read-only={read_only} {'ok' if ok else 'WRONG'}",
              flush=True)
        if not ok:
            raise SystemExit(f"{label}: a task read other data (want {want})")


def driver(address: str, verb: str, rows: int, memory: str | None) -> None:
    import ray

    import vas.ray

    ray.init(address=address, logging_level="ERROR")
    if verb == "put":
        vas.ray.start(memory=memory)
        points, events = make_data(rows)
        for name in (ARRAY, TABLE):           # a previous run's datasets
            try:
                vas.delete(name)
            except vas.NotFound:
                pass
        ref = vas.ray.put(points, ARRAY)
        vas.ray.put(events, TABLE)
        print(f"driver 1: put {ref.nbytes / 2**20:.0f} MiB as {ref.name} (home node "
              f"{ref.home[:8]}) and a {events.num_rows}-row table as {TABLE}", flush=True)
        run_tasks("driver 1")
        print("driver 1: exiting; the datasets stay", flush=True)
    else:
        points = vas.ray.get(ARRAY)           # by name, made by a driver that has exited
        print(f"driver 2: found {ARRAY} {points.shape} {points.dtype}, read-only="
              f"{not points.flags.writeable}", flush=True)
        run_tasks("driver 2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="a running Ray cluster (default: make one here)")
    parser.add_argument("--rows", type=int, default=8 << 20, help="array length (float64)")
    parser.add_argument("--memory", default=None, help="vas memory per node when starting")
    parser.add_argument("--driver", choices=["put", "get"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        driver(args.address, args.driver, args.rows, args.memory)
        return 0

    cluster = None
    if args.address is None:
        import ray
        from ray.cluster_utils import Cluster

        node = {"num_cpus": 1, "object_store_memory": 100 << 20}
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        address = cluster.address
        memory = args.memory or "1GiB"
    else:
        address, memory = args.address, args.memory
    env = {k: v for k, v in os.environ.items() if k not in ("VAS_NODE", "RAY_ADDRESS")}
    try:
        for verb in ("put", "get"):           # two drivers, one after the other
            command = [sys.executable, __file__, "--driver", verb, "--address", address,
                       "--rows", str(args.rows)]
            if memory:
                command += ["--memory", memory]
            subprocess.run(command, check=True, env=env, timeout=600)
        print("ok: every task on every node read the same bytes, before and after the "
              "first driver exited", flush=True)
    finally:
        if cluster is not None:
            import vas.ray

            ray.init(address=address, logging_level="ERROR")
            vas.ray.stop()
            ray.shutdown()
            cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
