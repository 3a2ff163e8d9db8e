"""vasctl as users run it (a process per command) against a real two-node cluster.

Checks exit codes (0 ok, 1 error, 2 usage), that every error is one line on
stderr, the JSON and YAML of listings, a put/get round trip, --watch, and `vasctl up`.
"""
from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

import vas
from vas.cluster import LocalCluster
from vas.core.tls import COORDINATOR_HOST, TlsConfig, open_channel
from vas.proto import coordinator_pb2, coordinator_pb2_grpc

MiB = 1 << 20
NODE_MEMORY = 256 * MiB
VASCTL = [sys.executable, "-m", "vas.cli"]


@pytest.fixture(scope="module")
def cluster(module_dir):
    with LocalCluster(module_dir, nodes=2, memory=NODE_MEMORY) as running:
        yield running


@pytest.fixture(scope="module")
def vasctl(cluster):
    env = {**os.environ, **cluster.env()}

    def run(*args, input: bytes | None = None, expect: int | None = 0, node: int = 0):
        """vasctl ``args`` as a client of node ``node`` (0 = the first)."""
        proc = subprocess.run([*VASCTL, *map(str, args)], input=input, capture_output=True,
                              env={**env, "VAS_NODE": cluster.nodes[node].socket},
                              timeout=120, cwd="/")
        if expect is not None:
            assert proc.returncode == expect, (args, proc.returncode, proc.stderr.decode())
        return proc

    return run


def one_error_line(proc) -> str:
    err = proc.stderr.decode()
    assert err.count("\n") == 1, err
    return err.rstrip("\n")


def test_create_ls_stat_json(vasctl):
    out = vasctl("seg", "create", "cli/a", "--size", "3MiB", "--mode", "640").stdout.decode()
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    assert (fields["name"], fields["size"], fields["mode"], fields["home"]) == \
        ("cli/a", "3.0 MiB (3145728 bytes)", "0640", "node1")
    assert re.fullmatch(r"0x[0-9a-f]+-0x[0-9a-f]+", fields["address"])

    listing = json.loads(vasctl("seg", "ls", "cli/", "-o", "json").stdout)
    (seg,) = listing
    assert set(seg) == {"name", "id", "size", "address", "mode", "uid", "gid", "home",
                        "replicas", "version", "state", "attachments", "created", "expires",
                        "meta", "fetch_here", "copies"}
    assert (seg["name"], seg["size"], seg["mode"], seg["home"], seg["uid"], seg["state"]) == \
        ("cli/a", 3 * MiB, 0o640, "node1", os.getuid(), "ready")
    assert f"0x{seg['address']:x}-" in fields["address"] and seg["expires"] is None
    assert seg["fetch_here"] == "home (no fetch)"

    # One segment is the same object alone (stat) and as an item of a list (ls).
    stat = json.loads(vasctl("seg", "stat", "cli/a", "-o", "json").stdout)
    assert stat == seg
    assert yaml.safe_load(vasctl("seg", "stat", "cli/a", "-o", "yaml").stdout) == stat
    assert yaml.safe_load(vasctl("seg", "ls", "cli/", "-o", "yaml").stdout) == [stat]
    text = vasctl("seg", "stat", "cli/a").stdout.decode()
    assert re.search(r"^mode\s+0640$", text, re.M) and f"0x{seg['address']:x}" in text
    elsewhere = vasctl("seg", "stat", "cli/a", node=1).stdout.decode()  # how node2 would attach
    assert re.search(r"^fetch here\s+lazy$", elsewhere, re.M), elsewhere

    table = vasctl("seg", "ls").stdout.decode()
    assert any(line.split()[0] == "cli/a" for line in table.splitlines()[1:])
    vasctl("seg", "chmod", "cli/a", "604")
    vasctl("seg", "chown", "cli/a", "4321:4322")
    seg = json.loads(vasctl("seg", "stat", "cli/a", "-o", "json").stdout)
    assert (seg["mode"], seg["uid"], seg["gid"]) == (0o604, 4321, 4322)
    vasctl("seg", "rm", "cli/a")
    assert json.loads(vasctl("seg", "ls", "cli/", "-o", "json").stdout) == []


def test_create_prints_the_object_it_made(vasctl):
    made = json.loads(vasctl("seg", "create", "cli/made", "--size", "8KiB", "--meta", "k=v",
                             "-o", "json").stdout)
    assert made == json.loads(vasctl("seg", "stat", "cli/made", "-o", "json").stdout)
    assert (made["name"], made["size"], made["meta"]) == ("cli/made", 8192, {"k": "v"})
    again = yaml.safe_load(vasctl("seg", "create", "cli/made", "--size", "8KiB", "--exist-ok",
                                  "-o", "yaml").stdout)
    assert again == made
    vasctl("seg", "rm", "cli/made")


def test_version():
    proc = subprocess.run([*VASCTL, "--version"], capture_output=True, text=True, timeout=60,
                          cwd="/")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"vasctl {vas.__version__}\n", "")


def test_put_get_round_trip(vasctl, tmp_path):
    payload = os.urandom(17 * MiB + 321)  # more than two 8 MiB chunks
    source = tmp_path / "in.bin"
    source.write_bytes(payload)
    vasctl("seg", "create", "cli/data", "--size", "32MiB")
    vasctl("seg", "put", "cli/data", source)
    got = vasctl("seg", "get", "cli/data", "--length", len(payload)).stdout
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()

    # stdin in, a file out, at an offset; the rest of the segment is untouched.
    vasctl("seg", "put", "cli/data", "-", "--offset", "4KiB", input=b"0123456789")
    out = tmp_path / "out.bin"
    proc = vasctl("seg", "get", "cli/data", "--offset", 4096, "--length", 10, "-o", out)
    assert proc.stdout == b"" and out.read_bytes() == b"0123456789"
    whole = vasctl("seg", "get", "cli/data").stdout
    assert len(whole) == 32 * MiB
    assert whole[:4096] == payload[:4096] and whole[4106:len(payload)] == payload[4106:]
    vasctl("seg", "rm", "cli/data")


def test_put_from_another_node_publishes_to_the_home(vasctl, tmp_path):
    vasctl("seg", "create", "cli/remote", "--size", "4MiB")  # homed on node1
    payload = os.urandom(3 * MiB)
    vasctl("seg", "put", "cli/remote", "-", "--offset", "1MiB", input=payload, node=1)
    assert vasctl("seg", "get", "cli/remote", "--offset", "1MiB").stdout == payload
    stat = json.loads(vasctl("seg", "stat", "cli/remote", "-o", "json").stdout)
    assert stat["home"] == "node1" and stat["version"] == 1
    assert vasctl("seg", "get", "cli/remote", node=1).stdout[MiB:] == payload
    vasctl("seg", "rm", "cli/remote")


def test_errors_exit_1_with_one_line(vasctl, tmp_path):
    vasctl("seg", "create", "cli/small", "--size", "8KiB")
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 8193)

    proc = vasctl("seg", "put", "cli/small", big, expect=1)
    assert one_error_line(proc) == (f"vasctl: error: {big} of 8.0 KiB (8193 bytes) does not "
                                    "fit in segment cli/small of 8 KiB at offset 0")
    proc = vasctl("seg", "put", "cli/small", "-", input=b"y" * 8193, expect=1)
    assert one_error_line(proc) == ("vasctl: error: stdin does not fit in segment cli/small "
                                    "of 8 KiB at offset 0")
    proc = vasctl("seg", "get", "cli/small", "--offset", 8000, "--length", 200, expect=1)
    assert one_error_line(proc) == \
        "vasctl: error: range [8000, 8200) is outside segment cli/small of 8 KiB"
    proc = vasctl("seg", "create", "cli/small", "--size", "4096", expect=1)
    assert one_error_line(proc).startswith("vasctl: error: ") and "cli/small" in proc.stderr.decode()
    proc = vasctl("seg", "create", "cli/zero", "--size", "0", expect=1)
    assert one_error_line(proc) == "vasctl: error: invalid size 0: must be > 0"
    proc = vasctl("seg", "create", "cli/huge", "--size", "1GiB", expect=1)  # over --memory
    assert one_error_line(proc) == ("vasctl: error: node node1 has no room for segment "
                                    "cli/huge of 1 GiB: 255.9 MiB of 256 MiB free")  # 8 KiB used
    for args in (("seg", "stat", "cli/none"), ("seg", "rm", "cli/none"),
                 ("seg", "get", "cli/none"), ("seg", "chmod", "cli/none", "600"),
                 ("space", "rm", "cli/nospace")):
        proc = vasctl(*args, expect=1)
        line = one_error_line(proc)
        assert line.startswith("vasctl: error: ") and "cli/no" in line, line
    proc = vasctl("seg", "put", "cli/small", tmp_path / "missing.bin", expect=1)
    assert one_error_line(proc).startswith("vasctl: error: No such file or directory")
    proc = vasctl("seg", "ls", "--node", tmp_path / "nowhere.sock", expect=1)
    assert "cannot reach the vas agent at" in one_error_line(proc)
    vasctl("seg", "rm", "cli/small")


@pytest.mark.parametrize("args", [
    ("seg", "create", "cli/u", "--size", "12XB"),
    ("seg", "create", "cli/u", "--size", "1MiB", "--mode", "9"),
    ("seg", "chmod", "cli/u", "rwx"),
    ("seg", "ls", "--frobnicate"),
    ("seg", "ls", "-o", "xml"),
    ("seg", "create", "/abs", "--size", "4096"),
    ("seg", "stat", "cli/../x"),
    ("space", "add", "cli/space", "bad name"),
    ("node", "serve", "--writer-ttl", "soon"),
    ("node", "serve", "--fault-timeout", "soon"),
    ("node", "serve", "--rpc-timeout", "soon"),
])
def test_usage_errors_exit_2(vasctl, args):
    proc = vasctl(*args, expect=2)
    assert one_error_line(proc).startswith("vasctl")
    assert proc.stdout == b""


def test_bad_name_is_a_usage_error(vasctl):
    proc = vasctl("seg", "create", "/abs", "--size", "4096", expect=2)
    assert one_error_line(proc) == (
        "vasctl seg create: error: argument name: invalid segment name '/abs': must not start "
        "with '/' (see `vasctl seg create --help`)")


def run_on_a_terminal(argv, env) -> tuple[int, bytes, str]:
    """vasctl ``argv`` with its stdout on a new pseudo-terminal: (exit code, what reached
    the terminal, stderr)."""
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run([*VASCTL, *argv], stdout=terminal, stderr=subprocess.PIPE,
                              env=env, timeout=120, cwd="/")
        os.close(terminal)
        terminal = -1
        shown = b""
        while select.select([controller], [], [], 0)[0]:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal side is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)
    return proc.returncode, shown, proc.stderr.decode()


def test_seg_get_refuses_a_terminal_without_dash_o_dash(vasctl, cluster):
    env = {**os.environ, **cluster.env(), "VAS_NODE": cluster.nodes[0].socket}
    vasctl("seg", "create", "cli/tty", "--size", "4KiB")
    vasctl("seg", "put", "cli/tty", "-", input=b"abc")
    code, shown, err = run_on_a_terminal(["seg", "get", "cli/tty"], env)
    assert (code, shown) == (2, b"")
    assert err == ("vasctl: error: refusing to write a segment's bytes to a terminal: give -o "
                   "FILE, or -o - to write them to stdout anyway\n")
    code, shown, err = run_on_a_terminal(["seg", "get", "cli/tty", "--length", "3", "-o", "-"],
                                         env)
    assert (code, shown, err) == (0, b"abc", "")
    vasctl("seg", "rm", "cli/tty")


class Output:
    """What a running process has written to its stdout pipe so far."""

    def __init__(self, proc: subprocess.Popen):
        self.fd = proc.stdout.fileno()
        self.text = ""

    def wait_until(self, condition, what: str, timeout: float = 30.0) -> str:
        """Read until ``condition(text so far)`` holds (fail after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while not condition(self.text):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {what} in {self.text!r}"
            if select.select([self.fd], [], [], left)[0]:
                chunk = os.read(self.fd, 65536)
                assert chunk, f"the output ended before {what}: {self.text!r}"
                self.text += chunk.decode()
        return self.text


def json_listings(text: str) -> list:
    """The whole JSON values of a --watch stream so far, read one after another as jq
    reads them (the last may still be arriving)."""
    decoder, listings, rest = json.JSONDecoder(), [], text.lstrip()
    while rest:
        try:
            value, end = decoder.raw_decode(rest)
        except json.JSONDecodeError:
            break
        listings.append(value)
        rest = rest[end:].lstrip()
    return listings


def test_seg_ls_watch_shows_a_new_segment_then_stops_on_sigint(vasctl, cluster):
    env = {**os.environ, **cluster.env(), "VAS_NODE": cluster.nodes[1].socket}
    proc = subprocess.Popen([*VASCTL, "seg", "ls", "cli/w/", "--watch", "-o", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/")
    try:
        seen = Output(proc)
        seen.wait_until(lambda text: json_listings(text) == [[]], "the empty listing")
        vasctl("seg", "create", "cli/w/new", "--size", "4KiB")
        text = seen.wait_until(lambda text: len(json_listings(text)) == 2, "a second listing")
        (new,) = json_listings(text)[1]
        assert (new["name"], new["home"], new["fetch_here"]) == ("cli/w/new", "node1", "lazy")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 130
        assert proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    vasctl("seg", "rm", "cli/w/new")


def test_node_ls_watch_stops_on_sigint(cluster):
    env = {**os.environ, **cluster.env(), "VAS_NODE": cluster.nodes[0].socket}
    proc = subprocess.Popen([*VASCTL, "node", "ls", "--watch"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd="/")
    try:
        text = Output(proc).wait_until(lambda text: cluster.nodes[1].socket in text, "node2")
        assert text.splitlines()[0].split()[:3] == ["ID", "ADDRESS", "SOCKET"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_node_serve_refuses_a_zero_writer_ttl(vasctl, tmp_path):
    proc = vasctl("node", "serve", "--socket", tmp_path / "n.sock", "--writer-ttl", "0", expect=1)
    assert one_error_line(proc) == ("vasctl: error: invalid writer ttl (--writer-ttl) 0: must "
                                    "be 1..86400 seconds")


def test_node_serve_refuses_a_fault_timeout_below_a_second(vasctl, tmp_path):
    proc = vasctl("node", "serve", "--socket", tmp_path / "n.sock", "--fault-timeout", "0.5",
                  expect=1)
    assert one_error_line(proc) == ("vasctl: error: invalid fault timeout (--fault-timeout) "
                                    "0.5: must be 1..86400 seconds")


def test_node_serve_refuses_an_rpc_timeout_below_a_second(vasctl, tmp_path):
    proc = vasctl("node", "serve", "--socket", tmp_path / "n.sock", "--rpc-timeout", "0.5",
                  expect=1)
    assert one_error_line(proc) == ("vasctl: error: invalid rpc timeout (--rpc-timeout) "
                                    "0.5: must be 1..86400 seconds")


def test_node_serve_refuses_a_data_dir_it_cannot_use(vasctl, tmp_path):
    """Bad usage (exit 2), found before the agent registers anywhere."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = vasctl("node", "serve", "--coordinator", "127.0.0.1:1", "--socket",
                  tmp_path / "n.sock", "--data-dir", blocker / "dir", expect=2)
    assert one_error_line(proc) == (f"vasctl: error: cannot use --data-dir {blocker / 'dir'}: "
                                    "Not a directory")


def test_seg_create_replicas_keeps_backups_on_other_nodes(vasctl, cluster):
    proc = vasctl("seg", "create", "cli/replicated", "--size", "4KiB", "--replicas", "2",
                  expect=1)  # two nodes: one other than the home
    assert one_error_line(proc) == ("vasctl: error: replicas=2: only 1 of the live nodes other "
                                    "than the home 'node1' have 4 KiB free, 2 needed")
    vasctl("seg", "stat", "cli/replicated", expect=1)  # nothing was created
    vasctl("seg", "create", "cli/replicated", "--size", "4KiB", "--replicas", "17", expect=2)
    vasctl("seg", "create", "cli/replicated", "--size", "4KiB", "--replicas", "1")
    info = json.loads(vasctl("seg", "stat", "cli/replicated", "-o", "json").stdout)
    assert (info["replicas"], info["state"], info["copies"]) == (1, "ready", ["node2"])
    vasctl("seg", "rm", "cli/replicated")


def test_node_ls_and_status(vasctl, cluster):
    nodes = json.loads(vasctl("node", "ls", "-o", "json").stdout)
    assert [n["id"] for n in nodes] == ["node1", "node2"]
    assert {n["socket"] for n in nodes} == {node.socket for node in cluster.nodes}
    assert set(nodes[0]) == {"id", "address", "socket", "memory_total", "memory_used",
                             "segments", "state", "down_since", "replicas", "replica_bytes"}
    assert nodes[0]["down_since"] is None and nodes[0]["state"] == "ready"
    assert all(n["memory_total"] == NODE_MEMORY for n in nodes)
    table = vasctl("node", "ls").stdout.decode().splitlines()
    assert table[0].split()[:3] == ["ID", "ADDRESS", "SOCKET"] and len(table) == 3

    status = json.loads(vasctl("status", "-o", "json").stdout)
    assert status["local_node"] == "node1" and len(status["nodes"]) == 2
    assert status["etcd"] and status["revision"] > 0
    assert (status["down_nodes"], status["lost"], status["degraded"]) == ([], [], [])
    text = vasctl("status").stdout.decode()
    assert "nodes" in text and "nodes down         0" in text


def test_spaces(vasctl):
    vasctl("seg", "create", "cli/sp/a", "--size", "4096")
    vasctl("seg", "create", "cli/sp/b", "--size", "4096")
    vasctl("space", "create", "cli/space", "--mode", "640")
    vasctl("space", "add", "cli/space", "cli/sp/a", "--mode", "rw")
    vasctl("space", "add", "cli/space", "cli/sp/b")
    (space,) = [s for s in json.loads(vasctl("space", "ls", "-o", "json").stdout)
                if s["name"] == "cli/space"]
    assert space["mode"] == 0o640
    assert space["members"] == [{"segment": "cli/sp/a", "mode": "rw"},
                                {"segment": "cli/sp/b", "mode": "r"}]
    assert "cli/sp/a:rw,cli/sp/b:r" in vasctl("space", "ls").stdout.decode()
    vasctl("space", "rm", "cli/space", "cli/sp/b")
    (space,) = json.loads(vasctl("space", "ls", "cli/space", "-o", "json").stdout)
    assert space["members"] == [{"segment": "cli/sp/a", "mode": "rw"}]
    vasctl("space", "rm", "cli/space")
    assert json.loads(vasctl("space", "ls", "cli/space", "-o", "json").stdout) == []
    vasctl("seg", "rm", "cli/sp/a")
    vasctl("seg", "rm", "cli/sp/b")


# -- vasctl up ----------------------------------------------------------------------------

def test_up_serves_until_sigterm():
    """With --tls (the plaintext cluster is the next test's): the exports name an admin
    certificate that the coordinator accepts over mutual TLS, and local clients work."""
    directory = tempfile.mkdtemp(prefix="vas-it-up-")
    proc = subprocess.Popen([*VASCTL, "up", "--nodes", "2", "--dir", directory, "--memory", "64MiB",
                             "--tls"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        exports, sockets = {}, []
        while len(sockets) < 2:
            line = proc.stdout.readline()
            assert line, f"vasctl up ended early: {proc.stderr.read()}"
            if line.startswith("export "):
                key, _, value = line[len("export "):].strip().partition("=")
                exports[key] = value
            elif line.startswith("#"):
                sockets.append(line.split()[-1])
        assert {"VAS_COORDINATOR", "VAS_NODE"} <= set(exports)
        assert exports["VAS_NODE"] == sockets[0]
        with vas.connect(exports["VAS_NODE"]) as c:
            assert [n.socket for n in c.nodes()] == sockets
        admin = TlsConfig.load(exports["VAS_TLS_CERT"], exports["VAS_TLS_KEY"],
                               exports["VAS_TLS_CA"])
        assert admin.cert == os.path.join(directory, "tls", "admin.pem")
        with open_channel(exports["VAS_COORDINATOR"], admin, COORDINATOR_HOST) as channel:
            nodes = coordinator_pb2_grpc.CoordinatorStub(channel).ListNodes(
                coordinator_pb2.ListNodesRequest(), timeout=10).nodes
            assert [n.id for n in nodes] == ["node1", "node2"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not any(os.path.exists(s) for s in sockets)  # the agents are gone
        with pytest.raises(vas.Unavailable):
            vas.connect(exports["VAS_NODE"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["rm", "-rf", directory], check=False)


def test_up_sigint_stops_cleanly():
    proc = subprocess.Popen([*VASCTL, "up", "--memory", "64MiB"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        lines = []
        while not any(line.startswith("#") for line in lines):
            line = proc.stdout.readline()
            assert line, f"vasctl up ended early: {proc.stderr.read()}"
            lines.append(line)
        socket_path = lines[-1].split()[-1]
        directory = os.path.dirname(socket_path)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert not os.path.exists(directory)  # its own temporary directory is removed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_demo():
    proc = subprocess.run([*VASCTL, "up", "--nodes", "2", "--memory", "128MiB", "--demo"],
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    digests = re.findall(r"sha256 ([0-9a-f]{64})", proc.stdout)
    assert len(digests) == 3 and len(set(digests)) == 1, proc.stdout
