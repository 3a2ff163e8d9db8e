"""Load: 32 client processes x ``CYCLES`` attach/read/detach cycles while a writer syncs.

Two agents; three segments: ``load/one`` homed on node1 and ``load/two`` on node2
(never written during the load) and ``load/synced``, homed on node1, which a writer
process on node1 writes and syncs in a loop the whole time (a bounded loop: it stops
when told, or at ``WRITER_LIMIT`` syncs). Half the clients talk to node1, half to
node2, and each cycle attaches one of the three ("r", lazy: local on its home, a
shared replica elsewhere, refreshed as the writer's versions go by), reads all of it,
checks its sha256 against the known bytes, and detaches. The writer writes the same
bytes at every version, so every read has one right answer whatever sync it overlaps
(torn reads of concurrent writes are the history checker's business, not this
test's): what is measured here is errors and resources under load.

Then: zero errors, every cycle done, versions seen only grow in each client, and
within ``DRAIN`` seconds each agent's open fds (/proc/PID/fd), threads
(/proc/PID/status) and memory (the agent's own memory_used, and RSS) come back to
their level before the load, give or take what stays on purpose (``FD_SLACK``,
``THREAD_SLACK``: bulk connections and their serving threads between the agents,
which live until idle; ``RSS_SLACK``: the Python allocator keeps freed arenas).
"""
from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
import time

import loadclients
import vas
from faultkit import agent_cpu_seconds, agent_threads, open_fds, usage
from loadclients import NAMES, SIZE
from waiting import wait_for
from workers import run_workers

KiB, MiB = 1 << 10, 1 << 20
CLIENTS = 32
#: Cycles of each client: 150 in the suite (4 800 in all, ~1/3 of the 500 the test
#: ran before, with the same checks): a leak of one fd or thread per ~600 cycles, or
#: of 3.5 KiB of RSS per cycle, still shows. ``VAS_LOAD_CYCLES=500`` for a longer run.
CYCLES = int(os.environ.get("VAS_LOAD_CYCLES", "150"))
#: Seconds the clients may take (500 cycles took ~30 s on 2 CPUs).
DEADLINE = 120.0
#: Seconds after the load for the agents to come back to their starting level.
DRAIN = 15.0
#: Allowed above the baseline once drained (see the module docstring).
FD_SLACK = 8
THREAD_SLACK = 8
RSS_SLACK = 16 * MiB


def snapshot(nodes) -> dict:
    """node id -> (fds, threads, RSS bytes, memory_used) of its agent right now."""
    return {node.node_id: (open_fds(node.pid), agent_threads(node.pid), rss(node.pid),
                           usage(node)[0]) for node in nodes}


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    raise AssertionError(f"no VmRSS: line for pid {pid}")


def back_to(baseline: dict, nodes) -> bool:
    now = snapshot(nodes)
    return all(now[n][0] <= baseline[n][0] + FD_SLACK and now[n][1] <= baseline[n][1] + THREAD_SLACK
               and now[n][2] <= baseline[n][2] + RSS_SLACK and now[n][3] <= baseline[n][3]
               for n in baseline)


def test_32_clients_x_cycles_while_a_writer_syncs(cluster):
    local = cluster(nodes=2, memory=64 * MiB)
    node1, node2 = local.nodes
    data = loadclients.content()
    expected = hashlib.sha256(data).hexdigest()
    homes = {"load/one": node1, "load/two": node2, "load/synced": node1}
    for name, home in homes.items():
        with vas.connect(home.socket) as client:
            client.create(name, SIZE, mode=0o644)
            with client.attach(name, "rw") as mapping:
                mapping.write(0, data)
                mapping.sync()
    # Warm up: each node holds a replica of each remote segment and its channels to the
    # other agent are open, as they stay after the load.
    for node in local.nodes:
        with vas.connect(node.socket) as client:
            for name in NAMES:
                with client.attach(name) as mapping:
                    assert hashlib.sha256(mapping.buffer).hexdigest() == expected
    baseline = snapshot(local.nodes)

    # Forked from a fresh server process that preloaded only vas (never from this one,
    # which has gRPC threads).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["loadclients"])
    results, writer_results, stop = context.Queue(), context.Queue(), context.Event()
    writer = context.Process(target=loadclients.writer, name="vas-load-writer", daemon=True,
                             args=(node1.socket, data, stop, writer_results))
    clients = [context.Process(target=loadclients.client, name=f"vas-load-{i}", daemon=True,
                               args=(i, local.nodes[i % 2].socket, CYCLES, expected, results))
               for i in range(CLIENTS)]
    daemons = {p.name: p.pid for p in (*local.nodes, *local.coordinators)}
    cpu = {name: agent_cpu_seconds(pid) for name, pid in daemons.items()}
    started = time.monotonic()
    writer.start()
    try:
        reports = run_workers(clients, results, started + DEADLINE)
    finally:
        stop.set()
        wrote = writer_results.get(timeout=DEADLINE)
        writer.join(DEADLINE)
        if writer.is_alive():
            writer.kill()
    load = time.monotonic() - started
    cpu = {name: round(agent_cpu_seconds(pid) - cpu[name], 1) for name, pid in daemons.items()}
    peak = snapshot(local.nodes)

    assert wrote["error"] is None, wrote["error"]
    assert len(reports) == CLIENTS, f"only {len(reports)} of {CLIENTS} clients reported in time"
    errors = sum((collections.Counter(r["errors"]) for r in reports), collections.Counter())
    firsts = [r["first"] for r in reports if r["first"]]
    assert not errors, f"{dict(errors)}; first:\n{firsts[0]}"
    assert sum(r["done"] for r in reports) == CLIENTS * CYCLES
    seen = max(r["versions"].get("load/synced", 0) for r in reports)
    assert 1 < seen <= wrote["version"] + 1, (seen, wrote)

    drained = time.monotonic()
    wait_for(lambda: back_to(baseline, local.nodes),
             f"the agents back to their starting level {baseline}", timeout=DRAIN)
    drain = time.monotonic() - drained
    for node in local.nodes:
        with open(node.log_path, errors="replace") as log:
            assert "Traceback" not in log.read(), node.tail(60)
    print(f"\n{CLIENTS} clients x {CYCLES} cycles in {load:.1f} s while the writer synced "
          f"{wrote['syncs']} times (last version {wrote['version']}, newest a reader saw "
          f"{seen}); (fds, threads, RSS, memory_used) before {baseline}, right after {peak}, "
          f"{drain:.2f} s later {snapshot(local.nodes)}; CPU seconds: daemons {cpu}, clients "
          f"{sum(r['cpu'] for r in reports):.1f}; load "
          f"average {os.getloadavg()[0]:.1f}")
