"""The status <-> exception table of vas.core.errors: every class travels as its
status and comes back as itself, by grpc.StatusCode and by the status's integer (what
the local and bulk replies carry), without grpc loaded until a ``.code`` is read."""
from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from vas.core import errors

CLASSES = [errors.NotFound, errors.AlreadyExists, errors.PermissionDenied,
           errors.InvalidArgument, errors.AddressConflict, errors.Busy,
           errors.CapacityExceeded, errors.Unavailable, errors.Fenced, errors.DataLoss]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_each_class_comes_back_from_its_status(cls):
    assert isinstance(cls.code, grpc.StatusCode) and cls("x").code is cls.code
    for back in (errors.from_status(cls.code, "why"), errors.from_number(cls.code.value[0], "why")):
        assert type(back) is cls and back.message == "why" and back.code is cls.code


def test_deadline_exceeded_is_unavailable_and_unknown_statuses_a_plain_error():
    assert type(errors.from_status(grpc.StatusCode.DEADLINE_EXCEEDED, "")) is errors.Unavailable
    for back in (errors.from_status(grpc.StatusCode.CANCELLED, ""),
                 errors.from_number(grpc.StatusCode.CANCELLED.value[0], "")):
        assert type(back) is errors.VasError
        assert (back.code, back.message) == (grpc.StatusCode.CANCELLED, "CANCELLED")
    assert errors.VasError().code is grpc.StatusCode.UNKNOWN
    assert errors.from_number(99, "odd").code is grpc.StatusCode.UNKNOWN


def test_grpc_loads_on_the_first_code_read():
    done = subprocess.run(
        [sys.executable, "-c",
         "import sys\nfrom vas.core import errors\n"
         "e = errors.from_number(5, 'gone')\n"
         "print(type(e).__name__, 'grpc' in sys.modules, e.code.name, 'grpc' in sys.modules)"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["NotFound", "False", "NOT_FOUND", "True"]
