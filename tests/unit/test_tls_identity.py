"""vas.core.tls and vas.core.identity without a cluster: file checks, the loopback rule,
certificate names and who may act as whom."""
from __future__ import annotations

import re

import pytest
from cryptography import x509

from vas.core import certs
from vas.core.errors import InvalidArgument, PermissionDenied
from vas.core.identity import LOOPBACK, Peer, PeerKind, parse_uri, peer_of_cert
from vas.core.tls import TlsConfig, check_listen, is_loopback
from vas.proto import types_pb2


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("ca"))
    return certs.make_ca(directory), directory


def load_cert(path: str) -> x509.Certificate:
    with open(path, "rb") as pem:
        return x509.load_pem_x509_certificate(pem.read())


def test_tls_files_go_by_three_and_must_be_usable(ca, tmp_path):
    authority, directory = ca
    cert, key = certs.issue(authority, directory, "n1", certs.node_identity("n1"))
    assert TlsConfig.load(None, None, None) is None
    assert TlsConfig.load(cert, key, authority.cert_path).cert == cert
    with pytest.raises(InvalidArgument, match=r"--tls-cert given without --tls-key "
                                              r"\(\$VAS_TLS_KEY\) and --tls-ca"):
        TlsConfig.load(cert, None, None)
    with pytest.raises(InvalidArgument, match=f"cannot read --tls-ca {tmp_path}/none.pem: "
                                              "No such file or directory"):
        TlsConfig.load(cert, key, str(tmp_path / "none.pem"))
    _, other_key = certs.issue(authority, directory, "n2", certs.node_identity("n2"))
    with pytest.raises(InvalidArgument, match="bad TLS files"):
        TlsConfig.load(cert, other_key, authority.cert_path)  # the key of another certificate


def test_plaintext_listens_on_loopback_only():
    for host in ("127.0.0.1", "127.3.4.5", "localhost", "[::1]"):
        assert is_loopback(host)
        check_listen(f"{host}:0", None, insecure=False)
    for address in ("0.0.0.0:7300", ":7300", "10.0.0.1:0", "node-a:7400", "[::]:0"):
        with pytest.raises(InvalidArgument, match=f"refusing to listen on {re.escape(address)} "
                                                  "without TLS.*or --insecure"):
            check_listen(address, None, insecure=False)
        check_listen(address, None, insecure=True)


def test_certificates_name_their_holders(ca):
    authority, directory = ca
    cases = [(certs.node_identity("worker-17"), Peer(PeerKind.NODE, name="worker-17")),
             (certs.coordinator_identity(), Peer(PeerKind.COORDINATOR)),
             (certs.user_identity(65534, 100), Peer(PeerKind.USER, uid=65534, gid=100))]
    for identity, peer in cases:
        cert, _ = certs.issue(authority, directory, f"c{len(identity.common_name)}", identity)
        assert peer_of_cert(load_cert(cert)) == peer
    etcd, _ = certs.issue(authority, directory, "etcd", certs.etcd_identity())
    with pytest.raises(PermissionDenied, match="names no vas identity"):
        peer_of_cert(load_cert(etcd))
    for bad in ("vas://node/", "vas://user/1", "vas://user/a/b", "vas://admin"):
        with pytest.raises(PermissionDenied, match="unknown vas identity"):
            parse_uri(bad)


def test_who_a_request_acts_as():
    forged = types_pb2.Caller(uid=0, gid=0, node="node1")
    node1, node2 = Peer(PeerKind.NODE, name="node1"), Peer(PeerKind.NODE, name="node2")
    user = Peer(PeerKind.USER, uid=65534, gid=65534)
    assert LOOPBACK.caller(forged) == forged and node1.caller(forged) == forged
    assert user.caller(forged) == types_pb2.Caller(uid=65534, gid=65534)
    with pytest.raises(PermissionDenied, match="coordinator acts for no user"):
        Peer(PeerKind.COORDINATOR).caller(forged)
    node1.require_node("node1", "heartbeat")
    LOOPBACK.require_node("node1", "heartbeat")
    for peer in (node2, user):
        with pytest.raises(PermissionDenied, match=f"{peer} may not heartbeat as node node1"):
            peer.require_node("node1", "heartbeat")
    with pytest.raises(PermissionDenied, match="user 65534:65534 may not release a segment"):
        user.require((PeerKind.NODE,), "release a segment")
