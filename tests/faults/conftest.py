"""Fault-injection tests: real agents and processes that are stopped, killed or cut off.

Fixtures (``etcd``, ``cluster``, ``world_dir``, ...) come from tests/conftest.py, and
``waiting.wait_for`` from tests/waiting.py (on sys.path through that conftest).
"""
