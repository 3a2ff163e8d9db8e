"""Multi-host fixture: every agent in its own Linux network namespace with its own IP
(``vas.netns``: a bridge, one namespace and veth pair per agent, etcd and the coordinator
on the bridge IP; nothing can leave the machine).

    def test_x(hosts):
        hosts.nodes[0].address          # "10.77.X.10:PORT"
        hosts.run(1, "import vas; ...")  # a Python client inside namespace b; its stdout
        with hosts.cut(1) as link:          # namespace b's veth down: a pulled cable
            ...; link.heal()                # up again (also when the block ends)

A test module may set ``HOSTS_NODE_ARGS`` (more flags of every agent, e.g. a short
``--node-ttl``); its agents then start with them.

The module is skipped with the reason when namespaces, veths or bridges cannot be
made (not root / no CAP_NET_ADMIN / no iproute2). Teardown always stops processes
and deletes namespaces, veths and the bridge; at start, leftovers of dead test
processes (namespaces ``vas-<pid>-*``, bridges aliased ``vas-<pid>``) are removed.
"""
from __future__ import annotations

import contextlib

import pytest

from vas.netns import NetnsUnavailable, start_hosts

#: Agents (namespaces) the fixture starts.
HOSTS = 2
#: Capacity of each agent.
MEMORY = 2560 << 20  # room for a 2 GiB segment (lazy replicas only hold touched chunks)
WRITER_TTL = 2  # seconds: a stopped writer loses its lock quickly (fencing tests)


@pytest.fixture(scope="module")
def hosts(request):
    """``HOSTS`` agents in namespaces of their own (with the module's ``HOSTS_NODE_ARGS``),
    etcd and a coordinator on the bridge; see the module docstring and vas.netns."""
    node_args = list(getattr(request.module, "HOSTS_NODE_ARGS", ()))
    with contextlib.ExitStack() as stack:
        try:
            running = stack.enter_context(start_hosts(HOSTS, MEMORY, writer_ttl=WRITER_TTL,
                                                      node_args=node_args))
        except NetnsUnavailable as exc:
            pytest.skip(str(exc))
        yield running
