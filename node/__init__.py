"""The vas node agent (``vas.node``): holds this machine's segments and serves local clients.

Modules, by responsibility (docs/ARCHITECTURE.md "Node agent" draws the map):

- ``server`` (``serve(config)``), ``config`` (NodeConfig);
- ``local`` (the Unix socket server: its threads, connections, refused ones),
  ``dispatch`` (which local request runs next, per uid), ``localwire`` (framing,
  errors -> response codes), ``limits`` (per-uid counts) and ``localapi`` (one thin
  handler per local.proto request); ``service`` (the Node gRPC service for other agents);
- ``agent`` (the parts joined, and the flows that cross them);
- ``homes`` (segments homed here), ``replicas`` (copies of segments homed
  elsewhere), ``writers`` (writer locks, publishing, wait), ``revoke`` (home
  writers' mappings write-protected when their lock is revoked), ``sessions``
  (connections and attachments), ``membership`` (registration, heartbeats,
  attachment reports), ``notices`` (telling the nodes holding replicas of a gone
  segment), ``spaces`` (the space records kept while watched), ``changes`` (the
  change counter that lets Client.switch skip its Revalidate);
- ``segments`` (the held types and their life cycles), ``store`` (memfds,
  capacity), ``pool`` (warm replica memory), ``access`` (mode-bit checks);
- ``lazy`` (demand paging), ``faults`` (the userfault resolvers), ``bulk`` (the
  TCP bulk channel), ``publish`` (chunk arithmetic), ``clients`` (typed gRPC
  clients), ``timer``, ``locks`` (lock ranks and the lock-order checker);
- ``metrics`` (every Prometheus metric of the agent).
"""
