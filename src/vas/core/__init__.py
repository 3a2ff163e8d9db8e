"""The core every part of vas shares (``vas.core``): the client, the CLI, the agent
(``vas.node``) and the coordinator (``vas.coordinator``) all import it, and it
imports none of them.

Modules: ``errors`` (the VasError tree and the one status <-> exception table),
``validate`` (checks of names, sizes, modes, ranges), ``sizes`` (human sizes),
``wire`` (framing of the local protocol on the Unix socket), ``types``
(SegmentInfo, NodeInfo, SpaceInfo), ``defaults`` (constants more than one part
uses, defined once); for the daemons ``logs`` (the one logging set-up), ``metrics``
(the RPC interceptor and the /metrics listener) and ``reflection`` (gRPC reflection
under v1 and v1alpha).

Importing it loads no client code, so a daemon that imports it stays a daemon.
"""
