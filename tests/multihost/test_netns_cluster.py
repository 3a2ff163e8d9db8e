"""Agents in separate network namespaces (see conftest.py): registration with their
own IPs, metadata seen across hosts, traffic over the bridge only, a shaped link, and a
crashed home node's segment turning "lost".

Tests run in file order on one module-scoped cluster; the last one kills agent a.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import time

import vas

#: Node lease TTL the agents use (NodeConfig default heartbeat_ttl; no flag sets it).
NODE_TTL = 10


def _state_json(hosts, host: int, name: str) -> dict:
    code = f"""
import dataclasses, json, vas
with vas.connect() as c:
    info = c.stat({name!r})
    listed = [s.name for s in c.list()]
print(json.dumps({{"info": dataclasses.asdict(info), "listed": listed}}))
"""
    return json.loads(hosts.run(host, code).stdout)


def test_agents_register_with_their_namespace_ips(hosts):
    prefix = f"10.77.{hosts.subnet}."
    with vas.connect(hosts.nodes[0].socket) as client:
        nodes = {n.id: n for n in client.nodes()}
    assert set(nodes) == {p.node_id for p in hosts.nodes}
    for proc, ip in zip(hosts.nodes, hosts.ips):
        info = nodes[proc.node_id]
        assert info.address.startswith(prefix), info
        assert info.address.rsplit(":", 1)[0] == ip
        assert info.address == proc.address
        assert info.socket == proc.socket
        assert info.state == "ready"


def test_segment_made_in_a_is_seen_from_b(hosts):
    payload = b"hello from namespace a"
    code = f"""
import vas
with vas.connect() as c:
    c.create("mh/seg", 1 << 16, mode=0o644)
    with c.attach("mh/seg", "rw") as m:
        m.write(0, {payload!r})
    with c.attach("mh/seg", "r") as m:
        assert m.read(0, {len(payload)}) == {payload!r}
print("ok")
"""
    assert hosts.run(0, code).stdout.strip() == "ok"

    seen = _state_json(hosts, 1, "mh/seg")
    assert seen["info"]["home"] == hosts.nodes[0].node_id
    assert seen["info"]["state"] == "ready"
    assert seen["info"]["size"] == 1 << 16
    assert "mh/seg" in seen["listed"]


def test_b_reaches_the_coordinator_only_through_the_bridge(hosts):
    ns_b, veth_b = hosts.namespaces[1], hosts.ns_veths[1]
    subnet = f"10.77.{hosts.subnet}.0/24"
    routes = [line.split() for line in
              _ip_out("-4", "-n", ns_b, "route", "show", "table", "all").splitlines()
              if line.strip() and "table local" not in line]
    # Only the connected bridge subnet, on the veth: no default route, nothing else.
    assert routes and all(r[0] == subnet and r[r.index("dev") + 1] == veth_b for r in routes), \
        routes
    for target in (hosts.ips[0], hosts.bridge_ip):
        route = _ip_out("-n", ns_b, "route", "get", target)
        assert f"dev {veth_b}" in route and " via " not in route, route
    # Nothing off the subnet is reachable from the namespace (traffic cannot leave).
    assert _ip_run("-n", ns_b, "route", "get", "192.0.2.1").returncode != 0

    # And a request from b really crosses b's veth: its bridge-side end's counters grow
    # (agent b -> coordinator -> etcd round trip for a stat).
    before = _rx_packets(hosts.host_veths[1])
    _state_json(hosts, 1, "mh/seg")
    assert _rx_packets(hosts.host_veths[1]) > before


def test_a_shaped_link_limits_what_a_sends(hosts):
    """Hosts.shaped (bench/netns.py's 2 gbit home link): a's sending goes through a token
    bucket while the block lasts, and the qdisc is gone after it."""
    size, rate = 8 << 20, 100e6  # 8 MiB at 100 mbit/s: 0.67 s (the first 1 MB is burst)
    digest = hosts.fill(0, "mh/shaped", size)
    with hosts.shaped(0, "100mbit"), vas.connect(hosts.nodes[1].socket) as client:
        started = time.monotonic()
        with client.attach("mh/shaped", "r", fetch="eager") as mapping:
            took = time.monotonic() - started
            assert hashlib.sha256(mapping.buffer).hexdigest() == digest
        qdiscs = _ip_out("netns", "exec", hosts.namespaces[0], "tc", "qdisc", "show", "dev",
                         hosts.ns_veths[0])
        assert "tbf" in qdiscs, qdiscs
    assert took >= (size - 1_000_000) * 8 / rate * 0.9, took
    qdiscs = _ip_out("netns", "exec", hosts.namespaces[0], "tc", "qdisc", "show", "dev",
                     hosts.ns_veths[0])
    assert "tbf" not in qdiscs, qdiscs
    with vas.connect(hosts.nodes[0].socket) as client:
        client.delete("mh/shaped")


def test_killed_home_makes_its_segment_lost_from_b(hosts):
    hosts.nodes[0].kill()
    deadline = NODE_TTL + 5
    code = f"""
import time, vas
start = time.monotonic()
with vas.connect() as c:
    while True:
        info = c.stat("mh/seg")
        if info.state == "lost":
            print(f"lost {{time.monotonic() - start:.2f}}")
            break
        assert info.state == "ready", info
        if time.monotonic() - start > {deadline}:
            print(f"still {{info.state}}")
            break
        time.sleep(0.1)
"""
    began = time.monotonic()
    out = hosts.run(1, code, timeout=deadline + 30).stdout.strip()
    assert out.startswith("lost"), out
    assert time.monotonic() - began < deadline + 10
    with vas.connect(hosts.nodes[1].socket) as client:
        assert [n.id for n in client.nodes()] == [hosts.nodes[1].node_id]


def _ip_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _ip_out(*args: str) -> str:
    done = _ip_run(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _rx_packets(link: str) -> int:
    with open(f"/sys/class/net/{link}/statistics/rx_packets") as f:
        return int(f.read())
