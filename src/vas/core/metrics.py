"""Prometheus metrics both daemons share: RPCs by method and status, and the /metrics listener.

Each daemon counts every gRPC call it serves through ``RpcMetrics``, a server
interceptor (one per ``grpc.server``), and serves the Prometheus text format on
``/metrics`` when given ``--metrics-port`` (``start_metrics_server``). The
agent's own metrics (bytes moved, faults, latencies, resident segments) are
defined in ``vas.node.metrics``.

========================================  =========  ========================================
metric                                    type       labels
========================================  =========  ========================================
``vas_rpc_server_handled_total``          counter    ``grpc_service``, ``grpc_method``,
                                                     ``grpc_code`` (``OK``, ``NOT_FOUND``, ...)
``vas_rpc_server_handling_seconds``       histogram  ``grpc_service``, ``grpc_method``
========================================  =========  ========================================

A streamed call is counted once, when its stream ends (its time is the whole
stream's). Calls of unknown methods are answered UNIMPLEMENTED by gRPC before
any handler and are not counted. Counters live in the process's default
registry, with prometheus_client's ``process_*`` and ``python_*`` metrics.

The listener follows the daemons' rule for every port (vas.core.tls): it binds
the host of ``--listen``; with the TLS files it is HTTPS that requires a client
certificate from the CA (like the gRPC port), without them plain HTTP, on a
loopback host only unless ``--insecure``.
"""
from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, make_wsgi_app

from vas.core.tls import TlsConfig, check_listen

log = logging.getLogger(__name__)

#: Buckets (seconds) of every latency histogram: from a local call (~1 ms) to a
#: fetch of many GiB.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0)

RPC_HANDLED = Counter("vas_rpc_server_handled_total",
                      "gRPC calls served, by method and final status code",
                      ("grpc_service", "grpc_method", "grpc_code"))
RPC_SECONDS = Histogram("vas_rpc_server_handling_seconds",
                        "Seconds from a gRPC call's start to its final status (whole stream)",
                        ("grpc_service", "grpc_method"), buckets=LATENCY_BUCKETS)

_OK = grpc.StatusCode.OK
_UNKNOWN = grpc.StatusCode.UNKNOWN
_CANCELLED = grpc.StatusCode.CANCELLED


class RpcMetrics(grpc.ServerInterceptor):
    """Counts every call of the server it is given to, by method and final status.

    Example::

        server = grpc.server(pool, interceptors=(RpcMetrics(),))
    """

    def __init__(self):
        self._methods: dict[str, tuple[str, str]] = {}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method
        names = self._methods.get(full)
        if names is None:  # "/vas.v1.Node/ReadPages" -> ("vas.v1.Node", "ReadPages")
            service, _, method = full.lstrip("/").rpartition("/")
            names = self._methods[full] = (service, method)
        seconds = RPC_SECONDS.labels(*names)

        def observe(code: grpc.StatusCode, started: float) -> None:
            seconds.observe(time.perf_counter() - started)
            RPC_HANDLED.labels(names[0], names[1], code.name).inc()

        if handler.response_streaming:
            behavior = _streaming(handler.unary_stream or handler.stream_stream, observe)
        else:
            behavior = _unary(handler.unary_unary or handler.stream_unary, observe)
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[
            (handler.request_streaming, handler.response_streaming)]
        return make(behavior, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def _code_of(context: grpc.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    """The code the handler set (``abort``, ``set_code``), else ``default``."""
    return context.code() or default


def _unary(behavior: Callable, observe: Callable) -> Callable:
    def handle(request, context):
        started = time.perf_counter()
        code = _UNKNOWN
        try:
            response = behavior(request, context)
            code = _code_of(context, _OK)
            return response
        except BaseException:
            code = _code_of(context, _UNKNOWN)
            raise
        finally:
            observe(code, started)
    return handle


def _streaming(behavior: Callable, observe: Callable) -> Callable:
    def handle(request, context):
        started = time.perf_counter()
        code = _UNKNOWN
        try:
            yield from behavior(request, context)
            # A handler that stops because its client went away (``is_active()`` false)
            # ends like one that finished: that call was cancelled, not OK.
            code = _code_of(context, _OK if context.is_active() else _CANCELLED)
        except GeneratorExit:  # the client went away mid-stream
            code = _CANCELLED
            raise
        except BaseException:
            code = _code_of(context, _UNKNOWN)
            raise
        finally:
            observe(code, started)
    return handle


class _Default:
    """The process's default registry as one collector of a per-listener registry."""

    def collect(self):
        return REGISTRY.collect()


class _Server(ThreadingMixIn, WSGIServer):
    """prometheus_client's threading WSGI server, with the TLS handshake moved off the
    accepting thread (see ``start_metrics_server``)."""

    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def handle_error(self, request, client_address) -> None:
        # socketserver would print a traceback to stderr (a refused handshake, a client
        # gone mid-reply): one log line instead, in the daemon's log format.
        log.info("metrics request from %s failed: %s", client_address[0], sys.exc_info()[1])

    def get_request(self):
        conn, address = self.socket.accept()
        if self.tls is not None:  # handshake on the first read, in the request's thread
            conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, address


class _Quiet(WSGIRequestHandler):
    #: Seconds a scrape's connection may stay silent (TLS handshake included).
    timeout = 30

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # one line per scrape on stderr would drown the daemon's own log


class MetricsServer:
    """The /metrics listener of one daemon (``start_metrics_server``); ``stop()`` is idempotent."""

    def __init__(self, httpd: _Server, url: str):
        self._httpd = httpd
        self.url = url          # e.g. "http://127.0.0.1:9464/metrics"
        self.port = httpd.server_port
        self._thread = threading.Thread(target=httpd.serve_forever, name="vas-metrics",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
            self._thread.join()


def metrics_address(listen: str, port: int) -> str:
    """The host:port of the metrics listener of a daemon listening on ``listen``: the
    same host (a wildcard stays one), ``port``."""
    host = listen.rpartition(":")[0]
    return f"{host}:{port}"


def start_metrics_server(listen: str, port: int, tls: TlsConfig | None, insecure: bool,
                         collectors: Iterable = ()) -> MetricsServer:
    """Serve the default registry and ``collectors`` on ``/metrics`` of ``listen``'s host
    at ``port`` (0: a free port, see ``MetricsServer.port``).

    prometheus_client's WSGI app behind its threading server, but not its
    ``start_http_server``: that one wraps the listening socket, so every TLS
    handshake runs in the accepting thread and one client that connects and stays
    silent stops every scrape. Here each connection shakes hands in its own thread,
    within ``_Quiet.timeout``.

    :param listen: the daemon's gRPC host:port (only the host is used).
    :param tls: the daemon's TLS files: HTTPS requiring a client certificate from the CA.
    :param insecure: allow plain HTTP on a non-loopback host.
    :raises InvalidArgument: plain HTTP on a non-loopback host without ``insecure``,
        or a port outside 0..65535.
    :raises OSError: the port cannot be bound.
    """
    from vas.core.errors import InvalidArgument

    if not 0 <= port <= 65535:
        raise InvalidArgument(f"invalid metrics port {port}: must be 0..65535")
    address = metrics_address(listen, port)
    check_listen(address, tls, insecure)
    host = address.rpartition(":")[0].strip("[]") or "0.0.0.0"
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Default())
    for collector in collectors:
        registry.register(collector)

    class Server(_Server):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    Server.tls = tls.server_context() if tls is not None else None
    try:
        httpd = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_Quiet)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on {address}: "
                                 f"{exc.strerror or exc}") from exc
    shown = f"[{host}]" if ":" in host else host
    url = f"{'https' if tls else 'http'}://{shown}:{httpd.server_port}/metrics"
    log.info("serving metrics on %s", url)
    return MetricsServer(httpd, url)
