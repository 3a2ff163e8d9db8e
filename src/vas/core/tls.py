"""Mutual TLS for every TCP hop: one ``TlsConfig`` (certificate, key, CA) and what is built from it.

gRPC servers get credentials that require a client certificate signed by the CA
(``require_client_auth``), so a peer without one is refused in the handshake,
before any request is read; channels present their own certificate. The bulk
channel (node/bulk.py) wraps its sockets with the ``ssl.SSLContext``s made here
under the same rule. Without a TlsConfig everything stays plaintext, and the
daemons then only bind loopback addresses unless told ``--insecure``
(``check_listen``).

Servers are checked by fixed names rather than by their addresses
(``grpc.ssl_target_name_override`` / ``server_hostname``): an agent is dialled
at whatever its peers find in its node record (an IP in a netns, a hostname, a
wildcard listen's hostname) and a coordinator through an ``ipv4:a,b`` list, so
certificates could not name every address ahead of time. Every agent
certificate carries the DNS name ``node.vas``, every coordinator one
``coordinator.vas`` (vas.core.certs), and a client checks the one it expects:
an agent certificate cannot pose as a coordinator. Which agent answered is
told by its URI SAN (vas.core.identity), on the serving side.

    tls = TlsConfig.load("node.pem", "node-key.pem", "ca.pem")
    channel = open_channel("10.0.0.2:7301", tls, NODE_HOST)
"""
from __future__ import annotations

import functools
import ipaddress
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

    import grpc

# grpc and ssl are imported where used: every vasctl command loads this module for its
# --tls-* options, and one talking to its local agent needs neither (grpc was about a third
# of its start-up CPU). The names, not vas.core.certs: that module loads cryptography
# (~0.1 s of CPU), which only the making of certificates needs, not every vasctl command.
from vas.core.defaults import COORDINATOR_HOST, NODE_HOST
from vas.core.errors import InvalidArgument

__all__ = ["TlsConfig", "COORDINATOR_HOST", "NODE_HOST", "open_channel", "add_port",
           "check_listen", "is_loopback"]

#: (flag, environment variable) of each file, in TlsConfig field order.
FLAGS = (("--tls-cert", "VAS_TLS_CERT"), ("--tls-key", "VAS_TLS_KEY"),
         ("--tls-ca", "VAS_TLS_CA"))


@dataclass(frozen=True)
class TlsConfig:
    """PEM files: this process's certificate and key, and the CA its peers' must chain to.

    :param cert: certificate (chain) file.
    :param key: unencrypted private key file of ``cert``.
    :param ca: CA certificate(s) that sign every peer's certificate.
    """

    cert: str
    key: str
    ca: str

    @classmethod
    def load(cls, cert: str | None, key: str | None, ca: str | None,
             flags: tuple[tuple[str, str], ...] = FLAGS) -> "TlsConfig | None":
        """A checked TlsConfig from three paths, or None when none is given.

        Raises InvalidArgument naming the flag when only some are given, when a file
        cannot be read, or when the key does not match the certificate.
        """
        paths = (cert, key, ca)
        if not any(paths):
            return None
        missing = [f"{flag} (${env})" for (flag, env), path in zip(flags, paths) if not path]
        if missing:
            given = " ".join(flag for (flag, _), path in zip(flags, paths) if path)
            raise InvalidArgument(f"{given} given without {' and '.join(missing)}: the TLS "
                                  "certificate, key and CA go together")
        for (flag, _), path in zip(flags, paths):
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise InvalidArgument(f"cannot read {flag} {path}: {exc.strerror}") from exc
        import ssl

        config = cls(*(os.path.abspath(p) for p in paths))
        try:
            config.server_context()  # parses all three, checks the key against the cert
        except ssl.SSLError as exc:
            raise InvalidArgument(f"bad TLS files {flags[0][0]} {cert} {flags[1][0]} {key} "
                                  f"{flags[2][0]} {ca}: {exc.reason or exc}") from exc
        return config

    @functools.cached_property
    def _pem(self) -> tuple[bytes, bytes, bytes]:
        with open(self.cert, "rb") as c, open(self.key, "rb") as k, open(self.ca, "rb") as a:
            return c.read(), k.read(), a.read()

    def server_credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials that refuse clients without a certificate from the CA."""
        import grpc

        cert, key, ca = self._pem
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=True)

    @functools.cached_property
    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials: this certificate, servers checked against the CA."""
        import grpc

        cert, key, ca = self._pem
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                            certificate_chain=cert)

    def server_context(self) -> ssl.SSLContext:
        """A server-side context that requires a client certificate from the CA."""
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        context.load_verify_locations(self.ca)
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client-side context: presents this certificate, checks the server's (name
        included: pass ``server_hostname=NODE_HOST`` when wrapping)."""
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        context.load_verify_locations(self.ca)
        return context

    def env(self) -> dict[str, str]:
        """The VAS_TLS_* variables naming these files."""
        return {env: path for (_, env), path in zip(FLAGS, (self.cert, self.key, self.ca))}

    def flags(self) -> list[str]:
        """The --tls-* flags naming these files."""
        return [part for (flag, _), path in zip(FLAGS, (self.cert, self.key, self.ca))
                for part in (flag, path)]


def open_channel(target: str, tls: TlsConfig | None, server_name: str,
                 options: list | tuple = ()) -> grpc.Channel:
    """A gRPC channel to ``target``: mutual TLS checking the server as ``server_name``
    (COORDINATOR_HOST or NODE_HOST) when ``tls`` is given, else plaintext."""
    import grpc

    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.channel_credentials,
                               options=[*options, ("grpc.ssl_target_name_override", server_name)])


def add_port(server: grpc.Server, address: str, tls: TlsConfig | None) -> int:
    """Bind ``address`` on ``server`` (mutual TLS when ``tls`` is given); the port, 0 if
    it could not be bound."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP literal, maybe in brackets, or a name) is a loopback address."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(address: str, tls: TlsConfig | None, insecure: bool) -> None:
    """InvalidArgument when ``address`` (host:port) is not loopback and there is neither
    TLS nor ``insecure``: plaintext ports would trust everyone who can reach them."""
    host = address.rpartition(":")[0]
    if tls is None and not insecure and not is_loopback(host):
        raise InvalidArgument(
            f"refusing to listen on {address} without TLS: anyone who reaches it could act as "
            "any user; give --tls-cert/--tls-key/--tls-ca, or --insecure to serve a trusted "
            "network in the clear")
