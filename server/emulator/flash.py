"""Persistent simulated flash of one emulated device, crash-safe against SIGKILL and power loss.

Layout of a device's state directory::

    boot-record.0, .1           the boot record (otacore.device.BootRecord), with the
                                application anti-rollback floor (RollbackGuard)
    trust-store.0, .1           the trust store (otacore.signing.TrustStore)
    transfer-state.0, .1        the transfer receiver's state (opaque bytes), if a transfer runs
    slots/f<F>-i<I>-s<S>.bin    slot S (0 or 1) of module function F, index I

Small records are kept in two copies, as flash config sectors are: each write goes, in place,
into the copy that does *not* hold the newest valid record, with a sequence number one higher
and a CRC-32 over sequence, length and payload; the reader takes the valid copy with the
highest sequence. A write torn at any byte (SIGKILL, power loss) fails its CRC, and the other
copy still holds the previous record, so every record write is atomic. This replaces the
"temporary file + rename" scheme for records: on ext4 (auto_da_alloc) a rename over an existing
file forces a data flush, measured here at ~2 ms per write even without fsync, against ~9 us
for an in-place write; with fsync on, a record write costs one fsync instead of two. Provisioning
(factory images into slot 0) still uses temporary file + fsync + rename + directory fsync.

Downloads are written in place into the module's *inactive* slot (one ``pwrite`` per chunk):
no record points at that slot until the image is validated and staged, so a torn slot is
harmless. Before any record is written, slot data written since the last record is fsynced, so
a record never names data that a power loss could still take away. The flash refuses writes to
a slot that is active, pending activation, or the rollback target of a trial.

``fsync=False`` skips every fsync (writes happen in the same order). That keeps SIGKILL safety
(the kernel keeps the written pages of a killed process) but not power-loss safety; benchmarks
running thousands of emulated devices in one process use it to avoid fsync storms. No file
descriptor stays open between calls, so thousands of ``Flash`` objects fit within the
process's descriptor limit.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from otacore.device import (
    BootRecord,
    BootRecordFormatError,
    ModuleKey,
    SlotState,
    inactive_slot,
    slot_state_of,
)
from otacore.device.slots import (
    DEFAULT_MAX_TRIAL_BOOTS,
    BootDecision,
    SelfTestDecision,
    decide_boot,
    on_selftest_result,
)
from otacore.errors import ModuleFormatError, StoreError
from otacore.module import parse_module
from otacore.signing import TrustStore

BOOT_RECORD_FILE = "boot-record"
TRUST_STORE_FILE = "trust-store"
TRANSFER_STATE_FILE = "transfer-state"
SLOTS_DIR = "slots"
_TMP_SUFFIX = ".tmp"
#: magic, sequence u64, payload length u32 (ABSENT: cleared), CRC-32 of the rest; then payload
_COPY_HEADER = struct.Struct(">4sQII")
_COPY_MAGIC = b"OTAR"
_ABSENT = 0xFFFFFFFF


class FlashError(StoreError):
    """The simulated flash cannot do what was asked."""


class FlashCorruptError(FlashError):
    """A record on the simulated flash is corrupt (this should never follow a crash)."""


class SlotInUseError(FlashError):
    """A write targets a slot that is active, pending activation or a rollback target."""


def _check_key(function: int, index: int, slot: int | None = None) -> None:
    if not (0 <= function <= 0xFF and 0 <= index <= 0xFF):
        raise ValueError(f"module function {function} / index {index} out of range 0..255")
    if slot is not None and slot not in (0, 1):
        raise ValueError(f"slot must be 0 or 1, not {slot}")


class Flash:
    """One device's simulated flash. Create with :meth:`open`; one writer per directory."""

    def __init__(self, state_dir: Path, *, fsync: bool, record: BootRecord) -> None:
        self._dir = state_dir
        self._slots_dir = state_dir / SLOTS_DIR
        self._fsync = fsync
        self._record = record
        self._dirty: set[Path] = set()  # slot files written since the last fsync
        self._dirs_dirty = False  # a slot file was created since the last directory fsync
        self._states: dict[tuple[int, int, int], SlotState] = {}
        # Per two-copy record: (newest sequence, copy holding it or -1, whether it is absent).
        self._copies: dict[str, tuple[int, int, bool]] = {}
        #: fsync calls made (files and directories), for benchmarks.
        self.fsync_count = 0

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str], *, fsync: bool = True) -> Flash:
        """Open (creating if needed) the flash in ``state_dir`` and recover from a crash."""
        root = Path(state_dir)
        (root / SLOTS_DIR).mkdir(parents=True, exist_ok=True)
        for directory in (root, root / SLOTS_DIR):
            for stray in directory.glob("*" + _TMP_SUFFIX):
                stray.unlink(missing_ok=True)  # an interrupted provisioning write
        flash = cls(root, fsync=fsync, record=BootRecord())
        raw = flash._load_record(BOOT_RECORD_FILE)
        if raw is not None:
            try:
                flash._record = BootRecord.from_bytes(raw)
            except BootRecordFormatError as exc:
                raise FlashCorruptError(f"{root / BOOT_RECORD_FILE}: {exc}") from exc
        return flash

    @property
    def state_dir(self) -> Path:
        """The directory holding this flash."""
        return self._dir

    @property
    def fsync(self) -> bool:
        """Whether writes are fsynced (power-loss safety) or not (benchmarks)."""
        return self._fsync

    # --- durability helpers ---

    def _sync_fd(self, fd: int) -> None:
        if self._fsync:
            os.fsync(fd)
            self.fsync_count += 1

    def _sync_dir(self, directory: Path) -> None:
        if self._fsync:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.fsync_count += 1

    def _flush_slots(self) -> None:
        """Make slot data written so far durable, before a record may point at it."""
        if self._fsync:
            for path in sorted(self._dirty):
                fd = os.open(path, os.O_RDONLY)
                try:
                    self._sync_fd(fd)
                finally:
                    os.close(fd)
            if self._dirs_dirty:
                self._sync_dir(self._slots_dir)
        self._dirty.clear()
        self._dirs_dirty = False

    def _write_atomic(self, path: Path, data: bytes) -> None:
        """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the directory."""
        self._flush_slots()
        tmp = path.with_name(path.name + _TMP_SUFFIX)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            self._sync_fd(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # atomic on POSIX
        self._sync_dir(path.parent)

    def _load_record(self, name: str) -> bytes | None:
        """The newest valid copy of a two-copy record (None when absent or never written)."""
        best: tuple[int, int, bytes | None] = (0, -1, None)
        damaged = 0
        for which in (0, 1):
            raw = _read_file(self._dir / f"{name}.{which}")
            if not raw:
                continue
            parsed = _parse_copy(raw)
            if parsed is None:
                damaged += 1
            elif parsed[0] > best[0]:
                best = (parsed[0], which, parsed[1])
        if damaged == 2:
            # One write at a time can tear only one copy: both bad is not a crash's doing.
            raise FlashCorruptError(f"both copies of {self._dir / name} are corrupt")
        self._copies[name] = (best[0], best[1], best[2] is None)
        return best[2]

    def _store_record(self, name: str, payload: bytes | None) -> None:
        """Write a new version of a two-copy record over its older copy (atomic, see above)."""
        if name not in self._copies:
            self._load_record(name)
        sequence, newest, absent = self._copies[name]
        if payload is None and absent:
            return  # already cleared
        self._flush_slots()
        target = 1 - newest if newest >= 0 else 0
        path = self._dir / f"{name}.{target}"
        created = not path.exists()
        length = _ABSENT if payload is None else len(payload)
        content = payload or b""
        crc = zlib.crc32(struct.pack(">QI", sequence + 1, length) + content)
        data = _COPY_HEADER.pack(_COPY_MAGIC, sequence + 1, length, crc) + content
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            if os.pwrite(fd, data, 0) != len(data):
                raise FlashError(f"short write to {path}")
            self._sync_fd(fd)
        finally:
            os.close(fd)
        if created:
            self._sync_dir(self._dir)
        self._copies[name] = (sequence + 1, target, payload is None)

    # --- slots ---

    def slot_path(self, function: int, index: int, slot: int) -> Path:
        """File holding ``slot`` of module (``function``, ``index``)."""
        _check_key(function, index, slot)
        return self._slots_dir / f"f{function}-i{index}-s{slot}.bin"

    def inactive_slot(self, function: int, index: int) -> int:
        """The slot downloads for this module go into."""
        return inactive_slot(self._record, (function, index))

    def _writable_inactive(self, function: int, index: int) -> int:
        key = (function, index)
        slot = self.inactive_slot(function, index)
        record = self._record
        if record.trial is not None and (record.trial.function, record.trial.index) == key:
            raise SlotInUseError(
                f"slot {slot} of module {function}/{index} is the rollback target of a trial; "
                "commit or roll back first"
            )
        pending = record.pending
        if pending is not None and (pending.function, pending.index, pending.slot) == (
            function,
            index,
            slot,
        ):
            raise SlotInUseError(
                f"slot {slot} of module {function}/{index} is pending activation; write a boot "
                "record without the pending activation first (otacore.device.slots.plan_download)"
            )
        return slot

    def begin_inactive(self, function: int, index: int) -> int:
        """Erase the inactive slot of a module for a new download; returns its number.

        Saved transfer state is forgotten first: it describes the data being erased.
        """
        slot = self._writable_inactive(function, index)
        self.clear_transfer_state()
        path = self.slot_path(function, index, slot)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.close(fd)
        self._dirty.add(path)
        self._dirs_dirty |= created
        self._states.pop((function, index, slot), None)
        return slot

    def write_inactive(self, function: int, index: int, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of the module's inactive slot (in place, not fsynced)."""
        if offset < 0:
            raise ValueError("offset must not be negative")
        slot = self._writable_inactive(function, index)
        path = self.slot_path(function, index, slot)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            written = os.pwrite(fd, data, offset)
            if written != len(data):
                raise FlashError(f"short write to {path}: {written} of {len(data)} bytes")
        finally:
            os.close(fd)
        self._dirty.add(path)
        self._dirs_dirty |= created
        self._states.pop((function, index, slot), None)

    def read_slot(
        self, function: int, index: int, slot: int, offset: int = 0, length: int | None = None
    ) -> bytes:
        """Bytes of a slot (empty when the slot was never written)."""
        path = self.slot_path(function, index, slot)
        try:
            with path.open("rb") as handle:
                handle.seek(offset)
                return handle.read() if length is None else handle.read(length)
        except FileNotFoundError:
            return b""

    def slot_size(self, function: int, index: int, slot: int) -> int:
        """Size in bytes of a slot's content (0 when never written)."""
        try:
            return self.slot_path(function, index, slot).stat().st_size
        except FileNotFoundError:
            return 0

    def read_active(self, function: int, index: int) -> bytes | None:
        """The running image of a module, or None when the module is not installed."""
        slot = self._record.active_slot((function, index))
        return None if slot is None else self.read_slot(function, index, slot)

    def read_inactive(self, function: int, index: int) -> bytes:
        """The content of a module's inactive slot (a download in progress or done)."""
        return self.read_slot(function, index, self.inactive_slot(function, index))

    def _modules(self) -> set[ModuleKey]:
        keys = {(f, i) for f, i, _ in self._record.active}
        for path in self._slots_dir.glob("f*-i*-s*.bin"):
            try:
                f, i, _ = (int(part[1:]) for part in path.stem.split("-"))
            except ValueError:
                continue
            keys.add((f, i))
        return keys

    def slot_state(self, function: int, index: int, slot: int) -> SlotState:
        """What the bootloader sees in one slot (cached until the slot is written)."""
        cache_key = (function, index, slot)
        state = self._states.get(cache_key)
        if state is None:
            state = slot_state_of(self.read_slot(function, index, slot))
            self._states[cache_key] = state
        return state

    def slot_states(self) -> dict[ModuleKey, tuple[SlotState, SlotState]]:
        """Both slots of every module, as ``otacore.device.slots.decide_boot`` takes them."""
        return {
            (f, i): (self.slot_state(f, i, 0), self.slot_state(f, i, 1))
            for f, i in sorted(self._modules())
        }

    def installed_modules(self) -> list[tuple[int, int, int]]:
        """(function, index, version) of every module whose active slot holds a valid image."""
        installed = []
        for function, index, slot in self._record.active:
            state = self.slot_state(function, index, slot)
            if state.valid and state.module_version is not None:
                installed.append((function, index, state.module_version))
        return installed

    # --- the boot record ---

    def boot_record(self) -> BootRecord:
        """The boot record as last committed."""
        return self._record

    def commit_boot_record(self, record: BootRecord) -> BootRecord:
        """Write ``record`` atomically (after making slot data durable); returns it as stored.

        The stored generation is the previous one plus one, whatever ``record`` carries.
        """
        stored = replace(record, generation=self._record.generation).next_generation()
        self._store_record(BOOT_RECORD_FILE, stored.to_bytes())
        self._record = stored
        return stored

    def boot(self, *, max_trial_boots: int = DEFAULT_MAX_TRIAL_BOOTS) -> BootDecision:
        """Run the bootloader's decision and commit its record before anything starts."""
        decision = decide_boot(self._record, self.slot_states(), max_trial_boots=max_trial_boots)
        if decision.changed:
            self.commit_boot_record(decision.record)
        return decision

    def record_selftest(self, passed: bool) -> SelfTestDecision:
        """Commit or roll back the trial image after its self-test; commit the record."""
        decision = on_selftest_result(self._record, passed, self.slot_states())
        if decision.changed:
            self.commit_boot_record(decision.record)
        return decision

    def provision(self, images: Iterable[bytes], trust_store: TrustStore) -> BootRecord:
        """Factory programming: each image into slot 0 of its module, the trust store, and a
        boot record naming exactly these modules (an existing one is replaced)."""
        active: dict[ModuleKey, int] = {}
        for image in images:
            try:
                info = parse_module(image)
            except ModuleFormatError as exc:
                raise FlashError(f"cannot provision an invalid module: {exc}") from exc
            key = (info.module_function, info.module_index)
            if key in active:
                raise FlashError(f"two provisioned images for module {key[0]}/{key[1]}")
            self._write_atomic(self.slot_path(*key, 0), bytes(image))
            self._states.pop((*key, 0), None)
            active[key] = 0
        self.save_trust_store(trust_store)
        self.clear_transfer_state()
        return self.commit_boot_record(BootRecord(tuple((f, i, s) for (f, i), s in active.items())))

    # --- trust store and transfer state ---

    def load_trust_store(self) -> TrustStore | None:
        """The persisted trust store, or None before provisioning."""
        raw = self._load_record(TRUST_STORE_FILE)
        if raw is None:
            return None
        try:
            return TrustStore.from_bytes(raw)
        except ModuleFormatError as exc:
            raise FlashCorruptError(f"{self._dir / TRUST_STORE_FILE}: {exc}") from exc

    def save_trust_store(self, store: TrustStore) -> None:
        """Persist ``store`` atomically (after a key rotation statement was applied)."""
        self._store_record(TRUST_STORE_FILE, store.to_bytes())

    def load_transfer_state(self) -> bytes | None:
        """The transfer receiver's saved state, or None when no transfer is in progress."""
        return self._load_record(TRANSFER_STATE_FILE)

    def save_transfer_state(self, state: bytes) -> None:
        """Persist the transfer receiver's state atomically, after the slot data it describes."""
        self._store_record(TRANSFER_STATE_FILE, bytes(state))

    def clear_transfer_state(self) -> None:
        """Forget the transfer receiver's state (transfer finished or abandoned)."""
        self._store_record(TRANSFER_STATE_FILE, None)


def _parse_copy(raw: bytes) -> tuple[int, bytes | None] | None:
    """(sequence, payload or None when cleared) of one record copy, None when torn/invalid."""
    if len(raw) < _COPY_HEADER.size:
        return None
    magic, sequence, length, crc = _COPY_HEADER.unpack_from(raw)
    size = 0 if length == _ABSENT else length
    if magic != _COPY_MAGIC or _COPY_HEADER.size + size > len(raw):
        return None
    payload = raw[_COPY_HEADER.size : _COPY_HEADER.size + size]
    if zlib.crc32(struct.pack(">QI", sequence, length) + payload) != crc:
        return None
    return sequence, None if length == _ABSENT else payload


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
