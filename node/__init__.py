"""The vas node agent (``vas.node``): holds this machine's segments and serves local clients.

Modules: ``config`` (NodeConfig), ``store`` (memfd-backed segments, capacity, access
checks), ``agent`` (policy and background threads), ``local`` (the Unix socket
server of local.proto), ``service`` (the Node gRPC service), ``clients`` (gRPC
clients of the coordinator and other agents), ``server`` (``serve(config)``).
"""
