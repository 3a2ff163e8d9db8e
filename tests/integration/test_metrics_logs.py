"""--metrics-port and --log-format json on real daemons (real etcd, coordinator, two agents).

The metrics are read the way Prometheus reads them: an HTTP GET of /metrics, parsed
by prometheus_client's own text parser. Every daemon gets port 0 and the test reads
the port each one picked from its log ("serving metrics on URL").
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import vas
from vas.cluster import LocalCluster, free_port
from waiting import wait_for

MiB = 1 << 20
SIZE = 8 * MiB  # above the agent's ReadPages-only size (4 MiB): fetched on the bulk channel
_READY = re.compile(r"^vas (node|coordinator) \S+ ")


def metrics_url(process) -> str:
    url = process.metrics_url()
    assert url, f"{process.name} logged no metrics URL:\n{process.tail()}"
    return url


def scrape(url: str) -> list:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return list(text_string_to_metric_families(text))


def value(families, sample: str, **labels) -> float | None:
    """The sum of the samples named ``sample`` whose labels include ``labels``; None
    when there is no such sample at all."""
    found = [s.value for f in families for s in f.samples
             if s.name == sample and labels.items() <= s.labels.items()]
    return sum(found) if found else None


def rpcs(families, service: str, method: str, code: str = "OK") -> float:
    return value(families, "vas_rpc_server_handled_total", grpc_service=service,
                 grpc_method=method, grpc_code=code) or 0


@pytest.fixture
def metered(cluster):
    running = cluster(nodes=2, memory=64 * MiB,
                      node_args=["--metrics-port", "0", "--log-format", "json"],
                      coordinator_args=["--metrics-port", "0"])
    node1, node2 = running.nodes
    with vas.connect(node1.socket) as c1, vas.connect(node2.socket) as c2:
        yield running, c1, c2


def test_metrics_of_a_remote_attach_and_write(metered):
    running, c1, c2 = metered
    node1, node2 = running.nodes
    urls = [metrics_url(p) for p in (running.coordinators[0], node1, node2)]
    assert all(url.startswith("http://127.0.0.1:") for url in urls)

    c1.create("metrics/seg", SIZE, mode=0o644)
    data = os.urandom(SIZE)
    with c2.attach("metrics/seg", "rw") as writer:       # remote: fetched whole on node2
        writer.write(0, data)
        writer.sync()                                    # a bulk write to node1
        # The writer lock is kept alive while held: wait for a keepalive to show.
        wait_for(lambda: value(scrape(urls[2]), "vas_node_lease_renewals_total",
                               lease="writer"), what="a writer-lock renewal on node2")
        attached = scrape(urls[2])  # what node2 holds, read at scrape time
        assert value(attached, "vas_node_segments", kind="replica") == 1
        assert value(attached, "vas_node_resident_bytes", kind="replica") == SIZE
        assert value(attached, "vas_node_segments", kind="home") == 0
    with c1.attach("metrics/seg") as reader:             # on the home: mapped, no copy
        assert reader.read(0, SIZE) == data

    coordinator, home, remote = (scrape(url) for url in urls)
    # Bytes by path: the remote replica's fetch and its writer's sync.
    assert value(remote, "vas_node_received_bytes_total", path="bulk") >= SIZE
    assert value(home, "vas_node_sent_bytes_total", path="bulk") >= SIZE
    # Every chunk changed (random bytes over zeros): the sync sent the whole segment.
    assert value(remote, "vas_node_sent_bytes_total", path="bulk_write") == SIZE
    assert value(home, "vas_node_received_bytes_total", path="bulk_write") == SIZE
    assert value(home, "vas_node_sent_bytes_total", path="local") >= SIZE
    # Latencies: one eager attach and one remote sync on node2, one home attach on node1.
    assert value(remote, "vas_node_attach_seconds_count", fetch="eager") >= 1
    assert value(remote, "vas_node_fetch_seconds_count", kind="eager") >= 1
    assert value(remote, "vas_node_sync_seconds_count", where="remote") == 1
    assert value(remote, "vas_node_sync_seconds_sum", where="remote") > 0
    assert value(home, "vas_node_attach_seconds_count", fetch="home") >= 1
    # What node1 holds.
    assert value(home, "vas_node_segments", kind="home") == 1
    assert value(home, "vas_node_resident_bytes", kind="home") == SIZE
    assert value(home, "vas_node_memory_capacity_bytes") == 64 * MiB
    assert value(home, "vas_node_faults_total", result="served") is not None
    assert value(remote, "vas_node_lease_renewal_failures_total", lease="writer") is None or \
        value(remote, "vas_node_lease_renewal_failures_total", lease="writer") == 0
    # RPCs by method and status, on each server.
    assert rpcs(home, "vas.v1.Node", "OpenBulk") >= 1
    assert rpcs(home, "vas.v1.Node", "WritePages") == 0  # the sync went over the bulk channel
    assert rpcs(coordinator, "vas.v1.Coordinator", "CreateSegment") == 1
    assert rpcs(coordinator, "vas.v1.Coordinator", "RegisterNode") >= 2
    assert rpcs(coordinator, "vas.v1.Coordinator", "PublishVersion") >= 1
    assert value(coordinator, "vas_rpc_server_handling_seconds_count",
                 grpc_service="vas.v1.Coordinator", grpc_method="CreateSegment") == 1
    # A refused call is counted under its status.
    with pytest.raises(vas.NotFound):
        c1.stat("metrics/missing")
    assert rpcs(scrape(urls[0]), "vas.v1.Coordinator", "GetSegment", "NOT_FOUND") >= 1

    # The node lease: heartbeats every ttl/3.
    wait_for(lambda: value(scrape(urls[1]), "vas_node_lease_renewals_total", lease="node"),
             what="a heartbeat of node1")

    # The agents logged JSON: every line but the ready line on stdout is one object.
    for node in (node1, node2):
        with open(node.log_path) as log:
            lines = [line for line in log.read().splitlines() if line and not _READY.match(line)]
        assert lines
        for line in lines:
            entry = json.loads(line)
            assert {"time", "level", "logger", "message"} <= entry.keys(), entry


def test_lazy_faults_are_counted(metered):
    running, c1, c2 = metered
    c1.create("metrics/lazy", SIZE, mode=0o644)
    with c2.attach("metrics/lazy", fetch="lazy") as mapping:
        if mapping.fetch != "lazy":
            pytest.skip(f"no userfaultfd here: the attach was {mapping.fetch!r}")
        assert bytes(mapping.buffer[SIZE // 2:SIZE // 2 + 4096]) == bytes(4096)
    remote = scrape(metrics_url(running.nodes[1]))
    assert value(remote, "vas_node_faults_total", result="served") >= 1
    assert value(remote, "vas_node_fetch_seconds_count", kind="chunk") >= 1
    assert value(remote, "vas_node_attach_seconds_count", fetch="lazy") >= 1
    received = (value(remote, "vas_node_received_bytes_total", path="bulk") or 0) + \
        (value(remote, "vas_node_received_bytes_total", path="read_pages") or 0)
    assert 0 < received < SIZE  # a chunk and its read-ahead, not the segment
    assert 0 < value(remote, "vas_node_resident_bytes", kind="replica") < SIZE


def test_metrics_over_mutual_tls(world_dir):
    """With the TLS files the listener is HTTPS and wants a client certificate from the
    CA, like the gRPC port; a client that connects and stays silent holds up no scrape."""
    with LocalCluster(world_dir, nodes=1, memory=16 * MiB, tls=True,
                      node_args=["--metrics-port", "0"]) as running:
        url = metrics_url(running.nodes[0])
        assert url.startswith("https://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with socket.create_connection(("127.0.0.1", port)):  # silent: no handshake
            admin = running.certs.admin.client_context()
            admin.check_hostname = False  # the certificate names node.vas, not 127.0.0.1
            with urllib.request.urlopen(url, context=admin, timeout=10) as reply:
                text = reply.read().decode()
            names = {f.name for f in text_string_to_metric_families(text)}
            assert {"vas_node_segments", "vas_rpc_server_handled"} <= names
        anonymous = ssl.create_default_context(cafile=running.certs.ca.cert_path)
        anonymous.check_hostname = False
        with pytest.raises((OSError, http.client.HTTPException)):  # no client certificate
            urllib.request.urlopen(url, context=anonymous, timeout=10).read()
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP
            urllib.request.urlopen(url.replace("https:", "http:"), timeout=10).read()


def test_metrics_port_is_checked_before_anything_is_bound(vasctl_env, tmp_path):
    """The metrics listener binds --listen's host, so a plaintext non-loopback one is
    refused without --insecure with it (exit 2); a port past 65535 is bad usage."""
    proc = subprocess.run([sys.executable, "-m", "vas.cli", "coordinator", "serve",
                           "--etcd", "http://127.0.0.1:1", "--listen", "0.0.0.0:0",
                           "--metrics-port", "0"], capture_output=True, text=True,
                          timeout=60, env=vasctl_env)
    assert proc.returncode == 2, proc.stderr
    assert "refusing to listen on 0.0.0.0:0 without TLS" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "vas.cli", "node", "serve",
                           "--coordinator", "127.0.0.1:1", "--socket", str(tmp_path / "n.sock"),
                           "--metrics-port", "70000"], capture_output=True, text=True,
                          timeout=60, env=vasctl_env)
    assert proc.returncode == 2, proc.stderr
    assert "invalid port '70000': must be 0..65535" in proc.stderr


def test_coordinator_logs_json_lines(etcd, vasctl_env):
    """--log-format json: every stderr line is one JSON object with time, level, logger
    and message (UTC, milliseconds)."""
    metrics_port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vas.cli", "coordinator", "serve",
                             "--etcd", etcd.url, "--listen", "127.0.0.1:0",
                             "--log-format", "json", "--log-level", "debug",
                             "--metrics-port", str(metrics_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=vasctl_env)
    try:
        ready = proc.stdout.readline()  # blocks until serving (or the process ends)
        assert ready.startswith("vas coordinator listening on "), proc.stderr.read()
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        assert any(f.name == "vas_rpc_server_handled" for f in scrape(url))
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    entries = [json.loads(line) for line in err.splitlines() if line]
    assert entries
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]), entry
    messages = [e["message"] for e in entries]
    assert any(m.startswith(f"serving metrics on {url}") for m in messages), messages
    assert any(m == "stopping" for m in messages), messages
    with pytest.raises(urllib.error.URLError):  # the listener is closed with the daemon
        urllib.request.urlopen(url, timeout=5)


@pytest.fixture
def vasctl_env():
    """This environment without the VAS_* variables a developer's shell may set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("VAS_")}


def test_up_hands_the_log_format_to_its_daemons(world_dir, vasctl_env):
    """vasctl up --log-format json: the coordinator's and the agent's logs (DIR/NAME.log)
    are JSON lines too, at the level given."""
    proc = subprocess.run([sys.executable, "-m", "vas.cli", "up", "--nodes", "1",
                           "--memory", "64MiB", "--dir", world_dir, "--demo",
                           "--log-format", "json", "--log-level", "warning"],
                          capture_output=True, text=True, timeout=300, env=vasctl_env)
    assert proc.returncode == 0, proc.stderr
    for name in ("coordinator1", "node1"):
        with open(os.path.join(world_dir, f"{name}.log")) as log:
            lines = log.read().splitlines()
        assert any(_READY.match(line) for line in lines), lines  # it did run
        for line in lines:
            if line and not _READY.match(line):
                entry = json.loads(line)
                assert entry["level"] in ("WARNING", "ERROR", "CRITICAL"), entry
