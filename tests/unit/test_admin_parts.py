"""The parts of ``vasctl --coordinator`` that need no cluster: which backend a command
gets (usage errors), the plaintext-loopback rule, and the progress line."""
from __future__ import annotations

import io

import pytest

from vas.admin import check_plaintext, target_hosts
from vas.cli.main import EXIT_USAGE, main
from vas.cli.progress import Progress, format_eta
from vas.core.errors import InvalidArgument


@pytest.mark.parametrize("target, hosts", [
    ("127.0.0.1:7300", ["127.0.0.1"]),
    ("[::1]:7300", ["[::1]"]),
    ("localhost:7300", ["localhost"]),
    ("ipv4:127.0.0.1:1,127.0.0.2:2", ["127.0.0.1", "127.0.0.2"]),
    ("coord.example:7300", ["coord.example"]),
])
def test_target_hosts(target, hosts):
    assert target_hosts(target) == hosts


def test_plaintext_only_to_loopback():
    for target in ("127.0.0.1:1", "[::1]:1", "localhost:1", "ipv4:127.0.0.1:1,127.0.0.9:2"):
        check_plaintext(target, None, "the coordinator")
    for target in ("10.0.0.1:7300", "ipv4:127.0.0.1:1,10.0.0.1:2", "coord.example:7300"):
        with pytest.raises(InvalidArgument, match=f"refusing to reach the coordinator at "
                                                  f"{target} without TLS"):
            check_plaintext(target, None, "the coordinator")


@pytest.mark.parametrize("argv, message", [
    (["--coordinator", "127.0.0.1:1", "seg", "ls", "--node", "/x.sock"],
     "--coordinator and --node name two ways to reach the cluster: give one"),
    (["--coordinator", "127.0.0.1:1", "seg", "create", "x", "--size", "4096"],
     "`vasctl seg create` needs a node agent"),
    (["--coordinator", "127.0.0.1:1", "up"], "the global --coordinator chooses where client "
                                             "commands"),
])
def test_backend_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"vasctl: error: {message}") and err.count("\n") == 1, err


def test_progress_line_has_bytes_rate_and_eta():
    out = io.StringIO()
    progress = Progress("get x", 100 << 20, enabled=True, out=out)
    progress._start -= 2.0  # as if 2 s had passed
    progress.advance(50 << 20)
    line = progress.line()
    assert line.startswith("get x [" + "#" * 15 + " " * 15 + "] 50.0 MiB / 100.0 MiB  50%  ")
    assert "MiB/s  ETA 0:0" in line
    progress.finish()
    assert out.getvalue().endswith("\x1b[K\n") and out.getvalue().startswith("\rget x [")
    unknown = Progress("put y", None, enabled=True, out=io.StringIO())
    unknown.advance(4096)
    assert unknown.line().startswith("put y 4.0 KiB  ") and unknown.line().endswith("/s")


def test_progress_is_quiet_when_not_a_terminal():
    out = io.StringIO()  # isatty() is False
    progress = Progress("get x", 10, out=out)
    progress.advance(10)
    progress.finish()
    assert out.getvalue() == ""


def test_format_eta():
    assert (format_eta(0), format_eta(59.4), format_eta(75), format_eta(3725)) == \
        ("0:00", "0:59", "1:15", "1:02:05")
