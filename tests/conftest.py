"""Shared fixtures: real etcd, real coordinator and agent processes on free ports.

Every process is started by vas.cluster, which waits until it answers (etcd a
range, daemons grpc.health SERVING); every fixture stops what it started.
Tests see a clean keyspace: ``coordinator`` and ``cluster`` delete everything
under /vas/ in the shared etcd before handing it out (the coordinator keeps no
state of its own, so a running one is not disturbed by that).

    def test_x(coordinator):          # a CoordinatorProcess; .address is host:port
    def test_y(cluster):              # cluster(nodes=2) -> a started LocalCluster
    def test_z(module_cluster):       # the same, kept running for the whole module
                                      # (class_cluster: for the tests of one class)
"""
from __future__ import annotations

import contextlib
import shutil
import signal

import pytest

from vas.cluster import CoordinatorProcess, EtcdProcess, LocalCluster
from worlds import new_world_dir, wipe

# A suite started with SIGINT ignored (a background job of a shell without job control)
# hands that on to every process it starts, and a Python started so never raises
# KeyboardInterrupt: the tests that interrupt `vasctl ... --watch` or `vasctl up` would
# wait for it in vain. Handled here, the signal is back at its default in every child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module")
def module_dir():
    """A world-traversable directory shared by one test module, removed after it."""
    path = new_world_dir("vas-mod-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def world_dir():
    """A world-traversable directory for one test, removed after it."""
    path = new_world_dir("vas-t-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _new_etcd():
    """A started EtcdProcess in a directory of its own; stopped and removed on exit."""
    path = new_world_dir("vas-etcd-")
    process = EtcdProcess(path).start()
    try:
        yield process
    finally:
        process.stop()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def etcd():
    """One EtcdProcess for the whole session (``.url``)."""
    with _new_etcd() as process:
        yield process


@pytest.fixture(scope="module")
def _module_coordinator(etcd):
    path = new_world_dir("vas-coord-")
    process = CoordinatorProcess(path, etcd.url).start()
    try:
        yield process
    finally:
        process.stop()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def coordinator(etcd, _module_coordinator):
    """A running CoordinatorProcess (shared by the module) over an empty /vas/ keyspace."""
    wipe(etcd.url)
    if not _module_coordinator.alive():
        pytest.fail(f"the module's coordinator died:\n{_module_coordinator.tail()}")
    return _module_coordinator


@contextlib.contextmanager
def _cluster_factory(etcd):
    """What ``cluster`` and ``module_cluster`` hand out: a factory of started LocalClusters
    over the session etcd, each over an empty /vas/ keyspace, all stopped on exit."""
    started: list[tuple[LocalCluster, str]] = []

    def start(nodes: int = 1, coordinators: int = 1, memory: int = 256 << 20,
              writer_ttl: int | None = None, node_args=(), coordinator_args=()) -> LocalCluster:
        wipe(etcd.url)
        path = new_world_dir("vas-cl-")
        local = LocalCluster(path, nodes=nodes, memory=memory, etcd_url=etcd.url,
                             coordinators=coordinators, writer_ttl=writer_ttl,
                             node_args=node_args, coordinator_args=coordinator_args)
        started.append((local, path))
        return local.start()

    try:
        yield start
    finally:
        for local, path in started:
            try:
                local.stop()
            finally:
                shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cluster(etcd):
    """Factory: ``cluster(nodes=2, coordinators=1, memory=bytes, writer_ttl=None,
    node_args=(), coordinator_args=())`` -> a started LocalCluster over the session etcd
    with an empty /vas/ keyspace (``node_args``: more flags of every ``vasctl node
    serve``, ``coordinator_args`` of every ``vasctl coordinator serve``); stopped after
    the test."""
    with _cluster_factory(etcd) as start:
        yield start


@pytest.fixture(scope="module")
def module_cluster():
    """The ``cluster`` factory, but its clusters run until the module's last test: one
    start-up (about a second on 2 CPUs) serves every test of the module instead of one
    each. Safe for tests that neither kill, restart nor reconfigure the agents and
    name their segments apart (or empty the cluster after each test: ``worlds.empty``).
    Its clusters use an etcd of their own (a quarter second to start), which the
    wipes of ``cluster`` and ``coordinator`` in the same module do not reach."""
    with _new_etcd() as etcd, _cluster_factory(etcd) as start:
        yield start


@pytest.fixture(scope="class")
def class_cluster():
    """``module_cluster`` for the tests of one class: its clusters run until the
    class's last test."""
    with _new_etcd() as etcd, _cluster_factory(etcd) as start:
        yield start

