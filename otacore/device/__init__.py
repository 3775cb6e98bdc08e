"""Device-side update logic, sans-IO: what an emulated (or real) device decides.

* this package module: the persistent state the bootloader reads, shared by
  :mod:`otacore.device.slots` and the flash layer (:mod:`server.emulator.flash`): what each
  slot holds (:class:`SlotState`), the single atomically written :class:`BootRecord` (active
  slot per module, pending activation, trial flag with attempt counter, last outcome), and the
  markers that make test firmware misbehave on purpose;
* :mod:`otacore.device.slots`: download acceptance (integrity, signature, platform,
  dependencies), staging, and the bootloader's activation, trial, commit and rollback;
* :mod:`otacore.device.availability`: Device OS-like update availability (updates enabled,
  forced, pending) and reset control (reset disabled, reset pending), as events.

Test firmware markers: a firmware whose module body contains ``make_test_marker(...)`` (so the
marker is covered by the CRC-32, SHA-256 and signature like any other byte) misbehaves in the
emulator: ``selftest_fail_after=N`` never reaches the cloud and the emulator declares its
self-test failed after N seconds; ``crash_on_boot=True`` resets before reaching the cloud.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from dataclasses import astuple, dataclass, replace
from enum import IntEnum

from otacore.errors import ModuleFormatError, OtaError
from otacore.module import ModuleDependency, validate_module

#: (module function, module index): identifies a slot pair.
ModuleKey = tuple[int, int]
#: "No slot" in a trial's previous_slot: the module was not installed before.
NO_SLOT = 0xFF


class BootRecordFormatError(OtaError):
    """A persisted boot record is malformed or corrupt."""


@dataclass(frozen=True)
class SlotState:
    """What the bootloader knows of one slot: whether it holds a valid image, and which."""

    valid: bool
    module_version: int | None = None
    platform_id: int | None = None
    sha256: bytes | None = None  # of the whole file, as in the signed manifest
    dependencies: tuple[ModuleDependency, ...] = ()
    #: The product firmware version in the module suffix (None: no product data).
    product_version: int | None = None


EMPTY_SLOT = SlotState(False)


def slot_state_of(image: bytes | None) -> SlotState:
    """Check a slot's content as the bootloader does (module format, CRC-32, SHA-256, size)."""
    if not image:
        return EMPTY_SLOT
    try:
        info = validate_module(image)
    except ModuleFormatError:
        return EMPTY_SLOT
    sha = hashlib.sha256(image).digest()
    return SlotState(True, info.module_version, info.platform_id, sha, info.dependencies,
                     info.product_version)


class OutcomeStatus(IntEnum):
    """How the last update ended, for the report to the server."""

    COMMITTED = 1
    SELFTEST_FAILED = 2
    TOO_MANY_RESETS = 3
    IMAGE_INVALID = 4
    NO_ROLLBACK_TARGET = 5


def _check_slot(slot: int, allowed: tuple[int, ...], what: str) -> None:
    if slot not in allowed:
        raise BootRecordFormatError(f"boot record {what} slot {slot} is not one of {allowed}")


@dataclass(frozen=True)
class PendingActivation:
    """A validated image in the inactive slot, to be activated at the next reset."""

    function: int
    index: int
    slot: int
    version: int
    sha256: bytes

    def __post_init__(self) -> None:
        _check_slot(self.slot, (0, 1), "pending")


@dataclass(frozen=True)
class TrialState:
    """The module whose new image is on trial, where to roll back to, and boots so far."""

    function: int
    index: int
    previous_slot: int  # NO_SLOT when there is nothing to roll back to
    attempts: int
    version: int
    previous_version: int

    def __post_init__(self) -> None:
        _check_slot(self.previous_slot, (0, 1, NO_SLOT), "trial previous")


@dataclass(frozen=True)
class UpdateOutcome:
    """The end of the last update, kept until the server has been told."""

    function: int
    index: int
    version: int
    previous_version: int
    status: OutcomeStatus

    def __post_init__(self) -> None:
        if self.status not in OutcomeStatus._value2member_map_:
            raise BootRecordFormatError(f"boot record outcome status {self.status} is unknown")
        object.__setattr__(self, "status", OutcomeStatus(self.status))

    @property
    def succeeded(self) -> bool:
        """True when the new image was committed."""
        return self.status is OutcomeStatus.COMMITTED


@dataclass(frozen=True)
class RollbackGuard:
    """The application anti-rollback state (see :mod:`otacore.downgrade`).

    ``floor`` is the product firmware version of the last application the device committed
    (it passed its self-test): an offer of an older one needs a downgrade authorisation.
    The bootloader's own rollback of a failed trial and a fall-back to the other slot leave
    it alone, so it survives reboots and rollbacks. ``authorised_at`` is the ``issued_at_ms``
    of the last downgrade authorisation used (0: none), which every next one must exceed.
    """

    floor: int
    authorised_at: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.floor <= 0xFFFFFFFF or not 0 <= self.authorised_at < 1 << 64:
            raise BootRecordFormatError("boot record rollback guard is out of range")


_BOOT_HEADER = struct.Struct(">4sBIB")  # magic, format, generation u32, module count u8
_ACTIVE_ENTRY = struct.Struct(">BBB")  # function, index, slot
# Optional sections: a presence byte, then the fields (all zero when absent).
_SECTIONS: tuple[tuple[str, type, struct.Struct], ...] = (
    ("pending", PendingActivation, struct.Struct(">BBBBH32s")),
    ("trial", TrialState, struct.Struct(">BBBBBHH")),
    ("outcome", UpdateOutcome, struct.Struct(">BBBHHB")),
    ("rollback", RollbackGuard, struct.Struct(">BIQ")),  # format 2 onwards
)
_BOOT_MAGIC = b"OTAB"
#: Format 2 added the rollback section; format 1 records (without it) are still read.
_BOOT_FORMAT = 2
_SECTIONS_OF_FORMAT = {1: _SECTIONS[:3], 2: _SECTIONS}


def _fixed_size(sections: tuple[tuple[str, type, struct.Struct], ...]) -> int:
    return _BOOT_HEADER.size + sum(layout.size for _, _, layout in sections) + 4


@dataclass(frozen=True)
class BootRecord:
    """Active slot of every module, plus any pending activation, trial and outcome.

    ``generation`` counts writes (it wraps at 2**32) so logs can order records.
    """

    active: tuple[tuple[int, int, int], ...] = ()  # (function, index, slot), sorted
    pending: PendingActivation | None = None
    trial: TrialState | None = None
    outcome: UpdateOutcome | None = None
    generation: int = 0
    #: None until the first boot that knows about rollback protection sets it.
    rollback: RollbackGuard | None = None

    def __post_init__(self) -> None:
        active = tuple(sorted(tuple(entry) for entry in self.active))
        if len({(f, i) for f, i, _ in active}) != len(active):
            raise BootRecordFormatError("boot record lists a module twice")
        for _, _, slot in active:
            _check_slot(slot, (0, 1), "active")
        object.__setattr__(self, "active", active)

    def active_slot(self, key: ModuleKey) -> int | None:
        """The running slot of module ``key``, or None when it is not installed."""
        for function, index, slot in self.active:
            if (function, index) == key:
                return slot
        return None

    def with_active(self, key: ModuleKey, slot: int) -> BootRecord:
        """A copy with module ``key`` running from ``slot``."""
        rest = tuple(entry for entry in self.active if (entry[0], entry[1]) != key)
        return replace(self, active=(*rest, (key[0], key[1], slot)))

    def same_state(self, other: BootRecord) -> bool:
        """True when both records say the same thing (generation aside)."""
        return replace(self, generation=0) == replace(other, generation=0)

    def next_generation(self) -> BootRecord:
        """A copy with the generation counter advanced (done once per write)."""
        return replace(self, generation=(self.generation + 1) & 0xFFFFFFFF)

    def to_bytes(self) -> bytes:
        """Fixed binary form, CRC-32 at the end."""
        count = len(self.active)
        out = bytearray(_BOOT_HEADER.pack(_BOOT_MAGIC, _BOOT_FORMAT, self.generation, count))
        for entry in self.active:
            out += _ACTIVE_ENTRY.pack(*entry)
        for name, _, layout in _SECTIONS:
            value = getattr(self, name)
            out += layout.pack(1, *astuple(value)) if value else bytes(layout.size)
        out += struct.pack(">I", zlib.crc32(out))
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> BootRecord:
        """Parse :meth:`to_bytes` output; raises BootRecordFormatError when corrupt."""
        data = bytes(data)
        if len(data) < _BOOT_HEADER.size:
            raise BootRecordFormatError(f"boot record of {len(data)} bytes is truncated")
        magic, version, generation, count = _BOOT_HEADER.unpack_from(data)
        layouts = _SECTIONS_OF_FORMAT.get(version)
        if magic != _BOOT_MAGIC or layouts is None:
            raise BootRecordFormatError("not a boot record (bad magic or format version)")
        size = _fixed_size(layouts) + count * _ACTIVE_ENTRY.size
        if len(data) != size:
            raise BootRecordFormatError(
                f"boot record with {count} modules must be {size} bytes, not {len(data)}"
            )
        (crc,) = struct.unpack_from(">I", data, size - 4)
        if zlib.crc32(data[:-4]) != crc:
            raise BootRecordFormatError("boot record CRC-32 mismatch: the stored copy is corrupt")
        offset = _BOOT_HEADER.size
        active = [_ACTIVE_ENTRY.unpack_from(data, offset + i * 3) for i in range(count)]
        offset += count * _ACTIVE_ENTRY.size
        sections: dict[str, object] = {}
        for name, kind, layout in layouts:
            fields = layout.unpack_from(data, offset)
            offset += layout.size
            if fields[0] == 1:
                sections[name] = kind(*fields[1:])
            elif data[offset - layout.size : offset] != bytes(layout.size):
                raise BootRecordFormatError(f"boot record {name} section is malformed")
        return cls(tuple(active), generation=generation, **sections)  # type: ignore[arg-type]


def inactive_slot(record: BootRecord, key: ModuleKey) -> int:
    """The slot a download for module ``key`` goes into (slot 0 for a new module)."""
    active = record.active_slot(key)
    return 0 if active is None else 1 - active


def acknowledge_outcome(record: BootRecord) -> BootRecord:
    """The record after the session layer has reported ``record.outcome`` to the server."""
    return replace(record, outcome=None)


# --- test firmware behaviour markers ------------------------------------------------------

TEST_MARKER_PREFIX = b"\x00OTA-TEST:"
_MARKER_RE = re.compile(rb"\x00OTA-TEST:([a-z0-9=.,-]{1,64});")


@dataclass(frozen=True)
class TestBehaviour:
    """How an emulated device runs a firmware: normally, or failing on purpose."""

    __test__ = False  # not a pytest test class

    selftest_fail_after: float | None = None  # never reaches the cloud; fail after N seconds
    crash_on_boot: bool = False  # resets before reaching the cloud

    @property
    def normal(self) -> bool:
        """True for a firmware without a failure marker."""
        return self.selftest_fail_after is None and not self.crash_on_boot


def make_test_marker(
    *, selftest_fail_after: float | None = None, crash_on_boot: bool = False
) -> bytes:
    """Bytes to embed in a test firmware's module body to make it misbehave."""
    words = []
    if selftest_fail_after is not None:
        if not 0 <= selftest_fail_after < 1e6:
            raise ValueError("selftest_fail_after must be between 0 and 1e6 seconds")
        words.append(f"selftest-fail={selftest_fail_after:g}")
    if crash_on_boot:
        words.append("crash-on-boot")
    if not words:
        raise ValueError("a test marker needs at least one behaviour")
    return TEST_MARKER_PREFIX + ",".join(words).encode() + b";"


def read_test_behaviour(image: bytes) -> TestBehaviour:
    """The behaviour a firmware's marker asks for (normal when it has no well-formed one)."""
    match = _MARKER_RE.search(image)
    if match is None:
        return TestBehaviour()
    fail_after: float | None = None
    crash = False
    for word in match.group(1).decode().split(","):
        if word == "crash-on-boot":
            crash = True
        elif word.startswith("selftest-fail="):
            try:
                fail_after = float(word.removeprefix("selftest-fail="))
            except ValueError:
                return TestBehaviour()
        else:
            return TestBehaviour()
    return TestBehaviour(fail_after, crash)
