"""Checks of user input shared by the client, the agent and the coordinator.

Each raises ``InvalidArgument`` with a stable one-line message; every process
runs the same checks so bad input is refused at the first hop.
"""
from __future__ import annotations

import collections.abc
import re

from vas.core.errors import InvalidArgument
from vas.core.sizes import human_size

PAGE_SIZE = 4096
#: Largest segment: the whole reserved address window could not hold more.
MAX_SEGMENT_SIZE = 1 << 40
MAX_NAME_LENGTH = 255
#: Longest ttl or timeout anyone may give (a request's ``ttl_seconds`` or
#: ``timeout_seconds``, a daemon's configured lease ttl): one day, in seconds.
MAX_SECONDS = 24 * 3600

#: Most bytes of a segment's metadata: the UTF-8 of every key and value, added up.
MAX_META_BYTES = 4096
MAX_META_KEY_LENGTH = 128

#: Most copies of a segment besides its home.
MAX_REPLICAS = 16
#: Largest segment id: an id is the etcd revision that created the record, an int64.
MAX_SEGMENT_ID = (1 << 63) - 1

_NAME_RE = re.compile(r"[A-Za-z0-9._/-]+")
_META_KEY_RE = re.compile(r"[A-Za-z0-9._/:-]+")


def check_name(name: object, what: str = "segment") -> str:
    """Return ``name`` if it is a valid segment or space name, else raise InvalidArgument.

    Names are 1-255 chars of ``[A-Za-z0-9._/-]``, with no leading ``/`` and no
    ``..`` component.
    """
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"invalid {what} name {name!r}: must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"invalid {what} name: longer than {MAX_NAME_LENGTH} characters")
    if not _NAME_RE.fullmatch(name):
        raise InvalidArgument(f"invalid {what} name {name!r}: only A-Z a-z 0-9 . _ / - are allowed")
    if name.startswith("/"):
        raise InvalidArgument(f"invalid {what} name {name!r}: must not start with '/'")
    if ".." in name.split("/"):
        raise InvalidArgument(f"invalid {what} name {name!r}: must not contain a '..' component")
    return name


def check_meta(meta: object) -> dict[str, str]:
    """Return ``meta`` as a plain dict if it is valid segment metadata, else raise
    InvalidArgument naming the first bad key or value.

    Metadata maps keys (1-128 chars of ``[A-Za-z0-9._/:-]``) to strings; the UTF-8
    bytes of all keys and values add up to at most 4096. None means none.

    >>> check_meta({"vas.dtype": "<f8"})
    {'vas.dtype': '<f8'}
    >>> check_meta({"k": 1})
    Traceback (most recent call last):
    ...
    vas.core.errors.InvalidArgument: invalid meta value for key 'k': must be a string, not int
    """
    if meta is None:
        return {}
    if not isinstance(meta, collections.abc.Mapping):
        raise InvalidArgument(f"invalid meta of type {type(meta).__name__}: must be a dict "
                              "of str to str")
    total = 0
    for key, value in meta.items():
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"invalid meta key {key!r}: must be a non-empty string")
        if len(key) > MAX_META_KEY_LENGTH:
            raise InvalidArgument(f"invalid meta key {key[:32]!r}...: longer than "
                                  f"{MAX_META_KEY_LENGTH} characters")
        if not _META_KEY_RE.fullmatch(key):
            raise InvalidArgument(f"invalid meta key {key!r}: only A-Z a-z 0-9 . _ / : - "
                                  "are allowed")
        if not isinstance(value, str):
            raise InvalidArgument(f"invalid meta value for key {key!r}: must be a string, "
                                  f"not {type(value).__name__}")
        try:
            total += len(key) + len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise InvalidArgument(f"invalid meta value for key {key!r}: not valid UTF-8 "
                                  f"({exc.reason})") from exc
    if total > MAX_META_BYTES:
        raise InvalidArgument(f"invalid meta: {human_size(total)} of keys and values, more "
                              f"than the maximum {human_size(MAX_META_BYTES)}")
    return dict(meta)


def check_size(size: object) -> int:
    """Return ``size`` rounded up to whole pages; raise InvalidArgument unless 0 < size <= 1 TiB."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidArgument(f"invalid size {size!r}: must be an integer number of bytes")
    if size <= 0:
        raise InvalidArgument(f"invalid size {size}: must be > 0")
    if size > MAX_SEGMENT_SIZE:
        raise InvalidArgument(f"invalid size {human_size(size)}: larger than the maximum "
                              f"{human_size(MAX_SEGMENT_SIZE)}")
    return round_up_to_pages(size)


def check_segment_id(segment_id: object, what: str = "segment id", *,
                     optional: bool = False) -> int:
    """Return ``segment_id`` if it is 1..MAX_SEGMENT_ID (or 0 when ``optional``: not
    given), else raise InvalidArgument: ``invalid WHAT ID: must be 1..2**63-1``.

    The wire type is uint64 but ids are etcd revisions (int64): a larger one names
    no segment, and would overflow etcd's comparison field.

    >>> check_segment_id(1 << 63)
    Traceback (most recent call last):
    ...
    vas.core.errors.InvalidArgument: invalid segment id 9223372036854775808: must be 1..9223372036854775807
    """
    lowest = 0 if optional else 1
    if (isinstance(segment_id, bool) or not isinstance(segment_id, int)
            or not lowest <= segment_id <= MAX_SEGMENT_ID):
        raise InvalidArgument(f"invalid {what} {segment_id!r}: must be "
                              f"{lowest}..{MAX_SEGMENT_ID}")
    return segment_id


def check_replicas(replicas: object) -> int:
    """Return ``replicas`` if it is 0..MAX_REPLICAS, else raise InvalidArgument.

    The bound of the coordinator's record (a record asking for 2**32-1 copies could
    never be satisfied).
    """
    if (isinstance(replicas, bool) or not isinstance(replicas, int)
            or not 0 <= replicas <= MAX_REPLICAS):
        raise InvalidArgument(f"invalid replicas {replicas!r}: must be 0..{MAX_REPLICAS}")
    return replicas


def check_mode(mode: object) -> int:
    """Return ``mode`` if it is permission bits 0..0o777, else raise InvalidArgument."""
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise InvalidArgument(f"invalid mode {mode!r}: must be permission bits 0..0o777")
    return mode


def check_attach_mode(mode: object) -> str:
    """Return ``mode`` if it is "r" or "rw", else raise InvalidArgument."""
    if mode not in ("r", "rw"):
        raise InvalidArgument(f'invalid attach mode {mode!r}: must be "r" or "rw"')
    return mode


def check_fetch(fetch: object) -> str:
    """Return ``fetch`` if it is "lazy" or "eager", else raise InvalidArgument."""
    if fetch not in ("lazy", "eager"):
        raise InvalidArgument(f'invalid fetch {fetch!r}: must be "lazy" or "eager"')
    return fetch


def check_seconds(value: object, what: str, *, minimum: int = 0) -> float:
    """Return ``value`` if it is a number of seconds in [minimum, MAX_SECONDS], else raise
    InvalidArgument: ``invalid WHAT VALUE: must be MINIMUM..MAX_SECONDS seconds``.

    The one rule of every ttl and timeout. A request field keeps ``minimum`` 0 and
    gives 0 its meaning there (no expiry, the default lease, no limit); a configured
    lease ttl, where 0 means nothing, passes ``minimum=1``. NaN and infinities are
    refused (they fail the comparison), as are bools and non-numbers.

    >>> check_seconds(1.5, "ttl")
    1.5
    >>> check_seconds(-1.0, "ttl")
    Traceback (most recent call last):
    ...
    vas.core.errors.InvalidArgument: invalid ttl -1.0: must be 0..86400 seconds
    """
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not minimum <= value <= MAX_SECONDS):
        raise InvalidArgument(f"invalid {what} {value!r}: must be {minimum}..{MAX_SECONDS} seconds")
    return value


def check_range(offset: object, length: object, size: int) -> tuple[int, int]:
    """Return (offset, length) if [offset, offset+length) lies inside ``size`` bytes."""
    for label, value in (("offset", offset), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(f"invalid {label} {value!r}: must be an integer >= 0")
    if offset + length > size:
        raise InvalidArgument(
            f"range [{offset}, {offset + length}) is outside the segment of {human_size(size)}")
    return offset, length


def round_up_to_pages(size: int) -> int:
    """``size`` rounded up to a multiple of PAGE_SIZE."""
    return (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
