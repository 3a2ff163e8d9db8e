"""A segment outlives the process that wrote it.

    vasctl up &                       # or any running cluster; then, as printed:
    export VAS_NODE=/tmp/vas-.../node1.sock
    python examples/demo.py

1. create a 64 MiB segment "demo" (this process),
2. a child process attaches it "rw", fills it with a pattern through a
   zero-copy numpy view, prints the sha256 and exits,
3. another child process attaches it read-only and prints the sha256 of what
   it sees; the segment lived on in the agent in between.

``vasctl up --demo`` runs the same steps against a fresh local cluster.
Exit status 0 when both digests match.
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import sys

import numpy as np

import vas

NAME = "demo"
SIZE = 64 << 20


def writer(node: str | None, results) -> None:
    with vas.connect(node) as c, c.attach(NAME, "rw") as m:
        words = m.ndarray(np.uint64)  # the segment's pages themselves, no copy
        words[:] = np.arange(words.size, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        del words  # views must go before the mapping is detached
        results.put(("writer", hashlib.sha256(m.buffer).hexdigest()))


def reader(node: str | None, results) -> None:
    with vas.connect(node) as c, c.attach(NAME) as m:
        results.put(("reader", hashlib.sha256(m.buffer).hexdigest()))


def main(node: str | None = None) -> int:
    with vas.connect(node) as c:
        info = c.create(NAME, SIZE, exist_ok=True)
        print(f"segment {info.name}: {info.size >> 20} MiB at 0x{info.address:x} on {info.home}")

    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, like separate programs
    results = ctx.Queue()
    digests = {}
    for role in (writer, reader):
        proc = ctx.Process(target=role, args=(node, results))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            print(f"{role.__name__} failed with exit code {proc.exitcode}", file=sys.stderr)
            return 1
        name, digest = results.get(timeout=10)
        digests[name] = digest
        print(f"{name:<6} (pid {proc.pid}, exited) sha256 {digest}")

    if digests["writer"] != digests["reader"]:
        print("FAILED: the reader saw different bytes", file=sys.stderr)
        return 1
    print("OK: the segment outlived its writer; the reader saw the same bytes")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", default=None, help="agent socket (default $VAS_NODE)")
    sys.exit(main(parser.parse_args().node))
