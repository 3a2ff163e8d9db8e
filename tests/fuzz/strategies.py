"""Hypothesis strategies for hostile field values: edges of every integer width, names
that break every rule, and the real names and ids of the fuzz cluster mixed in (so that
requests reach the code behind the first check)."""
from __future__ import annotations

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
