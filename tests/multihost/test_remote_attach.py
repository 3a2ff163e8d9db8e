"""Remote attach across network namespaces: agent b keeps a replica of a segment homed
on agent a, copied over the bridge (bulk TCP channel between the namespace IPs).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys



MiB = 1 << 20
SIZE = 256 * MiB


def test_eager_attach_across_namespaces(hosts):
    made = hosts.fill(0, "mh/big", SIZE)
    copied = json.loads(hosts.run(1, """
import hashlib, json, time, vas
with vas.connect() as c:
    start = time.perf_counter()
    with c.attach("mh/big", fetch="eager") as m:
        took = time.perf_counter() - start
        print(json.dumps({"sha": hashlib.sha256(m.buffer).hexdigest(), "took": took,
                          "home": m.info.home, "used": c.local_node.memory_used}))
""").stdout)
    assert copied["sha"] == made
    assert copied["home"] == hosts.nodes[0].node_id
    print(f"256 MiB eager attach over veth: {copied['took']:.3f} s, "
          f"{SIZE / copied['took'] / 1e9:.2f} GB/s")


def test_vasctl_seg_get_in_the_other_namespace(hosts):
    expected = hashlib.sha256()
    done = subprocess.run(
        ["ip", "netns", "exec", hosts.namespaces[1], sys.executable, "-m", "vas.cli", "seg",
         "get", "mh/big"], capture_output=True, timeout=120, cwd="/",
        env={**os.environ, "VAS_NODE": hosts.nodes[1].socket})
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) == SIZE
    made = hosts.run(0, """
import hashlib, vas
with vas.connect() as c, c.attach("mh/big") as m:
    print(hashlib.sha256(m.buffer).hexdigest())
""").stdout.strip()
    expected.update(done.stdout)
    assert expected.hexdigest() == made
