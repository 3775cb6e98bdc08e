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
  4.03 ``"<RejectReason>: detail"`` when :func:`plan_download` refuses, else 2.04 and a
  :class:`TransferReceiver` whose hooks check the UpdateStart against the signed manifest and
  run :func:`accept_download` on the complete image before the device reports success.
* transfer (``POST u``, NON both ways): chunks go into the inactive slot, receiver state into
  the flash (before the ack that depends on it), so a dropped link, a new session or a reboot
  resumes the download.
* after FinishAck: :func:`stage_update` (one record write), then a reset unless the
  application holds resets; after the reset the new image is on trial; its result (committed,
  rolled_back, failed) is published as ``UPDATE_RESULT_EVENT`` once connected and cleared
  from the boot record when the server acknowledged it.
* session: Hello (CON), then Describe and the state the server cannot assume (updates
  disabled, a held reset, an unreported update result); the server's describe requests and
  events are answered; a CoAP ping after ``keepalive_interval`` of silence, and the link is
  declared dead when nothing answers within ``keepalive_timeout``; the server's going-away
  notice (or a TCP Release) ends the session, with its hold-off.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, cast

from otacore.coap import Code, Message, MessageType, code_string
from otacore.device import (
    BootRecord,
    ModuleKey,
    OutcomeStatus,
    SlotState,
    UpdateOutcome,
    acknowledge_outcome,
    read_test_behaviour,
)
from otacore.device.availability import (
    APP_FIRMWARE_UPDATE_PENDING,
    APP_RESET_PENDING,
    UPDATES_PENDING_EVENT,
    AppEvent,
    AvailabilityEvent,
    PublishToCloud,
    ResetNow,
    UpdateAvailability,
)
from otacore.device.slots import (
    DEFAULT_MAX_TRIAL_BOOTS,
    BootDecision,
    SelfTestDecision,
    Verdict,
    accept_download,
    plan_download,
)
from otacore.device.slots import stage_update as stage_record
from otacore.errors import OtaError, PayloadSchemaError, ValidationError
from otacore.messages import (
    Dependency,
    Describe,
    DescribeRequest,
    Direction,
    Event,
    Goodbye,
    Hello,
    ModuleDescription,
    ServerEvent,
    UnknownMessageError,
    from_message,
    to_message,
)
from otacore.module import parse_module
from otacore.platforms import ModuleFunction
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
    OFFER_ACCEPTED,
    OFFER_REFUSED,
    OFFER_UNAVAILABLE,
    UPDATE_RESULT_EVENT,
    UpdateResult,
    is_offer,
    is_transfer,
    offer_delta_base,
    parse_hello_answer,
    parse_transfer,
    transfer_request,
    update_result_payload,
)
from otacore.signing import Manifest, TrustStore, parse_statement
from otacore.transfer import (
    PartialDiscarded,
    ReadyToApply,
    ReceiverPhase,
    ReceiverState,
    ReceiverStateError,
    SaveState,
    TransferFailed,
    TransferMessage,
    TransferProtocolError,
    TransferReceiver,
    TransferRejectedError,
    TransferStarted,
    TransferStatus,
    UpdateStart,
    WriteChunk,
)
from otacore.transfer.messages import Message as TransferMessageBase
from otacore.transfer.receiver import ReceiverOutput

_DEVICE_ID = re.compile(r"[0-9a-f]{24}")
SYSTEM_PART_1: ModuleKey = (ModuleFunction.SYSTEM_PART, 1)
USER_PART_1: ModuleKey = (ModuleFunction.USER_PART, 1)
#: How each boot-record outcome is reported in UPDATE_RESULT_EVENT.
#: The server's graceful-shutdown notice over UDP (server.devices.session.SHUTDOWN_EVENT;
#: over TCP it sends RFC 8323 Release instead), data ``{"hold_off": seconds}``.
SERVER_GOING_AWAY_EVENT = "ota/server/going-away"
#: Longest hold-off obeyed, so a bad value cannot park a device for days.
MAX_HOLD_OFF = 3600.0
RESULT_STATUS = {
    OutcomeStatus.COMMITTED: "committed",
    OutcomeStatus.SELFTEST_FAILED: "rolled_back",
    OutcomeStatus.TOO_MANY_RESETS: "rolled_back",
    OutcomeStatus.IMAGE_INVALID: "failed",
    OutcomeStatus.NO_ROLLBACK_TARGET: "failed",
}


class DeviceFlash(Protocol):
    """What the device needs from its storage (``server.emulator.flash.Flash`` provides it)."""

    def boot(self, *, max_trial_boots: int = ...) -> BootDecision: ...
    def record_selftest(self, passed: bool) -> SelfTestDecision: ...
    def boot_record(self) -> BootRecord: ...
    def commit_boot_record(self, record: BootRecord) -> BootRecord: ...
    def slot_state(self, function: int, index: int, slot: int) -> SlotState: ...
    def slot_size(self, function: int, index: int, slot: int) -> int: ...
    def read_slot(
        self, function: int, index: int, slot: int, offset: int = 0, length: int | None = None
    ) -> bytes: ...
    def inactive_slot(self, function: int, index: int) -> int: ...
    def begin_inactive(self, function: int, index: int) -> int: ...
    def write_inactive(self, function: int, index: int, offset: int, data: bytes) -> None: ...
    def installed_modules(self) -> list[tuple[int, int, int]]: ...
    def load_trust_store(self) -> TrustStore | None: ...
    def save_trust_store(self, store: TrustStore) -> None: ...
    def load_transfer_state(self) -> bytes | None: ...
    def save_transfer_state(self, state: bytes) -> None: ...
    def clear_transfer_state(self) -> None: ...


@dataclass(frozen=True)
class DeviceConfig:
    """Identity and behaviour of one emulated device (times in seconds)."""

    device_id: str
    platform_id: int
    #: Hello product id; None uses the trust store's product id (when it fits 16 bits).
    product_id: int | None = None
    max_message_size: int = 1024
    ota_chunk_size: int | None = None
    max_binary_size: int = 1024 * 1024
    #: A CoAP ping after this long without sending anything (RFC 7252 4.3 / RFC 8323 5.4).
    keepalive_interval: float = 30.0
    #: The link is dead when a ping stays unanswered this long.
    keepalive_timeout: float = 10.0
    hello_timeout: float = 30.0
    #: The application loop publishes ``heartbeat_event`` this often; None: never.
    heartbeat_interval: float | None = None
    heartbeat_event: str = "ota/device/heartbeat"
    max_trial_boots: int = DEFAULT_MAX_TRIAL_BOOTS
    transfer_idle_timeout: float = 300.0
    window_bytes: int = 128 * 1024
    #: Requests (events) waiting for the link; older heartbeats are dropped beyond this.
    max_queued_requests: int = 32
    event_ttl: int = 60

    def __post_init__(self) -> None:
        if not _DEVICE_ID.fullmatch(self.device_id):
            raise ValidationError(f"device id {self.device_id!r} is not 24 lowercase hex digits")
        for name in ("keepalive_interval", "keepalive_timeout", "hello_timeout"):
            if not getattr(self, name) > 0:
                raise ValidationError(f"device setting {name} must be positive")
        if self.heartbeat_interval is not None and not self.heartbeat_interval > 0:
            raise ValidationError("heartbeat_interval must be positive (or None for none)")


class DevicePhase(Enum):
    """What the device is doing, for progress displays."""

    OFF = "off"  # not booted yet
    CONNECTING = "connecting"  # no session, or Hello not answered yet
    ONLINE = "online"
    DOWNLOADING = "downloading"
    APPLYING = "applying"  # an image is staged and waits for its reset
    REBOOTING = "rebooting"


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The shell must close the link and reconnect: after ``hold_off`` seconds when the
    server said when to come back, else with its usual back-off."""

    reason: str
    hold_off: float = 0.0


@dataclass(frozen=True, slots=True)
class Reboot:
    """The shell must close the link and call :meth:`EmulatedDevice.boot` again."""

    reason: str


DeviceAction = Disconnect | Reboot


@dataclass(frozen=True, slots=True)
class InstalledModule:
    """One running module."""

    function: int
    index: int
    version: int
    slot: int
    sha256: bytes


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """A snapshot for progress displays."""

    device_id: str
    phase: DevicePhase
    transport: str | None
    modules: tuple[InstalledModule, ...]
    product_version: int
    system_version: int
    bytes_received: int
    bytes_total: int
    last_result: UpdateResult | None
    last_error: str
    boots: int
    sessions: int
    updates_enabled: bool
    updates_pending: bool
    reset_pending: bool
    safe_mode: bool


@dataclass(slots=True)
class _Offer:
    """An accepted offer: the signed manifest and what the download checks produced."""

    signed: bytes
    manifest: Manifest
    delta_base: bytes | None
    verdict: Verdict | None = None
    image: bytes | None = None  # a delta's reconstructed image, written at apply time

    @property
    def key(self) -> ModuleKey:
        return self.manifest.module_key


StatusHook = Callable[[DeviceStatus], None]
AppHook = Callable[[], None]
ServerEventHook = Callable[[str, str], None]


class EmulatedDevice:
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
        self._offer: _Offer | None = None
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
                deadlines.append(self._last_tx + self.config.keepalive_interval)
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

    # --- the application's API (Device OS System.*) -----------------------------------------

    @property
    def updates_enabled(self) -> bool:
        """False after :meth:`disable_updates`."""
        return self._availability.updates_enabled

    @property
    def updates_forced(self) -> bool:
        """True when the cloud forces updates on this device."""
        return self._availability.updates_forced

    @property
    def updates_pending(self) -> bool:
        """True when an update waits for the application to enable updates."""
        return self._availability.updates_pending

    @property
    def reset_pending(self) -> bool:
        """True when a system reset waits for :meth:`enable_reset`."""
        return self._availability.reset_pending

    def disable_updates(self) -> None:
        """Refuse update offers unless forced (the cloud is told)."""
        self._app_updates_enabled = False
        self._on_availability(self._availability.disable_updates())
        self._settle()

    def enable_updates(self) -> None:
        """Accept updates again (the cloud is told, and sends a pending update)."""
        self._app_updates_enabled = True
        self._on_availability(self._availability.enable_updates())
        self._settle()

    def disable_reset(self) -> None:
        """Hold system resets (an applied update waits) until :meth:`enable_reset`."""
        self._app_reset_enabled = False
        self._on_availability(self._availability.disable_reset())
        self._settle()

    def enable_reset(self) -> None:
        """Allow system resets; performs a held one now."""
        self._app_reset_enabled = True
        self._on_availability(self._availability.enable_reset())
        self._settle()

    def reset(self) -> None:
        """The application resets the device (System.reset(): immediate)."""
        self._reboot("the application reset the device")
        self._settle()

    def publish(self, name: str, data: str) -> None:
        """Publish an application event (sent once the session is up; dropped offline)."""
        self._publish(name, data, "event")

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

    def status(self) -> DeviceStatus:
        """A snapshot for progress displays."""
        return DeviceStatus(
            device_id=self.config.device_id,
            phase=self.phase,
            transport=self._transport if self._link is not None else None,
            modules=self._modules,
            product_version=self._product_version,
            system_version=self._system_version,
            bytes_received=min(self.bytes_received, self.bytes_total),
            bytes_total=self.bytes_total,
            last_result=self.last_result,
            last_error=self.last_error,
            boots=self.boots,
            sessions=self.sessions,
            updates_enabled=self._availability.updates_enabled,
            updates_pending=self._availability.updates_pending,
            reset_pending=self._availability.reset_pending,
            safe_mode=self._safe_mode,
        )

    def _settle(self) -> None:
        self._run_app_hooks()
        self._changed()

    def _changed(self) -> None:
        if self.on_status is None:
            return
        availability = self._availability
        key = (
            self.phase,
            self.last_result,
            self.last_error,
            self.sessions,
            self.boots,
            # Availability changes too, so a watcher (EmulatedFleet.wait_until) sees them.
            availability.reset_pending,
            availability.updates_enabled,
            availability.updates_pending,
            availability.updates_forced,
        )
        if key != self._notified:
            self._notified = key
            self.on_status(self.status())

    # --- what the device reports ----------------------------------------------------------

    def _load_modules(self, decision: BootDecision) -> None:
        modules = []
        for (function, index), slot in sorted(decision.boot_slots.items()):
            state = self.flash.slot_state(function, index, slot)
            if state.valid and state.module_version is not None and state.sha256 is not None:
                modules.append(
                    InstalledModule(function, index, state.module_version, slot, state.sha256)
                )
        self._modules = tuple(modules)
        versions = {(m.function, m.index): m for m in modules}
        system = versions.get(SYSTEM_PART_1)
        self._system_version = system.version if system else 0
        user = versions.get(USER_PART_1)
        product_version = None
        if user is not None:
            product_version = parse_module(
                self.flash.read_slot(*USER_PART_1, user.slot)
            ).product_version
        self._product_version = product_version or 0

    def _hello(self) -> Hello:
        config = self.config
        product_id = config.product_id
        if product_id is None:
            trusted = self._trust.product_id if self._trust is not None else 0
            product_id = trusted if trusted <= 0xFFFF else 0
        record = self.flash.boot_record()
        succeeded = record.trial is not None or (
            record.outcome is not None and record.outcome.succeeded
        )
        return Hello(
            device_id=config.device_id,
            platform_id=config.platform_id,
            product_id=product_id,
            product_version=self._product_version,
            system_version=self._system_version,
            supports_immediate_updates=True,
            updates_enabled=self._availability.updates_enabled,
            reset_pending=self._availability.reset_pending,
            max_message_size=config.max_message_size,
            ota_chunk_size=config.ota_chunk_size,
            max_binary_size=config.max_binary_size,
            ota_succeeded=succeeded,
        )

    def describe(self) -> Describe:
        """The Describe of the running modules (store 0: main)."""
        described = []
        for module in self._modules:
            state = self.flash.slot_state(module.function, module.index, module.slot)
            size = self.flash.slot_size(module.function, module.index, module.slot)
            deps = tuple(Dependency(d.function, d.index, d.version) for d in state.dependencies)
            described.append(
                ModuleDescription(
                    module.function, module.index, module.version, 0, size, module.sha256, deps
                )
            )
        return Describe(tuple(described))

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
            if self._requests.pop(event.token, None) == "hello":
                self._disconnect(f"Hello failed: {event.reason}")
        elif isinstance(event, PeerReleased):
            self._disconnect("the server closed the session" + (" (abort)" if event.abort else ""))
        elif isinstance(event, FrameRejected) and event.fatal:
            self._disconnect(f"malformed frame from the server: {event.error}")

    def _on_response(self, purpose: str, message: Message, now: float) -> None:
        success = message.code >> 5 == 2
        if purpose == "hello":
            if success:
                self._apply_key_statements(message.payload)
                self._on_hello_answered(now)
            else:
                self._disconnect(f"the server answered Hello with {code_string(message.code)}")
        elif purpose == "result" and success and self._reporting is not None:
            record = self.flash.boot_record()
            if record.outcome == self._reporting:
                self.flash.commit_boot_record(acknowledge_outcome(record))
            self._reporting = None

    def _apply_key_statements(self, payload: bytes) -> None:
        """Apply the key rotation statements the Hello answer carries (ota_wire point 5):
        those after the trust store's sequence, in order; a bad one stops the catch-up."""
        if self._trust is None or not payload:
            return
        try:
            statements = parse_hello_answer(payload)
        except PayloadSchemaError as exc:
            self.last_error = f"bad key statements from the server: {exc}"
            return
        store = self._trust
        for raw in statements:
            try:
                statement = parse_statement(raw)
                if statement.sequence > store.sequence:
                    store = store.apply(statement)
            except OtaError as exc:  # a forged, replayed or out-of-order statement
                self.last_error = f"refused a key statement: {exc}"
                break
        if store is not self._trust:
            self.flash.save_trust_store(store)
            self._trust = store

    def _on_hello_answered(self, now: float) -> None:
        self._online = True
        if self.flash.boot_record().trial is not None:
            self._note_outcome(self.flash.record_selftest(True).outcome)  # reached the cloud
        self._queue.appendleft((to_message(self.describe(), Direction.TO_CLOUD), "describe"))
        self._on_availability(self._availability.on_connected())
        outcome = self.flash.boot_record().outcome
        if outcome is not None:
            self._reporting = outcome
            self._publish(UPDATE_RESULT_EVENT, update_result_payload(_result_of(outcome)), "result")
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
        elif now >= self._last_tx + self.config.keepalive_interval:
            link.ping(now)
            self._ping_sent_at = now

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

    def _refuse(self, request: Message, reason: str, detail: str) -> None:
        line = f"{reason}: {detail}".replace("\n", " ")
        self._answer(request, OFFER_REFUSED, line.encode())
        self.last_error = f"refused an update: {line}"

    def _on_offer(self, request: Message, now: float) -> None:
        availability = self._availability
        if availability.update_in_progress or self._receiver.transfer_id is not None:
            self._abandon_transfer(now, "a new offer replaces this transfer")
        if not (availability.updates_enabled or availability.updates_forced):
            self._answer(request, OFFER_UNAVAILABLE, b"updates are disabled on this device")
            # The server marks the update pending; the device knows it just refused one.
            self._on_availability(availability.on_cloud_event(UPDATES_PENDING_EVENT, "true"))
            return
        try:
            base = offer_delta_base(request)
        except PayloadSchemaError as exc:
            self._answer(request, Code.BAD_REQUEST, str(exc).encode())
            return
        if self._trust is None:
            self._refuse(request, "UNKNOWN_KEY", "no trust store is provisioned on this device")
            return
        flash = self.flash
        plan = plan_download(
            flash.boot_record(),
            request.payload,
            self._trust,
            platform_id=self.config.platform_id,
            installed=flash.installed_modules(),
        )
        verdict = plan.verdict
        manifest = verdict.manifest
        if verdict.reason is not None or manifest is None:
            reason = verdict.reason.name if verdict.reason is not None else "MANIFEST_FORMAT"
            self._refuse(request, reason, verdict.detail)
            return
        if base is not None:
            running = {(m.function, m.index): m.sha256 for m in self._modules}
            if running.get(manifest.module_key) != base:
                self._refuse(
                    request,
                    TransferStatus.BAD_BASE.name,
                    f"the delta base {base.hex()} is not the running image",
                )
                return
        if plan.changed:
            flash.commit_boot_record(plan.record)  # drops a stale pending activation first
        availability.offer_update()
        offer = _Offer(request.payload, manifest, base)
        self._offer = offer
        self._receiver = self._receiver_for(offer)
        self.bytes_received, self.bytes_total = 0, manifest.size
        self.last_error = ""
        self._answer(request, OFFER_ACCEPTED)

    # --- the transfer -----------------------------------------------------------------------

    def _idle_receiver(self) -> TransferReceiver:
        """A receiver for transfers nobody offered: refuses starts, cancels strays."""

        def no_offer(start: UpdateStart) -> None:
            raise TransferRejectedError(
                "no update offer was accepted in this session", TransferStatus.REFUSED
            )

        return TransferReceiver(None, read_stored=lambda offset, length: b"", check_start=no_offer)

    def _saved_state(self) -> ReceiverState | None:
        raw = self.flash.load_transfer_state()
        if raw is None:
            return None
        try:
            return ReceiverState.from_bytes(raw)
        except ReceiverStateError:
            self.flash.clear_transfer_state()
            return None

    def _receiver_for(self, offer: _Offer) -> TransferReceiver:
        flash = self.flash
        function, index = offer.key

        def read_stored(offset: int, length: int) -> bytes:
            slot = flash.inactive_slot(function, index)
            return flash.read_slot(function, index, slot, offset, length)

        return TransferReceiver(
            self._saved_state(),
            read_stored=read_stored,
            window_bytes=self.config.window_bytes,
            idle_timeout=self.config.transfer_idle_timeout,
            max_file_size=self.config.max_binary_size,
            check_start=lambda start: _check_start(offer, start),
            check_file=lambda start, view: self._check_file(offer, view),
        )

    def _check_file(self, offer: _Offer, view: memoryview) -> None:
        """The whole file is in the slot: rebuild a delta, then every acceptance check."""
        image = bytes(view)
        if offer.delta_base is not None:
            from otacore.delta import apply_patch  # only devices taking deltas need it

            function, index = offer.key
            running = {(m.function, m.index): m.slot for m in self._modules}
            base = self.flash.read_slot(function, index, running[offer.key])
            try:
                image = apply_patch(base, image)
            except (OtaError, ValueError) as exc:
                raise TransferRejectedError(f"the delta does not apply: {exc}") from exc
        assert self._trust is not None
        verdict = accept_download(
            image,
            offer.signed,
            self._trust,
            platform_id=self.config.platform_id,
            installed=self.flash.installed_modules(),
        )
        if verdict.reason is not None:
            raise TransferRejectedError(f"{verdict.reason.name}: {verdict.detail}")
        offer.verdict = verdict
        offer.image = image if offer.delta_base is not None else None

    def _apply_receiver(self, outputs: list[ReceiverOutput], now: float) -> None:
        offer = self._offer
        if offer is not None and any(
            isinstance(out, TransferStarted) and out.resume_offset == 0 for out in outputs
        ):
            # A download from chunk 1: empty the slot, so no byte of an older image remains
            # past the new one's end (the bootloader checks the whole slot).
            self.flash.begin_inactive(*offer.key)
        for out in outputs:
            if isinstance(out, TransferMessageBase):
                if self._link is not None:
                    self._link.notify(transfer_request(cast(TransferMessage, out)), now)
            elif isinstance(out, WriteChunk):
                assert offer is not None
                self.flash.write_inactive(*offer.key, out.offset, bytes(out.data))
                self.bytes_received += len(out.data)
            elif isinstance(out, SaveState):
                if out.state is None:
                    self.flash.clear_transfer_state()
                else:
                    self.flash.save_transfer_state(out.state.to_bytes())
            elif isinstance(out, TransferStarted):
                start = out.start
                self.bytes_total = start.file_size
                self.bytes_received = min(out.resume_offset * start.chunk_size, start.file_size)
            elif isinstance(out, ReadyToApply):
                self._stage(now)
            elif isinstance(out, TransferFailed):
                self.last_error = f"transfer failed ({out.status.name}): {out.reason}"
                self._end_offer(staged=False)
            # PartialDiscarded: the receiver starts over; nothing else to do.
            elif not isinstance(out, PartialDiscarded):  # pragma: no cover - exhaustive
                raise TypeError(f"unexpected receiver output {out!r}")

    def _abandon_transfer(self, now: float, reason: str) -> None:
        if self._receiver.transfer_id is not None:
            self._apply_receiver(self._receiver.cancel(now, reason), now)
        self._end_offer(staged=False)

    def _end_offer(self, *, staged: bool) -> None:
        if self._offer is not None or self._availability.update_in_progress:
            self._offer = None
            self._on_availability(self._availability.on_update_finished(staged))

    def _stage(self, now: float) -> None:
        """The server confirmed the validated file: switch atomically at the next reset."""
        offer = self._offer
        assert offer is not None and offer.verdict is not None
        flash = self.flash
        if offer.image is not None:  # a delta: the slot holds the patch; write the image
            flash.begin_inactive(*offer.key)
            flash.write_inactive(*offer.key, 0, offer.image)
        try:
            record = stage_record(flash.boot_record(), offer.verdict)
        except ValueError as exc:
            self.last_error = str(exc)
            self._end_offer(staged=False)
            return
        flash.commit_boot_record(record)  # the one write that stages the update
        flash.clear_transfer_state()
        self._end_offer(staged=True)

    # --- availability, resets, self-test --------------------------------------------------

    def _on_availability(self, events: list[AvailabilityEvent]) -> None:
        for event in events:
            if isinstance(event, PublishToCloud):
                self._publish(event.name, event.data, "event")
            elif isinstance(event, AppEvent):
                self._app_events.append(event.name)
            elif isinstance(event, ResetNow):
                self._reboot(event.reason)

    def _run_app_hooks(self) -> None:
        # After the machine is consistent: a hook may call back (e.g. enable_reset()).
        while self._app_events:
            name = self._app_events.pop(0)
            hook = {
                APP_RESET_PENDING: self.on_reset_pending,
                APP_FIRMWARE_UPDATE_PENDING: self.on_update_pending,
            }.get(name)
            if hook is not None:
                hook()

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

    def _note_outcome(self, outcome: UpdateOutcome | None) -> None:
        if outcome is not None:
            self.last_result = _result_of(outcome)


def _check_start(offer: _Offer, start: UpdateStart) -> None:
    """UpdateStart must announce the file the signed manifest names (or the offered delta)."""
    manifest = offer.manifest
    if offer.delta_base is None:
        if start.is_delta:
            raise TransferRejectedError(
                "a delta was sent for a full-image offer", TransferStatus.BAD_BASE
            )
        if (start.file_sha256, start.file_size) != (manifest.sha256, manifest.size):
            raise TransferRejectedError(
                f"UpdateStart names a {start.file_size}-byte file {start.file_sha256.hex()}, the "
                f"signed manifest a {manifest.size}-byte file {manifest.sha256.hex()}"
            )
    elif start.base_sha256 != offer.delta_base:
        raise TransferRejectedError(
            "UpdateStart names another delta base than the offer", TransferStatus.BAD_BASE
        )
    announced = (start.module_function, start.module_index, start.module_version)
    signed = (manifest.module_function, manifest.module_index, manifest.module_version)
    if start.module_function and announced != signed:
        raise TransferRejectedError(
            f"UpdateStart announces module {announced}, the signed manifest {signed}"
        )


def _hold_off_of(data: str) -> float:
    """The ``hold_off`` seconds of a going-away notice (0 when absent or malformed)."""
    try:
        value = json.loads(data).get("hold_off", 0)
    except (ValueError, AttributeError):
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        return 0.0
    return min(float(value), MAX_HOLD_OFF)


def _result_of(outcome: UpdateOutcome) -> UpdateResult:
    status = RESULT_STATUS[outcome.status]
    detail = outcome.status.name.lower()
    if status != "committed":
        detail += f"; running version {outcome.previous_version}"
    return UpdateResult(outcome.function, outcome.index, outcome.version, status, detail)
