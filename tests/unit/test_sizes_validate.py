"""Human sizes, input checks, and the client's refusal of bad input before anything is sent."""
from __future__ import annotations

import os

import pytest

import vas
from vas.core import validate
from vas.core.errors import InvalidArgument
from vas.core.sizes import format_size, human_size, parse_size

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


# -- sizes --------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("4096", 4096), ("0", 0), ("64KiB", 64 * KiB), ("64kib", 64 * KiB), ("1GiB", GiB),
    ("1.5GiB", 3 * GiB // 2), ("10MB", 10_000_000), ("2 MiB", 2 * MiB), ("1TiB", 1 << 40),
    ("7B", 7), (" 12k ", 12_000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "12XB", "-5", "1.5", "0.3KiB", "1e9", "MiB", "5 5"])
def test_parse_size_rejects(text):
    with pytest.raises(InvalidArgument, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize("num, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (64 * MiB, "64.0 MiB"),
    (3 * GiB // 2, "1.5 GiB"), (5 << 40, "5.0 TiB"),
])
def test_format_size(num, text):
    assert format_size(num) == text


@pytest.mark.parametrize("num, text", [
    (0, "0 B"), (1023, "1023 B"), (4096, "4 KiB"), (1536, "1.5 KiB"), (4227854336, "3.9 GiB"),
    (4 * GiB, "4 GiB"), (8193, "8.0 KiB (8193 bytes)"), (256 * MiB - 8192, "255.9 MiB"),
    (4 * GiB - 1, "3.9 GiB"), (GiB + 1, "1.0 GiB (1073741825 bytes)"), (5 << 40, "5 TiB"),
    (2048 << 40, "2048 TiB"),
])
def test_human_size(num, text):
    assert human_size(num) == text


# -- validate -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a", "demo", "frames/0", "a.b_c-d", "x" * 255, "a/./b", "..a", "a..b"])
def test_valid_names(name):
    assert validate.check_name(name) == name


@pytest.mark.parametrize("name, message", [
    ("", "invalid segment name '': must be a non-empty string"),
    (None, "invalid segment name None: must be a non-empty string"),
    ("x" * 256, "invalid segment name: longer than 255 characters"),
    ("a b", "invalid segment name 'a b': only A-Z a-z 0-9 . _ / - are allowed"),
    ("é", "invalid segment name 'é': only A-Z a-z 0-9 . _ / - are allowed"),
    ("/abs", "invalid segment name '/abs': must not start with '/'"),
    ("a/../b", "invalid segment name 'a/../b': must not contain a '..' component"),
    ("..", "invalid segment name '..': must not contain a '..' component"),
])
def test_invalid_names(name, message):
    with pytest.raises(InvalidArgument) as info:
        validate.check_name(name)
    assert str(info.value) == message


def test_space_names_say_space():
    with pytest.raises(InvalidArgument, match="^invalid space name"):
        validate.check_name("", "space")


@pytest.mark.parametrize("size, rounded", [(1, 4096), (4096, 4096), (4097, 8192), (1 << 40, 1 << 40)])
def test_sizes_round_up_to_pages(size, rounded):
    assert validate.check_size(size) == rounded


@pytest.mark.parametrize("size, message", [
    (0, "invalid size 0: must be > 0"),
    (-1, "invalid size -1: must be > 0"),
    ((1 << 40) + 1, f"invalid size 1.0 TiB ({(1 << 40) + 1} bytes): larger than the maximum 1 TiB"),
    (3 << 40, "invalid size 3 TiB: larger than the maximum 1 TiB"),
    (1.5, "invalid size 1.5: must be an integer number of bytes"),
    ("4096", "invalid size '4096': must be an integer number of bytes"),
    (True, "invalid size True: must be an integer number of bytes"),
])
def test_invalid_sizes(size, message):
    with pytest.raises(InvalidArgument) as info:
        validate.check_size(size)
    assert str(info.value) == message


@pytest.mark.parametrize("mode", [0, 0o600, 0o640, 0o777])
def test_valid_modes(mode):
    assert validate.check_mode(mode) == mode


@pytest.mark.parametrize("mode", [-1, 0o1000, "640", 6.4, True])
def test_invalid_modes(mode):
    with pytest.raises(InvalidArgument, match="must be permission bits 0..0o777"):
        validate.check_mode(mode)


def test_attach_mode_and_fetch():
    assert validate.check_attach_mode("r") == "r" and validate.check_attach_mode("rw") == "rw"
    assert validate.check_fetch("lazy") == "lazy" and validate.check_fetch("eager") == "eager"
    with pytest.raises(InvalidArgument, match='invalid attach mode \'w\': must be "r" or "rw"'):
        validate.check_attach_mode("w")
    with pytest.raises(InvalidArgument, match="invalid fetch 'now'"):
        validate.check_fetch("now")


@pytest.mark.parametrize("value", [0, 0.0, 1, 1.5, 86400, 86400.0])
def test_valid_seconds(value):
    assert validate.check_seconds(value, "ttl") == value


@pytest.mark.parametrize("value, what, message", [
    (-1.0, "ttl", "invalid ttl -1.0: must be 0..86400 seconds"),
    (-1e-9, "timeout", "invalid timeout -1e-09: must be 0..86400 seconds"),
    (86401, "node ttl", "invalid node ttl 86401: must be 0..86400 seconds"),
    (float("inf"), "ttl", "invalid ttl inf: must be 0..86400 seconds"),
    (float("-inf"), "ttl", "invalid ttl -inf: must be 0..86400 seconds"),
    (float("nan"), "timeout", "invalid timeout nan: must be 0..86400 seconds"),
    ("1", "ttl", "invalid ttl '1': must be 0..86400 seconds"),
    (None, "ttl", "invalid ttl None: must be 0..86400 seconds"),
    (True, "writer ttl", "invalid writer ttl True: must be 0..86400 seconds"),
])
def test_invalid_seconds(value, what, message):
    with pytest.raises(InvalidArgument) as info:
        validate.check_seconds(value, what)
    assert str(info.value) == message


def test_seconds_with_a_minimum():
    """A configured lease ttl, where 0 means nothing, must be at least 1 second."""
    assert validate.check_seconds(1, "heartbeat ttl", minimum=1) == 1
    for value in (0, 0.5):
        with pytest.raises(InvalidArgument) as info:
            validate.check_seconds(value, "writer ttl (--writer-ttl)", minimum=1)
        assert str(info.value) == (f"invalid writer ttl (--writer-ttl) {value}: "
                                   "must be 1..86400 seconds")


def test_ranges():
    assert validate.check_range(0, 4096, 4096) == (0, 4096)
    assert validate.check_range(4096, 0, 4096) == (4096, 0)
    with pytest.raises(InvalidArgument) as info:
        validate.check_range(4000, 100, 4096)
    assert str(info.value) == "range [4000, 4100) is outside the segment of 4 KiB"
    with pytest.raises(InvalidArgument, match="invalid offset -1: must be an integer >= 0"):
        validate.check_range(-1, 1, 4096)
    with pytest.raises(InvalidArgument, match="invalid length 1.0"):
        validate.check_range(0, 1.0, 4096)


def test_exceptions_are_exported_and_subclass_builtins():
    assert issubclass(vas.NotFound, LookupError) and issubclass(vas.NotFound, vas.VasError)
    assert issubclass(vas.AlreadyExists, FileExistsError)
    assert issubclass(vas.PermissionDenied, PermissionError)
    assert issubclass(vas.InvalidArgument, ValueError)
    assert issubclass(vas.Unavailable, ConnectionError)
    for cls in (vas.AddressConflict, vas.Busy, vas.CapacityExceeded, vas.Fenced):
        assert issubclass(cls, vas.VasError)
    for name in ("SegmentInfo", "NodeInfo", "SpaceInfo", "Mapping", "Client", "connect",
                 "create", "attach", "stat", "list", "delete"):
        assert hasattr(vas, name), name


@pytest.mark.parametrize("value, optional, message", [
    (0, False, "invalid segment id 0: must be 1..9223372036854775807"),
    (1 << 63, False, "invalid segment id 9223372036854775808: must be 1..9223372036854775807"),
    ((1 << 64) - 1, True, "invalid segment id 18446744073709551615: must be "
                          "0..9223372036854775807"),
    (True, False, "invalid segment id True: must be 1..9223372036854775807"),
])
def test_check_segment_id_refuses_what_no_revision_can_be(value, optional, message):
    """Ids are etcd revisions (int64): found by the fuzzer, an id >= 2**63 made the
    coordinator's FinishDelete fail with UNKNOWN (etcd's compare field overflowed)."""
    with pytest.raises(InvalidArgument) as caught:
        validate.check_segment_id(value, optional=optional)
    assert caught.value.message == message


def test_check_segment_id_and_replicas_accept_their_range():
    assert validate.check_segment_id((1 << 63) - 1) == (1 << 63) - 1
    assert validate.check_segment_id(0, optional=True) == 0
    assert validate.check_replicas(0) == 0 and validate.check_replicas(16) == 16
    with pytest.raises(InvalidArgument, match=r"^invalid replicas 4294967295: must be 0..16$"):
        validate.check_replicas((1 << 32) - 1)


# -- the client checks before sending -------------------------------------------------

@pytest.fixture
def offline_client():
    """A Client whose connection fails the test if anything would be sent."""
    client = object.__new__(vas.Client)

    class NoSend:
        def call(self, *args, **kwargs):
            pytest.fail(f"bad input reached the wire: {args}")

    client._connection = NoSend()
    return client


@pytest.mark.parametrize("call, message", [
    (lambda c: c.create("", 4096), "invalid segment name"),
    (lambda c: c.create("a b", 4096), "invalid segment name"),
    (lambda c: c.create("ok", 0), "invalid size 0: must be > 0"),
    (lambda c: c.create("ok", -4096), "invalid size -4096: must be > 0"),
    (lambda c: c.create("ok", (1 << 40) + 1), "larger than the maximum"),
    (lambda c: c.create("ok", 4096, mode=0o1777), "invalid mode"),
    (lambda c: c.create("ok", 4096, replicas=-1), "invalid replicas -1: must be an integer >= 0"),
    (lambda c: c.create("ok", 4096, ttl=-1), "invalid ttl -1: must be 0..86400 seconds"),
    (lambda c: c.create("ok", 4096, ttl=86401), "invalid ttl 86401: must be 0..86400 seconds"),
    (lambda c: c.create("ok", 4096, ttl="1"), "invalid ttl '1'"),
    (lambda c: c.attach("/x"), "must not start with '/'"),
    (lambda c: c.attach("ok", "w"), "invalid attach mode 'w'"),
    (lambda c: c.attach("ok", fetch="now"), "invalid fetch 'now'"),
    (lambda c: c.stat("a/../b"), "'..' component"),
    (lambda c: c.delete(""), "invalid segment name"),
    (lambda c: c.chmod("ok", -1), "invalid mode -1"),
    (lambda c: c.chown("ok", -1, 0), "invalid uid -1"),
    (lambda c: c.chown("ok", 0, "wheel"), "invalid gid 'wheel'"),
    (lambda c: c.list(7), "invalid prefix 7"),
    (lambda c: c.create_space("", mode=0o600), "invalid space name"),
    (lambda c: c.space_add("sp", "seg", "x"), "invalid attach mode 'x'"),
    (lambda c: c.space_remove("sp", "/seg"), "invalid segment name"),
    (lambda c: c.delete_space("a b"), "invalid space name"),
])
def test_client_rejects_bad_input_before_sending(offline_client, call, message):
    with pytest.raises(vas.InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(offline_client)


def test_connect_to_a_missing_socket_is_unavailable(tmp_path):
    path = str(tmp_path / "none.sock")
    with pytest.raises(vas.Unavailable) as info:
        vas.connect(path)
    assert str(info.value) == (
        f"cannot reach the vas agent at {path}: No such file or directory "
        "(is `vasctl node serve` running? set $VAS_NODE)")


def test_connect_defaults_to_vas_node(tmp_path, monkeypatch):
    path = str(tmp_path / "env.sock")
    monkeypatch.setenv("VAS_NODE", path)
    with pytest.raises(vas.Unavailable, match=f"at {path}:"):
        vas.connect()


# -- a Mapping's own bounds checks (no agent: a memfd mapped directly) ---------------------

class NoAgent:
    """What a Mapping asks of its Connection, with no agent behind it (a closed connection)."""

    closed = True

    def __init__(self):
        self.released: list[int] = []

    def release_later(self, attachment_id: int) -> None:
        self.released.append(attachment_id)


@pytest.fixture
def local_mapping():
    pytest.importorskip("vas._native")
    from vas.proto import local_pb2

    fd = os.memfd_create("vas-unit")
    os.ftruncate(fd, 8192)
    response = local_pb2.AttachResponse(attachment_id=1, writable=True,
                                        fetch=local_pb2.FETCH_MODE_HOME)
    response.segment.name, response.segment.size = "unit", 8192
    mapping = vas.Mapping(NoAgent(), response, fd, "rw")
    os.close(fd)
    yield mapping
    mapping.detach()


def test_mapping_bounds_and_views(local_mapping):
    np = pytest.importorskip("numpy")
    m = local_mapping
    assert m.write(8190, b"ab") == 2 and m.read(8190, 2) == b"ab"
    with pytest.raises(vas.InvalidArgument, match=r"range \[8190, 8193\) is outside the segment of 8 KiB"):
        m.write(8190, b"abc")
    with pytest.raises(vas.InvalidArgument, match=r"range \[0, 8193\)"):
        m.read(0, 8193)
    with pytest.raises(vas.InvalidArgument, match="invalid offset -1"):
        m.read(-1, 1)
    with pytest.raises(vas.InvalidArgument, match=r"range \[8, 8200\)"):
        m.ndarray(np.uint64, shape=1024, offset=8)
    array = m.ndarray(np.uint32, shape=(2, 1024))
    assert array.ctypes.data == m.address and array.shape == (2, 1024)
    array[0, 0] = 0x01020304
    assert m.read(0, 4) == (0x01020304).to_bytes(4, "little")
    assert m.fetch == "home (no fetch)"
    m.detach()  # a live view: no error, the array keeps the pages mapped
    m.detach()  # idempotent
    with pytest.raises(vas.InvalidArgument, match="^segment unit is detached from this process$"):
        m.read(0, 1)
    assert array[0, 0] == 0x01020304
    array[1, 0] = 5
    del array  # the last view: unmapped now (the closed connection released it already)


class RecordingConnection(NoAgent):
    """An open connection that records what the Mapping tells it."""

    closed = False

    def __init__(self):
        super().__init__()
        self.detached: list[int] = []

    def detach(self, attachment_id: int) -> None:
        self.detached.append(attachment_id)


def _mapping_of(connection, attachment_id: int):
    from vas.proto import local_pb2

    fd = os.memfd_create("vas-unit")
    os.ftruncate(fd, 4096)
    response = local_pb2.AttachResponse(attachment_id=attachment_id,
                                        fetch=local_pb2.FETCH_MODE_HOME)
    response.segment.name, response.segment.size = "unit", 4096
    try:
        return vas.Mapping(connection, response, fd, "r")
    finally:
        os.close(fd)


def test_detach_hands_the_release_to_the_last_view():
    np = pytest.importorskip("numpy")
    pytest.importorskip("vas._native")
    connection = RecordingConnection()
    plain = _mapping_of(connection, 1)
    plain.detach()  # no view: unmapped and released at once
    assert (connection.detached, connection.released) == ([1], [])
    del plain

    viewed = _mapping_of(connection, 2)
    array = viewed.ndarray(np.uint8)
    piece = viewed.buffer[100:200]
    viewed.detach()
    del viewed
    assert (connection.detached, connection.released) == ([1], [])  # the views hold it
    del array
    assert connection.released == []
    assert bytes(piece[:2]) == b"\0\0"
    del piece  # the last view: unmapped, then the Detach queued with the connection
    assert (connection.detached, connection.released) == ([1], [2])

    dropped = _mapping_of(connection, 3).ndarray(np.uint8)  # never detached: the same path
    assert connection.released == [2]
    del dropped
    assert connection.released == [2, 3]
