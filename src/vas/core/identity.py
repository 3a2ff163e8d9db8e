"""Who is calling over TCP: a ``Peer`` read from the certificate the TLS handshake verified.

A certificate names its holder with one URI SAN (vas.core.certs makes them):

    vas://node/<node-id>      an agent: vouches for the uid/gid of its local callers
                              (SO_PEERCRED), and may act as node <node-id> only
    vas://coordinator         a coordinator: tells agents that a record changed
    vas://user/<uid>/<gid>    a user or admin client: acts as that uid/gid (0 = root)
                              whatever Caller it sends

Without TLS the daemons listen on loopback only (vas.core.tls.check_listen) and the
peer is ``LOOPBACK``: the machine is trusted, as the local socket's callers are,
and a request's Caller is believed as before. The servicers ask the Peer the
questions here (``caller``, ``require_node``, ...) before any domain call; the mode
bits themselves are checked by the domain code against the record.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from vas.core.errors import PermissionDenied
from vas.proto import types_pb2

if TYPE_CHECKING:
    # cryptography is imported where a certificate is read: a plaintext daemon never
    # needs it, and its import costs ~0.1 s of CPU at every start.
    from cryptography import x509

_SCHEME = "vas://"


class PeerKind(enum.Enum):
    LOOPBACK = "loopback"         # no TLS: a loopback-only cluster trusts the machine
    NODE = "node"
    COORDINATOR = "coordinator"
    USER = "user"


@dataclass(frozen=True)
class Peer:
    """The authenticated holder of a connection. ``name`` is the node id of a NODE,
    ``uid``/``gid`` those of a USER."""

    kind: PeerKind
    name: str = ""
    uid: int = -1
    gid: int = -1

    def __str__(self) -> str:
        if self.kind is PeerKind.NODE:
            return f"node {self.name}"
        if self.kind is PeerKind.USER:
            return f"user {self.uid}:{self.gid}"
        return self.kind.value

    @property
    def vouches(self) -> bool:
        """Whether this peer's Callers are believed (an agent, or anyone without TLS)."""
        return self.kind in (PeerKind.NODE, PeerKind.LOOPBACK)

    def caller(self, sent: types_pb2.Caller) -> types_pb2.Caller:
        """The Caller a request acts as: ``sent`` from an agent (which vouches for it; a
        home forwards a remote writer's, so ``sent.node`` may name another agent), the
        certificate's uid/gid from a user, refused from anyone else."""
        if self.vouches:
            return sent
        if self.kind is PeerKind.USER:
            return types_pb2.Caller(uid=self.uid, gid=self.gid)
        raise PermissionDenied(f"permission denied: {self} acts for no user")

    def require_node(self, node_id: str, what: str) -> None:
        """PermissionDenied unless this peer may act as node ``node_id``."""
        if self.kind is PeerKind.LOOPBACK or (self.kind is PeerKind.NODE
                                               and self.name == node_id):
            return
        raise PermissionDenied(f"permission denied: {self} may not {what} as node {node_id}")

    def require(self, kinds: tuple[PeerKind, ...], what: str) -> None:
        """PermissionDenied unless this peer is of one of ``kinds`` (LOOPBACK always is)."""
        if self.kind is not PeerKind.LOOPBACK and self.kind not in kinds:
            raise PermissionDenied(f"permission denied: {self} may not {what}")


LOOPBACK = Peer(PeerKind.LOOPBACK)


def peer_of_context(context: grpc.ServicerContext) -> Peer:
    """The Peer of a gRPC call: LOOPBACK on a plaintext port, else from the client
    certificate the handshake verified (the server requires one)."""
    pem = context.auth_context().get("x509_pem_cert")
    if not pem:
        return LOOPBACK
    return peer_of_pem(pem[0])


@functools.lru_cache(maxsize=1024)
def peer_of_pem(pem: bytes) -> Peer:
    """The Peer a PEM certificate names (PermissionDenied if none). Cached: every call
    of a connection presents the same certificate, parsed once."""
    from cryptography import x509

    return peer_of_cert(x509.load_pem_x509_certificate(pem))


def peer_of_der(der: bytes | None) -> Peer:
    """The Peer of a TLS socket's ``getpeercert(binary_form=True)``; LOOPBACK if plaintext
    (None)."""
    if der is None:
        return LOOPBACK
    from cryptography import x509

    return peer_of_cert(x509.load_der_x509_certificate(der))


def peer_of_cert(cert: x509.Certificate) -> Peer:
    """The Peer a verified certificate names; PermissionDenied if it names none."""
    from cryptography import x509

    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
                if u.startswith(_SCHEME)]
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise PermissionDenied(f"permission denied: certificate {cert.subject.rfc4514_string()} "
                               "names no vas identity (one URI SAN vas://...)")
    return parse_uri(uris[0])


def parse_uri(uri: str) -> Peer:
    """The Peer of a vas:// URI.

    >>> parse_uri("vas://user/65534/65534")
    Peer(kind=<PeerKind.USER: 'user'>, name='', uid=65534, gid=65534)
    """
    parts = uri[len(_SCHEME):].split("/")
    if parts == ["coordinator"]:
        return Peer(PeerKind.COORDINATOR)
    if len(parts) == 2 and parts[0] == "node" and parts[1]:
        return Peer(PeerKind.NODE, name=parts[1])
    if len(parts) == 3 and parts[0] == "user" and all(p.isdigit() for p in parts[1:]):
        return Peer(PeerKind.USER, uid=int(parts[1]), gid=int(parts[2]))
    raise PermissionDenied(f"permission denied: unknown vas identity {uri!r}")
