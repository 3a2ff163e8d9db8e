"""vas.core.fetch: the one rule that decides how an attach's pages arrive."""
from __future__ import annotations

import pytest

import vas
from vas.core import fetch
from vas.core.fetch import FetchMode, decide
from vas.proto import local_pb2

USERFAULTFD = local_pb2.FAULT_SUPPORT_USERFAULTFD
NO_USERFAULTFD = local_pb2.FAULT_SUPPORT_NO_USERFAULTFD
FIXED_ADDRESS = local_pb2.FAULT_SUPPORT_FIXED_ADDRESS
UNSPECIFIED = local_pb2.FAULT_SUPPORT_UNSPECIFIED
SUPPORTS = (UNSPECIFIED, USERFAULTFD, NO_USERFAULTFD, FIXED_ADDRESS)


def test_the_strings_users_see():
    assert {mode.name: mode.value for mode in FetchMode} == {
        "HOME": "home (no fetch)",
        "LAZY": "lazy",
        "EAGER": "eager",
        "EAGER_NO_USERFAULTFD": "eager (userfaultfd unavailable)",
        "EAGER_FIXED": "eager (fixed address)",
    }


@pytest.mark.parametrize("requested", ["lazy", "eager"])
@pytest.mark.parametrize("support", SUPPORTS)
def test_the_home_node_never_fetches(requested, support):
    assert decide(requested, home=True, support=support) is FetchMode.HOME


@pytest.mark.parametrize("support", SUPPORTS)
def test_eager_is_eager_whatever_the_client_supports(support):
    assert decide("eager", home=False, support=support) is FetchMode.EAGER


@pytest.mark.parametrize("support, mode", [
    (USERFAULTFD, FetchMode.LAZY),
    (NO_USERFAULTFD, FetchMode.EAGER_NO_USERFAULTFD),
    (UNSPECIFIED, FetchMode.EAGER_NO_USERFAULTFD),  # an older client says nothing
    (99, FetchMode.EAGER_NO_USERFAULTFD),           # a value this build does not know
    (FIXED_ADDRESS, FetchMode.EAGER_FIXED),
])
def test_lazy_needs_a_client_that_takes_userfaults(support, mode):
    assert decide("lazy", home=False, support=support) is mode


@pytest.mark.parametrize("requested", ["", "never", None, "LAZY"])
def test_an_unknown_request_is_refused(requested):
    with pytest.raises(vas.InvalidArgument) as info:
        decide(requested, home=False, support=USERFAULTFD)
    assert str(info.value) == f'invalid fetch {requested!r}: must be "lazy" or "eager"'


def test_proto_round_trip_and_unknown_values():
    numbers = {mode.to_proto() for mode in FetchMode}
    assert numbers == {local_pb2.FETCH_MODE_HOME, local_pb2.FETCH_MODE_LAZY,
                       local_pb2.FETCH_MODE_EAGER, local_pb2.FETCH_MODE_EAGER_NO_USERFAULTFD,
                       local_pb2.FETCH_MODE_EAGER_FIXED}
    for mode in FetchMode:
        assert FetchMode.from_proto(mode.to_proto()) is mode
        assert local_pb2.FetchMode.Name(mode.to_proto()) == f"FETCH_MODE_{mode.name}"
    for value in (local_pb2.FETCH_MODE_UNSPECIFIED, 42):
        with pytest.raises(ValueError, match=f"^unknown fetch mode {value}$"):
            FetchMode.from_proto(value)


@pytest.fixture
def reprobe(monkeypatch):
    """Forget this process's probe result (restored after the test)."""
    monkeypatch.setattr(fetch, "_userfaultfd_ok", None)
    return monkeypatch


def test_disabled_userfaultfd_is_stated_whatever_the_address(reprobe):
    reprobe.setenv("VAS_DISABLE_USERFAULTFD", "1")
    assert fetch.probe_fault_support(fixed=False) == NO_USERFAULTFD
    assert fetch.probe_fault_support(fixed=True) == NO_USERFAULTFD
    assert fetch.userfaultfd_available() is False


def test_with_userfaultfd_a_fixed_mapping_states_its_address(reprobe):
    reprobe.setattr(fetch, "_userfaultfd_ok", True)
    assert fetch.probe_fault_support(fixed=False) == USERFAULTFD
    assert fetch.probe_fault_support(fixed=True) == FIXED_ADDRESS
