"""What an emulated device reports: the modules it runs (read at boot), the Hello that opens
a session, the Describe of its modules, the result of its last update, and the status
snapshots its shell shows (sent to ``on_status`` when they change).

:class:`ReportsMixin` is mixed into :class:`~otacore.device.emulated.EmulatedDevice`. It is
separate from the protocol machine because it only reads the device's state (flash, trust
store, availability) and describes it; what it owns is what it derives: the running modules
and versions, the last update result and the last status sent.
"""

from __future__ import annotations

from collections.abc import Callable

from otacore.device import ModuleKey, OutcomeStatus, UpdateOutcome
from otacore.device.availability import UpdateAvailability
from otacore.device.emulated_api import (
    DeviceConfig,
    DeviceFlash,
    DevicePhase,
    DeviceStatus,
    InstalledModule,
)
from otacore.device.slots import BootDecision
from otacore.messages import Dependency, Describe, Hello, ModuleDescription
from otacore.module import parse_module
from otacore.platforms import ModuleFunction
from otacore.protocol.link import TcpLink, Transport, UdpLink
from otacore.protocol.ota_wire import UpdateResult
from otacore.signing import TrustStore

SYSTEM_PART_1: ModuleKey = (ModuleFunction.SYSTEM_PART, 1)
USER_PART_1: ModuleKey = (ModuleFunction.USER_PART, 1)
#: How each boot-record outcome is reported in UPDATE_RESULT_EVENT.
RESULT_STATUS = {
    OutcomeStatus.COMMITTED: "committed",
    OutcomeStatus.SELFTEST_FAILED: "rolled_back",
    OutcomeStatus.TOO_MANY_RESETS: "rolled_back",
    OutcomeStatus.IMAGE_INVALID: "failed",
    OutcomeStatus.NO_ROLLBACK_TARGET: "failed",
}


class ReportsMixin:
    """The device's reports and status snapshots (part of EmulatedDevice)."""

    config: DeviceConfig
    flash: DeviceFlash
    on_status: Callable[[DeviceStatus], None] | None
    bytes_received: int
    bytes_total: int
    boots: int
    sessions: int
    last_result: UpdateResult | None
    last_error: str
    _availability: UpdateAvailability
    _trust: TrustStore | None
    _link: UdpLink | TcpLink | None
    _transport: Transport | None
    _modules: tuple[InstalledModule, ...]
    _product_version: int
    _system_version: int
    _safe_mode: bool
    _notified: tuple[object, ...]

    @property
    def phase(self) -> DevicePhase:
        raise NotImplementedError  # EmulatedDevice knows what it is doing

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
        trust = self._trust
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
            compressed_ota=config.compressed_ota,
            delta_format=config.delta_format,
            key_sequence=trust.sequence if trust is not None else None,
            app_version_floor=record.rollback.floor if record.rollback is not None else None,
            key_push=config.key_push,
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

    def _note_outcome(self, outcome: UpdateOutcome | None) -> None:
        if outcome is not None:
            self.last_result = result_of(outcome)


def result_of(outcome: UpdateOutcome) -> UpdateResult:
    """How a boot-record outcome is reported in UPDATE_RESULT_EVENT."""
    status = RESULT_STATUS[outcome.status]
    detail = outcome.status.name.lower()
    if status != "committed":
        detail += f"; running version {outcome.previous_version}"
    return UpdateResult(outcome.function, outcome.index, outcome.version, status, detail)
