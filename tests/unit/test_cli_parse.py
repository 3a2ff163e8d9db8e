"""vasctl's parsing, exit codes and printers (no cluster needed).

Exit codes: 2 for bad usage (flags, size text, mode text), 1 for every other
error, each error one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from vas.cli import printers
from vas.cli.main import EXIT_ERROR, EXIT_USAGE, build_parser, main, mode_type, size_type
from vas.cli.seg import owner_type
from vas.core.types import NodeInfo, SegmentInfo

SEGMENT = SegmentInfo(name="demo", id=7, size=64 << 20, address=0x200000000000, mode=0o640,
                      uid=0, gid=0, home="node1", replicas=0, version=3, state="ready",
                      attachments=2, created=1700000000.0, expires=None)


def usage_error(argv, capsys) -> str:
    """Run main(argv), expect exit code 2, return the single stderr line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize("argv, fragment", [
    (["seg", "create", "x", "--size", "12XB"], "argument --size: invalid size '12XB'"),
    (["seg", "create", "x", "--size", "-5"], "argument --size: invalid size '-5'"),
    (["seg", "create", "x"], "the following arguments are required: --size"),
    (["seg", "create", "x", "--size", "1MiB", "--mode", "rwx"], "argument --mode: invalid mode 'rwx'"),
    (["seg", "create", "x", "--size", "1MiB", "--mode", "1777"], "invalid mode '1777'"),
    (["seg", "create", "x", "--size", "1MiB", "--mode", "8"], "invalid mode '8'"),
    (["seg", "create", "x", "--size", "1MiB", "--replicas", "two"], "argument --replicas"),
    (["seg", "chmod", "x", "999"], "argument mode: invalid mode '999'"),
    (["seg", "chown", "x", "1000"], "invalid owner '1000': expected UID:GID"),
    (["seg", "chown", "x", "no-such-user-here:0"], "no user named 'no-such-user-here'"),
    (["seg", "chown", "x", "0:no-such-group-here"], "no group named 'no-such-group-here'"),
    (["seg", "get", "x", "--length", "lots"], "argument --length: invalid size 'lots'"),
    (["seg", "put", "x"], "the following arguments are required: FILE"),
    (["seg", "ls", "-o", "yaml"], "argument -o/--output: invalid choice: 'yaml'"),
    (["seg", "frobnicate"], "invalid choice: 'frobnicate'"),
    (["space", "add", "sp", "seg", "--mode", "w"], "argument --mode: invalid choice: 'w'"),
    (["node", "ls", "--bogus"], "unrecognized arguments: --bogus"),
    (["up", "--nodes", "0"], "invalid count '0'"),
    (["up", "--memory", "lots"], "argument --memory: invalid size 'lots'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_usage_errors_exit_2_with_one_line(argv, fragment, capsys):
    line = usage_error(argv, capsys)
    assert line.startswith("vasctl") and ": error: " in line
    assert fragment in line


@pytest.mark.parametrize("text, mode", [("640", 0o640), ("0640", 0o640), ("0o755", 0o755),
                                        ("0", 0), ("777", 0o777), ("0777", 0o777)])
def test_mode_type(text, mode):
    assert mode_type(text) == mode


@pytest.mark.parametrize("text", ["", "rw", "8", "1000", "0o", "-1", "00640", "6 4"])
def test_mode_type_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="invalid mode"):
        mode_type(text)


def test_size_and_owner_types():
    assert size_type("64MiB") == 64 << 20 and size_type("4096") == 4096
    assert owner_type("1000:100") == (1000, 100)
    assert owner_type("root:0") == (0, 0)
    with pytest.raises(argparse.ArgumentTypeError):
        size_type("1.5")
    with pytest.raises(argparse.ArgumentTypeError, match="expected UID:GID"):
        owner_type(":0")


def test_parsed_values():
    args = build_parser().parse_args(
        ["seg", "create", "frames/0", "--size", "64MiB", "--mode", "640", "--replicas", "1",
         "--ttl", "30", "--node", "/x.sock", "-o", "json"])
    assert (args.name, args.size, args.mode, args.replicas, args.ttl, args.node, args.output) == \
        ("frames/0", 64 << 20, 0o640, 1, 30.0, "/x.sock", "json")
    args = build_parser().parse_args(["seg", "get", "d", "--offset", "4KiB", "-o", "out.bin"])
    assert (args.offset, args.length, args.output) == (4096, None, "out.bin")
    args = build_parser().parse_args(["space", "rm", "sp"])
    assert (args.space, args.segment) == ("sp", None)
    args = build_parser().parse_args(["up", "--nodes", "2", "--memory", "256MiB", "--demo"])
    assert (args.nodes, args.memory, args.demo, args.etcd) == (2, 256 << 20, True, None)
    args = build_parser().parse_args(["node", "serve", "--coordinator", "h:1", "--memory", "2GiB"])
    assert args.memory == 2 << 30 and args.coordinator == "h:1"


@pytest.mark.parametrize("argv", [["seg", "ls"], ["seg", "stat", "x"], ["node", "ls"], ["status"],
                                  ["space", "ls"], ["seg", "create", "x", "--size", "4096"]])
def test_unreachable_agent_exits_1_with_one_line(argv, tmp_path, capsys):
    path = str(tmp_path / "none.sock")
    assert main([*argv, "--node", path]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err == (f"vasctl: error: cannot reach the vas agent at {path}: No such file or "
                   "directory (is `vasctl node serve` running? set $VAS_NODE)\n")


def test_client_side_invalid_value_exits_1(tmp_path, capsys):
    # "0" is a well-formed size, so this is not a usage error: the client refuses it.
    assert main(["seg", "create", "x", "--size", "0", "--node", str(tmp_path / "s")]) == EXIT_ERROR
    assert capsys.readouterr().err == "vasctl: error: invalid size 0: must be > 0\n"


def test_help_of_every_command_exits_0(capsys):
    for argv in (["--help"], ["seg", "--help"], ["seg", "put", "--help"], ["space", "--help"],
                 ["node", "--help"], ["node", "serve", "--help"], ["status", "--help"],
                 ["up", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0, argv
    capsys.readouterr()


def test_vasctl_as_a_process_exits_2_on_bad_size():
    proc = subprocess.run([sys.executable, "-m", "vas.cli", "seg", "create", "x", "--size", "big"],
                          capture_output=True, text=True, cwd="/", timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "invalid size 'big'" in proc.stderr


# -- printers ---------------------------------------------------------------------------

def test_format_helpers():
    assert printers.format_mode(0o640) == "0640" and printers.format_mode(0o7) == "0007"
    assert printers.format_address(0x200000000000) == "0x200000000000"
    assert printers.format_owner(0, 0) == "root:root"
    assert printers.format_owner(4_000_000_000, 4_000_000_001) == "4000000000:4000000001"


def test_segment_table(capsys):
    printers.print_segments([SEGMENT], "table")
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "SIZE", "ADDRESS", "MODE", "OWNER", "HOME", "VERSION",
                              "STATE", "ATTACH"]
    assert row.split() == ["demo", "64.0", "MiB", "0x200000000000", "0640", "root:root", "node1",
                           "3", "ready", "2"]
    assert header.index("ADDRESS") == row.index("0x200000000000")  # columns line up


def test_segment_json_has_every_field(capsys):
    printers.print_segments([SEGMENT], "json")
    (obj,) = json.loads(capsys.readouterr().out)
    assert obj == {"name": "demo", "id": 7, "size": 64 << 20, "address": 0x200000000000,
                   "mode": 0o640, "uid": 0, "gid": 0, "home": "node1", "replicas": 0,
                   "version": 3, "state": "ready", "attachments": 2, "created": 1700000000.0,
                   "expires": None, "meta": {}, "copies": []}


def test_node_json_and_stat(capsys):
    node = NodeInfo(id="node1", address="127.0.0.1:1", socket="/s", memory_total=1 << 30,
                    memory_used=0, segments=0, state="ready")
    printers.print_nodes([node], "json")
    assert json.loads(capsys.readouterr().out) == [{
        "id": "node1", "address": "127.0.0.1:1", "socket": "/s", "memory_total": 1 << 30,
        "memory_used": 0, "segments": 0, "state": "ready", "down_since": None, "replicas": 0,
        "replica_bytes": 0}]
    printers.print_segment(SEGMENT, "table")
    out = capsys.readouterr().out
    assert "mode         0640" in out and "0x200000000000-0x200004000000" in out
    printers.print_segment(SEGMENT, "json")
    assert json.loads(capsys.readouterr().out)["name"] == "demo"
