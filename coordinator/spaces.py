"""Spaces: named, ordered sets of segments with an attach mode each.

A space is one record (``/vas/spaces/NAME``); membership changes rewrite it in
a transaction that compares its mod_revision (and, for SpaceAdd, that the
segment still exists), retried on conflict.
"""
from __future__ import annotations

import time
from typing import Callable

from vas.coordinator import access, keys
from vas.coordinator.etcd import Etcd, absent, delete_op, present, put_op, range_op, unchanged
from vas.coordinator.retry import retries
from vas.core.errors import AlreadyExists, NotFound
from vas.proto import types_pb2


def space_of(name: str, record: dict, revision: int) -> types_pb2.SpaceInfo:
    """The SpaceInfo of a stored record last changed at etcd ``revision``."""
    return types_pb2.SpaceInfo(
        name=name, mode=record["mode"], uid=record["uid"], gid=record["gid"],
        created=record["created"], revision=revision,
        members=[types_pb2.SpaceMember(segment=s, mode=m) for s, m in record["members"]])


class Spaces:
    """Space operations over one etcd client."""

    def __init__(self, etcd: Etcd, attempts: int):
        self.etcd = etcd
        self.attempts = attempts

    def create(self, caller, name: str, mode: int) -> types_pb2.SpaceInfo:
        """A new empty space owned by ``caller``. Raises AlreadyExists."""
        record = {"mode": mode, "uid": caller.uid, "gid": caller.gid, "created": time.time(),
                  "members": []}
        key = keys.space_key(name)
        response = self.etcd.txn(compare=[absent(key)],
                                 success=[put_op(key, keys.encode(record))])
        if not response.succeeded:
            raise AlreadyExists(f"space {name!r} already exists")
        return space_of(name, record, response.header.revision)

    def get(self, name: str) -> types_pb2.SpaceInfo:
        """The space ``name``. Raises NotFound."""
        kvs = self.etcd.range(keys.space_key(name)).kvs
        if not kvs:
            raise NotFound(f"space {name!r} not found")
        return space_of(name, keys.decode(kvs[0].value), kvs[0].mod_revision)

    def list(self, prefix: str) -> list[types_pb2.SpaceInfo]:
        """Spaces whose names start with ``prefix``, ordered by name."""
        start = keys.space_key(prefix)
        response = self.etcd.range(start, keys.prefix_end(start))
        return [space_of(keys.name_of(kv.key, keys.SPACES), keys.decode(kv.value),
                         kv.mod_revision) for kv in response.kvs]

    def delete(self, caller, name: str) -> None:
        """Remove the space (owner or root); its member segments stay."""
        key = keys.space_key(name)
        for _ in retries(self.attempts, f"delete space {name!r}"):
            kvs = self.etcd.range(key).kvs
            if not kvs:
                raise NotFound(f"space {name!r} not found")
            access.require_owner(caller, keys.decode(kvs[0].value), f"space {name!r}")
            if self.etcd.txn(compare=[unchanged(key, kvs[0].mod_revision)],
                             success=[delete_op(key)]).succeeded:
                return

    def add(self, caller, name: str, segment: str, mode: str) -> types_pb2.SpaceInfo:
        """Add ``segment`` (which must exist) with attach ``mode``; needs write on the space."""
        def change(members: list) -> list:
            if any(member == segment for member, _ in members):
                raise AlreadyExists(f"segment {segment!r} is already in space {name!r}")
            return [*members, [segment, mode]]
        return self._update(caller, name, change, must_exist=segment)

    def remove(self, caller, name: str, segment: str) -> types_pb2.SpaceInfo:
        """Remove member ``segment``; needs write on the space. NotFound if not a member."""
        def change(members: list) -> list:
            kept = [m for m in members if m[0] != segment]
            if len(kept) == len(members):
                raise NotFound(f"segment {segment!r} is not in space {name!r}")
            return kept
        return self._update(caller, name, change)

    def _update(self, caller, name: str, change: Callable[[list], list],
                must_exist: str | None = None) -> types_pb2.SpaceInfo:
        key = keys.space_key(name)
        segment_key = keys.segment_key(must_exist) if must_exist else None
        for _ in retries(self.attempts, f"change space {name!r}"):
            reads = [range_op(key)] + ([range_op(segment_key, keys_only=True)]
                                       if segment_key else [])
            space, *segment = (op.response_range for op in self.etcd.txn(success=reads).responses)
            if not space.kvs:
                raise NotFound(f"space {name!r} not found")
            if segment and not segment[0].kvs:
                raise NotFound(f"segment {must_exist!r} not found")
            record = keys.decode(space.kvs[0].value)
            access.require(caller, record, access.WRITE, f"space {name!r}")
            record["members"] = change(record["members"])
            compare = [unchanged(key, space.kvs[0].mod_revision)]
            if segment_key:
                compare.append(present(segment_key))
            response = self.etcd.txn(compare=compare, success=[put_op(key, keys.encode(record))])
            if response.succeeded:
                return space_of(name, record, response.header.revision)
