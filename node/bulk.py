"""The bulk channel: segment bytes between agents over plain TCP.

Why not gRPC: a Python gRPC stream tops out near 1.0-1.2 GB/s on the
development VM, while one TCP stream fed by ``os.sendfile`` from the memfd and
drained by ``recv_into`` straight into the replica's mapping moves 4-5 GB/s on
loopback (2.5-2.7 GB/s over veth): no protobuf, no intermediate copies, and
both calls release the GIL.

With TLS (vas.core.tls) every connection is mutual TLS: the home finishes the
handshake, which refuses a peer without a certificate from the CA, before it
reads a byte of request, and hands the peer's identity (vas.core.identity) to
``source`` with every request, which applies the same rules as ``Node.ReadPages``.
``os.sendfile`` cannot feed a TLS socket (the bytes must be encrypted in user
space), so the home encrypts straight out of a read-only mapping of the memfd;
both sides go through vas.node.bulk_tls (OpenSSL over memory buffers, big socket
reads and writes), and a fetch uses at most ``_TLS_STREAMS`` connections.

Protocol (little endian): request ``magic(8) segment_id(u64) offset(u64)
length(u64)``; reply ``magic(8) status(u32, a grpc.StatusCode value)
message_length(u64)``, the UTF-8 message, then on status 0 exactly ``length``
bytes. A connection carries any number of requests, one after another: an
eager fetch sends one range per connection (``fetch``), a lazy replica keeps a
few connections open and sends one small range per page fault (``Channel``),
so a chunk costs one round trip on a warm connection instead of a gRPC call.

Relays (node/relay.py): a request with the magic ``VASRELAY`` carries one more u64,
the version, and asks this agent for a copy it fetches or holds of exactly that
segment id and version; the bytes are sent as they arrive here, and a copy that
stops serving (its fetch failed, it was retired or is about to change) ends the
connection short: the peer fetches the rest elsewhere.

Writes (a remote writer's sync, node/writers.py): a request with the magic ``VASWRITE``
carries ``header_length`` and ``run_count`` in place of offset and length, then a
serialized ``WritePagesHeader`` (at most ``_MAX_WRITE_HEADER`` bytes), ``run_count``
(offset u64, length u64) runs (at most ``MAX_WRITE_RUNS``), then the runs' bytes in
order, sent with ``os.sendfile`` from the writer's replica memfd. ``write_sink`` makes
exactly WritePages' checks and publish; the reply's message on status 0 is the
serialized ``SegmentInfo`` at the new version. The byte count is fixed by the runs, so
a connection cut before the last byte publishes nothing (WritePages' end marker). A
request refused before its bytes were read is answered, up to ``_DRAIN_MAX`` of its
bytes read and dropped (so the close does not reset the reply away), and the
connection closed.

Hostile peers: a header with the wrong magic is answered INVALID_ARGUMENT and the
connection closed (its framing cannot be trusted); a range outside the segment or an
unknown id gets its status and the connection stays; a truncated header or a peer
silent past the timeout just ends the connection. One peer host holds at most
``--max-bulk-per-peer`` connections and all peers ``_MAX_CONNECTIONS``; past either
the connection is answered RESOURCE_EXHAUSTED naming the limit, and closed.
"""
from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vas.core.errors import (CapacityExceeded, InvalidArgument, NotFound, Unavailable,
                             VasError, from_status, status_code)
from vas.core.identity import Peer, peer_of_der
from vas.core.sizes import human_size
from vas.core.tls import NODE_HOST
from vas.node import locks, metrics
from vas.node.bulk_tls import TlsConnection
from vas.node.limits import Counts, Limit

if TYPE_CHECKING:
    from vas.node.relay import Copy

log = logging.getLogger(__name__)

MAGIC = b"VASBULK1"
RELAY_MAGIC = b"VASRELAY"
WRITE_MAGIC = b"VASWRITE"
_REQUEST = struct.Struct("<8sQQQ")
_VERSION = struct.Struct("<Q")
_REPLY = struct.Struct("<8sIQ")
_RUN = struct.Struct("<QQ")
#: Largest WritePagesHeader of a write request (a Caller and a name: a few hundred bytes).
_MAX_WRITE_HEADER = 64 << 10
#: Most runs in one write request: its table (16 bytes a run, 1 MiB) is read before the
#: home knows the segment, so it is bounded here; a sync of more runs uses WritePages.
MAX_WRITE_RUNS = 1 << 16
#: Largest reply message of a write request (a serialized SegmentInfo).
_MAX_WRITE_REPLY = 1 << 20
#: Most bytes of a refused write request read (and dropped) before its connection closes.
_DRAIN_MAX = 4 << 20
#: Largest receive buffer of write requests a connection keeps for the next one: fresh
#: memory pays a page fault per 4 KiB as the bytes land (~0.6 GB/s here, 16 ms of a
#: 10 MiB sync), a kept one none. At most this times ``_MAX_CONNECTIONS`` stays held,
#: only by writers that passed the checks, and only until the connection idles out.
_KEEP_ASIDE = 16 << 20
#: Largest single recv_into: big reads keep the per-call overhead negligible.
_RECV_MAX = 8 << 20
#: Concurrent bulk connections a home serves, from all peers; more are refused
#: (RESOURCE_EXHAUSTED).
_MAX_CONNECTIONS = 64
#: Attempts per range before the transfer fails (a reset connection is retried once).
_ATTEMPTS = 2
_PAGE = 4096
#: A fetch tells its ``received`` callback of bytes in steps of at least this many (and
#: at its end): a relay serves them in runs of MiBs, and telling it of every
#: ``recv_into`` (tens of KiB on veth) costs a lock and a Python call each.
_TELL_STEP = 512 << 10
#: Most bytes ``_drain`` reads at once.
_DRAIN_BUFFER = 256 << 10
#: Idle connections a ``Channel`` keeps (more concurrent requests open extra ones).
_IDLE_MAX = 4
#: Seconds a caller's deadline may exceed the time left under the channel's timeout
#: before the socket timeouts are cut to it: a fault's first request has a deadline
#: a hair under the timeout, and cutting costs two setsockopt calls each way.
_CUT_SLACK = 0.25

#: Pages a fetch pre-faults at a time ahead of its receivers (``_RunAhead``).
_PREFAULT_STEP = 8 << 20

#: Most connections of one TLS fetch: each stream's Python loop runs a record (16 KiB)
#: per call and takes the GIL for it, so more streams contend for the GIL (4 streams
#: cost 25% more CPU per GiB than 1 on the development VM, for no more throughput).
_TLS_STREAMS = 2
#: Bytes per ``sendall`` of a TLS connection: encrypted, then sent in one call.
_TLS_SEND_BYTES = 256 << 10

#: ``source(segment_id, offset, length, peer) -> fd``: a dup of the held memfd after
#: checking id, bounds and that ``peer`` may read it (raises VasError); the server closes it.
Source = Callable[[int, int, int, Peer], int]
#: ``relay_source(segment_id, offset, length, peer) -> Copy``: the copy relayed here of
#: that id after checking bounds and that ``peer`` may read it (raises VasError).
RelaySource = Callable[[int, int, int, Peer], "Copy"]
#: ``write_sink(segment_id, header, runs, peer, receive) -> bytes``: a remote writer's
#: publish of ``runs`` ((offset, length) pairs) with the serialized WritePagesHeader
#: ``header``, checked as WritePages checks it (raises VasError); ``receive(total)``
#: returns the runs' bytes once all have arrived (ConnectionError if the peer stops
#: short). Returns the serialized SegmentInfo at the new version.
WriteSink = Callable[[int, bytes, list[tuple[int, int]], Peer,
                      Callable[[int], memoryview]], bytes]


class WriteFailed(Unavailable):
    """A write request's connection failed before all of it was sent (not the home's
    answer): the home publishes nothing of it, so sending it again is safe."""


def split(length: int, streams: int) -> list[tuple[int, int]]:
    """``length`` bytes as up to ``streams`` page-aligned (offset, length) ranges.

    >>> split(5 * 4096, 2)
    [(0, 12288), (12288, 8192)]
    """
    pages = -(-length // _PAGE)
    streams = max(1, min(streams, pages))
    per = -(-pages // streams) * _PAGE
    return [(start, min(per, length - start)) for start in range(0, length, per)]


class BulkServer:
    """The home side: a TCP listener that streams held segments with ``os.sendfile`` (with
    TLS: ``preadv`` + ``sendall``, see the module docstring)."""

    def __init__(self, host: str, source: Source, timeout: float,
                 tls: ssl.SSLContext | None = None, *, per_peer: int,
                 transfer: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 port: int = 0, relay_source: RelaySource | None = None,
                 write_sink: WriteSink | None = None):
        """``tls``: a server context requiring client certificates (TlsConfig.server_context),
        None for plaintext; ``per_peer``: connections one peer host may hold open;
        ``transfer()`` marks each range sent (the warm pool waits meanwhile); ``port``: the
        TCP port to listen on, 0 for a free one (``.port`` is the real one);
        ``relay_source``: the copies relayed here (None: relay requests get NOT_FOUND);
        ``write_sink``: remote writers' publishes (None: write requests are refused).
        OSError if it cannot be bound."""
        self.source = source
        self.relay_source = relay_source
        self.write_sink = write_sink
        self._transfer = transfer
        self.timeout = timeout
        self.tls = tls
        host = host.strip("[]")
        self._listener = socket.create_server((host, port), backlog=128, family=_family(host))
        self.port = self._listener.getsockname()[1]
        self._slots = threading.BoundedSemaphore(_MAX_CONNECTIONS)
        self._peers = Counts(Limit.BULK, per_peer)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="vas-node-bulk",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self._listener.close()
        if self._thread is not None:
            self._thread.join(5.0)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                if self._listener.fileno() < 0:
                    return
                threading.Event().wait(0.1)  # EMFILE and friends: keep serving
                continue
            try:
                self._admit(peer[0])
            except CapacityExceeded as exc:
                if self.tls is None:  # a TLS peer just sees its handshake fail: Unavailable
                    _refuse(conn, exc)
                else:
                    conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True,
                             name="vas-node-bulk-conn").start()

    def _admit(self, host: str) -> None:
        """Count a connection of ``host``; CapacityExceeded past either limit."""
        self._peers.take(host)
        if not self._slots.acquire(blocking=False):
            self._peers.give(host)
            raise CapacityExceeded(f"this agent serves {_MAX_CONNECTIONS} bulk connections, "
                                   "the most allowed")

    def _serve(self, conn: socket.socket, address) -> None:
        raw = conn  # a TLS connection's socket: what a relay copy shuts down to cut it
        try:
            _set_timeouts(conn, self.timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                conn = TlsConnection.accept(conn, self.tls)  # refuses a peer without a
                # certificate from the CA
            peer = peer_of_der(conn.getpeercert(binary_form=True) if self.tls else None)
            aside = _Aside()
            while self._serve_one(conn, peer, raw, aside):
                pass
        except (OSError, VasError) as exc:  # gone, timed out, or refused: the peer retries
            log.info("bulk transfer to %s ended: %s", address, exc)
        finally:
            conn.close()
            self._slots.release()
            self._peers.give(address[0])

    def _serve_one(self, conn: socket.socket, peer: Peer, raw: socket.socket,
                   aside: _Aside) -> bool:
        """Answer one request; False when the peer closed (or idled past the timeout)
        between requests, the normal end of a connection."""
        try:
            header = _recv_exact(conn, _REQUEST.size, eof_ok=True)
        except BlockingIOError:  # SO_RCVTIMEO between requests
            return False
        if header is None:
            return False
        magic, segment_id, offset, length = _REQUEST.unpack(header)
        if magic == RELAY_MAGIC:
            version, = _VERSION.unpack(_recv_exact(conn, _VERSION.size))
            self._relay(conn, raw, peer, segment_id, version, offset, length)
            return True
        if magic == WRITE_MAGIC:
            self._write(conn, peer, segment_id, offset, length, aside)
            return True
        if magic != MAGIC:
            _reply(conn, InvalidArgument(f"not a bulk request: magic {magic!r}, expected "
                                         f"{MAGIC!r}, {RELAY_MAGIC!r} or {WRITE_MAGIC!r}"))
            raise ConnectionError("not a bulk request")
        try:
            fd = self.source(segment_id, offset, length, peer)
        except VasError as exc:
            _reply(conn, exc)
            return True
        try:
            _reply(conn, None, more=True)
            with self._transfer():
                _send_range(conn, fd, offset, length)
            metrics.SENT_BULK.inc(length)
        finally:
            os.close(fd)
        return True

    def _relay(self, conn: socket.socket, raw: socket.socket, peer: Peer, segment_id: int,
               version: int, offset: int, length: int) -> None:
        """Serve a relay request: each run of the range once it has arrived here. A copy
        that stops serving mid-range raises (the connection ends short)."""
        try:
            if self.relay_source is None:
                raise NotFound(f"this agent relays no copy of segment id {segment_id}")
            copy = self.relay_source(segment_id, offset, length, peer)
            token, fd = copy.serve(version, raw, self.timeout)
        except VasError as exc:
            _reply(conn, exc)
            return
        try:
            _reply(conn, None, more=True)
            sent, end = offset, offset + length
            with self._transfer():
                while sent < end:
                    upto = copy.ready(sent, end, self.timeout)
                    _send_range(conn, fd, sent, upto - sent)
                    metrics.SENT_RELAY.inc(upto - sent)
                    sent = upto
        finally:
            copy.served(token, fd)

    def _write(self, conn: socket.socket, peer: Peer, segment_id: int, header_length: int,
               run_count: int, aside: _Aside) -> None:
        """Serve a write request: read its header and runs, hand them to ``write_sink``,
        answer with the new record. A refusal before the bytes were read ends the
        connection (the peer sent them already: the framing is lost)."""
        if header_length > _MAX_WRITE_HEADER or run_count > MAX_WRITE_RUNS:
            _reply(conn, InvalidArgument(
                f"write request of a {header_length}-byte header and {run_count} runs: at "
                f"most {_MAX_WRITE_HEADER} bytes and {MAX_WRITE_RUNS} runs"))
            raise ConnectionError("oversized write request")
        header = _recv_exact(conn, header_length)
        table = _recv_exact(conn, run_count * _RUN.size)
        runs = list(_RUN.iter_unpack(table))
        received = False

        def receive(total: int) -> memoryview:
            nonlocal received
            data = aside.take(total)
            _recv_into(conn, data, metrics.RECEIVED_BULK_WRITE.inc)
            received = True
            return data
        try:
            if self.write_sink is None:
                raise NotFound("this agent takes no writes over the bulk channel")
            with self._transfer():
                info = self.write_sink(segment_id, header, runs, peer, receive)
        except VasError as exc:
            _reply(conn, exc)
            if not received:
                # Read what the peer sent (up to _DRAIN_MAX) before closing: a close with
                # unread bytes resets the connection, which can discard the reply at the peer.
                _drain(conn, min(sum(length for _, length in runs), _DRAIN_MAX))
                raise ConnectionError(f"write request refused: {exc.message}") from None
            return
        conn.sendall(_REPLY.pack(MAGIC, 0, len(info)) + info)


class _Aside:
    """The receive buffer of one connection's write requests, kept between them up to
    ``_KEEP_ASIDE`` bytes (see there). Requests on a connection come one at a time, and
    the home is done with a request's bytes before it answers it."""

    def __init__(self):
        self._kept = bytearray()

    def take(self, size: int) -> memoryview:
        """A buffer of ``size`` bytes (its content undefined)."""
        if size > len(self._kept):
            if size > _KEEP_ASIDE:
                return memoryview(bytearray(size))
            self._kept = bytearray(size)
        return memoryview(self._kept)[:size]


def ranges(size: int, streams: int, tls: ssl.SSLContext | None) -> list[tuple[int, int]]:
    """The (offset, length) ranges a fetch of ``size`` bytes receives, one per connection
    (at most ``_TLS_STREAMS`` with TLS)."""
    return split(size, min(streams, _TLS_STREAMS) if tls is not None else streams)


def fetch(address: str, segment_id: int, view: memoryview, parts: list[tuple[int, int]], *,
          timeout: float, tls: ssl.SSLContext | None = None, version: int | None = None,
          prepare: Callable[[int, int], None] | None = None,
          received: Callable[[int, int], None] | None = None) -> None:
    """Fill ``parts`` ((offset, length) ranges of ``view``) with those bytes of segment
    ``segment_id``, held at bulk ``address`` (``version`` None) or relayed there (a copy
    at ``version``: node/relay.py).

    One TCP connection per part, each in a thread. ``prepare(offset, length)``
    pre-faults pages of ``view`` (fresh memory): it is run ahead of the receivers
    (``_RunAhead``), which receive only into prepared pages. ``received(offset,
    length)`` is told each run of bytes that arrived (a relay serves them on). ``tls``:
    a client context (TlsConfig.client_context) for a peer that serves mutual TLS.
    Raises the peer's VasError (e.g. NotFound), or Unavailable when a part still fails
    after ``_ATTEMPTS`` connections (each goes on from the bytes received before).
    """
    host, _, port = address.rpartition(":")
    target = (host.strip("[]"), int(port))
    errors: list[BaseException] = []
    ahead = _RunAhead(prepare, parts, timeout) if prepare is not None else None

    def run(offset: int, length: int) -> None:
        try:
            with view[offset:offset + length] as part:
                _fetch_range(target, segment_id, version, offset, part, timeout, tls,
                             received, ahead)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)
            if ahead is not None:
                ahead.stop()

    threads = [threading.Thread(target=run, args=part, name="vas-node-fetch", daemon=True)
               for part in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if ahead is not None:
        ahead.stop()
        ahead.join()
    if errors:
        raise next((e for e in errors if isinstance(e, VasError)), errors[0])


class _RunAhead:
    """Pre-faults the pages of a fetch's ranges while they are being received.

    Fresh memory costs a page fault per 4 KiB at its first touch: receiving into
    it runs at ~0.6 GB/s here, and faulting a range in before receiving it leaves
    the network idle meanwhile. So the ranges are cut into ``_PREFAULT_STEP``
    pieces, prepared in order: by a thread of this class, going round the ranges
    so that each receiver finds its next piece ready, and by a receiver itself
    when the piece it needs next was not taken yet (rather than waiting). A
    receiver receives only up to the end of its range's prepared prefix.
    """

    def __init__(self, prepare: Callable[[int, int], None], ranges: list[tuple[int, int]],
                 timeout: float):
        self._prepare = prepare
        self._timeout = timeout
        self._cv = threading.Condition()
        self._next = {start: start for start, _ in ranges}   # first piece not taken
        self._ready = {start: start for start, _ in ranges}  # end of the prepared prefix
        self._done: dict[int, set[int]] = {start: set() for start, _ in ranges}
        self._end = {start: start + length for start, length in ranges}
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="vas-node-prefault",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """No more pieces are taken (a piece being prepared is finished)."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()

    def join(self) -> None:
        """Wait for the thread (at most the piece it prepares: the memory it faults
        in must not be released under it)."""
        self._thread.join()

    def ready(self, start: int, at: int) -> int:
        """The end of the prepared prefix of the range at ``start``, past ``at``:
        prepares the range's next piece itself when the thread has not taken it yet,
        else waits for the piece being prepared (within the timeout). Raises what
        preparing failed with."""
        deadline = time.monotonic() + self._timeout
        while True:
            with self._cv:
                while True:
                    if self._error is not None:
                        raise self._error
                    if self._ready[start] > at:
                        return self._ready[start]
                    if self._next[start] < self._end[start]:
                        piece = self._take_locked(start)
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Unavailable(f"pre-faulting replica memory took over "
                                          f"{self._timeout:g} s")
                    self._cv.wait(left)
            self._prepare_piece(start, piece)

    def _run(self) -> None:
        starts = list(self._next)
        while True:
            with self._cv:  # the range whose next piece is nearest its receiver's need
                todo = [start for start in starts if self._next[start] < self._end[start]]
                if self._stopped or self._error is not None or not todo:
                    return
                start = min(todo, key=lambda s: self._next[s] - self._ready[s])
                piece = self._take_locked(start)
            self._prepare_piece(start, piece)

    def _take_locked(self, start: int) -> int:
        piece = self._next[start]
        self._next[start] = min(piece + _PREFAULT_STEP, self._end[start])
        return piece

    def _prepare_piece(self, start: int, piece: int) -> None:
        end = min(piece + _PREFAULT_STEP, self._end[start])
        try:
            self._prepare(piece, end - piece)
        except BaseException as exc:  # noqa: BLE001 - raised to the receivers
            with self._cv:
                self._error = self._error or exc
                self._cv.notify_all()
            return
        with self._cv:
            done = self._done[start]
            done.add(piece)
            while self._ready[start] in done:
                done.discard(self._ready[start])
                self._ready[start] = min(self._ready[start] + _PREFAULT_STEP, self._end[start])
            self._cv.notify_all()


def _fetch_range(target, segment_id: int, version: int | None, offset: int,
                 part: memoryview, timeout: float, tls: ssl.SSLContext | None,
                 received: Callable[[int, int], None] | None,
                 ahead: _RunAhead | None = None) -> None:
    done = told = 0  # bytes received; of them, told to ``received``

    def tell() -> None:
        nonlocal told
        if received is not None and done > told:
            received(offset + told, done - told)
        told = done

    def arrived(got: int) -> None:
        nonlocal done
        done += got
        if done - told >= _TELL_STEP:
            tell()
    counter = metrics.RECEIVED_RELAY if version is not None else metrics.RECEIVED_BULK
    try:
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                base = offset + done  # where this attempt starts
                with _connect(target, timeout, tls) as conn, part[done:] as rest:
                    conn.sendall(_request(segment_id, base, rest.nbytes, version))
                    _read_reply(conn)
                    _recv_into(conn, rest, arrived, None if ahead is None else
                               lambda got: ahead.ready(offset, base + got) - base)
                return
            except OSError as exc:
                if attempt == _ATTEMPTS:
                    raise Unavailable(f"bulk transfer from {target[0]}:{target[1]} failed: "
                                      f"{exc.strerror or exc}") from exc
                log.info("bulk transfer from %s:%d failed (%s); retrying", *target, exc)
    finally:
        tell()
        counter.inc(done)


def _request(segment_id: int, offset: int, length: int, version: int | None) -> bytes:
    if version is None:
        return _REQUEST.pack(MAGIC, segment_id, offset, length)
    return _REQUEST.pack(RELAY_MAGIC, segment_id, offset, length) + _VERSION.pack(version)


class Channel:
    """Persistent connections to one home's bulk listener for many small ranges.

    ``read(segment_id, offset, into)`` receives ``len(into)`` bytes of the segment from
    ``offset`` straight into ``into``, the replica's mapping of that range, whose pages
    the caller allocated (receiving into unallocated ones pays a page fault per 4 KiB,
    ~0.6 GB/s here, and would be SIGBUS when memory is short). Thread-safe: each call
    takes an idle connection or opens one; up to ``_IDLE_MAX`` are kept between calls.
    """

    def __init__(self, address: str, timeout: float, tls: ssl.SSLContext | None = None):
        host, _, port = address.rpartition(":")
        self.address = address
        self._target = (host.strip("[]"), int(port))
        self._timeout = timeout
        self._tls = tls
        self._idle: list[tuple[float, socket.socket]] = []
        self._lock = locks.Lock("bulk channel", locks.Rank.BULK)
        self._closed = False

    def read(self, segment_id: int, offset: int, into: memoryview,
             timeout: float | None = None) -> None:
        """Receive [offset, offset + len(into)) of ``segment_id`` into ``into``. Raises the
        home's VasError, or Unavailable when a fresh connection fails too.

        ``timeout``: seconds this call may wait on the network in all (connect,
        each send and receive; at most the channel's own timeout each), for a
        caller with a deadline; None: the channel's timeout per wait.
        """
        length = len(into)
        if offset < 0 or length <= 0 or offset + length >= 1 << 63:
            raise ValueError(f"invalid bulk range offset {offset} length {length}")
        deadline = None if timeout is None else time.monotonic() + timeout
        for attempt in range(1, _ATTEMPTS + 1):
            conn = None
            try:
                wait = self._wait(deadline)
                conn = self._take(wait)
                if wait != self._timeout:
                    _set_timeouts(conn, wait)
                conn.sendall(_REQUEST.pack(MAGIC, segment_id, offset, length))
                _recv_reply_into(conn, into)
            except CapacityExceeded:  # the home refused (too many connections) and closed it
                if conn is not None:
                    conn.close()
                raise
            except VasError:
                self._put(conn, wait)  # a whole reply: the connection stays usable
                raise
            except OSError as exc:
                if conn is not None:
                    conn.close()
                self._close_idle()  # likely dead as well (the home restarted): retry afresh
                if attempt == _ATTEMPTS or (deadline is not None
                                            and time.monotonic() >= deadline):
                    raise Unavailable(f"bulk read from {self.address} failed: "
                                      f"{exc.strerror or exc}") from exc
                log.info("bulk read from %s failed (%s); retrying", self.address, exc)
            else:
                metrics.RECEIVED_BULK.inc(length)
                self._put(conn, wait)
                return

    def write(self, segment_id: int, header: bytes, runs: list[tuple[int, int]], fd: int,
              timeout: float) -> bytes:
        """Publish ``runs`` ((offset, length) of ``fd``, the writer's replica memfd) at
        the home with the serialized WritePagesHeader ``header`` (a write request, see
        the module docstring); the serialized SegmentInfo at the new version.

        ``timeout``: seconds each network wait may take (the reply comes after the
        home's publish). Raises the home's VasError (e.g. Fenced); WriteFailed when the
        connection fails before every byte left (nothing can be published: the caller
        falls back to WritePages); Unavailable when it fails after (the outcome is
        unknown, as for any sync whose answer is lost: a resend would publish the same
        bytes twice, as two versions, so it is the writer's sync that fails).
        """
        if len(runs) > MAX_WRITE_RUNS:
            raise ValueError(f"{len(runs)} runs: a write request takes {MAX_WRITE_RUNS}")
        conn = None
        sent = False  # every byte of the request left: the home may publish it
        try:
            conn = self._take()
            _set_timeouts(conn, timeout)
            request = b"".join([_REQUEST.pack(WRITE_MAGIC, segment_id, len(header), len(runs)),
                                header, *(_RUN.pack(*run) for run in runs)])
            # MSG_MORE: the request leaves with the first bytes (none: at once).
            more = runs and not isinstance(conn, TlsConnection)
            conn.sendall(request, socket.MSG_MORE if more else 0)
            for offset, length in runs:
                _send_range(conn, fd, offset, length)
                metrics.SENT_BULK_WRITE.inc(length)
            sent = True
            info = _read_reply(conn, _MAX_WRITE_REPLY)
        except VasError:  # first: some are OSErrors too (PermissionDenied)
            if conn is not None:
                conn.close()  # simplest: a refusal before the bytes closes it at the home
            raise
        except OSError as exc:
            if conn is not None:
                conn.close()
            if sent:  # sending it again would publish the same bytes as one more version
                raise Unavailable(f"bulk write to {self.address}: no answer after every byte "
                                  f"was sent ({exc.strerror or exc}); the home may still "
                                  "publish it") from exc
            raise WriteFailed(f"bulk write to {self.address} failed: "
                              f"{exc.strerror or exc}") from exc
        self._put(conn, timeout)
        return info

    def _wait(self, deadline: float | None) -> float:
        """Seconds one network wait may take: the channel's timeout, cut to the time
        left before ``deadline`` when that is shorter by more than ``_CUT_SLACK`` (at
        least 1 ms: a zero socket timeout means none)."""
        if deadline is None:
            return self._timeout
        left = deadline - time.monotonic()
        if left > self._timeout - _CUT_SLACK:
            return self._timeout
        return max(left, 1e-3)

    def connect(self) -> None:
        """Open one connection ahead of the first ``read``."""
        self._put(self._take())

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._close_idle()

    def _close_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for _, conn in idle:
            conn.close()

    def _take(self, connect_timeout: float | None = None) -> socket.socket:
        # The home ends a connection idle for ``timeout``: use only younger ones.
        fresh_after = time.monotonic() - self._timeout / 2
        with self._lock:
            while self._idle:
                since, conn = self._idle.pop()
                if since >= fresh_after:
                    return conn
                conn.close()
        conn = _connect(self._target, connect_timeout or self._timeout, self._tls)
        try:
            if connect_timeout and connect_timeout != self._timeout:
                _set_timeouts(conn, self._timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            conn.close()
            raise
        return conn

    def _put(self, conn: socket.socket, wait: float | None = None) -> None:
        """Keep ``conn`` for the next request (its timeouts back to the channel's if
        ``wait`` changed them), or close it."""
        try:
            if wait is not None and wait != self._timeout:
                _set_timeouts(conn, self._timeout)
        except OSError:
            conn.close()
            return
        with self._lock:
            if not self._closed and len(self._idle) < _IDLE_MAX:
                self._idle.append((time.monotonic(), conn))
                return
        conn.close()


def _connect(target: tuple[str, int], timeout: float,
             tls: ssl.SSLContext | None) -> socket.socket:
    """A connection to the bulk listener at ``target`` (TLS handshake done when ``tls``),
    with kernel timeouts of ``timeout`` seconds."""
    conn = socket.create_connection(target, timeout=timeout)
    try:
        if tls is not None:  # the home is checked as an agent (its certificate's NODE_HOST)
            conn = TlsConnection.connect(conn, tls, NODE_HOST)
        _set_timeouts(conn, timeout)
    except BaseException:
        conn.close()
        raise
    return conn


def _recv_reply_into(conn: socket.socket, target: memoryview) -> None:
    """Receive a reply (raising the home's error) and its ``len(target)`` bytes straight
    into ``target``: a header receive of its own, then ``MSG_WAITALL`` receives of up to
    ``_RECV_MAX`` (into allocated pages: into fresh ones each 4 KiB would be a fault)."""
    _read_reply(conn)
    tls = isinstance(conn, TlsConnection)  # decrypts what came in: no MSG_WAITALL
    got, length = 0, len(target)
    while got < length:
        want = min(length - got, _RECV_MAX)
        received = (conn.recv_into(target[got:], want) if tls
                    else conn.recv_into(target[got:], want, socket.MSG_WAITALL))
        if not received:
            raise ConnectionError(f"connection closed after {human_size(got)} of "
                                  f"{human_size(length)}")
        got += received


def _read_reply(conn: socket.socket, most: int = 4096) -> bytes:
    """A reply header and its message (at most ``most`` bytes); raises the peer's error."""
    magic, code, size = _REPLY.unpack(_recv_exact(conn, _REPLY.size))
    if magic != MAGIC or size > most:
        raise ConnectionError("malformed bulk reply")
    message = _recv_exact(conn, size)
    if code:
        raise from_status(status_code(code), message.decode(errors="replace"))
    return message


def _refuse(conn: socket.socket, error: VasError) -> None:
    """Answer a connection that is not served with ``error`` (without waiting on a
    peer that does not read), and close it."""
    try:
        conn.setblocking(False)
        _reply(conn, error)
    except OSError:
        pass
    finally:
        conn.close()


def _reply(conn: socket.socket, error: VasError | None, *, more: bool = False) -> None:
    """Send the reply header; ``more`` (MSG_MORE) holds it back to leave in one
    segment with the first bytes of the range (one wake-up at the receiver)."""
    message = error.message.encode()[:4096] if error is not None else b""
    code = error.code.value[0] if error is not None else 0
    flags = socket.MSG_MORE if more and not isinstance(conn, TlsConnection) else 0
    conn.sendall(_REPLY.pack(MAGIC, code, len(message)) + message, flags)


def _send_range(conn: socket.socket, fd: int, offset: int, length: int) -> None:
    if isinstance(conn, TlsConnection):
        _send_range_tls(conn, fd, offset, length)
        return
    end = offset + length
    while offset < end:
        sent = os.sendfile(conn.fileno(), fd, offset, end - offset)
        if not sent:
            raise ConnectionError("memfd ended early")
        offset += sent


def _send_range_tls(conn: TlsConnection, fd: int, offset: int, length: int) -> None:
    """Encrypt the range straight out of a read-only mapping of the memfd: a ``preadv``
    copy out of shmem cost more CPU than the socket's own copy. The memfd is sealed
    against shrinking (vas.node.store), so no page of the mapping can vanish (SIGBUS)."""
    start = offset - offset % mmap.PAGESIZE
    end = offset + length - start
    with mmap.mmap(fd, end, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ,
                   offset=start) as mapped, memoryview(mapped) as view:
        for at in range(offset - start, end, _TLS_SEND_BYTES):
            with view[at:min(at + _TLS_SEND_BYTES, end)] as part:
                conn.sendall(part)


def _recv_into(conn: socket.socket, part: memoryview,
               arrived: Callable[[int], None],
               ready: Callable[[int], int] | None = None) -> None:
    """Fill ``part``, telling ``arrived(n)`` each run of ``n`` bytes received;
    ``ready(done)``: how far its pages are prepared (past ``done``)."""
    done, total = 0, part.nbytes
    while done < total:
        limit = total if ready is None else ready(done)
        with part[done:done + min(limit - done, _RECV_MAX)] as window:
            got = conn.recv_into(window)
        if not got:
            raise ConnectionError(f"connection closed after {human_size(done)} of {human_size(total)}")
        arrived(got)
        done += got


def _drain(conn: socket.socket, size: int) -> None:
    """Read and drop up to ``size`` bytes (fewer if the peer stops or errs)."""
    scratch = bytearray(min(size, _DRAIN_BUFFER))
    try:
        while size > 0:
            got = conn.recv_into(scratch, min(size, len(scratch)))
            if not got:
                return
            size -= got
    except OSError:
        pass


def _recv_exact(conn: socket.socket, size: int, *, eof_ok: bool = False) -> bytes | None:
    """``size`` bytes; None if ``eof_ok`` and the peer closed before the first one."""
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            if eof_ok and not data:
                return None
            raise ConnectionError("connection closed in a bulk header")
        data += chunk
    return bytes(data)


def _set_timeouts(conn: socket.socket, timeout: float) -> None:
    """Blocking mode with kernel send/receive timeouts: ``os.sendfile`` needs a blocking
    socket (Python's own timeouts make it non-blocking), and a stalled peer still
    ends in an OSError (EAGAIN) after ``timeout`` seconds."""
    conn.settimeout(None)
    seconds = int(timeout)
    timeval = struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
