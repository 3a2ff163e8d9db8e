"""vas.node.bulk_tls: mutual TLS over memory BIOs on a real socket pair."""
import hashlib
import os
import socket
import ssl
import threading

import pytest

from vas.core import certs
from vas.core.tls import NODE_HOST, TlsConfig
from vas.node.bulk_tls import TlsConnection


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("certs"))
    ca = certs.make_ca(directory)
    home = TlsConfig(*certs.issue(ca, directory, "home", certs.node_identity("n1")), ca.cert_path)
    reader = TlsConfig(*certs.issue(ca, directory, "reader", certs.node_identity("n2")),
                       ca.cert_path)
    return home, reader


def _pair():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=10)
    server, _ = listener.accept()
    listener.close()
    server.settimeout(10)
    return server, client


def _accept_in_thread(server, context, result):
    def run():
        try:
            result["conn"] = TlsConnection.accept(server, context)
        except (OSError, ConnectionError) as exc:
            result["error"] = exc
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_bytes_arrive_whole_and_the_peer_is_named(configs):
    home, reader = configs
    server, client = _pair()
    result = {}
    thread = _accept_in_thread(server, home.server_context(), result)
    conn = TlsConnection.connect(client, reader.client_context(), NODE_HOST)
    thread.join(10)
    served = result["conn"]
    try:
        assert served.getpeercert(binary_form=True)  # the reader's certificate, for identity
        payload = os.urandom(5 << 20 | 123)  # many records, an odd tail
        sender = threading.Thread(target=served.sendall, args=(memoryview(payload),))
        sender.start()
        received = bytearray(len(payload))
        with memoryview(received) as view:
            done = 0
            while done < len(payload):
                got = conn.recv_into(view[done:])
                assert got > 0
                done += got
        sender.join(10)
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        conn.sendall(b"request")
        assert served.recv(7) == b"request"
        served.close()
        assert conn.recv_into(bytearray(16)) == 0  # the peer went away: end of stream
    finally:
        conn.close()
        served.close()


def test_a_client_without_a_certificate_is_refused(configs):
    home, _ = configs
    server, client = _pair()
    result = {}
    thread = _accept_in_thread(server, home.server_context(), result)
    stranger = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    stranger.check_hostname = False
    stranger.verify_mode = ssl.CERT_NONE
    try:
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED|certificate required"):
            conn = TlsConnection.connect(client, stranger, NODE_HOST)
            conn.recv(1)  # TLS 1.3: the server's alert arrives after the client's handshake
        thread.join(10)
        assert isinstance(result.get("error"), ssl.SSLError)
    finally:
        client.close()
        server.close()
