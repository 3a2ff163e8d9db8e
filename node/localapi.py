"""The local API: one handler per local.proto request (thin: check, call, answer).

Like coordinator/service.py for the coordinator: each handler validates its
request, makes one call into the agent's parts and fills the response. Handlers
take ``(session, request, response)`` (RegisterFaults also the fds that came
with it), return the fds to pass with the response (node/local.py closes them
after sending) and raise ``vas.core.errors`` exceptions, which node/local.py
puts into the response.
"""
from __future__ import annotations

import os
import re
import time

import grpc

from vas.core import validate
from vas.core.errors import InvalidArgument, VasError
from vas.node import metrics
from vas.node.agent import Agent
from vas.node.changes import COUNTER
from vas.node.segments import HomeSegment, Replica
from vas.node.sessions import Session
from vas.proto import LOCAL_PROTOCOL, coordinator_pb2, local_pb2


#: The space operations that change a space (the agent drops its kept record of it).
_SPACE_CHANGES = ("create", "delete", "add", "remove")
#: Most attachment ids one Revalidate request may name.
MAX_REVALIDATE = 1024
#: What /proc/self/fd/N links to for a userfaultfd.
_USERFAULTFD = "anon_inode:[userfaultfd]"


class Unimplemented(VasError):
    """A request type this agent does not know (a newer client)."""

    code = grpc.StatusCode.UNIMPLEMENTED


def one_line(text: str) -> str:
    """An error message as one line of at most 1000 characters (a response's ``message``)."""
    return " ".join(str(text).split())[:1000]


def check_userfaultfd(fd: int) -> None:
    """InvalidArgument unless ``fd`` is a userfaultfd: the fault resolvers poll it, and
    another kind (a pipe whose writer is gone) would be ready forever. Made
    non-blocking (the flag belongs to the open file, which the client shares): the
    resolver that polls reads one fault after the poll, and a blocking read of a fault
    gone meanwhile (its thread woken, or read by another holder of the file) would
    stop every lazy mapping of this agent behind it."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise InvalidArgument(f"RegisterFaults needs a userfaultfd: cannot inspect fd "
                              f"({exc.strerror})") from exc
    if target != _USERFAULTFD:
        raise InvalidArgument(f"RegisterFaults needs a userfaultfd, not {_kind(target)}")
    os.set_blocking(fd, False)


def _kind(target: str) -> str:
    """What an fd's /proc link names, without inode numbers: "a pipe", "a socket",
    "anon_inode:[eventfd]", "the file /tmp/x"."""
    match = re.fullmatch(r"([a-z]+):\[\d+\]", target)
    if match:
        return f"a {match.group(1)}"
    if target.startswith("/"):
        return f"the file {target}"
    return target


class LocalApi:
    """The handlers of the local protocol for one ``Agent``."""

    def __init__(self, agent: Agent):
        self.agent = agent
        self.handlers = {
            "hello": self.hello, "create": self.create, "attach": self.attach,
            "detach": self.detach, "stat": self.stat, "list": self.list,
            "delete": self.delete, "chmod": self.chmod, "chown": self.chown,
            "nodes": self.nodes, "space": self.space, "status": self.status,
            "remove_node": self.remove_node,
            "prefetch": self.prefetch, "register_faults": self.register_faults,
            "sync": self.sync, "refresh": self.refresh, "wait": self.wait,
            "keepalive": self.keepalive, "revalidate": self.revalidate,
            "write_from": self.write_from,
        }

    # ------------------------------------------------------------------ segments

    def hello(self, session: Session, request, response) -> list[int]:
        if request.protocol != LOCAL_PROTOCOL:
            raise InvalidArgument(f"unsupported local protocol {request.protocol}: "
                                  f"this agent speaks {LOCAL_PROTOCOL}")
        response.hello.protocol = LOCAL_PROTOCOL
        response.hello.node.CopyFrom(self.agent.node_info())
        response.hello.caller.CopyFrom(session.caller)
        return []

    def create(self, session: Session, request, response) -> list[int]:
        replicas = validate.check_replicas(request.replicas)
        info = self.agent.homes.create(
            session.caller, validate.check_name(request.name), validate.check_size(request.size),
            validate.check_mode(request.mode), replicas,
            validate.check_seconds(request.ttl_seconds, "ttl"), request.exist_ok,
            validate.check_meta(request.meta), allocate_on_write=request.allocate_on_write)
        response.segment.CopyFrom(info)
        return []

    def attach(self, session: Session, request, response) -> list[int]:
        mode = request.mode
        if mode != "r" and mode != "rw":
            validate.check_attach_mode(mode)
        fetch = validate.check_fetch(request.fetch) if request.fetch else "lazy"
        started = time.perf_counter()
        attachment, fd, info, how = self.agent.attach(session, request.name, mode, fetch,
                                                      request.fault_support,
                                                      request.write_protect_support)
        metrics.observe_attach(how, started)
        metrics.SENT_LOCAL.inc(info.size)  # mapped by the client, not copied
        body = response.attach
        body.segment.CopyFrom(info)
        body.attachment_id = attachment.id
        body.fetch = how.to_proto()
        if attachment.lease is not None:
            body.writable = True
            body.token = attachment.lease.token
            body.keepalive_seconds = self.agent.config.writer_ttl / 3
            body.revocable = attachment.guard is not None
        return [fd]

    def detach(self, session: Session, request, response) -> list[int]:
        self.agent.detach(session, request.attachment_id)
        response.detach.SetInParent()
        return []

    def revalidate(self, session: Session, request, response) -> list[int]:
        """Whether kept "r" attachments are still current (Client.switch): one answer
        per id; an id that fails says why instead of failing the request. With
        ``space``, that space too (kept by the agent: node/spaces.py). With the
        change counter's value read first (``generation``, node/changes.py) when
        every current answer and the space hold until it moves; its page's fd if
        asked."""
        ids = request.attachment_ids
        if len(ids) > MAX_REVALIDATE:
            raise InvalidArgument(f"Revalidate asks about {len(ids)} attachments; at most "
                                  f"{MAX_REVALIDATE} per request")
        generation = COUNTER.value  # before anything is read: a change after it bumps it
        body = response.revalidate
        if request.space:
            body.space.CopyFrom(self.agent.spaces.get(validate.check_name(request.space, "space")))
        lasting = self.agent.spaces.watching or not request.space
        for attachment_id in ids:
            answer = body.attachments.add(attachment_id=attachment_id)
            try:
                version, holds = self.agent.revalidate(session, attachment_id)
            except VasError as exc:
                answer.reason = one_line(exc.message)
                continue
            if version is None:
                answer.reason = "this node's copy is not the current one any more"
            else:
                answer.current, answer.version = True, version
                lasting = lasting and holds
        body.generation = generation if lasting else 0
        return [COUNTER.page_fd()] if request.counter_page else []

    def stat(self, session: Session, request, response) -> list[int]:
        response.segment.CopyFrom(self.agent.coordinator.get_segment(
            validate.check_name(request.name)))
        return []

    def list(self, session: Session, request, response) -> list[int]:
        response.list.CopyFrom(self.agent.coordinator.list_segments(request))
        return []

    def delete(self, session: Session, request, response) -> list[int]:
        response.segment.CopyFrom(self.agent.delete(session, validate.check_name(request.name),
                                                    request.force))
        return []

    def chmod(self, session: Session, request, response) -> list[int]:
        response.segment.CopyFrom(self.agent.chmod(session, validate.check_name(request.name),
                                                   validate.check_mode(request.mode)))
        return []

    def chown(self, session: Session, request, response) -> list[int]:
        response.segment.CopyFrom(self.agent.chown(session, validate.check_name(request.name),
                                                   request.uid, request.gid))
        return []

    # ------------------------------------------------------------------ pages

    def prefetch(self, session: Session, request, response) -> list[int]:
        """Ensure a range of an attachment's pages is present here (bounds-checked):
        home pages and complete replicas return at once."""
        attachment = self.agent.sessions.get(session, request.attachment_id)
        size = attachment.segment.size
        length = request.length or max(0, size - request.offset)
        validate.check_range(request.offset, length, size)
        if isinstance(attachment.segment, Replica):
            self.agent.replicas.prefetch(attachment, request.offset, length)
        response.empty.SetInParent()
        return []

    def register_faults(self, session: Session, request, response, fds: list[int]) -> list[int]:
        """Take the client's userfaultfd of a lazy attachment (and resolve its faults)
        or of a revocable "rw" one (to write-protect it when the lock is revoked)."""
        if len(fds) != 1:
            raise InvalidArgument(f"RegisterFaults carries one userfaultfd, not {len(fds)} fds")
        check_userfaultfd(fds[0])
        if request.purpose == local_pb2.FAULT_PURPOSE_WRITE_PROTECT:
            # One per revocable "rw" attachment: counted with the attachments.
            attachment = self.agent.sessions.get(session, request.attachment_id)
            self.agent.writers.arm(attachment, fds[0], request.address, request.size)
        else:  # LAZY, or UNSPECIFIED from an older client
            self.agent.register_faults(session, request.attachment_id, fds[0],
                                       request.address, request.size)
        fds.pop()  # taken over
        response.empty.SetInParent()
        return []

    def sync(self, session: Session, request, response) -> list[int]:
        attachment = self.agent.sessions.get(session, request.attachment_id)
        ranges = [(r.offset, r.length) for r in request.ranges]
        response.segment.CopyFrom(self.agent.writers.sync(attachment, ranges,
                                                          tracked=request.tracked))
        return []

    def write_from(self, session: Session, request, response) -> list[int]:
        attachment = self.agent.sessions.get(session, request.attachment_id)
        self.agent.writers.write_from(attachment, request.offset, request.length,
                                      request.address)
        response.empty.SetInParent()
        return []

    def refresh(self, session: Session, request, response) -> list[int]:
        attachment = self.agent.sessions.get(session, request.attachment_id)
        if isinstance(attachment.segment, HomeSegment):  # the home copy is the newest
            with attachment.segment.lock:
                response.segment.CopyFrom(attachment.segment.info)
        else:
            response.segment.CopyFrom(self.agent.replicas.refresh(attachment))
        return []

    def wait(self, session: Session, request, response) -> list[int]:
        attachment = self.agent.sessions.get(session, request.attachment_id)
        timeout = validate.check_seconds(request.timeout_seconds, "timeout")
        response.segment.CopyFrom(self.agent.writers.wait(session, attachment.segment,
                                                          request.version, timeout))
        return []

    def keepalive(self, session: Session, request, response) -> list[int]:
        response.empty.SetInParent()  # the request itself refreshed session.last_seen
        return []

    # ------------------------------------------------------------------ forwarded

    def nodes(self, session: Session, request, response) -> list[int]:
        response.nodes.CopyFrom(self.agent.coordinator.list_nodes(request))
        self._patch_own_usage(response.nodes.nodes)
        return []

    def status(self, session: Session, request, response) -> list[int]:
        response.status.CopyFrom(self.agent.coordinator.cluster_status(request))
        self._patch_own_usage(response.status.nodes)
        return []

    def remove_node(self, session: Session, request, response) -> list[int]:
        """RemoveNode, forwarded with the caller filled in (the coordinator checks it)."""
        forwarded = coordinator_pb2.RemoveNodeRequest(
            caller=session.caller, node_id=request.node_id, force=request.force)
        response.removed_node.CopyFrom(self.agent.coordinator.remove_node(forwarded))
        return []

    def _patch_own_usage(self, nodes) -> None:
        """Show this node's live usage: its record holds the last heartbeat's (ttl/3 old)."""
        info = self.agent.node_info()
        for node in nodes:
            if node.id == self.agent.node_id:
                node.memory_used, node.segments = info.memory_used, info.segments
                node.replicas, node.replica_bytes = info.replicas, info.replica_bytes

    def space(self, session: Session, request, response) -> list[int]:
        """Space operations: checked, then forwarded with the caller filled in."""
        op = request.WhichOneof("op")
        coordinator, caller = self.agent.coordinator, session.caller
        if op in _SPACE_CHANGES:  # whatever it did, drop the record kept of that space
            body = getattr(request, op)
            name = body.space if op in ("add", "remove") else body.name
            try:
                return self._space_change(op, request, response, coordinator, caller)
            finally:
                self.agent.spaces.changed(name)
        if op == "get":
            response.space_info.CopyFrom(self.agent.spaces.get(
                validate.check_name(request.get.name, "space")))
        elif op == "list":
            response.spaces.CopyFrom(coordinator.list_spaces(request.list))
        else:
            raise Unimplemented("unknown space operation")
        return []

    def _space_change(self, op: str, request, response, coordinator, caller) -> list[int]:
        if op == "create":
            response.space_info.CopyFrom(coordinator.create_space(
                caller, validate.check_name(request.create.name, "space"),
                validate.check_mode(request.create.mode)))
        elif op == "delete":
            coordinator.delete_space(caller, validate.check_name(request.delete.name, "space"))
            response.empty.SetInParent()
        elif op == "add":
            response.space_info.CopyFrom(coordinator.space_add(
                caller, validate.check_name(request.add.space, "space"),
                validate.check_name(request.add.segment),
                validate.check_attach_mode(request.add.mode)))
        else:  # remove
            response.space_info.CopyFrom(coordinator.space_remove(
                caller, validate.check_name(request.remove.space, "space"),
                validate.check_name(request.remove.segment)))
        return []
