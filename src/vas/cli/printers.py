"""Output of vasctl: aligned tables for people, JSON or YAML for scripts.

Tables show human sizes ("64.0 MiB"), modes as octal ("0640"), addresses in
hex and owners by name; JSON and YAML keep every field with its raw value
(bytes, integer modes and addresses, numeric uids) so scripts never parse text.
A segment is the same object wherever it is printed: alone (``seg stat``,
``seg create``) or as an item of a list (``seg ls``).
"""
from __future__ import annotations

import dataclasses
import grp
import json
import pwd
import sys
import time
from typing import Callable, Iterable, Sequence, TextIO

from vas.core.sizes import format_size
from vas.core.types import NodeInfo, SegmentInfo, SpaceInfo

#: Values of ``-o`` on listing commands; the first is the default.
FORMATS = ("table", "json", "yaml")


def format_mode(mode: int) -> str:
    """Permission bits as four octal digits: 0o640 -> "0640"."""
    return f"{mode:04o}"


def format_address(address: int) -> str:
    """An address in hex: "0x200000000000"."""
    return f"0x{address:x}"


def user_name(uid: int) -> str:
    """The user name of ``uid``, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    """The group name of ``gid``, or the number when it has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def format_owner(uid: int, gid: int) -> str:
    return f"{user_name(uid)}:{group_name(gid)}"


def format_time(seconds: float | None) -> str:
    if not seconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Columns padded to their widest cell, two spaces apart; the last column unpadded."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [cell.ljust(width) for cell, width in zip(row[:-1], widths[:-1])] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def to_json(value) -> object:
    """Dataclasses (and lists/dicts of them) as plain JSON-able values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def print_json(value, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    json.dump(to_json(value), out, indent=2)
    out.write("\n")


def print_yaml(value, out: TextIO | None = None) -> None:
    """``value`` as one YAML document: the same data as ``print_json``, keys in order."""
    import yaml  # only `-o yaml` pays for loading it

    out = out or sys.stdout
    yaml.safe_dump(to_json(value), out, sort_keys=False, default_flow_style=False,
                   allow_unicode=True, explicit_start=True)


def print_data(value, fmt: str, out: TextIO | None = None) -> None:
    """``value`` (records, or lists and dicts of them) in a machine format: json or yaml."""
    if fmt == "yaml":
        print_yaml(value, out)
    else:
        print_json(value, out)


# -- segments ---------------------------------------------------------------------

SEGMENT_HEADERS = ("NAME", "SIZE", "ADDRESS", "MODE", "OWNER", "HOME", "VERSION", "STATE", "ATTACH")


def segment_row(s: SegmentInfo) -> tuple:
    return (s.name, format_size(s.size), format_address(s.address), format_mode(s.mode),
            format_owner(s.uid, s.gid), s.home, s.version, s.state, s.attachments)


#: How an attach from this node would get a segment's pages (see vas.core.fetch).
FetchHere = Callable[[SegmentInfo], str]


def segment_object(s: SegmentInfo, fetch_here: FetchHere | None = None) -> dict:
    """The JSON/YAML object of one segment: every field of the record, plus
    ``fetch_here`` when it is known."""
    value = to_json(s)
    if fetch_here is not None:
        value["fetch_here"] = fetch_here(s)
    return value


def print_segments(segments: list[SegmentInfo], fmt: str, out: TextIO | None = None,
                   fetch_here: FetchHere | None = None) -> None:
    """A list of segments: a table, or an array of ``segment_object``s."""
    out = out or sys.stdout
    if fmt == "table":
        print(table(SEGMENT_HEADERS, map(segment_row, segments)), file=out)
    else:
        print_data([segment_object(s, fetch_here) for s in segments], fmt, out)


def print_segment(s: SegmentInfo, fmt: str, out: TextIO | None = None,
                  fetch_here: FetchHere | None = None) -> None:
    """One segment: a ``segment_object``, or one "field  value" line per field."""
    out = out or sys.stdout
    if fmt != "table":
        print_data(segment_object(s, fetch_here), fmt, out)
        return
    rows = [
        ("name", s.name), ("id", s.id), ("size", f"{format_size(s.size)} ({s.size} bytes)"),
        ("address", f"{format_address(s.address)}-{format_address(s.address + s.size)}"),
        ("mode", format_mode(s.mode)), ("owner", f"{format_owner(s.uid, s.gid)} ({s.uid}:{s.gid})"),
        ("home", s.home), ("replicas", s.replicas), ("version", s.version), ("state", s.state),
        ("attachments", s.attachments), ("created", format_time(s.created)),
        ("expires", format_time(s.expires) if s.expires else "never"),
    ]
    rows.append(("copies", ", ".join(s.copies) + f" ({format_size(s.size)} each)"
                 if s.copies else "-"))
    rows += [(f"meta {key}", value) for key, value in sorted(s.meta.items())]
    if fetch_here is not None:
        rows.append(("fetch here", fetch_here(s)))
    print(table(("FIELD", "VALUE"), rows).split("\n", 1)[1], file=out)


# -- spaces -----------------------------------------------------------------------

SPACE_HEADERS = ("NAME", "MODE", "OWNER", "MEMBERS", "CREATED")


def space_json(s: SpaceInfo) -> dict:
    data = to_json(s)
    data["members"] = [{"segment": name, "mode": mode} for name, mode in s.members.items()]
    return data


def print_spaces(spaces: list[SpaceInfo], fmt: str, out: TextIO | None = None) -> None:
    """A list of spaces: a table, or an array of ``space_json`` objects."""
    out = out or sys.stdout
    if fmt != "table":
        print_data([space_json(s) for s in spaces], fmt, out)
        return
    rows = [(s.name, format_mode(s.mode), format_owner(s.uid, s.gid),
             ",".join(f"{name}:{mode}" for name, mode in s.members.items()) or "-",
             format_time(s.created)) for s in spaces]
    print(table(SPACE_HEADERS, rows), file=out)


def print_space(space: SpaceInfo, fmt: str, out: TextIO | None = None) -> None:
    """One space: a one-row table, or one ``space_json`` object."""
    if fmt == "table":
        print_spaces([space], fmt, out)
    else:
        print_data(space_json(space), fmt, out)


# -- nodes and status -------------------------------------------------------------

NODE_HEADERS = ("ID", "ADDRESS", "SOCKET", "MEMORY", "USED", "SEGMENTS", "REPLICAS", "STATE",
                "DOWN SINCE")


def node_row(n: NodeInfo) -> tuple:
    if n.state == "down":  # its usage went with it
        return (n.id, n.address, n.socket, format_size(n.memory_total), "-", "-", "-", n.state,
                format_time(n.down_since))
    return (n.id, n.address, n.socket, format_size(n.memory_total), format_size(n.memory_used),
            n.segments, f"{n.replicas} ({format_size(n.replica_bytes)})", n.state, "-")


def print_nodes(nodes: list[NodeInfo], fmt: str, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if fmt == "table":
        print(table(NODE_HEADERS, map(node_row, nodes)), file=out)
    else:
        print_data(nodes, fmt, out)


def print_status(status: dict, fmt: str, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if fmt != "table":
        print_data(status, fmt, out)
        return
    nodes = status["nodes"]
    total = sum(n.memory_total for n in nodes)
    used = sum(n.memory_used for n in nodes)
    summary = [
        ("etcd", f"{status['etcd']} (revision {status['revision']})"),
        ("local node", status["local_node"] or "-"),  # None: served by a coordinator
        ("nodes", f"{len(nodes)} ({format_size(used)} of {format_size(total)} in use)"),
        ("segments", f"{status['segments']} ({format_size(status['segment_bytes'])})"),
        ("spaces", status["spaces"]),
        ("nodes down", _names([n.id for n in status["down_nodes"]])),
        ("segments lost", _names(status["lost"])),
        ("segments degraded", _names(status["degraded"])),
    ]
    print(table(("FIELD", "VALUE"), summary).split("\n", 1)[1], file=out)
    if nodes or status["down_nodes"]:
        print(file=out)
        print(table(NODE_HEADERS, map(node_row, nodes + status["down_nodes"])), file=out)


def _names(names: list[str], most: int = 10) -> str:
    """'N: a, b, ...' (at most ``most`` names), or '0'."""
    if not names:
        return "0"
    shown = ", ".join(names[:most]) + (", ..." if len(names) > most else "")
    return f"{len(names)}: {shown}"
