"""Publishing across network namespaces: release consistency between a writer on host a
and a reader on host b, a remote writer on b, and fencing of a stopped writer.

Long-lived clients (``hosts.spawn``) take one command per stdin line and answer one
JSON line, so a test can interleave steps of processes in different namespaces.
"""
from __future__ import annotations

import json
import os
import re
import signal

MiB = 1 << 20
SIZE = 64 * MiB

# Commands: "write K" writes K marked spots (and a header) and syncs; "refresh"
# refreshes; "sha" hashes. Each answers {"version", "sha"}.
_CLIENT = """
import hashlib, json, os, random, sys, vas
name, mode, create = sys.argv[1], sys.argv[2], sys.argv[3] == "create"
c = vas.connect()
if create:
    c.create(name, {size}, mode=0o644)
m = c.attach(name, mode, fetch="eager")
if create:
    m.write(0, os.urandom({size}))
    m.sync()
def answer(**extra):
    print(json.dumps({{"version": m.version, "sha": hashlib.sha256(m.buffer).hexdigest(),
                      **extra}}), flush=True)
answer()
for line in sys.stdin:
    verb, *args = line.split()
    try:
        if verb == "write":
            for _ in range(int(args[0])):
                m.write(random.randrange({size} - 64), os.urandom(64))
            m.write(0, b"version %d" % (m.version + 1))
            m.sync()
        elif verb == "refresh":
            m.refresh()
        answer()
    except vas.VasError as exc:
        answer(error=type(exc).__name__, message=str(exc))
"""


def client(hosts, host: int, name: str, mode: str, create: bool = False):
    code = _CLIENT.format(size=SIZE)
    proc = hosts.spawn(host, code.replace("sys.argv[1], sys.argv[2], sys.argv[3]",
                                          f"{name!r}, {mode!r}, {'create' if create else '-'!r}"))
    return proc, json.loads(proc.stdout.readline())


def ask(proc, command: str) -> dict:
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def stop(*procs) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def sync_counts(node, name: str) -> list[int]:
    with open(os.path.join(node.dir, f"{node.node_id}.log")) as log:
        return [int(n) for n in re.findall(
            rf"sync of {re.escape(name)}: sent (\d+) changed chunks", log.read())]


def test_release_consistency_across_namespaces(hosts):
    writer, first = client(hosts, 0, "mh/rc", "rw", create=True)
    reader, seen = client(hosts, 1, "mh/rc", "r")
    try:
        assert seen == first and first["version"] == 1
        versions = [1]
        for round_ in range(3):
            written = ask(writer, f"write {10 * (round_ + 1)}")
            refreshed = ask(reader, "refresh")
            assert refreshed == written  # every write before the sync, no more, no less
            versions.append(refreshed["version"])
        assert versions == sorted(set(versions))  # versions only grow
    finally:
        stop(writer, reader)


def test_remote_writer_on_b_publishes_to_a(hosts):
    hosts.fill(0, "mh/rw", SIZE)
    writer, start = client(hosts, 1, "mh/rw", "rw")
    reader, _ = client(hosts, 0, "mh/rw", "r")
    try:
        written = ask(writer, "write 20")  # 20 random spots: at most 21 chunks of 256
        assert written["version"] == 1 and written["sha"] != start["sha"]
        assert ask(reader, "refresh") == written  # the home pages hold the writer's bytes
        sent = sync_counts(hosts.nodes[1], "mh/rw")
        assert len(sent) == 1 and 1 <= sent[0] <= 21
    finally:
        stop(writer, reader)


_TAKE_OVER = """
import json, time, vas
c = vas.connect()
deadline = time.monotonic() + 20
while True:
    try:
        m = c.attach("mh/fence", "rw")
        break
    except vas.Busy:
        assert time.monotonic() < deadline, "the stopped writer kept its lock"
        time.sleep(0.05)
m.write(0, b"NEWER")
print(json.dumps({"version": m.sync()}))
m.detach()
"""


def test_stopped_writer_is_fenced_across_namespaces(hosts):
    hosts.run(0, f"""
import vas
with vas.connect() as c:
    c.create("mh/fence", {SIZE}, mode=0o644)
""")
    old, _ = client(hosts, 1, "mh/fence", "rw")
    try:
        assert ask(old, "write 1")["version"] == 1
        os.kill(old.pid, signal.SIGSTOP)
        taken = json.loads(hosts.run(0, _TAKE_OVER).stdout)
        assert taken["version"] == 2
        os.kill(old.pid, signal.SIGCONT)
        late = ask(old, "write 1")
        assert late["error"] == "Fenced", late
        home = hosts.run(0, """
import vas
with vas.connect() as c, c.attach("mh/fence") as m:
    print(m.read(0, 5).decode(), m.version)
""").stdout.split()
        assert home == ["NEWER", "2"]  # the old writer's late bytes never reached the home
    finally:
        os.kill(old.pid, signal.SIGCONT)
        stop(old)
