"""fetch="lazy" across network namespaces: agent b pages in a segment homed on agent a."""
from __future__ import annotations

import json

import pytest

MiB = 1 << 20
SIZE = 256 * MiB


def test_lazy_attach_across_namespaces(hosts):
    made = hosts.fill(0, "mh/lazy", SIZE)
    paged = json.loads(hosts.run(1, """
import hashlib, json, time, vas
with vas.connect() as c:
    start = time.perf_counter()
    with c.attach("mh/lazy") as m:
        took = time.perf_counter() - start
        print(json.dumps({"sha": hashlib.sha256(m.buffer).hexdigest(), "took": took,
                          "fetch": m.fetch}))
""").stdout)
    assert paged["sha"] == made
    if paged["fetch"] != "lazy":
        pytest.skip(f"no demand paging in the namespace: {paged['fetch']}")
    print(f"256 MiB lazy attach over veth: {paged['took'] * 1e3:.1f} ms to map")
