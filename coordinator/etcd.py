"""A thin client of etcd's v3 gRPC API, over the raw stubs of cslab-etcd3 (``etcd3.etcdrpc``).

Why not ``etcd3.client``: its transaction() drops the response header (whose
revision is our segment ids and fencing tokens), and after one UNAVAILABLE it
marks its only endpoint failed for 300 s, so a coordinator would stay broken
long after etcd came back. Here every call goes straight to a stub with a
deadline on one channel that reconnects on its own, and every failure becomes
a VasError: etcd unreachable -> ``Unavailable``; anything else -> ``EtcdError``
(its ``etcd_code`` tells e.g. a lapsed lease, NOT_FOUND, apart).
"""
from __future__ import annotations

import ipaddress
from urllib.parse import urlparse

import grpc
from etcd3 import etcdrpc

from vas.core.errors import InvalidArgument, Unavailable, VasError
from vas.core.tls import TlsConfig

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 16 << 20),
    # Come back quickly after an etcd restart instead of backing off for minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class EtcdError(VasError):
    """etcd refused a request for a reason other than being unreachable."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, etcd_code: grpc.StatusCode):
        super().__init__(message)
        self.etcd_code = etcd_code

    @property
    def lease_missing(self) -> bool:
        """Whether etcd refused because a lease the request names does not exist (it
        expired or was revoked): the only NOT_FOUND of etcd's KV and Lease calls."""
        return self.etcd_code == grpc.StatusCode.NOT_FOUND


def grpc_target(url: str) -> str:
    """The gRPC target of an etcd URL, or of comma-separated URLs of IPv4 literals
    (``http://`` or, for etcd behind TLS, ``https://``; all alike).

    >>> grpc_target("http://127.0.0.1:2379")
    '127.0.0.1:2379'
    >>> grpc_target("http://10.0.0.1:2379,http://10.0.0.2:2379")
    'ipv4:10.0.0.1:2379,10.0.0.2:2379'
    """
    hosts = []
    schemes = set()
    for part in url.split(","):
        parsed = urlparse(part.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise InvalidArgument(f"invalid etcd URL {part!r}: expected http://HOST:PORT "
                                  "(or https:// for etcd behind TLS)")
        schemes.add(parsed.scheme)
        hosts.append(f"{parsed.hostname}:{parsed.port or 2379}")
    if len(schemes) > 1:
        raise InvalidArgument(f"invalid etcd URLs {url!r}: mix http:// and https://")
    if len(hosts) == 1:
        return hosts[0]
    for host in hosts:
        try:
            ipaddress.IPv4Address(host.rsplit(":", 1)[0])
        except ValueError as exc:
            raise InvalidArgument(f"invalid etcd URLs {url!r}: several endpoints must be "
                                  "IPv4 literals") from exc
    return "ipv4:" + ",".join(hosts)


def translate(exc: grpc.RpcError, url: str) -> VasError:
    """The VasError a failed etcd call stands for."""
    code, details = exc.code(), exc.details() or ""
    if code in _UNREACHABLE:
        return Unavailable(f"etcd at {url} is unavailable: {details or code.name}")
    return EtcdError(f"etcd at {url} refused the request: {details or code.name}", code)


# Request builders ------------------------------------------------------------------------

def range_op(key: bytes, end: bytes | None = None, *, keys_only=False, count_only=False,
             limit=0) -> etcdrpc.RequestOp:
    """A txn operation reading ``key`` (or [key, end))."""
    return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(
        key=key, range_end=end or b"", keys_only=keys_only, count_only=count_only, limit=limit))


def put_op(key: bytes, value: bytes, lease: int = 0) -> etcdrpc.RequestOp:
    """A txn operation writing ``key`` (attached to ``lease`` when non-zero)."""
    return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=value, lease=lease))


def delete_op(key: bytes, end: bytes | None = None, *, prev_kv=False) -> etcdrpc.RequestOp:
    """A txn operation deleting ``key`` (or [key, end))."""
    return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(
        key=key, range_end=end or b"", prev_kv=prev_kv))


def absent(key: bytes) -> etcdrpc.Compare:
    """Compare: ``key`` does not exist (create_revision == 0)."""
    return etcdrpc.Compare(key=key, target=etcdrpc.Compare.CREATE,
                           result=etcdrpc.Compare.EQUAL, create_revision=0)


def present(key: bytes) -> etcdrpc.Compare:
    """Compare: ``key`` exists."""
    return etcdrpc.Compare(key=key, target=etcdrpc.Compare.CREATE,
                           result=etcdrpc.Compare.GREATER, create_revision=0)


def created_at(key: bytes, revision: int) -> etcdrpc.Compare:
    """Compare: ``key`` is the incarnation created at ``revision``."""
    return etcdrpc.Compare(key=key, target=etcdrpc.Compare.CREATE,
                           result=etcdrpc.Compare.EQUAL, create_revision=revision)


def unchanged(key: bytes, mod_revision: int) -> etcdrpc.Compare:
    """Compare: ``key`` was last modified at ``mod_revision`` (0 = absent)."""
    return etcdrpc.Compare(key=key, target=etcdrpc.Compare.MOD,
                           result=etcdrpc.Compare.EQUAL, mod_revision=mod_revision)


def leased(key: bytes, lease: int) -> etcdrpc.Compare:
    """Compare: ``key`` is attached to ``lease`` (0 = no lease, or absent)."""
    return etcdrpc.Compare(key=key, target=etcdrpc.Compare.LEASE,
                           result=etcdrpc.Compare.EQUAL, lease=lease)


# The client ------------------------------------------------------------------------------

class Etcd:
    """One gRPC channel to etcd and the KV, Lease and Watch stubs over it.

    >>> etcd = Etcd("http://127.0.0.1:2379", timeout=5)  # doctest: +SKIP
    >>> etcd.range(b"/vas/alloc").kvs                     # doctest: +SKIP
    """

    def __init__(self, url: str, timeout: float, tls: TlsConfig | None = None):
        """``tls``: the client certificate, key and CA for an ``https://`` etcd (etcd
        checks the certificate with ``--client-cert-auth``; its own certificate must
        name the address dialled). InvalidArgument if the scheme and ``tls`` disagree."""
        self.url = url
        self.timeout = timeout
        target = grpc_target(url)
        secure = url.strip().startswith("https://")
        if secure != (tls is not None):
            raise InvalidArgument(
                f"etcd URL {url} needs TLS files (--etcd-cert/--etcd-key/--etcd-ca or the "
                "--tls-* ones)" if secure else
                f"etcd TLS files given but etcd URL {url} is http://: use https://")
        self.channel = (grpc.secure_channel(target, tls.channel_credentials, _CHANNEL_OPTIONS)
                        if tls else grpc.insecure_channel(target, options=_CHANNEL_OPTIONS))
        self.kv = etcdrpc.KVStub(self.channel)
        self.lease = etcdrpc.LeaseStub(self.channel)
        self.watcher = etcdrpc.WatchStub(self.channel)
        #: The newest store revision of any answer so far (DownWatch compares it with
        #: etcd's after an outage: a revision going back means a restored snapshot).
        self.newest_revision = 0

    def _call(self, method, request):
        try:
            response = method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise translate(exc, self.url) from exc
        # A plain max, unlocked: a lost race keeps a revision a moment older, harmless.
        self.newest_revision = max(self.newest_revision, response.header.revision)
        return response

    def txn(self, compare=(), success=(), failure=()) -> etcdrpc.TxnResponse:
        """One transaction: if every ``compare`` holds run ``success``, else ``failure``."""
        return self._call(self.kv.Txn, etcdrpc.TxnRequest(
            compare=compare, success=success, failure=failure))

    def range(self, key: bytes, end: bytes | None = None, *, limit=0, keys_only=False,
              count_only=False) -> etcdrpc.RangeResponse:
        """Read ``key`` (or [key, end)), ascending by key, at most ``limit`` keys (0 = all)."""
        return self._call(self.kv.Range, etcdrpc.RangeRequest(
            key=key, range_end=end or b"", limit=limit, keys_only=keys_only,
            count_only=count_only))

    def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (lease id, granted TTL in seconds)."""
        response = self._call(self.lease.LeaseGrant, etcdrpc.LeaseGrantRequest(TTL=ttl))
        if response.error:
            raise EtcdError(f"etcd at {self.url} refused a lease: {response.error}",
                            grpc.StatusCode.UNKNOWN)
        return response.ID, response.TTL

    def keepalive(self, lease_id: int) -> int:
        """Refresh ``lease_id`` once; its TTL in seconds, or 0 if it has expired."""
        try:
            stream = self.lease.LeaseKeepAlive(
                iter([etcdrpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout=self.timeout)
            for response in stream:
                return max(response.TTL, 0)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return 0
            raise translate(exc, self.url) from exc
        raise Unavailable(f"etcd at {self.url} closed a lease keepalive without answering")

    def revoke(self, lease_id: int) -> bool:
        """Revoke ``lease_id`` (deleting its keys); False if it had already expired."""
        try:
            self._call(self.lease.LeaseRevoke, etcdrpc.LeaseRevokeRequest(ID=lease_id))
        except EtcdError as exc:
            if exc.lease_missing:
                return False
            raise
        return True

    def revoke_quietly(self, lease_id: int) -> None:
        """Revoke ``lease_id``, ignoring every failure: for a lease nothing depends on any
        more (it expires on its own within its TTL if etcd cannot be told now)."""
        try:
            self.revoke(lease_id)
        except Exception:  # noqa: BLE001  the lease expires on its own
            pass

    def watch(self, requests):
        """Open a Watch stream fed by the iterator ``requests``; returns the response stream.

        No deadline: the stream lives until the caller cancels it.
        """
        return self.watcher.Watch(requests)

    def close(self) -> None:
        self.channel.close()
