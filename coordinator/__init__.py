"""The coordinator (``vas.coordinator``): a stateless gRPC service over etcd.

It owns global names, address ranges, node membership, the writer locks,
spaces and the segment watch; all of its state lives in etcd (layout in
``keys``), so any number of coordinators may serve one etcd and any of them may
die at any time. Modules: ``config`` (CoordinatorConfig), ``keys`` (every etcd key
and the JSON codec), ``etcd`` (thin etcd client), ``segments``, ``nodes``,
``writers``, ``spaces``, ``watch``, ``status`` (the domain), ``retry`` (the bounded
compare-and-retry loop of every read-modify-write), ``access`` (mode-bit checks),
``service`` (the thin gRPC servicer), ``server`` (``serve``).
"""
