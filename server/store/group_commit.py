"""Group commit: concurrent small writes share one durable transaction (one fsync).

Why: with WAL and ``synchronous=FULL`` every commit is an fsync, and every call through
``trio.to_thread.run_sync`` is two thread hand-offs; one transaction per device-session write
capped the server at a few hundred writes per second. Here the writes of many concurrent
callers run in ONE worker-thread call inside ONE transaction, each inside its own SAVEPOINT
(:meth:`server.store.store.Store.write_batch`), so an operation that raises has only its own
changes rolled back and its exception re-raised to its own caller; the others commit.

Design (leader-based, no background task, nothing to start or stop):

* A caller appends its operation to a bounded pending queue (when ``max_pending``
  operations are already queued it waits first: backpressure, never unbounded growth).
* If no batch is being led, the caller becomes the *leader*: it yields once (so callers
  scheduled in the same tick join), takes up to ``max_batch`` queued operations, runs them in
  one worker thread and one transaction, and settles each: result or exception stored,
  ``on_commit`` callbacks run in batch order (the fleet publishes events there, so events
  appear only after the commit and in commit order), waiters woken. It repeats while its own
  operation is still queued (more than ``max_batch`` were ahead of it).
* A batch also stops starting operations after ``max_batch_seconds`` (SQLite holds its one
  write lock for the whole transaction, as PostgreSQL holds the store's writers' advisory
  lock: other writers of this process and of other processes or nodes sharing the database
  wait meanwhile). Operations it did not start go back to the front of the
  queue, in order, for the next batch.
* When the leader's own operation is done and operations are still queued, it hands the
  leadership to the oldest queued caller (wakes it) and returns; so every batch is led by a
  caller that is itself waiting for that batch, and at most one batch is in flight.
* Every caller still returns only after its change is durably committed, as with
  :meth:`Store.write`. Batching is opportunistic: a lone caller runs alone at once.

Cancellation: a caller cancelled while its operation is still queued removes it (it never
runs; if it had just been made leader it passes the leadership on). Once a leader has taken a
batch, the batch runs to completion under a shielded cancel scope, like a non-abandoning
``trio.to_thread.run_sync`` today: a waiting caller cancelled after its operation was taken
sees ``Cancelled`` at once, yet its change may still commit and its ``on_commit`` still runs
(so events still match the stored state); a cancelled leader gets its result and sees the
cancellation at its next checkpoint (as after ``to_thread.run_sync``), and a leader cancelled
between batches stops leading there.

State lives in a :class:`trio.lowlevel.RunVar`, so one store shared by several trio runs
(e.g. a server loop in a thread and a test loop) batches per run; the store's own write lock
still serialises the batches of all runs and threads of the process, and SQLite's busy
timeout (PostgreSQL: the writers' advisory lock) those of other processes.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import trio

from server.store.errors import StoreUnavailableError

if TYPE_CHECKING:
    from server.store.store import Store, Tx

_T = TypeVar("_T")


@dataclass(eq=False)
class BatchOp(Generic[_T]):
    """One operation of :meth:`Store.write_batch` and, once run, its own result or error."""

    fn: Callable[[Tx], _T]
    value: _T | None = None
    #: What ``fn`` raised (its savepoint was rolled back), or why the batch failed.
    error: Exception | None = None
    #: True once ``fn`` ran inside the batch's transaction (success or failure).
    ran: bool = False


@dataclass(eq=False)
class _Item(BatchOp[Any]):
    """A queued operation with its caller's wake-up and post-commit callback."""

    on_commit: Callable[[Any], None] | None = None
    #: Set once: when the item is settled, or when its caller is made the next leader.
    wake: trio.Event = field(default_factory=trio.Event)
    taken: bool = False  # handed to a batch (it will run to completion)
    done: bool = False  # settled: value or error final, on_commit ran
    abandoned: bool = False  # its caller left (cancelled) after the item was taken

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class _RunState:
    """The queue and leadership of one trio run."""

    def __init__(self, max_pending: int) -> None:
        self.pending: deque[_Item] = deque()
        self.leader: _Item | None = None
        self.slots = trio.Semaphore(max_pending)


def _error_for_caller(failure: BaseException) -> Exception:
    """A separate exception object per caller of a failed batch (one object raised in many
    tasks would share and keep growing one traceback); same type when it can be copied."""
    if isinstance(failure, Exception):
        try:
            twin = copy.copy(failure)
        except Exception:  # an exception type that cannot be rebuilt from its args
            twin = None
        if twin is not None and type(twin) is type(failure):
            twin.__cause__ = failure.__cause__ or failure
            return twin
    error = StoreUnavailableError(
        f"the shared transaction failed ({failure!r}); nothing of it was saved, retry"
    )
    error.__cause__ = failure
    return error


class GroupCommitter:
    """Runs concurrent callers' write operations in shared transactions (see module doc)."""

    def __init__(
        self,
        store: Store,
        *,
        max_batch: int = 512,
        max_pending: int = 4096,
        max_batch_seconds: float = 0.05,
    ) -> None:
        if max_batch < 1 or max_pending < 1:
            raise ValueError("max_batch and max_pending must be at least 1")
        if max_batch_seconds <= 0:
            raise ValueError("max_batch_seconds must be positive")
        self.store = store
        self.max_batch = max_batch
        #: Queued plus in-flight operations at most (callers beyond wait to queue).
        self.max_pending = max_pending
        self.max_batch_seconds = max_batch_seconds
        #: Batches committed (or failed) and operations they ran, since construction.
        self.batches = 0
        self.operations = 0
        self._state_var: trio.lowlevel.RunVar[_RunState] = trio.lowlevel.RunVar(
            "group_commit_state"
        )

    def _state(self) -> _RunState:
        try:
            return self._state_var.get()
        except LookupError:
            state = _RunState(self.max_pending)
            self._state_var.set(state)
            return state

    def queued(self) -> int:
        """Operations of the current trio run waiting to be taken into a batch."""
        return len(self._state().pending)

    def idle(self) -> bool:
        """True when the current trio run has no operation queued and no batch running."""
        state = self._state()
        return not state.pending and state.leader is None

    async def run(
        self,
        fn: Callable[[Tx], _T],
        *,
        on_commit: Callable[[_T], None] | None = None,
        limiter: trio.CapacityLimiter | None = None,
    ) -> _T:
        """Run ``fn(tx)`` in a shared write transaction and return its result once that
        transaction has durably committed; re-raise what ``fn`` raised (only its own changes
        are then rolled back). ``on_commit(result)`` runs in the trio thread right after the
        commit, in batch order (and even when this caller was cancelled meanwhile); if it
        raises, this caller gets that exception. ``limiter`` bounds the worker thread when
        this caller leads a batch (the fleet passes its store limiter).
        """
        state = self._state()
        await state.slots.acquire()  # backpressure: wait while max_pending are queued
        item = _Item(fn, on_commit=cast("Callable[[Any], None] | None", on_commit))
        state.pending.append(item)
        try:
            if state.leader is None:
                state.leader = item
            else:
                await item.wake.wait()  # settled, or made the next leader
            if state.leader is item:
                await self._lead(state, item, limiter)
        except BaseException:
            self._abandon(state, item)
            raise
        return cast(_T, item.result())

    async def _lead(
        self, state: _RunState, item: _Item, limiter: trio.CapacityLimiter | None
    ) -> None:
        try:
            while not item.done:
                # One scheduling point: callers woken in this tick join the batch, and a
                # cancelled leader leaves here, before it has taken anything.
                await trio.lowlevel.checkpoint()
                count = min(len(state.pending), self.max_batch)
                batch = [state.pending.popleft() for _ in range(count)]
                for taken in batch:
                    taken.taken = True
                await self._run_batch(state, batch, limiter)
        finally:
            if state.leader is item:
                state.leader = None
            self._hand_off(state)

    def _batch_call(self, batch: Sequence[_Item]) -> Callable[[], None]:
        """The blocking call that runs ``batch`` in a worker thread: one write
        transaction, each op in its own savepoint (:meth:`Store.write_batch`)."""
        return partial(self.store.write_batch, batch, time_budget=self.max_batch_seconds)

    async def _run_batch(
        self, state: _RunState, batch: Sequence[_Item], limiter: trio.CapacityLimiter | None
    ) -> None:
        failure: BaseException | None = None
        try:
            # A taken batch always completes: its callers are promised an answer and the
            # thread cannot be stopped anyway.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._batch_call(batch), limiter=limiter)
        except BaseException as exc:
            failure = exc
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt and the like still stop the leader (after settling)
        finally:
            self._settle(state, batch, failure)

    def _settle(
        self, state: _RunState, batch: Sequence[_Item], failure: BaseException | None
    ) -> None:
        self.batches += 1
        finished = list(batch)
        if failure is None:  # ops the time budget left over go back, in order
            finished = [item for item in batch if item.ran]
            for item in reversed([item for item in batch if not item.ran]):
                item.taken = False
                if item.abandoned:  # its caller has gone and it never ran: drop it
                    item.done = True
                    state.slots.release()
                else:
                    state.pending.appendleft(item)
        for item in finished:
            self.operations += item.ran
            state.slots.release()
            if failure is not None:
                if item.error is None:  # its change was rolled back with the batch
                    item.error = _error_for_caller(failure)
            elif item.error is None and item.on_commit is not None:
                try:
                    item.on_commit(item.value)
                except Exception as exc:  # committed, but its caller learns of the failure
                    item.error = exc
            item.done = True
            item.wake.set()

    @staticmethod
    def _hand_off(state: _RunState) -> None:
        """Make the oldest queued caller the leader when nobody leads."""
        if state.leader is None and state.pending:
            state.leader = state.pending[0]
            state.leader.wake.set()

    def _abandon(self, state: _RunState, item: _Item) -> None:
        """Its caller is leaving early (cancelled): unqueue the item if not yet taken, and
        pass on the leadership if it held it."""
        if item.taken:
            item.abandoned = True  # it runs, or is dropped if its batch leaves it over
        else:
            try:
                state.pending.remove(item)
            except ValueError:
                pass
            else:
                state.slots.release()
        if state.leader is item:
            state.leader = None
        self._hand_off(state)


class GroupReader(GroupCommitter):
    """Group read: concurrent callers' small reads share one worker-thread call and one
    read transaction (:meth:`Store.read_batch`), with the leadership, backpressure, time
    budget and cancellation rules of :class:`GroupCommitter`.

    Why: each ``trio.to_thread.run_sync`` is two thread hand-offs plus a transaction's
    BEGIN and COMMIT; at a fleet-wide reconnect every handshake asks the store whether its
    certificate may connect, and those hops, not the queries, were the cost. A batch's read
    transaction begins after every one of its operations was queued, so each sees every
    change committed before its caller asked (a revocation committed by any process before a
    handshake's read is seen by it), as a read of its own would. An operation that raises
    reaches only its caller; nothing is written, so there is nothing to roll back (a read
    that ends the transaction, which SQLite does only on I/O errors, fails the batch: every
    caller gets the error, as with a lost write batch). ``on_commit`` runs after the read
    transaction ends.
    """

    def _batch_call(self, batch: Sequence[_Item]) -> Callable[[], None]:
        return partial(self.store.read_batch, batch, time_budget=self.max_batch_seconds)
