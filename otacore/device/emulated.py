"""One emulated device on a CoAP link, sans-IO: everything a device does, no sockets or clock.

:class:`EmulatedDevice` follows the update contract of :mod:`otacore.protocol.ota_wire` on top
of a :class:`~otacore.protocol.link.CoapLink`. The shell (``server.emulator.device``) opens the
transport and calls :meth:`~EmulatedDevice.connected`, feeds received bytes to
:meth:`~EmulatedDevice.receive`, sends :meth:`~EmulatedDevice.take_outgoing`, calls
:meth:`~EmulatedDevice.poll` at :meth:`~EmulatedDevice.next_deadline` and obeys
:meth:`~EmulatedDevice.take_actions` (:class:`Disconnect`, :class:`Reboot`). Time is passed in.

Storage is a :class:`DeviceFlash` (``server.emulator.flash.Flash`` fits): every state change
that must survive a kill is written there before the device acts on it, so a new
``EmulatedDevice`` over the re-opened flash resumes where the old one stopped:

* boot: the bootloader decision (:meth:`Flash.boot`) is committed before anything runs; a
  trial image whose test marker says ``crash_on_boot`` resets at once, one with
  ``selftest_fail_after=N`` never connects and after N seconds fails its self-test (rollback,
  reset). A trial image passes its self-test when the server answers its Hello.
* offer (``POST m``): 5.03 when updates are disabled and not forced (``updates_pending`` set),
  4.03 ``"<RejectReason>: detail"`` when :func:`plan_download` refuses (an application older
  than the anti-rollback floor without a valid downgrade authorisation included, judged by
  the device's wall clock from :meth:`EmulatedDevice.set_wall_clock`), else 2.04 and a
  :class:`TransferReceiver` whose hooks check the UpdateStart against the signed manifest and
  run :func:`accept_download` on the complete image before the device reports success.
* transfer (``POST u``, NON both ways): chunks go into the inactive slot, receiver state into
  the flash (before the ack that depends on it), so a dropped link, a new session or a reboot
  resumes the download.
* after FinishAck: :func:`stage_update` (one record write), then a reset unless the
  application holds resets; after the reset the new image is on trial; its result (committed,
  rolled_back, failed) is published as ``UPDATE_RESULT_EVENT`` once connected and cleared
  from the boot record when the server acknowledged it.
* session: Hello (CON, naming the trust store's key rotation sequence), the key rotation
  statements of its answer applied (and ``GET k`` for more while the server says more
  follow), then Describe and the state the server cannot assume (updates disabled, a held
  reset, an unreported update result); the server's describe requests and events are
  answered, and so are its key pushes (``POST k``: the statements of a rotation made during
  the session, applied and saved before the 2.04 that names the new sequence); a CoAP ping
  after ``keepalive_interval`` of silence either way (nothing heard, as Device OS counts,
  or nothing sent), and the link is declared dead when nothing answers within
  ``keepalive_timeout``; the server's going-away
  notice (or a TCP Release) ends the session, with its hold-off.

This module holds the protocol machine itself: the shell's calls, the session on the link and
the device's resets. Its other concepts are mixed in from their own modules:
:mod:`otacore.device.download` (offer, transfer, staging), :mod:`otacore.device.key_rotation`
(the trust store's statements), :mod:`otacore.device.reports` (Hello, Describe, the update
result, status snapshots) and :mod:`otacore.device.application` (the application's
``System.*`` API and the availability events); what it is given and reports is in
:mod:`otacore.device.emulated_api`.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable

from otacore.coap import Code, Message, MessageType, code_string
from otacore.device import (
    UpdateOutcome,
    acknowledge_outcome,
    read_test_behaviour,
)
from otacore.device.application import ApplicationMixin
from otacore.device.availability import UpdateAvailability
from otacore.device.download import AcceptedOffer, DownloadMixin
from otacore.device.emulated_api import (
    DeviceAction,
    DeviceConfig,
    DeviceFlash,
    DevicePhase,
    DeviceStatus,
    Disconnect,
    InstalledModule,
    Reboot,
)
from otacore.device.key_rotation import KeyRotationMixin
from otacore.device.reports import ReportsMixin, result_of
from otacore.device.slots import (
    BootDecision,
)
from otacore.errors import PayloadSchemaError
from otacore.messages import (
    DescribeRequest,
    Direction,
    Event,
    Goodbye,
    ServerEvent,
    UnknownMessageError,
    from_message,
    to_message,
)
from otacore.protocol.link import (
    FrameRejected,
    LinkEvent,
    PeerReleased,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
    TcpLink,
    Transport,
    UdpLink,
)
from otacore.protocol.ota_wire import (
    UPDATE_RESULT_EVENT,
    UpdateResult,
    is_key_push,
    is_offer,
    is_transfer,
    key_request,
    parse_transfer,
    update_result_payload,
)
from otacore.signing import TrustStore
from otacore.transfer import (
    ReceiverPhase,
    TransferProtocolError,
)

#: The server's graceful-shutdown notice over UDP (server.devices.session.SHUTDOWN_EVENT;
#: over TCP it sends RFC 8323 Release instead), data ``{"hold_off": seconds}``.
SERVER_GOING_AWAY_EVENT = "ota/server/going-away"
#: Longest hold-off obeyed, so a bad value cannot park a device for days.
MAX_HOLD_OFF = 3600.0

StatusHook = Callable[[DeviceStatus], None]
AppHook = Callable[[], None]
ServerEventHook = Callable[[str, str], None]


# DownloadMixin last: its stand-in for _on_availability must come after ApplicationMixin's.
class EmulatedDevice(ApplicationMixin, KeyRotationMixin, ReportsMixin, DownloadMixin):
    """The device protocol machine of one emulated device (see the module docstring)."""

    def __init__(
        self,
        config: DeviceConfig,
        flash: DeviceFlash,
        *,
        on_status: StatusHook | None = None,
        on_reset_pending: AppHook | None = None,
        on_update_pending: AppHook | None = None,
        on_server_event: ServerEventHook | None = None,
    ) -> None:
        self.config = config
        self.flash = flash
        self.on_status = on_status
        self.on_reset_pending = on_reset_pending
        self.on_update_pending = on_update_pending
        self.on_server_event = on_server_event
        # The application's choices, re-applied at every boot (its setup() runs again).
        self._app_updates_enabled = True
        self._app_reset_enabled = True
        self._availability = UpdateAvailability()
        self._trust: TrustStore | None = None
        #: Unix time minus ``now`` (the device's real-time clock); None: it has no clock.
        self._wall_offset: float | None = None
        self._link: UdpLink | TcpLink | None = None
        self._transport: Transport | None = None
        self._now = 0.0
        self._booted = False
        self._rebooting = False
        self._online = False
        self._actions: list[DeviceAction] = []
        self._app_events: list[str] = []
        self._requests: dict[bytes, str] = {}  # token -> purpose
        self._queue: deque[tuple[Message, str]] = deque()
        self._reporting: UpdateOutcome | None = None
        self._offer: AcceptedOffer | None = None
        self._receiver = self._idle_receiver()
        self._trial_fail_at: float | None = None
        self._hello_deadline = 0.0
        self._last_tx = self._last_rx = 0.0
        self._ping_sent_at: float | None = None
        self._next_heartbeat: float | None = None
        self._heartbeats = 0
        self._modules: tuple[InstalledModule, ...] = ()
        self._product_version = self._system_version = 0
        self._safe_mode = False
        self._notified: tuple[object, ...] = ()
        self.bytes_received = self.bytes_total = 0
        self.boots = self.sessions = 0
        self.last_result: UpdateResult | None = None
        self.last_error = ""

    # --- lifecycle (the shell's calls) ----------------------------------------------------

    def boot(self, now: float) -> BootDecision:
        """Power on or reset: the bootloader decides (and commits), then the firmware starts."""
        self._now = now
        self._link = None
        self._transport = None
        self._online = False
        self._requests.clear()
        self._queue.clear()
        decision = self.flash.boot(max_trial_boots=self.config.max_trial_boots)
        self.boots += 1
        self._booted, self._rebooting = True, False
        self._availability = UpdateAvailability(
            updates_enabled=self._app_updates_enabled, reset_enabled=self._app_reset_enabled
        )
        self._trust = self.flash.load_trust_store()
        self._safe_mode = decision.safe_mode
        self._offer = None
        self._receiver = self._idle_receiver()
        self._trial_fail_at = None
        self.bytes_received = self.bytes_total = 0
        self._load_modules(decision)
        self._note_outcome(decision.record.outcome)
        trial = decision.trial
        if trial is not None:
            slot = decision.boot_slots.get((trial.function, trial.index))
            image = b"" if slot is None else self.flash.read_slot(trial.function, trial.index, slot)
            behaviour = read_test_behaviour(image)
            if behaviour.crash_on_boot:
                self._reboot("the new firmware crashed on boot")
            elif behaviour.selftest_fail_after is not None:
                # The image "never reaches the cloud": no session, then the self-test fails.
                self._trial_fail_at = now + behaviour.selftest_fail_after
        self._changed()
        return decision

    def set_wall_clock(self, unix_time: float, now: float) -> None:
        """The device's real-time clock reads ``unix_time`` at ``now`` (the shell sets it at
        start, as a battery-backed RTC or a network time sync would). Without this call the
        device has no clock: see :mod:`otacore.downgrade` for what it does then."""
        self._wall_offset = unix_time - now

    def wall_time(self, now: float) -> float | None:
        """Unix time at ``now`` by the device's clock, or None when it has none."""
        return None if self._wall_offset is None else now + self._wall_offset

    @property
    def wants_link(self) -> bool:
        """True when the firmware tries to reach the cloud (booted, not failing on purpose)."""
        return self._booted and not self._rebooting and self._trial_fail_at is None

    def connected(self, transport: Transport, now: float) -> None:
        """The transport (TLS or DTLS) is up: start a session with Hello."""
        self._now = now
        self._link = TcpLink() if transport == "tcp" else UdpLink()
        self._transport = transport
        self.sessions += 1
        self._online = False
        self._requests.clear()
        self._queue.clear()
        self._last_tx = self._last_rx = now
        self._ping_sent_at = None
        self._hello_deadline = now + self.config.hello_timeout
        token = self._link.request(to_message(self._hello(), Direction.TO_CLOUD), now)
        self._requests[token] = "hello"
        self._changed()

    def disconnected(self, now: float, reason: str) -> None:
        """The transport is gone: keep the partial download for the next session."""
        self._now = now
        if self._link is None:
            return
        self._link = None
        self._online = False
        self._requests.clear()
        self._queue.clear()
        self._abandon_transfer(now, f"the link was lost: {reason}")
        if not self._rebooting:
            self.last_error = reason
        self._changed()

    def receive(self, data: bytes, now: float) -> None:
        """Bytes from the peer (a datagram, or a piece of the TLS stream)."""
        self._now = now
        link = self._link
        if link is None or self._rebooting:
            return
        self._last_rx = now
        self._ping_sent_at = None  # any traffic answers the keep-alive question
        for event in link.receive(data, now):
            self._on_link_event(event, now)
        self._send_queued(now)
        self._settle()

    def poll(self, now: float) -> None:
        """Run the timers due at ``now``."""
        self._now = now
        if self._rebooting:
            return
        if self._trial_fail_at is not None and now >= self._trial_fail_at:
            self._selftest_failed()
        link = self._link
        if link is not None:
            for event in link.poll(now):
                self._on_link_event(event, now)
            self._apply_receiver(self._receiver.poll(now), now)
            self._keepalive(now)
            if self._online and self._next_heartbeat is not None and now >= self._next_heartbeat:
                self._heartbeats += 1
                self._publish(self.config.heartbeat_event, str(self._heartbeats), "heartbeat")
                self._next_heartbeat = now + (self.config.heartbeat_interval or 0.0)
            self._send_queued(now)
        self._settle()

    def next_deadline(self) -> float | None:
        """When :meth:`poll` next has work (now, when actions or sends are waiting)."""
        if self._actions or self._app_events or (self._online and self._can_send()):
            return self._now
        if self._rebooting:
            return None
        deadlines = [self._trial_fail_at]
        link = self._link
        if link is not None:
            deadlines += [link.next_deadline(), self._receiver.next_deadline()]
            if not self._online:
                deadlines.append(self._hello_deadline)
            else:
                deadlines.append(self._next_heartbeat)
            if self._ping_sent_at is not None:
                deadlines.append(self._ping_sent_at + self.config.keepalive_timeout)
            else:
                deadlines.append(self._quiet_since + self.config.keepalive_interval)
        present = [d for d in deadlines if d is not None]
        return min(present) if present else None

    def take_outgoing(self) -> list[bytes]:
        """Datagrams (UDP) or stream pieces (TCP) to send, in order."""
        if self._link is None:
            return []
        out = self._link.take_outgoing()
        if out:
            self._last_tx = self._now
        return out

    def take_actions(self) -> list[DeviceAction]:
        """What the shell must do now (after sending :meth:`take_outgoing`)."""
        actions, self._actions = self._actions, []
        return actions

    # --- status ---------------------------------------------------------------------------

    @property
    def online(self) -> bool:
        """True when a session is up and the server answered Hello."""
        return self._online

    @property
    def phase(self) -> DevicePhase:
        """What the device is doing."""
        if not self._booted:
            return DevicePhase.OFF
        if self._rebooting:
            return DevicePhase.REBOOTING
        if self.flash.boot_record().pending is not None:
            return DevicePhase.APPLYING
        receiving = self._receiver.phase in (ReceiverPhase.RECEIVING, ReceiverPhase.VALIDATED)
        if receiving or self._availability.update_in_progress:
            return DevicePhase.DOWNLOADING
        return DevicePhase.ONLINE if self._online else DevicePhase.CONNECTING

    def _settle(self) -> None:
        self._run_app_hooks()
        self._changed()

    # --- requests we send -------------------------------------------------------------------

    def _publish(self, name: str, data: str, purpose: str) -> None:
        if self._link is None:
            return  # offline: the next session's Hello and on_connected report the state
        if len(self._queue) >= self.config.max_queued_requests:
            for i, (_, queued_purpose) in enumerate(self._queue):
                if queued_purpose == "heartbeat":
                    del self._queue[i]
                    break
            else:
                if purpose == "heartbeat":
                    return
        message = to_message(Event(name, data, self.config.event_ttl), Direction.TO_CLOUD)
        self._queue.append((message, purpose))

    def _can_send(self) -> bool:
        # RFC 7252 4.7 NSTART = 1 over UDP; TCP (RFC 8323) has no such limit: a few at once.
        limit = 1 if self._transport == "udp" else 8
        return bool(self._queue) and len(self._requests) < limit

    def _send_queued(self, now: float) -> None:
        link = self._link
        while link is not None and self._online and self._can_send():
            message, purpose = self._queue.popleft()
            self._requests[link.request(message, now)] = purpose

    def _on_link_event(self, event: LinkEvent, now: float) -> None:
        if isinstance(event, RequestReceived):
            self._on_request(event.message, now)
        elif isinstance(event, ResponseReceived):
            purpose = self._requests.pop(event.token, None)
            if purpose is not None:
                self._on_response(purpose, event.message, now)
        elif isinstance(event, RequestFailed):
            purpose = self._requests.pop(event.token, None)
            if purpose in ("hello", "keys"):
                self._disconnect(f"{'Hello' if purpose == 'hello' else 'GET k'} failed: "
                                 f"{event.reason}")
        elif isinstance(event, PeerReleased):
            self._disconnect("the server closed the session" + (" (abort)" if event.abort else ""))
        elif isinstance(event, FrameRejected) and event.fatal:
            self._disconnect(f"malformed frame from the server: {event.error}")

    def _on_response(self, purpose: str, message: Message, now: float) -> None:
        success = message.code >> 5 == 2
        if purpose == "hello":
            if success:
                self._catch_up_keys(message.payload, now)
            else:
                self._disconnect(f"the server answered Hello with {code_string(message.code)}")
        elif purpose == "keys":
            if not success:
                self.last_error = f"the server answered GET k with {code_string(message.code)}"
                self._on_hello_answered(now)
            else:
                self._catch_up_keys(message.payload, now)
        elif purpose == "result" and success and self._reporting is not None:
            record = self.flash.boot_record()
            if record.outcome == self._reporting:
                self.flash.commit_boot_record(acknowledge_outcome(record))
            self._reporting = None

    def _catch_up_keys(self, payload: bytes, now: float) -> None:
        """Apply the key rotation statements of a Hello (or ``GET k``) answer; while the
        server says more follow (and these made progress), ask for the rest before going
        online, so the Describe (after which offers come) waits for the newest keys."""
        more = self._apply_key_statements(payload)
        link, trust = self._link, self._trust
        if more and link is not None and trust is not None:
            self._requests[link.request(key_request(trust.sequence), now)] = "keys"
            self._hello_deadline = now + self.config.hello_timeout
            return
        self._on_hello_answered(now)

    def _on_hello_answered(self, now: float) -> None:
        self._online = True
        if self.flash.boot_record().trial is not None:
            self._note_outcome(self.flash.record_selftest(True).outcome)  # reached the cloud
        self._queue.appendleft((to_message(self.describe(), Direction.TO_CLOUD), "describe"))
        self._on_availability(self._availability.on_connected())
        outcome = self.flash.boot_record().outcome
        if outcome is not None:
            self._reporting = outcome
            self._publish(UPDATE_RESULT_EVENT, update_result_payload(result_of(outcome)), "result")
        interval = self.config.heartbeat_interval
        self._next_heartbeat = None if interval is None else now + interval

    def _keepalive(self, now: float) -> None:
        link = self._link
        assert link is not None
        if not self._online and now >= self._hello_deadline:
            self._disconnect(f"no answer to Hello within {self.config.hello_timeout:g} s")
        elif self._ping_sent_at is not None:
            if now >= self._ping_sent_at + self.config.keepalive_timeout:
                self._disconnect("the server did not answer a keep-alive ping")
        elif now >= self._quiet_since + self.config.keepalive_interval:
            link.ping(now)
            self._ping_sent_at = now

    @property
    def _quiet_since(self) -> float:
        """Since when one direction of the session has been silent: the keep-alive ping
        goes out ``keepalive_interval`` after it. Silence from the server counts as Device
        OS counts it (its pinger runs on the time since the last message *received*), so
        a device that keeps publishing over a dead path still asks, and finds the path
        dead; its own silence counts too, so its NAT binding is refreshed (RFC 7252
        section 4.3's reason for the ping) while the server talks to it."""
        return min(self._last_rx, self._last_tx)

    def _disconnect(self, reason: str, hold_off: float = 0.0) -> None:
        if not any(isinstance(action, Disconnect) for action in self._actions):
            self._actions.append(Disconnect(reason, hold_off))

    # --- requests from the server -----------------------------------------------------------

    def _answer(self, request: Message, code: int, payload: bytes = b"") -> None:
        if self._link is not None:
            self._link.respond(request, Message(MessageType.ACK, code, payload=payload), self._now)

    def _on_request(self, message: Message, now: float) -> None:
        if is_transfer(message):
            try:
                transfer = parse_transfer(message)
            except TransferProtocolError:
                return  # a NON: nothing to answer (RFC 7252 4.3 lets us ignore it)
            self._apply_receiver(self._receiver.handle(transfer, now), now)
            return
        if is_offer(message):
            self._on_offer(message, now)
            return
        if is_key_push(message) and self.config.key_push:
            self._on_key_push(message)  # (older firmware: 4.04 below, no such resource)
            return
        try:
            payload = from_message(message, Direction.TO_DEVICE)
        except UnknownMessageError as exc:
            self._answer(message, Code.NOT_FOUND, str(exc).encode())
            return
        except PayloadSchemaError as exc:
            self._answer(message, Code.BAD_REQUEST, str(exc).encode())
            return
        if isinstance(payload, DescribeRequest):
            self._answer(message, Code.CONTENT, self.describe().to_payload())
        elif isinstance(payload, ServerEvent):
            self._answer(message, Code.CHANGED)
            if payload.name == SERVER_GOING_AWAY_EVENT:
                self._disconnect("the server is shutting down", _hold_off_of(payload.data))
            self._on_availability(self._availability.on_cloud_event(payload.name, payload.data))
            if self.on_server_event is not None:
                self.on_server_event(payload.name, payload.data)

    # --- resets, self-test ---------------------------------------------------------------

    def _reboot(self, reason: str) -> None:
        if self._rebooting:
            return
        self._rebooting = True
        if self._link is not None:
            goodbye = Goodbye("update" if "update" in reason else "reset")
            self._link.notify(to_message(goodbye, Direction.TO_CLOUD, MessageType.NON), self._now)
        self._actions.append(Reboot(reason))

    def _selftest_failed(self) -> None:
        self._trial_fail_at = None
        decision = self.flash.record_selftest(False)
        self._note_outcome(decision.outcome)
        self._reboot("self-test failed: the new firmware did not reach the cloud")


def _hold_off_of(data: str) -> float:
    """The ``hold_off`` seconds of a going-away notice (0 when absent or malformed)."""
    try:
        value = json.loads(data).get("hold_off", 0)
    except (ValueError, AttributeError):
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        return 0.0
    return min(float(value), MAX_HOLD_OFF)

