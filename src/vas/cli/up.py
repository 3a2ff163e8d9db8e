"""``vasctl up``: a whole local cluster (etcd, a coordinator, N agents) for trying vas out.

Starts the processes with vas.cluster.LocalCluster, prints the ``export`` lines a
shell needs, and serves until SIGINT/SIGTERM, then stops everything. With
``--demo`` it instead runs the demo (the same steps as examples/demo.py: one
process writes a segment and exits, another reads it back) and shuts down.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading

from vas.cli.daemons import add_log_options, setup_logging
from vas.cli.main import examples, size_type
from vas.core.defaults import DEFAULT_MEMORY
from vas.core.errors import VasError
from vas.core.signals import setting
from vas.core.sizes import format_size

DEMO_SEGMENT = "demo"
DEMO_SIZE = 64 << 20

# The two demo processes; each prints the sha256 of the segment's bytes.
_DEMO_WRITER = """
import hashlib, sys, numpy as np, vas
with vas.connect(sys.argv[1]) as c, c.attach(sys.argv[2], "rw") as m:
    words = m.ndarray(np.uint64)
    words[:] = np.arange(words.size, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    del words
    print(hashlib.sha256(m.buffer).hexdigest())
"""
_DEMO_READER = """
import hashlib, sys, vas
with vas.connect(sys.argv[1]) as c, c.attach(sys.argv[2]) as m:
    print(hashlib.sha256(m.buffer).hexdigest())
"""


def register(nouns: argparse._SubParsersAction) -> None:
    p = nouns.add_parser("up", help="run a local cluster until interrupted",
                         description="Start etcd (unless --etcd), a coordinator and N node agents "
                                     "on this machine; print the export lines; serve until "
                                     "SIGINT/SIGTERM.",
                         epilog=examples("vasctl up --nodes 2 --memory 1GiB",
                                         "vasctl up --demo"))
    p.add_argument("--nodes", type=_positive_int, default=1, help="number of node agents (default 1)")
    p.add_argument("--etcd", metavar="URL", default=None,
                   help="use this etcd (e.g. http://127.0.0.1:2379) instead of starting one")
    p.add_argument("--dir", default=None,
                   help="directory for sockets, logs and etcd data (default: a new temporary one, removed at exit)")
    p.add_argument("--memory", type=size_type, default=DEFAULT_MEMORY,
                   help=f"segment memory per node, e.g. 4GiB (default {format_size(DEFAULT_MEMORY)})")
    p.add_argument("--tls", action="store_true",
                   help="mutual TLS on every hop, etcd's included, with a throwaway CA and "
                        "certificates made in DIR/tls; prints the VAS_TLS_* exports of an "
                        "admin client (this user)")
    p.add_argument("--demo", action="store_true",
                   help="run the demo (write a segment in one process, read it in another) and exit")
    add_log_options(p)  # also handed to every daemon it starts
    # Its daemons get certificates of their own (--tls): the TLS options are not its.
    p.set_defaults(func=up, tls_options=False)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: must be an integer >= 1")
    return value


def up(args) -> int:
    # Imported here, as hashlib in run_demo: only `up` needs them, and every other command
    # builds this parser (and so imports this module) too.
    import tempfile

    from vas.cli.main import UsageError
    from vas.cluster import LocalCluster

    if args.tls_cert or args.tls_key or args.tls_ca:
        raise UsageError("vasctl up does not take --tls-cert/--tls-key/--tls-ca: its daemons "
                         "each need their own certificate; --tls makes them")
    if args.tls and args.etcd and args.etcd.strip().startswith("https://"):
        raise UsageError("vasctl up --tls cannot use an https:// --etcd: its throwaway CA "
                         "signs no certificate that etcd trusts")

    setup_logging(args)
    log_args = ["--log-level", args.log_level, "--log-format", args.log_format]
    made_dir = args.dir is None
    directory = tempfile.mkdtemp(prefix="vas-") if made_dir else os.path.abspath(args.dir)
    if made_dir:
        os.chmod(directory, 0o755)  # every local user may reach the agents' sockets
    else:
        os.makedirs(directory, exist_ok=True)

    stop = threading.Event()
    previous = {}
    cluster = LocalCluster(directory, nodes=args.nodes, memory=args.memory, etcd_url=args.etcd,
                           tls=args.tls, node_args=log_args, coordinator_args=log_args)
    try:
        # Until serving starts, SIGINT is a KeyboardInterrupt (exit 130), still stopping
        # whatever started; SIGTERM too.
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            cluster.start()
        except (VasError, OSError, KeyboardInterrupt):
            raise
        except Exception as exc:  # the launcher's own errors: one line, exit 1
            raise VasError(f"could not start the local cluster in {directory}: {exc}") from exc
        env = cluster.env()
        if args.demo:
            return run_demo(env)
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.signal(sig, setting(stop))
            previous.setdefault(sig, old)
        for key, value in env.items():
            print(f"export {key}={shlex.quote(str(value))}")
        for index, node in enumerate(cluster.nodes, 1):
            print(f"# {getattr(node, 'node_id', None) or f'node{index}'} socket {node.socket}")
        sys.stdout.flush()
        print(f"vas: {args.nodes} node(s) up in {directory}; Ctrl-C (SIGINT) or SIGTERM stops "
              "them", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        print("vas: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if made_dir:
            shutil.rmtree(directory, ignore_errors=True)


def _raise_interrupt(*_):
    raise KeyboardInterrupt


def run_demo(env: dict) -> int:
    """The demo of examples/demo.py against the cluster in ``env``; 0 if the digests match."""
    import hashlib

    import vas

    socket_path = env["VAS_NODE"]
    child_env = {**os.environ, **env}
    with vas.connect(socket_path) as client:
        info = client.create(DEMO_SEGMENT, DEMO_SIZE, exist_ok=True)
        print(f"demo: segment {info.name}: {info.size >> 20} MiB at 0x{info.address:x}, "
              f"home {info.home}", flush=True)
        digests = []
        for role, code in (("writer", _DEMO_WRITER), ("reader", _DEMO_READER)):
            proc = subprocess.run([sys.executable, "-c", code, socket_path, DEMO_SEGMENT],
                                  env=child_env, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                print(f"demo: the {role} process failed (exit {proc.returncode})", flush=True)
                return 1
            digest = proc.stdout.strip()
            digests.append(digest)
            print(f"demo: {role:<6} process (exited) sha256 {digest}", flush=True)
        with client.attach(DEMO_SEGMENT) as mapping:
            here = hashlib.sha256(mapping.buffer).hexdigest()
        print(f"demo: this   process          sha256 {here}", flush=True)
    if digests[0] == digests[1] == here:
        print("demo: OK: the segment outlived its writer and every reader saw the same bytes")
        return 0
    print("demo: FAILED: the digests differ", flush=True)
    return 1
