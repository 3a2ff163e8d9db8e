"""``seg put`` and ``seg get`` over gRPC (``vasctl --coordinator``), for vas/cli/seg.py.

With no local agent there is nothing to map: ``get`` streams the bytes from the
segment's home (vas.admin ``read``: Node.ReadPages) into the output, ``put`` streams
the input to the home (``write``: Node.WritePages under the writer lock), which
publishes it as one new version. Same checks and messages as through an agent
(seg.py); the progress line (vas/cli/progress.py) shows bytes, rate and time left.
"""
from __future__ import annotations

import sys
from typing import BinaryIO, Iterator

from vas.admin import CHUNK, AdminClient
from vas.cli.progress import Progress, show_progress
from vas.core.errors import InvalidArgument
from vas.core.sizes import human_size


def get(admin: AdminClient, name: str, offset: int, length: int | None,
        output: str | None) -> None:
    """Copy [offset, offset + length) of ``name`` (to the end when None) to ``output``
    (stdout when None or "-")."""
    info = admin.stat(name)
    length = info.size - offset if length is None else length
    # Checked (and the record read again) before the output file is created.
    pieces = admin.read(name, offset, length)
    to_stdout = output in (None, "-")
    out = sys.stdout.buffer if to_stdout else open(output, "wb")
    progress = Progress(f"get {name}", length, enabled=show_progress(to_stdout))
    try:
        for piece in pieces:
            out.write(piece)
            progress.advance(len(piece))
        out.flush()
        progress.finish()
    finally:
        if not to_stdout:
            out.close()


def put(admin: AdminClient, name: str, source: BinaryIO, offset: int, known: int | None,
        label: str) -> None:
    """Copy all of ``source`` (``known`` bytes, None when unknown) into ``name`` at
    ``offset`` and publish it; ``label`` names the source in messages."""
    size = admin.stat(name).size
    if known is not None and offset + known > size:
        raise InvalidArgument(f"{label} of {human_size(known)} does not fit in segment {name} "
                              f"of {human_size(size)} at offset {offset}")
    if offset > size:
        raise InvalidArgument(f"offset {offset} is outside segment {name} of "
                              f"{human_size(size)}")
    progress = Progress(f"put {name}", known)
    admin.write(name, _pieces(source, name, size, offset, label, progress), offset)
    progress.finish()


def _pieces(source: BinaryIO, name: str, size: int, offset: int, label: str,
            progress: Progress) -> Iterator[bytes]:
    """``source`` in CHUNK-sized reads; InvalidArgument once it goes past ``size``."""
    room = size - offset
    while True:
        data = source.read(min(CHUNK, room) if room else 1)
        if not data:
            return
        if len(data) > room:
            raise InvalidArgument(f"{label} does not fit in segment {name} of "
                                  f"{human_size(size)} at offset {offset}")
        room -= len(data)
        progress.advance(len(data))
        yield data
