"""``SpaceView``: the members of a space while ``Client.switch`` has them mapped."""
from __future__ import annotations

import builtins
import collections.abc

from vas.core.errors import VasError
from vas.core.types import SpaceInfo
from vas.mapping import Mapping


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

    def _detach_all(self, leaving: BaseException | None = None) -> None:
        """Detach every member; raise the first error, or, when the block is left by
        ``leaving``, add the errors to it as notes (never replacing it)."""
        first: BaseException | None = None
        for mapping in reversed(builtins.list(self._mappings.values())):
            try:
                mapping.detach()
            except VasError as exc:
                if leaving is not None:
                    leaving.add_note(f"and detaching segment {mapping.name} failed: {exc!r}")
                first = first or exc
        if first is not None and leaving is None:
            raise first
