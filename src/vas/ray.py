"""vas on a Ray cluster: an agent on every Ray node, datasets shared by name.

    import ray, vas.ray

    ray.init(address="auto")
    vas.ray.start(memory="4GiB")             # idempotent, from the driver or any task
    ref = vas.ray.put(np.random.random((1 << 27,)))     # -> vas.SegmentRef (picklable)

    @ray.remote
    def total(ref):
        return ref.get().sum()               # zero-copy from this node's agent

    ray.get([total.options(scheduling_strategy=vas.ray.node_affinity(ref)).remote(ref)])

How vas rides on Ray (Ray is the only launcher; nothing else is installed):

- **Control plane**: a detached named actor ``vas-control`` (namespace ``vas``),
  pinned to the head node, runs etcd (unless ``start(etcd=URL)`` names one) and a
  coordinator as its child processes, under a folder of its own.
- **Agents**: one detached named actor ``vas-agent-<Ray node id>`` per alive Ray
  node, pinned to that node (``NodeAffinitySchedulingStrategy(soft=False)``),
  runs ``vasctl node serve`` as a child process with node id = the Ray node id,
  its gRPC service on the node's IP and its socket at
  ``/tmp/vas-ray/<Ray node id>/node.sock`` (``vas.core.defaults.ray_socket``).
  Detached actors outlive the driver that made them, so the datasets do too.
  A node that joins later gets its agent at the next ``start()``.
- **Finding the agent**: ``vas.connect()`` with no argument, in any Ray process
  (driver, task, actor) of a node with an agent, derives the socket path from
  ``ray.get_runtime_context().get_node_id()``; no environment variable, no call
  to an actor. ``import vas`` never imports ray (only this module does).
- **Child processes die with their actor**: each is started through a one-line
  wrapper that sets ``PR_SET_PDEATHSIG`` and then execs the daemon, so a killed
  actor (``ray stop``, a node's end) does not leave an agent or etcd behind.
- **Plaintext, like Ray**: the coordinator and agents listen on the nodes' IPs with
  ``--insecure`` (no TLS): the Ray cluster's network is trusted, as Ray's own ports
  (GCS, raylets, object manager) are by default. Mutual TLS here is not built yet.
- **Locality**: the agent's node id *is* the Ray node id, so a dataset's home
  (``SegmentRef.home``) names the Ray node to run a task on (``node_affinity``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import uuid

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

# The client side at import, not in a worker's first task (~30 ms of imports there).
from vas.client import _default
from vas.core.defaults import RAY_SOCKET_DIR, ray_socket
from vas.core.errors import InvalidArgument, Unavailable
from vas.core.sizes import format_size, parse_size
from vas.datasets import SegmentRef, read_any

#: Ray namespace of vas's actors.
NAMESPACE = "vas"
CONTROL_NAME = "vas-control"
AGENT_PREFIX = "vas-agent-"
#: Segment memory of each agent when ``start`` makes one and no ``memory`` is given.
DEFAULT_MEMORY = 4 << 30
#: Seconds ``start`` and ``stop`` wait for the actors (each starts its daemons and
#: waits until they serve, which has its own 60 s bound).
ACTOR_TIMEOUT = 120.0

# Run as ``python -c _DIE_WITH_PARENT PARENT_PID COMMAND...``: ask the kernel for
# SIGTERM when the parent (the actor's process) dies, check it has not died already,
# then become COMMAND (the setting survives exec).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('vas: the launching actor is gone')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _tie_to_this_process(process) -> None:
    process.launch_prefix = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid())]


@dataclasses.dataclass(frozen=True)
class Deployment:
    """What ``start`` found or made: the coordinator's ``host:port``, the etcd URL,
    each agent's ``memory`` in bytes, and ``agents``: Ray node id -> socket path."""

    coordinator: str
    etcd: str
    memory: int
    agents: dict[str, str]


# -- the actors -----------------------------------------------------------------------------

@ray.remote
class _Control:
    """etcd (unless given) and a coordinator, as child processes of this actor."""

    def __init__(self, memory: int, etcd: str | None):
        from vas.cluster import CoordinatorProcess, EtcdProcess

        self.dir = tempfile.mkdtemp(prefix="vas-ray-control-")
        self.etcd = None
        try:
            if etcd is None:
                self.etcd = EtcdProcess(self.dir)
                _tie_to_this_process(self.etcd)
                self.etcd.start()
            self.coordinator = CoordinatorProcess(
                self.dir, etcd or self.etcd.url, listen=f"{ray.util.get_node_ip_address()}:0",
                args=["--insecure"])  # plaintext on Ray's network (module docstring)
            _tie_to_this_process(self.coordinator)
            self.coordinator.start()
        except BaseException:
            self.stop()
            raise
        self.config = {"memory": memory, "etcd": etcd, "etcd_url": etcd or self.etcd.url,
                       "coordinator": self.coordinator.address}

    def describe(self) -> dict:
        return self.config

    def stop(self) -> None:
        for process in (getattr(self, "coordinator", None), self.etcd):
            if process is not None:
                process.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@ray.remote
class _Agent:
    """``vasctl node serve`` for this Ray node, as a child process of this actor."""

    def __init__(self, node_id: str, coordinator: str, memory: int):
        from vas.cluster import NodeProcess

        if ray.get_runtime_context().get_node_id() != node_id:  # soft=False makes it so
            raise Unavailable(f"the vas agent of Ray node {node_id} was placed elsewhere")
        self.coordinator = coordinator
        self.socket = ray_socket(node_id)
        self.dir = os.path.dirname(self.socket)
        os.makedirs(self.dir, exist_ok=True)
        for path in (RAY_SOCKET_DIR, self.dir):  # every local user may connect
            with contextlib.suppress(PermissionError):  # made by another user: as it is
                os.chmod(path, 0o755)
        self.process = NodeProcess(self.dir, coordinator, node_id=node_id, memory=memory,
                                   socket=self.socket, args=["--insecure"],
                                   listen=f"{ray.util.get_node_ip_address()}:0")
        _tie_to_this_process(self.process)
        try:
            self.process.start()
        except BaseException:
            self.stop()
            raise

    def describe(self) -> dict:
        return {"socket": self.socket, "address": self.process.address,
                "pid": self.process.pid, "alive": self.process.alive(),
                "coordinator": self.coordinator}

    def stop(self) -> None:
        self.process.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _pinned(node_id: str) -> dict:
    return {"namespace": NAMESPACE, "lifetime": "detached", "get_if_exists": True,
            "num_cpus": 0, "max_restarts": 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)}


# -- start / stop ---------------------------------------------------------------------------

def _ensure_ray() -> None:
    if not ray.is_initialized():
        ray.init()


def _alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node.get("Alive")]


def _head_node_id() -> str:
    for node in _alive_nodes():
        if "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    raise Unavailable("no alive head node in this Ray cluster")


def _memory_bytes(memory) -> int | None:
    if memory is None:
        return None
    if isinstance(memory, str):
        memory = parse_size(memory)
    if isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0:
        raise InvalidArgument(f"invalid memory {memory!r}: must be a size > 0, e.g. '4GiB'")
    return memory


def _get(refs, what: str, kill=()):
    """ray.get with a deadline; a failure (an actor that could not start its daemons)
    kills the actors in ``kill`` (so the next call starts afresh) and is Unavailable."""
    try:
        return ray.get(refs, timeout=ACTOR_TIMEOUT)
    except (ray.exceptions.RayError, TimeoutError) as exc:
        for actor in kill:
            ray.kill(actor, no_restart=True)
        raise Unavailable(f"vas.ray: {what} failed: {exc}") from exc


def start(memory: int | str | None = None, etcd: str | None = None) -> Deployment:
    """Run vas on this Ray cluster: etcd (unless ``etcd`` names one) and a coordinator
    on the head node, and an agent on every alive Ray node. Idempotent, from the
    driver or any task: what runs already is kept (a later call only adds agents for
    nodes that joined since, and replaces an agent whose process exited);
    ``ray.init()`` is called first if this process has not.

    :param memory: segment memory of each agent, bytes or a size like ``"4GiB"``
        (default 4 GiB). Once running, ``None`` or the running value.
    :param etcd: URL of an etcd to use instead of starting one on the head node.
    :returns: a ``Deployment`` (coordinator, etcd, memory, agents by Ray node id).
    :raises InvalidArgument: ``memory`` or ``etcd`` differs from what is running
        (``stop()`` first to change them), or a bad size.
    :raises Unavailable: an actor could not start its daemons (its log tail is in the
        message); or ``ACTOR_TIMEOUT`` passed.

    Example::

        vas.ray.start(memory="8GiB")
    """
    wanted = _memory_bytes(memory)
    _ensure_ray()
    control = _Control.options(name=CONTROL_NAME, **_pinned(_head_node_id())).remote(
        wanted or DEFAULT_MEMORY, etcd)
    config = _get(control.describe.remote(), "starting etcd and the coordinator", [control])
    if wanted is not None and wanted != config["memory"]:
        raise InvalidArgument(f"vas is running on this Ray cluster with memory="
                              f"{format_size(config['memory'])} per node, not "
                              f"{format_size(wanted)}: stop() it first to change that")
    if etcd is not None and etcd != config["etcd"]:
        raise InvalidArgument(f"vas is running on this Ray cluster with etcd "
                              f"{config['etcd'] or 'of its own'}, not {etcd}: stop() it first")
    node_ids = [node["NodeID"] for node in _alive_nodes()]
    described = _start_agents(node_ids, config)
    # An agent that exited on its own, or that serves a coordinator no longer running
    # (the control actor was ended and made again): end its actor and start a new one.
    dead = [node_id for node_id, info in described.items()
            if not info["alive"] or info["coordinator"] != config["coordinator"]]
    if dead:
        for node_id in dead:
            ray.kill(ray.get_actor(AGENT_PREFIX + node_id, namespace=NAMESPACE),
                     no_restart=True)
        described.update(_start_agents(dead, config))
    return Deployment(config["coordinator"], config["etcd_url"], config["memory"],
                      {node_id: info["socket"] for node_id, info in described.items()})


def _start_agents(node_ids: list[str], config: dict) -> dict[str, dict]:
    """Find or make the agent actor of each node; their ``describe()`` by node id. An
    actor that fails (or does not answer in time) is ended, and only that one: the
    others, and the datasets they hold, are kept; then Unavailable names the failures."""
    agents = [_Agent.options(name=AGENT_PREFIX + node_id, **_pinned(node_id)).remote(
                  node_id, config["coordinator"], config["memory"]) for node_id in node_ids]
    pending = [agent.describe.remote() for agent in agents]
    described, failed = {}, []
    for node_id, agent, answer in zip(node_ids, agents, pending):
        try:
            described[node_id] = ray.get(answer, timeout=ACTOR_TIMEOUT)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            ray.kill(agent, no_restart=True)
            failed.append(f"Ray node {node_id}: {exc}")
    if failed:
        raise Unavailable(f"vas.ray: starting the agent failed on {len(failed)} node(s): "
                          + "; ".join(failed))
    return described


def agents() -> dict[str, dict]:
    """The running agents by Ray node id: ``{"socket", "address", "pid", "alive",
    "coordinator"}`` each."""
    _ensure_ray()
    handles = {name.removeprefix(AGENT_PREFIX): ray.get_actor(name, namespace=NAMESPACE)
               for name in _named_actors() if name.startswith(AGENT_PREFIX)}
    described = _get([h.describe.remote() for h in handles.values()], "asking the agents")
    return dict(zip(handles, described))


def _named_actors() -> list[str]:
    return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["namespace"] == NAMESPACE]


def stop() -> None:
    """Stop every agent, then the coordinator and etcd, and end their actors. The
    datasets are gone after it. Idempotent (nothing running: nothing to do).

    Example::

        vas.ray.stop()
    """
    _ensure_ray()
    names = _named_actors()
    _stop_actors([name for name in names if name.startswith(AGENT_PREFIX)])
    _stop_actors([name for name in names if name == CONTROL_NAME])


def _stop_actors(names: list[str]) -> None:
    """Let the actors stop their daemons (SIGTERM, then SIGKILL at a deadline), then end them."""
    actors = []
    for name in names:
        try:
            actors.append(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:  # ended meanwhile
            continue
    try:
        ray.get([actor.stop.remote() for actor in actors], timeout=ACTOR_TIMEOUT)
    except (ray.exceptions.RayError, TimeoutError):
        pass  # a dead actor's children had SIGTERM from the kernel already
    for actor in actors:
        ray.kill(actor, no_restart=True)


# -- datasets -------------------------------------------------------------------------------

def _client():
    """This process's default connection; Unavailable naming start() when this Ray
    node runs no agent."""
    _ensure_ray()
    if os.environ.get("VAS_NODE"):
        return _default()
    node_id = ray.get_runtime_context().get_node_id()
    path = ray_socket(node_id)
    if not os.path.exists(path):
        raise Unavailable(f"no vas agent on Ray node {node_id}: call vas.ray.start() first")
    return _default(path)  # this node's agent, even if the default went elsewhere before


def _is_table(value) -> bool:
    return type(value).__module__.split(".")[0] == "pyarrow"


def put(array, name: str | None = None, *, ttl: float | None = None) -> SegmentRef:
    """Share ``array`` (a numpy array, or a pyarrow Table/RecordBatch) as a new dataset
    homed on this Ray node; returns its ``SegmentRef`` (picklable: pass it to tasks).

    :param name: the segment's name (default ``ray/<random hex>``).
    :param ttl: seconds until the dataset is removed (None: until deleted).
    :raises InvalidArgument: an object-dtype array or another type; a bad name or ttl.
    :raises AlreadyExists: the name is taken.
    :raises CapacityExceeded: this node's agent lacks the memory.

    Example::

        ref = vas.ray.put(np.zeros((1024, 1024)), "zeros")
    """
    client = _client()
    name = f"ray/{uuid.uuid4().hex}" if name is None else name
    info = (client.put_table(name, array, ttl=ttl) if _is_table(array)
            else client.put_array(name, array, ttl=ttl))
    return SegmentRef.of(info)


def ref(name: str) -> SegmentRef:
    """The ``SegmentRef`` of the dataset ``name`` (one coordinator round trip)."""
    return SegmentRef.of(_client().stat(name))


def get(name: str, *, fetch: str = "lazy"):
    """The dataset ``name`` (an array or a table), read-only and zero-copy from this
    node's agent; made by any driver or task, including one that has exited. One
    request to this node's agent, like ``ref.get()``.

    :raises NotFound: no such dataset.
    :raises InvalidArgument: the segment holds no array or table.

    Example::

        points = vas.ray.get("points")
    """
    return read_any(_client(), name, fetch=fetch)


def node_affinity(dataset: SegmentRef | str, soft: bool = True) -> NodeAffinitySchedulingStrategy:
    """A scheduling strategy that runs a task on the Ray node holding the dataset's home
    copy (``soft=True``: elsewhere if that node cannot take it).

    :raises InvalidArgument: the dataset is homed on a vas node that is not a Ray node
        (an agent not started by ``start``).

    Example::

        task.options(scheduling_strategy=vas.ray.node_affinity(ref)).remote(ref)
    """
    home = (ref(dataset) if isinstance(dataset, str) else dataset).home
    _ensure_ray()
    if home not in {node["NodeID"] for node in ray.nodes()}:
        raise InvalidArgument(f"dataset {getattr(dataset, 'name', dataset)} is homed on vas "
                              f"node {home!r}, which is not a node of this Ray cluster")
    return NodeAffinitySchedulingStrategy(node_id=home, soft=bool(soft))
