"""The raw TCP baselines of bench/netns.py: a sender in the home's namespace, receivers in
the readers' namespaces, so the bytes cross the same veths and bridge as vas's.

The sender is remote_baselines.tcp_sender (ranges of a memfd by os.sendfile, a thread
per connection). A receiver is a child process in a reader's namespace
(``netns.py --tcp-receiver``) that opens ``MAX_STREAMS`` connections to the sender and
then does what the bench asks on its stdin, one JSON object a line, answering each
with one JSON line:

  {"op": "bulk", "streams": k, "fresh": bool}  receive the whole payload, split in k
      equal ranges over k connections (a thread each), into a fresh (never touched)
      buffer when "fresh" (cold: the receive pays the first-touch page faults), else
      into the buffer of the previous bulk op (warm). Answers {"start", "end"}
      (CLOCK_MONOTONIC, shared by every process of the machine, so the bench can time
      several receivers as one) and "crc", the checksum of what arrived.
  {"op": "rtt", "count": n, "bytes": b, "seed": s}  n requests of b bytes at random
      page-aligned offsets on one connection, one at a time: answers "us", each
      request-to-last-byte time, and "bad", the replies whose page stamp was wrong.

EOF on stdin ends it.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys

from remote_baselines import (MAX_STREAMS, connect, receive_bulk, round_trips,
                              wait_for_port)
from remote_common import CheckFailed, cpu_seconds, deadline, fresh_buffer


# -- the receiver child -------------------------------------------------------------------

def tcp_receiver(address: str, size: int, seed: int) -> int:
    """Child process (in a reader's namespace): see the module docstring."""
    host, port = address.rsplit(":", 1)
    conns = connect((host, int(port)), MAX_STREAMS)
    buf = None
    for line in sys.stdin:
        ask = json.loads(line)
        if ask["op"] == "bulk":
            if ask["fresh"] or buf is None:
                buf = None  # unmap the old one first: the VM may be short of memory
                buf = fresh_buffer(size)
            reply = receive_bulk(conns[:ask["streams"]], buf)
        else:
            reply = round_trips(conns[0], size, ask["count"], ask["bytes"], seed, ask["seed"])
        print(json.dumps(reply), flush=True)
    return 0


# -- the bench's side ---------------------------------------------------------------------

class Receiver:
    """A tcp_receiver child in namespace ``host`` of ``hosts``; ``ask`` one op of it."""

    def __init__(self, hosts, host: int, entry: str, address: str, size: int, seed: int):
        self.name = hosts.namespaces[host]
        self.proc = hosts.popen(host, [sys.executable, entry, "--tcp-receiver", address,
                                       "--size", str(size), "--seed", str(seed)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def send(self, **ask) -> None:
        self.proc.stdin.write(json.dumps(ask) + "\n")
        self.proc.stdin.flush()

    def answer(self, seconds: float) -> dict:
        """The answer to the op sent last, within ``seconds``."""
        ready, _, _ = select.select([self.proc.stdout], [], [], seconds)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            code = self.proc.poll()
            raise RuntimeError(f"TCP receiver in {self.name} "
                               + (f"exited with {code}" if code is not None
                                  else f"did not answer within {seconds:.0f} s"))
        return json.loads(line)

    def ask(self, seconds: float, **ask) -> dict:
        self.send(**ask)
        return self.answer(seconds)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class RawTcp:
    """A tcp_sender in the home's namespace and a receiver in each reader's namespace."""

    def __init__(self, hosts, home: int, readers: list[int], entry: str, size: int,
                 seed: int, tmp: str):
        self.size = size
        port_file = os.path.join(tmp, "tcp-port")
        self.sender = hosts.popen(home, [sys.executable, entry, "--tcp-sender", port_file,
                                         "--tcp-host", hosts.ips[home], "--size", str(size),
                                         "--seed", str(seed)])
        self.receivers: dict[int, Receiver] = {}  # by host
        try:
            with deadline(120, "raw TCP sender start"):
                served = wait_for_port(port_file, self.sender)
            self.crc = served["crc"]
            address = f"{hosts.ips[home]}:{served['port']}"
            self.receivers = {r: Receiver(hosts, r, entry, address, size, seed) for r in readers}
        except BaseException:
            self.close()
            raise

    def bulk(self, hosts: list[int], streams: int, fresh: bool,
             seconds: float) -> tuple[float, float]:
        """Receive the payload on the receivers of ``hosts`` at once, ``streams``
        connections each; the seconds from the first start to the last end, and the CPU
        seconds the sender and the receivers used (the sender's from before the asks to
        the last answer, each receiver's while it received). Raises CheckFailed when a
        receiver's bytes differ from the sender's."""
        chosen = [self.receivers[host] for host in hosts]
        sender_cpu = cpu_seconds(self.sender.pid)
        for receiver in chosen:
            receiver.send(op="bulk", streams=streams, fresh=fresh)
        answers = [receiver.answer(seconds) for receiver in chosen]
        sender_cpu = cpu_seconds(self.sender.pid) - sender_cpu
        for receiver, answer in zip(chosen, answers):
            if answer["crc"] != self.crc:
                raise CheckFailed(f"raw TCP: bytes received in {receiver.name} differ from "
                                 "the sender's")
        return (max(a["end"] for a in answers) - min(a["start"] for a in answers),
                sender_cpu + sum(a["cpu"] for a in answers))

    def round_trips(self, host: int, count: int, nbytes: int, seed: int,
                    seconds: float) -> list[float]:
        """``count`` request/reply times (us) of ``nbytes`` by the receiver of ``host``,
        at offsets drawn with ``seed``."""
        answer = self.receivers[host].ask(seconds, op="rtt", count=count, bytes=nbytes, seed=seed)
        if answer["bad"]:
            raise CheckFailed(f"raw TCP: {answer['bad']} of {count} replies had wrong bytes")
        return answer["us"]

    def close(self) -> None:
        for receiver in self.receivers.values():
            receiver.close()
        if self.sender.poll() is None:
            self.sender.kill()  # it serves until killed
        self.sender.wait()
