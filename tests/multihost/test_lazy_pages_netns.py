"""Lazy attach pays only for the pages touched: 10 random pages of a 2 GiB segment homed
on host a, read on host b, move under 16 MiB across b's interface (its rx byte count:
all traffic, agents and gRPC included, so an upper bound)."""
from __future__ import annotations

import json
import subprocess

import pytest

GiB, MiB = 1 << 30, 1 << 20
SIZE = 2 * GiB
PAGES = [int(p) for p in (7, 40_000, 111_111, 200_003, 262_000, 300_001, 350_000, 420_000,
                          480_000, 524_287)]  # page numbers of the 2 GiB segment (4 KiB pages)


def rx_bytes(hosts, host: int) -> int:
    done = subprocess.run(["ip", "-n", hosts.namespaces[host], "-s", "-j", "link", "show", "dev",
                           hosts.ns_veths[host]], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)[0]["stats64"]["rx"]["bytes"]


def test_ten_random_pages_of_2gib_move_under_16mib(hosts):
    hosts.run(0, f"""
import vas
with vas.connect() as c:
    c.create("mh/pages", {SIZE}, mode=0o644)
    with c.attach("mh/pages", "rw") as m:
        for page in {PAGES}:
            m.write(page * 4096, b"page %d" % page)
        m.sync()
""")
    before = rx_bytes(hosts, 1)
    read = json.loads(hosts.run(1, f"""
import json, vas
with vas.connect() as c, c.attach("mh/pages") as m:
    print(json.dumps({{"fetch": m.fetch,
                      "read": [m.read(page * 4096, 16).rstrip(b"\\0").decode() for page in {PAGES}]}}))
""").stdout)
    moved = rx_bytes(hosts, 1) - before
    if read["fetch"] != "lazy":
        pytest.skip(f"no demand paging in the namespace: {read['fetch']}")
    assert read["read"] == [f"page {page}" for page in PAGES]
    assert moved < 16 * MiB, f"{moved} bytes crossed b's interface for 10 pages"
    print(f"10 random pages of 2 GiB, lazy over veth: {moved / MiB:.2f} MiB moved")
    hosts.run(0, """
import vas
vas.connect().delete("mh/pages")
""")
