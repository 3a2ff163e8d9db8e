"""After churn, the agents give everything back within seconds.

Several client processes, each connected to both agents, run a bounded number of
rounds: create a segment on one node, write and sync it there, use it from the other
node (a lazy or eager remote attach read back and checked, a remote writer's write and
sync, or an attach and detach that leaves an unattached replica behind), sometimes keep
that remote attachment open across the delete, and delete it through either node.

Then, within ``DRAIN`` seconds, each agent must hold no segment and no replica
(``memory_used`` 0), etcd must have no record or report left (read directly), and
each agent's open fds (/proc/PID/fd) must be back to what they were before the load,
give or take ``FD_SLACK`` (connections and pools that stay open on purpose: a peer's
gRPC channel, idle bulk connections, a prepared replica memfd of the warm pool).
The agents run with the lock-order checker on (``VAS_LOCK_CHECK=1``): their logs must
show no violation and no traceback.
"""
from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
import random
import time
import traceback

import pytest

import vas
from faultkit import PAIR_MEMORY, open_fds, usage
from vas.coordinator import keys
from vas.node.locks import MARKER
from waiting import wait_for
from workers import run_workers

KiB, MiB = 1 << 10, 1 << 20
WORKERS = 4
ROUNDS = 12
#: 64 KiB (one ReadPages message), 1 MiB + 12 KiB, 5 MiB (the bulk channel).
SIZES = (64 * KiB, MiB + 12 * KiB, 5 * MiB)
#: How the other node uses each segment.
KINDS = ("lazy", "eager", "rw", "idle replica")
#: Seconds the workers may take, and seconds after them for the agents to give back.
DEADLINE = 120.0
DRAIN = 10.0
#: Open fds allowed above the baseline once drained (see the module docstring).
FD_SLACK = 16


def _churn(worker: int, sockets: list[str], seed: int, rounds: int, results) -> None:
    """One client process: ``rounds`` rounds (see the module docstring); puts its report."""
    rng = random.Random(seed)
    clients = [vas.connect(socket) for socket in sockets]
    done: collections.Counter = collections.Counter()
    error = None
    try:
        for number in range(rounds):
            home = rng.randrange(2)
            other, name = clients[1 - home], f"churn/{worker}/{number}"
            size = rng.choice(SIZES)
            data = os.urandom(size)
            clients[home].create(name, size, mode=0o644)
            with clients[home].attach(name, "rw") as mapping:
                mapping.write(0, data)
                mapping.sync()
            kind, kept = rng.choice(KINDS), None
            if kind in ("lazy", "eager"):
                mapping = other.attach(name, fetch=kind)
                mapping.prefetch()  # a kept lazy mapping must not fault after the delete
                assert hashlib.sha256(mapping.buffer).digest() == hashlib.sha256(data).digest()
                if rng.random() < 0.3:
                    kept = mapping
                else:
                    mapping.detach()
            elif kind == "rw":
                with other.attach(name, "rw") as mapping:
                    mapping.write(0, b"w" * 4096)
                    mapping.sync()
            else:
                other.attach(name, fetch=rng.choice(("lazy", "eager"))).detach()
            clients[rng.randrange(2)].delete(name)
            if kept is not None:  # an attached reader keeps its copy until it detaches
                assert kept.read(0, 64) == data[:64]
                kept.detach()
                done["kept across the delete"] += 1
            done[kind] += 1
    except Exception:  # noqa: BLE001  reported to the test
        error = traceback.format_exc()
    finally:
        for client in clients:
            client.close()
    results.put({"worker": worker, "done": dict(done), "error": error})


@pytest.fixture
def checked_pair(monkeypatch, cluster):
    """``pair``, with the agents' lock-order checker on (they inherit the environment)."""
    monkeypatch.setenv("VAS_LOCK_CHECK", "1")
    return cluster(nodes=2, memory=PAIR_MEMORY)


def test_churn_leaves_no_replica_memory_or_fd_behind(checked_pair, oracle):
    nodes = checked_pair.nodes
    baseline = {node.node_id: open_fds(node.pid) for node in nodes}
    sockets = [node.socket for node in nodes]
    context = multiprocessing.get_context("spawn")  # no fork of a process with gRPC threads
    results = context.Queue()
    workers = [context.Process(target=_churn, name=f"vas-churn-{i}", daemon=True,
                               args=(i, sockets, 2000 + i, ROUNDS, results))
               for i in range(WORKERS)]
    started = time.monotonic()
    reports = run_workers(workers, results, started + DEADLINE)
    load = time.monotonic() - started
    errors = [f"worker {r['worker']}:\n{r['error']}" for r in reports if r["error"]]
    assert not errors, "\n".join(errors)
    assert len(reports) == WORKERS, f"only {len(reports)} of {WORKERS} workers reported in time"
    done = sum((collections.Counter(r["done"]) for r in reports), collections.Counter())
    assert sum(done[kind] for kind in KINDS) == WORKERS * ROUNDS, done
    peak = {node.node_id: open_fds(node.pid) for node in nodes}

    drained = time.monotonic()
    for node in nodes:
        wait_for(lambda: usage(node) == (0, 0), f"{node.node_id} to give back every segment "
                 f"and replica (holds {usage(node)})", timeout=DRAIN)
    drain = time.monotonic() - drained
    wait_for(lambda: not oracle.kvs(keys.segment_key("churn/"), prefix=True)
             and not oracle.kvs(keys.attach_prefix("churn/")[:-1], prefix=True),
             "etcd to hold no churn record or report", timeout=DRAIN)
    wait_for(lambda: all(open_fds(node.pid) <= baseline[node.node_id] + FD_SLACK
                         for node in nodes),
             f"the agents' fds to come back to {baseline} + {FD_SLACK}", timeout=DRAIN)
    after = {node.node_id: open_fds(node.pid) for node in nodes}
    for node in nodes:
        with open(node.log_path, errors="replace") as log:
            text = log.read()
        assert MARKER not in text and "Traceback" not in text, node.tail(60)
    print(f"\n{WORKERS} processes x {ROUNDS} rounds in {load:.1f} s: {dict(done)}; "
          f"held nothing {drain:.2f} s later; fds baseline {baseline}, right after the "
          f"load {peak}, drained {after}")
