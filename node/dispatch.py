"""Which local request runs next: the threads of node/local.py shared fairly between uids.

Why it exists: a thread per local connection let one user exhaust the agent's
threads by opening connections (17k of them as uid 65534 left root's clients
with resets). Now a fixed set of ``workers + 1`` threads serves every
connection (node/local.py): each idle thread waits in the epoll set, the one
woken reads a request and ``offer``s it here, and runs what it is given back;
at most ``workers`` (``--local-workers``) run requests at once, so one thread
is always left waiting for events (new connections, EOFs, root's requests).

A long request (an eager fetch, a sync or refresh, a Wait of up to its
timeout) holds its thread for as long as it takes, so threads are shared by
uid, not first come first served:

- one uid has at most ``per_uid`` tasks running at once
  (``--max-requests-per-uid``; by default two fewer than the workers): its
  further tasks wait in its own queue, in order, and never error;
- uids that have work waiting take turns (round robin), one task per turn;
- uids other than root together run at most ``workers - 1`` tasks, so a root
  request always finds a worker once root's own earlier ones allow it (with a
  single worker there is nothing to keep back).

So one uid holding its whole quota with slow requests leaves at least two
workers to everyone else, and several uids doing so cannot lock root out.

No thread hand-off: the thread that read a request runs it when the rules
allow (else it is queued and the thread goes back to waiting), and a thread
that ends a task is given the next runnable one (``done``). Each event makes
at most one more task runnable (an offer; or the end of a task: one slot of
its uid and at most one of the non-root share), and the thread that caused it
takes it: so no thread waits for events while a task could run. Handing every
request to a worker thread instead measured ~30 us more per request on the
2-CPU development VM (one more thread wake-up: attach+detach ~300 us became
~420).

Locking: ``_lock`` (rank DISPATCH, a leaf) guards the queues; tasks run with
no lock held.
"""
from __future__ import annotations

import collections
from collections.abc import Callable

from vas.node import locks

ROOT = 0


class Tenant:
    """The work of one uid: tasks waiting, how many run, whether it is in the turns."""

    __slots__ = ("uid", "tasks", "running", "queued")

    def __init__(self, uid: int):
        self.uid = uid
        self.tasks: collections.deque[Callable[[], None]] = collections.deque()
        self.running = 0
        self.queued = False


#: What a thread is given to run: the task and the tenant it is counted against.
Job = tuple[Tenant, Callable[[], None]]


class Dispatcher:
    """At most ``workers`` tasks at once, ``per_uid`` of one uid (see the module docstring).

    Example (one thread of the pool)::

        job = dispatcher.offer(session.uid, lambda: serve(request))
        while job is not None:
            job[1]()
            job = dispatcher.done(job)
    """

    def __init__(self, workers: int, per_uid: int):
        if workers < 1 or per_uid < 1:
            raise ValueError(f"a pool needs >= 1 worker and >= 1 task per uid, not "
                             f"{workers} and {per_uid}")
        self.workers = workers
        self.per_uid = per_uid
        #: Most tasks of non-root uids running together (the rest is kept for root).
        self.others = max(1, workers - 1)
        self._lock = locks.Lock("local dispatch", locks.Rank.DISPATCH)
        self._tenants: dict[int, Tenant] = {}
        #: Tenants with a task waiting and a free slot of their own, in turn order.
        self._turns: collections.deque[Tenant] = collections.deque()
        self._running = 0
        self._others_running = 0

    def offer(self, uid: int, task: Callable[[], None]) -> Job | None:
        """Queue ``task`` of ``uid`` (after ``uid``'s earlier ones); the job the calling
        thread is to run now (this task when the rules allow), or None."""
        with self._lock:
            tenant = self._tenants.get(uid)
            if tenant is None:  # kept: one per uid ever seen, a few bytes each
                tenant = self._tenants[uid] = Tenant(uid)
            if (not tenant.tasks and tenant.running < self.per_uid
                    and self._running < self.workers
                    and (uid == ROOT or self._others_running < self.others)):
                # The usual case: nothing waits, a slot is free (counted inline: hot path).
                self._running += 1
                tenant.running += 1
                if uid != ROOT:
                    self._others_running += 1
                return tenant, task
            tenant.tasks.append(task)
            if not tenant.queued and tenant.running < self.per_uid:
                tenant.queued = True
                self._turns.append(tenant)
            if self._running >= self.workers:
                return None  # the next thread to end a task takes it
            return self._take_locked()

    def done(self, job: Job) -> Job | None:
        """The calling thread ended ``job``; the next job it is to run, or None."""
        tenant = job[0]
        with self._lock:
            self._running -= 1
            tenant.running -= 1
            if tenant.uid != ROOT:
                self._others_running -= 1
            if tenant.tasks and not tenant.queued:
                tenant.queued = True
                self._turns.append(tenant)
            if not self._turns:
                return None  # the usual case: nothing waits
            return self._take_locked()

    def running(self, uid: int) -> int:
        """How many tasks of ``uid`` run now."""
        with self._lock:
            tenant = self._tenants.get(uid)
            return tenant.running if tenant is not None else 0

    def _take_locked(self) -> Job | None:
        """The next task whose uid may run one more, in turn order; None if none may."""
        for index, tenant in enumerate(self._turns):
            if tenant.uid != ROOT and self._others_running >= self.others:
                continue
            del self._turns[index]
            task = tenant.tasks.popleft()
            self._count_locked(tenant)
            if tenant.tasks and tenant.running < self.per_uid:
                self._turns.append(tenant)  # its next task waits for its next turn
            else:
                tenant.queued = False
            return tenant, task
        return None

    def _count_locked(self, tenant: Tenant) -> None:
        self._running += 1
        tenant.running += 1
        if tenant.uid != ROOT:
            self._others_running += 1
