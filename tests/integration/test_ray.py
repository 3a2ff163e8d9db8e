"""vas.ray on a real two-node Ray cluster (ray.cluster_utils.Cluster: one CPU and a
100 MB object store per node), with the real etcd, coordinator and agents that
vas.ray.start() runs inside Ray actors.

The module starts Ray with the head node only, starts vas, then adds the second
node and starts vas again (the new node gets its agent, the first keeps its own).
Every check compares data by checksum; every wait has a deadline.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import vas
import waiting

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
import vas.ray  # noqa: E402  (needs ray)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

MiB = 1 << 20
ARRAY_BYTES = 256 * MiB
WAIT = 30.0


def digest(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def table_digest(table) -> str:
    h = hashlib.sha256()
    for column in table.columns:
        for chunk in column.chunks:
            values = chunk.to_numpy(zero_copy_only=False)
            h.update("\0".join(values).encode() if values.dtype == object else values.tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def cluster():
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    # The tasks below are functions of this module, which Ray's workers cannot import
    # (tests/ is not a package on their path): ship them by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    node_args = {"num_cpus": 1, "object_store_memory": 100 * MiB}
    cluster = start_head(Cluster, {**node_args, "include_dashboard": False})
    try:
        ray.init(address=cluster.address)
        first = vas.ray.start(memory="768MiB")
        cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        second = vas.ray.start()
        yield cluster, first, second
    finally:
        try:
            vas.ray.stop()
        finally:
            ray.shutdown()
            cluster.shutdown()


def start_head(cluster_type, head_args: dict):
    """A Cluster with its head node. Ray's head start waits (30 s by default) for its
    GCS server to publish its port; on a loaded CI machine that wait once ran out
    with no sign of why. So wait longer, try a second time in a new Ray session, and
    say what the failed session's GCS logged: in a warning if the second try
    starts, in the error if it does not."""
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "60")
    failures = []
    for _ in range(2):
        before = set(glob.glob("/tmp/ray/session_2*"))
        try:
            cluster = cluster_type(initialize_head=True, head_node_args=head_args)
        except Exception as error:  # noqa: BLE001 (any start failure is reported)
            sessions = sorted(set(glob.glob("/tmp/ray/session_2*")) - before)
            killed = end_processes_of(sessions)
            failures.append(f"{type(error).__name__}: {error}\n{describe_sessions(sessions)}"
                            f"\nstill running then (killed): {killed}")
            continue
        if failures:
            warnings.warn("Ray's head node started on the second try; the first:\n"
                          + failures[0])
        return cluster
    raise RuntimeError("Ray's head node did not start, twice:\n" + "\n".join(failures))


def describe_sessions(sessions: list[str]) -> str:
    """What a failed Ray start left: its GCS server's log tails, disk and load."""
    lines = [f"/tmp free: {shutil.disk_usage('/tmp').free >> 20} MiB; "
             f"load: {open('/proc/loadavg').read().strip()}"]
    for session in sessions:
        for name in ("gcs_server.out", "gcs_server.err"):
            path = os.path.join(session, "logs", name)
            try:
                with open(path, errors="replace") as f:
                    tail = f.read()[-3000:]
            except OSError as error:
                tail = f"({error})"
            lines.append(f"--- {path}:\n{tail}")
    return "\n".join(lines)


def end_processes_of(sessions: list[str]) -> list[str]:
    """Kill what a failed Ray start left running (processes naming its session);
    their program names."""
    killed = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if any(session in cmdline for session in sessions):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                continue
            killed.append(os.path.basename(cmdline.split("\0", 1)[0]))
    return killed


@pytest.fixture(scope="module")
def nodes(cluster):
    """(head node id, worker node id)."""
    _, first, second = cluster
    (head,) = first.agents
    (other,) = set(second.agents) - {head}
    return head, other


def on(node_id: str, **options):
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
            **options}


def node_memory(node_id: str) -> int:
    with vas.connect() as client:
        return {n.id: n.memory_used for n in client.nodes()}[node_id]


def _read_array(ref):
    import os

    import ray

    import vas

    data = ref.get()
    local = vas.connect().local_node.id
    return (ray.get_runtime_context().get_node_id(), local, os.getpid(),
            hashlib.sha256(data.data).hexdigest(), data.flags.writeable)


read_array = ray.remote(_read_array)
#: The same in a fresh worker process each call.
read_array_fresh = ray.remote(max_calls=1)(_read_array)


@ray.remote
def read_table(ref):
    import ray

    table = ref.get()
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/memfd:vas:"):
                ranges.append(tuple(int(x, 16) for x in fields[0].split("-")))
    zero_copy = all(any(lo <= buf.address and buf.address + buf.size <= hi for lo, hi in ranges)
                    for column in table.columns for chunk in column.chunks
                    for buf in chunk.buffers() if buf is not None and buf.size)
    return ray.get_runtime_context().get_node_id(), table_digest(table), zero_copy


# -- start ----------------------------------------------------------------------------------

def test_start_is_idempotent_and_gives_late_nodes_an_agent(cluster, nodes):
    _, first, second = cluster
    head, other = nodes
    assert second.coordinator == first.coordinator and second.etcd == first.etcd
    assert first.agents == {head: vas.core.defaults.ray_socket(head)}
    assert second.agents[head] == first.agents[head]
    before = vas.ray.agents()
    assert set(before) == {head, other} and all(a["alive"] for a in before.values())
    again = vas.ray.start()  # changes nothing
    assert again == second and vas.ray.agents() == before
    with pytest.raises(vas.InvalidArgument, match="stop\\(\\) it first"):
        vas.ray.start(memory="1GiB")
    with vas.connect() as client:  # the driver reaches its own node's agent, no variable
        assert "VAS_NODE" not in os.environ
        assert client.local_node.id == head
        assert {n.id: n.memory_total for n in client.nodes()} == {
            head: 768 * MiB, other: 768 * MiB}


def test_start_from_a_task_changes_nothing(cluster, nodes):
    head, other = nodes

    @ray.remote
    def start_here():
        import vas.ray

        return vas.ray.start().agents

    assert ray.get(start_here.options(**on(other)).remote(), timeout=WAIT) == cluster[2].agents


# -- data -----------------------------------------------------------------------------------

def test_tasks_on_both_nodes_read_a_256MiB_array_and_a_node_keeps_one_replica(nodes):
    head, other = nodes
    data = np.random.default_rng(7).integers(0, 1 << 62, ARRAY_BYTES // 8, dtype=np.int64)
    expected = digest(data)
    ref = vas.ray.put(data, "ray/big")
    del data
    assert ref.home == head and ref.nbytes == ARRAY_BYTES and ref.shape == (ARRAY_BYTES // 8,)
    before = node_memory(other)
    # one task on the home node, two on the other, each in a fresh worker process
    results = ray.get([read_array_fresh.options(**on(node)).remote(ref)
                       for node in (head, other, other)], timeout=120)
    for (ray_node, vas_node, _, checksum, writeable), node in zip(results, (head, other, other)):
        assert (ray_node, vas_node, checksum, writeable) == (node, node, expected, False)
    assert results[1][2] != results[2][2]  # two processes on the other node ...
    # ... and that node holds one replica of the array: its agent's memory grew by one copy
    waiting.wait_for(lambda: node_memory(other) == before + ARRAY_BYTES,
                     f"node memory {before} + one copy", timeout=WAIT)
    assert node_memory(other) == before + ARRAY_BYTES


def test_tasks_on_both_nodes_read_an_arrow_table_zero_copy(nodes):
    head, other = nodes
    rows = 200_000
    rng = np.random.default_rng(8)
    table = pa.table({"id": np.arange(rows), "x": rng.random(rows),
                      "label": [f"item-{i % 977}" for i in range(rows)]})
    ref = vas.ray.put(table, "ray/table")
    assert ref.kind == "arrow" and ref.shape == (rows,)
    results = ray.get([read_table.options(**on(node)).remote(ref) for node in (head, other)],
                      timeout=WAIT)
    assert results == [(head, table_digest(table), True), (other, table_digest(table), True)]


def test_put_in_a_task_is_homed_on_its_node_and_node_affinity_runs_there(nodes):
    head, other = nodes

    @ray.remote
    def put_here(seed):
        import vas.ray

        return vas.ray.put(np.full(1000, seed, dtype=np.int32), f"ray/from-task-{seed}")

    ref = ray.get(put_here.options(**on(other)).remote(3), timeout=WAIT)
    assert ref.home == other
    strategy = vas.ray.node_affinity(ref, soft=False)
    assert (strategy.node_id, strategy.soft) == (other, False)
    ray_node, vas_node, _, checksum, _ = ray.get(
        read_array.options(scheduling_strategy=vas.ray.node_affinity(ref)).remote(ref),
        timeout=WAIT)
    assert (ray_node, vas_node, checksum) == (other, other, digest(np.full(1000, 3, np.int32)))
    by_name = vas.ray.node_affinity("ray/big")  # by name, soft by default
    assert (by_name.node_id, by_name.soft) == (head, True)
    stray = vas.SegmentRef("x", "ndarray", "<f8", (1,), 1, 1, "node1", 8)
    with pytest.raises(vas.InvalidArgument, match="not a node of this Ray cluster"):
        vas.ray.node_affinity(stray)


def test_put_without_a_name_makes_one_and_passes_the_ttl_on(nodes):
    head, _ = nodes
    array, table = np.arange(10), pa.table({"v": [1, 2]})
    refs = [vas.ray.put(array, ttl=60), vas.ray.put(table, ttl=60)]
    assert refs[0].name != refs[1].name
    for ref in refs:
        assert re.fullmatch(r"ray/[0-9a-f]{32}", ref.name) and ref.home == head
        info = vas.stat(ref.name)
        assert info.expires is not None and 60 <= info.expires - info.created < 70
    assert digest(refs[0].get()) == digest(array)
    assert table_digest(refs[1].get()) == table_digest(table)


def test_errors_inside_tasks_surface_as_vas_exceptions(nodes):
    _, other = nodes

    @ray.remote
    def get_missing():
        import vas.ray

        return vas.ray.get("ray/no-such-dataset")

    @ray.remote
    def put_objects():
        import vas.ray

        return vas.ray.put(np.array([object()]), "ray/objects")

    @ray.remote
    def put_twice():
        import vas.ray

        return vas.ray.put(np.zeros(3), "ray/big")

    with pytest.raises(vas.NotFound, match="ray/no-such-dataset"):
        ray.get(get_missing.options(**on(other)).remote(), timeout=WAIT)
    with pytest.raises(vas.InvalidArgument, match="dtype object"):
        ray.get(put_objects.options(**on(other)).remote(), timeout=WAIT)
    with pytest.raises(vas.AlreadyExists):
        ray.get(put_twice.options(**on(other)).remote(), timeout=WAIT)


DRIVER = textwrap.dedent("""
    import hashlib, sys
    import numpy as np
    import ray
    import vas.ray

    ray.init(address=sys.argv[1], logging_level="ERROR")
    if sys.argv[2] == "put":
        data = np.random.default_rng(11).random(1 << 20)
        vas.ray.start()
        vas.ray.put(data, "ray/outlives")
    else:
        data = vas.ray.get("ray/outlives")
    print(hashlib.sha256(data.data).hexdigest())
""")


def driver(address: str, verb: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VAS_NODE")}
    proc = subprocess.run([sys.executable, "-c", DRIVER, address, verb], capture_output=True,
                          timeout=120, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return proc.stdout.decode().split()[-1]


def test_a_dataset_outlives_the_driver_that_made_it(cluster, nodes):
    address = cluster[0].address
    made = driver(address, "put")  # this driver exits after putting
    assert made == digest(np.random.default_rng(11).random(1 << 20))
    assert driver(address, "get") == made  # a second driver, later
    ref = vas.ray.ref("ray/outlives")
    (_, _, _, checksum, _), = ray.get([read_array.options(**on(nodes[1])).remote(ref)],
                                      timeout=WAIT)
    assert checksum == made

    @ray.remote
    def get_by_name(name):
        import vas.ray

        return digest(vas.ray.get(name))

    assert ray.get(get_by_name.options(**on(nodes[1])).remote("ray/outlives"),
                   timeout=WAIT) == made  # and by name in a task on the other node


def test_the_example_runs_against_this_cluster(cluster):
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples",
                           "ray_shared_dataset.py")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VAS_NODE")}
    proc = subprocess.run([sys.executable, example, "--address", cluster[0].address,
                           "--rows", str(1 << 20)], capture_output=True, timeout=300, env=env,
                          cwd="/")
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert out.count(" ok\n") == 10 and "WRONG" not in out
    assert out.rstrip().endswith("before and after the first driver exited")


# -- the agents' lives ----------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is gone for our purposes
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_an_agent_dies_with_its_actor_and_start_replaces_it(cluster, nodes):
    _, other = nodes
    old = vas.ray.agents()[other]
    ray.kill(ray.get_actor(vas.ray.AGENT_PREFIX + other, namespace=vas.ray.NAMESPACE))
    waiting.wait_for(lambda: not pid_alive(old["pid"]), "the agent to follow its actor",
                     timeout=WAIT)
    assert vas.ray.start().agents == cluster[2].agents
    new = vas.ray.agents()[other]
    assert new["alive"] and new["pid"] != old["pid"]
    # an agent process that ends on its own is replaced by the next start() as well
    os.kill(new["pid"], 9)
    waiting.wait_for(lambda: not vas.ray.agents()[other]["alive"], "the agent to be seen gone",
                     timeout=WAIT)
    assert vas.ray.start().agents == cluster[2].agents
    third = vas.ray.agents()[other]
    assert third["alive"] and third["pid"] not in (old["pid"], new["pid"])
    with vas.connect(third["socket"]) as client:  # and it serves
        assert client.local_node.id == other


def test_a_lost_control_plane_is_made_again_with_new_agents(nodes):
    head, other = nodes
    old_agents = vas.ray.agents()
    old = vas.ray.start()
    ray.kill(ray.get_actor(vas.ray.CONTROL_NAME, namespace=vas.ray.NAMESPACE))
    new = vas.ray.start()  # a new etcd and coordinator; every agent follows them
    assert new.coordinator != old.coordinator and new.agents == old.agents
    agents = vas.ray.agents()
    assert {info["coordinator"] for info in agents.values()} == {new.coordinator}
    for node_id, info in old_agents.items():
        waiting.wait_for(lambda: not pid_alive(info["pid"]), f"old agent of {node_id} to end",
                         timeout=WAIT)
    ref = vas.ray.put(np.arange(1000), "ray/after-restart")  # and it all works again
    (_, _, _, checksum, _), = ray.get([read_array.options(**on(other)).remote(ref)],
                                      timeout=WAIT)
    assert checksum == digest(np.arange(1000))


def test_stop_from_a_task_ends_every_daemon(cluster, nodes):
    pids = [a["pid"] for a in vas.ray.agents().values()]

    @ray.remote
    def stop_here():
        import vas.ray

        vas.ray.stop()

    ray.get(stop_here.options(**on(nodes[1])).remote(), timeout=WAIT)
    for pid in pids:
        waiting.wait_for(lambda: not pid_alive(pid), f"agent {pid} to end", timeout=WAIT)
    assert vas.ray.agents() == {}
    assert not any(os.path.exists(path) for path in cluster[2].agents.values())
    vas.ray.stop()  # idempotent, from the driver too
