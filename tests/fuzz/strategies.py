"""Hypothesis strategies for hostile field values: edges of every integer width, names
that break every rule, and the real names and ids of the fuzz cluster mixed in (so that
requests reach the code behind the first check)."""
from __future__ import annotations

from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import strategies as st

from fuzzkit import CANARY, VICTIMS

U64_EDGES = [0, 1, 4095, 4096, 4097, 8191, 8192, 1 << 31, (1 << 32) - 1, 1 << 32,
             (1 << 40), (1 << 40) + 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 4096, (1 << 64) - 1]

u64 = st.one_of(st.sampled_from(U64_EDGES), st.integers(0, (1 << 64) - 1),
                st.integers(0, 1 << 16))
u32 = st.one_of(st.sampled_from([0, 1, 0o777, 0o1000, 65534, (1 << 31), (1 << 32) - 1]),
                st.integers(0, (1 << 32) - 1))
i64 = st.one_of(st.sampled_from([0, 1, -1, (1 << 63) - 1, -(1 << 63)]),
                st.integers(-(1 << 63), (1 << 63) - 1))
seconds = st.one_of(st.sampled_from([0.0, -1.0, 1e-9, 86400.0, 86401.0, float("inf"),
                                     float("-inf"), float("nan"), 1e308]),
                    st.floats(allow_nan=True, allow_infinity=True))
bad_names = st.sampled_from(["", "/x", "a/../b", "..", "x" * 256, "a b", "a\x00b", "é",
                             "a//b", "-", ".", "/", "a/", "x" * 255])
#: Names a fuzzer may harm: the victims, and names that exist nowhere.
names = st.one_of(st.sampled_from(VICTIMS), bad_names, st.text(max_size=40),
                  st.from_regex(r"[A-Za-z0-9._/-]{1,20}", fullmatch=True))
#: Names for requests that only read: the canary too.
read_names = st.one_of(names, st.just(CANARY))
data = st.one_of(st.binary(max_size=64), st.binary(min_size=4096, max_size=4096),
                 st.sampled_from([b"", b"\0" * 8193]))


def ids(known: list[int]):
    """A segment id: one of ``known`` (that exist), a small one, or any u64."""
    return st.one_of(st.sampled_from(known), u64)


#: The agents' node ids: a fuzzer never registers or reports as one of them (taking a
#: node's identity over is issue 10's authorization item, not input checking).
REAL_NODES = ("node1", "node2")
node_ids = st.one_of(st.text(max_size=30), bad_names,
                     st.from_regex(r"fuzz-node-[a-z0-9]{1,8}", fullmatch=True)
                     ).filter(lambda node: node not in REAL_NODES)
#: Addresses of fake nodes: loopback or malformed only, so that no daemon ever dials
#: (or resolves) a name off this machine.
addresses = st.one_of(st.sampled_from(["", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999",
                                       "[::1]:1", ":", "127.0.0.1:-1"]),
                      st.integers(1, 65535).map(lambda port: f"127.0.0.1:{port}"))
#: String fields by name; any other string field gets any text.
_STRINGS = {"name": names, "segment": names, "space": names, "prefix": names,
            "id": node_ids, "node_id": node_ids, "home": node_ids, "node": node_ids,
            "mode": st.one_of(st.sampled_from(["r", "rw", "w", ""]), st.text(max_size=4)),
            "address": addresses, "socket": st.sampled_from(["", "/nonexistent/x.sock"]),
            "page_token": st.one_of(st.text(max_size=20), st.just("Zm9v"), st.just("=="))}


def _scalar(field):
    """The strategy of one non-message field of a protobuf descriptor."""
    kind = field.type
    if kind == F.TYPE_STRING:
        return _STRINGS.get(field.name, st.text(max_size=40))
    if kind == F.TYPE_BYTES:
        return data
    if kind == F.TYPE_BOOL:
        return st.booleans()
    if kind in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return seconds
    if kind in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return st.one_of(ids_hint(), u64) if field.name in ("id", "held") else u64
    if kind in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return u32
    if kind in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return i64
    if kind == F.TYPE_ENUM:  # unknown values too: proto3 enums are open
        return st.integers(0, 8)
    if kind in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return st.integers(-(1 << 31), (1 << 31) - 1)
    raise TypeError(f"no strategy for field {field.full_name}")


def ids_hint():
    """Small ids: a fresh cluster's segments have them."""
    return st.integers(1, 64)


@st.composite
def message(draw, cls, depth: int = 0):
    """A ``cls`` protobuf message with random (often hostile) values in random fields."""
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue  # absent: the zero value, the most common hostile input
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entries = draw(st.dictionaries(st.text(max_size=20), st.text(max_size=20),
                                           max_size=3))
            getattr(msg, field.name).update(entries)
        elif field.message_type is not None:
            if depth > 2:
                continue
            sub = message_factory.GetMessageClass(field.message_type)
            if _repeated(field):
                getattr(msg, field.name).extend(
                    draw(st.lists(message(sub, depth + 1), max_size=3)))
            else:
                getattr(msg, field.name).CopyFrom(draw(message(sub, depth + 1)))
        elif _repeated(field):
            getattr(msg, field.name).extend(draw(st.lists(_scalar(field), max_size=4)))
        else:
            setattr(msg, field.name, draw(_scalar(field)))
    return msg


def _repeated(field) -> bool:
    return field.is_repeated
