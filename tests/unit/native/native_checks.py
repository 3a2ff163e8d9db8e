"""What the tests of vas._native share besides fixtures: the page size and exact messages."""
import re

from vas import _native


PS = _native.PAGE_SIZE


def exact(msg):
    return re.escape(msg) + "$"
