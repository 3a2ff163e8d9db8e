"""The flags of the local pool, the per-uid and the per-peer limits, and --relay-fanout:
VAS_*, checked."""
from __future__ import annotations

import pytest

from vas.cli.main import build_parser
from vas.core.errors import InvalidArgument
from vas.node.config import (DEFAULT_LOCAL_WORKERS, DEFAULT_MAX_ATTACHMENTS_PER_UID,
                             DEFAULT_MAX_BULK_PER_PEER, DEFAULT_MAX_CONNECTIONS_PER_UID,
                             DEFAULT_MAX_FAULTS_PER_UID, DEFAULT_MAX_STREAMS_PER_PEER,
                             DEFAULT_RELAY_FANOUT, NodeConfig)
from vas.node.server import NodeServer

SERVE = ["node", "serve", "--coordinator", "h:1"]
FLAGS = {"--local-workers": "local_workers", "--max-requests-per-uid": "max_requests_per_uid",
         "--max-connections-per-uid": "max_connections_per_uid",
         "--max-attachments-per-uid": "max_attachments_per_uid",
         "--max-faults-per-uid": "max_faults_per_uid",
         "--max-bulk-per-peer": "max_bulk_per_peer",
         "--max-streams-per-peer": "max_streams_per_peer"}


def test_defaults_flags_and_environment(monkeypatch):
    for flag in FLAGS:
        monkeypatch.delenv("VAS_" + flag[2:].upper().replace("-", "_"), raising=False)
    args = build_parser().parse_args(SERVE)
    assert (args.local_workers, args.max_requests_per_uid, args.max_connections_per_uid,
            args.max_attachments_per_uid, args.max_faults_per_uid) == (
        DEFAULT_LOCAL_WORKERS, None, DEFAULT_MAX_CONNECTIONS_PER_UID,
        DEFAULT_MAX_ATTACHMENTS_PER_UID, DEFAULT_MAX_FAULTS_PER_UID)
    assert (args.max_bulk_per_peer, args.max_streams_per_peer) == (
        DEFAULT_MAX_BULK_PER_PEER, DEFAULT_MAX_STREAMS_PER_PEER)
    assert NodeConfig(coordinator="h:1").requests_per_uid() == DEFAULT_LOCAL_WORKERS - 2
    assert NodeConfig(coordinator="h:1", local_workers=2).requests_per_uid() == 1
    for number, (flag, field) in enumerate(FLAGS.items(), start=3):
        monkeypatch.setenv("VAS_" + flag[2:].upper().replace("-", "_"), str(number))
        assert getattr(build_parser().parse_args(SERVE), field) == number
        assert getattr(build_parser().parse_args(SERVE + [flag, "99"]), field) == 99


@pytest.mark.parametrize("flag, field", FLAGS.items())
def test_a_count_below_one_is_refused_before_anything_starts(flag, field):
    with pytest.raises(InvalidArgument, match=f"^invalid {flag} 0: must be >= 1$"):
        NodeServer(NodeConfig(coordinator="h:1", **{field: 0}))


def test_relay_fanout_flag_environment_and_bounds(monkeypatch):
    """--relay-fanout (node/relay.py): defaulted from VAS_RELAY_FANOUT, 0 turns relays off,
    a negative fan-out is refused."""
    monkeypatch.delenv("VAS_RELAY_FANOUT", raising=False)
    assert build_parser().parse_args(SERVE).relay_fanout == DEFAULT_RELAY_FANOUT
    monkeypatch.setenv("VAS_RELAY_FANOUT", "0")
    assert build_parser().parse_args(SERVE).relay_fanout == 0
    assert build_parser().parse_args(SERVE + ["--relay-fanout", "5"]).relay_fanout == 5
    with pytest.raises(InvalidArgument, match="^invalid --relay-fanout -1: must be >= 0$"):
        NodeServer(NodeConfig(coordinator="h:1", relay_fanout=-1))
