"""vasctl's parsing, exit codes, printers, completion scripts and help (no cluster needed).

Exit codes: 2 for bad usage (flags, size text, mode text, segment and space names), 1 for
every other error, each error one line on stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

import vas
from vas.cli import completion, printers, watch
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
    (["seg", "ls", "-o", "xml"], "argument -o/--output: invalid choice: 'xml'"),
    (["seg", "create", "/abs", "--size", "4096"],
     "argument name: invalid segment name '/abs': must not start with '/'"),
    (["seg", "stat", "a/../b"], "invalid segment name 'a/../b': must not contain a '..' component"),
    (["seg", "get", "a b"], "invalid segment name 'a b': only A-Z a-z 0-9 . _ / - are allowed"),
    (["seg", "rm", "x" * 256], "invalid segment name: longer than 255 characters"),
    (["space", "create", "/sp"], "argument name: invalid space name '/sp'"),
    (["space", "add", "sp", "bad name"], "argument segment: invalid segment name 'bad name'"),
    (["completion", "fish"], "argument shell: invalid choice: 'fish'"),
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


def test_printers_write_yaml_with_the_data_of_json(capsys):
    node = NodeInfo(id="node1", address="127.0.0.1:1", socket="/s", memory_total=1 << 30,
                    memory_used=0, segments=0, state="ready")
    status = {"etcd": "http://127.0.0.1:2379", "revision": 5, "nodes": [node], "segments": 1,
              "segment_bytes": 64 << 20, "spaces": 0, "local_node": "node1"}
    # Text YAML would read as another type must stay a string.
    weird = dataclasses.replace(SEGMENT, name="yes", meta={"k": "null: [1]"})
    for show in (lambda fmt: printers.print_segments([SEGMENT, weird], fmt),
                 lambda fmt: printers.print_segment(SEGMENT, fmt, fetch_here=lambda s: "lazy"),
                 lambda fmt: printers.print_nodes([node], fmt),
                 lambda fmt: printers.print_status(status, fmt)):
        show("json")
        as_json = json.loads(capsys.readouterr().out)
        show("yaml")
        text = capsys.readouterr().out
        assert text.startswith("---") and yaml.safe_load(text) == as_json


def test_one_segment_is_the_same_object_alone_and_in_a_list(capsys):
    fetch_here = lambda s: f"lazy ({s.name})"  # noqa: E731  (shows it is asked per segment)
    printers.print_segments([SEGMENT], "json", fetch_here=fetch_here)
    (item,) = json.loads(capsys.readouterr().out)
    printers.print_segment(SEGMENT, "json", fetch_here=fetch_here)
    alone = json.loads(capsys.readouterr().out)
    assert item == alone and alone["fetch_here"] == "lazy (demo)" and alone["size"] == 64 << 20


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"vasctl {vas.__version__}\n"
    assert importlib.metadata.version("vas") == vas.__version__  # pyproject reads it


def every_parser(parser: argparse.ArgumentParser, path=("vasctl",)):
    """(command path, parser) of ``parser`` and each subcommand under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from every_parser(sub, (*path, name))


def test_every_command_help_ends_with_an_example():
    commands = dict(every_parser(build_parser()))
    assert {("vasctl", "seg", "ls"), ("vasctl", "node", "serve"), ("vasctl", "completion"),
            ("vasctl", "coordinator", "serve"), ("vasctl", "up")} <= set(commands)
    for path, parser in commands.items():
        text = parser.format_help()
        examples = text[text.rindex("\nExample"):]  # the last section
        lines = examples.strip().splitlines()
        assert lines[0] in ("Example:", "Examples:"), (path, text)
        # Every example runs one of our commands (or loads the completion script).
        assert all(line.strip().startswith(("vasctl ", "source <(vasctl", "tar c data | vasctl"))
                   for line in lines[1:]), (path, lines)
        assert len(lines) >= 2, path


# -- completion ---------------------------------------------------------------------------

BASH_COMPLETE = """
source "$1"; shift
COMP_WORDS=("$@"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); COMPREPLY=()
_vasctl
printf '%s\\n' "${COMPREPLY[@]}"
"""


def bash_completions(script_path, *words: str) -> list[str]:
    """What the script's _vasctl offers for the command line ``words`` (the last being
    the word under the cursor), run by bash itself."""
    proc = subprocess.run(["bash", "-c", BASH_COMPLETE, "bash", script_path, "vasctl", *words],
                          capture_output=True, text=True, timeout=30, check=True)
    assert proc.stderr == ""
    return proc.stdout.split()


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("completion") / "vasctl.bash"
    path.write_text(completion.bash_script(completion.command_tree(build_parser())))
    return str(path)


@pytest.mark.parametrize("words, offered", [
    (("se",), ["seg"]),
    (("s",), ["seg", "space", "status"]),
    (("seg", ""), ["create", "ls", "stat", "rm", "chmod", "chown", "put", "get"]),
    (("seg", "ls", "--w"), ["--watch"]),
    (("seg", "ls", "-o", ""), ["table", "json", "yaml"]),
    (("seg", "ls", "-o", "y"), ["yaml"]),
    (("--tls-cert", "seg", "n"), ["node"]),  # an option's value is not taken for a command
    (("node", "ls", "-"), ["-h", "--help", "-o", "--output", "-w", "--watch", "--node"]),
    (("completion", ""), ["bash", "zsh"]),
    (("seg", "get", "x", "-o", ""), []),  # a FILE: bash falls back to file names
])
def test_bash_completion(bash_script, words, offered):
    assert bash_completions(bash_script, *words) == offered


def test_completion_command_prints_the_scripts(capsys):
    assert main(["completion", "bash"]) == 0
    assert "complete -o default -F _vasctl vasctl" in capsys.readouterr().out
    assert main(["completion", "zsh"]) == 0
    assert capsys.readouterr().out.startswith("#compdef vasctl\n")


ZSH_COMPLETE = """
compdef() { : }                       # no compinit here: record what is offered instead
compadd() { [[ $1 == -- ]] && shift; print -l -- "$@" }
_files() { print -- "<files>" }
source "$1"; shift
words=("$@"); CURRENT=$#words; PREFIX=${words[CURRENT]}
_vasctl
"""


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
@pytest.mark.parametrize("words, offered", [
    (("se",), ["up", "coordinator", "seg", "space", "node", "status", "completion"]),
    (("seg", ""), ["create", "ls", "stat", "rm", "chmod", "chown", "put", "get"]),
    (("seg", "ls", "-o", ""), ["table", "json", "yaml"]),
    (("--tls-cert", "seg", ""), ["up", "coordinator", "seg", "space", "node", "status",
                                 "completion"]),  # "seg" was the certificate's file name
    (("--tls-cert", ""), ["<files>"]),
    (("seg", "get", "x", "-o", ""), ["<files>"]),
])
def test_zsh_completion(tmp_path, words, offered):
    """zsh filters what compadd gets by the word typed; the function offers every fit."""
    script = tmp_path / "_vasctl"
    script.write_text(completion.zsh_script(completion.command_tree(build_parser())))
    proc = subprocess.run(["zsh", "-f", "-c", ZSH_COMPLETE, "zsh", str(script), "vasctl", *words],
                          capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.split() == offered


# -- --watch --------------------------------------------------------------------------------

def test_watch_prints_each_change_once_until_interrupted():
    listings = iter([["a"], ["a"], ["a", "b"], ["a", "b"], ["b"]])

    def fetch():
        try:
            return next(listings)
        except StopIteration:
            raise KeyboardInterrupt from None  # Ctrl-C

    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        watch.follow(fetch, lambda names, o: print(" ".join(names), file=o), out, interval=0)
    assert out.getvalue() == "a\n\na b\n\nb\n"  # a pipe: listings a blank line apart


def test_seg_get_refuses_a_terminal_before_reaching_an_agent(tmp_path):
    """No agent at --node: the refusal (exit 2) comes first, with nothing written."""
    import pty

    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "vas.cli", "seg", "get", "x", "--node",
                               str(tmp_path / "none.sock")], stdout=terminal,
                              stderr=subprocess.PIPE, text=True, timeout=60, cwd="/")
    finally:
        os.close(terminal)
        os.close(controller)
    assert proc.returncode == EXIT_USAGE
    assert proc.stderr == ("vasctl: error: refusing to write a segment's bytes to a terminal: "
                           "give -o FILE, or -o - to write them to stdout anyway\n")
