"""etcd paused (SIGSTOP), killed, and restored from a snapshot: metadata calls fail
fast, mappings keep working, and the cluster comes back by itself.

Each test runs its own etcd (the session's is shared by every other test), two
agents and a coordinator over it. While etcd is paused every metadata call, through
the Python API, an admin client straight to the coordinator and ``vasctl``, ends
within its deadline with Unavailable (``vasctl``: exit 1, one line on stderr), and
the bytes of existing mappings stay readable and writable (shared memory needs no
metadata). After SIGCONT, or a restart on the same data dir, creates work again
with nobody restarting anything: agents whose leases lapsed in etcd's view
register again (reconciling with all they hold, so nothing of theirs is marked) and
their records read ``ready``. After a restore from a snapshot (with or without a
revision bump) the coordinator notices and the agents reconcile: what the snapshot
lacks is freed, what they no longer hold reads ``lost``. Figures are printed (``-s``).

etcd is read directly as the oracle of what is stored.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest
from etcd3 import etcdrpc

import vas
from faultkit import bounded, usage
from vas.admin import AdminClient
from vas.cluster import EtcdProcess, LocalCluster
from vas.coordinator import keys
from waiting import wait_for
from worlds import new_world_dir

MiB = 1 << 20
#: Seconds etcd stays paused: longer than the calls' 5 s etcd deadline (each is seen
#: failing with Unavailable while etcd is still stopped) and than the agents' 10 s node
#: lease (DEFAULT_NODE_TTL: the leases lapse in etcd's view, so the agents must register
#: again after SIGCONT). 12 s in the suite proves what the 20 s of the acceptance
#: scenario does; ``VAS_ETCD_PAUSE_SECONDS=20`` runs that.
PAUSE = float(os.environ.get("VAS_ETCD_PAUSE_SECONDS", "12"))
#: Seconds a metadata call may take while etcd is paused: the agent's deadline of a
#: coordinator call (vas/core/defaults.py DEFAULT_RPC_TIMEOUT) bounds every call; the
#: coordinator gives up on etcd after 5 s (DEFAULT_ETCD_TIMEOUT), so each must end
#: within FAIL_FAST (calls queued behind one another, e.g. creates taking turns on the
#: allocator, must not add their waits up).
CALL_DEADLINE = 10.0
FAIL_FAST = 7.5
#: Seconds after etcd returns within which creates must work again (acceptance).
BACK_WITHIN = 10.0
#: Slack of the helper thread that bounds an API call (a hang fails the test).
HANG_SLACK = 5.0
UNAVAILABLE_EXIT = 1


#: Writer lease of the agents, seconds: longer than the pause, so the home writer
#: keeps its lock through it (with the default 10 s its lease lapses in etcd too and
#: the agent fences it, as tests/faults/test_home_writer_fencing.py shows).
WRITER_TTL = 60


@pytest.fixture
def own(world_dir):
    """A started LocalCluster with an etcd of its own (paused or killed by the test),
    two agents of 64 MiB and one coordinator; stopped (etcd resumed first) after."""
    local = LocalCluster(world_dir, nodes=2, memory=64 * MiB, writer_ttl=WRITER_TTL)
    try:
        yield local.start()
    finally:
        if local.etcd and local.etcd.alive():
            os.kill(local.etcd.pid, signal.SIGCONT)
        local.stop()


#: vasctl's main(), started before the pause: it imports everything a command may load
#: and says "ready", then runs the command when it reads a line and prints its seconds.
#: Ten interpreters starting at once took 6-10 s on the loaded 2-CPU VM, which is not
#: the command's time (and could outlast the pause).
PRIMED_VASCTL = ("import sys, time\n"
                 "import vas.admin, vas.client, vas.cli.printers\n"
                 "from vas.cli.main import build_parser, main\n"
                 "build_parser()\n"
                 "print('ready', flush=True)\n"
                 "sys.stdin.readline()\n"
                 "started = time.monotonic()\n"
                 "code = main(sys.argv[1:])\n"
                 "print(f'{time.monotonic() - started:.3f}')\n"
                 "sys.exit(code)\n")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def api_calls(node1, node2, admin: AdminClient) -> dict:
    """name -> a metadata call of every type, each through a fresh connection."""
    def through(node, call):
        def run():
            with vas.connect(node.socket) as client:
                return call(client)
        return run

    return {
        "create": through(node1, lambda c: c.create("pause/new", MiB)),
        "stat": through(node1, lambda c: c.stat("pause/home")),
        "ls": through(node1, lambda c: c.list("pause/")),
        "delete": through(node1, lambda c: c.delete("pause/spare")),
        "chmod": through(node1, lambda c: c.chmod("pause/home", 0o640)),
        "attach remote": through(node1, lambda c: c.attach("pause/other").detach()),
        "nodes": through(node1, lambda c: c.nodes()),
        "admin stat": lambda: admin.stat("pause/home"),
        "admin ls": lambda: admin.list("pause/"),
        "admin nodes": lambda: admin.nodes(include_down=True),
        "admin status": admin.status,
    }


def cli_calls(node1, node2, coordinator: str) -> dict:
    """name -> vasctl argv of every metadata command, through an agent or the coordinator.
    Spread over both agents: one uid's requests beyond ``--max-requests-per-uid`` (14)
    wait for a worker, and here each holds one for the 5 s etcd deadline."""
    at1, at2 = ["--node", node1.socket], ["--node", node2.socket]
    return {
        "vasctl seg create": ["seg", "create", "pause/cli", "--size", "1MiB", *at2],
        "vasctl seg stat": ["seg", "stat", "pause/home", *at2],
        "vasctl seg ls": ["seg", "ls", "pause/", *at2],
        "vasctl seg rm": ["seg", "rm", "pause/spare", *at1],
        "vasctl seg chmod": ["seg", "chmod", "pause/home", "640", *at1],
        "vasctl seg get (remote)": ["seg", "get", "pause/other", "--length", "8",
                                    "-o", os.devnull, *at1],
        "vasctl node ls": ["node", "ls", *at2],
        "vasctl status": ["status", *at2],
        "vasctl --coordinator seg ls": ["--coordinator", coordinator, "seg", "ls"],
        "vasctl --coordinator status": ["--coordinator", coordinator, "status"],
    }


def test_etcd_paused_calls_fail_fast_mappings_work_and_it_recovers(own):
    node1, node2 = own.nodes
    coordinator = own.coordinators[0].address
    pattern = bytes(range(256)) * (MiB // 256)
    with vas.connect(node1.socket) as c1, vas.connect(node2.socket) as c2, \
            AdminClient(coordinator) as admin:
        home = c1.create("pause/home", MiB, mode=0o644)
        c1.create("pause/spare", MiB)
        c2.create("pause/other", MiB, mode=0o644)
        writer = c1.attach("pause/home", "rw")
        writer.write(0, pattern)
        writer.sync()
        reader = c2.attach("pause/home", fetch="eager")   # a replica on node2
        local_reader = c1.attach("pause/home")             # same pages as the writer
        assert digest(reader.read(0, MiB)) == digest(pattern)

        clis = {name: primed(argv) for name, argv in cli_calls(node1, node2, coordinator).items()}
        os.kill(own.etcd.pid, signal.SIGSTOP)
        paused = time.monotonic()
        try:
            took = during_pause(node1, node2, admin, clis)
            # Mappings need no metadata: the writer's bytes show in the local reader,
            # and a home segment attaches locally.
            fresh = bytes(reversed(pattern))
            writer.write(0, fresh)
            assert digest(local_reader.read(0, MiB)) == digest(fresh)
            assert digest(reader.read(0, MiB)) == digest(pattern)  # node2's copy, unrefreshed
            outcome, seconds = bounded(lambda: local_attach(node1, "pause/home"), CALL_DEADLINE)
            assert outcome == digest(fresh), outcome
            print(f"local attach of a home segment during the pause: {seconds * 1000:.1f} ms")
            left = PAUSE - (time.monotonic() - paused)
            assert left > 0, f"the calls took longer than the pause ({took})"
            time.sleep(left)  # the pause itself is the scenario: etcd stays stopped PAUSE s
        finally:
            os.kill(own.etcd.pid, signal.SIGCONT)
        resumed = time.monotonic()
        back = wait_for(lambda: created_again(node1), "a create to work again",
                        timeout=BACK_WITHIN) and time.monotonic() - resumed
        print(f"\ncreates work again {back:.2f} s after SIGCONT")

        # Nobody restarted anything: both agents are registered and their records ready.
        assert [p.alive() for p in own.nodes] == [True, True]
        wait_for(lambda: {n.id: n.state for n in admin.nodes(include_down=True)} ==
                 {"node1": "ready", "node2": "ready"}, "both agents listed up",
                 timeout=BACK_WITHIN)
        # Every record is ready and has memory behind it. The delete and the creates
        # answered Unavailable may have landed all the same (etcd applied them after
        # the coordinator gave up): the agent re-reads and settles them by itself.
        seen = wait_for(lambda: settled(admin), "every record ready and settled",
                        timeout=BACK_WITHIN)
        for name in seen:
            assert local_attach(node2, name), name
        assert c1.stat("pause/home").id == home.id
        assert writer.sync() == 2  # the writer kept its lock: its pause-time bytes publish
        reader.refresh()
        assert digest(reader.read(0, MiB)) == digest(fresh)
        for proc in own.nodes:
            assert "Traceback" not in open(proc.log_path, errors="replace").read(), proc.tail(60)
        local_reader.detach()
        reader.detach()
        writer.detach()


def during_pause(node1, node2, admin: AdminClient, clis: dict) -> dict:
    """Every metadata call at once (API, and the primed vasctl ``clis``): each must end
    in Unavailable (exit 1, one line) within its deadline; name -> seconds taken."""
    api = api_calls(node1, node2, admin)
    with concurrent.futures.ThreadPoolExecutor(len(api) + len(clis)) as pool:
        api_runs = {name: pool.submit(bounded, call, CALL_DEADLINE + HANG_SLACK)
                    for name, call in api.items()}
        cli_runs = {name: pool.submit(run_primed, proc) for name, proc in clis.items()}
    took = {}
    for name, run in api_runs.items():
        outcome, seconds = run.result()
        assert isinstance(outcome, vas.Unavailable), (name, outcome)
        assert seconds < FAIL_FAST, (name, seconds)
        took[name] = seconds
        print(f"{name}: Unavailable after {seconds:.2f} s: {outcome}")
    for name, run in cli_runs.items():
        code, stderr, seconds = run.result()
        message = stderr.strip()
        assert code == UNAVAILABLE_EXIT, (name, code, stderr)
        assert "\n" not in message and message.startswith("vasctl: error: "), (name, message)
        assert seconds < FAIL_FAST, (name, seconds)
        took[name] = seconds
        print(f"{name}: exit {code} after {seconds:.2f} s: {message}")
    return took


#: Records the test keeps; "pause/spare" may be there too (its delete's outcome is
#: ambiguous: answered Unavailable, maybe applied).
KEPT = {"pause/home", "pause/other", "pause/after"}


def settled(admin: AdminClient) -> dict | None:
    """name -> state of the listed records once they are KEPT (+ "pause/spare"), all ready."""
    seen = {s.name: s.state for s in admin.list("pause/")}
    if set(seen) - {"pause/spare"} == KEPT and set(seen.values()) == {"ready"}:
        return seen
    return None


def local_attach(node, name: str) -> str:
    """Digest of ``name``'s bytes through a fresh "r" attach on ``node``."""
    with vas.connect(node.socket) as client, client.attach(name) as mapping:
        return digest(mapping.read(0, mapping.size))


def primed(argv: list[str]) -> subprocess.Popen:
    """``vasctl argv`` started and ready to run its command (PRIMED_VASCTL)."""
    proc = subprocess.Popen([sys.executable, "-c", PRIMED_VASCTL, *argv], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready and proc.stdout.readline() == "ready\n", (argv, proc.poll())
    return proc


def run_primed(proc: subprocess.Popen) -> tuple[int, str, float]:
    """(exit status, stderr, seconds of the command) of a primed vasctl told to go."""
    out, err = proc.communicate("go\n", timeout=PAUSE + 30)
    return proc.returncode, err, float(out.split()[-1])


def created_again(node) -> bool:
    """Whether a create through ``node`` works now (``exist_ok``: an attempt that timed
    out may have been stored)."""
    try:
        with vas.connect(node.socket) as client:
            client.create("pause/after", MiB, exist_ok=True)
        return True
    except vas.Unavailable:
        return False


def records(oracle_url: str) -> dict[str, tuple[int, dict]]:
    """name -> (id, record) of every segment, read from etcd directly."""
    with grpc.insecure_channel(oracle_url.removeprefix("http://")) as channel:
        kvs = etcdrpc.KVStub(channel).Range(etcdrpc.RangeRequest(
            key=keys.SEGMENTS, range_end=keys.prefix_end(keys.SEGMENTS)), timeout=10).kvs
    return {kv.key[len(keys.SEGMENTS):].decode(): (kv.create_revision, keys.decode(kv.value))
            for kv in kvs}


def create_within(node, name: str, timeout: float) -> float:
    """Seconds until a create of ``name`` through ``node`` works (retried while Unavailable)."""
    started = time.monotonic()

    def attempt() -> bool:
        try:
            with vas.connect(node.socket) as client:
                client.create(name, MiB, mode=0o644, exist_ok=True)
            return True
        except vas.Unavailable:
            return False

    wait_for(attempt, f"a create of {name} to work", timeout=timeout)
    return time.monotonic() - started


def test_etcd_killed_and_restarted_on_its_data_dir_keeps_every_record(own):
    node1, node2 = own.nodes
    data = os.urandom(MiB)
    with vas.connect(node1.socket) as c1, vas.connect(node2.socket) as c2:
        c1.create("restart/a", MiB, mode=0o644)
        c2.create("restart/b", MiB, mode=0o644)
        with c1.attach("restart/a", "rw") as mapping:
            mapping.write(0, data)
            mapping.sync()
    before = records(own.etcd_url)

    own.etcd.kill()
    own.etcd.start()
    took = create_within(node1, "restart/after", BACK_WITHIN)
    print(f"\netcd killed and restarted: creates work {took:.2f} s after it answers")

    after = records(own.etcd_url)
    assert {name: after[name] for name in before} == before  # every record, as it was
    with vas.connect(node2.socket) as c2, c2.attach("restart/a", fetch="eager") as mapping:
        assert digest(mapping.read(0, MiB)) == digest(data)
    assert all(proc.alive() for proc in own.nodes)


def etcdctl(*args: str, url: str = "") -> None:
    env = {**os.environ, "ETCDCTL_API": "3"}
    done = subprocess.run(["etcdctl", *(["--endpoints", url] if url else []), *args],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("etcdctl") is None,
                    reason="needs etcdctl (Debian package etcd-client; ./dev.sh installs it)")
def test_etcd_restored_from_a_snapshot_agents_reconcile_by_themselves(own):
    """The documented restore (docs/ARCHITECTURE.md "Restoring etcd"): snapshot save,
    then etcd lost and restored into a new data dir on the same address. Records newer
    than the snapshot are gone and their memory is freed by its agent; records of the
    snapshot whose memory is held read ready again; one whose memory was freed after
    the snapshot reads lost. The coordinator notices etcd's revision going back,
    writes until it passes the newest it saw (no id or token is handed out twice; the
    Debian etcd 3.4 here has no ``--bump-revision``) and revokes the node leases
    (they are in the snapshot, so they would not lapse)."""
    node1, node2 = own.nodes
    data = os.urandom(MiB)
    with vas.connect(node1.socket) as c1, vas.connect(node2.socket) as c2:
        kept = c1.create("snap/kept", MiB, mode=0o644)
        c2.create("snap/freed", MiB, mode=0o644)
        with c1.attach("snap/kept", "rw") as mapping:
            mapping.write(0, data)
            mapping.sync()
        snapshot = os.path.join(own.dir, "snapshot.db")
        etcdctl("snapshot", "save", snapshot, url=own.etcd_url)
        for number in range(20):  # revisions the restore loses: ids not to hand out again
            c1.create(f"snap/gone{number}", MiB)
            c1.delete(f"snap/gone{number}")
        newer = c1.create("snap/newer", MiB, mode=0o644)   # after the snapshot
        c2.delete("snap/freed")                            # its memory goes
        assert usage(node1) == (2 * MiB, 2) and usage(node2) == (0, 0)

    own.etcd.kill()
    restored = os.path.join(own.dir, "etcd.restored")
    etcdctl("snapshot", "restore", snapshot, "--data-dir", restored, "--name", own.etcd.name,
            "--initial-cluster", f"{own.etcd.name}={own.etcd.peer_url}",
            "--initial-advertise-peer-urls", own.etcd.peer_url)
    own.etcd.data_dir = restored
    own.etcd.start()
    resumed = time.monotonic()

    # By themselves: node1 frees the memory no record names; snap/freed reads lost.
    wait_for(lambda: usage(node1) == (MiB, 1), "node1 to free snap/newer's memory",
             timeout=BACK_WITHIN + 10)
    with vas.connect(node1.socket) as c1:
        wait_for(lambda: {s.name: s.state for s in c1.list("snap/")} == {
            "snap/kept": "ready", "snap/freed": "lost"}, "the records to be reconciled",
            timeout=BACK_WITHIN + 10)
    print(f"\nrestored etcd: reconciled {time.monotonic() - resumed:.2f} s after it answered")
    with open(own.coordinators[0].log_path, errors="replace") as log:
        assert "etcd's revision went back" in log.read(), own.coordinators[0].tail()
    with vas.connect(node2.socket) as c2, c2.attach("snap/kept", fetch="eager") as mapping:
        assert digest(mapping.read(0, MiB)) == digest(data)
        assert mapping.info.id == kept.id
    with vas.connect(node1.socket) as c1:
        fresh = c1.create("snap/newer", MiB, mode=0o644)
    assert fresh.id > newer.id  # the coordinator carried the revision past the lost ones
    print(f"ids: newest before the loss {newer.id}, first create after the restore {fresh.id}")


def test_a_restore_with_a_revision_bump_is_noticed_too(own):
    """A restore with ``--bump-revision --mark-compacted`` (etcdutl >= 3.5.10, not packaged
    here) leaves etcd ahead in revisions with its history compacted: the coordinator's
    watch, resumed right after the newest revision it had seen, is answered "compacted",
    and it revokes the node leases so the agents register again. Stand-in for the bump:
    while etcd is away from its address, writes and a compaction on another port."""
    node1, _ = own.nodes
    with vas.connect(node1.socket) as c1:
        kept = c1.create("bump/kept", MiB, mode=0o644)
    leases = node_leases(own.etcd_url)
    own.etcd.kill()
    aside = EtcdProcess(own.dir, name=own.etcd.name)
    aside.data_dir = own.etcd.data_dir
    aside.start()
    try:
        with grpc.insecure_channel(aside.url.removeprefix("http://")) as channel:
            kv = etcdrpc.KVStub(channel)
            for _ in range(50):
                revision = kv.Put(etcdrpc.PutRequest(key=b"/bump", value=b""),
                                  timeout=10).header.revision
            kv.Compact(etcdrpc.CompactionRequest(revision=revision, physical=True), timeout=10)
    finally:
        aside.stop()
    own.etcd.start()
    resumed = time.monotonic()
    wait_for(lambda: all(node_leases(own.etcd_url).get(n) not in (None, leases[n])
                         for n in leases), "both agents to register again",
             timeout=BACK_WITHIN + 10)
    print(f"\nbumped restore noticed; agents registered again "
          f"{time.monotonic() - resumed:.2f} s after etcd answered")
    with open(own.coordinators[0].log_path, errors="replace") as log:
        assert "etcd compacted its history" in log.read(), own.coordinators[0].tail()
    with vas.connect(node1.socket) as c1:
        wait_for(lambda: c1.stat("bump/kept").state == "ready", "bump/kept ready")
        assert c1.stat("bump/kept").id == kept.id


def node_leases(url: str) -> dict[str, int]:
    """node id -> lease of its node key, read from etcd directly."""
    with grpc.insecure_channel(url.removeprefix("http://")) as channel:
        kvs = etcdrpc.KVStub(channel).Range(etcdrpc.RangeRequest(
            key=keys.NODES, range_end=keys.prefix_end(keys.NODES)), timeout=10).kvs
    return {kv.key[len(keys.NODES):].decode(): kv.lease for kv in kvs}
