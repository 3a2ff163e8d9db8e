"""Relays across network namespaces (node/relay.py): readers of one segment pull it
from agents that fetch or hold it, so the home sends about one copy; a relay killed
-9 mid-transfer costs its reader nothing but a switch of source.

Four agents: a is home, b, c, d read. The home's link is shaped (tc tbf on its veth,
``RATE``) so a transfer lasts long enough to overlap (and to kill a relay in), and
what each agent sent and received is read from its /metrics.
"""
from __future__ import annotations

import json
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from waiting import wait_for

HOSTS_COUNT = 4
HOSTS_NODE_ARGS = ["--metrics-port", "0"]
MiB = 1 << 20
SIZE = 48 * MiB
#: The home's egress: 48 MiB take ~1 s, 3 copies of it ~3 s.
RATE = "400mbit"
#: The relay killed after its first run (4 MiB) must still be receiving: ~1.3 s behind
#: ``RATE``.
KILL_SIZE = 64 * MiB

READ = """
import hashlib, json, time, vas
with vas.connect() as c:
    start = time.perf_counter()
    with c.attach({name!r}, fetch="eager") as m:
        took = time.perf_counter() - start
        print(json.dumps({{"sha": hashlib.sha256(m.buffer).hexdigest(), "took": took}}))
"""


@pytest.fixture(scope="module")
def shaped(hosts):
    """The home's (a's) egress limited to ``RATE``."""
    with hosts.shaped(0, RATE):
        yield hosts


def _metric(node, sample: str, **labels) -> float:
    """The sum of ``node``'s samples named ``sample`` with ``labels``, from its /metrics."""
    with urllib.request.urlopen(node.metrics_url(), timeout=10) as reply:
        families = text_string_to_metric_families(reply.read().decode())
        return sum(s.value for f in families for s in f.samples
                   if s.name == sample and labels.items() <= s.labels.items())


def _bytes(node, direction: str, path: str) -> float:
    """vas_node_{direction}_bytes_total{path} of ``node``."""
    return _metric(node, f"vas_node_{direction}_bytes_total", path=path)


def _read_all(hosts, readers: list[int], name: str) -> list[dict]:
    """Attach ``name`` eagerly on every host of ``readers`` at once; their outcomes."""
    results: dict[int, dict] = {}

    def read(host: int) -> None:
        results[host] = json.loads(hosts.run(host, READ.format(name=name)).stdout)
    threads = [threading.Thread(target=read, args=(host,)) for host in readers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return [results[host] for host in readers]


def test_three_readers_cost_the_home_one_copy(shaped):
    hosts = shaped
    made = hosts.fill(0, "relay/fan", SIZE)
    home, readers = hosts.nodes[0], hosts.nodes[1:]
    sent_before = _bytes(home, "sent", "bulk") + _bytes(home, "sent", "read_pages")
    relayed_before = sum(_bytes(node, "sent", "relay") for node in readers)
    results = _read_all(hosts, [1, 2, 3], "relay/fan")
    assert [r["sha"] for r in results] == [made] * 3
    home_sent = _bytes(home, "sent", "bulk") + _bytes(home, "sent", "read_pages") - sent_before
    relayed = sum(_bytes(node, "sent", "relay") for node in readers) - relayed_before
    took = ", ".join(f"{r['took']:.2f}" for r in results)
    print(f"3 readers of {SIZE >> 20} MiB behind {RATE}: took {took} s; home sent "
          f"{home_sent / SIZE:.2f}x, relays {relayed / SIZE:.2f}x the payload")
    assert home_sent <= 1.3 * SIZE
    assert relayed >= 2 * SIZE - 1  # the second and third reader pulled from relays


def test_a_relay_killed_mid_transfer_costs_its_reader_nothing(shaped):
    """b and c attach at once: the one whose OpenBulk came first fetches from the home
    and relays to the other. The relay's agent dies (-9) as soon as it has sent its
    first bytes: the reader fetches the rest from the home, and every byte is right."""
    hosts = shaped
    made = hosts.fill(0, "relay/kill", KILL_SIZE)
    pair = hosts.nodes[1:3]
    before = {(node.node_id, direction, path): _bytes(node, direction, path)
              for node in pair for direction, path in
              (("sent", "relay"), ("received", "relay"), ("received", "bulk"))}

    def more(node, direction: str, path: str) -> float:
        return _bytes(node, direction, path) - before[node.node_id, direction, path]

    # The relay's client fails with its agent: quietly.
    quiet = "import contextlib, vas\nwith contextlib.suppress(vas.VasError):\n" + "\n".join(
        "    " + line for line in READ.format(name="relay/kill").splitlines())
    clients = [hosts.spawn(host, quiet) for host in (1, 2)]
    try:
        wait_for(lambda: any(more(node, "sent", "relay") for node in pair),
                 "one of b and c relaying to the other", timeout=30)
        relay = next(i for i, node in enumerate(pair) if more(node, "sent", "relay"))
        pair[relay].kill()
        out, _ = clients[1 - relay].communicate(timeout=120)
    finally:
        for client in clients:
            client.kill()
            client.wait()
    reader = pair[1 - relay]
    assert json.loads(out)["sha"] == made
    from_relay = more(reader, "received", "relay")
    assert 0 < from_relay < KILL_SIZE
    # only what the relay had not sent came from the home
    assert from_relay + more(reader, "received", "bulk") == KILL_SIZE
