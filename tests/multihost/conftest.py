"""Multi-host fixture: every agent in its own Linux network namespace with its own IP.

``hosts`` (module scope) builds, in the root namespace, a bridge ``vasbrNNNN`` with
10.77.X.1/24 and N namespaces ``vas-<pid>-a``, ``vas-<pid>-b``, ... each joined to the
bridge by a veth pair (10.77.X.10+i/24 inside, ``lo`` up). etcd and the coordinator
run in the root namespace listening on the bridge IP; agent i runs inside its
namespace (NodeProcess(netns=...)) listening and advertising 10.77.X.10+i, so every
byte between agents, coordinator and etcd really crosses veth interfaces and the
bridge. Agents' Unix sockets live in a world-readable tmp dir: a socket is a file
system object, reachable from every network namespace.

Nothing can leave the machine: the namespaces have only the connected bridge-subnet
route (no default route; everything they talk to is on 10.77.X.0/24), the bridge has
no uplink port and no NAT is set up.

    def test_x(hosts):
        hosts.nodes[0].address          # "10.77.X.10:PORT"
        hosts.run(1, "import vas; ...")  # a Python client inside namespace b; its stdout
        with hosts.cut(1) as link:          # namespace b's veth down: a pulled cable
            ...; link.heal()                # up again (also when the block ends)

A test module may set ``HOSTS_NODE_ARGS`` (more flags of every agent, e.g. a short
``--node-ttl``); its agents then start with them. ``HOSTS_COUNT`` sets how many
agents (namespaces) it gets (default ``HOSTS``).

The module is skipped with the reason when namespaces, veths or bridges cannot be
made (not root / no CAP_NET_ADMIN / no iproute2). Teardown always stops processes
and deletes namespaces, veths and the bridge; at start, leftovers of dead test
processes (namespaces ``vas-<pid>-*``, bridges aliased ``vas-<pid>``) are removed.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from vas.cluster import CoordinatorProcess, EtcdProcess, NodeProcess, free_port

#: Agents (namespaces) the fixture starts.
HOSTS = 2
#: Capacity of each agent.
MEMORY = 2560 << 20  # room for a 2 GiB segment (lazy replicas only hold touched chunks)
WRITER_TTL = 2  # seconds: a stopped writer loses its lock quickly (fencing tests)
_NS_RE = re.compile(r"^vas-(\d+)-[a-z]$")
_ALIAS_RE = re.compile(r"alias vas-(\d+)\b")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip ARGS``; raise RuntimeError with its stderr when ``check`` and it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_netns_pids(ns: str) -> None:
    """SIGKILL every process left inside namespace ``ns`` (by pid) so it can go away."""
    done = _ip("netns", "pids", ns, check=False)
    for pid in done.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _delete_netns(ns: str) -> None:
    _kill_netns_pids(ns)
    _ip("netns", "del", ns, check=False)  # its veth ends go with it, and so do their peers


def _clean_stale() -> None:
    """Remove namespaces and bridges of earlier test processes that are gone."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NS_RE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _delete_netns(name)
    for block in re.split(r"\n(?=\d+: )", _ip("-d", "link", "show", check=False).stdout):
        head = re.match(r"\d+: ([^:@\s]+)", block)
        alias = _ALIAS_RE.search(block)
        if head and alias and head.group(1).startswith(("vasbr", "vh")) \
                and not _pid_alive(int(alias.group(1))):
            _ip("link", "del", head.group(1), check=False)


def _pick_subnet() -> int:
    """An X in 10.77.X.0/24 that no interface of this machine uses yet."""
    used = _ip("-4", "-o", "addr", "show", check=False).stdout
    start = os.getpid() % 240 + 10
    for step in range(240):
        x = (start + step) % 240 + 10
        if f" 10.77.{x}." not in used:
            return x
    raise RuntimeError("no free 10.77.X.0/24 subnet")


@dataclass
class Hosts:
    """What ``hosts`` hands out: the network and the processes on it."""

    subnet: int                 # X of 10.77.X.0/24
    bridge: str                 # root-namespace bridge, with bridge_ip
    bridge_ip: str
    namespaces: list[str]       # one per agent
    ips: list[str]              # agent i's address inside namespaces[i]
    host_veths: list[str]       # bridge-side veth end of namespace i
    ns_veths: list[str]         # namespace-side veth end of namespace i
    dir: str                    # world-readable: logs and the agents' sockets
    etcd: EtcdProcess | None = None
    coordinator: CoordinatorProcess | None = None
    nodes: list[NodeProcess] = field(default_factory=list)

    def run(self, host: int, code: str, *, timeout: float = 60.0, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """Run ``python -c code`` inside namespace ``host`` with VAS_NODE set to that
        host's agent socket; the completed process (stdout/stderr text)."""
        child_env = {**os.environ, "VAS_NODE": self.nodes[host].socket, **(env or {})}
        done = subprocess.run(["ip", "netns", "exec", self.namespaces[host], sys.executable,
                               "-c", code], capture_output=True, text=True, env=child_env,
                              cwd="/", timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"client in {self.namespaces[host]} failed "
                                 f"({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done


    def fill(self, host: int, name: str, size: int) -> str:
        """Create ``name`` (mode 0644) on ``host`` holding ``size`` random bytes; their sha256."""
        return self.run(host, f"""
import hashlib, os, vas
with vas.connect() as c:
    c.create({name!r}, {size}, mode=0o644)
    with c.attach({name!r}, "rw") as m:
        m.write(0, os.urandom({size}))
        print(hashlib.sha256(m.buffer).hexdigest())
""").stdout.strip()

    def spawn(self, host: int, code: str) -> subprocess.Popen:
        """Start ``python -c code`` inside namespace ``host`` (as ``run``) with text pipes
        on stdin and stdout, for a client that lives across several steps of a test;
        the caller kills it."""
        child_env = {**os.environ, "VAS_NODE": self.nodes[host].socket}
        return subprocess.Popen(["ip", "netns", "exec", self.namespaces[host], sys.executable,
                                 "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=child_env, cwd="/")

    @contextmanager
    def cut(self, host: int):
        """Cut namespace ``host`` off: its bridge-side veth goes down, so every packet
        to or from it is dropped (open TCP connections stay, silent, as behind a pulled
        cable). Yields a ``Link`` whose ``heal()`` brings it up again; the block's end
        heals it in any case (a failed test never leaves a host cut off)."""
        link = Link(self.host_veths[host])
        _ip("link", "set", link.veth, "down")
        try:
            yield link
        finally:
            link.heal()


@dataclass
class Link:
    """A bridge-side veth taken down by ``Hosts.cut``."""

    veth: str
    healed: bool = False

    def heal(self) -> None:
        """Bring the veth up again (once; later calls do nothing)."""
        if not self.healed:
            _ip("link", "set", self.veth, "up")
            self.healed = True


def _build_network(hosts: Hosts) -> None:
    pid = os.getpid()
    _ip("link", "add", hosts.bridge, "type", "bridge")
    _ip("link", "set", hosts.bridge, "alias", f"vas-{pid}")
    _ip("addr", "add", f"{hosts.bridge_ip}/24", "dev", hosts.bridge)
    _ip("link", "set", hosts.bridge, "up")
    for ns, ip, outer, inner in zip(hosts.namespaces, hosts.ips, hosts.host_veths,
                                    hosts.ns_veths):
        _ip("netns", "add", ns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", outer, "alias", f"vas-{pid}")
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", outer, "master", hosts.bridge)
        _ip("link", "set", outer, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")


def _teardown(hosts: Hosts) -> None:
    for proc in [*hosts.nodes, hosts.coordinator, hosts.etcd]:
        if proc is not None:
            try:
                proc.stop(timeout=5)
            except Exception:  # noqa: BLE001 - keep tearing down
                proc.kill()
    for ns in hosts.namespaces:
        _delete_netns(ns)
    for link in [*hosts.host_veths, hosts.bridge]:
        if _ip("link", "show", link, check=False).returncode == 0:
            _ip("link", "del", link, check=False)
    shutil.rmtree(hosts.dir, ignore_errors=True)


def _wait_gone(links: list[str], namespaces: list[str], timeout: float = 10.0) -> None:
    """Wait until the links and namespaces are gone (netns deletion is asynchronous)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nss = _ip("netns", "list", check=False).stdout
        if all(_ip("link", "show", link, check=False).returncode != 0 for link in links) \
                and not any(re.search(rf"^{re.escape(ns)}\b", nss, re.M) for ns in namespaces):
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def hosts(request):
    """A bridge, ``HOSTS`` namespaces, etcd + coordinator on the bridge IP and one
    agent per namespace (with the module's ``HOSTS_NODE_ARGS``); see the module docstring."""
    node_args = list(getattr(request.module, "HOSTS_NODE_ARGS", ()))
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root (CAP_NET_ADMIN) and iproute2's `ip`")
    _clean_stale()
    pid = os.getpid()
    short = pid % 10000
    x = _pick_subnet()
    count = getattr(request.module, "HOSTS_COUNT", HOSTS)
    letters = "abcdefghijklmnopqrstuvwxyz"[:count]
    hosts = Hosts(subnet=x, bridge=f"vasbr{short}", bridge_ip=f"10.77.{x}.1",
                  namespaces=[f"vas-{pid}-{c}" for c in letters],
                  ips=[f"10.77.{x}.{10 + i}" for i in range(count)],
                  host_veths=[f"vh{short}{c}" for c in letters],
                  ns_veths=[f"vn{short}{c}" for c in letters],
                  dir=tempfile.mkdtemp(prefix="vas-mh-"))
    os.chmod(hosts.dir, 0o755)
    try:
        try:
            _build_network(hosts)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            pytest.skip("cannot build network namespaces with veths on a bridge (needs root "
                        f"with CAP_NET_ADMIN in the initial network namespace): {exc}")
        hosts.etcd = EtcdProcess(hosts.dir)
        # Preset URLs put etcd's client port on the bridge IP (reachable from every
        # namespace); the peer port stays on loopback.
        hosts.etcd.url = f"http://{hosts.bridge_ip}:{free_port()}"
        hosts.etcd.peer_url = f"http://127.0.0.1:{free_port()}"
        hosts.etcd.start()
        # Plaintext on the bridge: --insecure (the network is this test's own; the TLS
        # tests are in tests/integration/test_tls.py).
        hosts.coordinator = CoordinatorProcess(hosts.dir, hosts.etcd.url,
                                               listen=f"{hosts.bridge_ip}:0",
                                               args=["--insecure"]).start()
        hosts.nodes = [NodeProcess(hosts.dir, hosts.coordinator.address, node_id=f"host-{c}",
                                   memory=MEMORY, listen=f"{ip}:0", netns=ns,
                                   socket=os.path.join(hosts.dir, f"{c}.sock"),
                                   writer_ttl=WRITER_TTL, args=["--insecure", *node_args])
                       for c, ip, ns in zip(letters, hosts.ips, hosts.namespaces)]
        for node in hosts.nodes:
            node.launch()
        for node in hosts.nodes:
            node.wait_ready()
        yield hosts
    finally:
        _teardown(hosts)
        _wait_gone([*hosts.host_veths, hosts.bridge], hosts.namespaces)
