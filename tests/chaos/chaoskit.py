"""The chaos run: writers and readers on several nodes while agents, coordinators and etcd
are killed, paused and restarted and links are cut; afterwards tests/history.py's checker
reads the whole history (the words' encoding, the processes and every promise checked
are described there).

The world (``World``): one etcd, two coordinators (every agent is given both, as
``ipv4:A,B``, and fails over), five agents with a 2 s writer lease::

    node1  home of chaos/a, chaos/b   writer 0 (a home writer of a, b; remote of c)
    node2  home of chaos/c            writer 1
    node3                             writer 2 (a remote writer only)
    node4                             reader 0
    node5                             readers 1, 2

Readers run where no writer does: a reader on a writer's node shares its pages and sees
its unsynced stores at once, torn words included (a word read while it was being
stored: half one write's bytes, half the next's), which the checker cannot tell from
garbage.

With ``netns`` every agent runs in a network namespace of its own, joined to etcd and the
coordinators by a veth on a bridge (vas.netns, as tests/multihost builds them; root
only), and links can be cut.

Faults (``FAULTS``), one at a time, a pause of ``gap`` seconds between two; they come
in rounds, each a shuffled list of every enabled kind, so a short run has each once:

- ``agent-kill``: SIGKILL of an agent that is the home of no segment (node3-node5),
  started again with the same id and socket;
- ``agent-pause``: SIGSTOP of any agent for 0.5-2.5 s (under the 10 s node lease), SIGCONT;
- ``writer-pause``: a writer SIGSTOPped past its lease while it holds a segment homed on
  node1, then its fenced (``STALE``) write, then a probe read from node4;
- ``coordinator-kill``: SIGKILL of one of the two coordinators, started again on its
  port 0-2 s later;
- ``etcd-pause``: SIGSTOP of etcd for 1-4 s, SIGCONT;
- ``etcd-kill``: SIGKILL of etcd, started again on its data dir and ports;
- ``link-cut`` (``netns`` only): the bridge side of a non-home agent's veth down 1-6 s;
- ``home-kill`` (only with a durability mode, ``replicas`` > 0 or ``data_dir``): SIGKILL
  and restart of node1 or node2, the homes of the checked segments; with a durability
  mode ``link-cut`` may cut a home too.

Enabled today: every kind but ``home-kill`` (and ``link-cut`` only with ``netns``): an agent
killed with SIGKILL loses its memory, so killing a home without replicas or a data dir
would lose acknowledged versions by design. ``replicas`` is passed to every create and
``data_dir`` gives each agent ``DATA_DIR/<node id>`` (on tmpfs, or home "rw" attaches are
refused where userfaultfd cannot write-protect the files); until those features are built
the product refuses both (create says InvalidArgument, the agent exits 2), so a durable run
fails at its start rather than claim anything.

Faults stop after ``duration`` - ``quiet`` seconds (or ``rounds`` rounds); ``quiet``
seconds later (without faults, so writers end on syncs that went through) the writers and
readers stop, every segment is read on every agent, and the checker's "final" rule holds
each copy to the last acknowledged write's exact bytes. A writer or reader that does not
stop within ``STOP_TIMEOUT`` is reported ("stuck"; its threads' stacks go to
``DIR/history/NAME-PID.stacks`` and, with py-spy in the venv, every agent's to
``DIR/stacks-NODE.txt``) and killed. Every wait has
a deadline; ``World.stop`` SIGCONTs, then stops, every process (and removes the network),
also after a failure.

    result = run(Config(duration=30, seed=12), directory)
    result.problems, result.faults, result.figures
"""
from __future__ import annotations

import collections
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import vas
from vas import netns
from vas.cluster import (CoordinatorProcess, EtcdProcess, NodeProcess, coordinator_target,
                         free_port)

from history import SEGMENT_BYTES, Crew, Log, check_history, read_final

SEGMENTS = {"chaos/a": 0, "chaos/b": 0, "chaos/c": 1}
AGENTS = 5
#: Writer i runs on agent WRITER_AGENTS[i], reader i on READER_AGENTS[i] (never the same).
WRITER_AGENTS = (0, 1, 2)
READER_AGENTS = (3, 4, 4)
#: Agents that are the home of no checked segment (killed without a durability mode).
SPARE_AGENTS = tuple(i for i in range(AGENTS) if i not in SEGMENTS.values())
PROBE_AGENT = 3
MEMORY = 256 << 20
WRITER_TTL = 2
#: Seconds every restart may take (a loaded 2-CPU machine starts an agent in ~2 s).
START_TIMEOUT = 60.0
#: Seconds writers and readers get to finish their step when asked to stop (a sync or
#: a read takes ~0.1 s without faults); one still running then is reported as stuck.
STOP_TIMEOUT = 10.0


@dataclass
class Config:
    """One run: faults until ``duration`` - ``quiet`` seconds have passed since the
    start (the world's start included) or ``rounds`` rounds are done, whichever is first.
    ``gap``: seconds between two faults (uniform in the range)."""

    duration: float = 300.0
    rounds: float = float("inf")
    seed: int = 0
    netns: bool = False
    replicas: int = 0
    data_dir: str | None = None
    gap: tuple[float, float] = (0.2, 1.0)
    quiet: float = 5.0

    @property
    def durable(self) -> bool:
        return self.replicas > 0 or self.data_dir is not None

    def kinds(self) -> list[str]:
        """The fault kinds this run injects (see the module docstring)."""
        return [kind for kind in FAULTS
                if (kind != "link-cut" or self.netns) and (kind != "home-kill" or self.durable)]


@dataclass
class Result:
    problems: list[str]
    faults: collections.Counter
    exits: collections.Counter       # writers and readers that died (SIGBUS...) and were restarted
    figures: collections.Counter     # the checker's
    seconds: float = 0.0
    skipped: collections.Counter = field(default_factory=collections.Counter)


# ---------------------------------------------------------------------- the world

class _Network:
    """A bridge and one namespace per agent (vas.netns, the multihost fixture's layout)."""

    def __init__(self, count: int):
        try:
            self.hosts = netns.make_network(count)
        except netns.NetnsUnavailable as exc:
            raise RuntimeError(f"--netns: {exc}") from exc

    def link(self, agent: int, up: bool) -> None:
        subprocess.run(["ip", "link", "set", self.hosts.host_veths[agent],
                        "up" if up else "down"], check=True, capture_output=True, timeout=30)

    def remove(self) -> None:
        netns.remove(self.hosts)  # processes are the World's: none listed there


class World:
    """etcd, two coordinators and ``AGENTS`` agents in ``directory`` (see the module
    docstring), optionally one network namespace per agent."""

    def __init__(self, directory: str, config: Config):
        self.dir = directory
        self.config = config
        self.net: _Network | None = None
        self.etcd: EtcdProcess | None = None
        self.coordinators: list[CoordinatorProcess] = []
        self.nodes: list[NodeProcess] = []

    def start(self) -> "World":
        host = "127.0.0.1"
        flags = []
        if self.config.netns:
            self.net = _Network(AGENTS)
            host, flags = self.net.hosts.bridge_ip, ["--insecure"]  # the run's own network
        self.etcd = EtcdProcess(self.dir)
        if self.net:  # reachable from every namespace; the peer port stays on loopback
            self.etcd.url = f"http://{host}:{free_port()}"
            self.etcd.peer_url = f"http://127.0.0.1:{free_port()}"
        self.etcd.start(START_TIMEOUT)
        self.coordinators = [CoordinatorProcess(self.dir, self.etcd.url, name=f"coordinator{i}",
                                                listen=f"{host}:0", args=flags)
                             for i in (1, 2)]
        self._start_all(self.coordinators)
        for coordinator in self.coordinators:  # a restart must come back where agents look
            coordinator.listen = coordinator.address
        target = coordinator_target([c.address for c in self.coordinators])
        self.nodes = [self._node(i, target, flags) for i in range(AGENTS)]
        self._start_all(self.nodes)
        return self

    def _node(self, i: int, target: str, flags: list[str]) -> NodeProcess:
        node_id = f"node{i + 1}"
        data_dir = os.path.join(self.config.data_dir, node_id) if self.config.data_dir else None
        ip = self.net.hosts.ips[i] if self.net else "127.0.0.1"
        return NodeProcess(self.dir, target, node_id=node_id, memory=MEMORY,
                           listen=f"{ip}:0", data_dir=data_dir,
                           netns=self.net.hosts.namespaces[i] if self.net else None,
                           writer_ttl=WRITER_TTL, args=flags)

    @staticmethod
    def _start_all(processes) -> None:
        for proc in processes:
            proc.launch()
        for proc in processes:
            proc.wait_ready(START_TIMEOUT)

    def dump_stacks(self, why: str) -> None:
        """Every agent's threads' stacks into ``DIR/stacks-NODE.txt`` (py-spy, when this
        venv has it): what an agent was doing while a client of it was stuck."""
        spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.access(spy, os.X_OK):
            return
        for node in self.nodes:
            done = subprocess.run([spy, "dump", "--pid", str(node.pid)], capture_output=True,
                                  text=True, timeout=30)
            with open(os.path.join(self.dir, f"stacks-{node.node_id}.txt"), "a") as out:
                out.write(f"=== {why} stuck\n{done.stdout}{done.stderr}\n")

    def stop(self) -> None:
        """Everything stopped (SIGCONT first: one may be paused), links up, network gone."""
        processes = [p for p in [*self.nodes, *self.coordinators, self.etcd] if p is not None]
        for proc in processes:
            if proc.alive():
                os.kill(proc.pid, signal.SIGCONT)
        try:
            for proc in processes:
                proc.stop(timeout=10)
        finally:
            if self.net:
                self.net.remove()


# ---------------------------------------------------------------------- faults

def _paused(pid: int, seconds: float, stop) -> None:
    """SIGSTOP ``pid`` for ``seconds`` (or until ``stop`` is set), SIGCONT whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        stop.wait(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def _restart(proc, down: float, stop) -> None:
    proc.kill()
    stop.wait(down)
    proc.start(START_TIMEOUT)


def _agent_kill(world: World, crew: Crew, rng: random.Random) -> bool:
    _restart(world.nodes[rng.choice(SPARE_AGENTS)], 0, crew.stop_event)
    return True


def _home_kill(world: World, crew: Crew, rng: random.Random) -> bool:
    _restart(world.nodes[rng.choice(sorted(set(SEGMENTS.values())))], 0, crew.stop_event)
    return True


def _agent_pause(world: World, crew: Crew, rng: random.Random) -> bool:
    _paused(rng.choice(world.nodes).pid, rng.uniform(0.5, 2.5), crew.stop_event)
    return True


def _writer_pause(world: World, crew: Crew, rng: random.Random) -> bool:
    return crew.pause_writer(rng.randrange(len(WRITER_AGENTS)), 2.5 * WRITER_TTL,
                             probe_socket=world.nodes[PROBE_AGENT].socket)


def _coordinator_kill(world: World, crew: Crew, rng: random.Random) -> bool:
    _restart(rng.choice(world.coordinators), rng.uniform(0, 2), crew.stop_event)
    return True


def _etcd_pause(world: World, crew: Crew, rng: random.Random) -> bool:
    _paused(world.etcd.pid, rng.uniform(1, 4), crew.stop_event)
    return True


def _etcd_kill(world: World, crew: Crew, rng: random.Random) -> bool:
    _restart(world.etcd, 0, crew.stop_event)
    return True


def _link_cut(world: World, crew: Crew, rng: random.Random) -> bool:
    agents = range(AGENTS) if world.config.durable else SPARE_AGENTS
    agent = rng.choice(list(agents))
    world.net.link(agent, up=False)
    try:
        crew.stop_event.wait(rng.uniform(1, 6))
    finally:
        world.net.link(agent, up=True)
    return True


#: Every fault kind: inject one (blocking until it has healed); False if it could not
#: be set up this time (a writer that did not get to hold a segment in time).
FAULTS = {"agent-kill": _agent_kill, "agent-pause": _agent_pause,
          "writer-pause": _writer_pause, "coordinator-kill": _coordinator_kill,
          "etcd-pause": _etcd_pause, "etcd-kill": _etcd_kill, "link-cut": _link_cut,
          "home-kill": _home_kill}


def _schedule(kinds: list[str], rng: random.Random):
    """Rounds of every kind in a shuffled order, endlessly."""
    for _ in itertools.count():
        order = list(kinds)
        rng.shuffle(order)
        yield from order


# ---------------------------------------------------------------------- the run

def run(config: Config, directory: str) -> Result:
    """The run of the module docstring in ``directory``: the processes' logs, the
    history in ``history/`` and each fault with its start and seconds in faults.jsonl."""
    rng = random.Random(config.seed)
    logdir = os.path.join(directory, "history")
    os.makedirs(logdir, exist_ok=True)
    faults: collections.Counter = collections.Counter()
    skipped: collections.Counter = collections.Counter()
    exits: collections.Counter = collections.Counter()
    world = World(directory, config)
    fault_log = Log(os.path.join(directory, "faults.jsonl"))
    started = time.monotonic()
    try:
        world.start()
        for name, home in SEGMENTS.items():
            with vas.connect(world.nodes[home].socket) as client:
                client.create(name, SEGMENT_BYTES, mode=0o644, replicas=config.replicas)
        with Crew(logdir, SEGMENTS, [world.nodes[i].socket for i in WRITER_AGENTS],
                  [world.nodes[i].socket for i in READER_AGENTS], seed=rng.random()) as crew:
            quiet_from = started + config.duration - config.quiet
            kinds = config.kinds()
            for count, kind in enumerate(_schedule(kinds, rng)):
                crew.stop_event.wait(rng.uniform(*config.gap))
                if time.monotonic() >= quiet_from or count == config.rounds * len(kinds):
                    break
                exits.update(crew.revive())
                began = time.monotonic()
                injected = FAULTS[kind](world, crew, rng)
                (faults if injected else skipped)[kind] += 1
                fault_log(kind="fault", fault=kind, injected=injected, began=began - started,
                          seconds=round(time.monotonic() - began, 2))
            exits.update(crew.revive())
            crew.stop_event.wait(config.quiet)  # writers end on syncs that went through
            crew.stop(timeout=STOP_TIMEOUT, on_stuck=lambda name: world.dump_stacks(name))
            exits.update(f"{name} stuck at stop" for name in crew.stuck)
        read_final(logdir, SEGMENTS, [node.socket for node in world.nodes], timeout=60)
    finally:
        world.stop()
    problems, figures = check_history(logdir)
    return Result(problems, faults, exits, figures, time.monotonic() - started, skipped)
