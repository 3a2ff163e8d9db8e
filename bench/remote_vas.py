"""The vas figures of bench/remote.py: eager remote attach, lazy attach and first
touches, and sync() of a remote writer, on a two-node LocalCluster (node1 the home,
this process a client of node2; remote.py's docstring says how each is timed).

``vas_fill`` is the child process that fills a segment on node1 (remote.py --vas-fill).
``guarded`` turns a phase's known failures into null figures with a reason.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from remote_common import (MiB, PAGE, REMOTE, CheckFailed, PhaseTimeout, checksum, deadline,
                           fill, gbps, lo_bytes, med, percentile, stamp_byte)


# -- vas figures --------------------------------------------------------------------------

def vas_fill(name: str, seed: int) -> int:
    """Child process (on $VAS_NODE): fill segment ``name`` with the pattern; print its CRC."""
    import vas
    with vas.connect() as c, c.attach(name, "rw") as m:
        array = m.ndarray(np.uint8)
        fill(array, seed)
        print(json.dumps({"crc": checksum(array)}), flush=True)
        del array
    return 0


def run_writer(env: dict, name: str, seed: int, timeout: float) -> int:
    out = subprocess.run([sys.executable, REMOTE, "--vas-fill", name,
                          "--seed", str(seed)], env={**os.environ, **env},
                         cwd="/", check=True, capture_output=True, text=True, timeout=timeout)
    return json.loads(out.stdout.strip().splitlines()[-1])["crc"]


def detach_quietly(mapping) -> None:
    """Detach, never masking the exception that got us here (a leftover view -> Busy)."""
    import vas
    with contextlib.suppress(vas.VasError):
        mapping.detach()


def delete_quietly(client, name: str) -> None:
    import vas
    for force in (False, True):
        try:
            client.delete(name, force=force)
            return
        except vas.NotFound:
            return
        except vas.VasError:
            continue


def eager_round(c1, c2, env1: dict, name: str, size: int, seed: int,
                counter=lo_bytes, quiet=None) -> tuple[float, int]:
    """Create ``name`` on node1 (client ``c1``), fill it from a child, time an eager
    attach of it through ``c2``, check its bytes and delete it: the seconds, and how much
    ``counter`` (a byte count read before and after the attach) grew. ``quiet()``, if
    given, is called right before the attach (bench/netns.py: waits for idle agents)."""
    c1.create(name, size)
    try:
        want = run_writer(env1, name, seed, 300)
        if quiet is not None:
            quiet()
        with deadline(300, f"eager attach of {name}"):
            before = counter()
            t0 = time.perf_counter()
            m = c2.attach(name, "r", fetch="eager")
            seconds = time.perf_counter() - t0
            moved = counter() - before
        try:
            got = checksum(np.frombuffer(m.buffer, dtype=np.uint8))
        finally:
            detach_quietly(m)
        if got != want:
            raise CheckFailed(f"eager attach of {name}: bytes on the reader differ from the "
                              "home's")
        return seconds, moved
    finally:
        delete_quietly(c1, name)


def bench_eager(out: dict, c1, c2, env1: dict, size: int, repeats: int, seed: int) -> None:
    rates = []
    for r in range(1 + repeats):
        seconds, moved = eager_round(c1, c2, env1, f"bench/remote/eager{r}", size, seed + r)
        rates.append(gbps(size, seconds))
        if r == 0:
            out["eager_cold_gbps"] = rates[0]
            out["eager_cold_loopback_bytes_per_byte"] = moved / size if lo_bytes() else None
        else:
            out["eager_warm_gbps"] = med(rates[1:])
            out["eager_warm_all_gbps"] = rates[1:]


def bench_lazy(out: dict, c1, c2, env1: dict, size: int, touches: int, seed: int,
               counter=lo_bytes, counted: str = "loopback") -> None:
    """Lazy attach, its first byte and ``touches`` first touches (remote.py's docstring);
    ``counter`` counts the bytes moved up to the first byte (key lazy_ttfb_COUNTED_...)."""
    name = "bench/remote/lazy"
    c1.create(name, size)
    try:
        run_writer(env1, name, seed, 600)
        with deadline(120, "lazy attach"):
            before = counter()
            t0 = time.perf_counter()
            m = c2.attach(name, "r", fetch="lazy")
            t1 = time.perf_counter()
            first = m.buffer[0]
            t2 = time.perf_counter()
            after = counter()
        try:
            if first != stamp_byte(0, seed):
                raise CheckFailed("lazy attach: first byte differs from node1's")
            out["lazy_attach_call_ms"] = (t1 - t0) * 1e3
            out["lazy_ttfb_ms"] = (t2 - t0) * 1e3
            # Bytes moved up to the first byte, per segment byte: near 1 means the
            # "lazy" attach copied the whole segment, and the first touches below then
            # time local reads, not demand paging.
            out[f"lazy_ttfb_{counted}_bytes_per_byte"] = (after - before) / size if after else None
            region = 2 * MiB
            rng = np.random.default_rng(seed)
            regions = rng.choice(np.arange(1, size // region), size=touches, replace=False)
            pages = [int(g) * (region // PAGE) + int(rng.integers(0, region // PAGE))
                     for g in regions]
            lat, bad, view = [], 0, m.buffer
            with deadline(120, "first touches"):
                for page in pages:
                    i = page * PAGE
                    t0 = time.perf_counter_ns()
                    value = view[i]
                    lat.append((time.perf_counter_ns() - t0) / 1e3)
                    bad += value != stamp_byte(page, seed)
            if bad:
                raise CheckFailed(f"first touch: {bad} of {touches} pages differ from node1's")
            out["first_touch_p50_us"] = statistics.median(lat)
            out["first_touch_p99_us"] = percentile(lat, 0.99)
            out["first_touch_max_us"] = max(lat)
        finally:
            view = None  # a live view pins the mapping: drop it before detach
            detach_quietly(m)
    finally:
        delete_quietly(c1, name)


def wait_until_empty(socket_path: str, seconds: float = 60) -> None:
    """Wait until the agent at ``socket_path`` holds no memory: the replicas of the
    previous phase's deleted segments are freed in the background (a 1 GiB free is tens
    of ms of kernel time), which must not be timed as part of the next phase."""
    import vas

    ends = time.monotonic() + seconds
    while True:
        with vas.connect(socket_path) as probe:
            if probe.local_node.memory_used == 0:
                return
        if time.monotonic() > ends:
            raise PhaseTimeout(f"the agent at {socket_path} still holds memory after "
                               f"{seconds:.0f} s")
        time.sleep(0.05)


def bench_sync(out: dict, c1, c2, env1: dict, size: int, rounds: int, seed: int) -> None:
    name = "bench/remote/sync"
    wait_until_empty(c2.socket_path)  # the lazy phase's 1 GiB replica, freed in the background
    c1.create(name, size)
    chunks = size // MiB
    per_round = max(1, chunks // 100)
    times, moved = [], []
    out["sync_changed_bytes"] = per_round * MiB
    array = home_array = None
    try:
        run_writer(env1, name, seed, 300)
        rng = np.random.default_rng(seed + 1)
        order = rng.permutation(chunks)
        with deadline(300, "remote rw attach"):
            m = c2.attach(name, "rw")
        try:
            array = m.ndarray(np.uint8)
            for r in range(rounds):
                picked = sorted(int(x) for x in order[r * per_round:(r + 1) * per_round])
                data = rng.integers(0, 256, (len(picked), MiB), dtype=np.uint8)
                for k, chunk in enumerate(picked):
                    array[chunk * MiB:(chunk + 1) * MiB] = data[k]
                with deadline(120, f"sync round {r}"):
                    lo0 = lo_bytes()
                    t0 = time.perf_counter()
                    m.sync()
                    times.append(time.perf_counter() - t0)
                    moved.append(lo_bytes() - lo0)
                with c1.attach(name, "r") as home:  # the home copy now has the writes?
                    home_array = home.ndarray(np.uint8)
                    for k, chunk in enumerate(picked):
                        if not np.array_equal(home_array[chunk * MiB:(chunk + 1) * MiB], data[k]):
                            raise CheckFailed(f"sync round {r}: chunk {chunk} not on node1")
                    home_array = None
                out["sync_cold_s"], out["sync_cold_loopback_bytes"] = times[0], moved[0]
                if r:
                    out["sync_warm_s"] = med(times[1:])
                    out["sync_warm_loopback_bytes"] = med(moved[1:])
        finally:
            array = home_array = None  # views pin the mapping: drop them before detach
            detach_quietly(m)
    finally:
        delete_quietly(c1, name)


VAS_KEYS = {
    "eager": ["eager_cold_gbps", "eager_warm_gbps"],
    "lazy": ["lazy_ttfb_ms", "lazy_attach_call_ms", "first_touch_p50_us", "first_touch_p99_us"],
    "sync": ["sync_cold_s", "sync_warm_s", "sync_cold_loopback_bytes"],
}


def guarded(results: dict, reasons: dict, keys: list[str], fn, *,
            missing_ok: bool = True) -> bool:
    """Run one group of figures; on a known failure null its figures with a reason.
    False when a check failed or something unexpected happened (exit status 1); with
    ``missing_ok`` vas.Unavailable and NotImplementedError (a feature not built yet) are
    not failures."""
    import vas
    partial: dict = {}
    try:
        fn(partial)
        results.update(partial)
        return True
    except (vas.Unavailable, NotImplementedError) as exc:
        reason, ok = f"{type(exc).__name__}: {exc}", missing_ok
    except (vas.VasError, PhaseTimeout, CheckFailed, subprocess.SubprocessError,
            RuntimeError) as exc:  # RuntimeError: a helper process failed (LaunchError, tc)
        detail = getattr(exc, "stderr", None)
        tail = f" ({detail.strip().splitlines()[-1]})" if detail and detail.strip() else ""
        reason, ok = f"{type(exc).__name__}: {exc}{tail}", False
    results.update(partial)  # figures measured before the failure stand
    nulled = [key for key in keys if results.get(key) is None]
    for key in nulled:
        results[key] = None
        reasons[key] = reason
    if not nulled:  # every figure has rounds from before the failure: say they are partial
        reasons[keys[0]] = f"from the rounds before a failure: {reason}"
    return ok


def bench_vas(results: dict, reasons: dict, size: int, lazy_size: int, repeats: int,
              touches: int, seed: int, tls: bool = False) -> bool:
    import vas
    from vas.cluster import LocalCluster

    ok = True
    memory = lazy_size + 3 * size
    with tempfile.TemporaryDirectory(prefix="vas-bench-") as tmp:
        os.chmod(tmp, 0o755)
        with LocalCluster(tmp, nodes=2, memory=memory, tls=tls) as cluster:
            env1 = {**cluster.env(), "VAS_NODE": cluster.nodes[0].socket}
            with vas.connect(cluster.nodes[0].socket) as c1, \
                    vas.connect(cluster.nodes[1].socket) as c2:
                ok &= guarded(results, reasons, VAS_KEYS["eager"],
                              lambda out: bench_eager(out, c1, c2, env1, size, repeats, seed))
                ok &= guarded(results, reasons, VAS_KEYS["lazy"],
                              lambda out: bench_lazy(out, c1, c2, env1, lazy_size, touches, seed))
                ok &= guarded(results, reasons, VAS_KEYS["sync"],
                              lambda out: bench_sync(out, c1, c2, env1, size, 1 + repeats, seed))
    return ok
