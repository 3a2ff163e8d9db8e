"""``SpaceView``: the members of a space while ``Client.switch`` has them mapped, and
``KeptMembers``: the "r" members a switch left mapped for the next one.

Why keep them: a switch attaches every member at its fixed address (one request, an
mmap and a Detach each, and the space read at the coordinator: 3-13 ms for 10 members
on the loaded 2-CPU development VM), and a program switching back and forth between spaces maps the
same segments again and again. So leaving a ``switch`` block detaches the user's
``Mapping`` objects but keeps their "r" pages mapped, and their attachments at the
agent, in the Client's ``KeptMembers``; the next switch asks the agent once
(Revalidate) whether each kept member it needs is still what a fresh attach would
map (same id, not being deleted, still readable by the caller, pages at the
published version) and reuses those, detaching and attaching again the others
(which raises the attach's error, if any). Kept members the next space does not
have are detached then. "rw" members are never kept: a writer lock must not outlive
its block.

A kept member is an attachment like any other as far as the agent and the cluster
know (counted in ``attachments``; a delete from elsewhere leaves the segment
``deleting`` until it is released, a forced delete revokes it), so it is released
by the next switch that does not need it, by a ``Client.delete`` or fixed-address
``attach`` of that segment from this Client, and by ``Client.close()`` (or the
process's end, which closes the connection).
"""
from __future__ import annotations

import builtins
import collections.abc
import threading
from typing import TYPE_CHECKING

from vas.core.errors import VasError
from vas.core.types import SpaceInfo
from vas.mapping import Mapping, detach_quietly

if TYPE_CHECKING:
    from vas.client import Client


class SpaceView(collections.abc.Mapping):
    """The members of a space while switched into it: ``view[name]`` is a ``Mapping``.

    Iterates over segment names in the order they were added; ``view.info`` is
    the ``SpaceInfo`` read when switching.
    """

    def __init__(self, info: SpaceInfo, mappings: dict[str, Mapping]):
        self.info = info
        self._mappings = mappings

    def __getitem__(self, name: str) -> Mapping:
        try:
            return self._mappings[name]
        except KeyError:
            raise KeyError(f"segment {name!r} is not a member of space {self.info.name!r}") from None

    def __iter__(self):
        return iter(self._mappings)

    def __len__(self) -> int:
        return len(self._mappings)

    def __repr__(self) -> str:
        return f"<vas.SpaceView {self.info.name} {builtins.list(self._mappings)}>"

    def _leave(self, kept: "KeptMembers", leaving: BaseException | None = None) -> None:
        """The block ends: every member's ``Mapping`` is detached for the user; the live
        "r" ones hand their pages over to ``kept``, the others are detached. Raise the
        first detach error, or, when the block is left by ``leaving``, add the errors
        to it as notes (never replacing it)."""
        first: BaseException | None = None
        for mapping in reversed(builtins.list(self._mappings.values())):
            if mapping.mode == "r" and not mapping.detached:
                kept.add(mapping._hand_over())
                continue
            try:
                mapping.detach()
            except VasError as exc:
                if leaving is not None:
                    leaving.add_note(f"and detaching segment {mapping.name} failed: {exc!r}")
                first = first or exc
        if first is not None and leaving is None:
            raise first


class KeptMembers:
    """The "r" members of spaces a Client's switches left mapped, by segment name (see
    the module docstring). Thread-safe; the mappings are reused or released by the
    Client (``Client.switch``, ``delete``, ``attach(fixed=True)``, ``close``)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._mappings: dict[str, Mapping] = {}

    def add(self, mapping: Mapping) -> None:
        with self._lock:
            old = self._mappings.pop(mapping.name, None)
            self._mappings[mapping.name] = mapping
        if old is not None and old is not mapping:
            detach_quietly(old)

    def take(self) -> dict[str, Mapping]:
        """Every kept mapping, now the caller's (to reuse or detach)."""
        with self._lock:
            mappings, self._mappings = self._mappings, {}
        return mappings

    def drop(self, name: str) -> None:
        """Release the kept mapping of segment ``name``, if there is one."""
        with self._lock:
            mapping = self._mappings.pop(name, None)
        if mapping is not None:
            detach_quietly(mapping)

    def release_all(self) -> None:
        for mapping in self.take().values():
            detach_quietly(mapping)


def switch_in(client: "Client", space: str) -> tuple[SpaceInfo, dict[str, Mapping]]:
    """Space ``space`` and its members mapped at their addresses: the kept "r" ones the
    agent says are current (asked in the same request as the space: Revalidate),
    attached for the others; kept ones the space does not have, or not current, are
    detached first (their addresses are free to attach again). On a failure every
    member mapped is detached and the error raised."""
    kept = builtins.list(client._kept.take().values())
    try:
        proto, answers = client._connection.revalidate(space, [m._attachment_id for m in kept])
        info = SpaceInfo.from_proto(proto)
    except BaseException:
        for mapping in kept:
            detach_quietly(mapping)
        raise
    reused = {}
    for mapping, answer in zip(kept, answers):
        if answer.current and info.members.get(mapping.name) == "r":
            mapping._revalidated(int(answer.version))
            reused[mapping.name] = mapping
        else:
            detach_quietly(mapping)
    mappings: dict[str, Mapping] = {}
    try:
        for segment, mode in info.members.items():
            mapping = reused.pop(segment, None)
            mappings[segment] = mapping or client.attach(segment, mode, fixed=True)
    except BaseException:
        for mapping in [*reversed(builtins.list(mappings.values())), *reused.values()]:
            detach_quietly(mapping)
        raise
    return info, mappings
