"""The compare-and-retry loop of every read-modify-write on etcd.

A read-modify-write decides on a record, then writes in one transaction that
compares the revision the decision was made on; a failed compare means another
writer (another coordinator, or a concurrent call of this one) changed the key
meanwhile, and the operation decides again on the record as it is now. Each
such loop is bounded by ``CoordinatorConfig.txn_attempts`` and then gives up
with one message::

    for _ in retries(self.attempts, f"update segment {name!r}"):
        entry = ...                      # decide (raise NotFound etc. as usual)
        if etcd.txn(compare=[unchanged(key, entry.mod)], ...).succeeded:
            return ...                   # done: leaves the loop
        # compare failed: the next iteration decides on the fresh record

The loop body is the attempt: ``return`` ends the operation, falling through
(or ``continue``) asks for another attempt, and any exception passes through
unchanged. State learnt by one attempt (the record a failure branch returned, a
lease already granted) stays in the body's own variables for the next, like
``for attempt in Retrying()`` in tenacity.
"""
from __future__ import annotations

from typing import Iterator

from vas.core.errors import Unavailable


def retries(attempts: int, operation: str) -> Iterator[int]:
    """Yield 0, 1, ... ``attempts - 1``, then raise Unavailable naming ``operation``.

    :param attempts: how many attempts to allow (``CoordinatorConfig.txn_attempts``).
    :param operation: what is being tried, completing "could not ...", e.g.
        ``"lock segment 'a'"``.
    :raises Unavailable: when the caller asks for one more attempt after the last:
        ``could not OPERATION: too many concurrent changes``.

    >>> for attempt in retries(3, "count"):
    ...     if attempt == 1:
    ...         break
    >>> list(retries(2, "count to 2"))
    Traceback (most recent call last):
    ...
    vas.errors.Unavailable: could not count to 2: too many concurrent changes
    """
    yield from range(attempts)
    raise Unavailable(f"could not {operation}: too many concurrent changes")
