"""Certificates for a vas cluster: a CA and the certificates it signs, made with ``cryptography``.

Used by ``vasctl up --tls`` (a throwaway CA in the cluster directory), by the tests,
and by deploy/make-certs.py (a real CA an operator keeps). Every certificate names
its holder with one URI SAN (see vas.core.identity):

    vas://coordinator            a coordinator   + DNS name COORDINATOR_HOST
    vas://node/<node-id>         a node agent     + DNS name NODE_HOST
    vas://user/<uid>/<gid>       a user or admin client (uid 0 = root), no DNS name
    (etcd)                       etcd's own server/client certificate: DNS localhost, IP 127.0.0.1

Servers are checked by those fixed DNS names, not by their addresses (the
channels set ``grpc.ssl_target_name_override``; vas.core.tls says why). Keys are
ECDSA P-256 (small, fast handshakes); files are PEM, keys mode 0600.

    ca = make_ca("/etc/vas/tls")
    issue(ca, "/etc/vas/tls", "node-a", node_identity("node-a"))
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vas.core.defaults import COORDINATOR_HOST, NODE_HOST

#: Default validity of issued certificates and of a CA, days.
DEFAULT_DAYS = 365
DEFAULT_CA_DAYS = 3650


@dataclass(frozen=True)
class Identity:
    """What a certificate says about its holder: a common name, SANs, and whether it serves."""

    common_name: str
    uri: str | None
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    server: bool = False


def coordinator_identity() -> Identity:
    return Identity("vas coordinator", "vas://coordinator", (COORDINATOR_HOST,), server=True)


def node_identity(node_id: str) -> Identity:
    return Identity(f"vas node {node_id}", f"vas://node/{node_id}", (NODE_HOST,), server=True)


def user_identity(uid: int, gid: int) -> Identity:
    return Identity(f"vas user {uid}:{gid}", f"vas://user/{uid}/{gid}")


def etcd_identity() -> Identity:
    """etcd's certificate (server and client): its clients dial it by address."""
    return Identity("etcd", None, ("localhost",), ("127.0.0.1",), server=True)


@dataclass(frozen=True)
class Authority:
    """A CA's certificate and key, and where its certificate file is."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: str


def make_ca(directory: str, name: str = "vas CA", days: int = DEFAULT_CA_DAYS) -> Authority:
    """Make a self-signed CA, written to ``directory``/ca.pem and ca-key.pem."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    os.makedirs(directory, exist_ok=True)
    cert_path = os.path.join(directory, "ca.pem")
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(os.path.join(directory, "ca-key.pem"), _key_pem(key), 0o600)
    return Authority(cert, key, cert_path)


def issue(ca: Authority, directory: str, stem: str, identity: Identity,
          days: int = DEFAULT_DAYS) -> tuple[str, str]:
    """Sign a new key's certificate for ``identity``; (cert path, key path), named
    ``stem``.pem and ``stem``-key.pem in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in identity.dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in identity.ips]
    if identity.uri:
        names.append(x509.UniformResourceIdentifier(identity.uri))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if identity.server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    now = _now()
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                           identity.common_name)]))
               .issuer_name(ca.cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False,
                                            False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    cert_path = os.path.join(directory, f"{stem}.pem")
    key_path = os.path.join(directory, f"{stem}-key.pem")
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(key_path, _key_pem(key), 0o600)
    return cert_path, key_path


def _now() -> datetime.datetime:
    # A minute back: a peer whose clock is slightly behind still accepts a fresh certificate.
    return datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=1)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: str, data: bytes, mode: int) -> None:
    """Write ``data`` to a new ``path`` created with ``mode`` (a key is never readable by others,
    not even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, mode)
