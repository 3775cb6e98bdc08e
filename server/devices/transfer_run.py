"""One transfer of one module to one session's device, run inside the events that feed it
(issue 14 item 5).

The sans-IO :class:`~otacore.transfer.TransferSender` is advanced in the call of the event
that concerns it: the device's acknowledgement, in the session's reader (the UDP endpoint's
``on_data`` for DTLS, the connection's reader task for TLS), or the transfer's deadline, in
the process's one timer heap (:class:`~server.transport.timers.ProcessTimers`). The next
window of chunks is framed, sealed and sent in that same call, without waiting
(:meth:`DeviceSessionHandler.send_window_now`). The updater's task is needed only for what
truly waits, and sleeps meanwhile (no wake-up per acknowledgement):

- store writes: progress (at most once per ``progress_interval``; the chunks keep flowing
  meanwhile), completion (written before the FinishAck leaves, which also answers the
  device's FinishReply repeats that queued meanwhile) and failure;
- a send that cannot complete without waiting (a TLS send under way, or the socket's
  buffer full): the task sends it, and drives the transfer itself until it has caught up
  (acknowledgements then wait in the bounded :class:`TransferInbox`);
- a kick's check of the device's target (it reads the store), which may cancel the transfer.

:meth:`TransferRun.run` is the task's side, :meth:`TransferRun.feed` and
:meth:`TransferRun.on_deadline` the events'. trio runs one at a time, and the events' side
never awaits, so the sender is never advanced by both at once: the events advance it only
while :attr:`TransferRun.evented` is set, which the task clears before it advances the
sender itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from otacore.protocol.ota_wire import transfer_request
from otacore.transfer import (
    TransferCompleted,
    TransferFailed,
    TransferMessage,
    TransferProgress,
    TransferSender,
    TransferStatus,
)
from otacore.transfer.framing import split_chunk_runs
from otacore.transfer.planner import Encoding, Offer, Verdict
from server import metrics
from server.devices.delivery import Delivery, PlannedModule, SentFile
from server.devices.plan_inputs import release_version, target_facts
from server.transport.session import CloseReason, SessionClosed

if TYPE_CHECKING:
    from server.devices.updater import SessionUpdater
    from server.fleet import DeviceTarget

log = logging.getLogger("ota.engine")

#: The task's "the transfer goes on" (see TransferRun._emit).
CONTINUE = object()


#: At most this many FinishReply repeats queued behind a completion write are answered
#: (the device sends finish_retries of them, Device OS-like 4; see _confirm_again).
_REPEATS_ANSWERED = 4

#: Transfer results that mean the device refused the image itself (issue 15 counts them
#: apart from downloads that failed).
_IMAGE_REFUSALS = frozenset({TransferStatus.REJECTED, TransferStatus.INVALID_MODULE,
                             TransferStatus.TOO_LARGE})


def rollout_failure(status: TransferStatus) -> str:
    """The rollout outcome of a transfer that failed with ``status``."""
    return "image_refused" if status in _IMAGE_REFUSALS else "download_failed"


class TransferRun:
    """One transfer's sender, driven by the events that feed it and, for what waits, by
    the updater's task."""

    __slots__ = ("_counted", "_frames", "_handoff", "_progress", "_wake", "evented", "module",
                 "offer", "sender", "sent", "timer_at", "updater", "view")  # fmt: skip

    def __init__(self, updater: SessionUpdater, sender: TransferSender, view: DeviceTarget,
                 module: PlannedModule, offer: Offer, sent: SentFile) -> None:
        self.updater = updater
        self.sender = sender
        self.view = view
        self.module = module
        self.offer = offer
        self.sent = sent
        #: True while the events advance the sender (the task sleeps or writes progress).
        self.evented = False
        #: The sender's deadline armed in the process's timers (written by ProcessTimers).
        self.timer_at: float | None = None
        #: Outputs of the sender the task must carry out (a completion or a failure).
        self._handoff: list[Any] | None = None
        #: Wire messages an event could not send without waiting: the task sends them.
        self._frames: list[bytes] | None = None
        #: Progress to record (the latest only: a write under way covers the older ones).
        self._progress: TransferProgress | None = None
        #: Set by the events when the sleeping task has work.
        self._wake: trio.Event | None = None
        #: The sender's (bytes sent, bytes and chunks retransmitted) already in the metrics.
        self._counted = (0, 0, 0)

    # -- the events' side (never blocks) ----------------------------------------------------

    def feed(self, message: TransferMessage) -> None:
        """The device's transfer message, from the session's reader: advance the sender and
        send what it answers now; while the task drives the transfer, it waits in the
        updater's inbox (bounded: the protocol recovers what is dropped)."""
        updater = self.updater
        if not self.evented:
            updater.inbox.put(message)
            return
        updater.fed_in_event += 1
        self._advance(self.sender.handle(message, trio.current_time()))

    def on_deadline(self, now: float) -> None:
        """The sender's deadline came (the process's timers): retransmit, probe or give up,
        in this call. Never raises: a failure ends this session only."""
        if not self.evented:
            return
        try:
            self._advance(self.sender.poll(now))
        except Exception:
            log.exception("transfer to %s failed at its deadline", self.updater.device_id)
            self._leave_events()
            self.updater.handler.session.close(CloseReason.HANDLER_ERROR)

    def _advance(self, outputs: list[Any]) -> None:
        """Carry out the sender's answer in the event's call: chunks and control messages
        out at once (framed and sealed in one batch with the link's queued answers);
        what must wait goes to the task."""
        if any(isinstance(item, TransferCompleted | TransferFailed) for item in outputs):
            # The end: its store write precedes the FinishAck (see _emit), so the task
            # carries out the whole answer, as it did every answer before.
            self._hand_off(outputs)
            return
        handler = self.updater.handler
        link = handler.link
        prepared = self.sender.file
        frames: list[bytes] = []
        now = trio.current_time()
        for item in split_chunk_runs(outputs):
            if isinstance(item, list):
                for window in handler.frame_chunks(prepared, item):
                    frames += link.take_outgoing()  # what the link queued goes first
                    frames += window
            elif isinstance(item, TransferProgress):
                if self.updater.planner.record_progress(item.bytes_acked, item.total, now):
                    self._progress = item
                    self._set_wake()
            elif isinstance(item, TransferMessage):  # the transfer's control messages
                link.notify(transfer_request(item), now)
        frames += link.take_outgoing()
        handler.rearm()
        if frames:
            try:
                if not handler.send_window_now(frames):
                    self._frames = frames  # sending would wait: the task sends them
                    self.updater.sends_deferred += 1
                    self._hand_off(None)
                    return
            except SessionClosed:
                self._leave_events()  # the session ends, and the task with it
                return
            if handler.holds_unsent():
                # The socket's buffer is full: the task waits for room.
                self.updater.sends_deferred += 1
                self._hand_off(None)
                return
        if self.evented:  # else the task, catching up, arms it as it hands back
            self._arm()

    def _hand_off(self, outputs: list[Any] | None) -> None:
        """The task takes over: it carries out ``outputs`` (if any), then drives the sender
        until it has caught up."""
        self._leave_events()
        self._handoff = outputs
        self._set_wake()

    def _set_wake(self) -> None:
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    def _arm(self) -> None:
        """Arm the sender's deadline in the process's timers. Each acknowledgement that
        brings new data restarts the sender's timer (RFC 6298 5.3), later than the one
        armed: that one is kept, and re-armed from the sender when it falls due (poll
        does nothing before the sender's deadline), so an ack costs no heap push."""
        deadline = self.sender.next_deadline()
        armed = self.timer_at
        if armed is not None and (deadline is None or armed <= deadline):
            return
        self.updater.handler.plane.timers.arm(self, deadline)

    def _enter_events(self) -> None:
        self.evented = True
        self._arm()

    def _leave_events(self) -> None:
        self.evented = False
        self.updater.handler.plane.timers.disarm(self)

    # -- the task's side --------------------------------------------------------------------

    async def run(self) -> bool | None:
        """Run the transfer (the updater's task): True once the device staged the image,
        False when it failed, None when the device refused an encoded file and the caller
        should fall back."""
        metrics.TRANSFERS_ACTIVE.inc()
        try:
            outputs: list[Any] = self.sender.start(trio.current_time())
            while True:
                verdict = await self._emit(outputs)
                if verdict is not CONTINUE:
                    return verdict  # type: ignore[return-value]
                outputs = await self._next()
        finally:
            self._leave_events()
            self.count_sent()
            metrics.TRANSFERS_ACTIVE.dec()

    def count_sent(self) -> None:
        """Add the file bytes and retransmissions sent since the last call to the metrics:
        at each progress write and at the end (never per chunk: the hot path stays as it
        was)."""
        stats = self.sender.stats()
        sent, again = stats.bytes_sent, stats.bytes_retransmitted
        chunks = stats.chunks_retransmitted
        done_sent, done_again, done_chunks = self._counted
        if sent == done_sent:
            return
        self._counted = (sent, again, chunks)
        metrics.file_bytes(self.sent.transfer, (sent - again) - (done_sent - done_again),
                           again - done_again, chunks - done_chunks,
                           self.updater.handler.session.transport)

    async def _next(self) -> list[Any]:
        """Wait for the sender's next answer the task must carry out; meanwhile the events
        drive the transfer and the task sleeps, waking only to write progress."""
        updater, handler, sender = self.updater, self.updater.handler, self.sender
        while True:
            progress = self._progress
            if progress is not None:  # before a completion's write: never recorded after it
                self._progress = None
                await self._write_progress(progress)
                continue
            if self._handoff is not None:
                outputs, self._handoff = self._handoff, None
                return outputs
            if self.evented:
                if updater.recheck_asked:
                    self._leave_events()
                    continue
                await self._sleep()
                continue
            # The task drives the sender until it has caught up with what arrived.
            frames = self._frames
            if frames is not None:
                self._frames = None
                await handler.session.send_window(frames)
                continue
            if handler.holds_unsent():
                await handler.send_held()
                continue
            # What arrived meanwhile is carried out as the events would (no wait: sends
            # that would wait come back above), so the task catches up at once.
            message = updater.inbox.take()
            if message is not None:
                updater.fed_to_task += 1
                self._advance(sender.handle(message, trio.current_time()))
                continue
            if updater.recheck_asked:
                self._advance(await self._check_stale())
                continue
            now = trio.current_time()
            deadline = sender.next_deadline()
            if deadline is not None and deadline <= now:
                self._advance(sender.poll(now))
                continue
            self._enter_events()

    async def _sleep(self) -> None:
        """Sleep until the events have work for the task, or a kick asks for a check."""
        self._wake = wake = trio.Event()
        try:
            with self.updater.waiting_for_kick():
                await wake.wait()
        finally:
            self._wake = None

    async def _check_stale(self) -> list[Any]:
        """A kick arrived mid-transfer (an immediate release, a flash, a lock with "flash
        now", forced updates): read the target and let the planner say whether the
        transfer still serves it; cancel it when not (the run loop's next check offers the
        new target)."""
        updater = self.updater
        updater.recheck_asked = False
        view = updater.carried_view  # a kick_with's view is kept for the next check too
        if view is None:
            view = await updater.engine.fleet.target_for_device(updater.device_id)
        # An aborted rollout no longer makes the target: the transfer is cancelled and the
        # device discards what it holds (issue 15); a pause or a closed window lets it go on.
        view = await updater.steer(view, remember=False)
        stale = updater.planner.stale(target_facts(view))
        now = trio.current_time()
        if stale is None:
            return self.sender.poll(now)
        # Cancelled by the server, not failed by the device: no rollout counts it.
        updater.rollout = None
        log.info("cancelling the transfer to %s: %s", updater.device_id, stale.reason)
        return self.sender.cancel(now, stale.reason)

    async def _write_progress(self, item: TransferProgress) -> None:
        """Record the transfer's progress (with the update's "started", if still to be
        recorded)."""
        updater, module, sent = self.updater, self.module, self.sent
        fleet = updater.engine.fleet
        self.count_sent()
        progress = fleet.update_progress_work(
            updater.device_id, sha256=module.sha256, version=self.view.target.version,
            transfer=sent.transfer, bytes_done=item.bytes_acked, bytes_total=item.total)
        started = updater.unrecorded_start()
        if started:
            await updater.engine.save_memory(updater.device_id, *started, progress)
            updater.start_recorded(started)
        else:
            await fleet.run_write(progress)

    async def _emit(self, outputs: list[Any]) -> bool | object | None:
        """Carry out a sender's answer from the task: chunks out, progress and outcomes
        recorded; CONTINUE while the transfer goes on, else its verdict (see run)."""
        updater, module, sent = self.updater, self.module, self.sent
        handler, engine = updater.handler, updater.engine
        fleet = engine.fleet
        transfer, sent_size = sent.transfer, len(sent.data)
        verdict: bool | object | None = CONTINUE
        # Completion first: its store writes precede the FinishAck in the same batch.
        outputs.sort(key=lambda item: not isinstance(item, TransferCompleted))
        for item in split_chunk_runs(outputs):
            if isinstance(item, list):
                # A run of chunks: framed in one kernel call, sealed in one batch where the
                # session has its own record layer, after what the link holds (in order).
                await handler.send_chunks(self.sender.file, item)
            elif isinstance(item, TransferProgress):
                if updater.planner.record_progress(item.bytes_acked, item.total,
                                                   trio.current_time()):
                    await self._write_progress(item)
            elif isinstance(item, TransferCompleted):
                engine.delivered[updater.device_id] = Delivery(module.sha256, self.offer.final,
                                                               updater.serial)
                # The device validated the whole file and applies it at its (next) reset:
                # record that with the memory, in one transaction. Shielded: the device
                # resets now and its session may close under us. Done before the FinishAck
                # goes out (see the ordering above): the device's next session, maybe in
                # another process, must find the delivery in the store.
                started = updater.unrecorded_start()
                steps = [*started, fleet.update_progress_work(
                    updater.device_id, sha256=module.sha256, version=self.view.target.version,
                    transfer=transfer, bytes_done=sent_size, bytes_total=sent_size,
                    status="applying")]
                if self.offer.final:  # its reboot timeout runs from here (issue 15)
                    steps += updater.rollout_step("rebooting")
                version = release_version(self.view)
                if version is not None:  # the data this release's encodings saved
                    steps.append(fleet.transfer_bytes_work(
                        self.view.product.id, version, updater.device_id, bytes_sent=sent_size,
                        bytes_full=len(module.image), transfer=transfer))
                with trio.CancelScope(shield=True):
                    await engine.save_memory(updater.device_id, *steps)
                updater.start_recorded(started)
                # Durable: a lapsed device asking again later is confirmed (updater).
                updater.confirmed_transfer = self.sender.transfer_id
                verdict = True
            elif isinstance(item, TransferFailed):
                outcome = updater.planner.on_transfer_failed(item.status, Encoding(transfer),
                                                             attempt=updater.attempt)
                if outcome is Verdict.FALL_BACK:
                    # The device took the whole patch or frame but could not rebuild the
                    # image from it: the full image will do, in this session.
                    log.info("device %s refused the %s file of %s: %s", updater.device_id,
                             transfer, module.sha256[:12], item.reason)
                    verdict = None
                    continue
                updater.last_failure = item.status
                log.info("transfer to %s failed: %s", updater.device_id, item.reason,
                         extra={"event": "transfer_failed", "device_id": updater.device_id,
                                "sha256": module.sha256, "transfer": transfer,
                                "reason": str(item.reason),
                                "gives_up": outcome is Verdict.FAILED})
                if outcome is Verdict.FAILED:
                    # The update failed (a timed-out transfer with retries left is the same
                    # update going on: module_offer.deliver tries again and it resumes).
                    engine.updating.pop(updater.device_id, None)
                    log.info("update of %s failed: %s", updater.device_id, item.reason,
                             extra={"event": "update_failed", "device_id": updater.device_id,
                                    "product_id": updater.handler.product_id,
                                    "sha256": self.offer.update_sha256,
                                    "reason": str(item.reason)})
                    await updater.record_status("failed", error=item.reason,
                                                rollout_outcome=rollout_failure(item.status),
                                                application_sha256=self.offer.update_sha256)
                    metrics.update_ended(rollout_failure(item.status))
                verdict = False
            elif isinstance(item, TransferMessage):  # the transfer's control messages
                handler.link.notify(transfer_request(item), trio.current_time())
        if verdict is True:
            self._confirm_again()
        await handler.flush()  # backpressure: a slow device slows its own sender
        return verdict

    def _confirm_again(self) -> None:
        """Answer the device's FinishReply repeats that arrived while the completion was
        written (they waited in the inbox): each asked for the FinishAck again, as the
        sender answers a repeat once DONE.

        A slow write (an overloaded store) can outlast the device's repeats; the device
        then stops waiting but still applies its transfer's late FinishAck
        (otacore.transfer.receiver), which over DTLS is one NON datagram. One copy per
        repeat (bounded by _REPEATS_ANSWERED) lets the late confirmation survive a lost
        datagram; a duplicate is ignored by the device. Repeats after this send reach no
        sender (the transfer is over): this is the last word.
        """
        updater, sender = self.updater, self.sender
        link = updater.handler.link
        now = trio.current_time()
        answered = 0
        while answered < _REPEATS_ANSWERED:
            message = updater.inbox.take()
            if message is None:
                return
            for item in sender.handle(message, now):
                if isinstance(item, TransferMessage):
                    link.notify(transfer_request(item), now)
                    answered += 1
