"""bench/netns.py's pure parts: which steps --skip and --only choose, and the CPU time
its rounds wait on (Bench.quiet)."""
import os
import sys
import time

import pytest

# bench/netns.py puts bench/ first on sys.path, where bench/ray.py would shadow the ray
# package for every later test in this process: the path is put back after the import.
_SYS_PATH = list(sys.path)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import netns  # noqa: E402

sys.path[:] = _SYS_PATH


@pytest.mark.parametrize("skip, only, steps", [
    ("", "", set(netns.STEPS)),
    ("", "fanout", {"fanout-shaped", "fanout-unlimited"}),
    ("", "fanout-unlimited", {"fanout-unlimited"}),
    ("", "eager, fanout-shaped", {"eager", "fanout-shaped"}),
    ("eager,touch,shaped", "", {"fanout-shaped", "fanout-unlimited"}),
    ("fanout-shaped", "", {"eager", "touch", "shaped", "fanout-unlimited"}),
    ("fanout", "", {"eager", "touch", "shaped"}),
])
def test_skip_and_only_choose_steps(skip, only, steps):
    assert netns.steps_to_run(skip, only) == steps


@pytest.mark.parametrize("skip, only, flag", [("fan", "", "--skip"), ("", "eager,nope", "--only")])
def test_an_unknown_phase_is_refused_with_the_known_ones(skip, only, flag):
    with pytest.raises(ValueError, match=rf"{flag}: unknown phases .*phases are "
                                         r"eager,touch,shaped,fanout,fanout-shaped"):
        netns.steps_to_run(skip, only)


def test_cpu_seconds_counts_this_process_s_cpu_time():
    before = netns.cpu_seconds(os.getpid())
    ends = time.process_time() + 0.1
    while time.process_time() < ends:  # burn 0.1 s of CPU
        pass
    used = netns.cpu_seconds(os.getpid()) - before
    assert 0.05 <= used <= 5.0  # clock ticks of 10 ms; the machine may be busy
