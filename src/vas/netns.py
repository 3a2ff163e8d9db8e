"""Hosts on one machine: a vas cluster whose agents each live in their own Linux network
namespace with their own IP, as on separate machines. Used by the multi-host tests
(tests/multihost/conftest.py) and bench/netns.py.

``start_hosts(count)`` builds, in the root namespace, a bridge ``vasbrNNNN`` with
10.77.X.1/24 and ``count`` namespaces ``vas-<pid>-a``, ``vas-<pid>-b``, ... each joined
to the bridge by a veth pair (10.77.X.10+i/24 inside, ``lo`` up). etcd and the
coordinator run in the root namespace listening on the bridge IP; agent i runs inside
its namespace (NodeProcess(netns=...)) listening and advertising 10.77.X.10+i, so every
byte between agents, coordinator and etcd really crosses veth interfaces and the
bridge. Agents' Unix sockets live in a world-readable tmp dir: a socket is a file
system object, reachable from every network namespace (a client in the root namespace
can use any agent).

Nothing can leave the machine: the namespaces have only the connected bridge-subnet
route (no default route; everything they talk to is on 10.77.X.0/24), the bridge has
no uplink port and no NAT is set up.

    with start_hosts(2, memory=1 << 30) as hosts:
        hosts.nodes[0].address              # "10.77.X.10:PORT"
        hosts.run(1, "import vas; ...")     # a Python client inside namespace b
        with hosts.cut(1) as link:          # namespace b's veth down: a pulled cable
            ...; link.heal()
        with hosts.shaped(0, "2gbit"):      # what namespace a sends: at most 2 gbit/s
            ...

Names carry the pid of the process that made them, so runs in parallel never meet, and
at start the leftovers of dead processes (namespaces ``vas-<pid>-*``, bridges and veths
aliased ``vas-<pid>``) are removed. The exit of ``start_hosts`` (an exception or a
Ctrl-C included) stops the processes and deletes namespaces, veths and the bridge.
``NetnsUnavailable`` says why hosts cannot be made here (not root, no iproute2, no
CAP_NET_ADMIN).
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

from vas.cluster import CoordinatorProcess, EtcdProcess, NodeProcess, free_port

_NS_RE = re.compile(r"^vas-(\d+)-[a-z]$")
_ALIAS_RE = re.compile(r"alias vas-(\d+)\b")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class NetnsUnavailable(RuntimeError):
    """Network namespaces, veths or bridges cannot be made on this machine."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
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
    done = ip("netns", "pids", ns, check=False)
    for pid in done.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _delete_netns(ns: str) -> None:
    _kill_netns_pids(ns)
    ip("netns", "del", ns, check=False)  # its veth ends go with it, and so do their peers


def clean_stale() -> None:
    """Remove namespaces and bridges of earlier processes that are gone."""
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NS_RE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _delete_netns(name)
    for block in re.split(r"\n(?=\d+: )", ip("-d", "link", "show", check=False).stdout):
        head = re.match(r"\d+: ([^:@\s]+)", block)
        alias = _ALIAS_RE.search(block)
        if head and alias and head.group(1).startswith(("vasbr", "vh")) \
                and not _pid_alive(int(alias.group(1))):
            ip("link", "del", head.group(1), check=False)


def _pick_subnet() -> int:
    """An X in 10.77.X.0/24 that no interface of this machine uses yet."""
    used = ip("-4", "-o", "addr", "show", check=False).stdout
    start = os.getpid() % 240 + 10
    for step in range(240):
        x = (start + step) % 240 + 10
        if f" 10.77.{x}." not in used:
            return x
    raise RuntimeError("no free 10.77.X.0/24 subnet")


@dataclass
class Hosts:
    """The network and the processes on it (see the module docstring)."""

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

    @classmethod
    def plan(cls, count: int) -> "Hosts":
        """Names and addresses for ``count`` hosts of this process (nothing made yet)."""
        if not 1 <= count <= len(_LETTERS):
            raise ValueError(f"hosts: count must be 1..{len(_LETTERS)}, not {count}")
        pid = os.getpid()
        short = pid % 10000
        x = _pick_subnet()
        letters = _LETTERS[:count]
        directory = tempfile.mkdtemp(prefix="vas-mh-")
        os.chmod(directory, 0o755)
        return cls(subnet=x, bridge=f"vasbr{short}", bridge_ip=f"10.77.{x}.1",
                   namespaces=[f"vas-{pid}-{c}" for c in letters],
                   ips=[f"10.77.{x}.{10 + i}" for i in range(count)],
                   host_veths=[f"vh{short}{c}" for c in letters],
                   ns_veths=[f"vn{short}{c}" for c in letters], dir=directory)

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
        on stdin and stdout, for a client that lives across several steps; the caller
        kills it."""
        return self.popen(host, [sys.executable, "-c", code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)

    def popen(self, host: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside namespace ``host`` with VAS_NODE set to that host's agent
        socket (``kwargs`` go to Popen); the caller stops it."""
        env = {**os.environ, "VAS_NODE": self.nodes[host].socket, **kwargs.pop("env", {})}
        return subprocess.Popen(["ip", "netns", "exec", self.namespaces[host], *argv],
                                env=env, cwd="/", **kwargs)

    @contextmanager
    def cut(self, host: int):
        """Cut namespace ``host`` off: its bridge-side veth goes down, so every packet
        to or from it is dropped (open TCP connections stay, silent, as behind a pulled
        cable). Yields a ``Link`` whose ``heal()`` brings it up again; the block's end
        heals it in any case (a failure never leaves a host cut off)."""
        link = Link(self.host_veths[host])
        ip("link", "set", link.veth, "down")
        try:
            yield link
        finally:
            link.heal()

    @contextmanager
    def shaped(self, host: int, rate: str):
        """Limit what namespace ``host`` sends to ``rate`` (tc's units: "2gbit") with a
        token bucket on its own veth end (tbf, burst 1 MB, at most 50 ms queued); what
        it receives is not limited. Removed when the block ends."""
        tc = ["ip", "netns", "exec", self.namespaces[host], "tc", "qdisc"]
        dev = ["dev", self.ns_veths[host], "root"]
        done = subprocess.run([*tc, "replace", *dev, "tbf", "rate", rate, "burst", "1mb",
                               "latency", "50ms"], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"tc on {self.namespaces[host]}: {done.stderr.strip()}")
        try:
            yield
        finally:
            subprocess.run([*tc, "del", *dev], capture_output=True, timeout=30)


@dataclass
class Link:
    """A bridge-side veth taken down by ``Hosts.cut``."""

    veth: str
    healed: bool = False

    def heal(self) -> None:
        """Bring the veth up again (once; later calls do nothing)."""
        if not self.healed:
            ip("link", "set", self.veth, "up")
            self.healed = True


def _build_network(hosts: Hosts) -> None:
    pid = os.getpid()
    ip("link", "add", hosts.bridge, "type", "bridge")
    ip("link", "set", hosts.bridge, "alias", f"vas-{pid}")
    ip("addr", "add", f"{hosts.bridge_ip}/24", "dev", hosts.bridge)
    ip("link", "set", hosts.bridge, "up")
    for ns, address, outer, inner in zip(hosts.namespaces, hosts.ips, hosts.host_veths,
                                         hosts.ns_veths):
        ip("netns", "add", ns)
        ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        ip("link", "set", outer, "alias", f"vas-{pid}")
        ip("link", "set", inner, "netns", ns)
        ip("link", "set", outer, "master", hosts.bridge)
        ip("link", "set", outer, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
        ip("-n", ns, "link", "set", inner, "up")


def _start_processes(hosts: Hosts, memory: int, writer_ttl: int | None,
                     node_args: list[str]) -> None:
    hosts.etcd = EtcdProcess(hosts.dir)
    # Preset URLs put etcd's client port on the bridge IP (reachable from every
    # namespace); the peer port stays on loopback.
    hosts.etcd.url = f"http://{hosts.bridge_ip}:{free_port()}"
    hosts.etcd.peer_url = f"http://127.0.0.1:{free_port()}"
    hosts.etcd.start()
    # Plaintext on the bridge: --insecure (the network is this process's own; the TLS
    # tests are in tests/integration/test_tls.py).
    hosts.coordinator = CoordinatorProcess(hosts.dir, hosts.etcd.url,
                                           listen=f"{hosts.bridge_ip}:0",
                                           args=["--insecure"]).start()
    letters = _LETTERS[:len(hosts.namespaces)]
    hosts.nodes = [NodeProcess(hosts.dir, hosts.coordinator.address, node_id=f"host-{c}",
                               memory=memory, listen=f"{address}:0", netns=ns,
                               socket=os.path.join(hosts.dir, f"{c}.sock"),
                               writer_ttl=writer_ttl, args=["--insecure", *node_args])
                   for c, address, ns in zip(letters, hosts.ips, hosts.namespaces)]
    for node in hosts.nodes:
        node.launch()
    for node in hosts.nodes:
        node.wait_ready()


def make_network(count: int) -> Hosts:
    """The bridge and ``count`` namespaces with their veths, no processes yet (after
    removing the leftovers of dead processes); ``remove`` takes them down. Raises
    NetnsUnavailable when they cannot be made here."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise NetnsUnavailable("network namespaces need root (CAP_NET_ADMIN) and "
                               "iproute2's `ip`")
    clean_stale()
    hosts = Hosts.plan(count)
    try:
        _build_network(hosts)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        remove(hosts)
        raise NetnsUnavailable("cannot build network namespaces with veths on a bridge "
                               "(needs root with CAP_NET_ADMIN in the initial network "
                               f"namespace): {exc}") from exc
    except BaseException:
        remove(hosts)
        raise
    return hosts


def remove(hosts: Hosts) -> None:
    """Stop the processes listed in ``hosts`` (SIGTERM, then SIGKILL), delete its
    namespaces (killing what still runs in them), veths, bridge and directory, and wait
    until they are gone."""
    for proc in [*hosts.nodes, hosts.coordinator, hosts.etcd]:
        if proc is not None:
            try:
                proc.stop(timeout=5)
            except Exception:  # noqa: BLE001 - keep tearing down
                proc.kill()
    for ns in hosts.namespaces:
        _delete_netns(ns)
    for link in [*hosts.host_veths, hosts.bridge]:
        if ip("link", "show", link, check=False).returncode == 0:
            ip("link", "del", link, check=False)
    shutil.rmtree(hosts.dir, ignore_errors=True)
    _wait_gone([*hosts.host_veths, hosts.bridge], hosts.namespaces)


def _wait_gone(links: list[str], namespaces: list[str], timeout: float = 10.0) -> None:
    """Wait until the links and namespaces are gone (netns deletion is asynchronous)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nss = ip("netns", "list", check=False).stdout
        if all(ip("link", "show", link, check=False).returncode != 0 for link in links) \
                and not any(re.search(rf"^{re.escape(ns)}\b", nss, re.M) for ns in namespaces):
            return
        time.sleep(0.05)


@contextmanager
def start_hosts(count: int, memory: int, *, writer_ttl: int | None = None,
                node_args: list[str] | tuple[str, ...] = ()):
    """A bridge, ``count`` namespaces, etcd + coordinator on the bridge IP and one agent
    of ``memory`` bytes per namespace (with ``node_args``, more flags of ``vasctl node
    serve``); yields the ``Hosts``, removed when the block ends (see the module
    docstring). Raises NetnsUnavailable when the network cannot be made here."""
    hosts = make_network(count)
    try:
        _start_processes(hosts, memory, writer_ttl, list(node_args))
        yield hosts
    finally:
        remove(hosts)
