"""PLACEHOLDER until the lockcheck branch lands: Rank table + plain locks."""
from __future__ import annotations

import enum
import threading


class Rank(enum.IntEnum):
    HOMES = 10
    REPLICAS = 20
    SEGMENT = 30
    STORE = 40
    SESSIONS = 50
    WRITERS = 55
    LAZY_FILL = 60
    FAULT_LEADER = 65
    FAULTS = 70
    HOME_CHANNELS = 80
    BULK = 90
    PEERS = 100
    TIMER = 110
    CONNECTIONS = 120


def Lock(name: str, rank: int):  # noqa: N802
    return threading.Lock()


def assert_unlocked(what: str) -> None:
    return None
