"""Every Prometheus metric of the node agent, defined here and only here.

Counted where the work is done, once per range, chunk, stream message or call —
never per page — so the data path pays a few lock-protected additions per
transfer (prometheus_client's own lock), nothing more. The RPC counts of the Node
service come from ``vas.core.metrics.RpcMetrics``; the segments held are read at
scrape time (``HeldCollector``), not tracked.

==========================================  =========  =====================================
metric                                      type       labels and meaning
==========================================  =========  =====================================
``vas_node_sent_bytes_total``               counter    ``path``: ``bulk`` (ranges served on
                                                       the bulk channel), ``relay`` (bytes
                                                       of copies relayed to later
                                                       fetchers, node/relay.py),
                                                       ``read_pages``
                                                       (ReadPages served), ``write_pages``
                                                       (a remote writer's sync sent to the
                                                       home), ``local`` (bytes of segments
                                                       handed to local clients by attach:
                                                       mapped, not copied)
``vas_node_received_bytes_total``           counter    ``path``: ``bulk`` (replica fetches
                                                       and lazy chunks from homes),
                                                       ``relay`` (fetched from relays),
                                                       ``read_pages``
                                                       (fetches, chunks and refreshes by
                                                       ReadPages), ``write_pages`` (remote
                                                       writers' syncs applied here)
``vas_node_faults_total``                   counter    ``result``: ``served`` (a userfault
                                                       of a lazy mapping answered with its
                                                       chunk), ``sigbus`` (poisoned: the
                                                       chunk could not be had)
``vas_node_fetch_seconds``                  histogram  ``kind``: ``eager`` (a whole replica),
                                                       ``chunk`` (one lazy piece), ``refresh``
                                                       (the changed chunks of a replica)
``vas_node_sync_seconds``                   histogram  ``where``: ``home`` (a writer on the
                                                       home node), ``remote`` (a replica's
                                                       writer, through WritePages)
``vas_node_attach_seconds``                 histogram  ``fetch``: ``home``, ``lazy``, ``eager``
                                                       (the attach's fetch mode; an eager
                                                       attach includes its fetch)
``vas_node_lease_renewals_total``           counter    ``lease``: ``node`` (heartbeats),
                                                       ``writer`` (writer-lock keepalives)
``vas_node_lease_renewal_failures_total``   counter    ``lease``: as above; a renewal the
                                                       coordinator refused or did not answer
``vas_node_chunks_failed_checksum_total``   counter    chunks of home segments in the
                                                       ``--data-dir`` that failed their
                                                       checksum at start (never served)
``vas_node_segments``                       gauge      ``kind``: ``home``, ``replica``
``vas_node_resident_bytes``                 gauge      ``kind``: bytes of memory holding
                                                       them (a lazy replica: its fetched
                                                       chunks)
``vas_node_memory_capacity_bytes``          gauge      ``--memory``
``vas_node_memory_used_bytes``              gauge      held plus reserved (what ``node ls``
                                                       shows)
==========================================  =========  =====================================
"""
from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from vas.core.fetch import FetchMode
from vas.core.metrics import LATENCY_BUCKETS

SENT_BYTES = Counter("vas_node_sent_bytes", "Bytes of segments this agent sent, by path",
                     ("path",), unit="bytes")
RECEIVED_BYTES = Counter("vas_node_received_bytes",
                         "Bytes of segments this agent received, by path", ("path",),
                         unit="bytes")
FAULTS = Counter("vas_node_faults", "Userfaults of lazy mappings resolved, by result",
                 ("result",))
FETCH_SECONDS = Histogram("vas_node_fetch_seconds",
                          "Seconds to fetch a replica's bytes from its home, by kind",
                          ("kind",), buckets=LATENCY_BUCKETS)
SYNC_SECONDS = Histogram("vas_node_sync_seconds", "Seconds a writer's sync took, by where",
                         ("where",), buckets=LATENCY_BUCKETS)
ATTACH_SECONDS = Histogram("vas_node_attach_seconds",
                           "Seconds a local attach took, by its fetch mode", ("fetch",),
                           buckets=LATENCY_BUCKETS)
LEASE_RENEWALS = Counter("vas_node_lease_renewals",
                         "Lease renewals the coordinator granted, by lease", ("lease",))
LEASE_RENEWAL_FAILURES = Counter("vas_node_lease_renewal_failures",
                                 "Lease renewals refused or not answered, by lease",
                                 ("lease",))
CHUNKS_FAILED = Counter("vas_node_chunks_failed_checksum",
                        "Chunks of home segments in the --data-dir whose bytes failed their "
                        "checksum when the agent started (never served)")

# The children the data path uses, bound once (a labels() call costs a dict lookup
# under a lock).
SENT_BULK = SENT_BYTES.labels("bulk")
SENT_RELAY = SENT_BYTES.labels("relay")
SENT_READ_PAGES = SENT_BYTES.labels("read_pages")
SENT_WRITE_PAGES = SENT_BYTES.labels("write_pages")
SENT_BULK_WRITE = SENT_BYTES.labels("bulk_write")
SENT_LOCAL = SENT_BYTES.labels("local")
RECEIVED_BULK = RECEIVED_BYTES.labels("bulk")
RECEIVED_RELAY = RECEIVED_BYTES.labels("relay")
RECEIVED_READ_PAGES = RECEIVED_BYTES.labels("read_pages")
RECEIVED_WRITE_PAGES = RECEIVED_BYTES.labels("write_pages")
RECEIVED_BULK_WRITE = RECEIVED_BYTES.labels("bulk_write")
FAULTS_SERVED = FAULTS.labels("served")
FAULTS_SIGBUS = FAULTS.labels("sigbus")
FETCH_EAGER = FETCH_SECONDS.labels("eager")
FETCH_CHUNK = FETCH_SECONDS.labels("chunk")
FETCH_REFRESH = FETCH_SECONDS.labels("refresh")
SYNC_HOME = SYNC_SECONDS.labels("home")
SYNC_REMOTE = SYNC_SECONDS.labels("remote")
NODE_LEASE_RENEWED = LEASE_RENEWALS.labels("node")
NODE_LEASE_FAILED = LEASE_RENEWAL_FAILURES.labels("node")
WRITER_LEASE_RENEWED = LEASE_RENEWALS.labels("writer")
WRITER_LEASE_FAILED = LEASE_RENEWAL_FAILURES.labels("writer")

#: The ``fetch`` label of each attach mode: "eager" whatever made it eager.
_ATTACH_LABEL = {FetchMode.HOME: "home", FetchMode.LAZY: "lazy", FetchMode.EAGER: "eager",
                 FetchMode.EAGER_NO_USERFAULTFD: "eager", FetchMode.EAGER_FIXED: "eager"}
_ATTACH = {mode: ATTACH_SECONDS.labels(label) for mode, label in _ATTACH_LABEL.items()}


def observe_attach(mode: FetchMode, started: float) -> None:
    """An attach answered in ``mode``, begun at ``started`` (``time.perf_counter()``)."""
    _ATTACH[mode].observe(time.perf_counter() - started)


def observe_since(histogram, started: float) -> None:
    """Observe the seconds since ``started`` (``time.perf_counter()``) in ``histogram``
    (a bound child). Latencies are of calls that succeeded: a failure's time says more
    about the timeout than about the path."""
    histogram.observe(time.perf_counter() - started)


class HeldCollector:
    """``vas_node_segments``, ``vas_node_resident_bytes`` and the memory gauges of one
    agent, read when scraped (registered with its metrics listener only)."""

    def __init__(self, agent):
        self._agent = agent

    def collect(self):
        from vas.node.lazy import CHUNK

        agent = self._agent
        homes = agent.homes.all()
        replicas = agent.replicas.all()
        resident = 0
        for replica in replicas:
            fill = replica.fill
            if fill is None:
                resident += replica.size
            else:  # only the chunks fetched so far hold memory
                resident += min(replica.size, fill.present_map().count(1) * CHUNK)
        segments = GaugeMetricFamily("vas_node_segments",
                                     "Segments held by this agent, by kind", labels=("kind",))
        segments.add_metric(("home",), len(homes))
        segments.add_metric(("replica",), len(replicas))
        held = GaugeMetricFamily("vas_node_resident_bytes",
                                 "Bytes of memory holding segments, by kind",
                                 labels=("kind",), unit="bytes")
        held.add_metric(("home",), sum(segment.size for segment in homes))
        held.add_metric(("replica",), resident)
        used, _ = agent.store.usage()
        yield segments
        yield held
        yield GaugeMetricFamily("vas_node_memory_capacity_bytes",
                                "Segment memory this agent may hold (--memory)",
                                value=agent.store.capacity, unit="bytes")
        yield GaugeMetricFamily("vas_node_memory_used_bytes",
                                "Segment memory held or reserved", value=used, unit="bytes")
