"""deploy/kubernetes's own command lines, run on hosts of their own.

Two coordinators and three agents, each in its own network namespace with its own IP on a
bridge (vas.netns, as for the other tests of tests/multihost), all on the ports deploy/
fixes: every coordinator on 7300, every agent on 7400 (gRPC) and 7401 (bulk channel), the
same numbers on every host as on real machines. The agents run the DaemonSet's args with ``$(HOST_IP)`` and
``$(NODE_NAME)`` filled in, and its environment (``VAS_INSECURE``, ``VAS_MEMORY``); the
coordinators the Deployment's args. What stands in for Kubernetes: the Service names
(``vas-coordinator``, ``vas-etcd``) become the IPs behind them, the hostPath socket a
file in a test directory, the kubelet's gRPC probe the launcher's health check from the
root namespace across the bridge, and deploy/health.py (the image's vas-health) checks each
daemon too. Then an eager attach on two hosts of a segment homed on the third moves its
bytes over the home's bulk channel at HOST_IP:7401 (checksums; the fetching agents' logs).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from vas import netns
from vas.cluster import CoordinatorProcess, EtcdProcess, NodeProcess, free_port
from vas.core.sizes import parse_size

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
HEALTH = ROOT / "deploy" / "health.py"
SIZE = 32 << 20    # above the small-fetch size: an eager attach uses the bulk channel
AGENTS = "abc"
COORDINATORS = "xy"


def container(filename: str, kind: str) -> dict:
    """The first container of the ``kind`` object in deploy/kubernetes/``filename``."""
    for doc in yaml.safe_load_all((KUBERNETES / filename).read_text()):
        if doc and doc["kind"] == kind:
            return doc["spec"]["template"]["spec"]["containers"][0]
    raise LookupError(f"no {kind} in {filename}")


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def replaced(argv: list[str], name: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(name) + 1] = value
    return argv


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], text)


class Network:
    """vas.netns's bridge and namespaces, one per host, addressed by this test's letters."""

    def __init__(self, letters: str):
        self.hosts = netns.make_network(len(letters))
        self.bridge_ip = self.hosts.bridge_ip
        self.namespaces = dict(zip(letters, self.hosts.namespaces))
        self.ips = dict(zip(letters, self.hosts.ips))

    def teardown(self) -> None:
        netns.remove(self.hosts)  # the processes are stopped first, by the fixture


@pytest.fixture
def deployed(monkeypatch):
    """etcd on the bridge IP; coordinators x, y and agents a, b, c in namespaces, started
    from deploy/kubernetes's args and environment."""
    try:
        net = Network(COORDINATORS + AGENTS)
    except netns.NetnsUnavailable as exc:
        pytest.skip(str(exc))
    workdir = tempfile.mkdtemp(prefix="vas-deploy-")
    os.chmod(workdir, 0o755)
    processes = []
    try:
        etcd = EtcdProcess(workdir)
        etcd.url = f"http://{net.bridge_ip}:{free_port()}"
        etcd.peer_url = f"http://127.0.0.1:{free_port()}"
        processes.append(etcd.start())

        spec = container("coordinator.yaml", "Deployment")
        for item in spec["env"]:
            monkeypatch.setenv(item["name"], item["value"])
        coordinator_port = int(flag(spec["args"], "--listen").rpartition(":")[2])
        coordinators = []
        for c in COORDINATORS:
            argv = replaced(spec["args"][2:], "--etcd", etcd.url)  # the vas-etcd Service
            argv = replaced(argv, "--listen", f"{net.ips[c]}:{coordinator_port}")
            process = CoordinatorProcess(workdir, etcd.url, name=f"coordinator-{c}",
                                         listen=f"{net.ips[c]}:{coordinator_port}", args=argv)
            process.launch_prefix = ["ip", "netns", "exec", net.namespaces[c]]
            coordinators.append(process.launch())
            processes.append(process)
        for process in coordinators:
            process.wait_ready()

        spec = container("node.yaml", "DaemonSet")
        env = {e["name"]: e["value"] for e in spec["env"] if "value" in e}
        service_host, _, port = env.pop("VAS_COORDINATOR").rpartition(":")
        assert service_host == "vas-coordinator"
        # The Service's addresses: gRPC's ipv4: target fails over between them.
        target = "ipv4:" + ",".join(f"{net.ips[c]}:{port}" for c in COORDINATORS)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        agents = {}
        for c in AGENTS:
            fields = {"HOST_IP": net.ips[c], "NODE_NAME": f"host-{c}"}
            argv = [expand(str(a), fields) for a in spec["args"]][2:]
            socket = os.path.join(workdir, f"{c}.sock")       # the hostPath /run/vas
            argv = replaced(argv, "--socket", socket)
            agents[c] = NodeProcess(workdir, target, node_id=f"host-{c}",
                                    memory=parse_size(env["VAS_MEMORY"]),
                                    listen=flag(argv, "--listen"), socket=socket,
                                    netns=net.namespaces[c], args=argv)
            agents[c].launch()
            processes.append(agents[c])
        for agent in agents.values():
            agent.wait_ready()
        yield net, coordinators, agents
    finally:
        for process in reversed(processes):
            try:
                process.stop(timeout=10)
            except Exception:  # noqa: BLE001 - keep tearing down
                process.kill()
        net.teardown()
        shutil.rmtree(workdir, ignore_errors=True)


def client(net: Network, c: str, socket: str, code: str) -> str:
    """``python -c code`` in host ``c``'s namespace with VAS_NODE=``socket``; its stdout."""
    done = subprocess.run(["ip", "netns", "exec", net.namespaces[c], sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=120, cwd="/",
                          env={**os.environ, "VAS_NODE": socket})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_daemonset_args_serve_eager_attaches_over_the_bulk_port(deployed):
    net, coordinators, agents = deployed
    spec = container("node.yaml", "DaemonSet")
    bulk_port = int(flag(spec["args"], "--bulk-port"))
    grpc_port = int(flag(spec["args"], "--listen").rpartition(":")[2])

    # Every agent on the same two ports, each on its own host.
    assert {c: a.address for c, a in agents.items()} == {
        c: f"{net.ips[c]}:{grpc_port}" for c in AGENTS}
    for address, server in ([(a.address, "node") for a in agents.values()]
                            + [(c.address, "coordinator") for c in coordinators]):
        done = subprocess.run([sys.executable, str(HEALTH), address, "--server", server],
                              capture_output=True, text=True, timeout=30)
        assert (done.returncode, done.stderr) == (0, ""), address

    made = client(net, "a", agents["a"].socket, f"""
import hashlib, os, vas
with vas.connect() as c:
    c.create("deploy/data", {SIZE}, mode=0o644)
    with c.attach("deploy/data", "rw") as m:
        m.write(0, os.urandom({SIZE}))
        print(hashlib.sha256(m.buffer).hexdigest())
""")
    for c in "bc":
        copied = client(net, c, agents[c].socket, """
import hashlib, json, vas
with vas.connect() as client, client.attach("deploy/data", fetch="eager") as m:
    print(json.dumps([m.info.home, hashlib.sha256(m.buffer).hexdigest(),
                      sorted((n.id, n.address) for n in client.nodes())]))
""")
        home, digest, nodes = json.loads(copied)
        assert (home, digest) == ("host-a", made)
        assert nodes == [[f"host-{h}", f"{net.ips[h]}:{grpc_port}"] for h in AGENTS]
        # From the home, or (c, attaching after b) from b's copy as a relay: both are
        # served on the fixed bulk port.
        sources = [f"{net.ips['a']}:{bulk_port}",
                   f"from relay {net.ips['b']}:{bulk_port} (home {net.ips['a']}:{bulk_port})"]
        with open(agents[c].log_path, encoding="utf-8") as log:
            text = log.read()
        assert any(f"fetched {SIZE} bytes from host-a over the bulk channel {source}" in text
                   for source in sources), text[-2000:]
