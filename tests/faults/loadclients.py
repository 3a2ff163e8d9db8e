"""The processes of tests/faults/test_load.py: load clients and the writer.

A module of its own that imports only vas, so the test's forkserver can preload it
once and fork every client from there: 32 interpreters each importing vas (and
pytest, through the test module) cost ~0.5 s of CPU apiece, more than their 500
cycles.
"""
from __future__ import annotations

import collections
import hashlib
import time
import traceback

import vas

KiB = 1 << 10
SIZE = 64 * KiB
NAMES = ("load/one", "load/two", "load/synced")
#: The writer stops after this many syncs if it was not told to stop earlier, and
#: syncs at most once per SYNC_INTERVAL seconds (~100 versions a second: unpaced, its
#: publishes alone took half of the machine's two CPUs, in the agent, the coordinator
#: and etcd, from the clients the test is about).
WRITER_LIMIT = 100_000
SYNC_INTERVAL = 0.01


def content() -> bytes:
    """The bytes of every segment at every version (the writer rewrites the same)."""
    return bytes((i * 7 + i // 4096) % 251 for i in range(SIZE))


def client(number: int, socket: str, cycles: int, expected: str, results) -> None:
    """One client process: ``cycles`` attach/read/check/detach cycles; puts its report."""
    errors: collections.Counter = collections.Counter()
    first, versions, done = None, {}, 0
    try:
        with vas.connect(socket) as connection:
            for cycle in range(cycles):
                name = NAMES[(number + cycle) % len(NAMES)]
                try:
                    with connection.attach(name) as mapping:
                        if hashlib.sha256(mapping.buffer).hexdigest() != expected:
                            raise AssertionError(f"{name} v{mapping.version}: wrong bytes")
                        if mapping.version < versions.get(name, 0):
                            raise AssertionError(f"{name}: version {mapping.version} after "
                                                 f"{versions[name]}")
                        versions[name] = mapping.version
                    done += 1
                except Exception as exc:  # noqa: BLE001  counted and reported
                    errors[type(exc).__name__] += 1
                    first = first or f"cycle {cycle}: {traceback.format_exc()}"
    except Exception:  # noqa: BLE001  reported to the test
        first = first or traceback.format_exc()
        errors["connect"] += 1
    results.put({"client": number, "done": done, "errors": dict(errors), "first": first,
                 "versions": versions, "cpu": time.process_time()})


def writer(socket: str, data: bytes, stop, results) -> None:
    """Write ``data`` and sync, until ``stop`` is set (or WRITER_LIMIT syncs); puts the
    number of syncs and the last version, or the error."""
    syncs, version, error = 0, 0, None
    try:
        with vas.connect(socket) as connection, \
                connection.attach("load/synced", "rw") as mapping:
            while syncs < WRITER_LIMIT and not stop.wait(SYNC_INTERVAL):
                mapping.write(0, data)
                version = mapping.sync()
                syncs += 1
    except Exception:  # noqa: BLE001  reported to the test
        error = traceback.format_exc()
    results.put({"syncs": syncs, "version": version, "error": error})


