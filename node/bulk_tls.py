"""TLS for the bulk channel through memory BIOs: big socket reads and writes.

An ``ssl.SSLSocket`` writes each 16 KiB TLS record with its own ``write`` and reads each
with two ``read`` calls (header, then body); on the 2-core development VM those syscalls
and the loopback wake-ups they cause cost about as much CPU as the AES itself, and the
bulk channel ran at ~0.75 GB/s. Here OpenSSL encrypts into and decrypts from memory
(``ssl.MemoryBIO``), and the socket moves up to ``_IO_BYTES`` per call.

``TlsConnection`` offers the blocking-socket calls the bulk channel uses (``sendall``,
``recv_into``, ``recv``, ``setsockopt``, ``settimeout``, ``close``), so the protocol code
is the same with and without TLS. Timeouts stay the socket's (SO_RCVTIMEO/SO_SNDTIMEO):
a stalled peer ends in the socket's OSError.
"""
from __future__ import annotations

import contextlib
import socket
import ssl

#: Bytes per socket read: a few records per call, small enough to stay in cache
#: between the read and the decryption.
_IO_BYTES = 256 << 10


class TlsConnection:
    """A mutual-TLS connection over the blocking socket ``sock`` (see the module
    docstring); make one with ``accept`` or ``connect``, which finish the handshake."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject,
                 incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO):
        self.sock = sock
        self._tls = tls
        self._incoming = incoming
        self._outgoing = outgoing
        self._buffer = bytearray(_IO_BYTES)

    @classmethod
    def accept(cls, sock: socket.socket, context: ssl.SSLContext) -> "TlsConnection":
        """The server side; the handshake refuses a client without a certificate
        from the context's CA (ssl.SSLError)."""
        return cls._handshake(sock, context, server_side=True, server_hostname=None)

    @classmethod
    def connect(cls, sock: socket.socket, context: ssl.SSLContext,
                server_hostname: str) -> "TlsConnection":
        """The client side; the server's certificate must name ``server_hostname``."""
        return cls._handshake(sock, context, server_side=False,
                              server_hostname=server_hostname)

    @classmethod
    def _handshake(cls, sock, context, *, server_side, server_hostname) -> "TlsConnection":
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=server_side,
                               server_hostname=server_hostname)
        connection = cls(sock, tls, incoming, outgoing)
        while True:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                connection._flush()
                if not connection._fill():
                    raise ConnectionError("peer closed the connection in the TLS handshake")
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    connection._flush()  # the alert: the peer learns why at once
                raise
            else:
                connection._flush()
                return connection

    def getpeercert(self, binary_form: bool = False):
        return self._tls.getpeercert(binary_form)

    def sendall(self, data, flags: int = 0) -> None:
        """Encrypt ``data`` and send it with one ``sendall`` (``flags`` are ignored:
        the records leave together anyway)."""
        self._tls.write(data)
        self._flush()

    def recv_into(self, view, nbytes: int = 0) -> int:
        """Up to ``nbytes`` (default: all of ``view``) decrypted bytes into ``view``;
        0 when the peer closed."""
        nbytes = nbytes or len(view)
        while True:
            try:
                return self._tls.read(nbytes, view)
            except ssl.SSLWantReadError:
                if not self._fill():
                    return 0
            except ssl.SSLZeroReturnError:  # the peer's close_notify
                return 0

    def recv(self, nbytes: int) -> bytes:
        """Up to ``nbytes`` decrypted bytes; b"" when the peer closed."""
        buffer = bytearray(nbytes)
        return bytes(buffer[:self.recv_into(buffer)])

    def setsockopt(self, *args) -> None:
        self.sock.setsockopt(*args)

    def settimeout(self, value: float | None) -> None:
        self.sock.settimeout(value)

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "TlsConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> bool:
        """Read what the socket has (up to ``_IO_BYTES``) into OpenSSL; False at EOF."""
        got = self.sock.recv_into(self._buffer)
        if not got:
            return False
        with memoryview(self._buffer) as window, window[:got] as part:
            self._incoming.write(part)
        return True
