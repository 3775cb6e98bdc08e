"""Shared machinery of the fleet service: thread offload, clock, event emission, lookups."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from otacore.errors import ValidationError
from otacore.precedence import (
    DeviceTargeting,
    ProductReleases,
    Release,
    Target,
    target_firmware_for,
)
from server.events import Event, EventBus
from server.fleet.errors import UnknownDeviceError, UnknownProductError
from server.fleet.hand_off import MemoryHandOff
from server.fleet.recent_blobs import RecentBlobs
from server.store import DeviceRecord, ProductRecord, ReleaseRecord, Store, Tx

_T = TypeVar("_T")
#: Checked with fullmatch: "$" also matches before a trailing newline, so "<id>\n" would
#: pass as a second spelling of the same device.
_DEVICE_ID_RE = re.compile(r"[0-9a-f]{24}")

#: Product firmware versions are u16: the module suffix's product version field.
MAX_FIRMWARE_VERSION = 0xFFFF


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


def normalize_device_id(value: object) -> str:
    """A device id as 24 lowercase hex digits, or ValidationError."""
    if not isinstance(value, str) or not _DEVICE_ID_RE.fullmatch(value.lower()):
        raise ValidationError(f"device id {value!r} must be 24 hexadecimal digits")
    return value.lower()


def check_version(value: object, what: str = "version") -> int:
    """A firmware version: an integer 0..65535 (ints or digit strings), or ValidationError."""
    if isinstance(value, bool):
        raise ValidationError(f"{what} must be an integer, not a boolean")
    if isinstance(value, str) and (value.strip().isascii() and value.strip().isdigit()):
        if len(value.strip()) > 5:  # before int(): past 4,300 digits it raises ValueError
            raise ValidationError(f"{what} must be an integer 0..{MAX_FIRMWARE_VERSION}")
        value = int(value.strip())
    if not isinstance(value, int):
        raise ValidationError(f"{what} must be an integer 0..{MAX_FIRMWARE_VERSION}")
    if not 0 <= value <= MAX_FIRMWARE_VERSION:
        raise ValidationError(f"{what} {value} is outside 0..{MAX_FIRMWARE_VERSION}")
    return value


def releases_of(records: Sequence[ReleaseRecord]) -> ProductReleases:
    """The precedence engine's view of a product's release rows."""
    default = None
    groups: dict[str, Release] = {}
    for rec in records:
        release = Release(rec.version, rec.intelligent)
        if rec.group_name is None:
            default = release
        else:
            groups[rec.group_name] = release
    return ProductReleases(default, groups)


def targeting_of(device: DeviceRecord) -> DeviceTargeting:
    """The precedence engine's view of a device."""
    return DeviceTargeting(
        development=device.development,
        locked_version=device.desired_firmware_version,
        groups=frozenset(device.groups),
    )


def target_of(device: DeviceRecord, releases: ProductReleases) -> Target:
    """The firmware the precedence rules assign to ``device``."""
    return target_firmware_for(targeting_of(device), releases)


@dataclass
class RoundTrips:
    """Store round trips the fleet made since it was built: ``reads``, each one
    worker-thread hop (a stand-alone write transaction run by :meth:`FleetBase._run` is one
    too), and ``writes``, each one operation of a group-committed batch; ``by_name`` counts
    both by the store work's name (e.g. ``SessionService.authorize_device.<locals>.read``).
    What ``tests/test_store_round_trips.py`` counts per session."""

    reads: int = 0
    writes: int = 0
    by_name: Counter[str] = field(default_factory=Counter)

    def snapshot(self) -> tuple[int, int]:
        """(reads, writes) so far."""
        return self.reads, self.writes

    def note(self, fn: object, *, write: bool) -> None:
        """Count one round trip of the store work ``fn``."""
        if write:
            self.writes += 1
        else:
            self.reads += 1
        self.by_name[getattr(fn, "__qualname__", type(fn).__name__)] += 1


@dataclass
class Outcome:
    """What a blocking store operation hands back to the async layer: a value and events."""

    value: Any = None
    events: list[Event] = field(default_factory=list)


class FleetBase:
    """Store, bus, worker-thread limiter and clock shared by the service's parts."""

    def __init__(
        self,
        store: Store,
        bus: EventBus,
        *,
        limiter: trio.CapacityLimiter | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.bus = bus
        # Bounded: at most this many blocking store calls run at once (one DB connection each).
        self.limiter = limiter if limiter is not None else trio.CapacityLimiter(8)
        self.clock = clock
        #: Store round trips made so far (see :class:`RoundTrips`).
        self.round_trips = RoundTrips()
        #: OTA memory read by each session's presence write, for its updater.
        self.memory_hand_off = MemoryHandOff()
        #: Recently read images by SHA-256 (content-addressed: never stale).
        self.recent_blobs = RecentBlobs()

    async def _run(self, fn: Callable[..., Outcome], *args: Any) -> Any:
        """Run a blocking store operation in a worker thread, then publish its events."""
        self.round_trips.note(fn, write=False)
        outcome = await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        for event in outcome.events:
            self.bus.publish(event)
        return outcome.value

    async def _run_grouped(self, fn: Callable[[Tx], Outcome]) -> Any:
        """Like :meth:`_run` for a hot small write that takes the transaction: ``fn`` runs
        in a transaction shared with concurrent callers (the store's group commit, one
        fsync for the batch, its own SAVEPOINT so its exception rolls back only its own
        changes); returns once the change is durable. Its events are published right after
        the commit, in commit order (even if this caller was cancelled meanwhile and its
        change still committed)."""
        self.round_trips.note(fn, write=True)
        outcome: Outcome = await self.store.group_commit.run(
            fn, on_commit=self._publish, limiter=self.limiter
        )
        return outcome.value

    async def run_write(self, work: Callable[[Tx], Outcome]) -> Any:
        """Run the store work a ``*_work`` builder made (e.g. ``update_progress_work``) as
        one group-committed write; its value once durable."""
        return await self._run_grouped(work)

    def _publish(self, outcome: Outcome) -> None:
        for event in outcome.events:
            self.bus.publish(event)

    async def _read(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run a blocking read in a worker thread."""
        self.round_trips.note(fn, write=False)
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def _read_grouped(self, fn: Callable[[Tx], _T]) -> _T:
        """Run a small read of the session hot path, ``fn(tx)``, in a read transaction
        shared with concurrent callers (the store's group read: one worker-thread hop for
        the batch; its snapshot is taken after this call, so it sees every change committed
        before it). For reads that take milliseconds (blobs, whole-product listings) use
        :meth:`_read`: a batch runs its reads one after another."""
        self.round_trips.note(fn, write=False)
        value: _T = await self.store.group_read.run(fn, limiter=self.limiter)
        return value

    @staticmethod
    def _product(tx: Tx, ref: int | str) -> ProductRecord:
        product = tx.get_product(ref)
        if product is None:
            shown = ref if len(str(ref)) <= 80 else f"{str(ref)[:77]}..."
            raise UnknownProductError(f"product {shown!r} not found (give its id or slug)")
        return product

    @staticmethod
    def _device_in(tx: Tx, product: ProductRecord, device_id: str) -> DeviceRecord:
        device = tx.get_device(normalize_device_id(device_id))
        if device is None or device.product_id != product.id:
            raise UnknownDeviceError(f"device {device_id} is not in product {product.slug}")
        return device

    @staticmethod
    def _device(tx: Tx, device_id: str) -> DeviceRecord:
        device = tx.get_device(normalize_device_id(device_id))
        if device is None:
            raise unknown_device(device_id)
        return device

    @staticmethod
    def _device_and_product(tx: Tx, device_id: str) -> tuple[DeviceRecord, ProductRecord]:
        """A device and its product in one query (the session hot path)."""
        found = tx.get_device_and_product(normalize_device_id(device_id))
        if found is None:
            raise unknown_device(device_id)
        return found


def unknown_device(device_id: str) -> UnknownDeviceError:
    """The error for a device id that is in no product."""
    return UnknownDeviceError(f"device {device_id} is not in any product")
