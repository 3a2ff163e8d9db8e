"""One local user must not starve the others: per-uid limits of a real agent.

Agents run as processes with small limits (faultkit.LIMITS: 4 workers, 8
connections, 5 attachments, 2 userfaultfds per uid; by default a uid runs at
most 4 - 2 = 2 requests at once). uid 65534 (a child that drops root) pushes
past each limit while root, in this process, keeps working within a deadline.
"""
from __future__ import annotations

import functools
import time

import pytest

import vas
import waiting
from faultkit import (ATTACHMENTS, CONNECTIONS, DEADLINE, FAULTS, NOBODY, WORKERS,
                       agent_cpu_seconds, agent_threads)
from vas.core.fetch import userfaultfd_available

PAGE = 4096
#: Seconds one root attach+detach may take while another uid floods the agent.
ROOT_DEADLINE = 2.0
#: Connections the flooding child opens past its limit.
FLOOD = 3000
wait_for = functools.partial(waiting.wait_for, timeout=DEADLINE)


def limit_message(count: int, words: str, flag: str) -> str:
    return f"CapacityExceeded: uid {NOBODY} has {count} {words}, the most allowed ({flag})"


def root_round(client: vas.Client, name: str) -> float:
    """Seconds of one attach+detach of ``name`` by root."""
    start = time.monotonic()
    client.attach(name).detach()
    return time.monotonic() - start


def new_root_round(path: str, name: str) -> float:
    """Seconds of connecting to the agent at ``path`` as root and one attach+detach."""
    start = time.monotonic()
    with vas.connect(path) as client:
        client.attach(name).detach()
    return time.monotonic() - start


def serve_root_while(child, pid: int, round_) -> tuple[list[float], int]:
    """Root runs ``round_()`` (-> seconds) until the child's next line is ready (bounded by
    DEADLINE); (the rounds' seconds, the most threads agent ``pid`` had meanwhile)."""
    deadline = time.monotonic() + DEADLINE
    rounds, threads = [], 0
    while not child.ready():
        assert time.monotonic() < deadline, "timed out waiting for the child"
        rounds.append(round_())
        threads = max(threads, agent_threads(pid))
    return rounds, threads


FLOODER = """
    path, extra, flood = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    held = [vas.connect(path) for _ in range(int(sys.argv[4]))]        # up to the limit
    extras = []
    for _ in range(extra):                                            # past it: told why
        extras.append(outcome(lambda: held.append(vas.connect(path))))
    say(admitted=len(held), extras=extras)
    sys.stdin.readline()
    socks = []
    for _ in range(flood):                     # past it again, many, never saying Hello
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
        socks.append(sock)
    say(flooded=len(socks))
    sys.stdin.readline()
    for sock in socks:
        sock.close()
    for client in held:
        client.close()
    start, admitted, deadline = time.monotonic(), [], time.monotonic() + 30
    while len(admitted) < len(held):           # the agent sees the EOFs: the limit frees
        try:
            admitted.append(vas.connect(path))
        except vas.CapacityExceeded:
            assert time.monotonic() < deadline, "the connection limit did not free"
            time.sleep(0.02)
    say(reopened=len(admitted), seconds=time.monotonic() - start)
"""


def test_connections_past_the_limit_are_refused_and_root_is_served(limited, nobody):
    node = limited.nodes[0]
    with vas.connect(node.socket) as root:
        root.create("faults/conn", PAGE, mode=0o644)
        idle = agent_threads(node.pid)
        child = nobody(FLOODER, node.socket, "5", str(FLOOD), str(CONNECTIONS))
        first = child.line()
        assert first == {"admitted": CONNECTIONS, "extras": [limit_message(
            CONNECTIONS, "connections to this agent", "--max-connections-per-uid")] * 5}
        child.send()
        # Root's new connections are accepted and served throughout (no resets).
        rounds, threads = serve_root_while(
            child, node.pid, lambda: new_root_round(node.socket, "faults/conn"))
        assert child.line() == {"flooded": FLOOD}
        # One thread per connection would be 8 + 3000 more; the pool is fixed.
        assert threads <= idle + 2 and threads <= 40, (idle, threads)
        assert max(rounds, default=0) < ROOT_DEADLINE, max(rounds)
        assert root_round(root, "faults/conn") < ROOT_DEADLINE
        assert new_root_round(node.socket, "faults/conn") < ROOT_DEADLINE
        child.send()
        reopened = child.line()
        assert reopened["reopened"] == CONNECTIONS and reopened["seconds"] < DEADLINE
        child.finish()
        assert agent_threads(node.pid) <= idle + 2
    print(f"threads idle {idle}, at most {threads} during a flood of {FLOOD} connections; "
          f"root connect+attach+detach: {len(rounds)} rounds, the slowest "
          f"{max(rounds, default=0):.3f} s; limit freed after {reopened['seconds']:.3f} s")


ATTACHER = """
    path, name = sys.argv[1], sys.argv[2]
    first, second = vas.connect(path), vas.connect(path)
    mappings = [first.attach(name) for _ in range(3)] + [second.attach(name) for _ in range(2)]
    say(over=[outcome(lambda: first.attach(name)), outcome(lambda: second.attach(name))])
    sys.stdin.readline()
    mappings.pop().detach()                       # one slot back
    again = outcome(lambda: mappings.append(second.attach(name)))
    full = outcome(lambda: second.attach(name))
    first.close()                                 # its 3 attachments end at the agent's EOF
    start, deadline, freed = time.monotonic(), time.monotonic() + 30, []
    while len(freed) < 3:
        try:
            freed.append(second.attach(name))
        except vas.CapacityExceeded:
            assert time.monotonic() < deadline, "the attachments of a closed connection stayed"
            time.sleep(0.02)
    say(again=again, full=full, seconds=time.monotonic() - start)
"""


def test_attachments_past_the_limit_are_refused_per_uid(limited, nobody):
    node = limited.nodes[0]
    with vas.connect(node.socket) as root:
        root.create("faults/att", PAGE, mode=0o644)
        child = nobody(ATTACHER, node.socket, "faults/att")
        message = limit_message(ATTACHMENTS, "attachments on this agent",
                                "--max-attachments-per-uid")
        assert child.line() == {"over": [message, message]}
        # uid 65534 is at its limit; root's count is its own (and root has the same limit).
        mappings = [root.attach("faults/att") for _ in range(ATTACHMENTS)]
        with pytest.raises(vas.CapacityExceeded) as refused:
            root.attach("faults/att")
        assert str(refused.value) == (f"uid 0 has {ATTACHMENTS} attachments on this agent, "
                                      "the most allowed (--max-attachments-per-uid)")
        for mapping in mappings:
            mapping.detach()
        child.send()
        done = child.line()
        assert (done["again"], done["full"]) == ("ok", message)
        assert done["seconds"] < DEADLINE
        child.finish()


FAULTER = """
    from vas import _native
    path, name, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    UFFD_USER_MODE_ONLY = 1   # what an unprivileged process may open
    raw = Raw(path)
    results = []
    for _ in range(3):
        response, fds = raw.call(attach=local_pb2.AttachRequest(
            name=name, mode="r", fetch="lazy", fault_support=local_pb2.FAULT_SUPPORT_USERFAULTFD))
        for fd in fds:
            os.close(fd)
        assert response.attach.fetch == local_pb2.FETCH_MODE_LAZY, response
        uffd = _native.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
        _native.uffd_api(uffd)
        register = local_pb2.RegisterFaultsRequest(
            attachment_id=response.attach.attachment_id, address=1 << 40, size=size)
        results.append(outcome(lambda: raw.call([uffd], register_faults=register)))
        os.close(uffd)
    say(results=results)
"""


@pytest.mark.skipif(not userfaultfd_available(), reason="userfaultfd with shmem faults unavailable")
def test_userfaultfds_past_the_limit_are_refused_per_uid(limited, nobody):
    home, node = limited.nodes
    with vas.connect(home.socket) as creator, vas.connect(node.socket) as root:
        creator.create("faults/uffd", 64 * PAGE, mode=0o644)
        child = nobody(FAULTER, node.socket, "faults/uffd", str(64 * PAGE))
        message = limit_message(FAULTS, "userfaultfds registered with this agent",
                                "--max-faults-per-uid")
        assert child.line() == {"results": ["ok", "ok", message]}
        # uid 65534 is at its limit; root registers its own lazy mappings.
        mappings = [root.attach("faults/uffd") for _ in range(FAULTS)]
        assert [m.fetch for m in mappings] == ["lazy"] * FAULTS
        assert bytes(mappings[0].buffer[:4]) == b"\0" * 4  # a fault resolved from the home
        for mapping in mappings:
            mapping.detach()
        child.finish()


#: A child's lazy attach, raw, up to the RegisterFaults request it would send.
LAZY_ATTACHED = """
    path, name, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    raw = Raw(path)
    response, fds = raw.call(attach=local_pb2.AttachRequest(
        name=name, mode="r", fetch="lazy", fault_support=local_pb2.FAULT_SUPPORT_USERFAULTFD))
    for fd in fds:
        os.close(fd)
    register = local_pb2.RegisterFaultsRequest(
        attachment_id=response.attach.attachment_id, address=1 << 40, size=size)
"""

PIPER = LAZY_ATTACHED + """
    read_end, write_end = os.pipe()
    os.close(write_end)                          # ready forever: POLLHUP
    result = outcome(lambda: raw.call([read_end], register_faults=register))
    say(result=result)
    sys.stdin.readline()
"""


def test_a_pipe_is_no_userfaultfd_and_costs_no_cpu(limited, nobody):
    home, node = limited.nodes
    with vas.connect(home.socket) as creator:
        creator.create("faults/pipe", 64 * PAGE, mode=0o644)
        child = nobody(PIPER, node.socket, "faults/pipe", str(64 * PAGE))
        assert child.line() == {
            "result": "InvalidArgument: RegisterFaults needs a userfaultfd, not a pipe"}
        before = agent_cpu_seconds(node.pid)
        time.sleep(3.0)  # the window measured (a spinning resolver would burn all of it)
        spent = agent_cpu_seconds(node.pid) - before
        assert spent < 0.5, f"the agent used {spent:.2f} s of CPU in 3 s"
        child.send()
        child.finish()
    print(f"agent CPU over 3 s after the pipe: {spent:.2f} s")


BLOCKING = LAZY_ATTACHED + """
    import fcntl
    from vas import _native
    uffd = _native.userfaultfd(os.O_CLOEXEC | 1)  # blocking; UFFD_USER_MODE_ONLY
    _native.uffd_api(uffd)
    result = outcome(lambda: raw.call([uffd], register_faults=register))
    say(result=result, nonblocking=bool(fcntl.fcntl(uffd, fcntl.F_GETFL) & os.O_NONBLOCK))
"""


@pytest.mark.skipif(not userfaultfd_available(), reason="userfaultfd with shmem faults unavailable")
def test_a_blocking_userfaultfd_is_made_non_blocking(limited, nobody):
    """The resolver that polls reads one fault after the poll: a blocking read of a fault
    gone meanwhile would stop every lazy mapping of the agent behind it. The agent sets
    O_NONBLOCK on the open file, which the client shares (and sees)."""
    home, node = limited.nodes
    with vas.connect(home.socket) as creator:
        creator.create("faults/blocking", 64 * PAGE, mode=0o644)
        child = nobody(BLOCKING, node.socket, "faults/blocking", str(64 * PAGE))
        assert child.line() == {"result": "ok", "nonblocking": True}
        child.finish()


WAITER = """
    path, name, count, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    raws = [Raw(path) for _ in range(count)]
    attachments = [raw.call(attach=local_pb2.AttachRequest(name=name, mode="r"))
                   for raw in raws]
    for _, fds in attachments:
        for fd in fds:
            os.close(fd)
    start = time.monotonic()
    ids = [raw.send(wait=local_pb2.WaitRequest(
               attachment_id=response.attach.attachment_id, version=10**9,
               timeout_seconds=seconds))
           for raw, (response, _) in zip(raws, attachments)]
    say(waiting=count)
    for raw, request_id in zip(raws, ids):
        raw.answer(request_id)
    say(seconds=time.monotonic() - start)
"""


def test_a_uid_at_its_request_quota_does_not_delay_another(limited, nobody):
    """5 Waits of 1.5 s as uid 65534, at most 2 at once (4 workers - 2): >= 4.5 s in
    all, while root attaches and detaches within ROOT_DEADLINE throughout."""
    node = limited.nodes[0]
    per_uid, waits, seconds = WORKERS - 2, ATTACHMENTS, 1.5
    with vas.connect(node.socket) as root:
        root.create("faults/wait", PAGE, mode=0o644)
        child = nobody(WAITER, node.socket, "faults/wait", str(waits), str(seconds))
        assert child.line() == {"waiting": waits}
        rounds, _ = serve_root_while(child, node.pid, lambda: root_round(root, "faults/wait"))
        elapsed = child.line()["seconds"]
        child.finish()
    assert elapsed >= -(-waits // per_uid) * seconds - 0.1, elapsed  # the quota held
    assert rounds and max(rounds) < ROOT_DEADLINE, max(rounds, default=None)
    print(f"{waits} Waits of {seconds} s took {elapsed:.2f} s; root: {len(rounds)} "
          f"attach+detach rounds meanwhile, the slowest {max(rounds):.3f} s")


RECONNECTING_WRITER = """
    path, name = sys.argv[1], sys.argv[2]
    kept, refused = [], None
    for _ in range(ATTACHMENTS + 1):    # each round: a new connection, "rw", then EOF
        client = vas.connect(path)
        deadline = time.monotonic() + 30
        while True:
            try:
                kept.append(client.attach(name, "rw"))
                break
            except vas.Busy:            # the agent has not handled the last EOF yet
                assert time.monotonic() < deadline, "the lock of a closed connection stayed"
                time.sleep(0.02)
            except vas.CapacityExceeded as exc:
                refused = f"CapacityExceeded: {exc}"
                break
        if refused:
            break
        client.close()                  # revoked, not unmapped: the agent keeps its guard
    say(kept=len(kept), refused=refused)
    sys.stdin.readline()
"""

AGAIN = """
    path, name = sys.argv[1], sys.argv[2]
    client = vas.connect(path)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.attach(name, "rw").detach()
            break
        except (vas.CapacityExceeded, vas.Busy):
            assert time.monotonic() < deadline, "the kept guards of an exited process stayed"
            time.sleep(0.05)
    say(done=True)
"""


def test_revoked_home_writers_kept_by_their_process_count_as_its_attachments(limited, nobody):
    """A process that reconnects, attaches "rw" and closes its connection keeps each
    mapping (write-protected; the agent keeps its userfaultfd and pidfd until the
    process exits): those count against the uid until then, so it cannot pile up
    fds in the agent; after it exits they come back."""
    node = limited.nodes[0]
    with vas.connect(node.socket) as root:
        root.create("faults/keep", PAGE, mode=0o666)
    child = nobody(RECONNECTING_WRITER.replace("ATTACHMENTS", str(ATTACHMENTS)), node.socket,
                   "faults/keep")
    assert child.line() == {"kept": ATTACHMENTS, "refused": limit_message(
        ATTACHMENTS, "attachments on this agent", "--max-attachments-per-uid")}
    child.send()
    child.finish()
    again = nobody(AGAIN, node.socket, "faults/keep")
    assert again.line() == {"done": True}
    again.finish()
