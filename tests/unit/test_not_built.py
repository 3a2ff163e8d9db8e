"""Flags that are not built yet are refused where the daemon is built, not only by the CLI."""
from __future__ import annotations

import pytest

from vas.core.errors import InvalidArgument
from vas.node.config import DATA_DIR_NOT_BUILT, NodeConfig
from vas.node.server import NodeServer


def test_node_server_refuses_a_data_dir(tmp_path):
    with pytest.raises(InvalidArgument) as info:
        NodeServer(NodeConfig(coordinator="127.0.0.1:1", data_dir=str(tmp_path)))
    assert str(info.value) == DATA_DIR_NOT_BUILT == (
        "--data-dir is not built yet: segments do not survive an agent restart; run without it")
    NodeServer(NodeConfig(coordinator="127.0.0.1:1"))  # None: accepted
