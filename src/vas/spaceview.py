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

Most switches need no request at all: the agent publishes a change counter in a
read-only shared page (node/changes.py), bumped after every change that could make a
Revalidate answer differ, and each answer says the counter value it holds at. The
Client remembers the spaces read at that value (``KeptMembers.space_at``) and marks
each kept mapping with the value at which it was last known current (by a Revalidate,
or by its own attach of a home segment: the counter read before the attach was sent);
while the page still shows it, the switch reuses them as they are. Members that are
copies of segments homed elsewhere are never marked (their record is read from the
coordinator at each Revalidate; nothing tells this agent of a publish at their home),
so a space with any kept copy asks the agent each time.

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
from vas.core.fetch import FetchMode
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
        handed = []
        for mapping in reversed(builtins.list(self._mappings.values())):
            if mapping.mode == "r" and not mapping.detached:
                handed.append(mapping._hand_over())
                continue
            try:
                mapping.detach()
            except VasError as exc:
                if leaving is not None:
                    leaving.add_note(f"and detaching segment {mapping.name} failed: {exc!r}")
                first = first or exc
        kept.add(handed)
        if first is not None and leaving is None:
            raise first


class KeptMembers:
    """The "r" members of spaces a Client's switches left mapped, by segment name, and
    the spaces the agent's last Revalidates read, while its change counter shows the
    value they were read at (see the module docstring). Thread-safe; the mappings are
    reused or released by the Client (``Client.switch``, ``delete``,
    ``attach(fixed=True)``, ``close``)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._mappings: dict[str, Mapping] = {}
        self._spaces: dict[str, SpaceInfo] = {}
        self._spaces_generation = 0

    def space_at(self, name: str, generation: int) -> SpaceInfo | None:
        """Space ``name`` as read at change counter ``generation``, if it was."""
        with self._lock:
            info = self._spaces.get(name) if generation == self._spaces_generation else None
        return None if info is None else _own_copy(info)

    def remember_space(self, name: str, info: SpaceInfo, generation: int) -> None:
        """Space ``name`` was ``info`` at ``generation`` (0: it holds at none); the
        spaces read at older values are forgotten."""
        info = _own_copy(info)
        with self._lock:
            if not generation or generation < self._spaces_generation:
                return
            if generation > self._spaces_generation:
                self._spaces, self._spaces_generation = {}, generation
            self._spaces[name] = info

    def add(self, mappings: list[Mapping]) -> None:
        """Keep ``mappings``; one kept before of the same segment is detached."""
        with self._lock:
            old = [self._mappings.pop(mapping.name, None) for mapping in mappings]
            self._mappings.update((mapping.name, mapping) for mapping in mappings)
        for mapping in old:
            if mapping is not None:
                detach_quietly(mapping)

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


def _own_copy(info: SpaceInfo) -> SpaceInfo:
    """A copy of ``info`` (a view's ``info`` is its own: its members dict is mutable).
    The constructor, not from_proto, which took ~3 times as long (~5 us for 10 members)."""
    return SpaceInfo(info.name, info.mode, info.uid, info.gid, dict(info.members), info.created)


def switch_in(client: "Client", space: str) -> tuple[SpaceInfo, dict[str, Mapping]]:
    """Space ``space`` and its members mapped at their addresses: the kept "r" ones that
    are current (``_current_kept``), attached for the others; kept ones the space does
    not have, or not current, are detached first (their addresses are free to attach
    again). On a failure every member mapped is detached and the error raised."""
    kept = builtins.list(client._kept.take().values())
    # Read before any attach below is sent: an attach's answer holds at it (or later).
    generation = client._connection.changes()
    try:
        info, current = _current_kept(client, space, kept, generation)
    except BaseException:
        for mapping in kept:
            detach_quietly(mapping)
        raise
    reused = {}
    for mapping in kept:
        if mapping._attachment_id in current and info.members.get(mapping.name) == "r":
            reused[mapping.name] = mapping
        else:
            detach_quietly(mapping)
    mappings: dict[str, Mapping] = {}
    try:
        for segment, mode in info.members.items():
            mapping = reused.pop(segment, None)
            mappings[segment] = mapping or _attach_member(client, segment, mode, generation)
    except BaseException:
        for mapping in [*reversed(builtins.list(mappings.values())), *reused.values()]:
            detach_quietly(mapping)
        raise
    return info, mappings


def _current_kept(client: "Client", space: str, kept: list[Mapping],
                  generation: int | None) -> tuple[SpaceInfo, set[int]]:
    """The space and the attachment ids of the kept mappings that are current: without a
    request while the agent's change counter still shows ``generation`` and the space
    and every kept "r" member were known at it; else asked (one Revalidate)."""
    if generation is not None:
        info = client._kept.space_at(space, generation)
        if info is not None and all(mapping._generation == generation for mapping in kept
                                    if info.members.get(mapping.name) == "r"):
            return info, {mapping._attachment_id for mapping in kept}
    proto, answers, generation = client._connection.revalidate(
        space, [mapping._attachment_id for mapping in kept])
    current = set()
    for mapping, answer in zip(kept, answers):
        if answer.current:
            mapping._revalidated(int(answer.version), generation)
            current.add(mapping._attachment_id)
    info = SpaceInfo.from_proto(proto)
    client._kept.remember_space(space, info, generation)
    return info, current


def _attach_member(client: "Client", segment: str, mode: str, generation: int | None) -> Mapping:
    """Member ``segment`` attached at its address; an "r" one of a home segment marked
    current at ``generation`` (read before the attach was sent: what it answered holds
    while the counter shows that)."""
    mapping = client.attach(segment, mode, fixed=True)
    if generation and mode == "r" and mapping.fetch == FetchMode.HOME.value:
        mapping._generation = generation
    return mapping
