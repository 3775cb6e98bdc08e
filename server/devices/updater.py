"""The update side of one device session: the Trio shell around the sans-IO delivery
planner (:mod:`otacore.transfer.planner`), run by the engine (:mod:`server.devices.ota`) for
each connected device. It gathers what the planner decides from (the device's target read
from the store, what the device reported, its memory of refusals and deliveries, the
transfer's events) and carries its decisions out: it tells the device about forced or
pending updates, offers a module with its signed manifest and has it streamed by a
:class:`~server.devices.transfer_run.TransferRun` (the image, a delta or a zstd frame,
falling back in the same session when the device refuses an encoded file), retries a
transfer the device stopped acknowledging (those three: :mod:`server.devices.module_offer`),
cancels one a new target made stale, and records
progress and outcomes. The transfer itself runs inside the events that feed it (the
device's acknowledgements, its deadlines): the updater's task sleeps meanwhile, and wakes
only for what waits (store writes, a send the socket cannot take yet, a kick's check).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import trio

from otacore.coap import Code, Message, MessageType
from otacore.errors import OtaError, StoreError
from otacore.protocol.ota_wire import (
    PATH_FIRMWARE,
    UPDATES_FORCED_EVENT,
    UPDATES_PENDING_EVENT,
    is_transfer,
    parse_transfer,
    transfer_request,
)
from otacore.transfer import (
    FinishAck,
    FinishReply,
    TransferProtocolError,
    TransferSender,
    TransferStatus,
)
from otacore.transfer.late_finish import answer_late_finish_reply
from otacore.transfer.module_plan import (
    CannotPlan,
    ModulePlan,
)
from otacore.transfer.planner import (
    AnnouncePending,
    DeliveryPlanner,
    Idle,
    Offer,
)
from server.devices.firmware_get import FirmwareDownloads
from server.devices.flag import Flag
from server.devices.module_offer import deliver
from server.devices.plan_inputs import target_facts
from server.devices.session import DeviceSessionHandler, DeviceUnreachableError
from server.devices.tally import Tally
from server.devices.transfer_inbox import TransferInbox
from server.devices.transfer_run import TransferRun
from server.transport.session import SessionClosed

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from server.devices.ota import OtaEngine
    from server.fleet import DeviceTarget
    from server.fleet.base import Outcome
    from server.fleet.rollouts import RolloutOffer
    from server.fleet.update_reports import FlashStatus
    from server.store import Tx

log = logging.getLogger("ota.engine")

#: Longest wait of an updater for a rollout's answer to change by time alone (a window
#: opening, a hold ending, the rate limit): it asks again then, or at a rollout event.
MAX_ROLLOUT_WAIT_S = 3600.0
#: Added to that wait: the wall clock and trio's may disagree by a little.
ROLLOUT_WAIT_MARGIN_S = 0.05


class SessionUpdater:
    """The update side of one device session: its inbox of transfer messages and the task
    that runs its updates one module at a time, as its planner decides."""

    # One per live session: slots save its dict; "__dict__" keeps room for more.
    __slots__ = ("__dict__", "_answered", "_downloads", "_kick_event", "_kicked", "_running",
                 "_view", "_wait_scope", "attempt", "confirmed_transfer", "device_id",
                 "engine", "fed_in_event", "fed_to_task", "handled", "handler", "inbox",
                 "kicks", "last_failure", "memory_loaded", "offers", "planner",
                 "recheck_asked", "result_seen", "sends_deferred", "started_unrecorded",
                 "transfer")  # fmt: skip

    def __init__(self, engine: OtaEngine, handler: DeviceSessionHandler) -> None:
        self.engine = engine
        self.handler = handler
        self.device_id = handler.device_id
        #: Transfer messages from the device, put by the session's reader.
        self.inbox = TransferInbox()
        #: A kick asks for a check not yet begun.
        self._kicked = False
        #: Kicks answered by a check that planned from the view they carried (see
        #: update_once): no second check re-reads what that view already said.
        self._answered = 0
        #: While the task waits before trying a failed transfer again: a kick ends the wait.
        self._kick_event: trio.Event | None = None
        #: True while the updater's task runs (started on demand, see start()).
        self._running = False
        #: The transfer running, driven by the events that feed it (None: none runs).
        self.transfer: TransferRun | None = None
        #: The device's transfer messages the events advanced the sender with, and those
        #: the task took from the inbox (it drives the sender while catching up).
        self.fed_in_event = 0
        self.fed_to_task = 0
        #: Times an event could not send without waiting and handed the send to the task.
        self.sends_deferred = 0
        #: The session's delivery policy (sans-IO): every decision below is its.
        self.planner = DeliveryPlanner(engine.delivery_policy, next(engine._serials))
        #: Set when the device reports an update result in this session.
        self.result_seen = Flag()
        #: The attempt (from 0) of the transfer running (see module_offer.deliver).
        self.attempt = 0
        #: Why the last transfer of this session failed (None: it did not).
        self.last_failure: TransferStatus | None = None
        #: Set once the device's memory is loaded from the store (run() does it first).
        self.memory_loaded = Flag()
        #: The device's target as the last kick read it (see kick_with); None: read it.
        self._view: DeviceTarget | None = None
        #: A kick arrived during a transfer: its target is checked for staleness.
        self.recheck_asked = False
        #: The scope of the transfer's wait for the device, cancelled by a kick.
        self._wait_scope: trio.CancelScope | None = None
        #: The application image of an update whose "started" is still to be recorded (with
        #: the transfer's first write); None when nothing is.
        self.started_unrecorded: str | None = None
        #: Plain Block2 downloads (``GET fw/<sha256>``) by this session's device (made
        #: with the first: most sessions never download one).
        self._downloads: FirmwareDownloads | None = None
        #: Kicks asked of this updater (each asks for a check of the device's target).
        self.kicks = 0
        #: How many of those kicks a finished check covered (a check covers every kick
        #: asked before it began): once ``handled.value >= kicks``, every offer they led to
        #: was made and its transfer run. A causal marker (server.devices.tally), not a
        #: clock: a test proves "nothing was offered" by waiting for it.
        self.handled = Tally()
        #: Offers sent to the device in this session.
        self.offers = 0
        #: The id of this session's last transfer whose completion is durably recorded
        #: (None: none since the last offer): a FinishReply for it after the transfer ended
        #: is answered with a FinishAck (see _answer_late_finish).
        self.confirmed_transfer: int | None = None
        #: The active rollout that makes the device's target, as the last check read it
        #: (None: the releases make it); its outcomes are recorded with the OTA writes.
        self.rollout: RolloutOffer | None = None
        #: When (fleet clock, ms) the last check's rollout answer, or its maintenance
        #: windows' (see _window_allows), changes by time alone.
        self.rollout_retry_at: int | None = None
        #: The rollout's "downloading" is still to be recorded (see unrecorded_start).
        self._rollout_download_unrecorded = False

    @property
    def downloads(self) -> FirmwareDownloads:
        """This session's ``GET fw/<sha256>`` resource."""
        if self._downloads is None:
            self._downloads = FirmwareDownloads(self.handler)
        return self._downloads

    @property
    def sender(self) -> TransferSender | None:
        """The running transfer's sender (None: no transfer runs)."""
        transfer = self.transfer
        return transfer.sender if transfer is not None else None

    @property
    def carried_view(self) -> DeviceTarget | None:
        """The device's target as the last kick read it (None: the check reads it)."""
        return self._view

    @contextmanager
    def waiting_for_kick(self) -> Iterator[None]:
        """A wait of the task that a kick ends (as the context exits, the wait is
        cancelled, not the caller)."""
        with trio.CancelScope() as scope:
            self._wait_scope = scope
            try:
                yield
            finally:
                self._wait_scope = None

    @property
    def serial(self) -> int:
        """The session's number (sessions are numbered in the order they start)."""
        return self.planner.session_serial

    @property
    def staged(self) -> bool:
        """True once the device validated an image in this session."""
        return self.planner.staged

    def kick(self) -> None:
        """Ask the updater to re-check the device's target, read anew: something changed
        (a flash, a lock, forced updates, a Hello), so any view carried so far is stale."""
        self.forget_view()
        self.kicks += 1
        self._wake()

    def forget_view(self) -> None:
        """Drop the carried view, and any view read before now (see kick_with)."""
        self.planner.invalidate(trio.current_time())
        self._view = None

    def kick_with(self, view: DeviceTarget, read_at: float, *, describe: bool = False) -> None:
        """Ask the updater to re-check the device's target, which the caller has just read:
        a release's one read of every online device, or (``describe``) the Describe's own
        transaction, either begun at ``read_at`` (trio clock). The updater plans from it
        instead of reading the store again (at a fleet-wide release that read is one per
        device). The view is dropped, and the target read anew, when the read began before
        a change that asked for a new read (forget_view), or when it may predate this
        session's Describe (its modules could be those of the image the device left).
        """
        if not self.planner.carried_view_usable(read_at, described_at=self.handler.described_at,
                                                describe=describe):
            self.kick()
            return
        self._view = view
        self.kicks += 1
        self._wake()

    def _wake(self) -> None:
        """A kick: the next check runs (the task starts if it is not running), and a
        transfer running asks its planner whether the target it now reads leaves the
        transfer stale."""
        self._kicked = True
        self.recheck_asked = True
        if self._wait_scope is not None:
            self._wait_scope.cancel()
        if self._kick_event is not None:
            self._kick_event.set()
        self.start()

    def start(self) -> None:
        """Start the updater's task in the session's on-demand tasks, unless it runs (or
        the session is ending): it loads the device's memory if not yet loaded, then runs
        a check per kick, and ends when no kick is left."""
        if not self._running and self.handler.spawn(self.run):
            self._running = True

    def on_session_news(self, view: DeviceTarget | None, read_at: float | None) -> None:
        """The session's hook: a Hello (no view) or a Describe (its view, read from
        ``read_at``)."""
        if view is None or read_at is None:
            self.kick()
        else:
            self.kick_with(view, read_at, describe=True)

    def route_now(self, message: Message) -> bool:
        """Take a transfer message (never blocks: the session's reader calls it)."""
        if not is_transfer(message):
            return False
        try:
            transfer_message = parse_transfer(message)
        except TransferProtocolError as exc:
            self.handler._violation(f"bad transfer message: {exc}")
            return True
        if message.type is MessageType.CON:
            self.handler._respond(message, Code.CHANGED)
        transfer = self.transfer
        if transfer is not None:
            transfer.feed(transfer_message)  # the sender runs in this call (transfer_run)
        elif isinstance(transfer_message, FinishReply):
            self._answer_late_finish(transfer_message)
        else:
            # The transfer protocol recovers lost messages: never queue unboundedly.
            self.inbox.put(transfer_message)
        return True

    def _answer_late_finish(self, reply: FinishReply) -> None:
        """A FinishReply once no transfer runs: a lapsed device asks again for a FinishAck
        it lost (otacore.transfer.late_finish decides the answer, from memory: a re-ask
        costs the store nothing). Queued on the link; the session's reader sends it."""
        answer = answer_late_finish_reply(reply, self.confirmed_transfer)
        if answer is None:
            return
        log.info("device %s asked again to apply transfer %d: %s", self.device_id,
                 reply.transfer_id, "confirmed" if isinstance(answer, FinishAck)
                 else "unknown as completed, cancelled")
        self.handler.notify(transfer_request(answer))

    async def route(self, message: Message) -> bool:
        """Take the requests that belong to updates: transfer messages and firmware GETs."""
        if self.route_now(message):
            return True
        path = message.uri_path
        if message.code == Code.GET and len(path) == 2 and path[0] == PATH_FIRMWARE:
            await self.downloads.serve_block(message, path[1])
            return True
        return False

    async def run(self) -> None:
        """Load the device's memory (once per session), then run a check per kick until
        none is left (it is cancelled with the session). Started by :meth:`start`."""
        try:
            await self._run()
        finally:
            self._running = False

    async def _run(self) -> None:
        if not self.memory_loaded.is_set():
            try:
                await self.engine.load_memory(self.device_id)
            finally:
                self.memory_loaded.set()
        while self._kicked:
            self._kicked = False
            self.recheck_asked = False  # this check reads the target anyway
            covered = self.kicks  # this check answers every kick asked so far
            self.last_failure = None
            self.rollout_retry_at = None
            self.planner.policy = self.engine.delivery_policy  # the operator may retune
            store_failed = False
            try:
                await self.update_once()
            except SessionClosed:
                return  # the session is over (this task is about to be cancelled with it)
            except DeviceUnreachableError as exc:
                log.info("device %s stopped answering: %s", self.device_id, exc)
            except StoreError as exc:
                # The server's failure, not the device's: check again (backing off), or
                # the device stays on its old firmware until its next session.
                store_failed = True
                log.warning("update of %s failed on a store error (checking again): %s",
                            self.device_id, exc,
                            extra={"event": "store_error", "device_id": self.device_id,
                                   "product_id": self.handler.product_id, "reason": str(exc)})
            except OtaError as exc:
                log.warning("update of %s failed: %s", self.device_id, exc,
                            extra={"event": "update_error", "device_id": self.device_id,
                                   "product_id": self.handler.product_id, "reason": str(exc)})
            self.handled.advance_to(max(covered, self._answered))
            delay = (self.planner.after_store_error() if store_failed
                     else self.planner.after_check(self.last_failure))
            if delay is None and self.rollout_retry_at is not None:
                # The rollout holds the offer until a time (a window opens, a hold or the
                # rate limit's minute ends): ask again then, unless a rollout event kicks.
                # A time already past (a scheduled start or phase the periodic tick has not
                # opened yet) is not polled: the tick's event kicks the device.
                wait_ms = self.rollout_retry_at - self.engine.fleet.clock()
                if wait_ms > 0:
                    delay = min(MAX_ROLLOUT_WAIT_S, wait_ms / 1000 + ROLLOUT_WAIT_MARGIN_S)
            if delay is not None:
                # The device stopped acknowledging though its session lives: offer again
                # later (backing off), or it stays mid-download until it reconnects.
                if not self._kicked:
                    self._kick_event = trio.Event()
                    with trio.move_on_after(delay):
                        await self._kick_event.wait()
                    self._kick_event = None
                self.kick()

    async def _settle(self) -> bool:
        """Wait (bounded) until what the device reports after a Hello is in: its modules
        (Describe) and the result of an image it was sent; planning earlier would work
        from stale modules or re-offer an image the device just rolled back from. False
        when this session's Describe is not recorded yet: its arrival kicks again."""
        config = self.engine.config
        hello = self.handler.hello
        delivery = self.engine.delivered.get(self.device_id)
        wait_for_result = self.planner.must_await_result(
            delivery, reset_pending=hello is not None and hello.reset_pending)
        if wait_for_result:
            assert delivery is not None
            # Stored before waiting: a session cut during the wait must not make the next
            # one (here or in another process) wait again for a result that may never come.
            self.engine.delivered[self.device_id] = replace(delivery, awaited=True)
            await self.engine.save_memory(self.device_id)
        if not self.handler.described.is_set():
            with trio.move_on_after(config.describe_wait):
                await self.handler.described.wait()
        if wait_for_result:
            if not self.result_seen.is_set():
                with trio.move_on_after(config.result_wait):
                    await self.result_seen.wait()
            if self._view is not None and self._view.pending_flash is not None:
                # Recording the result may have completed that flash (it changes nothing
                # else a target is made of: releases, locks, modules).
                self._view = None
        return self.handler.described.is_set()

    async def update_once(self) -> None:
        """Bring the device to its target, one module per call (it resets after each)."""
        engine, fleet, handler = self.engine, self.engine.fleet, self.handler
        if not await self._settle():
            # Never plan from an earlier session's modules: under load the Describe may be
            # slow to record, and the device may run another image since (it would be
            # offered what it runs, or a patch against a base it no longer has).
            return
        view, self._view = self._view, None
        if view is None:
            view = await fleet.target_for_device(self.device_id)
        else:
            # A view carried by a kick (the Describe's own transaction, a release's read) is
            # never older than the kicks asked so far (kick_with drops a stale one, and
            # kick() clears it): this check answers them all. Without this, the Describe's
            # kick, asked while the Hello's check waited for it, ran a second check that
            # read the same target from the store again.
            self._answered = self.kicks
            self._kicked = False
        view = await self.steer(view)
        facts = target_facts(view)
        notice = self.planner.forced_notice(facts.updates_forced)
        if notice is not None:  # a held reset may wait for it
            await handler.send_event(UPDATES_FORCED_EVENT, "true" if notice.forced else "false")
            self.planner.told(notice)
        step = self.planner.check(facts)
        if isinstance(step, Idle):
            return
        if isinstance(step, AnnouncePending):
            await handler.send_event(UPDATES_PENDING_EVENT, "true")
            return
        planned = step if isinstance(step, CannotPlan) else await engine.plan(view)
        if isinstance(planned, CannotPlan | str):
            reason = planned.reason if isinstance(planned, CannotPlan) else planned
            log.warning("cannot update %s: %s", self.device_id, reason)
            return
        by_sha256 = {module.sha256: module for module in planned}
        plan = ModulePlan(tuple(module.sha256 for module in planned))
        offer = self.planner.next_offer(
            plan, {sha256: module.info for sha256, module in by_sha256.items()}, facts,
            engine.failed.get(self.device_id, set()))
        if (isinstance(offer, Offer) and await self._window_allows(view, offer)
                and await self._claim_rollout_offer()):
            # The device resets into the new module; its next hello continues.
            await deliver(self, view, by_sha256[offer.sha256],
                          update_sha256=offer.update_sha256)

    async def steer(self, view: DeviceTarget, *, remember: bool = True) -> DeviceTarget:
        """``view`` as the product's active rollout makes it (issue 15): the rollout's
        version when the rollout lets an offer start (its phase is open, no pause, hold,
        rate limit or closed window stops it), lets one in progress go on, or the device
        already took it; else the releases' target, unchanged (the device stays on its
        version and is re-checked at the rollout's events or its ``retry_at``). A pending
        flash goes first, as before any release. Costs no store read when this process
        knows the product has no active rollout. ``remember``: keep the answer for the
        outcomes this check records (a mid-transfer staleness check does not)."""
        fleet = self.engine.fleet
        if view.pending_flash is not None or not await fleet.rollouts_may_steer(view.product.id):
            if remember:
                self.rollout = None
            return view
        offer = await fleet.rollout_offer(view.device, view.product)
        steering = offer if offer is not None and offer.steers else None
        if remember:
            self.rollout = steering
            if offer is not None and steering is None:
                self.rollout_retry_at = offer.decision.retry_at
                log.info("rollout %d holds its offer to %s: %s", offer.rollout_id,
                         self.device_id, offer.decision.detail)
        if steering is None:
            return view
        return replace(view, target=steering.target, firmware=steering.firmware)

    async def _window_allows(self, view: DeviceTarget, offer: Offer) -> bool:
        """May a new offer of a release, lock or flash-now start now? Only inside the
        device's maintenance windows (issue 15: its groups', else its product's), unless the
        operator forced it past them; an update this engine already has in progress with
        the device goes on (a transfer in progress may finish). A rollout's offer is its
        own decision's (it applies the windows). Costs no store read when this process
        knows the product has no window. When held, the check is asked again at the
        windows' next opening (``rollout_retry_at``)."""
        if self.rollout is not None:
            return True
        if self.engine.updating.get(self.device_id) == offer.update_sha256:
            return True
        gate = await self.engine.fleet.window_gate(view)
        if not gate.allowed:
            self.rollout_retry_at = gate.retry_at
            what = (f"flash of v{view.pending_flash.version}" if view.pending_flash is not None
                    else f"v{view.target.version} ({view.target.reason.name.lower()})")
            log.info("offer of %s to %s held: %s", what, self.device_id, gate.detail)
        elif gate.forced:
            log.info("offer to %s forced by the operator: %s", self.device_id, gate.detail)
        return gate.allowed

    async def _claim_rollout_offer(self) -> bool:
        """Before a new offer of a rollout's firmware: ask the rollout again in the write
        that records the device ``offered`` (its phases and rate limit hold under
        concurrent sessions). True when the offer may go (or no rollout is involved)."""
        rollout = self.rollout
        if rollout is None or not rollout.new_offer:
            return True
        fleet = self.engine.fleet
        decision = await fleet.run_write(fleet.claim_rollout_offer_work(
            rollout.product_id, rollout.rollout_id, self.device_id))
        if not decision.allowed:
            self.rollout_retry_at = decision.retry_at
            log.info("rollout %d refused the offer to %s: %s", rollout.rollout_id,
                     self.device_id, decision.detail)
            return False
        self._rollout_download_unrecorded = True
        return True

    def rollout_step(self, outcome: str) -> list[Callable[[Tx], Outcome]]:
        """The store work recording ``outcome`` in the rollout this check's offer belongs
        to (none when the releases made the target), to ride on the OTA engine's write."""
        rollout = self.rollout
        if rollout is None:
            return []
        return [self.engine.fleet.rollout_step_work(rollout.product_id, rollout.rollout_id,
                                                    self.device_id, outcome)]

    async def record_status(self, status: FlashStatus, error: str = "",
                            rollout_outcome: str | None = None, *,
                            application_sha256: str | None = None) -> None:
        """Save the device's memory and record the flash status in one transaction: a
        session that ended between the two would leave a next session (here or in another
        process) believing an update it never announced started, or announcing it twice.
        Shielded: the session may close under us, what happened must still be recorded."""
        engine = self.engine
        started = self.unrecorded_start()
        outcome = self.rollout_step(rollout_outcome) if rollout_outcome is not None else []
        with trio.CancelScope(shield=True):
            await engine.save_memory(self.device_id, *started, engine.fleet.flash_status_work(
                self.device_id, status, error=error, application_sha256=application_sha256),
                *outcome)
        self.start_recorded(started)

    def unrecorded_start(self) -> list[Callable[[Tx], Outcome]]:
        """The update's "started", if still to be recorded: it rides on the transfer's
        first store write (progress, completion or failure) instead of costing one more
        transaction; a short transfer (a delta) records it with its completion. The caller
        calls start_recorded once that write is durable."""
        steps = []
        if self.started_unrecorded is not None:
            steps.append(self.engine.fleet.flash_status_work(
                self.device_id, "started", application_sha256=self.started_unrecorded))
        if self._rollout_download_unrecorded:  # the rollout's "downloading" rides with it
            steps += self.rollout_step("downloading")
        return steps

    def start_recorded(self, steps: list[Callable[[Tx], Outcome]]) -> None:
        """A write that carried unrecorded_start's steps is durable."""
        if steps:
            self.started_unrecorded = None
            self._rollout_download_unrecorded = False
