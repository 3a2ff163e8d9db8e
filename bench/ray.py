"""vas.ray against Ray's own object store, in one run: 8 tasks spread over 2 Ray nodes
each reduce (sum) one array made by the driver.

    .venv/bin/python bench/ray.py [--quick] [--size BYTES] [--tasks N] [--pairs N]  # checkout root

Ray clusters are made one after the other (ray.cluster_utils.Cluster: a head
node A and a worker node B, one CPU each, on this machine), for object stores
larger than the data (2.5 x) and for stores smaller (0.6 x: Ray must spill or fall
back to disk); --pairs pairs of clusters of each (default 2), in each pair one
where Ray goes first and one where vas does (below). In each, both sides run on the
same cluster:

  ray:  ray.put(array) in the driver, then N tasks (half pinned to A, half to B,
        B's first) get an ObjectRef argument (inside a list, so the task's own
        ray.get is timed) and sum the array.
  vas:  vas.ray.start() (not timed: the agents run before any dataset exists),
        vas.ray.put(array) in the driver, then the same N tasks take the SegmentRef
        and sum ref.get() (lazy: node B's agent fills its one replica on touch).

Figures per side: put time (driver); end-to-end (from the put's start until every
task's result is back); first-task time (the slowest of each node's first task:
the one that moves the data), later-task time (median of the others), each
measured inside the task (get + sum); node-B memory for the data: the summed PSS of
every process of node B (its raylet, which holds B's object store, and everything
under it: Ray's workers, the vas agent actor and the agent itself), minus the same
sum just before the put (a worker on each node is started before either side runs),
less the memory the agent had prepared for the next dataset then (its warm pool's
memfds, which the replica takes: counted as the data's, not as the baseline's). The
timed rounds read it once, after their tasks ("held"); its peak comes from one more
round of each side per cluster, run after the timed ones and sampled every 50 ms
("peak"). Why the timed rounds are not sampled: reading a process's PSS walks its
page tables under its mmap lock, and sampled every 50 ms the walks took 30-150 ms
each here (0.8 CPU-s of a vas round of 1.9 s, 3.7 CPU-s of a Ray round of 5.0 s)
and stalled the page faults and mappings of the processes walked: both sides' times
measured the sampler as much as themselves. vas also reports the home-node
ref.get() time (median of 200 calls in one task on A, after one warm-up call) and
node B's agent-held bytes.

Each cluster runs --rounds timed rounds of each side (default 3), then one sampled
round of each, alternating the sides
(ray, vas, ray, ... in one cluster, vas, ray, vas, ... in the other), each round with a
new object or dataset (vas deletes its dataset and waits for node B's replica to go
before the next round). The first round of a side in a cluster is a cold one; its
cold figure is the median of those (half run first, half second: also shown apart),
a median because this VM's host now and then takes seconds to back memory (one cold
round of 8.5 s among others of 1.8-2.5 s). Why both
orders, and why the driver touches and frees 4 x the data's bytes before each cold
round (``back_vm_memory``; --cold-vm leaves it out): this VM's host backs a guest
page only once touched and takes back pages freed a while ago, the guest hands out
the pages it freed last first, so the side run first got backed pages and the side
run second paid the host's faults: with Ray first, vas's cold put of 1 GiB took
3.0-4.3 s (perf: the agent's time in the kernel's copy into the fresh shmem pages)
where it took 0.6 s run first. The median of the other timed rounds of both clusters
is its warm figure (Ray's store and vas's agents then reuse memory).
Before each round the agents are let settle (their CPU idle): the memory of the
dataset deleted after a vas round is given back, and memory for the next one of
its size prepared, in the background (node/pool.py), as Ray's store keeps the
memory of freed objects; neither side's round runs beside that work.

The readable table comes first; the LAST line is one JSON object with every figure
and the vas/ray ratios (< 1: vas is faster or smaller), cold and warm. --quick uses 96 MiB.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import threading
import time

import numpy as np

from remote_common import import_ray

ray = import_ray()  # Ray, not this file (bench/ray.py)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

import vas  # noqa: E402
import vas.ray  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
SAMPLE_SECONDS = 0.05


# -- memory of node B -----------------------------------------------------------------------

def pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # gone meanwhile
        pass
    return 0


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc's children lists)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            with open(f"/proc/{current}/task/{current}/children") as children:
                todo += [int(c) for c in children.read().split()]
        except OSError:
            continue
    return out


def node_pss(raylet_pid: int) -> int:
    return sum(pss(pid) for pid in tree(raylet_pid))


#: What an agent's warm pool names the memfds it prepares (node/pool.py).
PREPARED = "/memfd:vas:segment "


def prepared_pss(pid: int) -> int:
    """PSS of the memory prepared ahead by a vas agent ``pid`` (its warm pool's memfds
    mapped in it; 0 for any other process)."""
    total, counting = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    counting = PREPARED in line
                elif counting and line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        pass
    return total


class Sampler:
    """Node B's memory for the data (``node_pss(raylet)`` above a baseline, less prepared
    memory): read at the end, and with ``every`` (seconds) also on a thread meanwhile;
    ``peak`` is the largest reading."""

    def __init__(self, raylet_pid: int, every: float | None = None):
        self.raylet_pid = raylet_pid
        self.baseline = node_pss(raylet_pid) - sum(map(prepared_pss, tree(raylet_pid)))
        self.peak = 0
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, node_pss(self.raylet_pid) - self.baseline)
            self._stop.wait(self._every)

    def __enter__(self) -> "Sampler":
        if self._every is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._every is not None:
            self._thread.join(timeout=10)
        self.peak = max(self.peak, node_pss(self.raylet_pid) - self.baseline)


# -- tasks ----------------------------------------------------------------------------------

@ray.remote
def reduce_ray(boxed):
    started = time.perf_counter()
    total = float(ray.get(boxed[0]).sum())
    return ray.get_runtime_context().get_node_id(), time.perf_counter() - started, total


@ray.remote
def reduce_vas(ref):
    started = time.perf_counter()
    total = float(ref.get().sum())
    return ray.get_runtime_context().get_node_id(), time.perf_counter() - started, total


@ray.remote
def time_home_get(ref, rounds: int):
    ref.get()  # warm-up: the connection to the agent
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        ref.get()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@ray.remote
def warm_up():
    import vas.ray  # noqa: F401  (the imports a task of either side pays once per worker)


#: Bytes of memory made resident before each cold round, per byte of data: enough for
#: Ray's cold round (a copy in A's store, two on node B), with room to spare.
VM_WARM_FACTOR = 4


def back_vm_memory(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh memory, page by page, and free it.

    Why: this VM's host backs a guest page only once it is touched, and takes back
    pages the guest freed a while ago; the first touch of such a page costs a fault in
    the host (a GiB touched so took 2.5-3.0 s here, against 0.3 s once backed). The
    guest hands out the pages it freed last first, so the side whose cold round
    runs first in a cluster gets backed pages and the other side, which finds them
    taken, pays the host's faults: vas's cold put of 1 GiB took 0.6 s run first and
    3.5-3.9 s run second, Ray's 0.6 and 0.8-1.35 s. Before each cold round the driver
    so touches and frees enough memory for the round's copies, which the round's
    allocations then take: each side's cold round pays its own first touches (the
    guest kernel allocating and zeroing its pages) but not the host's. --cold-vm
    leaves this out."""
    memory = mmap.mmap(-1, nbytes)
    pages = np.frombuffer(memory, dtype=np.uint8)
    pages[::mmap.PAGESIZE] = 1
    del pages
    memory.close()


def cpu_ticks(pid: int) -> int:
    """User + system clock ticks ``pid`` has used (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def settle(pids: list[int], timeout: float = 60.0) -> None:
    """Write back the files written so far (Ray's spills of a small store: ~1 GiB of
    dirty pages per round) and wait until the processes ``pids`` (the agents) are idle:
    under 2 ticks of CPU in 0.25 s (or ``timeout`` passed). Between rounds the kernel
    writes Ray's spills to disk and the agents give memory back and prepare the next
    dataset's in the background; on this one machine that work would otherwise land
    in the next round, whichever side runs it."""
    os.sync()
    deadline = time.monotonic() + timeout
    before = sum(map(cpu_ticks, pids))
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = sum(map(cpu_ticks, pids))
        if now - before < 2:
            return
        before = now


def agent_bytes(node_id: str, done, timeout: float = 30.0) -> int:
    """Bytes node ``node_id``'s agent holds, once its heartbeat reported a value that
    ``done(value)`` accepts (or what it reported at the deadline)."""
    deadline = time.monotonic() + timeout
    with vas.connect() as client:
        while True:
            held = {n.id: n.memory_used for n in client.nodes()}[node_id]
            if done(held) or time.monotonic() > deadline:
                return held
            time.sleep(0.1)


def pinned(node_id: str) -> dict:
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


def run_tasks(task, argument, a: str, b: str, count: int) -> list[tuple[str, float, float]]:
    order = [b, a] * (count // 2) + [b] * (count % 2)  # B's first task is submitted first
    return ray.get([task.options(**pinned(node)).remote(argument) for node in order],
                   timeout=1800)


def summarize(results, a: str, b: str, expected: float) -> dict:
    for _, _, total in results:
        if not np.isclose(total, expected, rtol=1e-9):
            raise SystemExit(f"a task summed {total}, expected {expected}")
    firsts, later = {}, []
    for node, seconds, _ in results:  # results are in submission order, per node in order
        if node in firsts:
            later.append(seconds)
        else:
            firsts[node] = seconds
    if set(firsts) != {a, b}:
        raise SystemExit(f"tasks ran on {sorted(firsts)}, not on both nodes")
    return {"first_task_s": max(firsts.values()),
            "later_task_s": statistics.median(later) if later else None}


# -- one cluster ----------------------------------------------------------------------------

def one_store(size: int, store: int, tasks: int, rounds: int, pairs: int,
              cold_vm: bool) -> dict:
    """``pairs`` pairs of clusters (``one_cluster``), Ray first in one of each pair and
    vas first in the other: each side's cold figure is the median of its first rounds,
    its warm figure the median of its other timed rounds, its peak memory the largest
    of its sampled rounds."""
    firsts = ("ray", "vas") * pairs
    runs = [one_cluster(size, store, tasks, rounds, first, cold_vm) for first in firsts]
    return {"object_store_bytes": store, "data_bytes": size,
            **{side: {**cold_and_warm([timed[side] for timed, _ in runs], firsts, side),
                      "node_b_peak_bytes": max(sampled[side]["node_b_bytes"]
                                               for _, sampled in runs)}
               for side in ("ray", "vas")}}


def one_cluster(size: int, store: int, tasks: int, rounds: int, first: str,
                cold_vm: bool) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """``rounds`` timed rounds of each side on one cluster, alternating, ``first`` first,
    then one sampled round of each (node B's peak memory); the timed rounds of each
    side in order, and its sampled round."""
    from ray.cluster_utils import Cluster

    node_args = {"num_cpus": 1, "object_store_memory": store}
    cluster = Cluster(initialize_head=True,
                      head_node_args={**node_args, "include_dashboard": False})
    try:
        worker = cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR")
        a, b = cluster.head_node.node_id, worker.node_id
        raylet_b = worker.all_processes["raylet"][0].process.pid
        data = np.random.default_rng(0).random(size // 8)
        expected = float(data.sum())
        # a worker on each node before any sampling: neither side pays a worker's start
        ray.get([warm_up.options(**pinned(node)).remote() for node in (a, b)], timeout=300)
        vas.ray.start(memory=2 * size + 64 * MiB)  # not timed: agents run before any dataset
        agent_pids = [agent["pid"] for agent in vas.ray.agents().values()]
        rounds_of = {"ray": ray_round, "vas": vas_round}
        order = [first, *(side for side in rounds_of if side != first)]
        timed, sampled = {side: [] for side in order}, {}
        for round_number in range(rounds + 1):  # the last: sampled
            for side in order:
                settle(agent_pids)
                if round_number == 0 and not cold_vm:
                    back_vm_memory(VM_WARM_FACTOR * size)
                every = SAMPLE_SECONDS if round_number == rounds else None
                result = rounds_of[side](data, expected, a, b, raylet_b, tasks, every)
                if every is None:
                    timed[side].append(result)
                else:
                    sampled[side] = result
        return timed, sampled
    finally:
        try:
            if ray.is_initialized():
                vas.ray.stop()
        finally:
            ray.shutdown()
            cluster.shutdown()


def ray_round(data, expected: float, a: str, b: str, raylet_b: int, tasks: int,
              every: float | None) -> dict:
    """ray.put, then the tasks on ObjectRef arguments (node B's memory sampled ``every``
    seconds, or only read at the end)."""
    with Sampler(raylet_b, every) as memory:
        started = time.perf_counter()
        object_ref = ray.put(data)
        put = time.perf_counter() - started
        results = run_tasks(reduce_ray, [object_ref], a, b, tasks)
        end_to_end = time.perf_counter() - started
    return {"put_s": put, "end_to_end_s": end_to_end,
            **summarize(results, a, b, expected), "node_b_bytes": memory.peak}


def vas_round(data, expected: float, a: str, b: str, raylet_b: int, tasks: int,
              every: float | None) -> dict:
    """vas.ray.put, then the tasks on the SegmentRef; the dataset is deleted after (and
    node B's replica gone) so that every round moves the bytes again. Node B's memory
    as in ``ray_round``."""
    with Sampler(raylet_b, every) as memory:
        started = time.perf_counter()
        ref = vas.ray.put(data)
        put = time.perf_counter() - started
        results = run_tasks(reduce_vas, ref, a, b, tasks)
        end_to_end = time.perf_counter() - started
    held = agent_bytes(b, lambda used: used >= data.nbytes)
    home_get = ray.get(time_home_get.options(**pinned(a)).remote(ref, 200), timeout=600)
    with vas.connect() as client:
        client.delete(ref.name, force=True)
    agent_bytes(b, lambda used: used == 0)
    return {"put_s": put, "end_to_end_s": end_to_end,
            **summarize(results, a, b, expected), "node_b_bytes": memory.peak,
            "node_b_agent_bytes": held, "home_get_ms": home_get * 1e3}


def cold_and_warm(clusters: list[list[dict]], firsts: tuple[str, ...], side: str) -> dict:
    """Of one side's timed rounds in each cluster (``firsts``: which side went first in
    each): "cold", the median of the first rounds (also "cold_first" and "cold_second",
    of those where this side went first, and second), and "warm", the median of the
    others."""
    colds, warm = [runs[0] for runs in clusters], [run for runs in clusters for run in runs[1:]]
    warm = warm or colds

    def median(runs):
        return {key: statistics.median([run[key] for run in runs]) for key in runs[0]
                if all(run[key] is not None for run in runs)}
    return {"cold": median(colds), "warm": median(warm),
            "cold_first": median([c for c, f in zip(colds, firsts) if f == side]),
            "cold_second": median([c for c, f in zip(colds, firsts) if f != side])}


def ratio(x, y):
    return None if x is None or y in (None, 0) else x / y


FIGURES = (("put_s", "s", 1), ("end_to_end_s", "s", 1), ("first_task_s", "s", 1),
           ("later_task_s", "s", 1), ("node_b_bytes", "MiB", 1 / MiB))
#: Shown for each position apart too: each side's cold rounds run first, and run second.
POSITION_FIGURES = ("put_s", "end_to_end_s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 96 MiB array")
    parser.add_argument("--size", type=int, help="array bytes (default 1 GiB)")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds of each side per cluster (>= 2: the first is "
                             "cold), before one sampled round of each")
    parser.add_argument("--pairs", type=int, default=2,
                        help="pairs of clusters per object-store size (Ray first in one of "
                             "each pair, vas first in the other; >= 1)")
    parser.add_argument("--cold-vm", action="store_true",
                        help="do not make fresh memory resident before the cold rounds "
                             "(see back_vm_memory: the side run second then pays the "
                             "VM host's page faults)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (one cold round, then warm ones)")
    if args.pairs < 1:
        parser.error("--pairs must be >= 1")
    size = args.size or (96 * MiB if args.quick else GiB)
    size -= size % 8
    if "VAS_NODE" in os.environ:
        raise SystemExit("unset VAS_NODE: the tasks must find their own node's agent")
    figures = {"data_bytes": size, "tasks": args.tasks, "rounds": args.rounds,
               "pairs": args.pairs,
               "vm_memory_backed_before_cold_rounds": not args.cold_vm, "stores": {}}
    for label, factor in (("large_store", 2.5), ("small_store", 0.6)):
        store = max(int(size * factor), 80 * MiB)  # Ray refuses stores under ~75 MiB
        print(f"== {label}: object store {store / MiB:.0f} MiB per node, data "
              f"{size / MiB:.0f} MiB", file=sys.stderr, flush=True)
        figures["stores"][label] = one_store(size, store, args.tasks, args.rounds, args.pairs,
                                             args.cold_vm)
    rows = []
    for label, result in figures["stores"].items():
        result["ratios"] = {}
        for phase in ("cold", "warm"):
            v, r = result["vas"][phase], result["ray"][phase]
            ratios = result["ratios"][phase] = {key: ratio(v.get(key), r.get(key))
                                                for key, _, _ in FIGURES}
            ratios["node_b_bytes_per_copy"] = ratio(v["node_b_bytes"], size)
            ratios["ray_node_b_bytes_per_copy"] = ratio(r["node_b_bytes"], size)
            for key, unit, scale in FIGURES:
                rows.append((f"{label} {phase} {key}", cell(v.get(key), scale, unit),
                             cell(r.get(key), scale, unit), ratios[key]))
            rows.append((f"{label} {phase} home ref.get()", cell(v["home_get_ms"], 1, "ms"),
                         "-", None))
        v, r = result["vas"]["node_b_peak_bytes"], result["ray"]["node_b_peak_bytes"]
        result["ratios"]["peak"] = {"node_b_peak_bytes": ratio(v, r),
                                    "node_b_peak_bytes_per_copy": ratio(v, size),
                                    "ray_node_b_peak_bytes_per_copy": ratio(r, size)}
        rows.append((f"{label} node_b_peak_bytes (sampled)", cell(v, 1 / MiB, "MiB"),
                     cell(r, 1 / MiB, "MiB"), result["ratios"]["peak"]["node_b_peak_bytes"]))
        for position in ("cold_first", "cold_second"):  # the cold rounds, by position
            v, r = result["vas"][position], result["ray"][position]
            result["ratios"][position] = {key: ratio(v[key], r[key]) for key in POSITION_FIGURES}
            for key in POSITION_FIGURES:
                rows.append((f"{label} {position} {key}", cell(v[key], 1, "s"),
                             cell(r[key], 1, "s"), result["ratios"][position][key]))
    print(f"{'figure':<38} {'vas':>14} {'ray':>14} {'vas/ray':>8}")
    for name, v, r, x in rows:
        print(f"{name:<38} {v:>14} {r:>14} {'' if x is None else f'{x:.2f}':>8}")
    print(json.dumps(figures), flush=True)
    return 0


def cell(value, scale: float, unit: str) -> str:
    return "-" if value is None else f"{value * scale:.3f} {unit}"


if __name__ == "__main__":
    sys.exit(main())
