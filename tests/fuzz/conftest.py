"""Hostile-input fuzzing: hypothesis against one real cluster (etcd, a coordinator, two
agents) shared by every module of this folder.

Each fuzzer sends random, often malformed requests to one target (a gRPC service, the
local socket, the bulk channel) and asserts a precise answer: a gRPC status from
``EXPECTED_CODES`` (never UNKNOWN or INTERNAL), an error reply or a clean close. After
each test the ``fuzzed`` fixture's ``check()`` proves the daemons alive and SERVING, their
logs free of tracebacks and the canary segment's bytes unchanged (read on its home and
over Node.ReadPages). The shared code is in fuzzkit.py, the strategies in strategies.py.

Budget: every fuzzer runs ``examples(n)`` examples, n in the suite (all of this folder
adds well under 45 s on 2 cores). ``VAS_FUZZ_SCALE=K`` multiplies every n by K for a
big run; the terminal summary then prints the requests sent per target and the
daemon crashes (``tests/fuzz/run_big.sh`` runs one)::

    VAS_FUZZ_SCALE=30 .venv/bin/python -m pytest -q -o timeout=0 tests/fuzz
"""
from __future__ import annotations

import shutil

import pytest

from fuzzkit import CRASHES, SCALE, SENT, FuzzCluster
from vas.cluster import LocalCluster
from worlds import new_world_dir


@pytest.fixture(scope="session")
def fuzz_cluster():
    """The cluster every fuzzer of this folder shares, started once, with an etcd of its
    own: the fuzzers leave fake nodes and records behind, and its agents heartbeat until
    the session ends (a folder without __init__.py has no narrower scope), so neither
    may reach the session etcd that the other tests wipe and read."""
    path = new_world_dir("vas-fuzz-")
    local = LocalCluster(path, nodes=2, memory=64 << 20).start()
    shared = None
    try:
        shared = FuzzCluster(local)
        yield shared
    finally:
        if shared is not None:
            shared.close()
        try:
            local.stop()
        finally:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fuzzed(fuzz_cluster, request):
    """``fuzz_cluster``, checked (alive, SERVING, canary intact) after the test."""
    yield fuzz_cluster
    fuzz_cluster.check(request.node.name)


def pytest_terminal_summary(terminalreporter):
    if not SENT:
        return
    write = terminalreporter.write_line
    write(f"fuzz: {sum(SENT.values())} requests (VAS_FUZZ_SCALE={SCALE}), "
          f"{len(CRASHES)} daemon crashes")
    for target, count in sorted(SENT.items()):
        write(f"  {target:40} {count}")
    for crash in CRASHES:
        write(f"  CRASH: {crash}")
