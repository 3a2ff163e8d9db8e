"""``vasctl --coordinator``: operating a real two-node cluster with no local agent.

Every command runs as users run it (a process, from a directory of its own, with no
$VAS_NODE), straight against the coordinator over gRPC; ``seg get``/``seg put``
stream from/to the segment's home. Checked: the same JSON shapes as through an agent,
sha256 of the bytes both ways, that a delete frees the home's memory, the backend
rule (explicit flag, fallback when no agent listens, usage errors), one-line errors
with exit 1, permissions (plaintext as another uid, and a TLS cluster where the
certificate names the admin), and the progress line on a terminal only.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time

import pytest
import yaml

import vas
from vas.cluster import LocalCluster, free_port
from waiting import wait_for
from worlds import new_world_dir, wipe

MiB = 1 << 20
VASCTL = [sys.executable, "-m", "vas.cli"]
NOBODY = 65534
DEADLINE = 120  # seconds, every vasctl process


#: vasctl as uid/gid {uid}: everything it loads is imported first (the interpreter's own
#: files may be out of that uid's reach), then the process drops root.
AS_USER = """
import os, sys
import vas.admin, vas.client, vas.cli.main, vas.cli.backend, vas.cli.seg, vas.cli.transfer
import vas.cli.progress, vas.cli.node, vas.cli.space, vas.cli.status, vas.cli.up
import vas.cli.daemons, vas.cli.printers, vas.core.fetch
os.setgroups([]); os.setgid({uid}); os.setuid({uid})
sys.exit(vas.cli.main.main(sys.argv[1:]))
"""


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def one_error_line(proc) -> str:
    err = proc.stderr.decode()
    assert err.count("\n") == 1, err
    return err.rstrip("\n")


def clean_env(**extra) -> dict:
    """The environment without any VAS_* variable (no agent, no coordinator), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAS_")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def cluster(module_dir):
    with LocalCluster(module_dir, nodes=2, memory=256 * MiB) as running:
        yield running


@pytest.fixture
def vasctl(cluster, tmp_path):
    """vasctl ``args`` against the coordinator (``--coordinator ADDR`` first), from
    ``tmp_path``, with no VAS_* variable; ``agent=i`` runs it through node i instead,
    ``user=uid`` as that uid/gid."""
    address = cluster.coordinators[0].address

    def run(*args, input: bytes | None = None, expect: int | None = 0, agent: int | None = None,
            user: int | None = None):
        # --coordinator is global (before the command), --node goes after it.
        argv = ([*map(str, args), "--node", cluster.nodes[agent].socket]
                if agent is not None else ["--coordinator", address, *map(str, args)])
        launcher = VASCTL if user is None else [sys.executable, "-c", AS_USER.format(uid=user)]
        proc = subprocess.run([*launcher, *argv], input=input, capture_output=True,
                              timeout=DEADLINE, env=clean_env(),
                              cwd=tmp_path if user is None else "/")  # one nobody may enter
        if expect is not None:
            assert proc.returncode == expect, (args, proc.returncode, proc.stderr.decode())
        return proc

    return run


@pytest.fixture
def segment(cluster):
    """Factory: a segment homed on node ``home`` (0-based) holding ``data`` (random bytes
    by default), created through that agent; removed after the test if still there."""
    made = []

    def make(name: str, size: int, home: int = 1, mode: int = 0o600, data: bytes | None = None):
        data = os.urandom(size) if data is None else data
        with vas.connect(cluster.nodes[home].socket) as client:
            client.create(name, size, mode=mode)
            made.append(name)
            with client.attach(name, "rw") as mapping:
                mapping.write(0, data)
                mapping.sync()
        return data

    yield make
    with vas.connect(cluster.nodes[0].socket) as client:
        for name in made:
            try:
                client.delete(name, force=True)
            except vas.NotFound:
                pass


def without_fetch_here(records: list[dict]) -> list[dict]:
    """Listings minus ``fetch_here``: how this process would attach, which is all an agent
    and a coordinator answer differently."""
    return [{k: v for k, v in r.items() if k != "fetch_here"} for r in records]


def held(cluster, node: int) -> int:
    """Segments agent ``node`` holds now (Hello reports its live usage)."""
    with vas.connect(cluster.nodes[node].socket) as client:
        return client.local_node.segments


# -- the acceptance: metadata and bytes with no agent ----------------------------------

def test_listing_commands_print_what_an_agent_prints(vasctl, segment):
    segment("adm/a", 3 * MiB, home=0)
    segment("adm/b", 1 * MiB, home=1, mode=0o640)

    listing = json.loads(vasctl("seg", "ls", "adm/", "-o", "json").stdout)
    assert [s["name"] for s in listing] == ["adm/a", "adm/b"]
    assert [s["home"] for s in listing] == ["node1", "node2"]
    assert {s["fetch_here"] for s in listing} == {"none (no local agent)"}
    through_agent = json.loads(vasctl("seg", "ls", "adm/", "-o", "json", agent=0).stdout)
    assert set(listing[0]) == set(through_agent[0])
    assert without_fetch_here(listing) == without_fetch_here(through_agent)
    assert yaml.safe_load(vasctl("seg", "ls", "adm/", "-o", "yaml").stdout) == listing
    table = vasctl("seg", "ls", "adm/").stdout.decode().splitlines()
    assert table[0] == vasctl("seg", "ls", "adm/", agent=0).stdout.decode().splitlines()[0]
    assert [line.split()[0] for line in table[1:]] == ["adm/a", "adm/b"]

    stat = json.loads(vasctl("seg", "stat", "adm/b", "-o", "json").stdout)
    through_agent = json.loads(vasctl("seg", "stat", "adm/b", "-o", "json", agent=1).stdout)
    assert stat == {**through_agent, "fetch_here": "none (no local agent)"}
    assert stat["mode"] == 0o640 and stat["version"] == 1 and stat["size"] == MiB

    nodes = json.loads(vasctl("node", "ls", "-o", "json").stdout)
    agent_nodes = json.loads(vasctl("node", "ls", "-o", "json", agent=0).stdout)
    assert [(n["id"], n["address"], n["socket"]) for n in nodes] == \
        [(n["id"], n["address"], n["socket"]) for n in agent_nodes]
    assert set(nodes[0]) == set(agent_nodes[0])

    status = json.loads(vasctl("status", "-o", "json").stdout)
    agent_status = json.loads(vasctl("status", "-o", "json", agent=0).stdout)
    assert set(status) == set(agent_status)
    assert status["local_node"] is None and agent_status["local_node"] == "node1"
    assert (status["segments"], status["segment_bytes"]) == (2, 4 * MiB)
    assert [n["id"] for n in status["nodes"]] == ["node1", "node2"]
    text = vasctl("status").stdout.decode()
    assert re.search(r"^local node +-$", text, re.M) and "node2" in text


def test_get_streams_the_segment_from_its_home(vasctl, segment, tmp_path):
    data = segment("adm/get", 9 * MiB + 4096, home=1)  # more than four 2 MiB chunks
    proc = vasctl("seg", "get", "adm/get", "-o", "out.bin")  # relative to the cwd
    assert proc.stdout == b"" and proc.stderr == b""  # piped: no progress
    assert sha256((tmp_path / "out.bin").read_bytes()) == sha256(data)
    part = vasctl("seg", "get", "adm/get", "--offset", "4KiB", "--length", 3 * MiB + 5).stdout
    assert part == data[4096:4096 + 3 * MiB + 5]


def test_put_then_get_round_trip(vasctl, segment, cluster, tmp_path):
    segment("adm/put", 32 * MiB, home=1, data=bytes(32 * MiB))
    payload = os.urandom(17 * MiB + 321)
    (tmp_path / "in.bin").write_bytes(payload)
    vasctl("seg", "put", "adm/put", "in.bin")
    stat = json.loads(vasctl("seg", "stat", "adm/put", "-o", "json").stdout)
    assert stat["version"] == 2  # one publish for the whole put
    got = vasctl("seg", "get", "adm/put", "--length", len(payload)).stdout
    assert sha256(got) == sha256(payload)

    # stdin, at an offset; the rest stays; an agent on the other node sees it all.
    vasctl("seg", "put", "adm/put", "-", "--offset", "20MiB", input=b"0123456789")
    whole = payload + bytes(20 * MiB - len(payload)) + b"0123456789"
    whole += bytes(32 * MiB - len(whole))
    assert sha256(vasctl("seg", "get", "adm/put").stdout) == sha256(whole)
    assert sha256(vasctl("seg", "get", "adm/put", agent=0).stdout) == sha256(whole)
    # The writer lock was released: an agent can take it at once.
    with vas.connect(cluster.nodes[0].socket) as client, client.attach("adm/put", "rw"):
        pass


def test_rm_frees_the_home(vasctl, segment, cluster):
    before = held(cluster, 1)
    segment("adm/rm", 4 * MiB, home=1)
    assert held(cluster, 1) == before + 1
    vasctl("seg", "rm", "adm/rm")  # the coordinator tells the home; the reply does not wait
    wait_for(lambda: held(cluster, 1) == before, "node2 to free the segment")
    wait_for(lambda: json.loads(vasctl("seg", "ls", "adm/", "-o", "json").stdout) == [],
             "the record to go")

    # Attached: deleting until the last detach, or at once with --force.
    segment("adm/rm", 4 * MiB, home=1)
    with vas.connect(cluster.nodes[1].socket) as client:
        mapping = client.attach("adm/rm", "r")
        vasctl("seg", "rm", "adm/rm")
        assert json.loads(vasctl("seg", "stat", "adm/rm", "-o", "json").stdout)["state"] == \
            "deleting"
        mapping.detach()
        wait_for(lambda: vasctl("seg", "stat", "adm/rm", expect=None).returncode == 1,
                 "the record to go at the last detach")
    segment("adm/rm", 4 * MiB, home=1)
    with vas.connect(cluster.nodes[1].socket) as client, client.attach("adm/rm", "r"):
        vasctl("seg", "rm", "adm/rm", "--force")  # attached, freed all the same
        wait_for(lambda: vasctl("seg", "stat", "adm/rm", expect=None).returncode == 1,
                 "the forced delete to free the segment")
        wait_for(lambda: held(cluster, 1) == before, "node2 to free the segment")
    proc = vasctl("seg", "stat", "adm/rm", expect=1)
    assert one_error_line(proc) == "vasctl: error: segment 'adm/rm' not found"


def test_chmod_chown_and_spaces(vasctl, segment):
    segment("adm/perm", 4096, home=0)
    vasctl("seg", "chmod", "adm/perm", "604")
    vasctl("seg", "chown", "adm/perm", "4321:4322")
    stat = json.loads(vasctl("seg", "stat", "adm/perm", "-o", "json").stdout)
    assert (stat["mode"], stat["uid"], stat["gid"]) == (0o604, 4321, 4322)

    vasctl("space", "create", "adm/space", "--mode", "640")
    vasctl("space", "add", "adm/space", "adm/perm", "--mode", "rw")
    (space,) = json.loads(vasctl("space", "ls", "adm/", "-o", "json").stdout)
    assert space["members"] == [{"segment": "adm/perm", "mode": "rw"}]
    assert space == json.loads(vasctl("space", "ls", "adm/", "-o", "json", agent=1).stdout)[0]
    vasctl("space", "rm", "adm/space", "adm/perm")
    vasctl("space", "rm", "adm/space")
    assert json.loads(vasctl("space", "ls", "adm/", "-o", "json").stdout) == []


# -- errors and the backend rule ---------------------------------------------------------

def test_errors_are_one_line_exit_1(vasctl, segment, tmp_path):
    for args in (("seg", "stat", "adm/none"), ("seg", "get", "adm/none"),
                 ("seg", "rm", "adm/none"), ("seg", "chmod", "adm/none", "600")):
        assert one_error_line(vasctl(*args, expect=1)) == \
            "vasctl: error: segment 'adm/none' not found"
    assert one_error_line(vasctl("node", "rm", "node9", expect=1)).startswith(
        "vasctl: error: no node 'node9'")
    segment("adm/small", 8192, home=1)
    proc = vasctl("seg", "get", "adm/small", "--offset", 8000, "--length", 200, expect=1)
    assert one_error_line(proc) == \
        "vasctl: error: range [8000, 8200) is outside segment adm/small of 8 KiB"
    assert not (tmp_path / "x.bin").exists()
    (tmp_path / "big.bin").write_bytes(b"x" * 8193)
    proc = vasctl("seg", "put", "adm/small", "big.bin", expect=1)
    assert one_error_line(proc) == ("vasctl: error: big.bin of 8.0 KiB (8193 bytes) does not "
                                    "fit in segment adm/small of 8 KiB at offset 0")
    proc = vasctl("seg", "put", "adm/small", "-", input=b"y" * 8193, expect=1)
    assert one_error_line(proc) == ("vasctl: error: stdin does not fit in segment adm/small "
                                    "of 8 KiB at offset 0")
    # Nothing of the refused puts was published, and the lock is free again.
    assert json.loads(vasctl("seg", "stat", "adm/small", "-o", "json").stdout)["version"] == 1
    vasctl("seg", "put", "adm/small", "-", input=b"z" * 8192)
    assert vasctl("seg", "get", "adm/small").stdout == b"z" * 8192


def test_no_coordinator_reachable(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    socket_path = tmp_path / "none.sock"
    # Both run at once: each waits out the 5 s connect deadline.
    alone, both = run_together(
        ([*VASCTL, "--coordinator", address, "seg", "ls"], clean_env()),
        # Neither an agent at $VAS_NODE nor the coordinator at $VAS_COORDINATOR: both named.
        ([*VASCTL, "seg", "ls"], clean_env(VAS_NODE=str(socket_path), VAS_COORDINATOR=address)),
        cwd=tmp_path)
    assert alone.returncode == 1
    assert one_error_line(alone) == (
        f"vasctl: error: cannot reach the vas coordinator at {address} within 5 s (is "
        "`vasctl coordinator serve` running? set --coordinator or $VAS_COORDINATOR)")
    assert both.returncode == 1
    line = one_error_line(both)
    assert line.startswith(f"vasctl: error: cannot reach the vas agent at {socket_path}: ")
    assert f"; and cannot reach the vas coordinator at {address}" in line


def run_together(*commands, cwd) -> list[subprocess.CompletedProcess]:
    """Run every (argv, env) of ``commands`` at the same time; their completed processes."""
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                              cwd=cwd) for argv, env in commands]
    try:
        outputs = [proc.communicate(timeout=DEADLINE) for proc in procs]
        return [subprocess.CompletedProcess(proc.args, proc.returncode, *output)
                for proc, output in zip(procs, outputs)]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_plaintext_refuses_a_remote_coordinator(tmp_path):
    proc = subprocess.run([*VASCTL, "--coordinator", "192.0.2.1:7300", "seg", "ls"],
                          capture_output=True, env=clean_env(), cwd=tmp_path, timeout=DEADLINE)
    assert proc.returncode == 1
    assert one_error_line(proc) == (
        "vasctl: error: refusing to reach the coordinator at 192.0.2.1:7300 without TLS: only "
        "a loopback-bound cluster may be operated in the clear; give "
        "--tls-cert/--tls-key/--tls-ca ($VAS_TLS_*)")


def test_falls_back_to_the_coordinator_when_no_agent_listens(cluster, segment, tmp_path):
    segment("adm/fallback", 4096, home=0)
    env = clean_env(VAS_NODE=str(tmp_path / "none.sock"),
                    VAS_COORDINATOR=cluster.coordinators[0].address)
    proc = subprocess.run([*VASCTL, "seg", "stat", "adm/fallback", "-o", "json"],
                          capture_output=True, env=env, cwd=tmp_path, timeout=DEADLINE)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["fetch_here"] == "none (no local agent)"
    # With an agent there, the agent serves.
    env["VAS_NODE"] = cluster.nodes[0].socket
    proc = subprocess.run([*VASCTL, "seg", "stat", "adm/fallback", "-o", "json"],
                          capture_output=True, env=env, cwd=tmp_path, timeout=DEADLINE)
    assert json.loads(proc.stdout)["fetch_here"] == "home (no fetch)"


@pytest.mark.parametrize("argv, message", [
    (["--coordinator", "{addr}", "seg", "ls", "--node", "/x.sock"],
     "--coordinator and --node name two ways to reach the cluster: give one"),
    (["--coordinator", "{addr}", "seg", "create", "x", "--size", "4096"],
     "`vasctl seg create` needs a node agent (the segment's memory is the agent's that "
     "creates it): give --node or $VAS_NODE, not --coordinator"),
    (["--coordinator", "{addr}", "node", "serve"],
     "the global --coordinator chooses where client commands (seg, space, node ls, status) "
     "are served; `vasctl node serve` takes its own --coordinator after the command"),
])
def test_usage_errors_exit_2(cluster, tmp_path, argv, message):
    argv = [arg.format(addr=cluster.coordinators[0].address) for arg in argv]
    proc = subprocess.run([*VASCTL, *argv], capture_output=True, env=clean_env(), cwd=tmp_path,
                          timeout=DEADLINE)
    assert proc.returncode == 2 and one_error_line(proc) == f"vasctl: error: {message}"


def test_a_down_home_is_reported_before_anything_is_written(etcd, tmp_path):
    """Its own cluster (a node is stopped): get and put of a segment whose home is gone
    fail with one line, exit 1, and no output file; the other node's segments still read."""
    wipe(etcd.url)
    directory = new_world_dir("vas-admdown-")
    try:
        with LocalCluster(directory, nodes=2, memory=64 * MiB, etcd_url=etcd.url) as small:
            data = os.urandom(MiB)
            for home, name in ((0, "down/kept"), (1, "down/gone")):
                with vas.connect(small.nodes[home].socket) as client:
                    client.create(name, MiB)
                    with client.attach(name, "rw") as mapping:
                        mapping.write(0, data)
            small.nodes[1].stop()  # deregisters node2
            address = small.coordinators[0].address

            def run(*args):
                return subprocess.run([*VASCTL, "--coordinator", address, *args],
                                      input=b"x", capture_output=True, env=clean_env(),
                                      cwd=tmp_path, timeout=DEADLINE)

            for args in (("seg", "get", "down/gone", "-o", "out.bin"),
                         ("seg", "put", "down/gone", "-")):
                proc = run(*args)
                assert proc.returncode == 1
                assert one_error_line(proc) == ("vasctl: error: home node node2 of segment "
                                                "down/gone is not registered (down?)")
            assert not (tmp_path / "out.bin").exists()
            proc = run("seg", "get", "down/kept")
            assert proc.returncode == 0 and proc.stdout == data
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- identity ------------------------------------------------------------------------------

def test_plaintext_acts_as_the_calling_uid(vasctl, segment, tmp_path):
    """Without TLS the requests carry vasctl's own uid/gid: nobody may not read, write or
    delete root's 0600 segment, and may read a 0604 one."""
    os.chmod(tmp_path, 0o777)
    data = segment("adm/root", 8192, home=1, mode=0o600)
    for args, need in ((("seg", "get", "adm/root"), "read"),
                       (("seg", "put", "adm/root", "-"), None),
                       (("seg", "rm", "adm/root"), None)):
        line = one_error_line(vasctl(*args, input=b"x", expect=1, user=NOBODY))
        assert line.startswith("vasctl: error: permission denied"), line
        if need:
            assert f"uid {NOBODY} gid {NOBODY} may not {need} segment adm/root" in line
    assert vasctl("seg", "get", "adm/root").stdout == data  # untouched
    vasctl("seg", "chmod", "adm/root", "604")
    assert vasctl("seg", "get", "adm/root", user=NOBODY).stdout == data


@pytest.fixture(scope="module")
def tls_cluster():
    """A 2-node cluster with mutual TLS everywhere (its own etcd too)."""
    directory = new_world_dir("vas-admtls-")
    try:
        with LocalCluster(directory, nodes=2, memory=64 * MiB, tls=True) as running:
            yield running
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_tls_admin_is_who_its_certificate_names(tls_cluster, tmp_path):
    """Over mutual TLS the admin certificate (root) reads and deletes; a certificate
    naming uid 65534 is refused root's 0600 segment whatever uid runs vasctl."""
    data = os.urandom(5 * MiB)
    with vas.connect(tls_cluster.nodes[1].socket) as client:
        client.create("tls/a", len(data), mode=0o600)
        with client.attach("tls/a", "rw") as mapping:
            mapping.write(0, data)
            mapping.sync()
    address = tls_cluster.coordinators[0].address
    admin = clean_env(**tls_cluster.certs.admin.env())
    nobody = clean_env(**tls_cluster.certs.user(NOBODY, NOBODY).env())

    def run(env, *args, expect=0):
        proc = subprocess.run([*VASCTL, "--coordinator", address, *args], capture_output=True,
                              env=env, cwd=tmp_path, timeout=DEADLINE)
        assert proc.returncode == expect, proc.stderr.decode()
        return proc

    assert [s["name"] for s in json.loads(run(admin, "seg", "ls", "-o", "json").stdout)] == \
        ["tls/a"]
    assert sha256(run(admin, "seg", "get", "tls/a").stdout) == sha256(data)
    line = one_error_line(run(nobody, "seg", "get", "tls/a", expect=1))
    assert line.startswith(f"vasctl: error: permission denied: user {NOBODY}:{NOBODY} may not "
                           "read segment tls/a"), line
    assert one_error_line(run(nobody, "seg", "rm", "tls/a", expect=1)).startswith(
        "vasctl: error: permission denied")
    # Plaintext to a TLS coordinator: refused in the handshake, reported as unreachable.
    line = one_error_line(run(clean_env(), "seg", "ls", expect=1))
    assert line.startswith(f"vasctl: error: cannot reach the vas coordinator at {address}")
    run(admin, "seg", "rm", "tls/a")
    assert json.loads(run(admin, "seg", "ls", "-o", "json").stdout) == []


# -- progress ----------------------------------------------------------------------------

def test_progress_on_a_terminal_only(cluster, segment, tmp_path):
    segment("adm/tty", 16 * MiB, home=1)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([*VASCTL, "--coordinator", cluster.coordinators[0].address,
                                 "seg", "get", "adm/tty", "-o", "out.bin"],
                                stdout=subprocess.DEVNULL, stderr=slave, env=clean_env(),
                                cwd=tmp_path)
        os.close(slave)
        seen = b""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError as exc:  # EIO: the child closed the terminal
                assert exc.errno == errno.EIO
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(DEADLINE) == 0
    finally:
        os.close(master)
    last = seen.decode().replace("\r\n", "\n").split("\r")[-1]
    assert "get adm/tty [" in last and "16.0 MiB / 16.0 MiB 100%" in last, seen
    assert "/s  ETA " in last and last.endswith("\x1b[K\n"), seen
