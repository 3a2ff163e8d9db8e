"""What the tests of vas._native share besides fixtures: the page size and exact messages."""
import os
import re

from vas import _native


PS = _native.PAGE_SIZE


def exact(msg):
    return re.escape(msg) + "$"


def ro_reopen(fd):
    """The memfd reopened read-only, as a read-only attachment gets it."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
