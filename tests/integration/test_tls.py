"""Mutual TLS and identity end to end, on one real 2-node cluster with its own etcd
behind TLS (``LocalCluster(tls=True)``), attacked the way issue 10 found it open.

Strangers (no certificate, or one from another CA) are refused on every TCP port
before a byte of segment data; a node certificate acts only as its node; a user
certificate acts only as the uid/gid it names, whatever Caller it sends, and is
held to the segment's mode bits on every path (ReadPages, OpenBulk, the bulk
channel, ChunkHashes, WritePages, the coordinator's metadata calls), as is a
uid 65534 process attaching through its own agent. Every call has a deadline.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import textwrap

import grpc
import numpy as np
from etcd3 import etcdrpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import vas
from waiting import wait_for
from vas.cluster import ClusterCerts, LaunchError, LocalCluster, NodeProcess
from vas.core.tls import COORDINATOR_HOST, NODE_HOST, TlsConfig, open_channel
from vas.node import bulk
from vas.proto import coordinator_pb2 as cpb
from vas.proto import coordinator_pb2_grpc, node_pb2, node_pb2_grpc, types_pb2

NOBODY = 65534
SIZE = 8 << 20          # above the small-fetch size: an eager attach uses the bulk channel
DEADLINE = 10.0         # seconds, every gRPC call and socket wait


@pytest.fixture(scope="module")
def tls_cluster(module_dir):
    """A 2-node cluster, mutual TLS everywhere; a 0600 segment "secret" of root's homed
    on node1 with random bytes; certificates of a stranger CA in ``.strangers``."""
    with LocalCluster(module_dir, nodes=2, memory=256 << 20, tls=True) as cluster:
        with vas.connect(cluster.nodes[0].socket) as client:
            client.create("secret", SIZE, mode=0o600)
            with client.attach("secret", "rw") as mapping:
                words = mapping.ndarray(np.uint8)
                words[:] = np.random.default_rng(10).integers(0, 256, SIZE, dtype=np.uint8)
                del words
                cluster.secret = bytes(mapping.buffer)
        cluster.secret_info = coordinator(cluster, cluster.certs.admin).GetSegment(
            cpb.GetSegmentRequest(name="secret"), timeout=DEADLINE)
        cluster.nobody = cluster.certs.user(NOBODY, NOBODY)
        cluster.strangers = ClusterCerts(os.path.join(module_dir, "strangers"))
        yield cluster


def coordinator(cluster, tls: TlsConfig) -> coordinator_pb2_grpc.CoordinatorStub:
    return coordinator_pb2_grpc.CoordinatorStub(
        open_channel(cluster.coordinators[0].address, tls, COORDINATOR_HOST))


def node(address: str, tls: TlsConfig) -> node_pb2_grpc.NodeStub:
    return node_pb2_grpc.NodeStub(open_channel(address, tls, NODE_HOST))


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


def bulk_address(cluster) -> tuple[str, int]:
    opened = node(cluster.nodes[0].address, cluster.certs.admin).OpenBulk(
        node_pb2.OpenBulkRequest(name="secret", id=cluster.secret_info.id), timeout=DEADLINE)
    host, _, port = opened.address.rpartition(":")
    return host, int(port)


def bulk_request(cluster) -> bytes:
    return struct.pack("<8sQQQ", bulk.MAGIC, cluster.secret_info.id, 0, 4096)


def bulk_write(cluster, tls: TlsConfig, header: node_pb2.WritePagesHeader,
               data: bytes) -> tuple[int, bytes]:
    """A write request of ``data`` at offset 0 sent by hand over mutual TLS with ``tls``'s
    certificate: (status value, message) of the reply."""
    blob = header.SerializeToString()
    with socket.create_connection(bulk_address(cluster), timeout=DEADLINE) as raw, \
            tls.client_context().wrap_socket(raw, server_hostname=NODE_HOST) as conn:
        conn.sendall(struct.pack("<8sQQQ", bulk.WRITE_MAGIC, header.id, len(blob), 1) + blob
                     + struct.pack("<QQ", 0, len(data)) + data)
        conn.settimeout(DEADLINE)
        magic, code, size = struct.unpack("<8sIQ", recv_exact(conn, 20))
        assert magic == bulk.MAGIC
        return code, recv_exact(conn, size)


def drain(conn) -> bytes:
    """Every byte ``conn`` yields until it closes, errs or idles for DEADLINE."""
    got = b""
    conn.settimeout(DEADLINE)
    try:
        while chunk := conn.recv(65536):
            got += chunk
    except (OSError, ssl.SSLError):
        pass
    return got


def recv_exact(conn, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        assert chunk, f"closed after {len(data)} of {size} bytes"
        data += chunk
    return data


def as_nobody(socket_path: str, code: str) -> dict:
    """Run ``code`` (it prints one JSON line) as uid/gid 65534 after importing vas; the line."""
    prelude = textwrap.dedent(f"""
        import json, sys, vas, vas.client   # everything imported before the drop
        from vas.core import errors
        import os; os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        def outcome(call):
            try:
                return {{"ok": call()}}
            except errors.VasError as exc:
                return {{"error": type(exc).__name__, "message": str(exc)}}
        """)
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), socket_path],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tls_cluster_reads_across_nodes(tls_cluster):
    """Eager (bulk channel) and lazy attaches on node2 and an admin's ReadPages at the
    home see root's bytes; the admin exports name the admin certificate."""
    digest = hashlib.sha256(tls_cluster.secret).hexdigest()
    with vas.connect(tls_cluster.nodes[1].socket) as client:
        for fetch in ("eager", "lazy"):
            with client.attach("secret", fetch=fetch) as mapping:
                assert hashlib.sha256(mapping.buffer).hexdigest() == digest, fetch
    chunks = node(tls_cluster.nodes[0].address, tls_cluster.certs.admin).ReadPages(
        node_pb2.ReadPagesRequest(name="secret", id=tls_cluster.secret_info.id, offset=0,
                                  length=SIZE), timeout=DEADLINE)
    assert hashlib.sha256(b"".join(c.data for c in chunks)).hexdigest() == digest
    assert tls_cluster.env()["VAS_TLS_CERT"] == tls_cluster.certs.admin.cert
    with open(tls_cluster.nodes[1].log_path) as log:
        assert "using ReadPages" not in log.read()  # the eager copy came over the bulk channel


@pytest.mark.parametrize("who", ["plaintext", "no certificate", "another CA"])
def test_stranger_is_refused_on_every_port(tls_cluster, who):
    """Coordinator gRPC, agent gRPC, the bulk port and etcd refuse the stranger in the
    handshake: gRPC calls fail UNAVAILABLE, the bulk socket closes without a byte of data."""
    certs = tls_cluster.certs
    etcd_target = tls_cluster.etcd_url.split("://", 1)[1]
    if who == "plaintext":
        channels = [grpc.insecure_channel(a) for a in
                    (tls_cluster.coordinators[0].address, tls_cluster.nodes[0].address)]
        etcd = grpc.insecure_channel(etcd_target)
    else:
        creds = (grpc.ssl_channel_credentials(open(certs.ca.cert_path, "rb").read())
                 if who == "no certificate" else tls_cluster.strangers.admin.channel_credentials)
        if who == "another CA":  # trusts our CA, so only its own certificate is at fault
            stranger = tls_cluster.strangers.admin
            creds = grpc.ssl_channel_credentials(open(certs.ca.cert_path, "rb").read(),
                                                 open(stranger.key, "rb").read(),
                                                 open(stranger.cert, "rb").read())
        channels = [grpc.secure_channel(address, creds, options=[
            ("grpc.ssl_target_name_override", name)]) for address, name in
            ((tls_cluster.coordinators[0].address, COORDINATOR_HOST),
             (tls_cluster.nodes[0].address, NODE_HOST))]
        etcd = grpc.secure_channel(etcd_target, creds)
    with etcd:
        assert code_of(lambda: etcdrpc.KVStub(etcd).Range(etcdrpc.RangeRequest(key=b"/vas/"),
                                                          timeout=DEADLINE)) \
            == grpc.StatusCode.UNAVAILABLE
    for channel in channels:
        with channel:
            status = code_of(lambda: health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=DEADLINE))
            assert status == grpc.StatusCode.UNAVAILABLE
            if channel is channels[1]:
                status = code_of(lambda: next(node_pb2_grpc.NodeStub(channel).ReadPages(
                    node_pb2.ReadPagesRequest(name="secret", id=tls_cluster.secret_info.id,
                                              length=4096), timeout=DEADLINE)))
                assert status == grpc.StatusCode.UNAVAILABLE

    with socket.create_connection(bulk_address(tls_cluster), timeout=DEADLINE) as raw:
        if who == "plaintext":
            raw.sendall(bulk_request(tls_cluster))
            got = drain(raw)
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(certs.ca.cert_path)
            if who == "another CA":
                context.load_cert_chain(tls_cluster.strangers.admin.cert,
                                        tls_cluster.strangers.admin.key)
            got = b""
            try:
                with context.wrap_socket(raw, server_hostname=NODE_HOST) as conn:
                    conn.sendall(bulk_request(tls_cluster))  # TLS 1.3: refused after this
                    got = drain(conn)
            except (OSError, ssl.SSLError):
                pass
    assert bulk.MAGIC not in got and tls_cluster.secret[:4096] not in got


def test_node_certificate_acts_only_as_its_node(tls_cluster, module_dir):
    """node2's certificate cannot register, heartbeat, deregister, report for node1, nor
    create a segment homed there or take a writer lock as node1; an agent whose --id is
    not its certificate's does not start."""
    stub = coordinator(tls_cluster, tls_cluster.certs.node("node2"))
    fake = types_pb2.NodeInfo(id="node1", address="127.0.0.1:1", memory_total=1 << 30)
    calls = [
        lambda: stub.RegisterNode(cpb.RegisterNodeRequest(node=fake, ttl_seconds=10),
                                  timeout=DEADLINE),
        lambda: stub.Heartbeat(cpb.HeartbeatRequest(node_id="node1", lease_id=1),
                               timeout=DEADLINE),
        lambda: stub.DeregisterNode(cpb.DeregisterNodeRequest(node_id="node1", lease_id=1),
                                    timeout=DEADLINE),
        lambda: stub.ReportAttachments(cpb.ReportAttachmentsRequest(node_id="node1",
                                                                    lease_id=1),
                                       timeout=DEADLINE),
        lambda: stub.CreateSegment(cpb.CreateSegmentRequest(
            caller=types_pb2.Caller(node="node1"), name="planted", size=4096, mode=0o644,
            home="node1", lease_id=1), timeout=DEADLINE),
        lambda: stub.AcquireWriter(cpb.AcquireWriterRequest(
            caller=types_pb2.Caller(uid=0, node="node1"), name="secret"), timeout=DEADLINE),
    ]
    for call in calls:
        assert code_of(call) == grpc.StatusCode.PERMISSION_DENIED
    admin = coordinator(tls_cluster, tls_cluster.certs.admin)
    assert code_of(lambda: admin.RegisterNode(cpb.RegisterNodeRequest(node=fake, ttl_seconds=10),
                                              timeout=DEADLINE)) == grpc.StatusCode.PERMISSION_DENIED
    nodes = admin.ListNodes(cpb.ListNodesRequest(), timeout=DEADLINE).nodes
    assert {n.id: n.address for n in nodes}["node1"] == tls_cluster.nodes[0].address

    impostor = NodeProcess(module_dir, tls_cluster.coordinators[0].address, node_id="node3",
                           tls=tls_cluster.certs.node("node2"))
    with pytest.raises(LaunchError, match="differs from the node its certificate"):
        impostor.start(timeout=30)
    impostor.stop()


def test_user_certificate_cannot_touch_roots_0600_segment(tls_cluster):
    """uid 65534's certificate, sending a forged Caller(uid=0), is refused by every path
    to root's 0600 segment, and the segment is unchanged afterwards."""
    info = tls_cluster.secret_info
    home = node(tls_cluster.nodes[0].address, tls_cluster.nobody)
    meta = coordinator(tls_cluster, tls_cluster.nobody)
    root = types_pb2.Caller(uid=0, gid=0, node="node1")
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: next(home.ReadPages(node_pb2.ReadPagesRequest(
        name="secret", id=info.id, length=4096), timeout=DEADLINE))) == denied
    assert code_of(lambda: home.OpenBulk(node_pb2.OpenBulkRequest(name="secret", id=info.id),
                                         timeout=DEADLINE)) == denied
    assert code_of(lambda: home.ChunkHashes(node_pb2.ChunkHashesRequest(
        name="secret", id=info.id, chunk_size=1 << 20), timeout=DEADLINE)) == denied
    assert code_of(lambda: home.ReleaseSegment(node_pb2.ReleaseSegmentRequest(
        name="secret", id=info.id, force=True), timeout=DEADLINE)) == denied
    header = node_pb2.WritePagesHeader(caller=root, name="secret", id=info.id, token=1,
                                       lease_id=1)
    assert code_of(lambda: home.WritePages(iter([node_pb2.WritePagesChunk(
        header=header, offset=0, data=b"x" * 4096)]), timeout=DEADLINE)) == denied
    for call in (
            lambda: meta.SetSegmentMode(cpb.SetSegmentModeRequest(
                caller=root, name="secret", mode=0o666), timeout=DEADLINE),
            lambda: meta.SetSegmentOwner(cpb.SetSegmentOwnerRequest(
                caller=root, name="secret", uid=NOBODY, gid=NOBODY), timeout=DEADLINE),
            lambda: meta.DeleteSegment(cpb.DeleteSegmentRequest(caller=root, name="secret"),
                                       timeout=DEADLINE),
            lambda: meta.AcquireWriter(cpb.AcquireWriterRequest(caller=root, name="secret"),
                                       timeout=DEADLINE)):
        assert code_of(call) == denied

    # The bulk channel: the handshake passes (a certificate from the CA), the request not.
    with socket.create_connection(bulk_address(tls_cluster), timeout=DEADLINE) as raw, \
            tls_cluster.nobody.client_context().wrap_socket(raw, server_hostname=NODE_HOST) as conn:
        conn.sendall(bulk_request(tls_cluster))
        conn.settimeout(DEADLINE)
        magic, code, size = struct.unpack("<8sIQ", recv_exact(conn, 20))
        assert (magic, code) == (bulk.MAGIC, denied.value[0])
        assert b"may not read" in recv_exact(conn, size)
        conn.settimeout(0.3)
        with pytest.raises(TimeoutError):  # no data follows a refusal
            conn.recv(1)
    code, message = bulk_write(tls_cluster, tls_cluster.nobody, header, b"x" * 4096)
    assert code == denied.value[0] and b"may not write" in message, message

    # Through its own agent (node2, where it is not home) as a uid 65534 process.
    seen = as_nobody(tls_cluster.nodes[1].socket, """
        def attach():
            with client.attach("secret", fetch="eager"):
                pass
        with vas.connect(sys.argv[1]) as client:
            print(json.dumps(outcome(attach)))
        """)
    assert seen["error"] == "PermissionDenied", seen

    after = coordinator(tls_cluster, tls_cluster.certs.admin).GetSegment(
        cpb.GetSegmentRequest(name="secret"), timeout=DEADLINE)
    assert (after.mode, after.uid, after.state) == (0o600, 0, info.state)
    with vas.connect(tls_cluster.nodes[0].socket) as client, client.attach("secret") as mapping:
        assert bytes(mapping.buffer) == tls_cluster.secret


def test_user_certificate_acts_as_itself(tls_cluster):
    """A segment uid 65534 owns: its certificate may chmod it whatever Caller it sends;
    the change reaches the home at once (a chmod made straight at the coordinator used to
    leave the home's cached mode stale), and another uid's certificate may not."""
    with vas.connect(tls_cluster.nodes[0].socket) as client:
        client.create("theirs", 4096, mode=0o600)
        client.chown("theirs", NOBODY, NOBODY)
    try:
        meta = coordinator(tls_cluster, tls_cluster.nobody)
        forged = types_pb2.Caller(uid=4242, gid=4242)
        changed = meta.SetSegmentMode(cpb.SetSegmentModeRequest(
            caller=forged, name="theirs", mode=0o640), timeout=DEADLINE)
        assert changed.mode == 0o640
        other = coordinator(tls_cluster, tls_cluster.certs.user(4242, 4242))
        assert code_of(lambda: other.SetSegmentMode(cpb.SetSegmentModeRequest(
            caller=types_pb2.Caller(uid=NOBODY, gid=NOBODY), name="theirs", mode=0o666),
            timeout=DEADLINE)) == grpc.StatusCode.PERMISSION_DENIED

        # root's 0600 segment opened to all straight at the coordinator: the home allows
        # uid 65534's local attach at once; closed again, it refuses it at once.
        admin = coordinator(tls_cluster, tls_cluster.certs.admin)
        attach = """
            def attach():
                with client.attach("secret"):
                    pass
            with vas.connect(sys.argv[1]) as client:
                print(json.dumps(outcome(attach)))
            """
        admin.SetSegmentMode(cpb.SetSegmentModeRequest(
            caller=types_pb2.Caller(), name="secret", mode=0o644), timeout=DEADLINE)
        assert as_nobody(tls_cluster.nodes[0].socket, attach) == {"ok": None}
        admin.SetSegmentMode(cpb.SetSegmentModeRequest(
            caller=types_pb2.Caller(), name="secret", mode=0o600), timeout=DEADLINE)
        assert as_nobody(tls_cluster.nodes[0].socket, attach)["error"] == "PermissionDenied"
    finally:
        with vas.connect(tls_cluster.nodes[0].socket) as client:
            client.delete("theirs")


def test_a_delete_over_grpc_frees_the_home_and_the_replicas_at_once(tls_cluster):
    """A user certificate deletes straight at the coordinator (no agent makes the call):
    the coordinator tells the home and the replica's node itself, over mutual TLS as a
    coordinator (before, the replica held its memory until its node's 30 s re-check)."""
    node1, node2 = tls_cluster.nodes
    with vas.connect(node1.socket) as client:
        client.create("tls/doomed", 4 << 20, mode=0o600)
        client.chown("tls/doomed", NOBODY, NOBODY)
    def held(client) -> int:  # node2's replica bytes (other tests' replicas too)
        (mine,) = [n.replica_bytes for n in client.nodes() if n.id == "node2"]
        return mine

    with vas.connect(node2.socket) as client:
        before = held(client)
        with client.attach("tls/doomed", fetch="eager"):  # root reads it: node2 keeps a copy
            pass
        assert held(client) == before + (4 << 20)
    coordinator(tls_cluster, tls_cluster.nobody).DeleteSegment(cpb.DeleteSegmentRequest(
        caller=types_pb2.Caller(), name="tls/doomed"), timeout=DEADLINE)
    with vas.connect(node2.socket) as client:
        wait_for(lambda: held(client) == before, what="node2 to drop its replica", timeout=3)
    with vas.connect(node1.socket) as client:
        wait_for(lambda: not client.list("tls/doomed"), what="the home to finish the delete",
                 timeout=3)


def test_forged_writer_token_is_refused(tls_cluster):
    """An agent's certificate (trusted to vouch) still cannot write without the current
    writer token: WritePages with a made-up token is fenced and the bytes stay."""
    info = tls_cluster.secret_info
    home = node(tls_cluster.nodes[0].address, tls_cluster.certs.node("node2"))
    header = node_pb2.WritePagesHeader(caller=types_pb2.Caller(uid=0, node="node2"),
                                       name="secret", id=info.id, token=info.version + 12345,
                                       lease_id=7)
    status = code_of(lambda: home.WritePages(iter([node_pb2.WritePagesChunk(
        header=header, offset=0, data=b"x" * 4096)]), timeout=DEADLINE))
    assert status == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = bulk_write(tls_cluster, tls_cluster.certs.node("node2"), header, b"x" * 4096)
    assert code == grpc.StatusCode.FAILED_PRECONDITION.value[0]  # the same over the bulk channel
    with vas.connect(tls_cluster.nodes[0].socket) as client, client.attach("secret") as mapping:
        assert bytes(mapping.buffer[:4096]) == tls_cluster.secret[:4096]


def test_remote_writer_syncs_over_the_bulk_channel_with_mutual_tls(tls_cluster):
    """A writer on node2 syncs 1 MiB of a 4 MiB segment homed on node1: the bytes go over
    the mutual-TLS bulk channel (node2's log) and the home holds them (sha256)."""
    node1, node2 = tls_cluster.nodes
    with vas.connect(node1.socket) as c1, vas.connect(node2.socket) as c2:
        c1.create("tls/bulksync", 4 << 20, mode=0o644)
        with c2.attach("tls/bulksync", "rw") as writer:
            writer.write(1 << 20, os.urandom(1 << 20))
            assert writer.sync() == 1
            expected = hashlib.sha256(writer.buffer).hexdigest()
        with c1.attach("tls/bulksync") as home:
            assert hashlib.sha256(home.buffer).hexdigest() == expected
        c1.delete("tls/bulksync")
    with open(os.path.join(node2.dir, f"{node2.node_id}.log")) as log:
        assert "sync of tls/bulksync: sent 4 changed chunks (1048576 bytes) to node1 over " \
               "the bulk channel" in log.read()


@pytest.mark.parametrize("argv, message", [
    (["node", "serve", "--coordinator", "127.0.0.1:1", "--listen", "0.0.0.0:0"],
     "refusing to listen on 0.0.0.0:0 without TLS"),
    (["coordinator", "serve", "--etcd", "http://127.0.0.1:1", "--listen", "10.1.2.3:0"],
     "refusing to listen on 10.1.2.3:0 without TLS"),
    (["--tls-cert", "/nonexistent.pem", "node", "serve", "--coordinator", "127.0.0.1:1"],
     "given without --tls-key ($VAS_TLS_KEY) and --tls-ca ($VAS_TLS_CA)"),
    (["node", "serve", "--coordinator", "127.0.0.1:1", "--tls-cert", "/nonexistent.pem",
      "--tls-key", "/nonexistent.pem", "--tls-ca", "/nonexistent.pem"],
     "cannot read --tls-cert /nonexistent.pem: No such file or directory"),
])
def test_daemon_flags_refused_with_usage_errors(argv, message):
    """Plaintext on a non-loopback address needs --insecure; TLS files go by three and
    must be readable: one line on stderr, exit status 2, nothing served."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAS_TLS_")}
    done = subprocess.run([sys.executable, "-m", "vas.cli", *argv], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_backups_take_every_version_over_mutual_tls(tls_cluster):
    """replicas=1 under TLS: the home's HoldBackup, StageBackup and CommitBackup reach
    node2 as an agent; node2 holds the bytes (its copy's memory shows in its usage) and
    frees them when the segment is deleted through an agent."""
    node1, node2 = tls_cluster.nodes
    with vas.connect(node1.socket) as client, vas.connect(node2.socket) as on_node2:
        def held() -> int:  # node2's replica and backup bytes, live (other tests' too)
            (mine,) = [n.replica_bytes for n in on_node2.nodes() if n.id == "node2"]
            return mine
        before = held()
        client.create("tls/backed", 1 << 20, replicas=1)
        with client.attach("tls/backed", "rw") as mapping:
            mapping.write(0, b"backed up" * 1000)
            assert mapping.sync() == 1
        info = client.stat("tls/backed")
        assert (info.state, info.copies) == ("ready", ("node2",))
        wait_for(lambda: held() == before + (1 << 20), what="node2's backup in its usage",
                 timeout=5)
        client.delete("tls/backed")
        wait_for(lambda: held() == before, what="node2 to free its backup", timeout=5)


def test_a_relay_serves_agents_over_mutual_tls_and_checks_users(tls_cluster):
    """node2's copy of a 0600 segment is relayed to another agent (a node certificate)
    over mutual TLS, byte for byte, only at its version; a user certificate without
    read bits is refused by the relay as by the home, and the home names relays to
    agents only."""
    data = np.random.default_rng(11).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    with vas.connect(tls_cluster.nodes[0].socket) as client:
        client.create("relayed", SIZE, mode=0o600)
        with client.attach("relayed", "rw") as mapping:
            mapping.write(0, data)
    with vas.connect(tls_cluster.nodes[1].socket) as client, \
            client.attach("relayed", fetch="eager") as mapping:  # node2 fetches: a relay
        assert bytes(mapping.buffer) == data
    info = coordinator(tls_cluster, tls_cluster.certs.admin).GetSegment(
        cpb.GetSegmentRequest(name="relayed"), timeout=DEADLINE)
    request = node_pb2.OpenBulkRequest(name="relayed", id=info.id, relay_address="127.0.0.1:9")
    home = tls_cluster.nodes[0].address
    agent = tls_cluster.certs.node("node9")
    opened = node(home, agent).OpenBulk(request, timeout=DEADLINE)
    assert opened.relay and opened.relay != opened.address
    assert node(home, tls_cluster.certs.admin).OpenBulk(request, timeout=DEADLINE).relay == ""
    host, _, port = opened.relay.rpartition(":")

    def relay_reply(tls: TlsConfig, version: int) -> tuple[int, bytes]:
        with socket.create_connection((host, int(port)), timeout=DEADLINE) as raw, \
                tls.client_context().wrap_socket(raw, server_hostname=NODE_HOST) as conn:
            conn.sendall(struct.pack("<8sQQQQ", bulk.RELAY_MAGIC, info.id, 0, SIZE, version))
            conn.settimeout(DEADLINE)
            magic, code, size = struct.unpack("<8sIQ", recv_exact(conn, 20))
            assert magic == bulk.MAGIC
            message = recv_exact(conn, size)
            return code, recv_exact(conn, SIZE) if code == 0 else message

    assert relay_reply(agent, opened.version) == (0, data)
    code, message = relay_reply(tls_cluster.nobody, opened.version)
    assert code == grpc.StatusCode.PERMISSION_DENIED.value[0] and b"may not read" in message
    code, message = relay_reply(agent, opened.version + 1)
    assert code == grpc.StatusCode.NOT_FOUND.value[0] and b"relays no copy" in message
