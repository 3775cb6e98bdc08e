"""What an emulated device is given and what it reports: its configuration, the flash it
stores state in, the actions its shell must take, and status snapshots for displays.

Split from :mod:`otacore.device.emulated` (the protocol machine), which re-exports all of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from otacore.delta import NEWEST_VERSION as NEWEST_DELTA_FORMAT
from otacore.device import (
    BootRecord,
    SlotState,
)
from otacore.device.slots import (
    DEFAULT_MAX_TRIAL_BOOTS,
    BootDecision,
    SelfTestDecision,
)
from otacore.errors import ValidationError
from otacore.protocol.ota_wire import (
    UpdateResult,
)
from otacore.signing import TrustStore

_DEVICE_ID = re.compile(r"[0-9a-f]{24}")


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
    #: The FinishReply is repeated while the device waits for the server's FinishAck: the
    #: first repeat after ``finish_retry`` s, doubling, ``finish_retries`` times (Device
    #: OS-like: 2 + 4 + 8 + 16 + 32 = 62 s), then it stops waiting (the transfer lapses,
    #: see otacore.transfer.receiver).
    finish_retry: float = 2.0
    finish_retries: int = 4
    #: While lapsed it asks again ``finish_reask`` s after giving up, doubling up to every
    #: ``finish_reask_max`` s, so a FinishAck lost after the repeats is made up in the
    #: session. The first continues the doubling above (32 -> 64 s); each costs one small
    #: datagram (well under the 30 s keepalive's traffic), answered by the server from its
    #: memory without a store access, so an overloaded store is not asked for more; the cap
    #: bounds the delay a lost FinishAck adds to the update to about 10 minutes.
    finish_reask: float = 64.0
    finish_reask_max: float = 600.0
    #: Hello's "compressed OTA": the device inflates zstd-compressed images (otacore.zstd_image)
    compressed_ota: bool = True
    #: Largest zstd window (log2 bytes of RAM) the device inflates a compressed image with.
    max_zstd_window_log: int = 17
    #: Hello's "key push": the device takes key rotation statements mid-session (the
    #: server's ``POST k``, ota_wire point 5). False emulates older firmware, which learns
    #: them only from a Hello's answer (the server makes it reconnect for them).
    key_push: bool = True
    #: Hello's "delta format": the newest delta patch format the device's applier reads
    #: (its patches of a newer one are refused). None sends none, as older firmware did
    #: (the server then takes it as otacore.transfer.planner.UNNAMED_DELTA_FORMAT).
    delta_format: int | None = NEWEST_DELTA_FORMAT
    #: Requests (events) waiting for the link; older heartbeats are dropped beyond this.
    max_queued_requests: int = 32
    event_ttl: int = 60

    def __post_init__(self) -> None:
        if not _DEVICE_ID.fullmatch(self.device_id):
            raise ValidationError(f"device id {self.device_id!r} is not 24 lowercase hex digits")
        for name in ("keepalive_interval", "keepalive_timeout", "hello_timeout"):
            if not getattr(self, name) > 0:
                raise ValidationError(f"device setting {name} must be positive")
        if self.delta_format is not None and not 1 <= self.delta_format <= NEWEST_DELTA_FORMAT:
            raise ValidationError(
                f"delta_format must be a patch format version from 1 to {NEWEST_DELTA_FORMAT}"
            )
        if not (self.finish_retry > 0 and self.finish_reask > 0 and self.finish_retries >= 0):
            raise ValidationError(
                "finish_retry and finish_reask must be positive, finish_retries not negative"
            )
        if not self.finish_reask_max >= self.finish_reask:
            raise ValidationError("finish_reask_max must be at least finish_reask")
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
