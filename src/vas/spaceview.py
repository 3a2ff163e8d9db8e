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

from vas.core import validate
from vas.core.errors import VasError
from vas.core.fetch import FetchMode
from vas.core.types import SpaceInfo
from vas.mapping import Mapping, detach_quietly

if TYPE_CHECKING:
    from vas.client import Client


class SpaceView(collections.abc.Mapping):
    """The members of a space while switched into it: ``view[name]`` is a ``Mapping``.

    Iterates over segment names in the order they were added; ``view.info`` is
    the ``SpaceInfo`` read when switching (the view's own copy).
    """

    def __init__(self, space: SpaceInfo, mappings: dict[str, Mapping]):
        # Shared with KeptMembers and never changed; ``info`` copies it on first use
        # (the copy, a frozen dataclass built anew, was ~2 us of every switch).
        self._space = space
        self._info: SpaceInfo | None = None
        self._mappings = mappings
        # The members whose Mapping the caller was given (by __getitem__: every other
        # way in, values(), items(), get(), goes through it), and once the block is
        # left, the version of each member kept without being given: see _leave.
        self._given: set[str] = set()
        self._left: dict[str, int] | None = None

    @property
    def info(self) -> SpaceInfo:
        if self._info is None:
            self._info = _own_copy(self._space)
        return self._info

    def __getitem__(self, name: str) -> Mapping:
        try:
            mapping = self._mappings[name]
        except KeyError:
            raise KeyError(f"segment {name!r} is not a member of space {self._space.name!r}") from None
        left = self._left
        if left is not None and name in left:  # kept as it was: the caller gets its own
            mapping = self._mappings[name] = mapping._detached_copy(left.pop(name))
        self._given.add(name)
        return mapping

    def __contains__(self, name: object) -> bool:  # gives no Mapping (the mixin's would)
        return name in self._mappings

    def __iter__(self):
        return iter(self._mappings)

    def __len__(self) -> int:
        return len(self._mappings)

    def __repr__(self) -> str:
        return f"<vas.SpaceView {self._space.name} {builtins.list(self._mappings)}>"

    def _leave(self, kept: "KeptMembers", leaving: BaseException | None = None) -> None:
        """The block ends: every member's ``Mapping`` is detached for the user; the live
        "r" ones go to ``kept`` (in the view's order), the others are detached, last
        first. Raise the first detach error, or, when the block is left by ``leaving``,
        add the errors to it as notes (never replacing it).

        A Mapping the caller was given ends detached, its pages handed over to a new
        one (``Mapping._hand_over``); one it was not given is kept as it is, nobody
        else holding it (the hand-over, ~0.5 us a member, was most of a switch that
        touches no member), and the caller asking for it later gets a detached copy
        at the version it had here."""
        given = self._given
        handed: dict[str, Mapping] = {}
        left: dict[str, int] = {}
        others = []
        for name, mapping in self._mappings.items():
            if mapping.mode != "r" or mapping._detached:
                others.append(mapping)
            elif name in given:
                handed[name] = mapping._hand_over()
            else:
                handed[name] = mapping
                left[name] = mapping._version
        self._left = left
        kept.add(handed)
        first: BaseException | None = None
        for mapping in reversed(others):
            try:
                mapping.detach()
            except VasError as exc:
                if leaving is not None:
                    leaving.add_note(f"and detaching segment {mapping.name} failed: {exc!r}")
                first = first or exc
        if first is not None and leaving is None:
            raise first


class Switch:
    """What ``Client.switch`` returns: switches in at ``__enter__`` (the view), leaves at
    ``__exit__``. A class rather than ``contextlib.contextmanager``, whose generator
    and its frames cost ~2 us of every switch."""

    __slots__ = ("_client", "_space", "_view")

    def __init__(self, client: "Client", space: str):
        self._client = client
        self._space = space
        self._view: SpaceView | None = None

    def __enter__(self) -> SpaceView:
        self._view = SpaceView(*switch_in(self._client, self._space))
        return self._view

    def __exit__(self, exc_type, exc, tb) -> None:
        view, self._view = self._view, None
        view._leave(self._client._kept, exc)  # raises a detach error only without ``exc``


class KeptMembers:
    """The "r" members of spaces a Client's switches left mapped, by segment name, and
    the spaces the agent's last Revalidates read, while its change counter shows the
    value they were read at (see the module docstring). Thread-safe; the mappings are
    reused or released by the Client (``Client.switch``, ``delete``,
    ``attach(fixed=True)``, ``close``). The spaces are shared with the views of the
    switches that read them: nobody changes them (``SpaceView.info`` is a copy)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._mappings: dict[str, Mapping] = {}
        self._spaces: dict[str, SpaceInfo] = {}
        self._spaces_generation = 0

    def space_at(self, name: str, generation: int) -> SpaceInfo | None:
        """Space ``name`` as read at change counter ``generation``, if it was."""
        with self._lock:
            return self._spaces.get(name) if generation == self._spaces_generation else None

    def remember_space(self, name: str, info: SpaceInfo, generation: int) -> None:
        """Space ``name`` was ``info`` at ``generation`` (0: it holds at none); the
        spaces read at older values are forgotten."""
        with self._lock:
            if not generation or generation < self._spaces_generation:
                return
            if generation > self._spaces_generation:
                self._spaces, self._spaces_generation = {}, generation
            self._spaces[name] = info

    def add(self, mappings: dict[str, Mapping]) -> None:
        """Keep ``mappings`` (by segment name; the dict is kept's now); one kept before of
        the same segment is detached."""
        with self._lock:
            if not self._mappings:  # the usual case: the last switch took them all
                self._mappings, old = mappings, ()
            else:
                old = [self._mappings.pop(name) for name in mappings if name in self._mappings]
                self._mappings.update(mappings)
        for mapping in old:
            detach_quietly(mapping)

    def take(self) -> dict[str, Mapping]:
        """Every kept mapping, by segment name, now the caller's (to reuse or detach)."""
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
    """Space ``space`` and its members mapped at their addresses, in the space's order:
    the kept "r" ones that are current (``_current_kept``), attached for the others;
    kept ones the space does not have, or not current, are detached first (their
    addresses are free to attach again). On a failure every member mapped is detached
    and the error raised."""
    # Read before any attach below is sent: an attach's answer holds at it (or later).
    generation = client._connection.changes()
    known = (client._kept.space_at(space, generation)
             if generation and isinstance(space, str) else None)
    if known is None:  # a name remembered was checked when it was read (~1 us saved)
        validate.check_name(space, "space")
    kept = client._kept.take()
    try:
        info, reused = _current_kept(client, space, kept, generation, known)
    except BaseException:
        for mapping in kept.values():
            detach_quietly(mapping)
        raise
    if len(reused) != len(kept):
        for name, mapping in kept.items():
            if name not in reused:
                detach_quietly(mapping)
    members = info.members
    if len(reused) == len(members):  # every member reused (the usual switch back)
        return info, reused
    mappings: dict[str, Mapping] = {}
    try:
        for segment, mode in members.items():
            mapping = reused.pop(segment, None)
            mappings[segment] = mapping or _attach_member(client, segment, mode, generation)
    except BaseException:
        for mapping in [*reversed(builtins.list(mappings.values())), *reused.values()]:
            detach_quietly(mapping)
        raise
    return info, mappings


def _current_kept(client: "Client", space: str, kept: dict[str, Mapping],
                  generation: int | None, known: SpaceInfo | None
                  ) -> tuple[SpaceInfo, dict[str, Mapping]]:
    """The space and the kept mappings that are current "r" members of it, by name in
    the space's order: without a request while the agent's change counter still shows
    ``generation``, the space was ``known`` at it and every kept "r" member is known
    current at it; else asked (one Revalidate)."""
    if known is not None:
        reused = {}
        for name, mode in known.members.items():
            mapping = kept.get(name) if mode == "r" else None
            if mapping is not None:
                if mapping._generation != generation:
                    break
                reused[name] = mapping
        else:
            return known, reused
    asked = builtins.list(kept.values())
    proto, answers, generation = client._connection.revalidate(
        space, [mapping._attachment_id for mapping in asked])
    current = set()
    for mapping, answer in zip(asked, answers):
        if answer.current:
            mapping._revalidated(int(answer.version), generation)
            current.add(mapping.name)
    info = SpaceInfo.from_proto(proto)
    client._kept.remember_space(space, info, generation)
    return info, {name: kept[name] for name, mode in info.members.items()
                  if mode == "r" and name in current}


def _attach_member(client: "Client", segment: str, mode: str, generation: int | None) -> Mapping:
    """Member ``segment`` attached at its address; an "r" one of a home segment marked
    current at ``generation`` (read before the attach was sent: what it answered holds
    while the counter shows that)."""
    mapping = client.attach(segment, mode, fixed=True)
    if generation and mode == "r" and mapping.fetch == FetchMode.HOME.value:
        mapping._generation = generation
    return mapping
