"""The products' signing keys and rotation statements as one server process last read them.

Every device's Hello answer carries the statements it lacks and every offer is signed with
the product's current key: reading the store for each would cost a database round trip per
device. The cache keeps, per product, the current key (unsealed once) and the statements
read in ONE transaction (so the key is always one the statements introduce), and what a
device trusts after each number of statements.

It is brought up to date

* at once when a key changes anywhere: every key change appends a ``PRODUCT_KEYS_CHANGED``
  event in its own transaction (server.devices.keys), which the event relay of every server
  process, on every node sharing the store, publishes on its bus (server.relay);
* every :data:`RECHECK_INTERVAL` seconds by a check of all products' stamps (current key id,
  number of statements: two grouped reads for the whole installation), which covers a
  process that runs no relay (one server on its embedded store, with ``ota product
  rotate-key`` run beside it) and an event the relay dropped;
* on demand (:meth:`ProductKeyCache.refresh`), when key_sync finds the key it read
  withdrawn since.

A failed read keeps the keys read before (logged); the next event or check reads again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from otacore.signing import SigningKey
from server.devices.key_import import import_key_files
from server.devices.keys import ProductKeyState, product_key_state, trusted_key_ids
from server.events import PRODUCT_KEYS_CHANGED, Event, EventBus
from server.store import Store

log = logging.getLogger("ota.keys")

#: Seconds between checks of every product's key stamp (see the module docstring); a
#: rotation reaches a process without a relay within this long.
RECHECK_INTERVAL = 1.0


@dataclass
class KeySnapshot:
    """One product's key and statements as one transaction read them."""

    key: SigningKey
    statements: list[bytes]
    #: Statements applied -> key ids a device then trusts.
    trusted: dict[int, frozenset[str]] = field(default_factory=dict)

    @property
    def stamp(self) -> tuple[str, int]:
        """(current key id, number of statements): changes with every key change."""
        return self.key.key_id, len(self.statements)

    def trusted_at(self, applied: int) -> frozenset[str]:
        """The key ids a device trusts once it applied its first ``applied`` statements."""
        if not self.statements:
            return frozenset({self.key.key_id})
        applied = min(max(applied, 0), len(self.statements))
        if applied not in self.trusted:
            self.trusted[applied] = frozenset(trusted_key_ids(self.statements, self.key,
                                                              applied))
        return self.trusted[applied]


def changed_product(event: Event) -> int | None:
    """The product a ``PRODUCT_KEYS_CHANGED`` event names (server.store.tx_keys)."""
    try:
        product_id = json.loads(event.data or "")["product_id"]
    except (ValueError, TypeError, KeyError):
        return None
    return product_id if isinstance(product_id, int) else None


class ProductKeyCache:
    """Per-process cache of the products' keys (see the module docstring)."""

    def __init__(self, store: Store, data_dir: Path, limiter: trio.CapacityLimiter,
                 *, recheck_interval: float = RECHECK_INTERVAL) -> None:
        self.store = store
        self.data_dir = Path(data_dir)
        self.limiter = limiter
        self.recheck_interval = recheck_interval
        self._snapshots: dict[int, KeySnapshot] = {}
        #: Products to read again at the next wake-up (events received).
        self._dirty: set[int] = set()
        #: Reads are numbered as they start; a read installs its snapshot only if no read
        #: that started later did already (a later read sees a later snapshot).
        self._read_serial = 0
        self._installed: dict[int, int] = {}
        self._wake = trio.Event()
        #: Reads done (tests and metrics: how often the store was asked).
        self.reads = 0
        #: Stamp checks that failed (the store away): a causal marker for tests.
        self.failed_checks = 0

    # -- the hot path (no store access) ---------------------------------------------------

    def statements(self, product_id: int) -> list[bytes]:
        """The product's statements as last read ([] before its first key)."""
        snapshot = self._snapshots.get(product_id)
        return [] if snapshot is None else snapshot.statements

    def cached(self, product_id: int) -> KeySnapshot | None:
        """The product's snapshot, None when it was never read."""
        return self._snapshots.get(product_id)

    async def snapshot(self, product_id: int) -> KeySnapshot:
        """The product's key and statements: cached, or read now (its first key is made
        on first use)."""
        snapshot = self._snapshots.get(product_id)
        return snapshot if snapshot is not None else await self.refresh(product_id)

    # -- reads ----------------------------------------------------------------------------

    async def refresh(self, product_id: int) -> KeySnapshot:
        """Read the product's key and statements now (in a worker thread)."""
        self._read_serial += 1
        serial = self._read_serial
        state: ProductKeyState = await trio.to_thread.run_sync(
            partial(product_key_state, self.store, self.data_dir, product_id),
            limiter=self.limiter)
        self.reads += 1
        snapshot = self._snapshots.get(product_id)
        if serial > self._installed.get(product_id, 0):
            self._installed[product_id] = serial
            if snapshot is None or snapshot.stamp != (state.key.key_id, len(state.statements)):
                snapshot = KeySnapshot(state.key, state.statements)
                self._snapshots[product_id] = snapshot
        assert snapshot is not None  # installed now, or by a later read
        return snapshot

    def _stamps(self) -> dict[int, tuple[str, int]]:
        with self.store.read() as tx:
            return tx.key_stamps()

    async def _check_stamps(self) -> None:
        """Read again every product whose stamp changed (or that an event named)."""
        stamps = await trio.to_thread.run_sync(self._stamps, limiter=self.limiter)
        dirty, self._dirty = self._dirty, set()
        for product_id, snapshot in list(self._snapshots.items()):
            if stamps.get(product_id) != snapshot.stamp:
                dirty.add(product_id)
        # Products never read are read on first use: only those with statements are read
        # ahead (their devices' Hello answers need the statements without a read).
        dirty |= {p for p, (_, count) in stamps.items() if count and p not in self._snapshots}
        for product_id in sorted(dirty):
            if product_id in stamps:
                await self.refresh(product_id)
            else:  # the product was deleted (its keys went with it)
                self._snapshots.pop(product_id, None)
                self._installed.pop(product_id, None)

    # -- the process's task ---------------------------------------------------------------

    async def run(self, bus: EventBus, *, task_status: trio.TaskStatus[None]) -> None:
        """Import an older release's key files, read every product's keys, then keep them
        current until cancelled (module docstring). Started before the device listeners:
        a mismatch between key files and store stops the start (KeyFilesMismatchError)."""
        imported = await trio.to_thread.run_sync(import_key_files, self.store, self.data_dir,
                                                 limiter=self.limiter)
        if imported:
            log.info("imported the key files of products %s into the store", imported)
        await self._check_stamps()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen, bus)
            task_status.started()
            failing = False
            while True:
                with trio.move_on_after(self.recheck_interval):
                    await self._wake.wait()
                self._wake = trio.Event()
                try:
                    await self._check_stamps()
                except Exception as exc:  # the store down: keep what was read, try again
                    self.failed_checks += 1
                    if not failing:  # once per outage, not every check (every second)
                        log.warning("signing keys not re-read (%s); the keys read before "
                                    "stay in use, checked again every %g s", exc,
                                    self.recheck_interval)
                    failing = True
                else:
                    if failing:
                        log.info("signing keys read again after a failed check")
                    failing = False

    async def _listen(self, bus: EventBus) -> None:
        """Mark the products whose keys changed anywhere (relayed events included)."""
        while True:  # a subscriber that fell behind is dropped by the bus: subscribe again
            with bus.subscribe(name_prefix=PRODUCT_KEYS_CHANGED, cloud_only=True) as sub:
                async for event in sub.receive:
                    product_id = changed_product(event)
                    if product_id is not None:
                        self._dirty.add(product_id)
                    self._wake.set()  # unreadable data: every stamp is checked anyway
            self._wake.set()  # dropped: events may be lost, check every stamp now
