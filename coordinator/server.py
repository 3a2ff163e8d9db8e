"""``serve(config)``: run the coordinator's gRPC server until SIGTERM/SIGINT.

Serves the Coordinator API, ``grpc.health.v1`` (SERVING once listening,
NOT_SERVING while shutting down) and reflection (vas.core.reflection), counts every
call (vas.core.metrics.RpcMetrics) and, given a metrics port, serves /metrics. On a
signal: health goes NOT_SERVING, open Watch streams end cleanly (they would never
finish on their own), in-flight unary calls get ``shutdown_grace`` seconds, then the
etcd channel and the metrics listener close.
"""
from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from vas.coordinator.config import CoordinatorConfig
from vas.coordinator.etcd import Etcd
from vas.coordinator.nodes import DownWatch
from vas.coordinator.service import CoordinatorService
from vas.core.defaults import MAX_CONCURRENT_RPCS, MAX_GRPC_MESSAGE
from vas.core.errors import VasError
from vas.core.logs import setup_default_logging
from vas.core.metrics import RpcMetrics, start_metrics_server
from vas.core.reflection import enable_reflection
from vas.core.signals import setting
from vas.core.tls import add_port, check_listen
from vas.proto import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger("vas.coordinator")

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name


def serve(config: CoordinatorConfig, stop: threading.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or until ``stop`` is set, when given: for tests that
    run the server in a thread, where signal handlers cannot be installed).

    Prints ``vas coordinator listening on HOST:PORT`` (the real port when 0 was
    asked) to stdout once serving; with ``metrics_port``, Prometheus metrics on
    ``/metrics`` (vas.core.metrics). Raises RuntimeError if the address cannot be bound
    (OSError for the metrics port), InvalidArgument for a plaintext non-loopback
    ``listen`` without ``insecure``.

    Example::

        serve(CoordinatorConfig(etcd="http://127.0.0.1:2379", listen="127.0.0.1:0"))
    """
    setup_default_logging()
    check_listen(config.listen, config.tls, config.insecure)
    etcd = Etcd(config.etcd, config.etcd_timeout, config.etcd_tls)
    _probe(etcd)
    service = CoordinatorService(config, etcd)
    server = grpc.server(
        futures.ThreadPoolExecutor(config.workers, thread_name_prefix="coordinator"),
        # Refuse a port another process listens on instead of sharing its traffic; a
        # message over MAX_GRPC_MESSAGE is refused with RESOURCE_EXHAUSTED.
        options=[("grpc.so_reuseport", 0),
                 ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
                 ("grpc.max_send_message_length", MAX_GRPC_MESSAGE)],
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS, interceptors=(RpcMetrics(),))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(service, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((SERVICE_NAME, health.SERVICE_NAME), server)
    port = add_port(server, config.listen, config.tls)
    if not port:
        raise RuntimeError(f"cannot listen on {config.listen}")
    server.start()
    metrics = None
    if config.metrics_port is not None:
        try:
            metrics = start_metrics_server(config.listen, config.metrics_port, config.tls,
                                           config.insecure)
        except BaseException:
            server.stop(0)
            service.close()
            etcd.close()
            raise
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = config.listen.rsplit(":", 1)[0]
    print(f"vas coordinator listening on {host}:{port}", flush=True)
    log.info("serving etcd %s on %s:%d (%s)", config.etcd, host, port,
             "mutual TLS" if config.tls else "plaintext")

    stop = stop or _signal_event()
    downs = DownWatch(etcd, rewound=service.segments.forget,
                      promote=service.promoter.promote_node)
    down_thread = threading.Thread(target=downs.run, args=(stop,), name="down-watch",
                                   daemon=True)
    down_thread.start()
    # Wake up now and then: a signal the kernel hands to a gRPC thread only runs its
    # Python handler once the main thread is back in the interpreter.
    while not stop.wait(1.0):
        pass
    log.info("stopping")
    health_servicer.enter_graceful_shutdown()
    downs.close()
    down_thread.join(config.shutdown_grace)
    service.close_watches()
    server.stop(config.shutdown_grace).wait()
    service.close()
    etcd.close()
    if metrics is not None:
        metrics.stop()


def _signal_event() -> threading.Event:
    """An event set by the first SIGTERM or SIGINT."""
    event = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, setting(event))
    return event


def _probe(etcd: Etcd) -> None:
    """Warn (without failing) when etcd does not answer yet: calls report Unavailable
    until it does, and the channel reconnects on its own."""
    try:
        etcd.range(b"/vas/alloc", keys_only=True)
    except VasError as exc:
        log.warning("%s; serving anyway", exc)
