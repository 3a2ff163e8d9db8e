"""Every etcd key the coordinator uses, and the JSON codec of their values.

The storage layout at a glance (all keys under ``/vas/``; values are compact JSON)::

    /vas/alloc                    {"next_address": int}
        The bump allocator of the address window; every CreateSegment txn
        compares its mod_revision and rewrites it.
    /vas/segments/NAME            {"size", "address", "mode", "uid", "gid", "home",
                                   "replicas", "version", "created", "expires", "deleting",
                                   "lost", "meta" (only when not empty),
                                   "backups" (node ids; only with replicas > 0)}
        One segment. Its id is the key's create_revision (unique, never reused,
        grows with every create), so it is not stored in the value. Attached to
        a lease of the segment's ttl when created with one. "version" starts at
        0 and only PublishVersion changes it (+1, fenced by the writer token).
    /vas/nodes/NODE_ID            {"id", "address", "socket", "memory_total",
                                   "memory_used", "segments", "state"}
        A live node agent, under the node's lease; "replicas" and "replica_bytes"
        (the replicas it holds, from its heartbeats) too.
    /vas/members/NODE_ID          {"id", "address", "socket", "memory_total",
                                   "down_since", "replicas": [[name, id], ...]}
        A node that registered and did not leave (DeregisterNode, RemoveNode):
        no lease, so it outlives a lapsed node lease. A member without a node
        key is down; "down_since" (0 while up) is set by the coordinators'
        DownWatch when they see the node key vanish, with the replicas whose
        reports vanished with it (nodes.py).
    /vas/attach/NAME#NODE_ID      {"id": segment id, "count": n}
        A node's live local attachments of one segment, under the node's lease.
        "#" sorts below every character a name may hold, so the attach keys of
        a run of names sort exactly like their segment keys (one range reads a
        page's counts) and "NAME#" never matches a longer name.
    /vas/writers/NAME             {"id": segment id, "node", "uid", "pid"}
        The single writer lock, under the writer's lease; the fencing token is
        the key's create_revision.
    /vas/spaces/NAME              {"mode", "uid", "gid", "created",
                                   "members": [[segment, "r"|"rw"], ...]}
    /vas/rewind                   ""
        Written over and over, then deleted, by a coordinator that found etcd
        restored from a snapshot without a revision bump, until etcd's revision
        passes the newest it had seen (nodes.py DownWatch): ids and fencing
        tokens are revisions, and none of the lost ones may be handed out again.

Keys and values are bytes on the wire; names are ASCII (vas.core.validate.check_name).
"""
from __future__ import annotations

import base64
import binascii
import json

from vas.core.errors import InvalidArgument

ROOT = b"/vas/"
ALLOC = b"/vas/alloc"
SEGMENTS = b"/vas/segments/"
NODES = b"/vas/nodes/"
MEMBERS = b"/vas/members/"
ATTACH = b"/vas/attach/"
WRITERS = b"/vas/writers/"
SPACES = b"/vas/spaces/"
REWIND = b"/vas/rewind"

#: Separates a segment name from a node id in attach keys (not a name character,
#: and below all of them in byte order).
ATTACH_SEP = b"#"

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
_decoder = json.JSONDecoder()


def segment_key(name: str) -> bytes:
    """``/vas/segments/NAME``."""
    return SEGMENTS + name.encode()


def node_key(node_id: str) -> bytes:
    """``/vas/nodes/NODE_ID``."""
    return NODES + node_id.encode()


def member_key(node_id: str) -> bytes:
    """``/vas/members/NODE_ID``."""
    return MEMBERS + node_id.encode()


def attach_key(name: str, node_id: str) -> bytes:
    """``/vas/attach/NAME#NODE_ID``: one node's attachment count of one segment."""
    return ATTACH + name.encode() + ATTACH_SEP + node_id.encode()


def attach_prefix(name: str) -> bytes:
    """The prefix of every attach key of segment ``name`` (and of no other name)."""
    return ATTACH + name.encode() + ATTACH_SEP


def attach_span(first: str, last: str) -> tuple[bytes, bytes]:
    """[start, end) of the attach keys of every name n with first <= n <= last."""
    return attach_prefix(first), prefix_end(attach_prefix(last))


def split_attach_key(key: bytes) -> tuple[str, str]:
    """(segment name, node id) of an attach key."""
    name, _, node_id = key[len(ATTACH):].decode().partition(ATTACH_SEP.decode())
    return name, node_id


def writer_key(name: str) -> bytes:
    """``/vas/writers/NAME``."""
    return WRITERS + name.encode()


def space_key(name: str) -> bytes:
    """``/vas/spaces/NAME``."""
    return SPACES + name.encode()


def name_of(key: bytes, prefix: bytes) -> str:
    """The name part of ``key`` after ``prefix`` (e.g. a segment name)."""
    return key[len(prefix):].decode()


def prefix_end(prefix: bytes) -> bytes:
    """The etcd ``range_end`` that makes [prefix, end) cover every key starting with ``prefix``.

    >>> prefix_end(b"/vas/segments/")
    b'/vas/segments0'
    """
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\0"  # etcd: every key >= start
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


#: The ``range_end`` of the node keys: [NODES, NODES_END) reads the live nodes.
NODES_END = prefix_end(NODES)
#: The ``range_end`` of the member keys.
MEMBERS_END = prefix_end(MEMBERS)


def encode(value: dict) -> bytes:
    """A record as compact JSON bytes."""
    return _encoder.encode(value).encode()


def decode(data: bytes) -> dict:
    """A record from JSON bytes (InvalidArgument-free: stored values are ours)."""
    return _decoder.decode(data.decode())


def encode_page_token(next_name: str) -> str:
    """An opaque ListSegments page token that resumes at ``next_name`` (inclusive)."""
    return base64.urlsafe_b64encode(next_name.encode()).decode()


def decode_page_token(token: str) -> str:
    """The name a page token resumes at; InvalidArgument if it is not one of ours."""
    try:
        name = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise InvalidArgument(f"invalid page token {token!r}") from exc
    if not name:
        raise InvalidArgument(f"invalid page token {token!r}")
    return name
