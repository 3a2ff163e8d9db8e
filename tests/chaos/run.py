"""The chaos run, standalone (tests/chaos/chaoskit.py says what it does and checks):

    .venv/bin/python tests/chaos/run.py --duration 300 --seed 1 [--netns] [--keep DIR]
    .venv/bin/python -m tests.chaos.run --duration 60

prints the faults injected by kind, the processes that died and were restarted, the
history's figures and any violation, then as its last line one JSON object with every
figure. Exit status 0 when the history holds every promise, 1 when not, 2 for bad usage.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # chaoskit, and tests/ (history)

import chaoskit  # noqa: E402
import vas  # noqa: E402
from vas.cluster import LaunchError  # noqa: E402

#: Checker figures printed, in this order (the JSON line has all of them).
_SHOWN = ("bytes verified", "final bytes verified", "versions acknowledged",
          "versions seen by readers", "versions skipped after an ambiguous sync", "read",
          "final", "final-failed", "ack", "begin", "stale writes", "sync-failed", "read-failed",
          "attach-failed")


def _parse(argv):
    parser = argparse.ArgumentParser(prog="tests/chaos/run.py", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds (>= 15)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--netns", action="store_true",
                        help="agents in network namespaces; adds link cuts (root only)")
    parser.add_argument("--replicas", type=int, default=0,
                        help="replicas of every segment (enables home kills)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="agents keep segments in DIR/NODE (a new directory, best on "
                             "tmpfs such as /dev/shm; enables home kills)")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR and keep its logs")
    args = parser.parse_args(argv)
    if args.duration < 15:
        parser.error("--duration must be at least 15 seconds")
    if args.replicas < 0:
        parser.error("--replicas must be >= 0")
    if args.data_dir and os.path.isdir(args.data_dir) and os.listdir(args.data_dir):
        parser.error("--data-dir must be a new or empty directory (agents adopt what is there)")
    return args


def _table(result: chaoskit.Result) -> str:
    lines = [f"{'fault':<20} {'injected':>8}"]
    lines += [f"{kind:<20} {result.faults[kind]:>8}" for kind in sorted(result.faults)]
    lines.append(f"{'total':<20} {sum(result.faults.values()):>8}")
    lines += [f"{kind:<20} {n:>8}  (could not be set up)" for kind, n in result.skipped.items()]
    lines += ["", f"{'process exits (restarted)':<28} {'count':>6}"]
    lines += [f"{kind:<28} {n:>6}" for kind, n in sorted(result.exits.items())]
    lines += ["", f"{'history':<42} {'figure':>14}"]
    lines += [f"{name:<42} {result.figures[name]:>14,}" for name in _SHOWN]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    config = chaoskit.Config(duration=args.duration, seed=args.seed, netns=args.netns,
                             replicas=args.replicas, data_dir=args.data_dir)
    directory = args.keep or tempfile.mkdtemp(prefix="vas-chaos-")
    os.makedirs(directory, exist_ok=True)
    os.chmod(directory, 0o755)  # agents' sockets live there
    try:
        result = chaoskit.run(config, directory)
    except (vas.VasError, LaunchError) as exc:  # e.g. --replicas or --data-dir, not built yet
        lines = [line for line in str(exc).splitlines() if line.strip()]
        print(f"chaos run could not start: {lines[0]}"
              + (f" ({lines[-1].strip()})" if len(lines) > 1 else ""), file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    print(f"chaos run: {result.seconds:.0f} s, seed {args.seed}, kinds {config.kinds()}")
    print(_table(result))
    for problem in result.problems[:50]:
        print(f"VIOLATION: {problem}")
    print(json.dumps({
        "result": "ok" if not result.problems else "violations",
        "seconds": round(result.seconds, 1), "seed": args.seed, "netns": args.netns,
        "replicas": args.replicas, "data_dir": args.data_dir, "kinds": config.kinds(),
        "faults": dict(result.faults), "faults_total": sum(result.faults.values()),
        "skipped": dict(result.skipped), "exits": dict(result.exits),
        "figures": dict(result.figures), "violations": len(result.problems)}))
    return 0 if not result.problems else 1


if __name__ == "__main__":
    sys.exit(main())
