"""Segment metadata limits (vas.core.validate.check_meta) and the dtype strings that
put_array keeps in it (vas.datasets.encode_dtype / decode_dtype): no daemon needed."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from vas.core import validate
from vas.core.errors import InvalidArgument
from vas.datasets import SegmentRef, decode_dtype, encode_dtype


def test_meta_accepts_small_string_maps():
    assert validate.check_meta(None) == {}
    assert validate.check_meta({}) == {}
    assert validate.check_meta({"a.b/c:d-e_f": "x", "k": "é" * 10}) == {
        "a.b/c:d-e_f": "x", "k": "é" * 10}


def test_meta_limit_counts_utf8_bytes_of_keys_and_values():
    key = "k"
    fits = {key: "v" * (validate.MAX_META_BYTES - len(key))}
    assert validate.check_meta(fits) == fits
    with pytest.raises(InvalidArgument, match=r"^invalid meta: 4\.0 KiB \(4097 bytes\) of keys "
                                              r"and values, more than the maximum 4 KiB$"):
        validate.check_meta({key: "v" * (validate.MAX_META_BYTES - len(key) + 1)})
    # 2048 two-byte characters are 4096 bytes: with the key, one byte too many
    with pytest.raises(InvalidArgument, match="4097 bytes"):
        validate.check_meta({key: "é" * 2048})


@pytest.mark.parametrize("meta, message", [
    ([("a", "b")], r"^invalid meta of type list: must be a dict of str to str$"),
    ({"": "b"}, r"^invalid meta key '': must be a non-empty string$"),
    ({1: "b"}, r"^invalid meta key 1: must be a non-empty string$"),
    ({"a b": "c"}, r"^invalid meta key 'a b': only A-Z a-z 0-9 \. _ / : - are allowed$"),
    ({"k" * 129: "c"}, r"^invalid meta key 'k{32}'\.\.\.: longer than 128 characters$"),
    ({"k": 1}, r"^invalid meta value for key 'k': must be a string, not int$"),
    ({"k": None}, r"^invalid meta value for key 'k': must be a string, not NoneType$"),
    ({"k": "\ud800"}, r"^invalid meta value for key 'k': not valid UTF-8"),
])
def test_meta_refusals_are_precise(meta, message):
    with pytest.raises(InvalidArgument, match=message):
        validate.check_meta(meta)


@pytest.mark.parametrize("dtype", [
    np.float64, np.float32, np.int8, np.uint64, np.bool_, np.complex128, ">i4", "U7", "S3",
    "datetime64[ns]", "timedelta64[s]", np.float16, "V8",
    [("a", "<i4"), ("b", "<f8", (2, 3))],
    [("outer", [("x", "u1"), ("y", ">f4")]), ("z", "S2")],
])
def test_dtype_strings_round_trip(dtype):
    dtype = np.dtype(dtype)
    text = encode_dtype(dtype)
    assert isinstance(text, str)
    assert decode_dtype(text) == dtype


@pytest.mark.parametrize("text", ["", "nonsense", "[1, 2]", "[[\"a\"]]"])
def test_bad_dtype_strings_are_invalid_argument(text):
    with pytest.raises(InvalidArgument, match="invalid vas.dtype"):
        decode_dtype(text)


def test_segment_ref_pickles_and_is_frozen():
    ref = SegmentRef("ds/a", "ndarray", "<f8", (3, 4), 1, 42, "node1", 96)
    assert pickle.loads(pickle.dumps(ref)) == ref
    with pytest.raises(AttributeError):
        ref.name = "other"  # type: ignore[misc]


def test_import_vas_loads_neither_ray_nor_pyarrow():
    import subprocess
    import sys

    code = ("import sys, vas, vas.datasets; vas.Client; vas.get_array; vas.SegmentRef; "
            "print(sorted(m for m in ('ray', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
